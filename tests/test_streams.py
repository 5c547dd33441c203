"""The streamed data path when a stream between two stages breaks: real gRPC servers on loopback sockets."""

from __future__ import annotations

import queue
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health

from splitllm.bench.runtimes import free_port_block
from splitllm.protos import stage_pb2, stage_pb2_grpc
from splitllm.services.common.grpc_util import CHANNEL_OPTIONS
from splitllm.services.common.manifest import load_manifest
from splitllm.services.common.streams import OutStream
from splitllm.services.coordinator.remote import RemotePipeline, _Pending
from splitllm.services.stage.server import StageServicer, serve_stage


def dead_address() -> str:
    """A loopback port nobody listens on."""
    return f"127.0.0.1:{free_port_block(1)}"


def settle(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def feeding_threads() -> int:
    """Threads inside an OutStream's request generator (gRPC's request-consuming thread of a call)."""
    def inside(frame) -> bool:
        while frame is not None:
            if frame.f_code is OutStream._requests.__code__:
                return True
            frame = frame.f_back
        return False
    return sum(inside(f) for f in sys._current_frames().values())


def test_out_stream_breaks_each_time_its_receiver_is_gone_without_blocking_or_leaking_threads():
    """The receiver stops (three times) while the stream is open; then later sends each try a new call. Once
    the channel has failed, a new call fails at once and gRPC runs the done-callback inside send(): this used
    to deadlock on the stream's lock (found as a wedged stage after its neighbour restarted)."""
    server, port = serve_stage(StageServicer(None), "127.0.0.1:0", health.HealthServicer(), ttl=60)
    addr = f"127.0.0.1:{port}"
    breaks: queue.SimpleQueue = queue.SimpleQueue()
    with grpc.insecure_channel(addr, CHANNEL_OPTIONS) as ch:
        out = OutStream(stage_pb2_grpc.StageStub(ch), addr, on_break=lambda a, _: breaks.put(a))
        for step in range(1, 4):
            if step > 1:
                server, _ = serve_stage(StageServicer(None), addr, health.HealthServicer(), ttl=60)
            grpc.channel_ready_future(ch).result(timeout=10)  # else the call may fail on the last backoff
            out.send(stage_pb2.ForwardRequest(step_id=step))  # a live call (the loading stage fails the step)
            assert settle(lambda: feeding_threads() == 1), feeding_threads()  # gRPC's thread waits for requests
            server.stop(None)
            assert breaks.get(timeout=10) == addr
        for step in range(4, 12):
            sender = threading.Thread(target=out.send, args=(stage_pb2.ForwardRequest(step_id=step),), daemon=True)
            sender.start()
            sender.join(5)
            assert not sender.is_alive(), f"send of step {step} blocked"
            assert breaks.get(timeout=10) == addr
        assert settle(lambda: feeding_threads() == 0), f"{feeding_threads()} broken calls' threads are left waiting"


@pytest.fixture
def loading_stages(smollm2_artifacts):
    """The default model's four stage servers while they load (no runtime yet): Results streams work."""
    manifest, _ = load_manifest(smollm2_artifacts, verify=[])
    stages = []
    for _ in range(manifest.num_stages):
        servicer = StageServicer(None)
        server, port = serve_stage(servicer, "127.0.0.1:0", health.HealthServicer(), ttl=60)
        stages.append((servicer, server, f"127.0.0.1:{port}"))
    yield [(servicer, addr) for servicer, _, addr in stages]
    for _, server, _ in stages:
        server.stop(None)


def test_a_broken_stream_between_stages_fails_the_steps_of_the_coordinators_that_used_it(
        smollm2_artifacts, loading_stages):
    """Steps sent on a stream that broke may be lost anywhere downstream, with every stage still alive: the
    stage tells the coordinators whose steps went on it (step_id 0 with a code), and they fail their steps
    in flight at once. A coordinator that sent nothing on that stream keeps its steps."""
    manifest, sha = load_manifest(smollm2_artifacts, verify=[])
    addrs = [addr for _, addr in loading_stages]
    sender, bystander = RemotePipeline(manifest, sha, addrs), RemotePipeline(manifest, sha, addrs)
    try:
        assert all(ev.wait(10) for remote in (sender, bystander) for ev in remote.subscribed)
        in_flight, other = _Pending(), _Pending()
        with sender.cv:
            sender.pending[7] = {"s": in_flight}
        with bystander.cv:
            bystander.pending[7] = {"s": other}
        lost = dead_address()
        loading_stages[1][0].downstream.stream(lost, None).send(
            stage_pb2.ForwardRequest(step_id=7, reply_to=sender.subscriber_id))
        assert in_flight.event.wait(10)
        assert in_flight.error is not None and in_flight.error.code == grpc.StatusCode.UNAVAILABLE
        assert addrs[1] in in_flight.error.message and lost in in_flight.error.message
        assert all(ev.is_set() for ev in sender.subscribed)  # the stages themselves are still there
        assert not other.event.wait(0.5)
    finally:
        sender.close()
        bystander.close()
