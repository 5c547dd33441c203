"""StageRuntime: one stage's graphs, its KV pool, and the validation around them (no sockets here).

The gRPC service (services/stage/server.py) is a thin layer over this object; the in-process chain
(services/stage/chain.py) strings several of them together without gRPC.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from splitllm.services.common.errors import ServiceError, invalid
from splitllm.services.common.manifest import LOGIT_ROWS, load_manifest, stage_files
from splitllm.services.stage import cpu_kernels
from splitllm.services.stage.kv import KVPool, Session

BACKENDS = ("cpu", "qnn")
log = logging.getLogger("splitllm.stage")


@dataclass(frozen=True)
class Entry:
    """One session's step: `rows` token ids (first stage) or hidden states, starting at `position`. `logit_rows`: the
    last stage answers logits for this many last rows (a speculative step's draft tokens and the token before them)."""

    session_id: str
    position: int
    data: np.ndarray
    logit_rows: int = 1


SPIN_US = 50  # how long an idle intra-op thread spins before it sleeps (ONNX Runtime's own default spins longer)


def session_options(threads: int, spin: bool = False, kernels: str | None = None,
                    cpus: Sequence[int] = ()) -> ort.SessionOptions:
    """`spin`: between the nodes of a run, an idle intra-op thread spins for up to SPIN_US before it sleeps, and
    stops when the run returns (force_spinning_stop). A decode step is ~20 small nodes per layer: waking sleeping
    workers at each one costs what the second thread saves (2 sleeping threads decode no faster than 1). Nodes
    follow each other within microseconds, so a short spin catches them; ONNX Runtime's default spin lasts
    longer and keeps a core busy that another stage wants. Same-run A/B, 4 two-thread stages on 2 cores, 50 us vs the
    default: 1024-token prompt 488 -> 628 tok/s, 16 streams 71 -> 88 tok/s, TTFT and decode unchanged (before
    decode batching). Against 1-thread sleeping stages, with decode batching: TTFT at 32 tokens 88 -> 56 ms, decode
    18.0 -> 14.1 ms per token, 16 streams 250 -> 201 tok/s. Off by default for a stage started alone (1 thread: stages
    share the cores); `splitllm serve` turns it on when one stage computes at a time (launcher.spins_by_default).
    `kernels`: another build of our CPU kernel library than the package's (bench/kernel_ab.py).
    `cpus`: the CPUs of the stage's compute: ONNX Runtime's worker threads are pinned to the second and later ones in
    turn (the first is the calling thread's: pin_caller)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.register_custom_ops_library(kernels or cpu_kernels.library_path())
    if cpus and threads > 1:
        workers = cpus[1:] or cpus
        so.add_session_config_entry("session.intra_op_thread_affinities",  # logical processors numbered from 1
                                    ";".join(str(workers[i % len(workers)] + 1) for i in range(threads - 1)))
    return so


def check_cpus(cpus: Sequence[int]) -> None:
    """ValueError naming the CPUs this process may use, unless `cpus` are among them."""
    allowed = os.sched_getaffinity(0)
    if not set(cpus) <= allowed:
        raise ValueError(f"CPUs {','.join(map(str, cpus))} are not all available to this process (available: "
                         f"{','.join(map(str, sorted(allowed)))})")


_pinned = threading.local()


def pin_caller(cpu: int) -> None:
    """Pin the calling thread to `cpu`, once per thread (a stage runs token steps on its event loop's thread and
    prompt steps in a worker)."""
    if getattr(_pinned, "cpu", None) != cpu:
        os.sched_setaffinity(0, {cpu})
        _pinned.cpu = cpu


class _OneRowBuffers:
    """Input, seqlens, total length and output of one-row steps (decode), for up to `rows` sessions at once, bound
    once into every slot range's I/O binding (as views of their first B rows); each step writes into them and copies
    its output out. Binding them anew on every step cost ~90 us of a stage's decode step (bind_output ~40 us, each
    input ~18 us with the caches cold after the run; 8 and 2 us hot). One set serves all bindings: runs happen one at
    a time (under the runtime's lock), and the rows of batch sizes never used stay unmapped (np.zeros)."""

    def __init__(self, rows: int, graph: CpuGraph) -> None:
        self.seqlens = np.zeros(rows, np.int32)
        self.total = np.zeros((), np.int32)
        self.x = np.zeros((rows, 1, *graph.row_shape), graph.input_dtype)
        self.out = np.zeros((rows, graph.width) if graph.output == "logits" else (rows, 1, graph.width), np.float32)
        self.total_value = ort.OrtValue.ortvalue_from_numpy(self.total)
        self.views: dict[int, tuple[ort.OrtValue, ort.OrtValue, ort.OrtValue]] = {}

    def values(self, batch: int) -> tuple[ort.OrtValue, ort.OrtValue, ort.OrtValue]:
        """OrtValues over the first `batch` rows of seqlens, x and out."""
        v = self.views.get(batch)
        if v is None:
            v = self.views[batch] = tuple(
                ort.OrtValue.ortvalue_from_numpy(a[:batch]) for a in (self.seqlens, self.x, self.out))
        return v


class CpuGraph:
    """The stage's dynamic-length CPU graph; KV bound in place, through one reusable I/O binding per slot range."""

    def __init__(self, path: Path, threads: int, output: str, spin: bool = False, cpus: Sequence[int] = ()) -> None:
        self.session = ort.InferenceSession(
            str(path), session_options(threads, spin, cpus=cpus), providers=["CPUExecutionProvider"]
        )
        self.cpus = tuple(cpus)
        self.output = output
        meta = next(o for o in self.session.get_outputs() if o.name == output)
        self.width = meta.shape[-1]  # hidden size or vocabulary
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.batched = not isinstance(inputs["seqlens_k"].shape[0], int)  # exported before decode batching: B = 1
        cache = next(i for name, i in inputs.items() if name.startswith("past_key."))
        self.kv_dtype = np.float16 if cache.type == "tensor(float16)" else np.float32  # float16 with our Attention
        self.input = "input_ids" if "input_ids" in inputs else "hidden_in"
        self.input_dtype = np.int32 if self.input == "input_ids" else np.float32
        self.row_shape = () if self.input == "input_ids" else (inputs["hidden_in"].shape[-1],)
        self.logit_rows = np.ones(1, np.int64) if LOGIT_ROWS in inputs else None  # bound into every binding, in place
        self.logit_rows_value = ort.OrtValue.ortvalue_from_numpy(self.logit_rows) if LOGIT_ROWS in inputs else None
        self.bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self.one_row: set[tuple[int, int]] = set()  # bindings whose input and output are the one-row buffers now
        self.buffers: _OneRowBuffers | None = None

    def run(self, kv: KVPool, lo: int, x: np.ndarray, seqlens: np.ndarray, logit_rows: int = 1) -> np.ndarray:
        """Sequences in the KV slots lo..lo+B-1 (B = len(seqlens)), S = rows / B new rows each, the last at
        position seqlens[b]. Returns hidden states [B, S, hidden] or the logits of each sequence's last `logit_rows`
        rows [B * logit_rows, vocab] (logit_rows > 1 needs a graph with that input and B = 1)."""
        batch, key = len(seqlens), (lo, len(seqlens))
        if self.cpus:
            pin_caller(self.cpus[0])
        if self.buffers is None:
            self.buffers = _OneRowBuffers(kv.capacity, self)
        buf = self.buffers
        seq_value, x_value, out_value = buf.values(batch)
        b = self.bindings.get(key)
        if b is None:
            b = self.bindings[key] = self.session.io_binding()
            for name, cache in kv.slots(lo, lo + batch).items():
                value = ort.OrtValue.ortvalue_from_numpy(cache)
                b.bind_ortvalue_input(name, value)
                b.bind_ortvalue_output(name.replace("past_", "present_"), value)
            b.bind_ortvalue_input("seqlens_k", seq_value)
            b.bind_ortvalue_input("total_sequence_length", buf.total_value)
            if self.logit_rows_value is not None:
                b.bind_ortvalue_input(LOGIT_ROWS, self.logit_rows_value)
        rows = x.shape[0] // batch
        buf.seqlens[:batch] = seqlens
        buf.total[...] = seqlens.max() + 1
        if self.logit_rows is not None:
            self.logit_rows[0] = logit_rows
        if rows == 1:
            if key not in self.one_row:
                b.bind_ortvalue_input(self.input, x_value)
                b.bind_ortvalue_output(self.output, out_value)
                self.one_row.add(key)
            buf.x[:batch].reshape(x.shape)[...] = x
            self.session.run_with_iobinding(b)
            return buf.out[:batch].copy()  # the buffer is the next step's: a caller may hold this past it
        self.one_row.discard(key)
        b.bind_cpu_input(self.input, x.reshape(batch, rows, *x.shape[1:]))
        # Into a fresh array: get_outputs() would wrap every present KV output too (~30 us per run).
        shape = (batch * logit_rows, self.width) if self.output == "logits" else (batch, rows, self.width)
        out = np.empty(shape, np.float32)
        b.bind_output(self.output, "cpu", element_type=np.float32, shape=out.shape, buffer_ptr=out.ctypes.data)
        self.session.run_with_iobinding(b)
        return out


class StageRuntime:
    def __init__(
        self,
        artifacts: str | Path,
        stage: int,
        backend: str = "cpu",
        kv_capacity: int = 16,
        threads: int | None = None,
        verify: bool = True,
        allow_cpu_fallback: bool = False,
        spin: bool = False,
        cpus: Sequence[int] = (),
    ) -> None:
        """`cpus`: pin the CPU graph's compute (the thread that runs it to the first, ONNX Runtime's workers to the
        others; launcher.stage_cpus says when); empty: unpinned."""
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not supported (allowed: {', '.join(BACKENDS)})")
        root = Path(artifacts)
        manifest, _ = load_manifest(root, verify=[])
        if not 0 <= stage < manifest.num_stages:
            raise ValueError(
                f"stage {stage + 1} does not exist: the artifact has {manifest.num_stages} stages"
            )
        self.manifest, self.manifest_sha256 = load_manifest(
            root, verify=stage_files(manifest, stage, backend) if verify else []
        )
        self.stage, self.backend = stage, backend
        self.plan = self.manifest.stages[stage]
        cfg = self.manifest.model
        self.first, self.last = self.plan.first_layer, self.plan.last_layer
        self.context, self.prefill = self.manifest.context_length, self.manifest.prefill_length
        g = self.plan.graph(backend, "pp")
        kv = self.manifest.kv
        if backend == "cpu" and kv.get("attention") == "ai.splitllm Attention" and kv["dtype"] != "float16":
            raise ValueError(f"{root} runs Attention over a {kv['dtype']} KV cache (exported before its float16 "
                             "cache, which this build's op takes): export the artifact again")
        threads = threads or min(2, os.cpu_count() or 1)
        check_cpus(cpus)
        if backend == "qnn":
            from splitllm.services.stage.qnn import QnnGraph

            self.graph = QnnGraph.from_manifest(root, self.manifest, stage, threads, allow_cpu_fallback)
        else:
            self.graph = CpuGraph(root / g.file, threads, g.outputs[0].name, spin, cpus)
        self.kv = KVPool(
            range(self.first, self.last), cfg.num_kv_heads, self.context, cfg.head_dim, kv_capacity,
            getattr(self.graph, "kv_shapes", None), getattr(self.graph, "kv_dtype", np.float32),
        )
        self.is_first, self.is_last = self.plan.has_embedding, self.plan.has_lm_head
        # Every stage checks an entry's logit_rows against the artifact, before the step changes anything anywhere.
        self.multi_row_logits = self.manifest.multi_row_logits(backend)
        self.hidden = cfg.hidden_size
        self.lock = threading.Lock()  # one graph run at a time: the cores are shared with other stages

    def check(self, e: Entry) -> None:
        """Validate an entry against this stage before anything changes."""
        rows = e.data.shape[0] if e.data.ndim else 0
        if self.is_first:
            if e.data.dtype != np.int32 or e.data.ndim != 1:
                raise invalid(
                    f"stage 1 takes int32 token ids of shape [n]; got {e.data.dtype} {list(e.data.shape)}"
                )
            if rows and (e.data.min() < 0 or e.data.max() >= self.manifest.model.vocab_size):
                raise invalid(f"token ids must be in [0, {self.manifest.model.vocab_size})")
        elif e.data.dtype != np.float32 or e.data.ndim != 2 or e.data.shape[1] != self.hidden:
            raise invalid(
                f"stage {self.stage + 1} takes float32 hidden states of shape [n, {self.hidden}]; "
                f"got {e.data.dtype} {list(e.data.shape)}"
            )
        if not 1 <= rows <= self.prefill:
            raise invalid(f"an entry carries 1 to {self.prefill} tokens (the prefill length); got {rows}")
        if e.position < 0 or e.position + rows > self.context:
            raise invalid(
                f"positions {e.position}..{e.position + rows - 1} are outside the context "
                f"(0..{self.context - 1})"
            )
        if e.logit_rows != 1:
            if not 1 <= e.logit_rows <= rows:
                raise invalid(f"logits.rows must be 0 or 1 (the last row) up to the entry's {rows} rows; "
                              f"got {e.logit_rows}")
            if not self.multi_row_logits:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"this artifact's last stage ({self.backend}) answers the last row's logits only "
                                   "(logits.rows 0 or 1); export the artifact again for more (CPU)")

    def forward(self, e: Entry) -> np.ndarray:
        """Run one entry; returns hidden states [n, hidden] or, at the last stage, logits [vocab] (or [logit_rows,
        vocab] when logit_rows > 1)."""
        out = self.forward_many([e])[0]
        if isinstance(out, ServiceError):
            raise out
        return out

    def forward_many(self, entries: list[Entry]) -> list[np.ndarray | ServiceError]:
        """Run a request's entries; per entry its output (as `forward`) or the error that stopped it alone.

        A failed entry changes nothing. Single-token steps of two or more sessions run as one batched graph
        run when the graph has a batch dimension (the weights are read once for all of them)."""
        results: list[np.ndarray | ServiceError | None] = [None] * len(entries)
        named: set[str] = set()
        for i, e in enumerate(entries):
            try:
                self.check(e)
                if e.session_id in named:
                    raise invalid(f"entries name session {e.session_id!r} twice; one step per session per Forward")
                named.add(e.session_id)
            except ServiceError as err:
                results[i] = err
        with self.lock:  # session lengths change only under this lock, so a batch sees them all settled
            sessions: dict[int, Session] = {}
            for i, e in enumerate(entries):
                if results[i] is None:
                    try:
                        sessions[i] = self._session(e)
                    except ServiceError as err:
                        results[i] = err
            steps = [i for i in sessions if entries[i].data.shape[0] == 1 and entries[i].position > 0]
            batch = steps if len(steps) > 1 and self.graph.batched else []
            if batch:
                self._run_batch([entries[i] for i in batch], [sessions[i] for i in batch], batch, results)
            for i in sessions.keys() - set(batch):
                results[i] = self._run_one(entries[i], sessions[i])
        return results  # type: ignore[return-value]

    def _session(self, e: Entry) -> Session:
        """The entry's session; a step before its end first drops the tokens from there on (a speculative step's
        draft tokens that the coordinator rejected), so a step that fails leaves the session at its position."""
        s = self.kv.create(e.session_id) if e.position == 0 else self.kv.get(e.session_id)
        if e.position > s.length:
            raise invalid(
                f"session {e.session_id!r} is at position {s.length}; got a step at {e.position} "
                f"(a step continues the session at {s.length}, or goes back to an earlier position)"
            )
        s.length = e.position
        return s

    def _run_one(self, e: Entry, s: Session) -> np.ndarray | ServiceError:
        n = e.data.shape[0]
        try:
            if isinstance(self.graph, CpuGraph):
                out = self.graph.run(self.kv, s.slot, e.data, np.array([e.position + n - 1], np.int32), e.logit_rows)
                out = out if self.is_last and e.logit_rows > 1 else out[0]
            else:
                out = self.graph.run(s, e.data, e.position)
        except Exception as err:  # noqa: BLE001  the runtime failed this entry; it must not take the others
            log.exception("stage %d failed a step of session %s", self.stage + 1, e.session_id)
            if e.position == 0:
                self.kv.release(e.session_id)
            return self._failed(err)
        s.length, s.last_used = e.position + n, time.monotonic()
        return out

    def _run_batch(self, entries: list[Entry], sessions: list[Session], index: list[int],
                   results: list[np.ndarray | ServiceError | None]) -> None:
        """One token of each session in one run over their slots, gathered into one block first."""
        self._gather(sessions)
        lo = min(s.slot for s in sessions)
        x = np.empty((len(sessions), *entries[0].data.shape[1:]), entries[0].data.dtype)
        seqlens = np.empty(len(sessions), np.int32)
        for e, s in zip(entries, sessions, strict=True):
            x[s.slot - lo], seqlens[s.slot - lo] = e.data[0], e.position
        try:
            out = self.graph.run(self.kv, lo, x, seqlens)
        except Exception as err:  # noqa: BLE001
            log.exception("stage %d failed a batch of %d sessions", self.stage + 1, len(sessions))
            error = self._failed(err)
            for i in index:
                results[i] = error
            return
        now = time.monotonic()
        for i, e, s in zip(index, entries, sessions, strict=True):
            results[i] = out[s.slot - lo]
            s.length, s.last_used = e.position + 1, now

    def _failed(self, err: Exception) -> ServiceError:
        return ServiceError(grpc.StatusCode.INTERNAL, f"stage {self.stage + 1} failed the step: {err}")

    def _gather(self, sessions: list[Session]) -> None:
        """Move a batch's sessions into one block of consecutive slots (the block that holds most of them
        already), swapping KV with the sessions there: a run spans consecutive slots, and a slot between
        members would cost a row of compute like a member's (16 streams, 1.9 rows per member without this).
        The coordinator keeps a batch's members together from step to step, so moves are paid only when its
        groups change."""
        k, slots = len(sessions), {s.slot for s in sessions}
        if max(slots) - min(slots) < k:
            return
        free = set(self.kv.free)

        def fit(lo: int) -> tuple[int, int, int]:  # fewest moves, then fewest other sessions moved, then low
            block = set(range(lo, lo + k))
            return len(slots & block), len(free & block), -lo

        lo = max(range(self.kv.capacity - k + 1), key=fit)
        targets = [t for t in range(lo, lo + k) if t not in slots]
        for s, t in zip([s for s in sessions if not lo <= s.slot < lo + k], targets, strict=True):
            self.kv.move(s, t)

    def release(self, session_id: str) -> bool:
        with self.lock:  # not during a run, which writes into its slots and may move sessions between slots
            return self.kv.release(session_id)

    def expire(self, ttl: float) -> list[str]:
        with self.lock:
            return self.kv.expire(ttl)
