"""Job files: typed sections, unknown keys and bad values rejected, flags override, settings hash."""

import pytest

from cluster.job import load_job
from quantizer.errors import ConfigError


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: /models/x\nquant:\n  bits: 3\n  group_size: 128\nstages: 2\n"
                    "calibration:\n  num_samples: 64\nresources:\n  cpus_per_stage: 1\n")
    job = load_job(path, {"quant.bits": 8, "output_dir": "o"})
    assert job.quant.bits == 8 and job.quant.group_size == 128 and job.stages == 2
    assert job.calibration.num_samples == 64 and job.output_dir == "o" and job.resources.cpus_per_stage == 1


@pytest.mark.parametrize("text,message", [
    ("quant:\n  bitz: 4\n", r"unknown key\(s\) \['bitz'\] in quant"),
    ("modle: x\n", r"unknown key\(s\) \['modle'\] in the job file"),
    ("quant:\n  bits: 5\n", "bits=5 is not supported"),
    ("schedule: wavefront\n", "schedule 'wavefront' is unknown"),
    ("stages: 0\n", "stages must be a positive integer"),
    ("quant: [1, 2]\n", "quant must be a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_job_files(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_job(path, {})


def test_settings_hash_tracks_output_relevant_settings():
    base = load_job(None, {})
    assert base.settings_hash() == load_job(None, {"resources.cpus_per_stage": 1}).settings_hash()
    assert base.settings_hash() != load_job(None, {"quant.bits": 3}).settings_hash()


def test_shipped_config_files_validate():
    from pathlib import Path

    from serving.config import load_serve_config

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"default.yaml", "qwen2-72b.yaml", "serve.yaml"}
    for path in configs:
        if path.name.startswith("serve"):
            config = load_serve_config(path)
            assert config.engine == "auto" and config.kv_cache_dtype == "auto"  # vLLM where installed
        else:
            load_job(path, {})
