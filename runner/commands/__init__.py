"""What operators run, one module per command (like alembic's `command.py`): `pipeline`,
`status`, `report`, `decide` (approve/reject), `rollback`, `validate` (and `init`).

`cli.py` only parses, calls one of these and prints; the phases below do the work.
"""
