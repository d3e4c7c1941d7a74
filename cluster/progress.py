"""Progress on the driver's log: one line per finished layer per stage, and an overall line from the first
second on — layers done of all stages (a layer whose experts are streamed counts its finished experts),
elapsed and remaining time, and what is happening right now (loading, a calibration forward, a solve)."""

from __future__ import annotations

import logging
import threading
import time

from quantizer.engine import LayerReport, StagePhase

log = logging.getLogger("rayquant.progress")


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StageProgress:
    def __init__(self, stage: int, total_layers: int) -> None:
        self.stage, self.total = stage, total_layers
        self._by_layer: dict[int, LayerReport] = {}
        self._lock = threading.Lock()
        self.phase = "waiting"
        self.layer: int | None = None  # the layer the last phase was in, since `layer_started` (time.time())
        self.layer_started = 0.0
        self.fraction = 0.0  # of that layer: its finished experts, when they are streamed

    @property
    def reports(self) -> list[LayerReport]:
        """One report per layer, in layer order: the run that solved it, unless it was only replayed."""
        return [self._by_layer[k] for k in sorted(self._by_layer)]

    @property
    def done(self) -> int:
        return len(self._by_layer)

    def solved_seconds(self) -> list[float]:
        with self._lock:
            return [r.seconds for r in self._by_layer.values() if not r.resumed]

    def update(self, event: LayerReport | StagePhase) -> None:
        """A phase changes what the stage is doing; a report finishes a layer. A replay (after a restart)
        does not replace the report of the run that solved the layer."""
        if isinstance(event, StagePhase):
            self.phase = f"layer {event.layer}: {event.what}"
            if event.layer != self.layer:
                self.layer, self.layer_started, self.fraction = event.layer, time.time(), 0.0
            if event.experts:  # (the phases after the last chunk keep its share until the layer's report)
                self.fraction = event.experts_done / event.experts
            return
        with self._lock:
            old = self._by_layer.get(event.layer)
            if old is None or old.resumed or not event.resumed:
                self._by_layer[event.layer] = event
            done = len(self._by_layer)
            computed = [r.seconds for r in self._by_layer.values() if not r.resumed]
        self.phase = "finished" if done == self.total else f"layer {event.layer} done"
        self.layer, self.fraction = None, 0.0
        rate = sum(computed) / len(computed) if computed else 0.0
        width = 20
        bar = "#" * (width * done // self.total) + "-" * (width - width * done // self.total)
        log.info("stage %d [%s] %d/%d layers | layer %d loss %.4g%s | %.1f s/layer", self.stage, bar, done,
                 self.total, event.layer, event.loss, " (resumed)" if event.resumed else "", rate)


class JobProgress:
    """The overall line, logged at start and then every `interval_s` until `stop()`."""

    def __init__(self, stages: list[StageProgress], parallel_stages: bool, interval_s: float = 10.0) -> None:
        self.stages, self.parallel, self.interval_s = stages, parallel_stages, interval_s
        self.total = sum(s.total for s in stages)
        self.started = time.time()
        self.activity = "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rayquant-progress", daemon=True)

    def start(self, activity: str) -> "JobProgress":
        self.activity = activity
        self.log_line()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def remaining_s(self) -> float | None:
        """Layers left × the mean solve time per layer so far (divided by the stages that run at once); before a
        layer is solved, the time per layer a streamed layer's finished experts project."""
        solved = [s for p in self.stages for s in p.solved_seconds()]
        if not solved:
            now = time.time()
            solved = [(now - p.layer_started) / p.fraction for p in self.stages if p.fraction > 0]
        if not solved:
            return None
        left = self.total - self.done()
        return left * (sum(solved) / len(solved)) / (len(self.stages) if self.parallel else 1)

    def done(self) -> float:
        """Layers finished, with the finished share of layers whose experts are streamed."""
        return sum(p.done + p.fraction for p in self.stages)

    def line(self) -> str:
        done = sum(p.done for p in self.stages)
        remaining = self.remaining_s()
        busy = [f"stage {p.stage} {p.phase}" for p in self.stages if p.phase not in ("waiting", "finished")]
        now = "; ".join(busy) if busy else self.activity
        eta = clock(remaining) if remaining is not None else "estimated after the first layer"
        return (f"progress: {done}/{self.total} layers ({100 * self.done() / max(self.total, 1):.0f}%) | "
                f"{clock(time.time() - self.started)} elapsed | {eta} left | {now}")

    def log_line(self) -> None:
        log.info("%s", self.line())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.log_line()
