"""The Pipeline over gRPC: a route of stage addresses, one per stage, called through stage 1."""

from __future__ import annotations

import logging

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitllm.protos import stage_pb2, stage_pb2_grpc
from splitllm.services.common.errors import ServiceError, unavailable
from splitllm.services.common.grpc_util import CHANNEL_OPTIONS
from splitllm.services.common.manifest import Manifest
from splitllm.services.common.tensor import from_proto, to_proto
from splitllm.services.coordinator.pipeline import Logits

log = logging.getLogger("splitllm.coordinator")
STEP_TIMEOUT = 60.0  # a step of a live pipeline takes milliseconds; this only bounds a hung stage


class RemotePipeline:
    def __init__(self, manifest: Manifest, manifest_sha256: str, addresses: list[str]) -> None:
        if len(addresses) != manifest.num_stages:
            n = manifest.num_stages
            raise ValueError(f"--stages names {len(addresses)} addresses; the artifact has {n} stages")
        self.manifest, self.manifest_sha256 = manifest, manifest_sha256
        self.route = list(addresses)
        self.channels = [grpc.insecure_channel(a, CHANNEL_OPTIONS) for a in addresses]
        self.stubs = [stage_pb2_grpc.StageStub(c) for c in self.channels]
        self.health = [health_pb2_grpc.HealthStub(c) for c in self.channels]

    def addresses(self) -> list[str]:
        return list(self.route)

    def check(self, timeout: float = 10.0) -> None:
        """The stages serve this manifest and together cover every layer in order; ValueError otherwise."""
        expected_first = 0
        for k, (addr, stub) in enumerate(zip(self.route, self.stubs, strict=True)):
            try:
                info = stub.Info(stage_pb2.InfoRequest(), timeout=timeout, wait_for_ready=True)
            except grpc.RpcError as e:
                raise ValueError(f"stage {k + 1} at {addr} does not answer: {e.details()}") from None
            if info.manifest_sha256 != self.manifest_sha256:
                raise ValueError(f"stage {k + 1} at {addr} serves manifest {info.manifest_sha256[:12]}..., "
                                 f"not this coordinator's {self.manifest_sha256[:12]}...")
            if info.stage_index != k:
                raise ValueError(f"the address in position {k + 1} ({addr}) serves stage {info.stage_index + 1}")
            if info.first_layer != expected_first:
                raise ValueError(
                    f"stage {k + 1} at {addr} starts at layer {info.first_layer}, expected {expected_first}"
                )
            expected_first = info.last_layer
        if expected_first != self.manifest.model.num_layers:
            raise ValueError(f"the stages cover layers 0..{expected_first - 1} of {self.manifest.model.num_layers}")

    def healthy(self, timeout: float = 1.0) -> bool:
        for h in self.health:
            try:
                r = h.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError:
                return False
            if r.status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True

    def step(self, session_id: str, position: int, tokens: np.ndarray, top_k: int = 0) -> Logits:
        req = stage_pb2.ForwardRequest(route=self.route[1:])
        e = req.entries.add(session_id=session_id, position=position, num_tokens=len(tokens))
        e.logits.top_k = top_k
        to_proto(np.ascontiguousarray(tokens, np.int32), e.input)
        try:
            resp = self.stubs[0].Forward(req, timeout=STEP_TIMEOUT)
        except grpc.RpcError as err:
            raise self._error(err) from None
        r = resp.results[0]
        values = from_proto(r.logits, "logits")
        return Logits(values, from_proto(r.token_ids, "token_ids") if r.HasField("token_ids") else None)

    def _error(self, err: grpc.RpcError) -> ServiceError:
        code = err.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            return unavailable(f"the pipeline is unavailable: {err.details()}")
        return ServiceError(code, err.details() or code.name)

    def release(self, session_id: str) -> None:
        try:
            self.stubs[0].Release(stage_pb2.ReleaseRequest(session_id=session_id, route=self.route[1:]), timeout=5)
        except grpc.RpcError:  # stage 1 is down: release directly wherever possible
            for addr, stub in zip(self.route[1:], self.stubs[1:], strict=True):
                try:
                    stub.Release(stage_pb2.ReleaseRequest(session_id=session_id), timeout=2)
                except grpc.RpcError as e:
                    log.warning("release of %s at %s failed: %s", session_id, addr, e.code().name)

    def close(self) -> None:
        for c in self.channels:
            c.close()
