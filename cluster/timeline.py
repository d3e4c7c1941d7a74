"""Where a data-parallel worker's time goes: the spans it was busy in each phase of a layer (load, capture,
reduce, solve, broadcast, save, forward), and per layer the busy and idle seconds of every worker — idle
being the layer's wall time that worker spent waiting on the others or on the driver."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

PHASES = ("load", "capture", "reduce", "solve", "broadcast", "save", "forward")


@dataclass
class Span:
    seconds: float = 0.0


class Timeline:
    """Busy spans (phase, start, end) in wall-clock seconds (time.time()), until taken."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []

    @contextlib.contextmanager
    def span(self, phase: str) -> Iterator[Span]:
        span, start, clock = Span(), time.time(), time.perf_counter()
        try:
            yield span
        finally:
            span.seconds = time.perf_counter() - clock
            self.events.append((phase, start, start + span.seconds))

    def take(self) -> list[tuple[str, float, float]]:
        events, self.events = self.events, []
        return events


def layer_timeline(start: float, wall: float, events: list[list[tuple[str, float, float]]]) -> dict:
    """One layer's timeline: `events` per rank (absolute times), the layer's `start` (time.time()) and `wall`
    seconds. Returns per rank the spans relative to the start, the busy seconds per phase, and the idle
    seconds (wall − busy)."""
    workers = []
    for spans in events:
        busy = {phase: 0.0 for phase in PHASES}
        for phase, t0, t1 in spans:
            busy[phase] += t1 - t0
        workers.append({"spans": [(phase, round(t0 - start, 4), round(t1 - start, 4)) for phase, t0, t1 in spans],
                        "busy_s": {k: round(v, 4) for k, v in busy.items()},
                        "idle_s": round(max(0.0, wall - sum(busy.values())), 4)})
    return {"wall_s": round(wall, 4), "workers": workers}


def busy_totals(layers: list[dict]) -> list[dict]:
    """Per rank over all layers: seconds busy in each phase, idle, and the busy fraction of the layers' wall."""
    if not layers:
        return []
    wall = sum(layer["wall_s"] for layer in layers)
    totals = []
    for rank in range(len(layers[0]["workers"])):
        busy = {phase: round(sum(layer["workers"][rank]["busy_s"][phase] for layer in layers), 3) for phase in PHASES}
        idle = round(sum(layer["workers"][rank]["idle_s"] for layer in layers), 3)
        totals.append({"rank": rank, "busy_s": busy, "idle_s": idle,
                       "busy_fraction": round(sum(busy.values()) / wall, 4) if wall else 0.0})
    return totals
