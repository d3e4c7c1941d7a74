"""Prometheus metrics of a replica, with vLLM's names and meanings, for both engines.

Exported through Ray's metrics agent (ray.util.metrics) on each node's metrics port (`ray start
--metrics-export-port`, or the serve config's `metrics_port` for the local Ray `rayquant serve` starts). Ray
prefixes `ray_` and, as for vLLM's own metrics under Ray Serve LLM, names are vLLM's with `:` as `_`:
`ray_vllm_time_to_first_token_seconds`, `ray_vllm_num_requests_running`, … — what dashboards and inference
gateways made for vLLM chart. Every metric is labelled `model_name` and `engine` (vllm / transformers);
`rayquant_requests` adds the API method and its status code.
"""

from __future__ import annotations

import time

from ray.util.metrics import Counter, Gauge, Histogram

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0]
E2E_BUCKETS_S = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0]
METRIC_NAMES = ("vllm_time_to_first_token_seconds", "vllm_inter_token_latency_seconds",
                "vllm_e2e_request_latency_seconds", "vllm_num_requests_running", "vllm_num_requests_waiting",
                "vllm_prompt_tokens", "vllm_generation_tokens", "vllm_kv_cache_usage_perc", "rayquant_requests")


class ServingMetrics:
    """One per replica. Per request: `call` → `accepted` → `tokens_sent` (per output) → `finished` (once)."""

    def __init__(self, engine: str, model_name: str) -> None:
        tags = ("model_name", "engine")
        self.tags = {"model_name": model_name, "engine": engine}
        self.ttft = Histogram("vllm_time_to_first_token_seconds", "Seconds from a request's arrival to its first "
                              "token.", boundaries=TTFT_BUCKETS_S, tag_keys=tags)
        self.itl = Histogram("vllm_inter_token_latency_seconds", "Seconds between successive output tokens of a "
                             "request.", boundaries=ITL_BUCKETS_S, tag_keys=tags)
        self.e2e = Histogram("vllm_e2e_request_latency_seconds", "Seconds from a request's arrival to its last "
                             "token (finished requests).", boundaries=E2E_BUCKETS_S, tag_keys=tags)
        self.running = Gauge("vllm_num_requests_running", "Requests producing tokens on this replica.",
                             tag_keys=tags)
        self.waiting = Gauge("vllm_num_requests_waiting", "Requests accepted by this replica, waiting for their "
                             "first token.", tag_keys=tags)
        self.prompt_tokens = Counter("vllm_prompt_tokens", "Prompt tokens of accepted requests.", tag_keys=tags)
        self.generation_tokens = Counter("vllm_generation_tokens", "Generated tokens sent.", tag_keys=tags)
        self.kv_cache_usage = Gauge("vllm_kv_cache_usage_perc", "Fraction of the KV cache in use (0-1; engines "
                                    "with a fixed cache: vllm).", tag_keys=tags)
        self.requests = Counter("rayquant_requests", "Requests by API method and status code.",
                                tag_keys=(*tags, "method", "code"))
        self._waiting = self._running = 0
        self._set_gauges()

    def _set_gauges(self) -> None:
        self.waiting.set(self._waiting, tags=self.tags)
        self.running.set(self._running, tags=self.tags)

    def set_kv_cache_usage(self, fraction: float) -> None:
        self.kv_cache_usage.set(fraction, tags=self.tags)

    def call(self, method: str) -> "CallMetrics":
        return CallMetrics(self, method)


class CallMetrics:
    """The metrics of one request; `finished` is idempotent so it can run in a `finally`."""

    def __init__(self, metrics: ServingMetrics, method: str) -> None:
        self.m, self.method = metrics, method
        self.arrived = time.perf_counter()
        self.last: float | None = None  # when the latest token was sent
        self.admitted = self.done = False

    def accepted(self, prompt_tokens: int) -> None:
        self.admitted = True
        self.m._waiting += 1
        self.m._set_gauges()
        self.m.prompt_tokens.inc(prompt_tokens, tags=self.m.tags)

    def tokens_sent(self, count: int) -> None:
        if not count:
            return
        now = time.perf_counter()
        if self.last is None:
            self.m.ttft.observe(now - self.arrived, tags=self.m.tags)
            self.m._waiting -= 1
            self.m._running += 1
            self.m._set_gauges()
        else:
            for _ in range(count):
                self.m.itl.observe((now - self.last) / count, tags=self.m.tags)
        self.last = now
        self.m.generation_tokens.inc(count, tags=self.m.tags)

    def finished(self, code: str) -> None:
        if self.done:
            return
        self.done = True
        if self.admitted:
            if self.last is None:
                self.m._waiting -= 1
            else:
                self.m._running -= 1
            self.m._set_gauges()
        if code == "OK":
            self.m.e2e.observe(time.perf_counter() - self.arrived, tags=self.m.tags)
        self.m.requests.inc(tags={**self.m.tags, "method": self.method, "code": code})
