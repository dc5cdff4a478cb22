"""Discovery paging, the batch executor and the throttle: the parts that touch the target table."""
