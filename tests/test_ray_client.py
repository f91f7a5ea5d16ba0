"""`--ray ray://HOST:PORT`: a real head started with `ray start --head` (token authentication on, as Ray 2.60
starts it), a `sdxl-nodes run` process connecting as a Ray client. The images must equal a local run's, and
a client that cannot connect gets a one-line explanation that names Ray's token authentication.

Slow (a Ray head and a client server start on two cores); CI runs it like every other test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BASE_WF = str(REPO / "workflows" / "sdxl_base.json")
SMALL = ["--set", "6.width=64", "--set", "6.height=64", "--set", "7.steps=2", "--sweep", "7.seed=1..3", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("rayhome")  # the head's token goes to $HOME/.ray/auth_token
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token"}  # as `ray start --head` of Ray 2.60
    gcs, client = free_port(), free_port()
    subprocess.run([ray_bin(), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
    subprocess.run([ray_bin(), "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                    "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        yield {"address": f"ray://127.0.0.1:{client}", "env": env}
    finally:
        subprocess.run([ray_bin(), "stop", "--force"], env=env, capture_output=True, timeout=120)


def run(args: list[str], env: dict, timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sdxl_nodes.runtime.cli", "run", BASE_WF, *args]
    # the one worker of this 2-CPU head has 2 CPUs, and Ray gives it OMP_NUM_THREADS=2: the local reference
    # uses as many threads (a float sum split another way can flip a pixel level)
    return subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=timeout)


def test_ray_client_address_gives_the_local_images(head, models_dir, tmp_path):
    common = ["--models-dir", str(models_dir), "--input-dir", str(tmp_path / "in"), *SMALL]
    local = run([*common, "--output-dir", str(tmp_path / "local")], head["env"])
    assert local.returncode == 0, local.stderr[-2000:]

    remote = run([*common, "--output-dir", str(tmp_path / "remote"), "--ray", head["address"]], head["env"])
    assert remote.returncode == 0, remote.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "remote" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["job"] for r in lines) == [1, 2, 3] and {r["status"] for r in lines} == {"done"}
    want = {json.loads(x)["key"]: json.loads(x)["files"][0]
            for x in (tmp_path / "local" / "manifest.jsonl").read_text().splitlines()}
    for r in lines:
        a = np.asarray(Image.open(tmp_path / "remote" / r["files"][0]))
        b = np.asarray(Image.open(tmp_path / "local" / want[r["key"]]))
        # the worker's thread count is Ray's choice (float sums split differently can flip a level); a wrong
        # seed, job or prompt changes nearly every value
        d = np.abs(a.astype(int) - b.astype(int))
        assert d.max() <= 2 and (d == 0).mean() > 0.99


def test_failed_connection_names_token_authentication(monkeypatch):
    """What a client without RAY_AUTH_MODE=token sees of a token-authenticated head: a connection error."""
    from sdxl_nodes.runtime import batch_ray
    from sdxl_nodes.runtime.cli import CLIError

    class FakeRay:
        def is_initialized(self):
            return False

        def init(self, **_kwargs):
            raise ConnectionError("ray client connection timeout")

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(CLIError) as e:
        batch_ray.connect(FakeRay(), "ray://10.0.0.1:10001")
    assert "ray://10.0.0.1:10001" in str(e.value) and "RAY_AUTH_MODE=token" in str(e.value)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # already set: the hint would mislead
    with pytest.raises(CLIError) as e:
        batch_ray.connect(FakeRay(), "ray://10.0.0.1:10001")
    assert "RAY_AUTH_MODE" not in str(e.value)


def test_ctrl_c_during_a_ray_run_then_resume(models_dir, tmp_path):
    """SIGINT to the driver while Ray workers run: exit 130, every manifest line whole, the unfinished jobs marked
    interrupted and no file of theirs written; --resume then runs exactly those."""
    import signal
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sdxl_nodes.runtime.cli", "run", BASE_WF, "--models-dir", str(models_dir),
           "--input-dir", str(tmp_path / "in"), "--output-dir", str(out), "--set", "6.width=64", "--set",
           "6.height=64", "--set", "7.steps=2", "--sweep", "7.seed=1..8", "--quiet", "--ray", "local",
           "--ray-workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (manifest.exists() and manifest.read_text().count("\n") >= 2):
        time.sleep(0.1)
    assert manifest.exists(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]  # every line parses: none torn
    done = [r for r in lines if r["status"] == "done"]
    assert 2 <= len(done) < 8 and {r["status"] for r in lines} <= {"done", "interrupted"}
    assert len({r["job"] for r in done}) == len(done)
    assert len(list(out.glob("*.png"))) == len(done)  # nothing written for the interrupted jobs

    again = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    final = [json.loads(x) for x in manifest.read_text().splitlines()]
    finished = {r["job"] for r in final if r["status"] == "done"}
    assert finished == set(range(1, 9))
    assert len([r for r in final if r["status"] == "done"]) == 8  # each job done exactly once
    assert len(list(out.glob("*.png"))) == 8


def test_a_client_server_that_fails_to_start_is_retried(monkeypatch):
    """Ray's head sometimes loses the per-client server it forks ("Starting Ray client server failed"); the
    next connection works, so connect() tries again (twice at most) instead of failing the whole run."""
    from sdxl_nodes.runtime import batch_ray
    from sdxl_nodes.runtime.cli import CLIError

    class Flaky:
        def __init__(self, failures):
            self.failures, self.calls = failures, 0

        def is_initialized(self):
            return False

        def init(self, **_kwargs):
            self.calls += 1
            if self.calls <= self.failures:
                raise RuntimeError("Initialization failure from server:\\nRuntimeError: Starting Ray client server "
                                   "failed. See ray_client_server_23000.err for detailed logs.")

    ok = Flaky(failures=2)
    batch_ray.connect(ok, "ray://10.0.0.1:10001")
    assert ok.calls == 3
    broken = Flaky(failures=3)
    with pytest.raises(CLIError, match="client server failed"):
        batch_ray.connect(broken, "ray://10.0.0.1:10001")
    assert broken.calls == 3
