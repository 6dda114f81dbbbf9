"""Every MLflow call in the project lives here.

Default store: `sqlite:///mlflow.db` with artifacts in `mlartifacts/`, both in the project folder
(the folder the CLI runs in); any `MLFLOW_TRACKING_URI` wins. A pipeline execution is one run; each
stage it causes is a nested run under it. The Prefect flow opens the pipeline run and hands its id to
the DVC-launched stage processes through `ALIGNMENT_PARENT_RUN_ID`; a stage run on its own (a test,
the CLI, a bare `dvc repro`) is a top-level run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PARENT_RUN_ENV = "ALIGNMENT_PARENT_RUN_ID"
HF_ARTIFACT = "hf_model"
STAGE_RUN_ENV = "ALIGNMENT_STAGE_RUN_ID"  # the open stage run, for checkpoints to record (see stage_run)
# a params key whose last part names a secret (or the variable holding one) is never logged; counts of
# tokens (`max_new_tokens`) and tokenizer settings are not secrets
_SECRET = re.compile(r"(^|_)(api_?key|key|token|secret|password|authorization)(_env)?$|api_?key")
# the user-info part of a URL (`https://user:token@host`): credentials, whatever the key is called
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s:@]+(:[^/\s@]*)?@")


def tracking_uri(root: Path | None = None) -> str:
    root = Path.cwd() if root is None else root
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def _mlflow(root: Path | None = None):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow  # heavy: imported on first use so that the pure library imports stay light

    mlflow.set_tracking_uri(tracking_uri(root))
    return mlflow


def _experiment_id(mlflow, name: str, root: Path | None) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # keep artifacts beside the default store
        artifacts = ((Path.cwd() if root is None else root) / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=artifacts)


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _pip_requirements(adapter: bool = False) -> list[str]:
    # pinned from what is installed, without MLflow's slow (and network-hungry) inference
    from importlib.metadata import version

    names = ("torch", "transformers", "safetensors", "mlflow") + (("peft",) if adapter else ())
    return [f"{name}=={version(name)}" for name in names]


def _is_secret(key: str) -> bool:
    return bool(_SECRET.search(key.lower().rsplit(".", 1)[-1]))


def redact(text: str) -> str:
    """`text` with every URL's credentials masked: `https://user:pw@host/x` -> `https://***@host/x`."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


def loggable(params: dict[str, Any]) -> dict[str, Any]:
    """What of `params` may be logged: a key that names a secret (or the variable holding one) is dropped,
    not masked; URLs lose their credentials; None is logged as "None"."""
    return {
        key: "None" if value is None else redact(value) if isinstance(value, str) else value
        for key, value in params.items()
        if not _is_secret(key)
    }


class Tracker:
    """What a stage logs through: an open MLflow run."""

    def __init__(self, mlflow, run_id: str):
        self._mlflow = mlflow
        self.run_id = run_id

    def params(self, params: dict[str, Any]) -> None:
        self._mlflow.log_params(loggable(params))  # secrets never reach MLflow

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def summary(self, metrics: dict[str, float]) -> None:
        """A stage's final numbers, minus those it already logged as curves (no duplicate points)."""
        logged = self._mlflow.get_run(self.run_id).data.metrics
        self.metrics({k: v for k, v in metrics.items() if k not in logged})

    def tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=folder)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def table(self, rows: list[dict], name: str) -> None:
        """A table in the run's Artifacts and Evaluation views (`name` ends in .json)."""
        if rows:
            columns = {key: [row[key] for row in rows] for key in rows[0]}
            self._mlflow.log_table(data=columns, artifact_file=name)

    def figure(self, figure, name: str) -> None:
        self._mlflow.log_figure(figure, name)

    @contextmanager
    def child_run(self, name: str, tags: dict[str, str] | None = None) -> Iterator[Tracker]:
        """A run nested under this one (the evaluation opens one per model, so that the MLflow UI
        compares the models side by side with its run comparison)."""
        experiment_id = self._mlflow.get_run(self.run_id).info.experiment_id
        with self._mlflow.start_run(
            experiment_id=experiment_id, run_name=name, nested=True, parent_run_id=self.run_id
        ) as run:
            child = Tracker(self._mlflow, run.info.run_id)
            if tags:
                child.tags(tags)
            yield child

    def register_model(self, model_dir: Path, name: str, kind: str = "causal_lm") -> str:
        """Log a saved HF model folder as an MLflow model and register it; returns the new version.

        The MLflow model is a pyfunc around the folder (`predict` generates continuations for a
        causal LM, returns scores for a reward model given `prompt` and `response` columns), so it
        loads with `mlflow.pyfunc.load_model("models:/<name>/<version>")`; the HF folder itself comes
        back with `load_registered_model`. A LoRA adapter folder is registered as it is, without its base
        model: the run's `lora_base_model` tag names the base, which must be reachable where it loads.
        """
        from alignment.serving import PYFUNCS

        adapter_config = Path(model_dir) / "adapter_config.json"  # alignment.models.loading.ADAPTER_CONFIG
        info = self._mlflow.pyfunc.log_model(
            name="model",
            python_model=PYFUNCS[kind](),
            artifacts={HF_ARTIFACT: str(model_dir)},
            pip_requirements=_pip_requirements(adapter=adapter_config.is_file()),
            registered_model_name=name,
        )
        version = str(info.registered_model_version)
        self.tags({"registered_model": f"{name}/{version}"})  # the run says which version it made
        if adapter_config.is_file():
            self.tags({"lora_base_model": json.loads(adapter_config.read_text())["base_model_name_or_path"]})
        return version


@contextmanager
def stage_run(
    stage: str, experiment: str = "alignment", root: Path | None = None, resume_run_id: str | None = None
) -> Iterator[Tracker]:
    """An MLflow run for one stage: nested under the pipeline run when one handed us its id. With
    `resume_run_id` (a run whose process was killed after a checkpoint) that run is continued instead:
    its curves go on from the step the stage resumes at. The run's id is in STAGE_RUN_ENV while open."""
    mlflow = _mlflow(root)
    parent = os.environ.get(PARENT_RUN_ENV)
    if resume_run_id:
        context = mlflow.start_run(run_id=resume_run_id)
    else:
        if parent:  # the parent's experiment wins, so the UI shows the stage under its pipeline run
            experiment_id = mlflow.get_run(parent).info.experiment_id
        else:
            experiment_id = _experiment_id(mlflow, experiment, root)
        context = mlflow.start_run(
            experiment_id=experiment_id, run_name=stage, nested=bool(parent), parent_run_id=parent or None
        )
    with context as run:
        mlflow.set_tags({"stage": stage, "git_commit": git_commit(root)})
        if os.environ.get("DVC_EXP_NAME"):  # run by `dvc exp run -n <name>`: the sweep's points, retraining
            mlflow.set_tags({"dvc_experiment": os.environ["DVC_EXP_NAME"]})
        if resume_run_id:
            resumes = int(run.data.tags.get("resumes", "0")) + 1
            mlflow.set_tags({"resumes": str(resumes)})
        logger.info(
            "MLflow run %s (%s%s) in %s",
            run.info.run_id,
            stage,
            ", resumed" if resume_run_id else "",
            redact(mlflow.get_tracking_uri()),
        )
        os.environ[STAGE_RUN_ENV] = run.info.run_id
        try:
            yield Tracker(mlflow, run.info.run_id)
        finally:
            os.environ.pop(STAGE_RUN_ENV, None)


def run_status(run_id: str, root: Path | None = None) -> str | None:
    """RUNNING, FINISHED, FAILED, KILLED, or None when the store has no such run."""
    mlflow = _mlflow(root)
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def mark_killed(run_id: str, root: Path | None = None) -> None:
    """End a run whose process died without ending it (it would show RUNNING in the UI forever)."""
    _mlflow(root).MlflowClient().set_terminated(run_id, status="KILLED")


@contextmanager
def pipeline_run(
    experiment: str, name: str, params: dict[str, Any], root: Path | None = None, kind: str = "pipeline"
) -> Iterator[str]:
    """The parent run of one pipeline execution; yields its id (for ALIGNMENT_PARENT_RUN_ID)."""
    mlflow = _mlflow(root)
    with mlflow.start_run(experiment_id=_experiment_id(mlflow, experiment, root), run_name=name) as run:
        mlflow.set_tags({"kind": kind, "git_commit": git_commit(root)})
        Tracker(mlflow, run.info.run_id).params(params)
        yield run.info.run_id


class RegistryError(RuntimeError):
    """The model registry answered something other than "no such model or alias", or what it holds
    cannot be trusted (a version's artifact path outside its download, an alias moved under us)."""


def _inside(base: Path, relative: str) -> Path:
    """`base / relative`, refused when `relative` is absolute, climbs with `..`, or (through a link) lands
    outside `base`: an MLmodel file is data from the registry, not a licence to name any folder."""
    parts = Path(relative).parts
    if not relative or Path(relative).is_absolute() or ".." in parts:
        raise RegistryError(f"artifact path {relative!r}: absolute or `..` paths are refused")
    path = (base / relative).resolve()
    if not path.is_relative_to(base.resolve()):
        raise RegistryError(f"artifact path {relative!r} leads outside {base}")
    return path


def load_registered_model(
    name: str, version: str | None = None, alias: str | None = None, dst: Path | None = None
) -> Path:
    """Download a registered model (latest version unless `version` or `alias` given) to a local folder
    (`dst`, which the caller made and deletes; default: a new temporary folder) and return its HF folder.
    A LoRA adapter comes back alone; `load_causal_lm` on it finds a relative base from the working
    directory (the project root) or, once copied into the project, from the folder's own place.
    RegistryError when the version's MLmodel names a folder outside the download."""
    mlflow = _mlflow()
    if alias:
        uri = f"models:/{name}@{alias}"
    else:
        if version is None:
            client = mlflow.MlflowClient()
            version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        uri = f"models:/{name}/{version}"
    target = Path(tempfile.mkdtemp(prefix=f"{name}-")) if dst is None else Path(dst)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
    folder = _inside(local, str(flavor["artifacts"][HF_ARTIFACT]["path"]))
    if not folder.is_dir():
        raise RegistryError(f"{uri}: its artifact {HF_ARTIFACT} is not a folder of the download")
    return folder


def _not_found(error: Exception) -> bool:
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def alias_version(name: str, alias: str, root: Path | None = None) -> dict[str, Any] | None:
    """The registered version `alias` points at ({"version", "tags", "run_id"}), or None when the model
    does not exist yet or has no such alias. Fails closed: any other registry error (no server, no
    permission, a bad answer) raises RegistryError, so that a run never takes "could not ask" for "no
    champion" and promotes whatever it made."""
    mlflow = _mlflow(root)
    try:
        client = mlflow.MlflowClient()  # a store that cannot be opened fails here already
        model = client.get_registered_model(name)
    except Exception as error:
        if _not_found(error):
            return None
        raise RegistryError(
            f"reading {name}@{alias} from the registry failed: {redact(str(error))}"
        ) from error
    number = (model.aliases or {}).get(alias)
    if number is None:
        return None
    try:
        version = client.get_model_version(name, str(number))
    except Exception as error:  # the alias names a version the registry cannot give: not "no champion"
        raise RegistryError(
            f"reading {name} version {number} (@{alias}) failed: {redact(str(error))}"
        ) from error
    return {"version": str(version.version), "tags": dict(version.tags), "run_id": version.run_id}


def promote(
    run_id: str,
    model_dir: Path,
    name: str,
    alias: str,
    tags: dict[str, str],
    root: Path | None = None,
    expected: str | None = None,
) -> str:
    """Register `model_dir` as a new version of `name` (logged to the active run `run_id`), tag it and
    point `alias` at it, if `alias` still points where the caller compared against (`expected`: a version,
    or None for "no alias yet"): it is read again right before it moves, and RegistryError ends the run
    if it changed meanwhile. If anything fails, the new version is deleted again: the registry ends as it
    was, or with the alias on the new version, never half-way."""
    mlflow = _mlflow(root)
    client = mlflow.MlflowClient()
    version = Tracker(mlflow, run_id).register_model(model_dir, name)
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value))
        now = alias_version(name, alias, root)
        if (None if now is None else now["version"]) != expected:
            raise RegistryError(
                f"{name}@{alias} moved during the run (compared against "
                f"{expected or 'no champion'}, now {now['version'] if now else 'none'}): not promoted"
            )
        client.set_registered_model_alias(name, alias, version)
    except Exception:
        client.delete_model_version(name, version)
        raise
    return version


def set_run_tags(run_id: str, tags: dict[str, str], root: Path | None = None) -> None:
    client = _mlflow(root).MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


@contextmanager
def child_run(
    parent_run_id: str, name: str, tags: dict[str, str], params: dict[str, Any], root: Path | None = None
) -> Iterator[str]:
    """A run nested under `parent_run_id`, opened through the client (the flow's own active run stays
    the parent): FINISHED when the block ends, FAILED when it raises. Yields its id."""
    client = _mlflow(root).MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={"mlflow.parentRunId": parent_run_id, "git_commit": git_commit(root), **tags},
    )
    run_id = run.info.run_id
    for key, value in loggable(params).items():
        client.log_param(run_id, key, value)
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def log_metrics(run_id: str, metrics: dict[str, float], root: Path | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    client = _mlflow(root).MlflowClient()
    for start in range(0, len(batch), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=batch[start : start + 1000])


def log_report(
    run_id: str, metrics: dict[str, float], figures: dict, artifacts: list[Path], root: Path | None = None
) -> None:
    """A flow's report on its (open or finished) run: summary metrics, figures and files."""
    client = _mlflow(root).MlflowClient()
    log_metrics(run_id, {k: v for k, v in metrics.items() if v == v}, root)  # NaN-free
    for name, figure in figures.items():
        client.log_figure(run_id, figure, name)
    for path in artifacts:
        if Path(path).exists():
            client.log_artifact(run_id, str(path), artifact_path="report")


def end_stale_runs(experiment: str, kinds: tuple[str, ...], root: Path | None = None) -> int:
    """Mark KILLED the RUNNING runs tagged with one of `kinds` (left by a killed flow: the caller holds
    the lock that any live one would hold). Returns how many."""
    mlflow = _mlflow(root)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return 0
    client = mlflow.MlflowClient()
    stale = [
        run
        for kind in kinds
        for run in client.search_runs(
            [found.experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.kind = '{kind}'"
        )
    ]
    for run in stale:
        client.set_terminated(run.info.run_id, status="KILLED")
        logger.info(
            "marked the %s run %s of a killed flow KILLED", run.data.tags.get("kind"), run.info.run_id
        )
    return len(stale)
