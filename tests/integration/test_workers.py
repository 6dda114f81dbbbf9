"""Several machines on loopback: a Prefect server, an MLflow server, a directory DVC remote and two process
workers ("cpu" and "gpu" pools), each in its own clone of the repository; the pipeline flow in a third.

Nothing but the three services and git is shared: a worker sees only its own checkout, files move through
the DVC remote. One module-scoped set of services serves both tests."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.dvc_yaml import dvc_yaml
from tests.conftest import BIN, MICRO_PARAMS, copy_project, git

pytestmark = pytest.mark.slow

STAGES = ["prepare", "tokenizer", "sft", "gold", "pairs", "rm", "dpo", "evaluate"]
CPU_STAGES = {"prepare", "tokenizer", "gold", "pairs", "evaluate"}  # the rest on the default pool, "gpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url}: no answer in {seconds} s:\n{log.read_text()[-3000:]}")


def start(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A background process in its own session (a kill reaches its children), output to `log`."""
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def micro_project(dest: Path, pools: bool) -> Path:
    """A committed copy with micro params and a dvc.yaml of `STAGES` alone (evaluate reads sft and dpo),
    generated as a profile's is."""
    project = copy_project(dest, micro_params(pools))
    (project / "dvc.lock").unlink()  # the repository's lock is of the default params
    (project / "dvc.yaml").write_text(dvc_yaml(stages=STAGES))
    git(project, "commit", "-qam", "the stages of this test")
    return project


def micro_params(pools: bool) -> dict:
    params = copy.deepcopy(MICRO_PARAMS)
    params["pipeline"]["stages"] = STAGES
    params["evaluate"]["models"] = {"sft": "outputs/sft", "dpo": "outputs/dpo"}
    params["evaluate"]["best_of_n"] = {"policy": "sft", "n": [2]}
    if pools:
        params["workers"] = {
            "pools": {stage: "cpu" for stage in CPU_STAGES},
            "default_pool": "gpu",
            "max_parallel": 2,
            "poll_seconds": 1,
        }
    return params


class Cluster:
    """The services, the git origin every clone pulls from, and the workers."""

    def __init__(self, base: Path):
        self.base = base
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
            PREFECT_HOME=str(base / "prefect-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}",
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        self.remote = base / "dvc-remote"
        self.remote.mkdir()
        self.processes: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}

    def up(self) -> None:
        prefect_port = self.env["PREFECT_API_URL"].split(":")[2].split("/")[0]
        mlflow_port = self.env["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1]
        servers = [
            (
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", prefect_port],
                self.env["PREFECT_API_URL"] + "/health",
            ),
            (
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    mlflow_port,
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.base / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(self.base / "mlflow-artifacts"),
                ],
                self.env["MLFLOW_TRACKING_URI"] + "/health",
            ),
        ]
        for command, url in servers:
            log = self.base / f"{Path(command[0]).name}.log"
            process = start(command, self.base, self.env, log)
            self.processes.append(process)
            wait_http(url, process, log)

    def origin(self) -> Path:
        """A bare repository holding the project with `params`, as a team's git server would."""
        source = micro_project(self.base / "source", pools=True)
        bare = self.base / "origin.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(source), str(bare)], check=True)
        return bare

    def clone(self, name: str) -> Path:
        path = self.base / name
        subprocess.run(["git", "clone", "-q", str(self.base / "origin.git"), str(path)], check=True)
        for key, value in (("user.name", "t"), ("user.email", "t@t")):
            git(path, "config", key, value)
        subprocess.run(
            ["dvc", "remote", "add", "--local", "-d", "shared", str(self.remote)],
            cwd=path,
            env=self.env,
            check=True,
            capture_output=True,
        )
        return path

    def worker(self, pool: str, checkout: Path, **env: str) -> None:
        command = [sys.executable, "-m", "flows.workers", "start", "--pool", pool, "--name", checkout.name]
        log = self.base / f"worker-{checkout.name}.log"
        self.workers[pool] = start(command, checkout, {**self.env, **env}, log)

    def run(self, args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def down(self) -> None:
        for process in [*self.workers.values(), *self.processes]:
            stop(process)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(base)
    cluster.up()
    cluster.origin()
    cluster.parent = cluster.clone("parent")
    done = cluster.run([sys.executable, "-m", "flows.workers", "deploy"], cluster.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    cluster.worker("cpu", cluster.clone("cpu-machine"))
    # the gpu workers keep their checkpoints on storage they share (the cpu worker in its clone)
    cluster.worker(
        "gpu", cluster.clone("gpu-machine"), ALIGNMENT_CHECKPOINTS_DIR=str(base / "shared-checkpoints")
    )
    yield cluster
    cluster.down()


def flow_runs(cluster) -> list:
    """(name, work pool, state, parameters) of every child stage run the Prefect server recorded."""
    script = (
        "import json\nfrom prefect import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    runs = c.read_flow_runs()\n"
        "    print(json.dumps([dict(name=r.name, pool=r.work_pool_name, state=r.state.type.value,"
        " stage=r.parameters.get('stage'), parent=str(r.parent_task_run_id)) for r in runs]))\n"
    )
    done = cluster.run([sys.executable, "-c", script], cluster.base)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_stages_run_on_their_pools_and_match_one_workspace(cluster, tmp_path):
    # the same stages in one folder, on the local engine, with the default sqlite store: the reference
    single = micro_project(tmp_path / "single", pools=False)
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING"))}
    t0 = time.monotonic()
    local = subprocess.run(
        [sys.executable, "-m", "flows.pipeline"],
        cwd=single,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    single_seconds = time.monotonic() - t0
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]

    t0 = time.monotonic()
    done = cluster.run([sys.executable, "-m", "flows.pipeline"], cluster.parent)
    pools_seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    print(f"single workspace {single_seconds:.0f} s, two workers {pools_seconds:.0f} s")

    # every stage ran once, on the pool params map it to, in the clone of that pool's worker
    runs = [r for r in flow_runs(cluster) if r["stage"]]
    assert sorted(r["stage"] for r in runs) == sorted(STAGES)
    for r in runs:
        assert r["state"] == "COMPLETED"
        assert r["pool"] == ("cpu" if r["stage"] in CPU_STAGES else "gpu"), r
    metrics_single = json.loads((single / "metrics" / "evaluate.json").read_text())
    metrics_pools = json.loads((cluster.parent / "metrics" / "evaluate.json").read_text())
    assert metrics_pools == metrics_single
    board = "outputs/evaluate/leaderboard.json"
    assert json.loads((cluster.parent / board).read_text()) == json.loads((single / board).read_text())
    # each worker trained only its own stages (checkpoints never travel) and pulled only what it read
    cpu, gpu = cluster.base / "cpu-machine", cluster.base / "gpu-machine"
    assert (gpu / "checkpoints" / "dpo").is_dir() and not (cpu / "checkpoints" / "dpo").exists()
    assert (cpu / "checkpoints" / "evaluate").is_dir() and not (gpu / "checkpoints" / "evaluate").exists()
    assert not (gpu / "outputs" / "evaluate").exists()

    # MLflow: one pipeline run with a nested run per stage, and the registered models, on the server
    import mlflow

    mlflow.set_tracking_uri(cluster.env["MLFLOW_TRACKING_URI"])
    all_runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in all_runs if r.data.tags.get("kind") == "pipeline"]
    stages = [r for r in all_runs if "stage" in r.data.tags]
    assert len(parents) == 1
    assert sorted(r.data.tags["stage"] for r in stages) == sorted(STAGES)
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {parents[0].info.run_id}
    models = {m.name for m in mlflow.MlflowClient().search_registered_models()}
    assert {"alignment-sft", "alignment-rm", "alignment-dpo"} <= models

    # the remote holds every out: the parent's dvc.lock is complete and `dvc status --cloud` is clean
    status = cluster.run(["dvc", "status", "--cloud"], cluster.parent)
    assert status.returncode == 0 and "in sync" in status.stdout, status.stdout + status.stderr


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started: the machine is gone."""
    import psutil

    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        process.kill()


def test_a_killed_worker_fails_the_flow_and_a_retrigger_completes(cluster):
    # a DPO long enough (1,500 steps, a checkpoint every 100) to lose its worker in the middle
    longer = ["--set", "dpo.train.max_steps=1500", "--set", "dpo.train.epochs=2000"]
    longer += ["--set", "dpo.train.checkpoint_every=100"]
    flow = [sys.executable, "-m", "flows.pipeline", *longer]
    log = cluster.base / "killed-flow.log"
    timeout = ["--set", "workers.stage_timeout_minutes=5"]  # a backstop: the heartbeats should tell first
    parent = start([*flow, "--stages", "dpo", *timeout], cluster.parent, cluster.env, log)
    latest = cluster.base / "shared-checkpoints" / "dpo" / "latest.json"
    started = latest.stat().st_mtime if latest.exists() else 0.0
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.stat().st_mtime > started and "0200" in latest.read_text()):
        assert parent.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    kill_tree(cluster.workers["gpu"].pid)  # the machine is gone, with its clone

    # the flow does not complete: its heartbeats stop, the server's automation (made by `deploy`) marks
    # the stage run Crashed after 3 missed heartbeats (30 s each), and the flow fails with that message
    killed_at = time.monotonic()
    assert parent.wait(400) != 0
    print(f"the flow failed {time.monotonic() - killed_at:.0f} s after the kill")
    text = log.read_text()
    assert "dpo (Crashed): no heartbeat for 90 s: its worker was lost" in text, text[-3000:]
    killed = [r for r in flow_runs(cluster) if r["stage"] == "dpo" and r["state"] != "COMPLETED"]
    assert [r["state"] for r in killed] == ["CRASHED"], killed

    # a new gpu machine (a fresh clone) on the same shared checkpoint storage; re-triggered, rm is found
    # in the remote at its lock and not re-run, and DPO resumes from the lost worker's checkpoint
    fresh = cluster.clone("gpu-machine-2")
    cluster.worker("gpu", fresh, ALIGNMENT_CHECKPOINTS_DIR=str(cluster.base / "shared-checkpoints"))
    done = cluster.run([*flow, "--stages", "rm,dpo"], cluster.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "rm           up to date" in done.stdout and "dpo          ran" in done.stdout, done.stdout
    assert (fresh / "outputs" / "rm").is_dir()  # pulled, not trained: no checkpoint of its own
    worker_log = (cluster.base / "worker-gpu-machine-2.log").read_text()
    assert "resumed from" in worker_log and "(step 200)" in worker_log, worker_log[-3000:]
