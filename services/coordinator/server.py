"""The Coordinator gRPC service: a thin layer over Engine, plus health and reflection."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitllm.protos import coordinator_pb2 as pb
from splitllm.protos import coordinator_pb2_grpc as pb_grpc
from splitllm.services.common.errors import ServiceError
from splitllm.services.common.grpc_util import SERVER_OPTIONS
from splitllm.services.coordinator.engine import Engine

log = logging.getLogger("splitllm.coordinator")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name


def _abort(context: grpc.ServicerContext, e: Exception):
    if isinstance(e, ServiceError):
        context.abort(e.code, e.message)
    context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[pb.GenerateResponse]:
        # The engine counts the final status (CANCELLED, DEADLINE_EXCEEDED included) in its metrics.
        try:
            yield from self.engine.generate(request, lambda: not context.is_active(), context.time_remaining,
                                            lambda fn: context.add_callback(fn) or fn())
        except Exception as e:
            _abort(context, e)

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        try:
            return self.engine.tokenize(request)
        except Exception as e:
            _abort(context, e)

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext
                  ) -> pb.ModelInfoResponse:
        return self.engine.model_info(request)


@dataclass
class CoordinatorServer:
    """A started server, the port it bound and its health service."""

    server: grpc.Server
    port: int
    health: health.HealthServicer

    def set_serving(self, serving: bool) -> None:
        """Health of the whole server ("") and of the Coordinator service, e.g. from a stage watcher."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def serve_coordinator(engine: Engine, listen: str, max_workers: int) -> CoordinatorServer:
    """Start serving on `listen` (host:port; port 0 picks a free one), health SERVING.

    max_workers bounds concurrent RPCs: keep it above the engine's max_concurrent so queued Generate
    calls, Tokenize and ModelInfo still get a thread.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers, thread_name_prefix="coordinator"),
                         options=SERVER_OPTIONS)
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(engine), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen!r}")
    server.start()
    served = CoordinatorServer(server, port, health_servicer)
    served.set_serving(True)
    return served


def watch_stages(pipeline, served: CoordinatorServer, stop: threading.Event, period: float = 1.0) -> None:
    """Health that means progress: NOT_SERVING while any stage of the route is unreachable or not serving."""
    last = None
    while not stop.is_set():
        ok = pipeline.healthy(timeout=period)
        if ok != last:
            served.set_serving(ok)
            log.log(logging.INFO if ok else logging.WARNING, "pipeline %s", "serving" if ok else "NOT serving")
            last = ok
        stop.wait(period)


def run(artifacts: str, stages: list[str], listen: str, metrics_port: int | None = None, max_concurrent: int = 16,
        truncate_to_context: bool = False, wait_stages: float = 60.0, spread_prompts: bool = True,
        batches_in_flight: int = 2, prompt_window: int = 2, draft_tokens: int | None = None) -> None:
    """The `splitllm coordinator` process: check the stages, serve Generate until SIGTERM/SIGINT."""
    from prometheus_client import CollectorRegistry

    from splitllm.services import __version__
    from splitllm.services.common import heap
    from splitllm.services.common.grpc_util import listen_host
    from splitllm.services.common.manifest import load_manifest
    from splitllm.services.common.metrics import CoordinatorMetrics, serve_metrics, set_build_info
    from splitllm.services.coordinator.remote import RemotePipeline

    manifest, sha = load_manifest(artifacts, verify=[])  # the Engine checks the tokenizer file as it reads it
    pipeline = RemotePipeline(manifest, sha, stages, spread_prompts, batches_in_flight, prompt_window)
    pipeline.check(timeout=wait_stages)  # refuses to start on a mismatch, naming it
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    set_build_info(registry, __version__, sha, "-", None)
    http = serve_metrics(registry, metrics_port, listen_host(listen)) if metrics_port is not None else None
    engine = Engine(pipeline, metrics, truncate_to_context, artifacts=artifacts, max_concurrent=max_concurrent,
                    **({} if draft_tokens is None else {"draft_tokens": draft_tokens}))
    heap.trim()
    heap.keep_freed()
    served = serve_coordinator(engine, listen, max_workers=max_concurrent + 8)
    stop = threading.Event()
    threading.Thread(target=watch_stages, args=(pipeline, served, stop), name="stage-watch", daemon=True).start()
    log.info("coordinator serving on %s, stages %s", listen, ",".join(stages))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # Timed: a signal that the kernel hands to one of gRPC's threads runs its Python handler only once the main
    # thread runs Python again, and an untimed wait never returns to it (a third of the SIGTERMs were missed so).
    while not stop.wait(0.2):
        pass
    served.stop(grace=2)
    if not pipeline.wait_releases(timeout=5):
        log.warning("stopping with sessions not yet released on every stage (the stages expire them)")
    if http:
        http.shutdown()
