"""One progress line per stage on the driver's log: layers done, last loss, seconds per layer."""

from __future__ import annotations

import logging
import threading

from quantizer.engine import LayerReport

log = logging.getLogger("rayquant.progress")


class StageProgress:
    def __init__(self, stage: int, total_layers: int) -> None:
        self.stage, self.total = stage, total_layers
        self.reports: list[LayerReport] = []
        self._lock = threading.Lock()

    def update(self, report: LayerReport) -> None:
        with self._lock:
            self.reports.append(report)
            done = len(self.reports)
            computed = [r.seconds for r in self.reports if not r.resumed]
            rate = sum(computed) / len(computed) if computed else 0.0
            width = 20
            bar = "#" * (width * done // self.total) + "-" * (width - width * done // self.total)
            log.info("stage %d [%s] %d/%d layers | layer %d loss %.4g%s | %.1f s/layer", self.stage, bar, done,
                     self.total, report.layer, report.loss, " (resumed)" if report.resumed else "", rate)
