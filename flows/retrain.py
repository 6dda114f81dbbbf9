"""Scheduled iterative retraining: ReST rounds from the current champion, as one DVC experiment.

    python -m flows.retrain [--set rest.train_prompts=256] [--retrain-rm]   # once, on the local engine
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve          # on the cron in params `retrain`

Each run, in numbered steps:
  1. Validates params with the overrides applied: a typo fails before any compute.
  2. Takes the retraining lock, a Prefect global concurrency limit of one slot (params `retrain.lock`):
     a second run started while one is going, on this machine or another, fails at once instead of
     overwriting its outputs or racing it to the registry alias (the served deployment also runs one
     at a time); and the workspace lock every flow takes (tasks/dvc.py), so that no pipeline or sweep
     in this folder edits params.yaml under the experiment. What each finished run made stays: its DVC
     experiment (`dvc exp show`, `dvc exp apply <name>`), its MLflow run and, when promoted, its
     registered version.
  3. Downloads the champion (the registry alias `retrain.alias` of `retrain.model_name`) into
     `retrain.champion_dir` (a folder inside the project that this flow made, or none yet), where ReST
     iteration 1 starts; without a champion it starts from `rest.iterations["1"]` (the SFT model). Only
     "no such model or alias" means no champion: any other registry error fails the run.
  4. `dvc exp run -n <name> -S ... [rm] rest`: the ReST stages (and, with `retrain_rm`, the reward
     model first; DVC re-runs it only when its data changed). The Grow step picks up every prompt file
     in `rest.incoming`. DVC records the run as an experiment (its params, metrics and outputs); every
     stage logs a nested MLflow run under this run's. Registering is left to step 5 (`rest.register_as`
     is off for the experiment). The params file is restored afterwards: the experiment's settings
     live in the experiment, and a later `dvc repro` re-runs ReST from the params as the user left them.
  5. The champion is iteration 0 of the run's held-out record (same prompts, seeds and judge as the
     new iterations): only when the best iteration beats it is `outputs/rest_best` registered as a
     new version and the alias moved, if the alias still points at the champion the run compared with
     (read again right before). A failure anywhere before leaves the registry untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from alignment import tracking
from alignment.config import ConfigError, RestConfig
from alignment.data.io import write_text_atomic
from alignment.paths import Paths
from alignment.tracking import PARENT_RUN_ENV
from alignment.training.rest_rules import beats_champion
from flows.config import RetrainConfig
from flows.overrides import for_logging, parse_overrides, project_paths, validated
from tasks.dvc import BIN, WorkspaceBusy, stream, workspace_lock

CHAMPION_MARK = ".alignment-champion"  # in a champion_dir this flow made: the only kind it deletes


class RetrainBusy(RuntimeError):
    """Another retraining run holds the project's lock."""


@contextmanager
def retraining_lock(name: str, wait_seconds: float = 5.0) -> Iterator[None]:
    """The one slot of the Prefect global concurrency limit `name` (made with one slot when missing):
    no two retraining runs overlap, on this machine or on any other that talks to the same server. A
    second run does not queue: after `wait_seconds` it raises RetrainBusy."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    with ExitStack() as held:
        try:
            held.enter_context(concurrency(name, occupy=1, timeout_seconds=wait_seconds, strict=True))
        except TimeoutError:
            raise RetrainBusy(
                f"another retraining run holds the Prefect concurrency limit {name!r}"
            ) from None
        yield


def champion_folder(root: Path, champion_dir: str) -> Path:
    """`retrain.champion_dir` inside the project (relative, no `..`, not the project itself), and either
    absent or a folder this flow made (it holds CHAMPION_MARK): the only folder the download replaces."""
    relative = Path(champion_dir)
    target = (root / relative).resolve()
    if relative.is_absolute() or ".." in relative.parts or not target.is_relative_to(root) or target == root:
        raise ConfigError(f"retrain.champion_dir {champion_dir!r}: a folder inside {root} expected")
    if target.exists() and not (target / CHAMPION_MARK).is_file():
        raise ConfigError(
            f"retrain.champion_dir {champion_dir!r}: {target} exists and was not made by the retraining "
            "flow; it is never deleted: choose another folder or remove it yourself"
        )
    return target


@task(task_run_name="champion {cfg.model_name}@{cfg.alias}", cache_policy=NO_CACHE)
def fetch_champion(cfg: RetrainConfig, root: str) -> dict[str, Any] | None:
    """Step 3: the champion's version, downloaded to `champion_dir`; None when there is none yet."""
    logger = get_run_logger()
    target = champion_folder(Path(root), cfg.champion_dir)
    champion = tracking.alias_version(cfg.model_name, cfg.alias, Path(root))
    if champion is None:
        logger.info("no %s@%s yet: ReST starts from rest.iterations['1']", cfg.model_name, cfg.alias)
        return None
    # by version, not by alias: the model compared against is the one downloaded, even if the alias moves
    with tempfile.TemporaryDirectory(prefix="champion-") as download:
        version = champion["version"]
        source = tracking.load_registered_model(cfg.model_name, version=version, dst=Path(download))
        if target.exists():
            shutil.rmtree(target)  # made by this flow before (champion_folder checked its mark)
        shutil.copytree(source, target)
        (target / CHAMPION_MARK).write_text(f"{cfg.model_name} version {champion['version']}\n")
    logger.info("champion: %s version %s -> %s", cfg.model_name, champion["version"], target)
    return champion


@task(task_run_name="dvc exp run {name}", cache_policy=NO_CACHE)
def run_experiment(
    name: str, targets: list[str], settings: dict[str, Any], root: str, parent_run_id: str
) -> None:
    """Step 4: one DVC experiment; its output in the run log, its tail in the error when it fails."""
    logger = get_run_logger()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PARENT_RUN_ENV: parent_run_id,
    }
    command = ["dvc", "exp", "run", "-n", name]
    for key, value in settings.items():
        command += ["-S", f"++{key}={json.dumps(value)}"]  # ++: set, whether or not params has the key
    command += ["--", *targets]
    logger.info("%s", " ".join(command))
    stream(command, Path(root), env, logger, f"dvc exp run {name}")


@flow(name="rest-retraining")
def retrain(
    overrides: dict[str, Any] | None = None,
    retrain_rm: bool | None = None,
    params_file: str = "params.yaml",
    root: str | None = None,
) -> dict[str, Any]:
    """ReST rounds from the champion as a DVC experiment; the champion moves only on improvement.

    Args:
        overrides: dotted params keys to values for this run's experiment, e.g.
            `{"rest.train_prompts": 256, "rest.improve.train.learning_rate": 0.0002}`.
        retrain_rm: re-run the reward model stage first (default: params `retrain.retrain_rm`).
        params_file: the params file, relative to `root`.
        root: the project folder (default: the working directory).
    Returns: the experiment name, the held-out record per iteration, and whether the champion moved.
    """
    # step 1. validate everything before any compute
    project, params_path = project_paths(root, params_file)
    overrides = dict(overrides or {})
    config = validated(params_path, overrides)
    cfg: RetrainConfig = config["retrain"]
    retrain_rm = cfg.retrain_rm if retrain_rm is None else retrain_rm
    champion_folder(project, cfg.champion_dir)

    # step 2. one run at a time, wherever it runs; one flow at a time in this folder
    with retraining_lock(cfg.lock), workspace_lock(project, "retraining"):
        return _retrain(project, params_path, overrides, config, retrain_rm)


def _retrain(project: Path, params_path: Path, overrides: dict, config: dict, retrain_rm: bool) -> dict:
    cfg: RetrainConfig = config["retrain"]
    rest: RestConfig = config["rest"]
    logger = get_run_logger()
    name = f"retrain-{time.strftime('%Y%m%d-%H%M%S')}-{flow_run.name or 'local'}"
    record = {"experiment": name, "retrain_rm": retrain_rm, **for_logging(overrides)}
    with tracking.pipeline_run(
        config["tracking"].experiment, name, record, project, kind="retrain"
    ) as parent:
        # step 3. start from the champion
        champion = fetch_champion(cfg, str(project))
        # the flow's own sections are read here; the stages' go to the experiment
        settings = {k: v for k, v in overrides.items() if k.split(".")[0] not in ("retrain", "pipeline")}
        settings["rest.register_as"] = None
        if champion is not None:
            settings["rest.iterations.1"] = cfg.champion_dir

        # step 4. the ReST stages as one DVC experiment
        targets = (["rm"] if retrain_rm else []) + ["rest"]
        params_text = params_path.read_text()
        try:
            run_experiment(name, targets, settings, str(project), parent)
        finally:  # the experiment keeps its params; the workspace goes back to the user's
            write_text_atomic(params_path, params_text)

        # step 5. promote only on improvement
        paths = Paths(project)
        selection = json.loads((paths.rest_best / "selection.json").read_text())
        held_out = rest.guard.held_out
        label = None if champion is None else f"version {champion['version']}"
        promoted, why = beats_champion(
            selection["history"], held_out, cfg.min_improvement, label, rest.guard.max_kl
        )
        best = next(r for r in selection["history"] if r["iteration"] == selection["best_iteration"])
        version = None
        if promoted:
            tags = {
                "dvc_experiment": name,
                "best_iteration": best["iteration"],
                held_out: best[held_out],
                "gold/reward": best["gold/reward"],
                "rm/reward": best["rm/reward"],
                "why": why,
            }
            expected = None if champion is None else champion["version"]
            version = tracking.promote(
                parent, paths.rest_best, cfg.model_name, cfg.alias, tags, project, expected=expected
            )
            logger.info("promoted %s version %s to @%s: %s", cfg.model_name, version, cfg.alias, why)
        else:
            logger.info("not promoted: %s", why)
        tracking.set_run_tags(
            parent,
            {
                "promoted": str(promoted),
                "promotion": why[:5000],
                "champion_version": version or (champion or {}).get("version", "none"),
            },
        )
    if selection["stopped"]:
        logger.warning("ReST stopped early: %s", selection["stopped"])
    return {
        "experiment": name,
        "promoted": promoted,
        "why": why,
        "version": version,
        "previous_champion": None if champion is None else champion["version"],
        "best_iteration": selection["best_iteration"],
        "stopped": selection["stopped"],
        "history": selection["history"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param for this run's experiment (value parsed as YAML); repeatable",
    )
    parser.add_argument(
        "--retrain-rm", action="store_true", default=None, help="re-run the reward model stage first"
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    overrides = parse_overrides(parser, args.set)
    try:
        result = retrain(overrides=overrides, retrain_rm=args.retrain_rm, params_file=args.params)
    except (ConfigError, RetrainBusy, WorkspaceBusy, tracking.RegistryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for r in result["history"]:
        print(
            f"  iteration {r['iteration']}: held-out gold reward {r['gold/reward']:.3f}, "
            f"gold win rate vs SFT {r['gold/win_rate_vs_sft']:.3f}, RM reward {r['rm/reward']:.3f}"
        )
    print(
        f"{result['experiment']}: best iteration {result['best_iteration']}; "
        + ("promoted to version " + result["version"] if result["promoted"] else "not promoted")
        + f": {result['why']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
