"""The driver's progress: an overall line from the first second, saying what happens before the first layer
is done, then layers done across stages with elapsed and remaining time."""

import logging
import time

from cluster.progress import JobProgress, StageProgress
from quantizer.engine import LayerReport, StagePhase


def test_overall_line_from_the_start_to_an_estimate(caplog):
    stages = [StageProgress(0, 3), StageProgress(1, 3)]
    with caplog.at_level(logging.INFO, logger="rayquant.progress"):
        overall = JobProgress(stages, parallel_stages=False, interval_s=3600).start("starting Ray")
    assert "progress: 0/6 layers (0%)" in caplog.text and "starting Ray" in caplog.text
    assert "estimated after the first layer" in caplog.text
    stages[0].update(StagePhase(0, "calibration forward (4 batches) for q_proj+k_proj+v_proj"))
    assert "stage 0 layer 0: calibration forward" in overall.line()
    for layer in range(2):
        stages[0].update(LayerReport(layer=layer, seconds=10.0))
    line = overall.line()
    overall.stop()
    assert "progress: 2/6 layers (33%)" in line and "0:00:40 left" in line  # 4 layers × 10 s, one stage at a time
    stages[0].update(LayerReport(layer=0, seconds=1.0, resumed=True))  # a replay does not replace the solve
    assert stages[0].reports[0].seconds == 10.0


def test_a_streamed_layer_counts_its_experts_and_gives_an_estimate_before_it_ends(monkeypatch):
    """A 671B MoE layer takes minutes on GPUs (over an hour here): the overall line counts the finished share of
    a layer whose experts are streamed, and estimates the time left from it before any layer is done."""
    now = [1000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    stages = [StageProgress(0, 2)]
    overall = JobProgress(stages, parallel_stages=False, interval_s=3600)
    stages[0].update(StagePhase(0, "solving o_proj"))
    now[0] += 20
    stages[0].update(StagePhase(0, "experts 0-63 of 256: calibration forward (4 batches) for 64 × gate_proj", 0, 256))
    assert "(0%)" in overall.line() and "estimated after the first layer" in overall.line()
    now[0] += 80
    stages[0].update(StagePhase(0, "experts 64-127 of 256: solving 64 × down_proj", 64, 256))
    line = overall.line()
    assert "progress: 0/2 layers (12%)" in line and "experts 64-127 of 256" in line
    assert "0:11:40 left" in line  # a quarter of a layer in 100 s: 1.75 layers × 400 s
    stages[0].update(StagePhase(0, "writing the layer's checkpoint"))  # after the last chunk: its share stays
    assert "(12%)" in overall.line()
    stages[0].update(LayerReport(layer=0, seconds=400.0))
    assert "progress: 1/2 layers (50%)" in overall.line() and "0:06:40 left" in overall.line()
