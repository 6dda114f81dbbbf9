"""The served deployment on a real local Prefect server: a run triggered through the API completes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import write_params
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from ruamel.yaml import YAML

pytestmark = pytest.mark.slow
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, log: Path) -> T:
    """Poll `probe` until it returns something truthy; on timeout fail with the process log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := probe():
                return result
        except Exception:  # not up yet
            pass
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}; log:\n{log.read_text()[-4000:]}")


def start(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    # own process group: stopping it also stops the flow-run processes it spawned
    with open(log, "w") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real `prefect server start` on a free loopback port, with its own home and database."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    log = tmp_path / "server.log"
    process = start(
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        tmp_path,
        env,
        log,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(
            lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 90, "the server", log
        )
        yield url, env | {"PREFECT_API_URL": url}
    finally:
        stop(process)


def test_served_deployment_runs_from_the_api(project, micro_params, server, tmp_path):
    url, env = server
    cron, timezone = "0 3 1 1 *", "Europe/Amsterdam"  # 03:00 on 1 January: never fires during the test
    micro_params["pipeline"] |= {"deployment": "nightly", "schedule": {"cron": cron, "timezone": timezone}}
    write_params(project / "params.yaml", micro_params)

    log = tmp_path / "serve.log"
    serve = start([sys.executable, "-m", "flows.serve"], project, env, log)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            deployment = wait_for(
                lambda: client.read_deployment_by_name("alignment-pipeline/nightly"),
                90,
                "the deployment",
                log,
            )
            [schedule] = deployment.schedules
            assert (schedule.schedule.cron, schedule.schedule.timezone) == (cron, timezone)

            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"stages": ["prepare"], "overrides": {"prepare.seed": 7}}
            )
            state = wait_for(
                lambda: (s := client.read_flow_run(run.id).state) and s.is_final() and s,
                180,
                "the flow run",
                log,
            )
        assert state.is_completed(), f"{state}\n{log.read_text()[-4000:]}"
        assert YAML(typ="safe").load(project / "params.yaml")["prepare"]["seed"] == 7
        assert (project / "metrics" / "prepare.json").is_file()
    finally:
        stop(serve)


def test_served_retraining_runs_from_the_api(upstream_project, micro_params, server, tmp_path):
    """Both deployments are served with their crons; a retraining run triggered through the API (not
    by the clock) runs ReST as a DVC experiment and crowns the first champion in the project's registry."""
    from alignment import tracking

    url, env = server
    project, cron = upstream_project, "0 3 * * 1"  # Mondays 03:00, as in params.yaml
    micro_params["retrain"] |= {"deployment": "weekly", "schedule": {"cron": cron, "timezone": "UTC"}}
    write_params(
        project / "params.yaml", micro_params
    )  # `retrain` is no stage's DVC param: nothing upstream re-runs

    log = tmp_path / "serve.log"
    serve = start([sys.executable, "-m", "flows.serve"], project, env, log)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            deployment = wait_for(
                lambda: client.read_deployment_by_name("rest-retraining/weekly"), 90, "the deployment", log
            )
            [schedule] = deployment.schedules
            assert schedule.schedule.cron == cron and schedule.active
            # served beside it, and on demand (no schedule): serve() registers them one after another
            for name in ("alignment-pipeline/alignment-pipeline", "alignment-sweep/sweep"):
                assert wait_for(lambda n=name: client.read_deployment_by_name(n), 30, name, log)

            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"overrides": {"rest.improve.train.learning_rate": 0.002}}
            )
            state = wait_for(
                lambda: (s := client.read_flow_run(run.id).state) and s.is_final() and s,
                420,
                "the retraining run",
                log,
            )
        assert state.is_completed(), f"{state}\n{log.read_text()[-4000:]}"
        champion = tracking.alias_version("alignment-rest", "champion", project)
        assert (
            champion
            and champion["version"] == "1"
            and champion["tags"]["dvc_experiment"].startswith("retrain-")
        )
        assert (
            YAML(typ="safe").load(project / "params.yaml")["rest"]["improve"]["train"]["learning_rate"]
            == 1.0e-3
        )
    finally:
        stop(serve)
