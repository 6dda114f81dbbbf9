"""Running a stage as N processes (torchrun, gloo on CPU) from a test, and comparing what two runs made.

`launch(project, stages, nproc)` runs the stages one after another (`python -m alignment <stage>` each)
in one `torchrun --standalone --nproc_per_node N` launch, in `project` (a folder holding params.yaml and
the upstream outputs), one thread per process so that one and two processes run the same kernels.
Every process but the main one records, through an audit hook (sitecustomize below), each file it opens
for writing under the project's outputs/, metrics/ and plots/ in `writes_by_other_ranks.txt`: the proof
that only the main process writes a stage's results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from ruamel.yaml import YAML
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
WATCHED = ("outputs", "metrics", "plots")
WRITES_LOG = "writes_by_other_ranks.txt"

_SITECUSTOMIZE = textwrap.dedent(
    f"""
    import os, signal, sys

    _root = os.getcwd()
    _watched = tuple(os.path.join(_root, name) + os.sep for name in {WATCHED!r})
    _rank = os.environ.get("RANK", "0")
    _kill_at = os.environ.get("KILL_WHEN_OPENING")

    def _kill_launch():
        launcher = os.getppid()  # torchrun starts each process in a session of its own: find them all
        siblings = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{{pid}}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == launcher and int(pid) != os.getpid():
                siblings.append(int(pid))
        # the launcher first: one that saw a process die before its own SIGKILL came would exit with 1
        os.kill(launcher, signal.SIGKILL)
        for pid in siblings:
            os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def _hook(event, args):
        if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if _kill_at and _kill_at in path:  # a lost machine: the launcher and every process, at once
            _kill_launch()
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if _rank != "0" and writing and path.startswith(_watched):
            with open(os.path.join(_root, {WRITES_LOG!r}), "a") as log:
                log.write(_rank + " " + path + "\\n")

    if _rank != "0" or _kill_at:
        sys.addaudithook(_hook)
    """
)

_CHAIN = textwrap.dedent(
    """
    import sys

    from alignment.__main__ import main

    # stages one after another in these processes: `python -m alignment <stage> <flags>` for each
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    for stage in (a for a in sys.argv[1:] if not a.startswith("--")):
        name, _, iteration = stage.partition("@")
        if main([name, *flags, *(["--iteration", iteration] if iteration else [])]) != 0:
            sys.exit(1)
    """
)


def launch(
    project: Path,
    stages: list[str],
    nproc: int,
    tracking: bool = False,
    kill_when_opening: str | None = None,
    check: bool = True,
    timeout: int = 900,
    sharding: str | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m alignment <stage>` for each of `stages` in turn (`rest_iter@1` for an item of a
    foreach stage) as `nproc` processes in `project`, one launch for all; with `check`, asserts it
    succeeded. `kill_when_opening`: SIGKILL the launch (its process group) as soon as any process opens
    a path containing this string. `sharding`: "fsdp2" shards the models (the launch section's `sharding`)."""
    hooks = project / ".mp_hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    (hooks / "chain.py").write_text(_CHAIN)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    # the project's own MLflow store and device: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so an
    # earlier in-process test may have left another store in this process's environment
    for key in (
        "KILL_WHEN_OPENING",
        "MLFLOW_TRACKING_URI",
        "ALIGNMENT_PARENT_RUN_ID",
        "ALIGNMENT_DEVICE",
        "ALIGNMENT_SHARDING",
    ):
        env.pop(key, None)
    if sharding:
        env["ALIGNMENT_SHARDING"] = sharding
    if kill_when_opening:
        env["KILL_WHEN_OPENING"] = kill_when_opening
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), str(hooks / "chain.py")]
    command += [*stages, *([] if tracking else ["--no-tracking"])]
    done = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )
    assert not check or done.returncode == 0, (
        f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    )
    return done


def other_ranks_writes(project: Path) -> list[str]:
    log = project / WRITES_LOG
    return log.read_text().splitlines() if log.exists() else []


def fork(source: Path, dest: Path, params: dict) -> Path:
    """A copy of a project folder (outputs, data link, ...) with its own params.yaml."""
    shutil.copytree(source, dest, symlinks=True)
    with open(dest / "params.yaml", "w", encoding="utf-8") as f:
        YAML().dump(params, f)
    return dest


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved model's tensors: the full model, or a LoRA adapter's."""
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (folder / name).exists():
            return load_file(folder / name)
    raise FileNotFoundError(f"no safetensors in {folder}")


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all parameters as one vector."""
    assert a.keys() == b.keys()
    difference = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    norm = sum(float(a[k].double().pow(2).sum()) for k in a) ** 0.5
    return difference / norm


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
