"""The stage gRPC service on grpc.aio: a thin layer over StageRuntime, plus forwarding to the next stage.

Transport (measured in bench/transport.py): long-lived ForwardStream calls. A stage runs each request's
entries and writes the hidden states on its stream to the next stage of the route; the last stage pushes
the answer (logits or their top-k) to the Results stream that the request's coordinator holds open.
Forward is the unary form of a step (tests, tools): it calls the next stage and returns its answer.
Channels and streams to downstream stages are kept open and reused.

One event loop does all of this. A token step runs on the loop's thread and its onward message is written from
there: gRPC's sync server woke a handler thread and then a sending thread at every hop. A step with a prompt chunk
(an entry of more than one row) runs there too when the last one says it will take less than LOOP_STALL, else in a
worker thread, so that the loop goes on answering health checks and Info (an 8B model's chunk takes seconds on a
CPU); while the worker has a step, the steps after it queue there too rather than wait for the runtime's lock on
the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from typing import NamedTuple

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from splitllm.protos import stage_pb2, stage_pb2_grpc
from splitllm.services.common import trace
from splitllm.services.common.errors import ServiceError, from_code, invalid, unavailable
from splitllm.services.common.grpc_util import CHANNEL_OPTIONS, SERVER_OPTIONS, listen_host
from splitllm.services.common.heap import proc_bytes
from splitllm.services.common.manifest import Manifest
from splitllm.services.common.metrics import StageMetrics
from splitllm.services.common.streams import Subscribers
from splitllm.services.common.tensor import from_proto, to_proto
from splitllm.services.common.topk import top_k_rows
from splitllm.services.stage import cpu_kernels
from splitllm.services.stage.runtime import Entry, StageRuntime

log = logging.getLogger("splitllm.stage")
SERVICE_NAME = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name
LOOP_STALL = 0.05  # s: the longest a prompt step is expected to take and still run on the event loop
Step = tuple["stage_pb2.ForwardResponse | None", "stage_pb2.ForwardRequest | None", "_After"]


class Downstream:
    """Open channels and data streams to next stages, by address; used on the server's event loop only."""

    def __init__(self, on_break: Callable[[str, set[str]], None] | None = None) -> None:
        """`on_break(address, reply_to)`: the stream to `address` ended; reply_to holds its requests' reply_to."""
        self.on_break = on_break
        self.stubs: dict[str, stage_pb2_grpc.StageStub] = {}
        self.calls: dict[str, aio.StreamUnaryCall] = {}
        self.reply_to: dict[str, set[str]] = {}  # of the requests written on each address's current call
        self.reports: set[asyncio.Task] = set()
        self.closing = False

    def stub(self, address: str) -> stage_pb2_grpc.StageStub:
        s = self.stubs.get(address)
        if s is None:
            s = self.stubs[address] = stage_pb2_grpc.StageStub(aio.insecure_channel(address, CHANNEL_OPTIONS))
        return s

    async def send(self, address: str, request: stage_pb2.ForwardRequest) -> None:
        """Write `request` on the stream to `address` (a new call once the last one ended); returns when gRPC has
        sent it. A call that ends reports itself (on_break), so a failed write is only logged here."""
        call = self.calls.get(address)
        if call is None:
            call = self.calls[address] = self.stub(address).ForwardStream()
            self.reply_to[address] = set()
            call.add_done_callback(partial(self._ended, address))
        self.reply_to[address].add(request.reply_to)
        try:
            await call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError) as err:
            log.debug("step %d to %s not sent: %s", request.step_id, address, err)

    async def close(self) -> None:
        """At shutdown: end the streams to next stages as a finished stream ends (their handlers return), and
        report no break from here on: at a pipeline's stop every stage stops at once."""
        self.closing = True
        for call in list(self.calls.values()):
            with suppress(grpc.RpcError, asyncio.InvalidStateError):
                await call.done_writing()

    def _ended(self, address: str, call: aio.StreamUnaryCall) -> None:
        if self.calls.get(address) is not call:
            return
        del self.calls[address]
        task = asyncio.get_running_loop().create_task(self._report(address, call, self.reply_to.pop(address)))
        self.reports.add(task)
        task.add_done_callback(self.reports.discard)

    async def _report(self, address: str, call: aio.StreamUnaryCall, reply_to: set[str]) -> None:
        code = await call.code()
        if code != grpc.StatusCode.OK and not self.closing:
            log.warning("stream to %s broke: %s", address, code.name)
            if self.on_break:
                self.on_break(address, reply_to)


def step_mode(request: stage_pb2.ForwardRequest) -> str:
    """The metrics label of a step: prompt (an entry of more than one row) or token (one row, or a token with draft
    tokens after it: logits for each row)."""
    return "prompt" if any(rows(e) > 1 and e.logits.rows <= 1 for e in request.entries) else "token"


def rows(entry: stage_pb2.ForwardEntry) -> int:
    """An entry's rows: num_tokens when set (stages set it; a padded chunk has more), else its input's first dim."""
    return entry.num_tokens or (entry.input.shape[0] if entry.input.shape else 1)


def put_logits(logits: np.ndarray, k: int, out: stage_pb2.EntryResult) -> None:
    """The answer for logits [vocab], or [rows, vocab] (logits.rows > 1): the top k of each row, or all of them."""
    values, ids = top_k_rows(logits, k)
    to_proto(values, out.logits)
    if ids is not None:
        to_proto(ids, out.token_ids)


class _After(NamedTuple):
    """What a step leaves for after it has been sent on (_after: AFTER_SENT in streams.py)."""

    mode: str  # prompt or token, for the metrics
    seconds: float  # the graph runs
    entries: int  # that ran
    received: stage_pb2.ForwardRequest  # its bytes count as received
    sent: stage_pb2.ForwardRequest | stage_pb2.ForwardResponse  # onward or answer: its bytes count as sent
    free: list[str]  # sessions whose last step ran here: freeing one's KV costs ~0.2 ms (madvise, 16 buffers)


class StageServicer(stage_pb2_grpc.StageServicer):
    """`runtime` is None while the graphs load: calls then fail with UNAVAILABLE. Serves on one event loop."""

    def __init__(self, runtime: StageRuntime | None, metrics: StageMetrics | None = None) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.downstream = Downstream(self._stream_broke)
        self.subscribers = Subscribers()
        self.prompt_worker = ThreadPoolExecutor(1, thread_name_prefix="prompt-steps")
        self.in_worker = 0  # steps handed to the prompt worker and not back yet
        self.reaper: asyncio.Task | None = None  # serve_stage's (a task nothing references may be dropped)
        self.row_seconds = float("inf")  # the last prompt step's compute a row; until there is one, the worker

    @property
    def rt(self) -> StageRuntime:
        if self.runtime is None:
            raise unavailable("the stage is still loading its graphs; retry shortly")
        return self.runtime

    def _decode(self, request: stage_pb2.ForwardRequest) -> list[Entry | ServiceError]:
        if not request.entries:
            raise invalid("entries is empty: a Forward carries at least one session entry")
        if self.rt.is_last and request.route:
            raise invalid(f"route has {len(request.route)} addresses after the last stage (allowed: none)")
        if not self.rt.is_last and not request.route:
            raise invalid(f"route is empty but stage {self.rt.stage + 1} is not the last stage: name the next stages")
        entries: list[Entry | ServiceError] = []
        for i, pe in enumerate(request.entries):
            try:
                data = from_proto(pe.input, f"entries[{i}].input")
            except ServiceError as err:
                entries.append(err)
                continue
            if pe.num_tokens and data.ndim and pe.num_tokens < data.shape[0]:  # padded chunk: its valid rows run
                data = data[: pe.num_tokens]
            entries.append(Entry(pe.session_id, pe.position, data, pe.logits.rows or 1))
        return entries

    async def _run(self, request: stage_pb2.ForwardRequest) -> Step:
        """_step on the loop's thread, or in the prompt worker for a prompt step expected to take LOOP_STALL or
        more (a handover wakes the worker, then the loop: two thread wake-ups a stage that a short step saves)."""
        if not self.in_worker and (step_mode(request) == "token"
                                   or sum(map(rows, request.entries)) * self.row_seconds < LOOP_STALL):
            return self._step(request)
        self.in_worker += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.prompt_worker, self._step, request)
        finally:
            self.in_worker -= 1

    def _step(self, request: stage_pb2.ForwardRequest) -> Step:
        """Run the entries. Returns (answer, onward, after): the answer holds the last stage's results and every
        entry that failed here (None when there are neither); onward is the request for the next stage with the
        entries that ran (None when none did); pass `after` to _after once the step has been sent on. A bad
        request as a whole raises ServiceError."""
        decoded = self._decode(request)
        entries = [e for e in decoded if isinstance(e, Entry)]
        trace.event(request.step_id, "run")
        t0 = time.perf_counter()
        results = iter(self.rt.forward_many(entries))
        outs = [e if isinstance(e, ServiceError) else next(results) for e in decoded]
        seconds = time.perf_counter() - t0
        trace.event(request.step_id, "ran")
        # the entries that ran: those passed the runtime's checks (any other may lack a row dimension)
        ran = [e for e, out in zip(decoded, outs, strict=True) if not isinstance(out, ServiceError)]
        mode = "prompt" if any(e.data.shape[0] > 1 and e.logit_rows == 1 for e in ran) else "token"
        if mode == "prompt":
            self.row_seconds = seconds / sum(e.data.shape[0] for e in ran)
        answer = stage_pb2.ForwardResponse(step_id=request.step_id)
        nxt = None if self.rt.is_last else stage_pb2.ForwardRequest(
            route=request.route[1:], step_id=request.step_id, reply_to=request.reply_to)
        free = []
        for pe, out in zip(request.entries, outs, strict=True):
            if isinstance(out, ServiceError):
                if self.metrics:
                    self.metrics.error(out.code)
                answer.results.add(session_id=pe.session_id, code=out.code.value[0], message=out.message)
            elif nxt is None:
                put_logits(out, pe.logits.top_k, answer.results.add(session_id=pe.session_id))
            else:
                ne = nxt.entries.add(session_id=pe.session_id, position=pe.position, num_tokens=out.shape[0],
                                     release=pe.release)
                ne.logits.CopyFrom(pe.logits)
                to_proto(out, ne.input)
            if pe.release and not isinstance(out, ServiceError):  # its last step has run here
                free.append(pe.session_id)
        after = _After(mode, seconds, len(entries), request, answer if nxt is None else nxt, free)
        return (answer if answer.results else None), (nxt if nxt is not None and nxt.entries else None), after

    def _after(self, a: _After) -> None:
        for session_id in a.free:
            if self.in_worker:  # behind the worker's steps: the runtime's lock is theirs meanwhile
                self.prompt_worker.submit(self.rt.release, session_id)
            else:
                self.rt.release(session_id)
        if m := self.metrics:
            m.forward_seconds[a.mode].observe(a.seconds)
            m.batch_size[a.mode].observe(a.entries)
            m.received_bytes.inc(a.received.ByteSize())  # ByteSize serializes: ~30 us for a prompt chunk
            m.sent_bytes.inc(a.sent.ByteSize())

    async def Forward(self, request: stage_pb2.ForwardRequest,
                      context: aio.ServicerContext) -> stage_pb2.ForwardResponse:
        """Unary form (tests, tools): runs here, then calls the next stage and returns its answer."""
        try:
            answer, onward, after = await self._run(request)
            self._after(after)
            answer = answer or stage_pb2.ForwardResponse()
            if onward is not None:
                t1 = time.perf_counter()
                left = context.time_remaining()  # no deadline: None or a huge number, which gRPC cannot take
                try:
                    resp = await self.downstream.stub(request.route[0]).Forward(
                        onward, timeout=left if left is not None and left < 1e6 else None)
                except grpc.RpcError as err:
                    raise self._downstream_error(request.route[0], err) from None
                if self.metrics:
                    self.metrics.hop_seconds[after.mode].observe(time.perf_counter() - t1)
                answer.results.extend(resp.results)
            if all(r.code for r in answer.results):  # every entry failed (each counted once): so does the call
                first = from_code(answer.results[0].code, answer.results[0].message)
                await context.abort(first.code, first.message)
            return answer
        except ServiceError as e:
            if self.metrics:
                self.metrics.error(e.code)
            await context.abort(e.code, e.message)

    async def ForwardStream(self, request_iterator, context: aio.ServicerContext) -> stage_pb2.ForwardStreamSummary:
        """The data path: each step runs here and goes on to the next stage's stream, or (last stage) to the
        coordinator's Results stream; a failed step or entry is reported there too and the stream goes on."""
        steps = 0
        async for request in request_iterator:
            steps += 1
            trace.event(request.step_id, "received")
            try:
                answer, onward, after = await self._run(request)
                trace.event(request.step_id, "handed_off")
                if onward is not None:
                    trace.event(request.step_id, "sent")
                    t = time.perf_counter()
                    await self.downstream.send(request.route[0], onward)
                    if self.metrics:
                        self.metrics.hop_seconds[after.mode].observe(time.perf_counter() - t)
                if answer is not None:  # the Results stream's writer runs `after` once it has sent the answer
                    self.subscribers.push(request.reply_to, answer, None if onward is not None else
                                          partial(self._after, after))
                if onward is not None:
                    self._after(after)
            except ServiceError as e:
                if self.metrics:
                    self.metrics.error(e.code)
                self.subscribers.push(request.reply_to, stage_pb2.ForwardResponse(
                    step_id=request.step_id, code=e.code.value[0], message=e.message))
            except Exception as e:  # never let one step take the stream (and every session on it) down
                log.exception("step %d failed", request.step_id)
                internal = grpc.StatusCode.INTERNAL.value[0]
                self.subscribers.push(request.reply_to, stage_pb2.ForwardResponse(
                    step_id=request.step_id, code=internal, message=f"{type(e).__name__}: {e}"))
        return stage_pb2.ForwardStreamSummary(steps=steps)

    def _stream_broke(self, address: str, reply_to: set[str]) -> None:
        """Steps sent on the broken stream may be lost anywhere downstream: the coordinators that sent steps on
        it fail theirs in flight at once (not after STEP_TIMEOUT), even while every stage is still up."""
        lost = stage_pb2.ForwardResponse(step_id=0, code=grpc.StatusCode.UNAVAILABLE.value[0],
                                         message=f"the data stream to the next stage at {address} broke")
        for subscriber in reply_to & self.subscribers.queues.keys():  # the others have left (the pipeline stops)
            self.subscribers.push(subscriber, lost)

    async def Results(self, request: stage_pb2.ResultsRequest, context: aio.ServicerContext):
        if not request.subscriber_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "subscriber_id is empty")
        async for response in self.subscribers.stream(request.subscriber_id):
            yield response

    def _downstream_error(self, address: str, err: grpc.RpcError) -> ServiceError:
        code = err.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            return unavailable(f"stage at {address} is unavailable: {err.details()}")
        return ServiceError(code, err.details() or code.name)

    async def Release(self, request: stage_pb2.ReleaseRequest,
                      context: aio.ServicerContext) -> stage_pb2.ReleaseResponse:
        if self.runtime is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the stage is still loading its graphs")
        # In a thread: the runtime's lock may be held by a prompt step in the worker.
        released = await asyncio.to_thread(self.rt.release, request.session_id)
        route = list(request.route)
        while route:  # hand the rest of the route to the next stage; skip stages that are down
            try:
                await self.downstream.stub(route[0]).Release(
                    stage_pb2.ReleaseRequest(session_id=request.session_id, route=route[1:]), timeout=5
                )
                break
            except grpc.RpcError as err:
                log.warning("release of %s at %s failed: %s", request.session_id, route[0], err.code().name)
                route = route[1:]
        return stage_pb2.ReleaseResponse(released=released)

    async def Info(self, request: stage_pb2.InfoRequest, context: aio.ServicerContext) -> stage_pb2.StageInfo:
        if self.runtime is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the stage is still loading its graphs")
        rt, kv = self.rt, self.rt.kv
        return stage_pb2.StageInfo(
            stage_index=rt.stage,
            num_stages=rt.manifest.num_stages,
            first_layer=rt.first,
            last_layer=rt.last,
            manifest_sha256=rt.manifest_sha256,
            backend=rt.backend,
            kv_capacity_sessions=kv.capacity,
            sessions_in_use=kv.in_use,
            kv_bytes_capacity=kv.bytes_capacity,
            kv_bytes_in_use=kv.bytes_in_use,
            context_length=rt.context,
            prefill_length=rt.prefill,
            hidden_size=rt.hidden,
        )

    def expire(self, ttl: float) -> None:
        if self.runtime is None:
            return
        for sid in self.rt.expire(ttl):
            log.info("session %s expired after %.0f s idle", sid, ttl)
            if self.metrics:
                self.metrics.sessions_expired.inc()


async def serve_stage(servicer: StageServicer, listen: str, health_servicer: health_aio.HealthServicer,
                      ttl: float = 600.0) -> tuple[aio.Server, int]:
    """Start the gRPC server (stage service, health, reflection) and the idle-session reaper on this loop."""
    server = aio.server(options=SERVER_OPTIONS)
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()

    async def reap() -> None:
        while True:
            await asyncio.sleep(min(ttl / 4, 30.0))
            await asyncio.to_thread(servicer.expire, ttl)  # the runtime's lock may be held by a prompt step

    servicer.reaper = asyncio.get_running_loop().create_task(reap())
    return server, port


def export_again(manifest: Manifest, batched: bool, kernels: str) -> list[str]:
    """Why a CPU stage of this artifact runs slower than it could here, one line per reason. `kernels`: which of our
    CPU kernels this process runs (cpu_kernels.kernels())."""
    q = manifest.quantization
    reasons = []
    if q.get("cpu_kernels") == "splitllm" and kernels == "scalar":
        reasons.append("this CPU has no AVX2 (with FMA and F16C): the artifact's MatMulQ4_1 / MatMulQ8_0 and Attention "
                       "run in portable C, ~20x slower; export with --kernels onnxruntime for ONNX Runtime's kernels")
    if q.get("accuracy_level") == 4 and any(
        g.get("block_offsets") and g.get("format") == "MatMulNBits" for g in q.get("groups", {}).values()
    ):
        reasons.append("the artifact runs its Q4_1 layers as MatMulNBits and an offset Gemm (exported before "
                       "MatMulQ4_1): export it again for ~30 % faster token steps")
    if q.get("cpu_kernels") == "splitllm" and "block_scales" not in q:
        reasons.append("the artifact pads its Q4_1 and Q8_0 block scales to 8 blocks a row (exported before "
                       "2026-12-07): export it again for ~3 % faster token steps (6 % fewer weight bytes at K = 576)")
    if q.get("cpu_kernels") == "splitllm" and "attention" not in manifest.kv:
        reasons.append("the artifact runs GroupQueryAttention (exported before our Attention op): export it again for "
                       "faster token steps, the more so the longer the context")
    if "cpu" in manifest.stages[-1].graphs and not manifest.multi_row_logits("cpu"):
        reasons.append("the last stage answers the logits of a step's last row only (exported before speculative "
                       "decoding): export it again for fewer token steps where text repeats")
    if not batched:
        reasons.append("the stage graph has no batch dimension (exported before decode batching): concurrent "
                       "sessions' token steps run one by one; export the artifact again to batch them")
    return reasons


def huge_page_bytes(pid: int | str = "self") -> int:
    """A process's anonymous memory on transparent huge pages: a stage's weights, when glibc's malloc uses them
    (launcher.HUGE_PAGES); 0 where /proc does not tell."""
    return proc_bytes(f"/proc/{pid}/smaps_rollup", "AnonHugePages") or 0


async def stage_process(artifacts: str, stage: int, listen: str, backend: str = "cpu", kv_capacity: int = 16,
                        metrics_port: int | None = None, ttl: float = 600.0, threads: int | None = None,
                        allow_cpu_fallback: bool = False, spin: bool = False, cpus: tuple[int, ...] = ()) -> None:
    """The `splitllm stage` process (on its event loop): serve (NOT_SERVING while loading), load, serve until
    SIGTERM/SIGINT."""
    import signal

    from prometheus_client import CollectorRegistry

    from splitllm.services import __version__
    from splitllm.services.common.metrics import serve_metrics, set_build_info

    health_servicer = health_aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer = StageServicer(None)
    server, port = await serve_stage(servicer, listen, health_servicer, ttl=ttl)
    registry = CollectorRegistry()
    metrics = StageMetrics(registry, stage=stage, replica=listen)
    http = serve_metrics(registry, metrics_port, listen_host(listen)) if metrics_port is not None else None
    runtime = await asyncio.to_thread(StageRuntime, artifacts, stage, backend, kv_capacity, threads,
                                      allow_cpu_fallback=allow_cpu_fallback, spin=spin, cpus=cpus)
    set_build_info(registry, __version__, runtime.manifest_sha256, backend, stage)
    runtime.kv.on_move = metrics.kv_slot_moves.inc
    metrics.watch_kv(runtime.kv)
    servicer.metrics, servicer.runtime = metrics, runtime
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("stage %d (layers %d..%d) serving on %s; %d MB on transparent huge pages; %s CPU kernels; compute %s; "
             "%s event loop", stage + 1, runtime.first, runtime.last - 1, listen, huge_page_bytes() >> 20,
             cpu_kernels.kernels(), f"pinned to CPUs {','.join(map(str, cpus))}" if cpus and backend == "cpu" else
             "unpinned", type(asyncio.get_running_loop()).__module__.split(".")[0])
    if backend == "cpu":
        for warning in export_again(runtime.manifest, runtime.graph.batched, cpu_kernels.kernels()):
            log.warning(warning)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await servicer.downstream.close()
    await server.stop(grace=2)
    if http:
        http.shutdown()
