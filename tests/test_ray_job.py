"""`ray job submit --working-dir . -- rayquant quantize …` against a `ray start --head` cluster: the output
lands at the absolute path the submitter gave (the README's `--out "$PWD/…"`), and a relative output —
which would land in Ray's temporary copy of the working dir — is refused with the fix."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.common import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_ray_job_submit(tiny_llama, tmp_path):
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    # this interpreter's `ray` and `rayquant`, also when its virtualenv is not activated
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rq", dir="/tmp")  # its own session dir: other local Rays don't interfere
    started = subprocess.run(["ray", "start", "--head", "--num-cpus", "2", "--port", str(gcs), "--dashboard-host",
                              "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
                              # not the default 52365, which a Ray started by a test on the other worker may hold
                              "--dashboard-agent-listen-port", str(agent),
                              "--temp-dir", temp_dir], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, (started.stdout + started.stderr)[-3000:]
    try:
        def submit(out: str) -> subprocess.CompletedProcess:
            cmd = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
                   "--", "rayquant", "quantize", "--model", str(tiny_llama), "--out", out, "--num-samples", "8",
                   "--max-len", "32", "--group-size", "32", "--stages", "2"]
            for _ in range(20):  # the job agent needs a few seconds after `ray start`
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                if "No available agent" not in done.stdout + done.stderr:
                    return done
                time.sleep(3)
            return done

        out = tmp_path / "out"
        done = submit(str(out))
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "succeeded" in done.stdout + done.stderr
        report = json.loads((out / "quantize_report.json").read_text())
        assert len(report["stages"]) == 2 and report["output_dir"] == str(out)
        relative = submit("out/relative")
        assert relative.returncode != 0
        text = relative.stdout + relative.stderr
        assert "is relative, and this job runs in Ray's temporary copy of its --working-dir" in text
        assert '--out "$PWD/out/relative"' in text
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(temp_dir: str) -> None:
    """Kill this test's Ray processes only (they name its session dir); `ray stop` would kill every local Ray,
    other tests' included."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
