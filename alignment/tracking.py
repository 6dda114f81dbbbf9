"""Every MLflow call in the project lives here.

Default store: `sqlite:///mlflow.db` with artifacts in `mlartifacts/`, both in the project folder
(the folder the CLI runs in); any `MLFLOW_TRACKING_URI` wins. A pipeline execution is one run; each
stage it causes is a nested run under it. The Prefect flow opens the pipeline run and hands its id to
the DVC-launched stage processes through `ALIGNMENT_PARENT_RUN_ID`; a stage run on its own (a test,
the CLI, a bare `dvc repro`) is a top-level run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PARENT_RUN_ENV = "ALIGNMENT_PARENT_RUN_ID"
STAGE_RUN_ENV = "ALIGNMENT_STAGE_RUN_ID"  # the open stage run, which checkpoints record (mlflow_stage_run)
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

    mine = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri(root))
    # MLflow also writes the URI into MLFLOW_TRACKING_URI: left there, it would pin every later
    # tracking_uri(other_root) of this process, and its children, to this root's store
    if mine is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return mlflow


def _experiment_id(mlflow, name: str, root: Path | None) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts, root = None, Path.cwd() if root is None else root
    # keep artifacts beside the default store (MLFLOW_TRACKING_URI cannot tell: set_tracking_uri sets it)
    if mlflow.get_tracking_uri() == f"sqlite:///{(root / 'mlflow.db').resolve()}":
        artifacts = (root / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=artifacts)


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _pip_requirements(*names: str) -> list[str]:
    """Pinned as installed, less a local build tag: `torch==2.13.0+cu128` installs only from that index,
    `torch==2.13.0` from PyPI (or any index with that build). Read from the installed packages rather than
    by MLflow's inference, which is slow and needs the network."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("mlflow", *names)]


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

    def register_model(
        self, model_dir: Path, name: str, kind: str = "causal_lm", scoring: dict | None = None
    ) -> str:
        """Register the saved model folder `model_dir` as a new version of `name`; returns the version.

        A policy (`causal_lm`) is an MLflow transformers model, task `llm/v1/chat`: it loads with
        `mlflow.transformers.load_model` or `mlflow.pyfunc.load_model` where this project is not
        installed, and `mlflow models serve` serves it as a chat model (docs/models.md). A LoRA adapter is
        logged as an adapter on its base: a hub id as such, a local base (the SFT model) as the MLflow
        model of its own weights, named by its registered version's URI. A reward model (`reward`) is the
        pyfunc of alignment/reward_pyfunc.py, which scores (prompt, response) rows (`scoring`: its
        `max_length` and `batch_size`, the stage's own; default 256 and 32). Weights already logged
        (the same files, found by their content hash) are registered again, not copied again.
        """
        model_uri, base = log_once(self._mlflow, Path(model_dir), kind, name, scoring)
        version = str(self._mlflow.register_model(model_uri, name).version)
        self.tags({"registered_model": f"{name}/{version}"})  # the run says which version it made
        if base:
            self.tags({"lora_base_model": base})
        return version


CONTENT_TAG = "content_hash"  # on a logged model: its kind and the hash of its files (see log_once)
BASE_TAG = "base_model"  # on a logged adapter: its base (a hub id or a registered version's URI)
REWARD_PYFUNC = Path(__file__).with_name("reward_pyfunc.py")
# what a saved folder holds of the model itself (not its samples, reports or the adapter beside a merge)
_MODEL_FILES = re.compile(
    r".*\.safetensors|(adapter_|generation_)?config\.json|tokenizer.*|special_tokens_map\.json"
    r"|chat_template\.jinja|vocab\.json|merges\.txt|.*\.model|base_model\.json"
)


def content_hash(folder: Path, kind: str) -> str:
    """What identifies a logged model: its kind and the model files of `folder` (an adapter's config
    names its base, so the same adapter on another base is another model)."""
    digest = hashlib.sha256(kind.encode())
    for file in sorted(f for f in Path(folder).iterdir() if f.is_file() and _MODEL_FILES.fullmatch(f.name)):
        digest.update(file.name.encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def log_once(
    mlflow, folder: Path, kind: str, name: str, scoring: dict | None = None
) -> tuple[str, str | None]:
    """The URI of the MLflow model holding `folder`'s weights as `kind`, and an adapter's base: an
    already logged one (any experiment, any stage) when the same files were logged before, else one
    logged now to the active run."""
    from alignment.models.loading import ADAPTER_CONFIG

    content = content_hash(folder, kind)
    experiments = [e.experiment_id for e in mlflow.MlflowClient().search_experiments()]
    for found in mlflow.search_logged_models(
        experiment_ids=experiments, filter_string=f"tags.{CONTENT_TAG} = '{content}'", output_format="list"
    ):
        if str(found.status) in ("READY", "LoggedModelStatus.READY"):
            logger.info("%s: the same weights as %s, registered again without a copy", folder, found.model_id)
            return found.model_uri, found.tags.get(BASE_TAG)
    tags = {CONTENT_TAG: content}
    if kind == "reward":
        return _log_reward_model(mlflow, folder, tags, scoring).model_uri, None
    if (folder / ADAPTER_CONFIG).is_file():
        return _log_adapter(mlflow, folder, name, tags)
    return _log_chat_model(mlflow, folder, name, tags).model_uri, None


def _log_chat_model(mlflow, folder: Path, name: str, tags: dict, model=None, requirements=(), **kwargs):
    from alignment import serving

    model = serving.causal_lm(folder) if model is None else model
    tokenizer, added = serving.chat_tokenizer(folder)
    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="llm/v1/chat",
        torch_dtype=model.dtype,  # loaded as saved, not in MLflow's default float32
        input_example=serving.CHAT_EXAMPLE,
        pip_requirements=_pip_requirements("torch", "transformers", "safetensors", *requirements),
        model_card=serving.model_card(name, added),
        metadata={serving.ADDED_TEMPLATE: added},
        tags=tags,
        **kwargs,
    )


def _log_adapter(mlflow, folder: Path, name: str, tags: dict) -> tuple[str, str]:
    """A LoRA adapter on its base. A local base is logged (or found) as a model of its own, and the
    adapter's MLflow model refers to that model's files; a hub base is MLflow's hub reference."""
    from alignment import serving
    from alignment.models.loading import ADAPTER_CONFIG, load_causal_lm, resolve_base

    base_path = resolve_base(folder)
    if (Path(base_path) / ADAPTER_CONFIG).is_file():  # an adapter on an adapter: MLflow has no chains
        logger.info("%s: an adapter on the adapter %s, logged merged", folder, base_path)
        info = _log_chat_model(mlflow, folder, name, tags, model=load_causal_lm(folder))
        return info.model_uri, None
    if not Path(base_path).is_dir():  # a hub id: MLflow records the base's commit, not its weights
        model = serving.adapter_on(folder, base_path, base_path)
        info = _log_chat_model(mlflow, folder, name, tags | {BASE_TAG: base_path}, model, ["peft"])
        return info.model_uri, base_path
    base_uri, _ = log_once(mlflow, Path(base_path), "causal_lm", f"{name} base")
    base_name = _registered_uri(mlflow, base_uri) or base_uri
    model = serving.adapter_on(folder, base_path, base_name)
    # on a local artifact store this is the store's own copy of the base (no download), which the
    # adapter's MLflow model loads from wherever it runs; elsewhere load_model(base_model_path=...)
    base_files = Path(mlflow.artifacts.download_artifacts(artifact_uri=base_uri)) / "model"
    with warnings.catch_warnings():  # peft looks for the base's config.json at the URI to check its vocab
        warnings.filterwarnings("ignore", message="Could not find a config file in models:/")
        info = _log_chat_model(
            mlflow,
            folder,
            name,
            tags | {BASE_TAG: base_name},
            model,
            ["peft"],
            base_model_path=str(base_files),
        )
    return info.model_uri, base_name


def _registered_uri(mlflow, model_uri: str) -> str | None:
    """`models:/<name>/<version>` of the first registered version of the logged model `model_uri`."""
    versions = mlflow.MlflowClient().search_model_versions(f"source_path = '{model_uri}'")
    first = min(versions, key=lambda v: v.creation_timestamp, default=None)
    return first and f"models:/{first.name}/{first.version}"


def _log_reward_model(mlflow, folder: Path, tags: dict, scoring: dict | None = None):
    from alignment import serving

    with tempfile.TemporaryDirectory() as merged:
        if (folder / "adapter_config.json").is_file():  # the pyfunc loads a plain model: merge the adapter
            from alignment.models.loading import save_pretrained
            from alignment.models.reward_model import load_reward_model

            save_pretrained(load_reward_model(folder), serving.load_tokenizer(folder), Path(merged))
            folder = Path(merged)
        import pandas as pd

        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(REWARD_PYFUNC),  # a model from code: the file travels with the model
            artifacts={"reward_model": str(folder)},
            model_config={"max_length": 256, "batch_size": 32} | (scoring or {}),
            input_example=pd.DataFrame(serving.REWARD_EXAMPLE),
            pip_requirements=_pip_requirements("torch", "transformers", "safetensors", "pandas"),
            tags=tags,
        )


@contextmanager
def mlflow_stage_run(
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


def load_registered_model(
    name: str, version: str | None = None, alias: str | None = None, dst: Path | None = None
) -> Path:
    """Download a registered model (latest version unless `version` or `alias` given) to a local folder
    (`dst`, which the caller made and deletes; default: a new temporary folder) and return the saved-model
    folder inside it that the project's loaders read (`load_causal_lm`, `load_reward_model`). An adapter
    comes back naming its base by a local path: the store's own copy of the base where the store is local,
    else a download of the base's registered version. RegistryError when what the version records names
    a folder outside its download (a forged version must not move or delete anything of the host's)."""
    from alignment import serving

    mlflow = _mlflow()
    if alias:
        uri = f"models:/{name}@{alias}"
    else:
        if version is None:
            client = mlflow.MlflowClient()
            version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        uri = f"models:/{name}/{version}"
    target = Path(tempfile.mkdtemp(prefix=f"{name}-")) if dst is None else Path(dst)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target / "mlflow")))
    model = mlflow.models.Model.load(str(local))
    base = None
    conf = model.flavors.get("transformers", {})
    if conf.get("peft_adaptor") and conf.get("local_base_model_path"):
        base = Path(conf["local_base_model_path"])
        if not base.is_dir():  # logged on another machine: its base's registered version, downloaded
            base_uri = conf["source_model_name"]  # the URI the adapter names its base by
            base = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=base_uri, dst_path=str(target / "base"))
            )
            base = base / "model"
    try:
        return serving.hf_folder(local, model.flavors, model.metadata, base)
    except serving.OutsideDownload as error:
        raise RegistryError(f"{uri}: {error}") from None


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
