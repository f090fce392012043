"""`ray job submit` against a real local head: the train entry point runs on the cluster and writes its run.

The head is started by this test (`ray start --head --block`, bound to loopback) and stopped through its own
process handle: SIGTERM makes that `ray start` process stop exactly the Ray processes it started. (`ray stop`
would stop every Ray instance of this user on the machine, including other tests' clusters.)
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from facediff.train.progress import read_metrics

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"  # the environment's own Ray CLI (and python, below)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _env() -> dict:
    # Never the session's cluster: no inherited RAY_ADDRESS; every command names this head's address.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # a token exists once any ray.init ran here (~/.ray/auth_token): be explicit
    return env


@pytest.mark.timeout(1200)
def test_train_job_submitted_to_local_head(synthetic_shards, tmp_path):
    env = _env()
    head, temp, log, address = None, None, None, ""
    try:
        # On a loaded machine the head's raylet can give up waiting for its agents' ports and exit at start:
        # start again (fresh ports and folder) a few times; the head that answers is the one this test uses.
        for _ in range(3):
            head, temp, log, address = _start_head(env, tmp_path)
            if _wait_for_job_api(head, address, env, tmp_path / "head.log"):
                break
            _stop_head(head, temp, log)
            head = None
        assert head is not None, (tmp_path / "head.log").read_text()[-3000:]
        runs, job = tmp_path / "runs", f"facediff-test-{uuid.uuid4().hex[:8]}"
        submit = [
            "job", "submit", "--address", address, "--working-dir", str(REPO), "--submission-id", job, "--no-wait",
            # the job runs in an uploaded copy of the working dir: name the environment's python by absolute path
            "--", sys.executable, "ray_jobs/train.py", "configs/experiments/tiny_unet.yaml",
            f"data.path={synthetic_shards}", f"trainer.storage_path={runs}", "trainer.run_name=job",
            "trainer.batch_size=4", "trainer.total_kimg=0.024", "trainer.checkpoint_every_kimg=0.024",
            "trainer.log_every_steps=1",
        ]
        # A fresh head answers before its job agent is up ("No available agent ... try again later") and may
        # drop the first package upload: submit again, within a bound.
        give_up = time.monotonic() + 180
        while True:
            submitted = _ray(submit, env)
            output = submitted.stdout + submitted.stderr
            if submitted.returncode == 0 or "already exists" in output or time.monotonic() > give_up:
                break
            time.sleep(4)
        assert _ray(["job", "status", job, "--address", address], env).returncode == 0, (
            submitted.stdout + submitted.stderr)[-4000:]
        status, give_up = "", time.monotonic() + 600  # a bound, so a stuck job fails with its logs below
        while time.monotonic() < give_up:
            status = _ray(["job", "status", job, "--address", address], env, timeout=60).stdout
            if re.search(r"\b(succeeded|failed|stopped)\b", status.lower()):  # a final state
                break
            time.sleep(2)
        logs = _ray(["job", "logs", job, "--address", address], env, timeout=60).stdout
        assert "succeeded" in status.lower() and "failed" not in status.lower(), status + logs[-4000:]
        assert "run folder:" in logs  # the CLI's own last line, printed by the job's driver

        run = runs / "job"
        assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]  # 24 images / (2 workers x 4)
        assert (run / "checkpoint_000000003" / "ema.safetensors").is_file()
        assert (run / "export" / "model_index.json").is_file()
    finally:
        if head is not None:
            _stop_head(head, temp, log)


def _start_head(env: dict, tmp_path: Path):
    dashboard = _free_port()
    temp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths live under it
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={_free_port()}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         # Fixed default ports (the agent's 52365 above all) are already held by the test session's own Ray:
         # a head whose job agent cannot bind answers "No available agent to submit job" forever.
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
         "--num-cpus=4", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    return head, temp, log, f"http://127.0.0.1:{dashboard}"


def _wait_for_job_api(head: subprocess.Popen, address: str, env: dict, log_path: Path) -> bool:
    """The head is up once `ray start` says so (its raylet registered) and the job API answers."""
    for _ in range(90):  # bounded wait (not a timing check)
        if head.poll() is not None:
            return False
        if ("Ray runtime started" in log_path.read_text()
                and _ray(["job", "list", "--address", address], env, timeout=60).returncode == 0):
            return True
        time.sleep(2)
    return False


def _stop_head(head: subprocess.Popen, temp: str, log) -> None:
    head.terminate()  # the blocking `ray start` stops the processes of the head it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()  # its processes share its fate (the kernel's parent-death signal)
        head.wait()
    log.close()
    shutil.rmtree(temp, ignore_errors=True)
