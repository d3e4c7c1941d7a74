"""One progress line per stage on the driver's log: layers done, last loss, seconds per layer."""

from __future__ import annotations

import logging
import threading

from quantizer.engine import LayerReport

log = logging.getLogger("rayquant.progress")


class StageProgress:
    def __init__(self, stage: int, total_layers: int) -> None:
        self.stage, self.total = stage, total_layers
        self._by_layer: dict[int, LayerReport] = {}
        self._lock = threading.Lock()

    @property
    def reports(self) -> list[LayerReport]:
        """One report per layer, in layer order: the run that solved it, unless it was only replayed."""
        return [self._by_layer[k] for k in sorted(self._by_layer)]

    def update(self, report: LayerReport) -> None:
        """A replay (after a restart) does not replace the report of the run that solved the layer."""
        with self._lock:
            old = self._by_layer.get(report.layer)
            if old is None or old.resumed or not report.resumed:
                self._by_layer[report.layer] = report
            done = len(self._by_layer)
            computed = [r.seconds for r in self._by_layer.values() if not r.resumed]
            rate = sum(computed) / len(computed) if computed else 0.0
            width = 20
            bar = "#" * (width * done // self.total) + "-" * (width - width * done // self.total)
            log.info("stage %d [%s] %d/%d layers | layer %d loss %.4g%s | %.1f s/layer", self.stage, bar, done,
                     self.total, report.layer, report.loss, " (resumed)" if report.resumed else "", rate)
