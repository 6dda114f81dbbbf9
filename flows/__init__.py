"""Prefect flows: which DVC stages run, in what order, with which overrides; and their deployment."""
