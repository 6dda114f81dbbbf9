"""Stages: `run(cfg, paths, log) -> dict[str, float]`. Typed config in, files out, metrics returned.

A stage never imports Prefect and reaches MLflow only through the Tracker it is handed (None in
unit tests), so it runs the same from a test, the CLI, `dvc repro` and a Prefect task.
"""
