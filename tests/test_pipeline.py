"""The Ray pipeline on a local cluster: stage splits agree bit for bit, pipelined stages overlap,
killed actors and killed drivers resume to the same output, bad resumes are refused."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.driver import Driver
from cluster.job import load_job
from cluster.output import OutputTarget
from cluster.resume import layers_folder, open_work_dir
from quantizer.errors import ConfigError

SMALL = {"calibration.num_samples": 24, "calibration.max_len": 64, "calibration.batch_size": 4,
         "quant.group_size": 32, "quant.desc_act": True, "resources.cpus_per_stage": 1}


def run_job(model: Path, out: Path, **overrides) -> dict:
    return Driver(load_job(None, {**SMALL, "model": str(model), "output_dir": str(out), **overrides})).run()


def layers_dir(out: Path) -> Path:
    """Where a job writing to `out` keeps its finished layers until the checkpoint is published."""
    return Path(layers_folder(OutputTarget(str(out)).work).url)


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def one_stage(tiny_llama_gptq, ray_local):
    return tiny_llama_gptq


def test_three_stages_equal_one_stage_bit_for_bit(tiny_llama, one_stage, tmp_path):
    out1 = one_stage
    report3 = run_job(tiny_llama, tmp_path / "three", stages=3)
    assert_same_tensors(out1, tmp_path / "three")
    assert [s["layers"] for s in report3["stages"]] == [[0, 1], [1, 2], [2, 4]]
    assert sorted(p.name for p in (tmp_path / "three").glob("model-*")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert report3["transfer_bytes"] > 0 and all(s["peak_rss_mb"] > 0 for s in report3["stages"])
    for layer in (r for s in report3["stages"] for r in s["layer_reports"]):  # where each layer's time went
        phases = layer["phase_seconds"]
        expected = {"load", "capture", "solve", "save"} | ({"forward"} if layer["layer"] < 3 else set())
        assert set(phases) == expected and all(t > 0 for t in phases.values()), phases  # the last: no forward
        assert sum(phases.values()) <= layer["seconds"]
    assert not (tmp_path / ".three.partial").exists() and not (tmp_path / ".three.rayquant-work").exists()


def test_pipelined_stages_work_at_the_same_time(tiny_llama, tmp_path, ray_local):
    from transformers import AutoTokenizer

    from quantizer.calibration import default_eval_file
    from quantizer.evaluation import perplexity
    from quantizer.loading import load_model

    more_work = {"calibration.num_samples": 64, "calibration.max_len": 256}  # seconds per stage, not ms
    report = run_job(tiny_llama, tmp_path / "pipe", stages=2, schedule="pipelined", **more_work)
    s0, s1 = report["stages"]
    assert s1["started"] < s0["finished"] and s0["started"] < s1["finished"]  # busy at once
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    run_job(tiny_llama, tmp_path / "seq", stages=1, **more_work)  # a sequential job: the same bits at any stage count
    ppl = {name: perplexity(load_model(tmp_path / name), tokenizer, default_eval_file(), window=128, max_windows=4)
           for name in ("seq", "pipe")}
    assert ppl["pipe"] == pytest.approx(ppl["seq"], rel=0.05)


def test_killed_stage_actor_is_replaced_and_output_unchanged(tiny_llama, one_stage, tmp_path):
    import ray

    job = load_job(None, {**SMALL, "model": str(tiny_llama), "output_dir": str(tmp_path / "killed"), "stages": 2})
    driver = Driver(job)
    layers = layers_dir(tmp_path / "killed")
    killed = []

    def kill_stage_one():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if len(list(layers.glob("layer_*.safetensors"))) >= 3:  # stage 1 has begun its layers
                ray.kill(driver.actors[1], no_restart=False)
                killed.append(time.time())
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_stage_one)
    watcher.start()
    driver.run()
    watcher.join()
    assert killed, "the job finished before the stage actor could be killed"
    assert_same_tensors(one_stage, tmp_path / "killed")


def test_killed_driver_resumes_with_the_same_command(tiny_llama, one_stage, tmp_path):
    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "rayquant.cli", "quantize", "--model", str(tiny_llama), "--out", str(out),
            "--num-samples", "24", "--max-len", "64", "--batch-size", "4", "--group-size", "32", "--desc-act",
            "--cpus-per-stage", "1", "--stages", "2"]
    layers = layers_dir(out)
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(layers.glob("layer_*.safetensors"))) < 2:
        assert proc.poll() is None, "the driver exited before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = sorted(p.name for p in layers.glob("layer_*.safetensors"))
    assert 2 <= len(finished_before) < 4 and not out.exists()
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: " in done.stderr
    assert_same_tensors(one_stage, out)


def test_the_last_layer_is_checkpointed_without_running_it_forward(tiny_llama, tmp_path, monkeypatch):
    """Nothing reads the outputs of the model's last layer: a job's last stage checkpoints it and does not push
    the calibration through it; every other layer's outputs are computed, and the checkpoint is the same."""
    from quantizer.engine import StageEngine
    from tests.inline_job import quantize_inline

    forwarded: list[int] = []
    forward = StageEngine.forward_layer
    monkeypatch.setattr(StageEngine, "forward_layer",
                        lambda self, layer, index, chunk: forwarded.append(index) or forward(self, layer, index, chunk))
    reports = quantize_inline(tiny_llama, tmp_path / "last-stage")
    without, forwarded[:] = sorted(set(forwarded)), []
    quantize_inline(tiny_llama, tmp_path / "emitting", emit_outputs=True)
    assert without == [0, 1, 2] and sorted(set(forwarded)) == [0, 1, 2, 3]
    assert [r.layer for r in reports] == [0, 1, 2, 3] and all(r.seconds > 0 for r in reports)
    assert_same_tensors(tmp_path / "emitting", tmp_path / "last-stage")


def test_resume_with_changed_settings_is_refused_and_keeps_work(tiny_llama, tmp_path, ray_local):
    open_work_dir(OutputTarget(str(tmp_path / "changed")).work, "0123456789abcdef", restart=False)
    marker = layers_dir(tmp_path / "changed") / "layer_00000.safetensors"
    marker.write_bytes(b"finished work")
    with pytest.raises(ConfigError, match="different settings"):
        run_job(tiny_llama, tmp_path / "changed", stages=1)
    assert marker.read_bytes() == b"finished work"


def test_plan_that_cannot_fit_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="1 stages do not fit: the largest stage needs 0.52 GB but each stage "
                                          "has 0.30 GB;.* use devices with more memory"):
        run_job(tiny_llama, tmp_path / "nofit", stages=1, **{"resources.memory_per_stage_gb": 0.3})
    assert not (tmp_path / "nofit").exists() and not (tmp_path / ".nofit.partial").exists()
    assert not (tmp_path / ".nofit.rayquant-work").exists()


def test_too_few_calibration_tokens_are_warned_about(tiny_llama, tmp_path, caplog):
    """Fewer tokens than the widest input (256 here) leave that Hessian rank-deficient: one warning naming the fix."""
    def warnings(**calibration) -> list[str]:
        caplog.clear()
        Driver(load_job(None, {**SMALL, "model": str(tiny_llama), "output_dir": str(tmp_path / "out"),
                               **{f"calibration.{k}": v for k, v in calibration.items()}}))
        return [r.getMessage() for r in caplog.records if "rank-deficient" in r.getMessage()]

    with caplog.at_level("WARNING", logger="cluster.driver"):
        few = warnings(num_samples=4, max_len=32)
        enough = warnings(num_samples=16, max_len=64)
    assert len(few) == 1 and "has 128 tokens, fewer than the widest layer input (256)" in few[0]
    assert "raise --num-samples or --max-len" in few[0]
    assert enough == []


def test_qwen2_with_biases_and_padded_mlp(tiny_qwen2, tmp_path, ray_local):
    from transformers import AutoTokenizer

    from quantizer.loading import load_model

    out = tmp_path / "qwen2"
    run_job(tiny_qwen2, out, stages=2, **{"quant.pad_intermediate_to": 384, "quant.bits": 8})
    tensors = checkpoint_tensors(out)
    assert tensors["model.layers.0.mlp.down_proj.g_idx"].shape == (384,)
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16
    float_model = load_model(tiny_qwen2)
    quant_model = load_model(out)
    assert quant_model.config.intermediate_size == 384
    ids = AutoTokenizer.from_pretrained(tiny_qwen2)("Padding keeps the outputs", return_tensors="pt").input_ids
    with torch.inference_mode():
        a, b = float_model(ids).logits, quant_model(ids).logits
    assert float((a - b).norm() / a.norm()) < 0.02  # 8-bit, padded MLP: outputs essentially unchanged


@pytest.mark.slow
def test_driver_memory_does_not_grow_with_model_size(tiny_llama, tmp_path, ray_local):
    """The driver reads headers and token ids only: a model with ~13× the weights leaves its RSS flat."""
    import json

    from tests.tiny_models import write_tiny_model

    wide = write_tiny_model(tmp_path / "wide", "llama", layers=4, hidden=1024, intermediate=4096)
    peaks = {}
    jobs = {}  # both at once, two drivers on the module's Ray (RAY_ADDRESS): the peaks are per process
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    for name, model in (("tiny", tiny_llama), ("wide", wide)):
        args = [sys.executable, "-m", "rayquant.cli", "quantize", "--model", str(model), "--out",
                str(tmp_path / f"out-{name}"), "--num-samples", "8", "--max-len", "32", "--group-size", "128",
                "--stages", "1", "--cpus-per-stage", "1"]
        with open(tmp_path / f"{name}.log", "w") as log:
            jobs[name] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)
    for name, job in jobs.items():
        assert job.wait(timeout=900) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        report = json.loads((tmp_path / f"out-{name}" / "quantize_report.json").read_text())
        peaks[name] = (report["driver_peak_rss_mb"], max(s["peak_rss_mb"] for s in report["stages"]))
    weights_mb = {n: sum(f.stat().st_size for f in m.glob("*.safetensors")) / 2**20
                  for n, m in (("tiny", tiny_llama), ("wide", wide))}
    assert weights_mb["wide"] - weights_mb["tiny"] > 200
    assert peaks["wide"][0] - peaks["tiny"][0] < 40  # driver: flat
    assert peaks["wide"][1] - peaks["tiny"][1] > 40  # stages: they do hold the (larger) layers
