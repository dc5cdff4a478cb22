"""The phases: each a plain async function that returns a result object."""
