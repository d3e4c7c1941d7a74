"""Prometheus metrics of a replica, through Ray's metrics agent (ray.util.metrics): Ray exports them on
each node's metrics port (`ray start --metrics-export-port`, or the serve config's `metrics_port` for the
local Ray `rayquant serve` starts), named `ray_<name>` and tagged with the engine and the gRPC method."""

from __future__ import annotations

import time

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
RATE_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


class ServingMetrics:
    """One per replica. Per request: `started` → `first_token` (once) → `finished` (once)."""

    def __init__(self, engine: str) -> None:
        tags = ("engine", "method")
        self.requests = Counter("rayquant_requests", "Generation calls by gRPC status code.",
                                tag_keys=(*tags, "code"))
        self.prompt_tokens = Counter("rayquant_prompt_tokens", "Prompt tokens of accepted calls.", tag_keys=tags)
        self.generated_tokens = Counter("rayquant_generated_tokens", "Completion tokens sent.", tag_keys=tags)
        self.ttft = Histogram("rayquant_time_to_first_token_seconds",
                              "Seconds from a call's arrival at the replica to its first token.",
                              boundaries=LATENCY_BOUNDARIES_S, tag_keys=tags)
        self.decode_rate = Histogram("rayquant_decode_tokens_per_second",
                                     "Per call: completion tokens after the first, per second of decoding.",
                                     boundaries=RATE_BOUNDARIES, tag_keys=tags)
        self.waiting = Gauge("rayquant_queue_depth", "Calls in this replica waiting for their first token.",
                             tag_keys=("engine",))
        self.in_flight = Gauge("rayquant_requests_in_flight", "Calls this replica is working on.",
                               tag_keys=("engine",))
        self.engine = engine
        self._waiting = self._in_flight = 0
        self._set_gauges()

    def _set_gauges(self) -> None:
        self.waiting.set(self._waiting, tags={"engine": self.engine})
        self.in_flight.set(self._in_flight, tags={"engine": self.engine})

    def call(self, method: str) -> "CallMetrics":
        return CallMetrics(self, method)


class CallMetrics:
    """The metrics of one call; `finished` is idempotent so it can run in a `finally`."""

    def __init__(self, metrics: ServingMetrics, method: str) -> None:
        self.m, self.tags = metrics, {"engine": metrics.engine, "method": method}
        self.arrived = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0
        self.done = False
        metrics._waiting += 1
        metrics._in_flight += 1
        metrics._set_gauges()

    def accepted(self, prompt_tokens: int) -> None:
        self.m.prompt_tokens.inc(prompt_tokens, tags=self.tags)

    def tokens_sent(self, count: int) -> None:
        if count and self.first is None:
            self.first = time.perf_counter()
            self.m.ttft.observe(self.first - self.arrived, tags=self.tags)
            self.m._waiting -= 1
            self.m._set_gauges()
        self.tokens += count
        if count:
            self.m.generated_tokens.inc(count, tags=self.tags)

    def finished(self, code: str) -> None:
        if self.done:
            return
        self.done = True
        if self.first is None:
            self.m._waiting -= 1
        elif self.tokens > 1:
            seconds = time.perf_counter() - self.first
            if seconds > 0:
                self.m.decode_rate.observe((self.tokens - 1) / seconds, tags=self.tags)
        self.m._in_flight -= 1
        self.m._set_gauges()
        self.m.requests.inc(tags={**self.tags, "code": code})
