#!/usr/bin/env python
"""Stage-to-stage transport benchmark: which gRPC shape carries a token through 4 stages fastest?

    python bench/transport.py                 # full run (a few minutes), table + bench/results/transport.json
    python bench/transport.py --quick         # fewer steps and variants
    python bench/transport.py --only unary_sync,stream_aio_direct

Starts 4 relay "stage" processes (this file with --role stage) and one coordinator driver process
(--role coord) per variant, all on 127.0.0.1 with ports picked by the kernel, and measures the
latency of one decode step (token id in, hidden states stage to stage, logits out) with zero compute,
so the figure IS the transport overhead of the pipeline over running the same graphs in one process.
Compute can be emulated per stage (--compute-ms, sleep or a GIL-free CPU burn) for the concurrency
runs that check whether stage 1 works on session B while stage 2 works on session A.

Transports (coordinator = C, stages s1..s4):
  unary       nested unary Stage.Forward: C -> s1.Forward -> s2.Forward -> ... ; logits return up the chain
  star        C calls s1, s2, s3, s4 in turn; hidden states pass through C
  stream_relay  persistent bidi streams C=>s1=>s2=>s3=>s4, results relayed back up the streams
  stream_direct same streams downstream, s4 pushes results on a Results stream that C holds open
  rawtcp      reference floor, not gRPC: the same protobuf messages length-prefixed over plain TCP
Each with the sync API (thread pools) or grpc.aio (asyncio), as named in the variant:
  _sync_     sync stages and coordinator; "+inline": a stage reads its stream in the handler thread
  _aio_      grpc.aio stages and coordinator, compute on the event loop; "+exec": compute in a
             1-thread executor so the loop keeps reading; "+gen": async generators + queues
  _mixed_    sync "+inline" stages driven by a grpc.aio coordinator
  +tuned     channel/server options of OPTION_SETS["tuned"]

Every child gets PR_SET_PDEATHSIG and its own deadline; the parent kills them in a finally block.
Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import itertools
import json
import os
import platform
import queue
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from splitllm.protos import stage_pb2, stage_pb2_grpc, tensor_pb2
from splitllm.services.client.launcher import stop

HERE = Path(__file__).resolve().parent
PROTOS = HERE.parent / "protos"
RESULTS = HERE / "results" / "transport.json"
HOST = "127.0.0.1"

DTYPES = {
    tensor_pb2.FLOAT32: np.float32,
    tensor_pb2.FLOAT16: np.float16,
    tensor_pb2.INT32: np.int32,
    tensor_pb2.INT64: np.int64,
}
NP2PB = {np.dtype(v): k for k, v in DTYPES.items()}

OPTION_SETS = {
    "default": [],
    # Loopback only: skip the http_proxy env lookup, no SO_REUSEPORT (a stray second server on the
    # same port would steal half the connections), no BDP probing pings, big frames and windows.
    "tuned": [
        ("grpc.enable_http_proxy", 0),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.max_frame_size", 4 * 1024 * 1024),
        ("grpc.http2.lookahead_bytes", 8 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ],
}


# ----------------------------------------------------------------------------------------- helpers


def set_pdeathsig() -> None:
    """Die with the parent (Linux), so a killed benchmark never leaves stage processes behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_watchdog(seconds: float, what: str) -> None:
    def _die() -> None:
        time.sleep(seconds)
        sys.stderr.write(f"{what}: watchdog after {seconds:.0f}s, exiting\n")
        sys.stderr.flush()
        os._exit(3)

    threading.Thread(target=_die, daemon=True, name="watchdog").start()


def compile_bench_proto(out_dir: str) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTOS}", f"-I{HERE}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(args + ["transport_bench.proto"]) != 0:
        raise RuntimeError("protoc failed on bench/transport_bench.proto")
    for path in Path(out_dir).glob("transport_bench_pb2*.py"):
        text = path.read_text()
        text = re.sub(
            r"^import (stage_pb2|tensor_pb2) as", r"from splitllm.protos import \1 as", text, flags=re.M
        )
        path.write_text(text)


def load_bench_proto(gen_dir: str):
    if gen_dir not in sys.path:
        sys.path.insert(0, gen_dir)
    import transport_bench_pb2 as bpb
    import transport_bench_pb2_grpc as bgrpc

    return bpb, bgrpc


def to_tensor(arr: np.ndarray) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=NP2PB[arr.dtype], shape=arr.shape, data=arr.tobytes())


def fill_tensor(t: tensor_pb2.Tensor, arr: np.ndarray) -> None:
    t.dtype = NP2PB[arr.dtype]
    t.shape.extend(arr.shape)
    t.data = arr.tobytes()


def from_tensor(t: tensor_pb2.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype=DTYPES[t.dtype]).reshape(tuple(t.shape))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ------------------------------------------------------------------------------------ stage logic


class Compute:
    """Emulated graph run: nothing, a sleep, or a CPU burn that releases the GIL (like ONNX Runtime)."""

    def __init__(self, ms: float, kind: str):
        self.ms, self.kind = ms, kind
        self.lock = threading.Lock()  # one graph run at a time per stage, as with one ORT session
        self.buf = b""
        if ms > 0 and kind == "burn":
            # CPU time of this thread, not wall time: the 4 stages calibrate at once on shared cores
            probe = bytes(1 << 20)
            best = float("inf")
            for _ in range(5):
                t0 = time.thread_time()
                for _ in range(4):
                    hashlib.sha256(probe).digest()
                best = min(best, (time.thread_time() - t0) / (4 << 20))
            self.buf = bytes(max(1 << 12, int(ms / 1000 / best)))

    def __call__(self, rows: int) -> None:
        if self.ms <= 0:
            return
        with self.lock:
            if self.kind == "sleep":
                time.sleep(self.ms / 1000)
            else:
                hashlib.sha256(self.buf).digest()  # GIL released for buffers > 2 KiB


class StageCore:
    """What every transport variant shares: decode input, 'compute', encode the output."""

    def __init__(
        self, index: int, num_stages: int, hidden: int, vocab: int, logits_dtype: str, compute: Compute
    ):
        self.index, self.num_stages = index, num_stages
        self.is_last = index == num_stages - 1
        self.hidden = hidden
        self.compute = compute
        rng = np.random.default_rng(index)
        self.hidden_buf = rng.standard_normal((512, hidden)).astype(np.float32)
        logits = rng.standard_normal(vocab).astype(np.float32)
        self.logits = logits.astype(np.float16) if logits_dtype == "float16" else logits
        self._logits_f32 = logits
        self._topk: dict[int, tuple[tensor_pb2.Tensor, tensor_pb2.Tensor]] = {}

    def topk(self, k: int):
        # Precomputed: the transport rows measure bytes on the wire; the cost of picking the top-k is
        # measured on its own in the serialisation section (and belongs in the graph: ONNX TopK).
        if k not in self._topk:
            ids = np.argpartition(self._logits_f32, -k)[-k:].astype(np.int32)
            self._topk[k] = (to_tensor(self._logits_f32[ids]), to_tensor(ids))
        return self._topk[k]

    def process(self, req: stage_pb2.ForwardRequest):
        """ForwardRequest in; a ForwardRequest for the next stage, or a ForwardResponse out.
        Messages are built in place: passing a Tensor message to a constructor copies it (slowly)."""
        forward = bool(req.route)
        out = stage_pb2.ForwardRequest() if forward else stage_pb2.ForwardResponse()
        for e in req.entries:
            x = from_tensor(e.input)  # decode (zero copy past the protobuf bytes)
            rows = x.shape[0]
            self.compute(rows)
            if forward:
                o = out.entries.add()
                o.session_id = e.session_id
                o.position = e.position
                o.num_tokens = e.num_tokens
                fill_tensor(o.input, self.hidden_buf[:rows])
                o.logits.top_k = e.logits.top_k
                continue
            r = out.results.add()
            r.session_id = e.session_id
            if not self.is_last:  # star: return the hidden states to the coordinator
                fill_tensor(r.logits, self.hidden_buf[:rows])
            elif e.logits.top_k > 0:
                vals, ids = self.topk(e.logits.top_k)
                r.logits.CopyFrom(vals)
                r.token_ids.CopyFrom(ids)
            else:
                fill_tensor(r.logits, self.logits)
        if forward:
            out.route.extend(req.route[1:])
        return out


# ------------------------------------------------------------------------------------- sync stage


class SyncDownstream:
    """A persistent bidi stream to the next stage (sync API): a queue feeds the request iterator,
    a thread reads the responses and hands each back to the upstream stream it came from."""

    def __init__(self, channel, bgrpc):
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: dict[int, tuple] = {}
        self.ids = itertools.count(1)
        self.call = bgrpc.StageStreamStub(channel).ForwardStream(iter(self.q.get, None))
        threading.Thread(target=self._read, daemon=True, name="downstream-reader").start()

    def send(self, sreq, reply) -> None:
        if reply is not None:
            sid = next(self.ids)
            self.pending[sid] = reply
            sreq.step_id = sid
        self.q.put(sreq)

    def _read(self) -> None:
        try:
            for resp in self.call:
                out_q, up_id = self.pending.pop(resp.step_id)
                resp.step_id = up_id
                out_q.put(resp)
        except grpc.RpcError:
            pass


class SyncStage(stage_pb2_grpc.StageServicer):
    def __init__(self, core: StageCore, bpb, bgrpc, options, inline: bool = False):
        self.core, self.bpb, self.bgrpc, self.options = core, bpb, bgrpc, options
        self.inline = inline
        self.lock = threading.Lock()
        self.stubs: dict[str, stage_pb2_grpc.StageStub] = {}
        self.downstreams: dict[str, SyncDownstream] = {}
        self.subscribers: dict[str, queue.SimpleQueue] = {}

    def _channel(self, addr: str):
        return grpc.insecure_channel(addr, options=self.options)

    def _stub(self, addr: str):
        stub = self.stubs.get(addr)
        if stub is None:
            with self.lock:
                stub = self.stubs.setdefault(addr, stage_pb2_grpc.StageStub(self._channel(addr)))
        return stub

    def _downstream(self, addr: str) -> SyncDownstream:
        ds = self.downstreams.get(addr)
        if ds is None:
            with self.lock:
                ds = self.downstreams.get(addr) or SyncDownstream(self._channel(addr), self.bgrpc)
                self.downstreams[addr] = ds
        return ds

    # unary (nested and star)
    def Forward(self, request, context):
        out = self.core.process(request)
        if isinstance(out, stage_pb2.ForwardRequest):
            return self._stub(request.route[0]).Forward(out, timeout=30)
        return out

    # streams
    def ForwardStream(self, request_iterator, context):
        out_q: queue.SimpleQueue = queue.SimpleQueue()
        if self.inline:
            # Direct mode only (nothing comes back on this stream): the handler's own pool thread reads,
            # computes and forwards; on the wire this is a client-streaming RPC.
            try:
                for sreq in request_iterator:
                    self._stream_step(sreq, out_q)
            except grpc.RpcError:
                pass
            return

        def reader() -> None:
            try:
                for sreq in request_iterator:
                    self._stream_step(sreq, out_q)
            except grpc.RpcError:
                pass
            finally:
                out_q.put(None)

        threading.Thread(target=reader, daemon=True, name="upstream-reader").start()
        while True:
            item = out_q.get()
            if item is None:
                return
            yield item

    def _stream_step(self, sreq, out_q) -> None:
        out = self.core.process(sreq.forward)
        if isinstance(out, stage_pb2.ForwardRequest):
            nxt = self.bpb.StreamForwardRequest(step_id=sreq.step_id, forward=out, reply_to=sreq.reply_to)
            reply = None if sreq.reply_to else (out_q, sreq.step_id)
            self._downstream(sreq.forward.route[0]).send(nxt, reply)
            return
        resp = self.bpb.StreamForwardResponse(step_id=sreq.step_id, forward=out)
        if sreq.reply_to:
            self.subscribers[sreq.reply_to].put(resp)
        else:
            out_q.put(resp)

    def Results(self, request, context):
        q: queue.SimpleQueue = queue.SimpleQueue()
        self.subscribers[request.subscriber_id] = q
        context.add_callback(lambda: q.put(None))
        yield self.bpb.StreamForwardResponse(step_id=0)
        while True:
            item = q.get()
            if item is None:
                return
            yield item


def serve_sync(core: StageCore, options, workers: int, inline: bool) -> tuple[grpc.Server, int]:
    bpb, bgrpc = load_bench_proto(os.environ["TRANSPORT_GEN_DIR"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    servicer = SyncStage(core, bpb, bgrpc, options, inline)
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
    bgrpc.add_StageStreamServicer_to_server(_SyncStreamAdapter(servicer), server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    return server, port


class _SyncStreamAdapter:
    def __init__(self, s: SyncStage):
        self.ForwardStream = s.ForwardStream
        self.Results = s.Results


# -------------------------------------------------------------------------------------- aio stage


class QueueSink:
    """Upstream answers through an asyncio.Queue drained by an async-generator handler."""

    def __init__(self):
        self.q: asyncio.Queue = asyncio.Queue()

    async def put(self, resp) -> None:
        self.q.put_nowait(resp)


class WriteSink:
    """Upstream answers written straight onto the call with context.write (one writer at a time)."""

    def __init__(self, context):
        self.context = context
        self.lock = asyncio.Lock()

    async def put(self, resp) -> None:
        async with self.lock:
            await self.context.write(resp)


class AioDownstream:
    def __init__(self, channel, bgrpc):
        self.call = bgrpc.StageStreamStub(channel).ForwardStream()
        self.pending: dict[int, tuple] = {}
        self.ids = itertools.count(1)
        self.wlock = asyncio.Lock()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def send(self, sreq, reply) -> None:
        if reply is not None:
            sid = next(self.ids)
            self.pending[sid] = reply
            sreq.step_id = sid
        async with self.wlock:
            await self.call.write(sreq)

    async def _read(self) -> None:
        try:
            while True:
                resp = await self.call.read()
                if resp is grpc.aio.EOF:
                    return
                sink, up_id = self.pending.pop(resp.step_id)
                resp.step_id = up_id
                await sink.put(resp)
        except (grpc.RpcError, asyncio.CancelledError):
            pass


class AioStage(stage_pb2_grpc.StageServicer):
    def __init__(self, core: StageCore, bpb, bgrpc, options, executor: bool, style: str):
        self.core, self.bpb, self.bgrpc, self.options = core, bpb, bgrpc, options
        self.style = style
        self.pool = (
            futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute") if executor else None
        )
        self.stubs: dict[str, stage_pb2_grpc.StageStub] = {}
        self.downstreams: dict[str, AioDownstream] = {}
        self.subscribers: dict[str, QueueSink | WriteSink] = {}
        # grpc.aio looks at the handler's kind (coroutine / async generator): bind the chosen ones
        self.ForwardStream = self._fs_write if style == "rw" else self._fs_gen
        self.Results = self._res_write if style == "rw" else self._res_gen

    async def _process(self, req):
        if self.pool is None:
            return self.core.process(req)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.core.process, req)

    def _stub(self, addr: str):
        stub = self.stubs.get(addr)
        if stub is None:
            stub = self.stubs[addr] = stage_pb2_grpc.StageStub(
                grpc.aio.insecure_channel(addr, options=self.options)
            )
        return stub

    def _downstream(self, addr: str) -> AioDownstream:
        ds = self.downstreams.get(addr)
        if ds is None:
            ch = grpc.aio.insecure_channel(addr, options=self.options)
            ds = self.downstreams[addr] = AioDownstream(ch, self.bgrpc)
        return ds

    async def Forward(self, request, context):
        out = await self._process(request)
        if isinstance(out, stage_pb2.ForwardRequest):
            return await self._stub(request.route[0]).Forward(out, timeout=30)
        return out

    async def _step(self, sreq, sink) -> None:
        out = await self._process(sreq.forward)
        if isinstance(out, stage_pb2.ForwardRequest):
            nxt = self.bpb.StreamForwardRequest(step_id=sreq.step_id, forward=out, reply_to=sreq.reply_to)
            reply = None if sreq.reply_to else (sink, sreq.step_id)
            await self._downstream(sreq.forward.route[0]).send(nxt, reply)
            return
        resp = self.bpb.StreamForwardResponse(step_id=sreq.step_id, forward=out)
        await (self.subscribers[sreq.reply_to] if sreq.reply_to else sink).put(resp)

    async def _read_loop(self, request_iterator, sink) -> None:
        loop = asyncio.get_running_loop()
        async for sreq in request_iterator:
            if self.pool is None:
                await self._step(sreq, sink)
            else:  # keep reading while the compute thread works: stages overlap
                loop.create_task(self._step(sreq, sink))

    async def _fs_write(self, request_iterator, context) -> None:
        try:
            await self._read_loop(request_iterator, WriteSink(context))
        except (grpc.RpcError, asyncio.CancelledError):
            pass

    async def _fs_gen(self, request_iterator, context):
        sink = QueueSink()

        async def reader() -> None:
            try:
                await self._read_loop(request_iterator, sink)
            except (grpc.RpcError, asyncio.CancelledError):
                pass
            finally:
                sink.q.put_nowait(None)

        task = asyncio.get_running_loop().create_task(reader())
        try:
            while True:
                item = await sink.q.get()
                if item is None:
                    return
                yield item
        finally:
            task.cancel()

    async def _res_write(self, request, context) -> None:
        await context.write(self.bpb.StreamForwardResponse(step_id=0))
        self.subscribers[request.subscriber_id] = WriteSink(context)
        await asyncio.Event().wait()  # until the coordinator cancels

    async def _res_gen(self, request, context):
        sink = self.subscribers[request.subscriber_id] = QueueSink()
        yield self.bpb.StreamForwardResponse(step_id=0)
        while True:
            yield await sink.q.get()


async def serve_aio(core: StageCore, options, executor: bool, style: str, port_cb) -> None:
    bpb, bgrpc = load_bench_proto(os.environ["TRANSPORT_GEN_DIR"])
    server = grpc.aio.server(options=options)
    servicer = AioStage(core, bpb, bgrpc, options, executor, style)
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
    bgrpc.add_StageStreamServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    port_cb(port)
    await server.wait_for_termination()


# ------------------------------------------------------------------------------ raw TCP reference


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, step_id: int, payload: bytes) -> None:
    sock.sendall(struct.pack("<IQ", len(payload), step_id) + payload)


def recv_frame(sock: socket.socket) -> tuple[int, bytes]:
    n, step_id = struct.unpack("<IQ", recv_exact(sock, 12))
    return step_id, recv_exact(sock, n)


def serve_rawtcp(core: StageCore) -> None:
    """Reference floor: one thread per upstream connection, frames = (len, step_id, protobuf bytes).
    The request's route names the next hop; the last stage answers on the same connection
    (the 'direct' reply: the coordinator's connection to the last stage is registered by a hello)."""
    lsock = socket.create_server((HOST, 0))
    lsock.listen(16)
    print(f"PORT {lsock.getsockname()[1]}", flush=True)
    downs: dict[str, socket.socket] = {}
    reply_socks: dict[str, socket.socket] = {}
    dlock = threading.Lock()

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                step_id, payload = recv_frame(conn)
                if step_id == 0:  # hello from a coordinator: results for reply_to=<payload> go here
                    reply_socks[payload.decode()] = conn
                    continue
                req = stage_pb2.ForwardRequest.FromString(payload)
                out = core.process(req)
                if isinstance(out, stage_pb2.ForwardRequest):
                    addr = req.route[0]
                    with dlock:
                        s = downs.get(addr)
                        if s is None:
                            h, p = addr.rsplit(":", 1)
                            s = downs[addr] = socket.create_connection((h, int(p)))
                            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    send_frame(s, step_id, out.SerializeToString())
                else:
                    send_frame(reply_socks["c"], step_id, out.SerializeToString())
        except (EOFError, OSError):
            pass

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# ------------------------------------------------------------------------------------ stage main


def stage_main(a: argparse.Namespace) -> None:
    set_pdeathsig()
    start_watchdog(a.max_seconds, f"stage {a.index}")
    compute = Compute(a.compute_ms, a.compute_kind)
    core = StageCore(a.index, a.num_stages, a.hidden, a.vocab, a.logits_dtype, compute)
    options = OPTION_SETS[a.options]
    if a.server == "rawtcp":
        serve_rawtcp(core)
    elif a.server == "sync":
        server, port = serve_sync(core, options, a.workers, a.sync_style == "inline")
        print(f"PORT {port}", flush=True)
        server.wait_for_termination()
    else:
        asyncio.run(
            serve_aio(
                core, options, a.server == "aio_exec", a.aio_style, lambda p: print(f"PORT {p}", flush=True)
            )
        )


# ------------------------------------------------------------------------------ coordinator side


def token_request(session: str, pos: int, route: list[str], top_k: int, rows: int, hidden: int):
    if rows == 1:
        inp = to_tensor(np.array([pos % 1000 + 1], dtype=np.int32))
    else:  # a prompt chunk: token ids [rows]
        inp = to_tensor(np.arange(rows, dtype=np.int32))
    entry = stage_pb2.ForwardEntry(
        session_id=session,
        position=pos,
        num_tokens=rows,
        input=inp,
        logits=stage_pb2.LogitsRequest(top_k=top_k),
    )
    return stage_pb2.ForwardRequest(entries=[entry], route=route)


def decode_result(resp: stage_pb2.ForwardResponse) -> int:
    r = resp.results[0]
    logits = from_tensor(r.logits)
    if r.HasField("token_ids") and r.token_ids.data:
        return int(from_tensor(r.token_ids)[int(np.argmax(logits))])
    return int(np.argmax(logits))


@dataclass
class Variant:
    name: str
    transport: str  # unary | star | stream_relay | stream_direct | rawtcp
    api: str  # sync | aio | aio_exec (aio stages running compute in a 1-thread executor) | rawtcp
    top_k: int = 64
    logits_dtype: str = "float32"
    hidden: int = 576
    vocab: int = 49152
    rows: int = 1
    options: str = "default"
    sessions: int = 1
    steps: int = 2000
    warmup: int = 200
    compute_ms: float = 0.0
    compute_kind: str = "sleep"
    aio_style: str = "rw"  # aio stages: context.read/write ("rw") or async generators + queues ("gen")
    sync_style: str = "thread"  # sync stream stages: a reader thread per stream, or read in the handler
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def payload(self) -> str:
        if self.top_k == 0:
            return f"logits {self.logits_dtype} x{self.vocab}"
        return "argmax" if self.top_k == 1 else f"top-{self.top_k}"


class Recorder:
    def __init__(self, v: Variant, stage_pids: list[int]):
        import psutil

        self.v = v
        self.procs = [psutil.Process(p) for p in stage_pids]

    def cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            t = p.cpu_times()
            total += t.user + t.system
        return total

    def measure_idle(self, seconds: float = 1.0) -> float:
        c0 = self.cpu()
        time.sleep(seconds)
        return (self.cpu() - c0) / seconds * 100.0


def summarize(
    v: Variant, lat_ns: list[int], wall: float, stage_cpu: float, coord_cpu: float, idle_pct: float
):
    ms = [x / 1e6 for x in lat_ns]
    n = len(ms)
    return {
        "variant": asdict(v),
        "steps": n,
        "median_ms": statistics.median(ms),
        "p90_ms": pct(ms, 0.90),
        "p99_ms": pct(ms, 0.99),
        "mean_ms": statistics.fmean(ms),
        "throughput_steps_per_s": n / wall,
        "wall_s": wall,
        "stage_cpu_ms_per_step": stage_cpu / n * 1000,
        "coord_cpu_ms_per_step": coord_cpu / n * 1000,
        "stages_idle_cpu_pct": idle_pct,
    }


def run_sessions_threads(sessions: int, n_per_session: int, step_fn) -> tuple[list[int], float]:
    """step_fn(session_index, pos) does one blocking step; one thread per session (none for one)."""
    lat: list[int] = []
    lock = threading.Lock()

    def worker(s: int) -> None:
        local = []
        for i in range(n_per_session):
            t0 = time.perf_counter_ns()
            step_fn(s, i)
            local.append(time.perf_counter_ns() - t0)
        with lock:
            lat.extend(local)

    t0 = time.perf_counter()
    if sessions == 1:
        worker(0)
    else:
        ths = [threading.Thread(target=worker, args=(s,)) for s in range(sessions)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    return lat, time.perf_counter() - t0


def coord_sync(v: Variant, addrs: list[str], rec: Recorder) -> dict:
    options = OPTION_SETS[v.options]
    bpb, bgrpc = load_bench_proto(os.environ["TRANSPORT_GEN_DIR"])
    channels = [grpc.insecure_channel(a, options=options) for a in addrs]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=20)
    stubs = [stage_pb2_grpc.StageStub(ch) for ch in channels]

    def req(s: int, i: int, route):
        return token_request(f"s{s}", i, route, v.top_k, v.rows, v.hidden)

    if v.transport == "unary":

        def step(s: int, i: int) -> None:
            decode_result(stubs[0].Forward(req(s, i, addrs[1:]), timeout=30))

    elif v.transport == "star":

        def step(s: int, i: int) -> None:
            r = req(s, i, [])
            for k, stub in enumerate(stubs):
                resp = stub.Forward(r, timeout=30)
                if k + 1 < len(stubs):
                    e = r.entries[0]
                    r = stage_pb2.ForwardRequest(
                        entries=[
                            stage_pb2.ForwardEntry(
                                session_id=e.session_id,
                                position=e.position,
                                num_tokens=e.num_tokens,
                                input=resp.results[0].logits,
                                logits=e.logits,
                            )
                        ]
                    )
            decode_result(resp)

    else:  # streams
        direct = v.transport == "stream_direct"
        q: queue.SimpleQueue = queue.SimpleQueue()
        call = bgrpc.StageStreamStub(channels[0]).ForwardStream(iter(q.get, None))
        resp_iter = call
        if direct:
            resp_iter = bgrpc.StageStreamStub(channels[-1]).Results(bpb.ResultsRequest(subscriber_id="c"))
            assert next(resp_iter).step_id == 0
        ids = itertools.count(1)
        if v.sessions == 1:

            def step(s: int, i: int) -> None:
                sid = next(ids)
                q.put(
                    bpb.StreamForwardRequest(
                        step_id=sid, forward=req(s, i, addrs[1:]), reply_to="c" if direct else ""
                    )
                )
                resp = next(resp_iter)
                assert resp.step_id == sid
                decode_result(resp.forward)

        else:
            waiters: dict[int, queue.SimpleQueue] = {}

            def dispatch() -> None:
                try:
                    for resp in resp_iter:
                        waiters.pop(resp.step_id).put(resp)
                except grpc.RpcError:
                    pass

            threading.Thread(target=dispatch, daemon=True).start()

            def step(s: int, i: int) -> None:
                sid = next(ids)
                w: queue.SimpleQueue = queue.SimpleQueue()
                waiters[sid] = w
                q.put(
                    bpb.StreamForwardRequest(
                        step_id=sid, forward=req(s, i, addrs[1:]), reply_to="c" if direct else ""
                    )
                )
                decode_result(w.get(timeout=30).forward)

    lat, wall, c_stage, c_coord = _timed(v, step, rec)
    idle = rec.measure_idle()
    return summarize(v, lat, wall, c_stage, c_coord, idle)


def _timed(v: Variant, step, rec: Recorder):
    """Warm-up, then the measured steps; CPU is sampled around the measured part only."""
    run_sessions_threads(v.sessions, max(1, v.warmup // v.sessions), step)
    s0, c0 = rec.cpu(), time.process_time()
    lat, wall = run_sessions_threads(v.sessions, max(1, v.steps // v.sessions), step)
    return lat, wall, rec.cpu() - s0, time.process_time() - c0


async def coord_aio(v: Variant, addrs: list[str], rec: Recorder) -> dict:
    options = OPTION_SETS[v.options]
    bpb, bgrpc = load_bench_proto(os.environ["TRANSPORT_GEN_DIR"])
    channels = [grpc.aio.insecure_channel(a, options=options) for a in addrs]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 20)
    stubs = [stage_pb2_grpc.StageStub(ch) for ch in channels]

    def req(s: int, i: int, route):
        return token_request(f"s{s}", i, route, v.top_k, v.rows, v.hidden)

    background: list[asyncio.Task] = []  # keep references: the loop holds tasks only weakly
    if v.transport == "unary":

        async def step(s: int, i: int) -> None:
            decode_result(await stubs[0].Forward(req(s, i, addrs[1:]), timeout=30))

    elif v.transport == "star":

        async def step(s: int, i: int) -> None:
            r = req(s, i, [])
            for k, stub in enumerate(stubs):
                resp = await stub.Forward(r, timeout=30)
                if k + 1 < len(stubs):
                    e = r.entries[0]
                    r = stage_pb2.ForwardRequest(
                        entries=[
                            stage_pb2.ForwardEntry(
                                session_id=e.session_id,
                                position=e.position,
                                num_tokens=e.num_tokens,
                                input=resp.results[0].logits,
                                logits=e.logits,
                            )
                        ]
                    )
            decode_result(resp)

    else:
        direct = v.transport == "stream_direct"
        call = bgrpc.StageStreamStub(channels[0]).ForwardStream()
        reader_call = call
        if direct:
            reader_call = bgrpc.StageStreamStub(channels[-1]).Results(bpb.ResultsRequest(subscriber_id="c"))
            assert (await reader_call.read()).step_id == 0
        ids = itertools.count(1)
        waiters: dict[int, asyncio.Future] = {}
        wlock = asyncio.Lock()
        loop = asyncio.get_running_loop()

        async def dispatch() -> None:
            try:
                while True:
                    resp = await reader_call.read()
                    if resp is grpc.aio.EOF:
                        return
                    waiters.pop(resp.step_id).set_result(resp)
            except (grpc.RpcError, asyncio.CancelledError):
                pass

        background.append(loop.create_task(dispatch()))

        async def step(s: int, i: int) -> None:
            sid = next(ids)
            fut = waiters[sid] = loop.create_future()
            sreq = bpb.StreamForwardRequest(
                step_id=sid, forward=req(s, i, addrs[1:]), reply_to="c" if direct else ""
            )
            async with wlock:
                await call.write(sreq)
            decode_result((await asyncio.wait_for(fut, 30)).forward)

    async def run(n_per_session: int, record: bool):
        lat: list[int] = []

        async def worker(s: int) -> None:
            for i in range(n_per_session):
                t0 = time.perf_counter_ns()
                await step(s, i)
                if record:
                    lat.append(time.perf_counter_ns() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(s) for s in range(v.sessions)))
        return lat, time.perf_counter() - t0

    await run(max(1, v.warmup // v.sessions), False)
    s0, c0 = rec.cpu(), time.process_time()
    lat, wall = await run(max(1, v.steps // v.sessions), True)
    c_stage, c_coord = rec.cpu() - s0, time.process_time() - c0
    idle = rec.measure_idle()
    for t in background:
        t.cancel()
    return summarize(v, lat, wall, c_stage, c_coord, idle)


def coord_rawtcp(v: Variant, addrs: list[str], rec: Recorder) -> dict:
    def conn(addr: str) -> socket.socket:
        h, p = addr.rsplit(":", 1)
        s = socket.create_connection((h, int(p)))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    first, last = conn(addrs[0]), conn(addrs[-1])
    send_frame(last, 0, b"c")
    time.sleep(0.2)
    ids = itertools.count(1)
    lock = threading.Lock()
    waiters: dict[int, queue.SimpleQueue] = {}

    if v.sessions == 1:

        def step(s: int, i: int) -> None:
            sid = next(ids)
            send_frame(
                first,
                sid,
                token_request(f"s{s}", i, addrs[1:], v.top_k, v.rows, v.hidden).SerializeToString(),
            )
            rid, payload = recv_frame(last)
            assert rid == sid
            decode_result(stage_pb2.ForwardResponse.FromString(payload))

    else:

        def dispatch() -> None:
            try:
                while True:
                    rid, payload = recv_frame(last)
                    waiters.pop(rid).put(payload)
            except (EOFError, OSError):
                pass

        threading.Thread(target=dispatch, daemon=True).start()

        def step(s: int, i: int) -> None:
            sid = next(ids)
            w: queue.SimpleQueue = queue.SimpleQueue()
            waiters[sid] = w
            data = token_request(f"s{s}", i, addrs[1:], v.top_k, v.rows, v.hidden).SerializeToString()
            with lock:
                send_frame(first, sid, data)
            decode_result(stage_pb2.ForwardResponse.FromString(w.get(timeout=30)))

    lat, wall, c_stage, c_coord = _timed(v, step, rec)
    idle = rec.measure_idle()
    return summarize(v, lat, wall, c_stage, c_coord, idle)


def coord_main(a: argparse.Namespace) -> None:
    set_pdeathsig()
    start_watchdog(a.max_seconds, "coordinator")
    v = Variant(**json.loads(a.variant))
    addrs = a.addrs.split(",")
    rec = Recorder(v, [int(p) for p in a.stage_pids.split(",")])
    if v.api == "rawtcp":
        out = coord_rawtcp(v, addrs, rec)
    elif v.api == "sync":
        out = coord_sync(v, addrs, rec)
    else:
        out = asyncio.run(coord_aio(v, addrs, rec))
    print("RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)  # do not wait for gRPC threads of open streams


# ---------------------------------------------------------------------------------- orchestration


class Children:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], env) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.procs.append(p)
        return p

    def kill_all(self) -> None:
        stop(self.procs, timeout=3)
        self.procs.clear()


def read_port(p: subprocess.Popen, timeout: float) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.time()))
        if not r:
            break
        line = p.stdout.readline()
        if not line:
            break
        if line.startswith("PORT "):
            return int(line.split()[1])
    raise RuntimeError(f"stage did not report a port: {p.stderr.read() if p.poll() is not None else ''}")


def run_variant(v: Variant, gen_dir: str, children: Children, timeout: float) -> dict:
    env = dict(os.environ, TRANSPORT_GEN_DIR=gen_dir, PYTHONUNBUFFERED="1")
    env.pop("http_proxy", None)
    env.pop("https_proxy", None)
    server = "sync" if v.api == "mixed" else v.api  # mixed: sync stages, aio coordinator
    stages = []
    try:
        for k in range(4):
            stages.append(
                children.spawn(
                    [
                        "--role",
                        "stage",
                        "--server",
                        server,
                        "--index",
                        str(k),
                        "--num-stages",
                        "4",
                        "--hidden",
                        str(v.hidden),
                        "--vocab",
                        str(v.vocab),
                        "--logits-dtype",
                        v.logits_dtype,
                        "--options",
                        v.options,
                        "--compute-ms",
                        str(v.compute_ms),
                        "--compute-kind",
                        v.compute_kind,
                        "--sync-style",
                        v.sync_style,
                        "--aio-style",
                        v.aio_style,
                        "--max-seconds",
                        str(int(timeout) + 30),
                    ],
                    env,
                )
            )
        addrs = [f"{HOST}:{read_port(p, 30)}" for p in stages]
        coord = children.spawn(
            [
                "--role",
                "coord",
                "--variant",
                json.dumps(asdict(v)),
                "--addrs",
                ",".join(addrs),
                "--stage-pids",
                ",".join(str(p.pid) for p in stages),
                "--max-seconds",
                str(int(timeout)),
            ],
            env,
        )
        try:
            out, err = coord.communicate(timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            coord.kill()
            out, err = coord.communicate()
        for line in out.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"coordinator failed (rc={coord.returncode}): {err[-2000:]}")
    finally:
        children.kill_all()


# ------------------------------------------------------------------------ serialisation micro-bench


def _timeit(fn, n: int, repeats: int = 7) -> float:
    """Median over `repeats` of the mean time of n calls, in us (the machine is shared: medians)."""
    fn()
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        means.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(means)


def encode_tensor_fast(arr: np.ndarray) -> bytes:
    """Hand-rolled wire bytes of a ForwardResponse{results[0]{logits: Tensor}} with one copy (join)."""

    def varint(x: int) -> bytes:
        out = bytearray()
        while True:
            b = x & 0x7F
            x >>= 7
            if x:
                out.append(b | 0x80)
            else:
                out.append(b)
                return bytes(out)

    data = memoryview(arr).cast("B")
    shape = b"".join(varint(d) for d in arr.shape)
    tensor_head = b"\x08" + varint(NP2PB[arr.dtype]) + b"\x12" + varint(len(shape)) + shape
    tensor_head += b"\x1a" + varint(data.nbytes)
    tensor_len = len(tensor_head) + data.nbytes
    result_head = b"\x12" + varint(tensor_len)  # EntryResult.logits = 2
    result_len = len(result_head) + tensor_len
    return b"".join(
        [b"\x0a", varint(result_len), result_head, tensor_head, data]
    )  # ForwardResponse.results = 1


def ort_topk_us(logits: np.ndarray, k: int, n: int) -> float:
    """The last stage's graph can end in an ONNX TopK: what does that cost next to numpy?"""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return float("nan")
    kt = helper.make_tensor("k", TensorProto.INT64, [1], [k])
    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1)],
        "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, logits.size])],
        [
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, k]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [1, k]),
        ],
        [kt],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = logits.reshape(1, -1)
    return _timeit(lambda: sess.run(None, {"x": x}), n)


def serialization_bench(vocab: int = 49152) -> dict:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(vocab).astype(np.float32)
    out: dict[str, float] = {}
    n = 300

    def build(arr):  # in place, as StageCore does
        m = stage_pb2.ForwardResponse()
        r = m.results.add()
        r.session_id = "s0"
        fill_tensor(r.logits, arr)
        return m

    def build_ctor(arr):  # a Tensor message passed to a constructor is copied
        return stage_pb2.ForwardResponse(
            results=[stage_pb2.EntryResult(session_id="s0", logits=to_tensor(arr))]
        )

    wire32 = build(logits).SerializeToString()
    wire16 = build(logits.astype(np.float16)).SerializeToString()
    out["logits_f32_bytes"] = len(wire32)
    out["logits_f16_bytes"] = len(wire16)
    out["f32_build_in_place_us"] = _timeit(lambda: build(logits), n)
    out["f32_build_via_constructors_us"] = _timeit(lambda: build_ctor(logits), n)
    out["f32_build+serialize_us"] = _timeit(lambda: build(logits).SerializeToString(), n)
    out["f32_parse+frombuffer_us"] = _timeit(
        lambda: np.frombuffer(
            stage_pb2.ForwardResponse.FromString(wire32).results[0].logits.data, np.float32
        ),
        n,
    )
    out["f32_parse_only_us"] = _timeit(lambda: stage_pb2.ForwardResponse.FromString(wire32), n)
    msg = stage_pb2.ForwardResponse.FromString(wire32)
    out["f32_field_access(.data)_us"] = _timeit(lambda: msg.results[0].logits.data, n)
    out["f32_argmax_after_decode_us"] = _timeit(lambda: int(np.argmax(from_tensor(msg.results[0].logits))), n)
    out["f16_astype+build+serialize_us"] = _timeit(
        lambda: build(logits.astype(np.float16)).SerializeToString(), n
    )
    out["f16_parse+frombuffer+to_f32_us"] = _timeit(
        lambda: np.frombuffer(
            stage_pb2.ForwardResponse.FromString(wire16).results[0].logits.data, np.float16
        ).astype(np.float32),
        n,
    )
    fast = encode_tensor_fast(logits)
    assert stage_pb2.ForwardResponse.FromString(fast).results[0].logits.data == logits.tobytes()
    out["f32_handrolled_encode_us"] = _timeit(lambda: encode_tensor_fast(logits), n)
    off = len(fast) - logits.nbytes
    out["f32_handrolled_decode_zero_copy_us"] = _timeit(
        lambda: np.frombuffer(memoryview(fast)[off:], np.float32), n
    )
    out["memcpy_196KB_us(bytes(...))"] = _timeit(lambda: bytes(bytearray(wire32)), n)
    out["topk64_argpartition_us"] = _timeit(lambda: np.argpartition(logits, -64)[-64:], n)
    out["argmax_us"] = _timeit(lambda: int(np.argmax(logits)), n)
    out["topk64_onnxruntime_TopK_us"] = ort_topk_us(logits, 64, n)
    hid = rng.standard_normal((1, 576)).astype(np.float32)
    req = stage_pb2.ForwardRequest(
        entries=[stage_pb2.ForwardEntry(session_id="s0", position=7, num_tokens=1, input=to_tensor(hid))],
        route=["127.0.0.1:1", "127.0.0.1:2"],
    )
    wire_h = req.SerializeToString()
    out["hidden576_request_bytes"] = len(wire_h)
    out["hidden576_build+serialize_us"] = _timeit(
        lambda: stage_pb2.ForwardRequest(
            entries=[stage_pb2.ForwardEntry(session_id="s0", position=7, num_tokens=1, input=to_tensor(hid))],
            route=["127.0.0.1:1", "127.0.0.1:2"],
        ).SerializeToString(),
        2000,
    )
    out["hidden576_parse+frombuffer_us"] = _timeit(
        lambda: from_tensor(stage_pb2.ForwardRequest.FromString(wire_h).entries[0].input), 2000
    )
    return out


# ---------------------------------------------------------------------------------------- variants


def variants(quick: bool) -> tuple[list[Variant], list[Variant]]:
    steps, warm = (600, 100) if quick else (2000, 200)
    lat: list[Variant] = []

    def add(name, transport, api, **kw):
        lat.append(Variant(name=name, transport=transport, api=api, steps=steps, warmup=warm, **kw))

    # main comparison: top-64 logits (what a sampler with top-k needs), 576 hidden, zero compute
    add("unary_sync", "unary", "sync")
    add("star_sync", "star", "sync")
    add("stream_sync_relay", "stream_relay", "sync")
    add("stream_sync_direct", "stream_direct", "sync")
    add("unary_aio", "unary", "aio")
    add("star_aio", "star", "aio")
    add("stream_aio_relay", "stream_relay", "aio")
    add("stream_aio_direct", "stream_direct", "aio")
    add(
        "stream_sync_direct+inline",
        "stream_direct",
        "sync",
        sync_style="inline",
        note="read in the handler thread",
    )
    add(
        "stream_mixed_direct",
        "stream_direct",
        "mixed",
        sync_style="inline",
        note="aio coordinator, sync stages",
    )
    add("stream_aio_direct+gen", "stream_direct", "aio", aio_style="gen", note="async generators + queues")
    add("stream_aio_relay+gen", "stream_relay", "aio", aio_style="gen", note="async generators + queues")
    add("stream_aio_direct+exec", "stream_direct", "aio_exec", note="compute hop to a 1-thread executor")
    add("rawtcp_direct(ref)", "rawtcp", "rawtcp", note="not gRPC: floor of Python + loopback TCP")
    # channel options
    add("unary_sync+tuned", "unary", "sync", options="tuned")
    add("stream_aio_direct+tuned", "stream_direct", "aio", options="tuned")
    if not quick:
        add("stream_sync_direct+tuned", "stream_direct", "sync", options="tuned")
        add("unary_aio+tuned", "unary", "aio", options="tuned")
    # logits payload
    for t in (
        ("unary_sync", "stream_aio_direct", "stream_aio_relay")
        if not quick
        else ("unary_sync", "stream_aio_direct")
    ):
        tr, api = {
            "unary_sync": ("unary", "sync"),
            "stream_aio_direct": ("stream_direct", "aio"),
            "stream_aio_relay": ("stream_relay", "aio"),
        }[t]
        add(f"{t} full f32", tr, api, top_k=0)
        add(f"{t} full f16", tr, api, top_k=0, logits_dtype="float16")
        add(f"{t} argmax", tr, api, top_k=1)
    # Llama-3-8B sizes: hidden 4096, vocab 128256
    add("unary_sync 8B top-64", "unary", "sync", hidden=4096, vocab=128256)
    add("stream_aio_direct 8B top-64", "stream_direct", "aio", hidden=4096, vocab=128256)
    add("stream_aio_direct 8B full f32", "stream_direct", "aio", hidden=4096, vocab=128256, top_k=0)
    # prompt chunk: 128 rows of hidden states per hop
    pp_steps, pp_warm = (100, 20) if quick else (300, 30)
    for name, tr, api in (
        ("unary_sync", "unary", "sync"),
        ("stream_aio_direct", "stream_direct", "aio"),
        ("stream_sync_direct", "stream_direct", "sync"),
    ):
        lat.append(
            Variant(name=f"{name} PP128", transport=tr, api=api, rows=128, steps=pp_steps, warmup=pp_warm)
        )
    lat.append(
        Variant(
            name="stream_aio_direct PP128 8B",
            transport="stream_direct",
            api="aio",
            rows=128,
            hidden=4096,
            vocab=128256,
            steps=pp_steps // 2,
            warmup=pp_warm,
        )
    )

    # concurrency: 16 sessions interleaving, 1.5 ms emulated compute per stage
    conc: list[Variant] = []
    c_steps = 1600 if quick else 3200
    s_steps = 150 if quick else 400
    picks = [
        ("unary_sync", "unary", "sync"),
        ("stream_sync_direct", "stream_direct", "sync"),
        ("stream_sync_direct+inline", "stream_direct", "sync"),
        ("stream_mixed_direct", "stream_direct", "mixed"),
        ("unary_aio+exec", "unary", "aio_exec"),
        ("stream_aio_direct+exec", "stream_direct", "aio_exec"),
        ("stream_aio_direct+inline", "stream_direct", "aio"),
        ("rawtcp(ref)", "rawtcp", "rawtcp"),
    ]
    if not quick:
        picks.insert(1, ("star_sync", "star", "sync"))
        picks.insert(3, ("stream_sync_relay", "stream_relay", "sync"))
    for kind in ("sleep", "burn") if not quick else ("sleep",):
        for name, tr, api in picks:
            for sessions, n in ((1, s_steps), (16, c_steps)):
                conc.append(
                    Variant(
                        name=f"{name} x{sessions} {kind}1.5ms",
                        transport=tr,
                        api=api,
                        sessions=sessions,
                        steps=n,
                        warmup=min(n // 8, 160),
                        compute_ms=1.5,
                        compute_kind=kind,
                        sync_style="inline"
                        if api == "mixed" or (api == "sync" and "+inline" in name)
                        else "thread",
                    )
                )
    return lat, conc


# -------------------------------------------------------------------------------------------- main


def merge_runs(v: Variant, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1] if runs else {"variant": asdict(v), "error": "not run"}
    out = dict(ok[0])
    for k in (
        "median_ms",
        "p90_ms",
        "p99_ms",
        "mean_ms",
        "throughput_steps_per_s",
        "stage_cpu_ms_per_step",
        "coord_cpu_ms_per_step",
        "stages_idle_cpu_pct",
    ):
        out[k] = statistics.median(r[k] for r in ok)
    out["steps"] = sum(r["steps"] for r in ok)
    out["runs_median_ms"] = [r["median_ms"] for r in ok]
    return out


def print_table(title: str, rows: list[dict], conc: bool = False) -> None:
    print(f"\n{title}")
    if conc:
        hdr = (
            f"{'variant':40s} {'sess':>4s} {'med ms':>7s} {'p90 ms':>7s} {'steps/s':>8s} {'speedup':>7s} "
            f"{'busy':>5s} {'stageCPU':>8s}"
        )
    else:
        hdr = (
            f"{'variant':40s} {'payload':>18s} {'med ms':>7s} {'p90 ms':>7s} {'p99 ms':>7s} "
            f"{'stageCPU':>8s} {'coordCPU':>8s} {'idle%':>5s}"
        )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        v = r["variant"]
        if "error" in r:
            print(f"{v['name']:40s} ERROR {r['error'][:80]}")
            continue
        if conc:
            print(
                f"{v['name']:40s} {v['sessions']:4d} {r['median_ms']:7.3f} {r['p90_ms']:7.3f} "
                f"{r['throughput_steps_per_s']:8.1f} {r.get('speedup_vs_1', float('nan')):7.2f} "
                f"{r['bottleneck_busy']:5.2f} {r['stage_cpu_ms_per_step']:8.3f}"
            )
        else:
            payload = Variant(**v).payload
            if v["rows"] > 1:
                payload = f"PP {v['rows']}x{v['hidden']}"
            elif v["hidden"] != 576:
                payload = f"h{v['hidden']} " + payload
            print(
                f"{v['name']:40s} {payload:>18s} {r['median_ms']:7.3f} {r['p90_ms']:7.3f} {r['p99_ms']:7.3f} "
                f"{r['stage_cpu_ms_per_step']:8.3f} {r['coord_cpu_ms_per_step']:8.3f} "
                f"{r['stages_idle_cpu_pct']:5.1f}"
            )


def main_parent(a: argparse.Namespace) -> int:
    lat_vs, conc_vs = variants(a.quick)
    a.repeat = a.repeat or (1 if a.quick else 2)
    if a.steps:
        lat_vs = [replace(v, steps=a.steps) if v.rows == 1 else v for v in lat_vs]
    if a.only:
        keep = [s.strip() for s in a.only.split(",")]
        lat_vs = [v for v in lat_vs if any(v.name == k or v.name.startswith(k + " ") for k in keep)]
        conc_vs = [v for v in conc_vs if any(v.name.startswith(k + " ") for k in keep)]
    if a.no_concurrency:
        conc_vs = []
    children = Children()
    gen_dir = tempfile.mkdtemp(prefix="splitllm-transport-")
    started = time.time()

    def on_signal(signum, frame):  # noqa: ARG001
        children.kill_all()
        shutil.rmtree(gen_dir, ignore_errors=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    results: dict = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "stages": 4,
            "quick": a.quick,
        },
    }
    try:
        compile_bench_proto(gen_dir)
        print("serialisation of the logits (in-process, us per op):")
        ser = serialization_bench()
        for k, val in ser.items():
            print(f"  {k:42s} {val:12.1f}")
        results["serialization"] = ser
        lat_rows, conc_rows = [], []
        runs: dict[str, list[dict]] = {v.name: [] for v in lat_vs}
        for rnd in range(a.repeat):  # rounds interleave the variants, so a noisy minute hits all of them
            for v in lat_vs:
                if time.time() - started > a.budget:
                    print(f"budget of {a.budget}s used up, skipping {v.name}")
                    continue
                try:
                    r = run_variant(v, gen_dir, children, timeout=120)
                except Exception as e:  # noqa: BLE001 - a failed variant is a row, not a crash
                    r = {"variant": asdict(v), "error": str(e)}
                runs[v.name].append(r)
                if "error" in r:
                    print(f"  [{rnd + 1}] {v.name}: ERROR {r['error'][:300]}", flush=True)
                else:
                    print(
                        f"  [{rnd + 1}] {v.name:40s} median {r['median_ms']:.3f} ms p90 {r['p90_ms']:.3f} ms",
                        flush=True,
                    )
        for v in lat_vs:
            lat_rows.append(merge_runs(v, runs[v.name]))
        single: dict[str, float] = {}
        for v in conc_vs:
            if time.time() - started > a.budget:
                print(f"budget of {a.budget}s used up, skipping {v.name}")
                continue
            try:
                r = run_variant(v, gen_dir, children, timeout=180)
            except Exception as e:  # noqa: BLE001
                r = {"variant": asdict(v), "error": str(e)}
            if "error" not in r:
                key = v.name.split(" x")[0] + v.compute_kind
                if v.sessions == 1:
                    single[key] = r["throughput_steps_per_s"]
                if key in single:
                    r["speedup_vs_1"] = r["throughput_steps_per_s"] / single[key]
                # fraction of time a stage computes (1 = the pipeline is compute-bound at every stage)
                r["bottleneck_busy"] = r["throughput_steps_per_s"] * v.compute_ms / 1000
                print(
                    f"  {v.name:40s} median {r['median_ms']:.3f} ms {r['throughput_steps_per_s']:.1f} st/s",
                    flush=True,
                )
            else:
                print(f"  {v.name}: ERROR {r['error'][:300]}", flush=True)
            conc_rows.append(r)
        results["latency"] = lat_rows
        results["concurrency"] = conc_rows
        results["meta"]["loadavg_end"] = os.getloadavg()
        results["meta"]["seconds"] = time.time() - started
        print_table(
            f"per-token step through 4 relay stages, zero compute (= pipeline transport overhead); "
            f"median over {a.repeat} run(s) of each figure",
            lat_rows,
        )
        if conc_rows:
            print_table(
                "sessions interleaving, 1.5 ms emulated compute per stage "
                "(speedup = steps/s over 1 session; busy = steps/s x 1.5 ms)",
                conc_rows,
                conc=True,
            )
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {out}")
        return 0
    finally:
        children.kill_all()
        shutil.rmtree(gen_dir, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", default="parent", choices=["parent", "stage", "coord"])
    p.add_argument("--quick", action="store_true", help="fewer steps and variants")
    p.add_argument("--only", default="", help="comma-separated variant name prefixes")
    p.add_argument("--steps", type=int, default=0, help="override the measured decode steps per variant")
    p.add_argument("--no-concurrency", action="store_true")
    p.add_argument(
        "--repeat", type=int, default=0, help="rounds of the latency variants (default 2, quick 1)"
    )
    p.add_argument("--budget", type=float, default=1200, help="seconds; variants past it are skipped")
    p.add_argument("--out", default=str(RESULTS))
    # children
    p.add_argument("--server", default="sync")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--num-stages", type=int, default=4)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--logits-dtype", default="float32")
    p.add_argument("--options", default="default")
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--aio-style", default="rw", choices=["rw", "gen"])
    p.add_argument("--sync-style", default="thread", choices=["thread", "inline"])
    p.add_argument("--compute-ms", type=float, default=0.0)
    p.add_argument("--compute-kind", default="sleep")
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--variant", default="{}")
    p.add_argument("--addrs", default="")
    p.add_argument("--stage-pids", default="")
    a = p.parse_args(argv)
    if a.role == "stage":
        stage_main(a)
        return 0
    if a.role == "coord":
        coord_main(a)
        return 0
    return main_parent(a)


if __name__ == "__main__":
    sys.exit(main())
