"""The MLflow server's accounts and grants (its basic-auth app, `default_permission = NO_PERMISSIONS`):

    MLFLOW_TRACKING_URI=http://<mlflow-host>:5000 MLFLOW_TRACKING_USERNAME=admin \
    MLFLOW_TRACKING_PASSWORD=<admin password> ALIGNMENT_WORKER_PASSWORD=... ALIGNMENT_RETRAIN_PASSWORD=... \
    python -m flows.mlflow_accounts [--params params.yaml]

Run once by the operator (docker-compose.yml's `mlflow-accounts` does), again after a params change;
idempotent. What it leaves, least privilege by role:

- `alignment-worker`, the workers' and the pipeline flow's account: EDIT on the experiment
  (`tracking.experiment`: runs, metrics, artifacts) and on every model a stage registers (each section's
  `register_as`); READ on `retrain.model_name`: it cannot create versions of it nor move its alias.
- `alignment-retrain`, the retraining flow's account: EDIT on the experiment and the stage models (its
  experiment runs `rm` and the ReST stages), MANAGE on `retrain.model_name`: the only account that can
  promote (create a version and move the champion alias).
- No other account has anything: the server's default permission is none, and nothing answers without
  credentials. The admin account is for this script and the operator only.
"""

from __future__ import annotations

import argparse
import os
import sys

from alignment.config import ConfigError
from flows.config import load_all

WORKER, RETRAIN = "alignment-worker", "alignment-retrain"
PASSWORD_ENV = {WORKER: "ALIGNMENT_WORKER_PASSWORD", RETRAIN: "ALIGNMENT_RETRAIN_PASSWORD"}


def plan(params: str) -> tuple[str, dict[str, dict[str, str]]]:
    """The experiment, and per registered model the permission of each account."""
    config = load_all(params)
    champion = config["retrain"].model_name
    stage_models = {
        name
        for section in config.values()
        if isinstance(name := getattr(section, "register_as", None), str) and name != champion
    }
    models = {name: {WORKER: "EDIT", RETRAIN: "EDIT"} for name in sorted(stage_models)}
    models[champion] = {WORKER: "READ", RETRAIN: "MANAGE"}
    return config["tracking"].experiment, models


def _exists(call) -> bool:
    try:
        call()
        return True
    except Exception as error:
        if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _grant(auth, user: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Grant, or replace the grant `user` already has on the resource (no update call in the API)."""
    try:
        auth.grant_user_permission(user, resource_type, resource_id, permission)
    except Exception as error:
        if getattr(error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(user, resource_type, resource_id)
        auth.grant_user_permission(user, resource_type, resource_id, permission)


def provision(params: str = "params.yaml") -> list[str]:
    """Users (password from PASSWORD_ENV; updated when the user exists), the experiment, the registered
    models and the grants of `plan`; returns what it did, one line each."""
    import mlflow
    from mlflow.server import get_app_client

    missing = [env for env in PASSWORD_ENV.values() if not os.environ.get(env)]
    if missing:
        raise ConfigError(f"set {missing} (from your untracked .env): the accounts' passwords")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"MLFLOW_TRACKING_URI {uri!r}: the MLflow server's URL expected")
    auth = get_app_client("basic-auth", tracking_uri=uri)
    client = mlflow.MlflowClient(uri)
    done = []
    for user, env in PASSWORD_ENV.items():
        if _exists(lambda user=user: auth.get_user(user)):
            auth.update_user_password(user, os.environ[env])
            done.append(f"user {user}: password set")
        else:
            auth.create_user(user, os.environ[env])
            done.append(f"user {user}: created")
    experiment_name, models = plan(params)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    for user in PASSWORD_ENV:
        _grant(auth, user, "experiment", experiment_id, "EDIT")
        done.append(f"experiment {experiment_name}: {user} EDIT")
    for name, grants in models.items():
        if not _exists(lambda name=name: client.get_registered_model(name)):
            client.create_registered_model(name)
        for user, permission in grants.items():
            _grant(auth, user, "registered_model", name, permission)
            done.append(f"model {name}: {user} {permission}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.mlflow_accounts", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        for line in provision(args.params):
            print(line)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
