"""The benchmark helpers that only run in full on a GPU work on CPU with tiny shapes."""

import json

import pytest

from bench import plots
from bench.gpu_layer import SMALL_7B, decode_rows


def test_decode_benchmark_runs_int4_with_less_weight_memory():
    rows = decode_rows({**SMALL_7B, "num_hidden_layers": 1}, "cpu", new_tokens=4)
    assert [r["weights"] for r in rows] == ["fp16", "int4 g128 (torch dequant)"]
    for r in rows:  # tokens/s counts the tokens the model really generated, over the measured time
        assert r["generated_tokens"] == 4
        assert r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["decode_seconds"])
    assert rows[1]["weight_gb"] < rows[0]["weight_gb"]  # packed int4 projections replaced the float ones


def test_every_result_file_has_a_plot_that_draws(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(plots, "RESULTS", tmp_path)
    for path in sorted((plots.Path(plots.__file__).parent / "results").glob("*.json")):
        rows = json.loads(path.read_text())["rows"]
        drawn = plots.save_plot(path.stem, rows)
        assert drawn is not None and drawn.stat().st_size > 10_000, path.stem
