"""Prefect tasks: thin wrappers that run DVC stages (DVC decides whether a stage must re-run)."""
