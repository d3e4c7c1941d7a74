"""Bad input through the CLI: a clear message naming the problem, exit code 2, nothing half written. The tests
that reach the driver share the module's Ray (`ray_local`); those without one are in test_launch.py."""

import json
import shutil

import pytest

from rayquant.cli import main


def _quantize(tmp_path, *args):
    return main(["quantize", "--out", str(tmp_path / "out"), "--num-samples", "4", "--max-len", "32", *args])


def _assert_nothing_written(tmp_path):
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == []


def test_missing_model_dir(tmp_path, caplog, ray_local):
    assert _quantize(tmp_path, "--model", str(tmp_path / "nope")) == 2
    assert "does not exist" in caplog.text
    _assert_nothing_written(tmp_path)


def test_not_a_causal_lm(tmp_path, caplog, ray_local):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    assert _quantize(tmp_path, "--model", str(model)) == 2
    assert "not a causal language model" in caplog.text
    _assert_nothing_written(tmp_path)


def test_bits_5(tmp_path, tiny_llama, caplog):
    assert _quantize(tmp_path, "--model", str(tiny_llama), "--bits", "5") == 2
    assert "bits=5 is not supported" in caplog.text
    _assert_nothing_written(tmp_path)


def test_group_size_not_dividing(tmp_path, tiny_llama, caplog, ray_local):
    assert _quantize(tmp_path, "--model", str(tiny_llama), "--group-size", "96") == 2
    assert "group_size=96 does not divide in_features=128" in caplog.text
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("content,message", [("", "is empty"), ("{not json", "is not valid JSON")])
def test_bad_calibration_file(tmp_path, tiny_llama, caplog, content, message, ray_local):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(content)
    assert _quantize(tmp_path, "--model", str(tiny_llama), "--calib", str(calib)) == 2
    assert message in caplog.text
    _assert_nothing_written(tmp_path)


def test_existing_output_dir_is_kept(tmp_path, tiny_llama, caplog, ray_local):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    assert _quantize(tmp_path, "--model", str(tiny_llama)) == 2
    assert "already exists" in caplog.text and "--overwrite" in caplog.text
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_missing_or_corrupt_shard(tmp_path, tiny_llama, caplog, ray_local):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    assert _quantize(tmp_path, "--model", str(model)) == 2
    assert "unreadable" in caplog.text
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _quantize(tmp_path, "--model", str(model)) == 2
    assert "is listed in the index but missing" in caplog.text
    _assert_nothing_written(tmp_path)


def test_unknown_job_key(tmp_path, caplog):
    job = tmp_path / "job.yaml"
    job.write_text("quant:\n  bits: 4\n  grop_size: 64\n")
    assert main(["quantize", "--config", str(job)]) == 2
    assert "unknown key(s) ['grop_size'] in quant" in caplog.text


def test_help_reads_like_the_readme(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--calib", "--out", "--bits", "--group-size", "--desc-act", "--sym", "--num-samples",
                 "--max-len", "--damp-percent", "--stages", "--schedule", "--address", "--config"):
        assert flag in text
