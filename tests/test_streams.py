"""The streamed data path (breaks between stages, decode batches): real gRPC servers on loopback sockets."""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1.health import aio as health_aio

from splitllm.bench.runtimes import free_port_block
from splitllm.protos import stage_pb2, stage_pb2_grpc
from splitllm.services.common.errors import ServiceError
from splitllm.services.common.grpc_util import CHANNEL_OPTIONS
from splitllm.services.common.manifest import load_manifest
from splitllm.services.common.streams import OutStream, Subscribers, after_sent
from splitllm.services.common.tensor import to_proto
from splitllm.services.coordinator import remote as remote_module
from splitllm.services.coordinator.remote import RemotePipeline, _Pending
from splitllm.services.stage.runtime import StageRuntime
from splitllm.services.stage.server import LOOP_STALL, StageServicer, serve_stage


class LoopThread:
    """An event loop in a thread of its own, where the tests' stage servers (grpc.aio) run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stage-servers", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def serve(self, servicer: StageServicer, listen: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
        return self.run(serve_stage(servicer, listen, health_aio.HealthServicer(), ttl=60))

    def stop(self, server: grpc.aio.Server) -> None:
        self.run(server.stop(None))


@pytest.fixture(scope="module")
def stages() -> LoopThread:
    return LoopThread()


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


def test_out_stream_breaks_each_time_its_receiver_is_gone_without_blocking_or_leaking_threads(stages):
    """The receiver stops (three times) while the stream is open; then later sends each try a new call. Once
    the channel has failed, a new call fails at once and gRPC runs the done-callback inside send(): this used
    to deadlock on the stream's lock (found as a wedged stage after its neighbour restarted)."""
    server, port = stages.serve(StageServicer(None))
    addr = f"127.0.0.1:{port}"
    breaks: queue.SimpleQueue = queue.SimpleQueue()
    with grpc.insecure_channel(addr, CHANNEL_OPTIONS) as ch:
        out = OutStream(stage_pb2_grpc.StageStub(ch), addr, on_break=lambda a, _: breaks.put(a))
        for step in range(1, 4):
            if step > 1:
                server, _ = stages.serve(StageServicer(None), addr)
            grpc.channel_ready_future(ch).result(timeout=10)  # else the call may fail on the last backoff
            out.send(stage_pb2.ForwardRequest(step_id=step))  # a live call (the loading stage fails the step)
            assert settle(lambda: feeding_threads() == 1), feeding_threads()  # gRPC's thread waits for requests
            stages.stop(server)
            assert breaks.get(timeout=10) == addr
        for step in range(4, 12):
            sender = threading.Thread(target=out.send, args=(stage_pb2.ForwardRequest(step_id=step),), daemon=True)
            sender.start()
            sender.join(5)
            assert not sender.is_alive(), f"send of step {step} blocked"
            assert breaks.get(timeout=10) == addr
        assert settle(lambda: feeding_threads() == 0), f"{feeding_threads()} broken calls' threads are left waiting"


def test_a_stopping_stage_ends_its_streams_to_the_next_as_finished_streams(stages):
    """At shutdown a stage ends its streams to the next stages as a finished stream ends: the next stage's handler
    returns its summary, and no break is reported (at a pipeline's stop every stage stops at once)."""
    upstream, downstream = StageServicer(None), StageServicer(None)
    server, port = stages.serve(downstream)
    addr, breaks = f"127.0.0.1:{port}", []
    upstream.downstream.on_break = lambda address, _: breaks.append(address)
    stages.run(upstream.downstream.send(addr, stage_pb2.ForwardRequest(step_id=1, reply_to="coordinator")))
    call = upstream.downstream.calls[addr]

    async def summary() -> stage_pb2.ForwardStreamSummary:
        return await call

    stages.run(upstream.downstream.close())
    assert stages.run(summary(), timeout=10).steps == 1
    assert settle(lambda: not upstream.downstream.calls) and not upstream.downstream.reports and breaks == []
    stages.stop(server)


@pytest.fixture
def loading_stages(smollm2_artifacts, stages):
    """The default model's four stage servers while they load (no runtime yet): Results streams work."""
    manifest, _ = load_manifest(smollm2_artifacts, verify=[])
    servers = []
    for _ in range(manifest.num_stages):
        servicer = StageServicer(None)
        server, port = stages.serve(servicer)
        servers.append((servicer, server, f"127.0.0.1:{port}"))
    yield [(servicer, addr) for servicer, _, addr in servers]
    for _, server, _ in servers:
        stages.stop(server)


def test_a_broken_stream_between_stages_fails_the_steps_of_the_coordinators_that_used_it(
        smollm2_artifacts, loading_stages, stages):
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
        stages.run(loading_stages[1][0].downstream.send(
            lost, stage_pb2.ForwardRequest(step_id=7, reply_to=sender.subscriber_id)))
        assert in_flight.event.wait(10)
        assert in_flight.error is not None and in_flight.error.code == grpc.StatusCode.UNAVAILABLE
        assert addrs[1] in in_flight.error.message and lost in in_flight.error.message
        assert all(ev.is_set() for ev in sender.subscribed)  # the stages themselves are still there
        assert not other.event.wait(0.5)
    finally:
        sender.close()
        bystander.close()


@pytest.fixture
def tiny_remote(tiny_artifacts, stages):
    """The tiny model's two stages serving on loopback, a RemotePipeline over them, and each stage's batches
    (the session ids of every forward_many call)."""
    manifest, sha = load_manifest(tiny_artifacts, verify=[])
    servers, addrs, calls = [], [], []
    for k in range(manifest.num_stages):
        rt = StageRuntime(tiny_artifacts, k, kv_capacity=4, threads=1)
        seen: list[list[str]] = []

        def spy(entries, run=rt.forward_many, seen=seen):
            seen.append([e.session_id for e in entries])
            return run(entries)

        rt.forward_many = spy
        server, port = stages.serve(StageServicer(rt))
        servers.append(server)
        addrs.append(f"127.0.0.1:{port}")
        calls.append(seen)
    remote = RemotePipeline(manifest, sha, addrs)
    assert all(ev.wait(10) for ev in remote.subscribed)
    yield remote, calls
    remote.close()
    for server in servers:
        stages.stop(server)


def test_a_group_goes_out_as_one_batch_and_a_bad_entry_fails_alone(tiny_remote):
    """Sessions answered together come back together: their next steps wait for each other and go out as one
    request, which each stage runs as one batch. An entry that fails (unknown session) fails alone."""
    remote, calls = tiny_remote
    for sid in ("a", "b"):
        remote.prefill(sid, np.array([1, 2, 3], np.int32), 1)
    remote.batches_in_flight = 1  # (2 would split the three into two batches in flight at once)
    with remote.cv:
        remote.expected.update({"a", "b", "ghost"})  # as if one batch had just answered all three
        remote.expected_since = time.monotonic() + 60  # no timeout in this test
    pending = {sid: remote.submit(sid, 3, np.array([4], np.int32), 1) for sid in ("a", "ghost", "b")}
    a, b = pending["a"](), pending["b"]()
    assert a.ids.shape == (1,) and b.ids.shape == (1,)
    with pytest.raises(ServiceError) as e:
        pending["ghost"]()
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "ghost" in e.value.message
    assert calls[0][-1] == ["a", "ghost", "b"] and calls[1][-1] == ["a", "b"]  # one request, the ghost dropped
    assert remote.submit("a", 4, np.array([5], np.int32), 1)().ids.shape == (1,)  # a single step goes at once


def test_a_late_member_does_not_hold_its_group(tiny_remote, monkeypatch):
    """A session of the group that does not come back (its client is slow, it finished without a release yet)
    holds the others for GROUP_WAIT at most."""
    remote, calls = tiny_remote
    monkeypatch.setattr(remote_module, "GROUP_WAIT", 0.05)
    remote.prefill("a", np.array([1, 2, 3], np.int32), 1)
    with remote.cv:
        remote.expected.update({"a", "late"})
        remote.expected_since = time.monotonic()
    t0 = time.monotonic()
    assert remote.submit("a", 3, np.array([4], np.int32), 1)().ids.shape == (1,)
    assert time.monotonic() - t0 < 5 and calls[0][-1] == ["a"]


def test_two_batches_in_flight_share_the_sessions_evenly(tiny_remote):
    remote, calls = tiny_remote
    sessions = ["a", "b", "c", "d"]
    for sid in sessions:
        remote.prefill(sid, np.array([1, 2, 3], np.int32), 1)
    with remote.cv:
        remote.expected.update(sessions)
        remote.expected_since = time.monotonic() + 60
    pending = [remote.submit(sid, 3, np.array([4], np.int32), 1) for sid in sessions]
    assert all(p().ids.shape == (1,) for p in pending)
    assert calls[1][-2:] == [["a", "b"], ["c", "d"]]


def test_prompt_chunks_go_out_a_window_at_a_time_while_others_decode(tiny_remote):
    remote, calls = tiny_remote
    tokens = np.arange(1, 61, dtype=np.int32)  # 4 chunks of 16 (2 stages, prefill 16)
    order: list[str] = []
    send, wait = remote._send, remote._wait
    remote._send = lambda *args: order.append("send") or send(*args)
    remote._wait = lambda p: order.append("wait") or wait(p)
    alone = remote.prefill("alone", tokens, 1)
    assert order == ["send"] * 4 + ["wait"] * 4  # nobody else decodes: every chunk at once
    order.clear()
    with remote.cv:
        remote.expected.add("other")  # another session is decoding
    windowed = remote.prefill("windowed", tokens, 1)
    assert order == ["send", "send", "wait", "send", "wait", "send", "wait", "wait"]  # 2 in flight at most
    assert np.array_equal(alone.ids, windowed.ids)


def test_release_confirms_when_every_stage_has_answered_even_after_close(tiny_remote):
    """release() returns at once; `then` runs once every stage has freed the session, and still runs (with a
    warning) when the pipeline was closed first, so a request's slot is never lost."""
    remote, _ = tiny_remote
    remote.prefill("r", np.array([1, 2, 3], np.int32), 1)
    confirmed = threading.Event()
    remote.release("r", then=confirmed.set)
    assert confirmed.wait(10) and remote.wait_releases(0)
    for address in remote.route:
        with grpc.insecure_channel(address) as ch:
            assert stage_pb2_grpc.StageStub(ch).Info(stage_pb2.InfoRequest()).sessions_in_use == 0
    remote.prefill("late", np.array([1, 2, 3], np.int32), 1)
    remote.close()
    late: list[bool] = []
    remote.release("late", then=lambda: late.append(True))
    assert late == [True] and remote.wait_releases(0)


def test_a_last_step_frees_its_session_on_every_stage_and_release_then_calls_none(tiny_remote):
    """ForwardEntry.release: each stage frees the session once its last step has run there, so release()
    confirms at once without a call (4 fewer RPCs a request on the default split). A last step that fails
    leaves the session where it failed and after, and release() then calls every stage as usual."""
    remote, _ = tiny_remote

    def in_use() -> list[int]:
        out = []
        for address in remote.route:
            with grpc.insecure_channel(address) as ch:
                out.append(stage_pb2_grpc.StageStub(ch).Info(stage_pb2.InfoRequest()).sessions_in_use)
        return out

    released: list[str] = []

    def counted(real):
        def future(req, timeout=None):
            released.append(req.session_id)
            return real.future(req, timeout=timeout)
        return SimpleNamespace(future=future)

    for stub in remote.stubs:  # count the Release calls the pipeline makes
        stub.Release = counted(stub.Release)
    prompt = np.array([1, 2, 3], np.int32)

    remote.prefill("first-token-only", prompt, 1, last=True)  # max_tokens 1: the prompt is the last step
    remote.prefill("decoded", prompt, 1)
    assert remote.submit("decoded", 3, np.array([4], np.int32), 1, last=True)().ids.shape == (1,)
    deadline = time.monotonic() + 2  # a stage frees them once the step has gone on: just after it has sent it
    while in_use() != [0, 0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert in_use() == [0, 0]
    confirmed: list[str] = []
    for sid in ("first-token-only", "decoded"):
        remote.release(sid, then=lambda sid=sid: confirmed.append(sid))
    assert confirmed == ["first-token-only", "decoded"] and released == [] and remote.wait_releases(0)

    remote.prefill("failed", prompt, 1)
    with pytest.raises(ServiceError) as e:
        remote.submit("failed", 7, np.array([4], np.int32), 1, last=True)()  # the session is at position 3
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert in_use() == [1, 1]
    done = threading.Event()
    remote.release("failed", then=done.set)
    assert done.wait(10) and released == ["failed", "failed"] and in_use() == [0, 0]


def test_a_prompt_step_runs_on_the_event_loop_unless_it_would_hold_it_for_long(tiny_artifacts):
    """Token steps and prompt steps expected to take less than LOOP_STALL (at the last prompt step's speed a row)
    run on the loop's thread; the first prompt step and longer ones run in the prompt worker, so that the loop
    goes on answering health checks meanwhile, and so do the steps that come while the worker has one."""
    rt = StageRuntime(tiny_artifacts, 0, kv_capacity=8, threads=1)
    ran_in: list[str] = []
    gate = threading.Event()
    run = rt.forward_many

    def spy(entries):
        ran_in.append(threading.current_thread().name)
        if entries[0].session_id == "slow":
            assert gate.wait(10)
        return run(entries)

    rt.forward_many = spy
    servicer = StageServicer(rt)

    def step(session_id: str, position: int, tokens: list[int]) -> stage_pb2.ForwardRequest:
        request = stage_pb2.ForwardRequest(route=["127.0.0.1:1"], step_id=1)
        entry = request.entries.add(session_id=session_id, position=position, num_tokens=len(tokens))
        to_proto(np.array(tokens, np.int32), entry.input)
        return request

    async def steps() -> None:
        for request, row_seconds in ((step("a", 0, [1, 2, 3]), None), (step("a", 3, [4]), None),
                                     (step("b", 0, [1, 2, 3, 4]), None),
                                     (step("c", 0, [1, 2, 3, 4]), LOOP_STALL / 4),
                                     (step("d", 0, [1, 2, 3]), LOOP_STALL / 4)):
            if row_seconds is not None:  # as if the last prompt step had run at that speed
                servicer.row_seconds = row_seconds
            answer, onward, _ = await servicer._run(request)
            assert answer is None and len(onward.entries) == 1
        servicer.row_seconds = float("inf")
        slow = asyncio.ensure_future(servicer._run(step("slow", 0, [1, 2, 3])))
        await asyncio.sleep(0.1)
        token = asyncio.ensure_future(servicer._run(step("a", 4, [5])))
        await asyncio.sleep(0.1)  # the loop is free: the token step waits in the worker's queue, not on the lock
        assert not token.done() and ran_in[-1] == "prompt-steps_0"
        gate.set()
        assert len((await slow)[1].entries) == len((await token)[1].entries) == 1

    asyncio.run(steps())
    loop, worker = threading.current_thread().name, "prompt-steps_0"
    assert ran_in == [worker, loop, loop, worker, loop, worker, worker]


def test_work_after_a_message_runs_once_it_is_sent_or_the_stream_ends():
    """AFTER_SENT (streams.py): a stage's metrics and the freeing of finished sessions run once gRPC resumes the
    Results stream after sending the message (or, on the coordinator's stream to stage 1, asks for the next one),
    and still run when the stream ends first."""
    ran: list[int] = []

    async def results_stream() -> None:
        subs = Subscribers()
        results = subs.stream("coordinator")
        assert (await anext(results)).step_id == 0
        for step in (1, 2):
            subs.push("coordinator", stage_pb2.ForwardResponse(step_id=step), lambda step=step: ran.append(step))
            assert (await anext(results)).step_id == step and ran == list(range(1, step))  # handed over, not sent
        subs.push("coordinator", stage_pb2.ForwardResponse(step_id=3), lambda: ran.append(3))
        await results.aclose()  # the call ends: the message in flight and the one queued still run theirs
        assert ran == [1, 2, 3] and "coordinator" not in subs.queues
        assert not subs.push("gone", stage_pb2.ForwardResponse(step_id=4), lambda: ran.append(4)) and ran[-1] == 4

    asyncio.run(results_stream())

    ran.clear()
    q: queue.SimpleQueue = queue.SimpleQueue()
    requests = after_sent(OutStream(None, "nowhere")._requests(q))
    for step in (1, 2):
        q.put((stage_pb2.ForwardRequest(step_id=step), time.perf_counter(), lambda step=step: ran.append(step)))
        assert next(requests).step_id == step and ran == list(range(1, step))
    requests.close()
    assert ran == [1, 2]
