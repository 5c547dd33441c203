"""Prometheus metrics of the coordinator and the stages, each on its own registry.

prometheus-client has no constant labels, so the fixed labels of a process (stage, replica) are bound
once here: attributes are ready-to-use children, and where one label with a known set of values remains
(mode, status, finish reason) the attribute is a dict keyed by that value, e.g.
``m.forward_seconds["token"].observe(dt)`` or ``m.requests["ok"].inc()``. All those children exist from
the start, so every series is exported (at zero) before its first event.
"""

from __future__ import annotations

from typing import Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

# 1 ms to 60 s, roughly log-spaced: resolves a token step on an NPU as well as a long CPU prefill.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

MODES = ("prompt", "token")
STATUSES = ("ok", "cancelled", "deadline", "invalid", "unavailable", "exhausted")
FINISH_REASONS = ("stop", "length", "context")  # FinishReason in coordinator.proto, lower case
# Error codes a stage can return (DESIGN.md "Errors"), exported at zero so rate() sees the first one.
ERROR_CODES = tuple(grpc.StatusCode[c] for c in (
    "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED",
    "INTERNAL"))


class KVFigures(Protocol):
    """What the KV gauges read (services/stage/kv.py's KVPool)."""

    @property
    def in_use(self) -> int: ...
    @property
    def bytes_in_use(self) -> int: ...
    @property
    def bytes_capacity(self) -> int: ...


def _latency(name: str, doc: str, registry: CollectorRegistry, labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(name, doc, labels, registry=registry, buckets=LATENCY_BUCKETS)


class CoordinatorMetrics:
    """Request-level figures: one Generate call is one request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        requests = Counter("splitllm_requests_total", "Generate requests by final status", ["status"],
                           registry=registry)
        self.requests = {s: requests.labels(status=s) for s in STATUSES}
        finished = Counter("splitllm_finish_reason_total", "Completed generations by finish reason",
                           ["reason"], registry=registry)
        self.finish_reasons = {r: finished.labels(reason=r) for r in FINISH_REASONS}
        self.ttft_seconds = _latency("splitllm_time_to_first_token_seconds",
                                     "Request arrival to the first token sent", registry)
        self.inter_token_seconds = _latency("splitllm_inter_token_latency_seconds",
                                            "Time between consecutive tokens of one stream", registry)
        self.tpot_seconds = _latency("splitllm_time_per_output_token_seconds",
                                     "Per request: time after the first token / (generated tokens - 1)",
                                     registry)
        self.request_seconds = _latency("splitllm_request_duration_seconds",
                                        "End-to-end request latency", registry)
        self.queue_seconds = _latency("splitllm_request_queue_seconds",
                                      "Request arrival to the first stage call", registry)
        self.prompt_tokens = Counter("splitllm_prompt_tokens_total", "Prompt tokens processed",
                                     registry=registry)
        self.generated_tokens = Counter("splitllm_generated_tokens_total", "Tokens generated",
                                        registry=registry)
        drafts = Counter("splitllm_draft_tokens_total", "Speculative decoding's guesses, by whether the sampler kept "
                         "them", ["outcome"], registry=registry)
        self.draft_tokens = {o: drafts.labels(outcome=o) for o in ("accepted", "rejected")}
        self.running = Gauge("splitllm_requests_running",
                             "Requests holding a slot: generating, or releasing their session on the stages",
                             registry=registry)
        self.waiting = Gauge("splitllm_requests_waiting", "Requests waiting for admission or capacity",
                             registry=registry)


class StageMetrics:
    """Figures of one stage replica; every series carries its stage and replica labels."""

    def __init__(self, registry: CollectorRegistry, stage: int, replica: str) -> None:
        own = {"stage": str(stage), "replica": replica}
        base = ["stage", "replica"]

        def per_mode(metric: Histogram) -> dict[str, Histogram]:
            return {m: metric.labels(mode=m, **own) for m in MODES}

        self.forward_seconds = per_mode(_latency(
            "splitllm_stage_forward_seconds", "Forward of one batch through this stage's graph",
            registry, (*base, "mode")))
        self.hop_seconds = per_mode(_latency(
            "splitllm_stage_hop_seconds", "Time spent sending a batch's outputs downstream",
            registry, (*base, "mode")))
        self.batch_size = per_mode(Histogram(
            "splitllm_stage_batch_size", "Session entries per Forward batch", [*base, "mode"],
            registry=registry, buckets=BATCH_BUCKETS))
        self.sessions_active = Gauge(
            "splitllm_stage_sessions_active", "Sessions holding KV on this stage", base,
            registry=registry).labels(**own)
        self.kv_used_bytes = Gauge(
            "splitllm_stage_kv_cache_used_bytes", "KV cache bytes in use", base,
            registry=registry).labels(**own)
        self.kv_capacity_bytes = Gauge(
            "splitllm_stage_kv_cache_capacity_bytes", "KV cache pool size in bytes", base,
            registry=registry).labels(**own)
        self.kv_usage_ratio = Gauge(
            "splitllm_stage_kv_cache_usage_ratio", "KV cache bytes in use / capacity", base,
            registry=registry).labels(**own)
        self.received_bytes = Counter(
            "splitllm_stage_received_bytes_total", "Request payload bytes received", base,
            registry=registry).labels(**own)
        self.sent_bytes = Counter(
            "splitllm_stage_sent_bytes_total", "Payload bytes sent (downstream or as replies)", base,
            registry=registry).labels(**own)
        self.kv_slot_moves = Counter(
            "splitllm_stage_kv_slot_moves_total", "Sessions moved to another KV slot to sit next to their decode "
            "batch (steady groups move rarely)", base, registry=registry).labels(**own)
        self.sessions_expired = Counter(
            "splitllm_stage_sessions_expired_total", "Idle sessions released by TTL", base,
            registry=registry).labels(**own)
        self._errors = Counter(
            "splitllm_stage_errors_total", "RPCs and batch entries that ended in an error, by gRPC status code",
            [*base, "code"], registry=registry)
        self._own = own
        for code in ERROR_CODES:
            self._errors.labels(code=code.name, **own)

    def watch_kv(self, kv: KVFigures) -> None:
        """The KV gauges read the pool when they are scraped: always current, and nothing to set on a step."""
        self.sessions_active.set_function(lambda: kv.in_use)
        self.kv_used_bytes.set_function(lambda: kv.bytes_in_use)
        self.kv_capacity_bytes.set_function(lambda: kv.bytes_capacity)
        self.kv_usage_ratio.set_function(lambda: kv.bytes_in_use / kv.bytes_capacity if kv.bytes_capacity else 0.0)

    def error(self, code: grpc.StatusCode) -> None:
        """Count one RPC that ended with ``code`` (any code; the usual ones are pre-created)."""
        self._errors.labels(code=code.name, **self._own).inc()


def set_build_info(registry: CollectorRegistry, version: str, manifest_sha256: str, backend: str,
                   stage: int | None) -> None:
    """Export splitllm_build_info; stage None (the coordinator) leaves the stage label empty."""
    Info("splitllm_build", "Build and artifact of this process", registry=registry).info({
        "version": version, "manifest_sha256": manifest_sha256, "backend": backend,
        "stage": "" if stage is None else str(stage)})


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> WSGIServer:
    """Serve /metrics in a daemon thread; port 0 picks a free port (see ``server.server_port``).

    Stop it with ``server.shutdown(); server.server_close()``.
    """
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server

