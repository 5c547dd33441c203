"""The coordinator's runtime, testable without sockets: Generate, Tokenize and ModelInfo over a Pipeline.

A Generate call: validate everything (input, sampling, stop ids, context admission) before any stage call;
wait for one of `max_concurrent` slots; prompt processing in chunks of P; then one token per step,
streamed as it is sampled (speculating, a step feeds the token and guesses after it: draft.py). The session
is released on the stages on every way out (`finally`), without holding the call open; its slot frees once every
stage has released it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from splitllm.protos import coordinator_pb2 as pb
from splitllm.services.common.errors import ServiceError, invalid
from splitllm.services.common.manifest import load_manifest
from splitllm.services.common.metrics import CoordinatorMetrics
from splitllm.services.coordinator.draft import PromptLookup, accept
from splitllm.services.coordinator.pipeline import Pending, Pipeline
from splitllm.services.coordinator.sampler import Sampler, SamplingParams, top_k_needed
from splitllm.services.coordinator.text import ChatTemplate, IncrementalDecoder, StopMatcher, TextCodec

ROLES = ("system", "user", "assistant")
# Final status label per error code; any other error (stage NOT_FOUND, INTERNAL, ...) counts as unavailable.
_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: "invalid", grpc.StatusCode.RESOURCE_EXHAUSTED: "exhausted",
           grpc.StatusCode.DEADLINE_EXCEEDED: "deadline", grpc.StatusCode.CANCELLED: "cancelled"}
_REASON = {pb.STOP: "stop", pb.LENGTH: "length", pb.CONTEXT: "context"}
DRAFT_TOKENS = 3  # guesses a step: 4 rows cost ~1.5x one, 5 (the matmul runs them as 4 + 1) ~2x (bench/PERFORMANCE.md)


@dataclass(frozen=True)
class _Job:
    prompt: list[int]
    params: SamplingParams
    budget: int  # tokens that may be generated
    limit: int  # finish reason when the budget runs out: LENGTH (max_tokens) or CONTEXT
    stop_ids: frozenset[int]
    stop: list[str]


def _now(fn: Callable[[], None]) -> None:
    fn()


class Engine:
    """`artifacts`: the artifact directory (tokenizer file; its manifest.json's sha256 for ModelInfo).
    `truncate_to_context`: a prompt + max_tokens beyond the context generates up to the context (finish
    reason CONTEXT) instead of failing with INVALID_ARGUMENT. `max_concurrent`: requests generating at once;
    more wait (queue) until a slot frees, the client cancels or its deadline passes. `draft_tokens`: speculative
    decoding's guesses a step (0 = off), for a request while no other one generates (in company, their
    token steps share batched graph runs, which reads the weights once for all of them already), on pipelines
    whose stages answer logits for several rows."""

    def __init__(self, pipeline: Pipeline, metrics: CoordinatorMetrics | None = None,
                 truncate_to_context: bool = False, *, artifacts: str | Path, max_concurrent: int = 16,
                 draft_tokens: int = DRAFT_TOKENS) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1 (got {max_concurrent})")
        if not 0 <= draft_tokens < pipeline.manifest.prefill_length:
            raise ValueError(f"draft_tokens must be in [0, {pipeline.manifest.prefill_length}) (got {draft_tokens})")
        self.draft_tokens = draft_tokens
        tok = pipeline.manifest.tokenizer
        self.manifest, self.manifest_sha256 = load_manifest(artifacts, verify=[tok["file"]])
        self.pipeline, self.metrics, self.truncate = pipeline, metrics, truncate_to_context
        self.codec = TextCodec.from_file(Path(artifacts) / tok["file"], tok.get("bos_token_id"))
        template = tok.get("chat_template")
        self.template = ChatTemplate(template, tok.get("bos_token", ""), tok.get("eos_token", "")) if template \
            else None
        ids = [*tok.get("stop_token_ids", []), tok.get("eos_token_id")]
        self.stop_ids = [i for i in dict.fromkeys(ids) if i is not None]
        self.max_concurrent, self._running = max_concurrent, 0
        self._slots = threading.Condition()

    # --- input -------------------------------------------------------------------------------------------

    def _messages(self, chat: pb.ChatMessages) -> list[dict]:
        if not chat.messages:
            raise invalid("chat.messages is empty: send at least one message")
        for i, m in enumerate(chat.messages):
            if m.role not in ROLES:
                raise invalid(f"chat.messages[{i}].role {m.role!r} is not allowed (allowed: {', '.join(ROLES)})")
        return [{"role": m.role, "content": m.content} for m in chat.messages]

    def _render(self, messages: list[dict]) -> str:
        if not self.template:
            raise invalid("this model has no chat template: send token_ids (or a prompt to Tokenize)")
        try:
            return self.template.render(messages)
        except ValueError as e:
            raise invalid(str(e)) from None

    def _encode(self, text: str) -> list[int]:
        return self.codec.encode(text, add_bos=bool(self.manifest.tokenizer.get("add_bos")))

    def _check_ids(self, field: str, ids) -> None:
        vocab = self.manifest.model.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise invalid(f"{field} must be token ids in [0, {vocab}); got {bad[:5]}")

    def _prompt(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind is None:
            raise invalid("the request has no input: set one of prompt, chat or token_ids")
        if kind == "token_ids":
            if request.system:
                raise invalid("system applies to prompt and chat, not to token_ids")
            ids = list(request.token_ids.ids)
            if not ids:
                raise invalid("token_ids is empty: send at least one token id")
            self._check_ids("token_ids", ids)
            return ids
        if kind == "prompt":
            if not request.prompt:
                raise invalid("prompt is empty")
            messages = [{"role": "user", "content": request.prompt}]
        else:
            messages = self._messages(request.chat)
        if request.system:
            messages.insert(0, {"role": "system", "content": request.system})
        return self._encode(self._render(messages))

    def _admit(self, request: pb.GenerateRequest) -> _Job:
        """Everything a request can get wrong, checked before any stage call."""
        prompt = self._prompt(request)
        params = SamplingParams.from_proto(request.sampling)
        m, n, c = request.max_tokens, len(prompt), self.manifest.context_length
        if m < 0:
            raise invalid(f"max_tokens must be >= 0 (0 = until the context is full); got {m}")
        self._check_ids("stop_token_ids", request.stop_token_ids)
        room = c - n
        if room < 1:
            raise invalid(f"the prompt has {n} tokens and the context length is {c}: "
                          f"a prompt may have at most {c - 1} tokens")
        if m == 0 or (m > room and self.truncate):
            budget, limit = room, pb.CONTEXT
        elif m > room:
            raise invalid(f"prompt tokens ({n}) + max_tokens ({m}) = {n + m} exceed the context length {c}: "
                          f"max_tokens may be at most {room} for this prompt")
        else:
            budget, limit = m, pb.LENGTH
        stop_ids = frozenset([*self.stop_ids, *request.stop_token_ids])
        return _Job(prompt, params, budget, limit, stop_ids, list(request.stop))

    # --- Generate ----------------------------------------------------------------------------------------

    @staticmethod
    def _check(is_cancelled: Callable[[], bool], time_remaining: Callable[[], float | None]) -> None:
        left = time_remaining()
        if left is not None and left <= 0:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        if is_cancelled():
            raise ServiceError(grpc.StatusCode.CANCELLED, "the client cancelled the request")

    def _take_slot(self, is_cancelled: Callable[[], bool], time_remaining: Callable[[], float | None]) -> None:
        m = self.metrics
        with self._slots:
            if self._running >= self.max_concurrent:
                if m:
                    m.waiting.inc()
                try:
                    while self._running >= self.max_concurrent:
                        self._check(is_cancelled, time_remaining)
                        self._slots.wait(0.05)
                finally:
                    if m:
                        m.waiting.dec()
            self._running += 1
        if m:
            m.running.inc()

    def _free_slot(self) -> None:
        with self._slots:
            self._running -= 1
            self._slots.notify()
        if self.metrics:
            self.metrics.running.dec()

    def generate(self, request: pb.GenerateRequest, is_cancelled: Callable[[], bool] = lambda: False,
                 time_remaining: Callable[[], float | None] = lambda: None,
                 after_call: Callable[[Callable[[], None]], None] = _now) -> Iterator[pb.GenerateResponse]:
        """Stream one response per generated token; the last carries finish_reason and usage. `after_call`
        runs the session's release once the call has ended (the gRPC server's context.add_callback). Same-run A/B,
        a call's last message to its end: 3.1 ms releasing inside the call, 0.46 ms after it (0.40 without).

        Errors are ServiceError (CANCELLED and DEADLINE_EXCEEDED included), raised from the iterator.
        """
        t0, status = time.monotonic(), "unavailable"
        try:
            job = self._admit(request)
            self._take_slot(is_cancelled, time_remaining)
            yield from self._run(job, t0, is_cancelled, time_remaining, after_call)  # frees the slot
            status = "ok"
        except ServiceError as e:
            status = _STATUS.get(e.code, "unavailable")
            raise
        except GeneratorExit:  # the consumer stopped reading: the client went away or its deadline passed
            left = time_remaining()
            status = "deadline" if left is not None and left <= 0 else "cancelled"
            raise
        finally:
            if self.metrics:
                self.metrics.requests[status].inc()
                self.metrics.request_seconds.observe(time.monotonic() - t0)

    def _run(self, job: _Job, t0: float, is_cancelled: Callable[[], bool],
             time_remaining: Callable[[], float | None],
             after_call: Callable[[Callable[[], None]], None]) -> Iterator[pb.GenerateResponse]:
        """Runs in a slot, which it frees once every stage has released the session: the release starts after
        the call, but a new request cannot take the session's KV before it is done."""
        m = self.metrics
        sid = f"gen-{uuid.uuid4().hex}"
        pending: Pending | None = None  # the step in flight while a token goes out to the client
        try:
            sampler, k = Sampler(job.params, job.params.seed), top_k_needed(job.params)
            decoder, stopper = IncrementalDecoder(self.codec), StopMatcher(job.stop)
            history, n = list(job.prompt), len(job.prompt)
            speculate = self.draft_tokens > 0 and self.pipeline.multi_row_logits
            lookup = PromptLookup(history) if speculate else None
            self._check(is_cancelled, time_remaining)
            if m:
                m.queue_seconds.observe(time.monotonic() - t0)
            # A step whose token would reach the budget is the session's last, whatever it samples: the stages
            # free the session as it runs (the release after the call then makes no calls).
            logits = self.pipeline.prefill(sid, np.asarray(history, np.int32), k, last=job.budget <= 1)
            if m:
                m.prompt_tokens.inc(n)
            drafts: list[int] = []  # the guesses fed in the step that answered `logits`
            t_first = t_prev = 0.0
            while True:
                tokens = accept(sampler, logits, drafts, history, job.stop_ids, n + job.budget)
                if lookup is not None:
                    lookup.extend(tokens)
                    if m and drafts:
                        kept = sum(t == d for t, d in zip(tokens, drafts, strict=False))
                        m.draft_tokens["accepted"].inc(kept)
                        m.draft_tokens["rejected"].inc(len(drafts) - kept)
                now, generated = time.monotonic(), len(history) - n
                stop_token = tokens[-1] in job.stop_ids
                if not (stop_token or generated >= job.budget or job.stop):
                    # Only the tokens decide whether a step follows: it goes out now, and the text work below
                    # overlaps with it (with stop strings, the text decides, so the step waits for it).
                    pending, drafts = self._next_step(sid, history, k, job.budget - generated, lookup)
                for i, token in enumerate(tokens):
                    count = generated - len(tokens) + 1 + i  # this token's number
                    if m:
                        m.generated_tokens.inc()
                        if count > 1:
                            m.inter_token_seconds.observe(now - t_prev)
                    if count == 1:
                        t_first = now
                        if m:
                            m.ttft_seconds.observe(now - t0)
                    t_prev = now

                    match = stopper.push("" if token in job.stop_ids else decoder.push(token))
                    text = match.text
                    finish = pb.STOP if token in job.stop_ids or match.stop is not None else None
                    if finish is None and count >= job.budget:
                        finish = job.limit
                    if finish is not None and match.stop is None:  # the end: nothing may stay held back
                        tail = stopper.push(decoder.flush())
                        text += tail.text if tail.stop is not None else tail.text + stopper.flush()
                        finish = pb.STOP if tail.stop is not None else finish

                    out = pb.GenerateResponse(text=text, token_ids=[token])
                    if finish is not None:
                        after = now - t_first
                        out.finish_reason = finish
                        out.usage.CopyFrom(pb.Usage(
                            prompt_tokens=n, completion_tokens=count, ttft_seconds=t_first - t0,
                            tokens_per_second=(count - 1) / after if after > 0 else 0.0,
                            total_seconds=now - t0))
                        if m:
                            m.finish_reasons[_REASON[finish]].inc()
                            if count > 1:
                                m.tpot_seconds.observe(after / (count - 1))
                        yield out
                        return
                    if pending is None and i == len(tokens) - 1:
                        pending, drafts = self._next_step(sid, history, k, job.budget - generated, lookup)
                    yield out
                self._check(is_cancelled, time_remaining)
                logits, pending = pending(), None
        finally:
            if pending is not None:  # let the step in flight finish before its session is released
                with suppress(ServiceError):
                    pending()
            after_call(lambda: self.pipeline.release(sid, then=self._free_slot))

    def _next_step(self, sid: str, history: list[int], top_k: int, room: int,
                   lookup: PromptLookup | None) -> tuple[Pending, list[int]]:
        """The step that feeds the newest token of `history` to the stages, with guesses after it when speculating
        and alone (`room`: the tokens the budget still allows, the one this step answers included); and them."""
        drafts = lookup.draft(min(self.draft_tokens, room - 1)) if lookup is not None and self._running == 1 else []
        tokens = np.array(history[-1:] + drafts, np.int32)
        return self.pipeline.submit(sid, len(history) - 1, tokens, top_k, last=room <= 1,
                                    logit_rows=len(tokens)), drafts

    # --- Tokenize, ModelInfo -----------------------------------------------------------------------------

    def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        """Text is tokenized as is; chat is rendered and tokenized exactly as Generate would."""
        if request.WhichOneof("input") == "chat":
            text = self._render(self._messages(request.chat))
            ids = self._encode(text)
        else:
            text = request.text
            ids = self.codec.encode(text)
        return pb.TokenizeResponse(ids=ids, tokens=self.codec.token_strings(ids), rendered=text)

    def model_info(self, request: pb.ModelInfoRequest | None = None) -> pb.ModelInfoResponse:
        mf, cfg = self.manifest, self.manifest.model
        groups = mf.quantization.get("groups", mf.quantization)
        quant = ", ".join(f"{name}: {g['bits']}-bit" for name, g in groups.items()
                          if isinstance(g, dict) and "bits" in g)
        return pb.ModelInfoResponse(
            name=cfg.name, architecture=cfg.architecture, num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            vocab_size=cfg.vocab_size, context_length=mf.context_length, prefill_length=mf.prefill_length,
            num_stages=mf.num_stages, manifest_sha256=self.manifest_sha256,
            stage_addresses=self.pipeline.addresses(), quantization=quant, stop_token_ids=self.stop_ids)
