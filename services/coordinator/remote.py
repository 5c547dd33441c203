"""The Pipeline over gRPC: a route of stage addresses, one per stage.

Steps go out on one long-lived ForwardStream to stage 1; each stage passes them on; the last stage
pushes the answer to the Results stream this coordinator holds open on it. The coordinator also
subscribes on every other stage, which report failed steps and entries there; when any subscription
breaks (a stage died) or a stage reports that its stream to the next stage broke, every step in flight
fails at once with UNAVAILABLE instead of waiting.

Decode batching (iteration-level): the token steps of concurrent sessions go out together, one request
of many entries that each stage runs as one batched graph run. Up to `batches_in_flight` such requests
are in the pipeline at once (2: two stages computing at the same time on 2 cores), each with an even
share of the decoding sessions. The sessions of a batch that was just answered are expected back
together: their next steps wait for each other, for at most GROUP_WAIT, so the group stays whole. A
single stream never waits: its step goes out as soon as it is submitted.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitllm.protos import stage_pb2, stage_pb2_grpc
from splitllm.services.common import trace
from splitllm.services.common.errors import ServiceError, from_code, unavailable
from splitllm.services.common.grpc_util import CHANNEL_OPTIONS, READ_STREAMS_IN_CALLER
from splitllm.services.common.manifest import Manifest
from splitllm.services.common.streams import OutStream
from splitllm.services.common.tensor import from_proto, to_proto
from splitllm.services.coordinator.pipeline import Logits, Pending, failed

log = logging.getLogger("splitllm.coordinator")
STEP_TIMEOUT = 60.0  # a step of a live pipeline takes milliseconds; this only bounds a hung stage
MIN_CHUNK = 16  # measured: 16-token chunks still win (32-token TTFT 77 -> 70 ms); smaller lose
# s that a batch's sessions wait for the rest of their group before going out without them. Same-run A/B (5 turns):
# 0.5 ms lost 11 % at 4 streams and 6 % at 16; 5 ms was within noise of 2 ms (16 streams +3 %, 4 streams 0).
GROUP_WAIT = 0.002
# s that submit() waits for its token step to be sent before the caller goes on to the token's text and reply. Without
# it gRPC's sending thread waited for the GIL while the caller did that work (hop trace: submitted -> sent 170-190 ->
# 50-60 us; bench/pipeline_ab.py, 30 rounds: TPOT -3.8 %, lower in 23). It only bounds a stream that broke meanwhile.
SENT_WAIT = 0.005


def prefill_chunk(tokens: int, prefill_length: int, stages: int, spread: bool) -> int:
    """Prompt chunk size. Stage k+1 runs chunk 1 while stage k runs chunk 2, so with `spread` a prompt goes
    in about one chunk per stage (at least MIN_CHUNK tokens, at most the prefill length), balanced: no
    1-token tail. Through 4 one-thread stages on 2 cores: TTFT at 32 / 128 tokens 80 -> 70 / 290 -> 200 ms.
    Not when the stages cannot overlap (2-thread stages on 2 cores: 177 -> 208 ms at 128 tokens) and not for
    fixed-shape graphs (qnn), which pad every chunk to the prefill length."""
    if not spread:
        return prefill_length
    size = min(prefill_length, max(MIN_CHUNK, -(-tokens // stages)))
    chunks = max(-(-tokens // prefill_length), tokens // size, 1)  # rounding may only grow a chunk
    return -(-tokens // chunks)


class _Pending:
    """One session's entry of a step, until its result or error arrives."""

    __slots__ = ("event", "result", "error", "step_id", "last", "sent")

    def __init__(self, last: bool = False) -> None:
        self.event = threading.Event()
        self.sent: threading.Event | None = None  # set once gRPC has sent the step (decode steps)
        self.result: stage_pb2.EntryResult | None = None
        self.error: ServiceError | None = None
        self.step_id = 0
        self.last = last  # the session's last step: the stages free it as the step runs


@dataclass
class _Step:
    session_id: str
    position: int
    token: int
    top_k: int
    pending: _Pending


class RemotePipeline:
    def __init__(self, manifest: Manifest, manifest_sha256: str, addresses: list[str],
                 spread_prompts: bool = True, batches_in_flight: int = 2, prompt_window: int = 2) -> None:
        """`spread_prompts`: prompt chunks overlap across stages (prefill_chunk); the stages must have
        cores to spare for that, which only the deployment knows. `batches_in_flight`: decode batches in
        the pipeline at once. `prompt_window`: prompt chunks of one session in the pipeline at once."""
        if batches_in_flight < 1 or prompt_window < 1:
            raise ValueError(f"batches_in_flight and prompt_window must be at least 1 "
                             f"(got {batches_in_flight} and {prompt_window})")
        if len(addresses) != manifest.num_stages:
            n = manifest.num_stages
            raise ValueError(f"--stages names {len(addresses)} addresses; the artifact has {n} stages")
        self.manifest, self.manifest_sha256 = manifest, manifest_sha256
        self.route = list(addresses)
        self.channels = [grpc.insecure_channel(a, CHANNEL_OPTIONS + READ_STREAMS_IN_CALLER) for a in addresses]
        self.stubs = [stage_pb2_grpc.StageStub(c) for c in self.channels]
        self.health = [health_pb2_grpc.HealthStub(c) for c in self.channels]
        self.subscriber_id = f"coordinator-{uuid.uuid4().hex[:12]}"
        self.spread_prompts = spread_prompts
        self.fixed_rows = True  # until check() has seen every stage run a dynamic-length (cpu) graph
        self.multi_row_logits = False  # until check() has seen that every stage's backend answers several rows
        self.pending: dict[int, dict[str, _Pending]] = {}  # step id -> session id -> entry not answered yet
        self.cv = threading.Condition()  # guards pending and the decode batcher's state below
        self.batches_in_flight, self.prompt_window = batches_in_flight, prompt_window
        self.decode_steps: set[int] = set()  # decode batches in flight (not answered in full)
        self.queue: list[_Step] = []  # decode steps not sent yet, oldest first
        self.expected: set[str] = set()  # sessions of a just-answered batch whose next step has not come yet
        self.expected_since = 0.0
        self.step_ids = itertools.count(1)
        self.closed = threading.Event()
        self.freed: set[str] = set()  # sessions whose last step ran on every stage, which freed them there
        self.releasing = 0  # releases not answered by every stage yet
        self.released = threading.Condition()  # guards releasing
        self.subscribed = [threading.Event() for _ in addresses]
        self.calls: list[grpc.Future | None] = [None] * len(addresses)
        self.out = OutStream(self.stubs[0], addresses[0],
                             on_break=lambda a, _: self._fail_all(unavailable(f"the stream to stage 1 at {a} broke")))
        for k in range(len(addresses)):
            threading.Thread(target=self._subscribe, args=(k,), name=f"results-{k + 1}", daemon=True).start()
        threading.Thread(target=self._batch_timer, name="decode-batcher", daemon=True).start()

    def _subscribe(self, k: int) -> None:
        """Keep a Results stream open on stage k; deliver answers; on a break, fail every step in flight."""
        while not self.closed.is_set():
            call = self.stubs[k].Results(stage_pb2.ResultsRequest(subscriber_id=self.subscriber_id),
                                         wait_for_ready=True)
            self.calls[k] = call
            try:
                for msg in call:
                    trace.event(msg.step_id, "answer_in")
                    if msg.step_id == 0:  # confirmed, or (with a code) every step in flight there is lost
                        if msg.code:
                            self._fail_all(from_code(msg.code, f"stage {k + 1} at {self.route[k]}: {msg.message}"))
                        else:
                            self.subscribed[k].set()
                        continue
                    self._answer(msg)
            except grpc.RpcError:
                pass
            if self.subscribed[k].is_set():
                self.subscribed[k].clear()
                self._fail_all(unavailable(f"stage {k + 1} at {self.route[k]} is unavailable"))
            self.closed.wait(0.2)

    def _answer(self, msg: stage_pb2.ForwardResponse) -> None:
        """Deliver a step's results (all or some of its entries), or fail the rest of it (msg.code)."""
        done: list[_Pending] = []
        with self.cv:
            waiting = self.pending.get(msg.step_id)
            if waiting is None:
                return
            if msg.code:
                error = from_code(msg.code, msg.message)
                for p in waiting.values():
                    p.error = error
                done, answered = list(waiting.values()), []
                waiting.clear()
            else:
                answered = []
                for r in msg.results:
                    p = waiting.pop(r.session_id, None)
                    if p is not None:
                        p.result = r
                        done.append(p)
                        if not r.code:
                            answered.append(r.session_id)
            if answered and msg.step_id in self.decode_steps:  # they come back together unless they finish
                self.expected.update(answered)
                self.expected_since = time.monotonic()
            self._retire(msg.step_id)
        for p in done:
            p.event.set()

    def _retire(self, step_id: int) -> None:
        """A step with no entry left to answer is no longer in flight (called with self.cv held)."""
        if not self.pending.get(step_id, True):
            del self.pending[step_id]
            self.decode_steps.discard(step_id)
            self._pump()

    def _fail_all(self, error: ServiceError) -> None:
        with self.cv:
            pending, self.pending = self.pending, {}
            self.decode_steps.clear()
            self.expected.clear()
            self._pump()
        for waiting in pending.values():
            for p in waiting.values():
                p.error = error
                p.event.set()

    def addresses(self) -> list[str]:
        return list(self.route)

    def check(self, timeout: float = 10.0) -> None:
        """The stages serve this manifest and together cover every layer in order; ValueError otherwise."""
        expected_first, backends = 0, set()
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
            backends.add(info.backend)
        if expected_first != self.manifest.model.num_layers:
            raise ValueError(f"the stages cover layers 0..{expected_first - 1} of {self.manifest.model.num_layers}")
        self.fixed_rows = backends != {"cpu"}
        self.multi_row_logits = all(self.manifest.multi_row_logits(b) for b in backends)

    def healthy(self, timeout: float = 1.0) -> bool:
        for h in self.health:
            try:
                r = h.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError:
                return False
            if r.status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True

    def _request(self) -> stage_pb2.ForwardRequest:
        return stage_pb2.ForwardRequest(route=self.route[1:], step_id=next(self.step_ids), reply_to=self.subscriber_id)

    @staticmethod
    def _add_entry(req: stage_pb2.ForwardRequest, session_id: str, position: int, tokens: np.ndarray,
                   top_k: int, last: bool = False, logit_rows: int = 1) -> None:
        e = req.entries.add(session_id=session_id, position=position, num_tokens=len(tokens), release=last)
        e.logits.top_k = top_k
        if logit_rows > 1:
            e.logits.rows = logit_rows
        to_proto(np.ascontiguousarray(tokens, np.int32), e.input)

    def _down(self, wait: float = 0.0) -> ServiceError | None:
        """UNAVAILABLE for the first stage whose Results stream is not open (waiting up to `wait` s for each
        that is reconnecting), or None."""
        for k, ev in enumerate(self.subscribed):
            if not ev.wait(0 if ev.is_set() else wait):
                return unavailable(f"stage {k + 1} at {self.route[k]} is unavailable")
        return None

    def _send(self, session_id: str, position: int, tokens: np.ndarray, top_k: int, last: bool = False,
              logit_rows: int = 1) -> _Pending:
        """A step of its own (a prompt chunk, or a token with draft tokens)."""
        req = self._request()
        self._add_entry(req, session_id, position, tokens, top_k, last, logit_rows)
        p = _Pending(last)
        p.step_id = req.step_id
        with self.cv:  # registered before the check, so a stage dying from here on fails it
            self.pending[req.step_id] = {session_id: p}
        if (error := self._down(wait=2.0)) is not None:
            with self.cv:
                self.pending.pop(req.step_id, None)
            raise error
        trace.event(req.step_id, "submitted")
        self.out.send(req)
        return p

    def _pump(self) -> None:
        """Send queued decode steps while a batch may go out (called with self.cv held)."""
        while self.queue and len(self.decode_steps) < self.batches_in_flight and not self.expected:
            flying = sum(len(self.pending.get(s, ())) for s in self.decode_steps)
            share = -(-(len(self.queue) + flying) // self.batches_in_flight)  # an even share of the sessions
            batch, self.queue = self.queue[:share], self.queue[share:]
            req = self._request()
            for step in batch:
                self._add_entry(req, step.session_id, step.position, np.array([step.token]), step.top_k,
                                step.pending.last)
                step.pending.step_id = req.step_id
            if (error := self._down()) is not None:
                for step in batch:
                    step.pending.error = error
                    step.pending.event.set()
                continue
            self.pending[req.step_id] = {step.session_id: step.pending for step in batch}
            self.decode_steps.add(req.step_id)
            sent = threading.Event()
            for step in batch:
                step.pending.sent = sent
            trace.event(req.step_id, "submitted")
            self.out.send(req, sent.set)
        if self.queue:  # the timer sends them if their group does not come
            self.cv.notify()

    def _not_expected(self, session_id: str) -> None:
        """The batcher stops holding the queued steps for `session_id`, which will not come back through the queue."""
        with self.cv:
            self.expected.discard(session_id)
            self._pump()

    def _batch_timer(self) -> None:
        """Sends the queued steps when the rest of their group has not come within GROUP_WAIT."""
        with self.cv:
            while not self.closed.is_set():
                if self.queue and self.expected and len(self.decode_steps) < self.batches_in_flight:
                    left = self.expected_since + GROUP_WAIT - time.monotonic()
                    if left <= 0:
                        self.expected.clear()
                        self._pump()
                    else:
                        self.cv.wait(left)
                else:
                    self.cv.wait(0.5)

    def _wait(self, p: _Pending) -> Logits:
        woke = p.event.wait(STEP_TIMEOUT)
        trace.event(p.step_id, "answer_taken")
        if not woke:
            with self.cv:  # forget the entry
                waiting = self.pending.get(p.step_id, {})
                for sid in [sid for sid, q in waiting.items() if q is p]:
                    del waiting[sid]
                self._retire(p.step_id)
            raise unavailable(f"no answer from the pipeline within {STEP_TIMEOUT:.0f} s")
        if p.error is not None:
            raise p.error
        r = p.result
        if r.code:
            raise from_code(r.code, r.message)
        if p.last:  # it ran on every stage, and each freed the session after it
            with self.released:
                self.freed.add(r.session_id)
        values = from_proto(r.logits, "logits")
        return Logits(values, from_proto(r.token_ids, "token_ids") if r.HasField("token_ids") else None)

    def submit(self, session_id: str, position: int, tokens: np.ndarray, top_k: int = 0,
               last: bool = False, logit_rows: int = 1) -> Pending:
        """One token goes out in a decode batch; more tokens (a prompt chunk, a token with drafts) as a step of
        their own."""
        if len(tokens) != 1:
            if logit_rows > 1:  # a token step with guesses: its session is back, though not through the batcher
                self._not_expected(session_id)
            try:
                p = self._send(session_id, position, tokens, top_k, last, logit_rows)
            except ServiceError as e:
                return failed(e)
            return lambda: self._wait(p)
        p = _Pending(last)
        with self.cv:
            self.queue.append(_Step(session_id, position, int(tokens[0]), top_k, p))
            self.expected.discard(session_id)
            self._pump()
        if p.sent is not None:  # it went out now: let gRPC's thread send it before this one goes on (SENT_WAIT)
            p.sent.wait(SENT_WAIT)
        return lambda: self._wait(p)

    def prefill(self, session_id: str, tokens: np.ndarray, top_k: int = 0, last: bool = False) -> Logits:
        """Each stage runs its stream in order, so stage 1 works on chunk k+1 while stage 2 works on chunk k.
        While other sessions decode, only `prompt_window` chunks are in the pipeline at once and their token
        steps go in between: a whole prompt ahead of them would stall them for all of its time (8 streams
        and a 1000-token prompt: 1.6 s; window 2: 0.6 s). Alone, every chunk goes at once (window 2 cost up
        to 20 % of a 1000-token prompt's time). Not when the stages share their cores (full chunks, not
        spread): then stages that overlap only compete for them, and one chunk at a time is faster (4 two-thread
        stages on 2 cores, 1024-token prompt, two pipelines taking turns: all at once against one at a time
        -8.9 % (6 of 8 rounds) and -3.6 % (8 of 10); two at a time +5.6 %). Every answer is awaited; the first
        error wins, and no chunk goes out after it."""
        spread = self.spread_prompts and not self.fixed_rows
        p = prefill_chunk(len(tokens), self.manifest.prefill_length, len(self.route), spread)
        starts = list(range(0, len(tokens), p))
        sent: list[_Pending] = []
        error: ServiceError | None = None

        def refill(answered: int) -> None:
            nonlocal error
            if not self.spread_prompts:  # stages that share the cores: one chunk in the pipeline at a time
                limit = min(answered + 2, len(starts))
            elif self.decode_steps or self.queue or self.expected:  # other sessions are decoding
                limit = min(answered + 1 + self.prompt_window, len(starts))
            else:
                limit = len(starts)
            while error is None and len(sent) < limit:
                start = starts[len(sent)]
                final = start + p >= len(tokens)
                try:
                    sent.append(self._send(session_id, start, tokens[start : start + p], top_k if final else 1,
                                           last and final))
                except ServiceError as e:
                    error = e

        refill(-1)
        result: Logits | None = None
        for i, pending in enumerate(sent):
            try:
                result = self._wait(pending)
            except ServiceError as e:
                error = error or e
            refill(i)
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def release(self, session_id: str, then: Callable[[], None] | None = None) -> None:
        """Release on every stage of the route at once and return without waiting (the session has no step in
        flight); `then` runs when all have answered. The chained Release (stage 1 calling stage 2 ...) had held
        a Generate call open 3.7 ms after its last message, awaiting the stages at once 2.6 ms."""
        self._not_expected(session_id)  # a finished session will not come back to its batch
        with self.released:
            freed = session_id in self.freed
            self.freed.discard(session_id)
            if not freed:
                self.releasing += 1
        if freed:  # its last step freed it on every stage: no calls (4 fewer RPCs a request)
            if then is not None:
                then()
            return
        request = stage_pb2.ReleaseRequest(session_id=session_id)
        left = [len(self.route)]

        def answered(addr: str, call: grpc.Future | None) -> None:
            if call is None or call.code() != grpc.StatusCode.OK:
                why = call.code().name if call is not None else "the channel is closed"
                log.warning("release of %s at %s failed: %s", session_id, addr, why)
            with self.released:
                left[0] -= 1
                last = left[0] == 0
                if last:
                    self.releasing -= 1
                    self.released.notify_all()
            if last and then is not None:
                then()

        for addr, stub in zip(self.route, self.stubs, strict=True):
            try:
                stub.Release.future(request, timeout=5).add_done_callback(partial(answered, addr))
            except ValueError:  # closed (close() ran): still count the stage, so that `then` runs
                answered(addr, None)

    def wait_releases(self, timeout: float) -> bool:
        """Wait until every release started has been answered by every stage (at shutdown: releases run after
        their calls, so a stopped server may still have some in flight). False if some are left."""
        with self.released:
            return self.released.wait_for(lambda: self.releasing == 0, timeout)

    def close(self) -> None:
        self.closed.set()
        self.out.close()
        for call in self.calls:
            if call is not None:
                call.cancel()
        for c in self.channels:
            c.close()
