"""The Coordinator gRPC service: a thin layer over Engine, plus health and reflection."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitllm.protos import coordinator_pb2 as pb
from splitllm.protos import coordinator_pb2_grpc as pb_grpc
from splitllm.services.common.errors import ServiceError
from splitllm.services.coordinator.engine import Engine

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
            yield from self.engine.generate(request, lambda: not context.is_active(), context.time_remaining)
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
    server = grpc.server(futures.ThreadPoolExecutor(max_workers, thread_name_prefix="coordinator"))
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
