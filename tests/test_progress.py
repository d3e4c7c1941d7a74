"""The driver's progress: an overall line from the first second, saying what happens before the first layer
is done, then layers done across stages with elapsed and remaining time."""

import logging

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
