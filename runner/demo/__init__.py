"""Demo schemas and data generators for the seed scenarios."""
