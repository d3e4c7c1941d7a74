"""Models, calibration and outputs where users keep them: object storage (a real S3 API: moto's standalone
server on loopback, as s3fs's own tests use), the Hugging Face cache by Hub id, and the resume safety that
comes with them (model and calibration identity in the resume hash, one run per output, nothing of the
user's deleted)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.job_lock import LOCK_FILE, JobLock
from cluster.output import COMPLETE_MARKER, OutputTarget
from quantizer.errors import ConfigError
from quantizer.storage import Location
from tests.local_ray import fresh_local_ray, stop_ray
from tests.test_pipeline import SMALL, assert_same_tensors, checkpoint_tensors, run_job

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

ARGS = ["--num-samples", "24", "--max-len", "64", "--batch-size", "4", "--group-size", "32", "--desc-act",
        "--cpus-per-stage", "1"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1; the AWS_* variables point every process of the test at it."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fresh_local_ray()  # its workers inherit the AWS_* variables
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    for bucket in ("models", "data", "out"):
        client.create_bucket(Bucket=bucket)
    yield client
    stop_ray()  # its workers hold the test's credentials
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def upload_dir(client, local: Path, bucket: str, prefix: str) -> str:
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def s3_keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def download_dir(client, bucket: str, prefix: str, target: Path) -> Path:
    target.mkdir(parents=True)
    for key in s3_keys(client, bucket, prefix + "/"):
        name = key[len(prefix) + 1:]
        if "/" not in name:
            client.download_file(bucket, key, str(target / name))
    return target


def test_location_on_s3_reads_writes_ranges_and_creates_exclusively(s3):
    folder = Location("s3://data/folder")
    assert not folder.exists() and folder.list() == []
    folder.write_text("a.json", '{"x": 1}')
    folder.write_bytes("b.bin", bytes(range(100)))
    assert folder.exists() and folder.list() == ["a.json", "b.bin"] and folder.list("b") == ["b.bin"]
    assert folder.read_range("b.bin", 10, 5) == bytes(range(10, 15)) and folder.size("b.bin") == 100
    assert folder.create_exclusive("lock", b"first") and not folder.create_exclusive("lock", b"second")
    assert folder.read_bytes("lock") == b"first"
    folder.remove_tree()
    assert not folder.exists()


def test_tensors_go_to_s3_from_a_temp_file_not_a_bytes_copy(s3, monkeypatch, tmp_path):
    """A layer checkpoint on object storage is written from the tensors into a local temp file and uploaded
    whole (a Kimi-K2 layer is 8.5 GB: serialized to bytes first it would be held twice); it reads back bit for
    bit, with its metadata, and no temp file is left."""
    import tempfile

    import safetensors.torch

    from quantizer.safetensors_stream import lazy_file

    def no_bytes(*args, **kwargs):
        raise AssertionError("serialized in memory")

    monkeypatch.setattr(safetensors.torch, "save", no_bytes)
    monkeypatch.setattr("quantizer.storage.save", no_bytes, raising=False)  # a name bound at import, if any
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tensors = {"a": torch.arange(12, dtype=torch.int32).reshape(3, 4), "b": torch.randn(5, dtype=torch.float16)}
    folder = Location("s3://data/layers")
    folder.write_tensors("layer_00000.safetensors", tensors, {"report": "{}"})
    lazy, metadata = lazy_file(folder, "layer_00000.safetensors")
    assert metadata == {"report": "{}"} and lazy.keys() == tensors.keys()
    assert all(torch.equal(lazy[k].load(), v) for k, v in tensors.items())
    assert list(tmp_path.iterdir()) == []


def test_quantize_s3_to_s3_survives_a_killed_driver(s3, tiny_llama, tmp_path, ray_local):
    """Model, calibration text and output in S3. The driver is SIGKILLed mid-job; the same command resumes from
    the layers under the output prefix, and the tensors equal a local run's. Loads from a local download."""
    model = upload_dir(s3, tiny_llama, "models", "tiny-llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(Path(__file__).with_name("tiny_models.py").read_text() * 20)
    s3.upload_file(str(calib), "data", "calib.txt")
    reference = tmp_path / "reference"
    run_job(tiny_llama, reference, stages=1, calibration_file=str(calib))
    out = "s3://out/tiny-gptq"
    args = [sys.executable, "-m", "rayquant.cli", "quantize", "--model", model, "--calib", "s3://data/calib.txt",
            "--out", out, "--stages", "2", *ARGS]
    env = {**os.environ, "RAYQUANT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(args, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(s3_keys(s3, "out", "tiny-gptq/.rayquant-work/layers/")) < 2:
        assert proc.poll() is None, "the driver exited before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    keys = s3_keys(s3, "out", "tiny-gptq/")
    assert f"tiny-gptq/{COMPLETE_MARKER}" not in keys and "tiny-gptq/.rayquant-work/job.json" in keys
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: " in done.stderr and "taking over a stale lock" in done.stderr
    keys = s3_keys(s3, "out", "tiny-gptq/")
    assert not any(".rayquant-work" in k for k in keys)  # resume state gone once the checkpoint is in place
    marker = json.loads(s3.get_object(Bucket="out", Key=f"tiny-gptq/{COMPLETE_MARKER}")["Body"].read())
    assert sorted(f"tiny-gptq/{f}" for f in [*marker["files"], COMPLETE_MARKER]) == keys
    local = download_dir(s3, "out", "tiny-gptq", tmp_path / "downloaded")
    assert_same_tensors(reference, local)
    report = json.loads((local / "quantize_report.json").read_text())
    assert report["model_identity"]["kind"] == "remote" and report["output_dir"] == out
    from quantizer.loading import load_model

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        assert torch.equal(load_model(local)(ids).logits, load_model(reference)(ids).logits)


def test_hub_id_offline_from_the_cache(tiny_llama, tmp_path):
    """`--model org/name[@revision]` with HF_HUB_OFFLINE=1: read from a cache in the standard layout; the commit
    goes into the report. An id that is not cached is refused with the fix."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    base = [sys.executable, "-m", "rayquant.cli", "quantize", "--stages", "1", *ARGS]
    done = subprocess.run([*base, "--model", "acme/tiny-llama", "--out", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "quantize_report.json").read_text())
    assert report["model"] == f"acme/tiny-llama@{commit}"
    assert report["model_identity"] == {"kind": "hub", "repo": "acme/tiny-llama", "commit": commit}
    missing = subprocess.run([*base, "--model", "acme/other@v2", "--out", str(tmp_path / "o2")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert "acme/other@v2 is not in the local HF cache" in missing.stderr and "hf download" in missing.stderr


def test_hub_stage_fetches_only_the_shards_of_its_layers(tmp_path, monkeypatch):
    """Online: headers from the Hub's metadata call, and a stage downloads just the shards holding its tensors."""
    import huggingface_hub

    from quantizer.model_io import CheckpointReader
    from quantizer.sources import HubSource, parse_header
    from tests.tiny_models import write_tiny_model

    local = write_tiny_model(tmp_path / "sharded", "llama", layers=4, max_shard_size="400KB")
    shards = sorted(p.name for p in local.glob("model-*.safetensors"))
    assert len(shards) >= 3
    fetched: list[str] = []

    class FakeApi:
        def list_repo_files(self, repo_id, revision):
            return [p.name for p in local.iterdir()]

        def get_safetensors_metadata(self, repo_id, revision):
            class Tensor:
                def __init__(self, shape, dtype):
                    self.shape, self.dtype = shape, dtype

            class File:
                def __init__(self, path):
                    def read(start, length):
                        with open(path, "rb") as f:
                            f.seek(start)
                            return f.read(length)

                    self.tensors = {k: Tensor(*v) for k, v in parse_header(read, str(path))[0].items()}

            return type("Meta", (), {"files_metadata": {s: File(local / s) for s in shards}})()

    def fake_download(repo_id, filename, revision):
        fetched.append(filename)
        return str(local / filename)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    reader = CheckpointReader(HubSource("acme/sharded", "c" * 40))
    assert not any(f.endswith(".safetensors") for f in fetched)  # the driver's view: headers only
    layer = reader.layer_state(2)
    needed = {reader.tensors[f"model.layers.2.{k}"].file for k in layer}
    assert {f for f in fetched if f.endswith(".safetensors")} == needed and len(needed) < len(shards)


def test_resume_hash_covers_model_files_and_calibration_content(tiny_llama, tmp_path):
    from cluster.driver import Driver
    from cluster.job import load_job

    def resume_hash(model: Path, calib: Path) -> str:
        return Driver(load_job(None, {**SMALL, "model": str(model), "calibration_file": str(calib),
                                      "output_dir": str(tmp_path / "out")})).resume_hash()

    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration text about many things. " * 200)
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    first = resume_hash(model, calib)
    assert resume_hash(model, calib) == first
    calib.write_text("Other calibration text entirely, same file name. " * 200)
    assert resume_hash(model, calib) != first
    calib.write_text("Calibration text about many things. " * 200)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1]  # a re-converted model: other header
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert resume_hash(model, calib) != first


def test_one_run_per_output_and_stale_locks(tmp_path):
    folder = Location(tmp_path / "work")
    first = JobLock(folder, heartbeat_s=0.05)
    first.acquire()
    with pytest.raises(ConfigError, match="another run holds this output"):
        JobLock(folder).acquire()
    time.sleep(0.2)
    assert json.loads(folder.read_text(LOCK_FILE))["heartbeat"] > first.owner["started"]  # beating
    first.release()
    assert not folder.is_file(LOCK_FILE)
    # a lock left by a process of this host that is gone: taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder.write_text(LOCK_FILE, json.dumps({"token": "x", "pid": int(dead.stdout), "host": socket.gethostname(),
                                             "started": time.time(), "heartbeat": time.time()}))
    JobLock(folder).acquire()
    folder.write_text(LOCK_FILE, json.dumps({"token": "y", "pid": 1, "host": "elsewhere", "started": 0,
                                             "heartbeat": time.time() - 3600}))  # another host, silent for 1 h
    lock = JobLock(folder, stale_after_s=600)
    lock.acquire()
    lock.release()


def test_a_second_run_on_the_same_output_is_refused(tiny_llama, tmp_path, ray_local):
    out = tmp_path / "busy"
    holder = JobLock(OutputTarget(str(out)).work)
    holder.acquire()
    try:
        with pytest.raises(ConfigError, match="another run holds this output"):
            run_job(tiny_llama, out, stages=1)
    finally:
        holder.release()
    assert not out.exists()


def test_overwrite_replaces_only_rayquant_checkpoints(tiny_llama, tmp_path, ray_local):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="rayquant never deletes what it did not write"):
        run_job(tiny_llama, foreign, stages=1, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "precious"
    out = tmp_path / "ours"
    run_job(tiny_llama, out, stages=1)
    before = checkpoint_tensors(out)
    report = run_job(tiny_llama, out, stages=1)  # same settings, already finished: nothing to do
    assert report["settings_hash"] == json.loads((out / COMPLETE_MARKER).read_text())["settings_hash"]
    with pytest.raises(ConfigError, match="already exists .*pass --overwrite"):
        run_job(tiny_llama, out, stages=1, **{"quant.bits": 8})
    run_job(tiny_llama, out, stages=1, overwrite=True, **{"quant.bits": 8})
    after = checkpoint_tensors(out)
    name = "model.layers.0.self_attn.q_proj.qweight"
    assert after[name].shape != before[name].shape  # 8-bit codes now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "ours"]  # no staging, work or replaced dirs left
