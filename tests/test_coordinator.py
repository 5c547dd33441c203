import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import CollectorRegistry

from splitllm.protos import coordinator_pb2 as pb
from splitllm.protos import coordinator_pb2_grpc as pb_grpc
from splitllm.services.common.errors import ServiceError
from splitllm.services.common.manifest import ManifestError
from splitllm.services.common.metrics import CoordinatorMetrics
from splitllm.services.coordinator.engine import Engine
from splitllm.services.coordinator.pipeline import LocalPipeline, Logits, top_k_logits
from splitllm.services.coordinator.sampler import Sampler, SamplingParams, draw, nucleus, top_k_needed
from splitllm.services.coordinator.server import SERVICE_NAME, serve_coordinator

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def artifacts(smollm2_artifacts) -> Path:
    return smollm2_artifacts


@pytest.fixture(scope="module")
def pipeline(artifacts) -> LocalPipeline:
    return LocalPipeline(str(artifacts), kv_capacity=4)


@pytest.fixture(scope="module")
def prompts(reference) -> list[dict]:
    """llama.cpp's greedy answers to the sample prompts."""
    return reference["prompts"]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def engine(pipeline, artifacts, registry) -> Engine:
    return Engine(pipeline, CoordinatorMetrics(registry), artifacts=artifacts)


def sessions(pipeline: LocalPipeline) -> list[int]:
    return [s.kv.in_use for s in pipeline.chain.stages]


def status_count(registry: CollectorRegistry, status: str) -> float:
    return registry.get_sample_value("splitllm_requests_total", {"status": status})


def run(engine: Engine, **kw) -> tuple[str, list[int], pb.GenerateResponse]:
    out = list(engine.generate(pb.GenerateRequest(**kw)))
    assert all(not o.HasField("usage") for o in out[:-1]) and out[-1].HasField("usage")
    return "".join(o.text for o in out), [i for o in out for i in o.token_ids], out[-1]


def greedy(prompt: str, max_tokens: int, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, **kw}


# --- Generate against llama.cpp ---------------------------------------------------------------------------

def test_greedy_matches_llamacpp(engine, pipeline, prompts, registry):
    for case in prompts:
        text, ids, last = run(engine, **greedy(case["prompt"], 30))
        assert ids == case["greedy_token_ids"]
        assert text == case["greedy_text"]
        assert last.finish_reason == {"length": pb.LENGTH, "stop": pb.STOP}[case["finish_reason"]]
        assert last.usage.prompt_tokens == len(case["prompt_token_ids"])
        assert last.usage.completion_tokens == len(ids)
        assert 0 < last.usage.ttft_seconds <= last.usage.total_seconds and last.usage.tokens_per_second > 0
    assert sessions(pipeline) == [0, 0, 0, 0]
    assert status_count(registry, "ok") == 3
    assert registry.get_sample_value("splitllm_generated_tokens_total") == 68
    assert registry.get_sample_value("splitllm_finish_reason_total", {"reason": "stop"}) == 1


def test_engine_refuses_a_corrupt_tokenizer(pipeline, artifacts, tmp_path):
    """The coordinator's process reads the manifest unverified for its stage checks; its Engine is what checks
    the tokenizer file against the manifest's sha256, before it serves."""
    copy = tmp_path / "artifacts"
    copy.mkdir()
    (copy / "manifest.json").write_bytes((artifacts / "manifest.json").read_bytes())
    tokenizer = pipeline.manifest.tokenizer["file"]
    (copy / tokenizer).write_bytes((artifacts / tokenizer).read_bytes()[:-2] + b"  ")
    with pytest.raises(ManifestError, match=f"{tokenizer} is corrupt"):
        Engine(pipeline, artifacts=copy)


def test_chat_and_token_ids_inputs(engine, prompts):
    case = prompts[1]
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=case["prompt"])])
    assert run(engine, chat=chat, max_tokens=10)[1] == case["greedy_token_ids"]
    ids = pb.TokenIds(ids=case["prompt_token_ids"])
    assert run(engine, token_ids=ids, max_tokens=10)[1] == case["greedy_token_ids"]
    # `system` replaces the template's default system message.
    assert run(engine, prompt=case["prompt"], system="Answer in French.", max_tokens=3)[2].usage.prompt_tokens \
        != len(case["prompt_token_ids"])


def test_concurrent_requests_keep_their_sessions_apart(engine, pipeline, prompts):
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        results[i] = run(engine, **greedy(prompts[i]["prompt"], 30))[1]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == [c["greedy_token_ids"] for c in prompts]
    assert sessions(pipeline) == [0, 0, 0, 0]


def test_seeds(engine):
    def sample(seed: int, **kw) -> list[int]:
        sampling = pb.SamplingParams(temperature=1.0, seed=seed, **kw)
        return run(engine, prompt="Tell me a story.", sampling=sampling, max_tokens=12)[1]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(3, top_k=40, top_p=0.9, min_p=0.05) == sample(3, top_k=40, top_p=0.9, min_p=0.05)


class FullLogits:
    """A pipeline that ignores top_k: the sampler always gets the whole vocabulary."""

    def __init__(self, inner: LocalPipeline) -> None:
        self.inner, self.manifest, self.multi_row_logits = inner, inner.manifest, inner.multi_row_logits
        self.ks: list[int] = []
        self.lasts: list[bool] = []  # per step: marked as the session's last
        self.rows: list[int] = []  # per token step: its tokens (more than 1: a speculative step)

    def submit(self, session_id, position, tokens, top_k=0, last=False, logit_rows=1):
        self.ks.append(top_k)
        self.lasts.append(last)
        self.rows.append(len(tokens))
        return self.inner.submit(session_id, position, tokens, 0, logit_rows=logit_rows)

    def prefill(self, session_id, tokens, top_k=0, last=False):
        self.ks.append(top_k)
        self.lasts.append(last)
        return self.inner.prefill(session_id, tokens, 0)

    def release(self, session_id, then=None):
        self.inner.release(session_id, then)

    def addresses(self):
        return self.inner.addresses()


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "seed": 5},
                                      {"temperature": 1.5, "top_k": 50, "top_p": 0.8, "min_p": 0.1, "seed": 9}])
def test_top_k_logits_give_the_same_tokens(engine, pipeline, artifacts, sampling):
    full = FullLogits(pipeline)
    request = {"prompt": "Name three colours.", "sampling": pb.SamplingParams(**sampling), "max_tokens": 10}
    assert run(Engine(full, artifacts=artifacts), **request)[1] == run(engine, **request)[1]
    assert full.ks[-1] == top_k_needed(SamplingParams.from_proto(request["sampling"])) > 0


def test_the_step_that_reaches_the_budget_is_marked_last(pipeline, artifacts):
    """The stages free a session as its last step runs (ForwardEntry.release): the step that makes the
    max_tokens-th token, whatever it samples (the prompt itself for max_tokens 1), and no step of a session that
    its stop token ends first."""
    full = FullLogits(pipeline)
    engine = Engine(full, artifacts=artifacts, draft_tokens=0)  # one step a token
    run(engine, **greedy("Name three colours.", 1))
    assert full.lasts == [True]
    full.lasts.clear()
    run(engine, **greedy("Name three colours.", 4))
    assert full.lasts == [False, False, False, True]
    full.lasts.clear()
    _, ids, last = run(engine, **greedy("what is 2+3?", 100))
    assert last.finish_reason == pb.STOP and len(ids) < 100
    assert len(full.lasts) == len(ids) and not any(full.lasts)
    assert sessions(pipeline) == [0] * len(pipeline.chain.stages)


# --- sampler ----------------------------------------------------------------------------------------------

def dist(logits, history=(), **params) -> tuple[list[int], np.ndarray]:
    ids, probs = Sampler(SamplingParams(**params), seed=0).distribution(Logits(np.array(logits, np.float32)),
                                                                        history)
    return ids.tolist(), probs


def softmax(x) -> np.ndarray:
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def test_sampler_filters_exactly():
    logp = np.log([0.1, 0.2, 0.3, 0.4])
    ids, probs = dist([1, 2, 3, 4, 0], temperature=1, top_k=2)
    assert ids == [2, 3] and np.allclose(probs, softmax([3, 4]))
    ids, probs = dist(logp, temperature=1, top_p=0.65)  # 0.4 + 0.3 reaches 0.65
    assert ids == [2, 3] and np.allclose(probs, [3 / 7, 4 / 7])
    ids, probs = dist(logp, temperature=1, top_p=0.7001)
    assert ids == [1, 2, 3]
    ids, probs = dist(logp, temperature=1, min_p=0.45)  # p >= 0.45 * 0.4
    assert ids == [1, 2, 3] and np.allclose(probs, [2 / 9, 3 / 9, 4 / 9])
    ids, probs = dist(logp, temperature=2)
    assert ids == [0, 1, 2, 3] and np.allclose(probs, np.sqrt([1, 2, 3, 4]) / np.sqrt([1, 2, 3, 4]).sum())
    # top_k before top_p: top_p sees the renormalized top 3 (0.2, 0.3, 0.4)/0.9.
    ids, _ = dist(logp, temperature=1, top_k=3, top_p=0.5)
    assert ids == [2, 3]


def test_repetition_penalty():
    s = Sampler(SamplingParams(repetition_penalty=2.0))
    logits = Logits(np.array([-1.0, 1.0, 2.5, 4.0], np.float32))
    assert s._penalized(logits, [3, 0, 3]).tolist() == [-2.0, 1.0, 2.5, 2.0]
    assert s.sample(logits, [3, 0]) == 2 and s.sample(logits) == 3  # greedy after the penalty
    subset = Logits(np.array([4.0, -1.0], np.float32), np.array([3, 0], np.int32))
    assert s._penalized(subset, [3, 0]).tolist() == [2.0, -2.0]
    assert Sampler(SamplingParams(repetition_penalty=0.0))._penalized(logits, [3]).tolist() == [-1, 1, 2.5, 4]


def test_sampler_top_k_subset_matches_full():
    rng = np.random.default_rng(0)
    for params in [SamplingParams(), SamplingParams(temperature=0.7, top_k=30),
                   SamplingParams(temperature=1.3, top_k=100, top_p=0.9, min_p=0.02)]:
        k = top_k_needed(params)
        a, b = Sampler(params, seed=1), Sampler(params, seed=1)
        for _ in range(50):
            logits = rng.normal(0, 3, 2000).astype(np.float32)
            assert a.sample(Logits(logits)) == b.sample(top_k_logits(logits, k))


def test_nucleus_is_a_full_sorts():
    """The nucleus from the largest weights alone is the one a sort of all of them gives, ties and all."""
    rng = np.random.default_rng(3)
    for n, top_p, scale in [(5, 0.5, 1), (49152, 0.9, 3), (49152, 0.999, 0.5), (2000, 0.95, 0.1), (300, 1 - 1e-9, 2)]:
        weights = np.exp(np.round(rng.normal(0, scale, n), 1)).astype(np.float32)  # rounded: many ties
        for ids in (None, rng.permutation(10 * n)[:n]):
            key = np.arange(n) if ids is None else ids
            order = np.lexsort((key, -weights))
            cut = int(np.searchsorted(np.cumsum(weights[order], dtype=np.float64),
                                      top_p * weights.sum(dtype=np.float64))) + 1
            assert nucleus(weights, ids, top_p).tolist() == sorted(order[:cut].tolist())


def test_draw_through_block_sums_is_the_inverse_of_the_cumulative_sum():
    """Integer weights: every sum is exact, so the block walk must land where one cumulative sum does; a zero weight
    is never drawn."""
    rng = np.random.default_rng(4)
    for n in (1, 5, 512, 513, 1000, 49152):
        weights = rng.integers(0, 4, n).astype(np.float32)
        weights[0] += 1
        cdf = np.cumsum(weights, dtype=np.float64)
        for u in np.concatenate([rng.random(300), [0.0, 1 - 1e-12]]):
            i = draw(weights, u)
            assert i == min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), n - 1) and weights[i] > 0
    zeros_after = np.zeros(2000, np.float32)
    zeros_after[[3, 700]] = [1e-30, 1]  # weights that underflow around the drawn ones
    assert [draw(zeros_after, u) for u in (0.0, 0.5, np.nextafter(1, 0))] == [3, 700, 700]
    assert draw(np.array([1, 1, 0, 0], np.float32), np.nextafter(1, 0)) == 1


KEEP_FREED_PROBE = """
import resource, sys
import numpy as np
from splitllm.services.common import heap
from splitllm.services.coordinator.pipeline import Logits
from splitllm.services.coordinator.sampler import Sampler, SamplingParams
if sys.argv[1] == "keep":
    heap.keep_freed()
else:  # glibc's starting thresholds, held: each array over the vocabulary is a fresh mmap, so the probe must see faults
    heap.keep_freed(mmap_threshold=128 << 10, trim_threshold=128 << 10)
logits = Logits(np.random.default_rng(0).normal(0, 3, 49152).astype(np.float32))
sampler = Sampler(SamplingParams(0.8, 0, 0.95, 0.05, 1.1), seed=1)
for _ in range(5):
    sampler.sample(logits, list(range(100)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    sampler.sample(logits, list(range(100)))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


def test_keep_freed_spares_the_sampler_its_page_faults():
    """A sampled token's arrays over the vocabulary (here top_p with a repetition penalty, in a fresh process as the
    coordinator's) come from kept heap with keep_freed. The control holds glibc's starting thresholds, where they come
    from fresh mmaps: glibc's own dynamic thresholds fault on some hosts (~160 a token here) and not on others."""
    import subprocess
    import sys

    faults = {mode: float(subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, mode], check=True,
                                         capture_output=True, text=True).stdout) for mode in ("mmap", "keep")}
    assert faults["keep"] < 1 and faults["mmap"] > 20, faults


def test_top_k_needed():
    assert top_k_needed(SamplingParams()) == 1
    assert top_k_needed(SamplingParams(top_k=5, top_p=0.5)) == 1  # greedy
    assert top_k_needed(SamplingParams(temperature=1, top_k=5, top_p=0.5, min_p=0.1)) == 5
    assert top_k_needed(SamplingParams(temperature=1, top_p=0.5)) == 0
    assert top_k_needed(SamplingParams(temperature=1, top_k=5, repetition_penalty=1.1)) == 0
    assert top_k_needed(SamplingParams(repetition_penalty=1.1)) == 0


def test_sampler_seed():
    logits = Logits(np.zeros(100, np.float32))
    draws = [[Sampler(SamplingParams(temperature=1), seed).sample(logits) for _ in range(20)]
             for seed in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2]
    assert Sampler(SamplingParams(temperature=1)).seed != Sampler(SamplingParams(temperature=1)).seed


# --- stops and the context --------------------------------------------------------------------------------

def test_stop_string(engine, prompts):
    text, ids, last = run(engine, **greedy(prompts[0]["prompt"], 30, stop=["Pacific", "zzz"]))
    assert text == "California is a state located in the " and last.finish_reason == pb.STOP
    assert ids == prompts[0]["greedy_token_ids"][:8]  # up to and with " Pacific"
    text, _, _ = run(engine, **greedy(prompts[0]["prompt"], 30, stop=["Pacific N"]))
    assert text == "California is a state located in the "


def test_stop_token(engine, prompts):
    text, ids, last = run(engine, **greedy(prompts[0]["prompt"], 30, stop_token_ids=[314]))  # " is"
    assert (text, ids, last.finish_reason) == ("California", [28314, 314], pb.STOP)
    assert last.usage.completion_tokens == 2


class Recorded:
    """A pipeline and a codec that log, in order, each step submitted and each text decode."""

    def __init__(self, engine: Engine) -> None:
        self.log: list[str] = []
        inner_submit, inner_decode = engine.pipeline.submit, engine.codec.decode

        def submit(*a, **kw):
            self.log.append("step")
            return inner_submit(*a, **kw)

        def decode(*a, **kw):
            self.log.append("text")
            return inner_decode(*a, **kw)

        engine.pipeline = FullLogits(engine.pipeline)
        engine.pipeline.submit = submit
        engine.codec.decode = decode

    def order(self) -> str:
        """'step' and 'text' in the order they came, each run of repeats counted once."""
        return " ".join(k for i, k in enumerate(self.log) if i == 0 or self.log[i - 1] != k)


def test_the_next_step_goes_out_before_the_text_work_unless_stop_strings_decide(pipeline, artifacts, prompts):
    """Without stop strings only the token decides whether a step follows, so it goes out before the token is
    detokenized (that work overlaps with the stages); with stop strings the text decides, and the step that would
    follow the stop string's last token is never sent."""
    rec = Recorded(engine := Engine(pipeline, artifacts=artifacts, draft_tokens=0))
    _, ids, _ = run(engine, **greedy(prompts[0]["prompt"], 4))
    assert rec.order() == "step text step text step text"  # the 4th token needs no step
    rec.log.clear()
    _, ids, last = run(engine, **greedy(prompts[0]["prompt"], 30, stop=["Pacific"]))
    assert last.finish_reason == pb.STOP and len(ids) == 8
    assert rec.order() == "text step " * 7 + "text"  # no step after " Pacific"


REPEATS = "Repeat after me: the cat sat on the mat. The cat sat on the mat. The cat sat on the mat."


@pytest.mark.parametrize("kw", [greedy(REPEATS, 40), greedy(REPEATS, 9), greedy(REPEATS, 40, stop=["mat. The"]),
                                greedy(REPEATS, 40, sampling=pb.SamplingParams(repetition_penalty=1.05)),
                                greedy(REPEATS, 40, sampling=pb.SamplingParams(temperature=0.7, seed=3)),
                                greedy(REPEATS, 40, sampling=pb.SamplingParams(temperature=0.6, top_p=0.9, seed=5))])
def test_speculative_steps_give_the_tokens_of_one_step_at_a_time(pipeline, artifacts, registry, kw):
    """Where the text repeats, a token step also feeds the guesses prompt lookup makes, and the engine keeps those
    the sampler picks anyway: the tokens of one step at a time (max_tokens and stop strings included), in fewer
    steps. A sampled request keeps a guess when the token it draws from that row's distribution is the guess: the
    draws are one step at a time's too, so a seed gives the same tokens."""
    want = run(Engine(pipeline, artifacts=artifacts, draft_tokens=0), **kw)
    full = FullLogits(pipeline)
    got = run(Engine(full, CoordinatorMetrics(registry), artifacts=artifacts, draft_tokens=3), **kw)
    assert got[:2] == want[:2] and got[2].finish_reason == want[2].finish_reason
    assert got[2].usage.completion_tokens == want[2].usage.completion_tokens
    accepted = registry.get_sample_value("splitllm_draft_tokens_total", {"outcome": "accepted"})
    rejected = registry.get_sample_value("splitllm_draft_tokens_total", {"outcome": "rejected"})
    steps = len(full.rows) - 1  # the first is the prompt
    assert max(full.rows[1:]) == 4 and accepted > 0 and steps < len(got[1]) - 1
    assert accepted + rejected == sum(r - 1 for r in full.rows[1:])
    assert sessions(pipeline) == [0] * len(pipeline.chain.stages)


def test_draft_tokens_must_fit_a_step(pipeline, artifacts):
    with pytest.raises(ValueError, match=r"draft_tokens must be in \[0, 128\) \(got -1\)"):
        Engine(pipeline, artifacts=artifacts, draft_tokens=-1)


def test_context_admission(engine, pipeline, artifacts, registry):
    prompt = pb.TokenIds(ids=[28314] * 1000)
    with pytest.raises(ServiceError) as e:
        list(engine.generate(pb.GenerateRequest(token_ids=prompt, max_tokens=100)))
    assert e.value.code == INVALID and all(str(n) in e.value.message for n in (1000, 100, 1024, 24))
    with pytest.raises(ServiceError, match="at most 1023"):
        list(engine.generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 1024))))
    assert status_count(registry, "invalid") == 2

    truncating = Engine(pipeline, truncate_to_context=True, artifacts=artifacts)
    _, ids, last = run(truncating, token_ids=pb.TokenIds(ids=[28314] * 1020), max_tokens=10)
    assert len(ids) == 4 and last.finish_reason == pb.CONTEXT  # 8 prompt chunks of 128, then 4 tokens
    assert sessions(pipeline) == [0, 0, 0, 0]


# --- bad input --------------------------------------------------------------------------------------------

def chat(*roles: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content="hi") for r in roles])


BAD = [
    ({"prompt": "hi", "sampling": pb.SamplingParams(temperature=-0.5)}, "sampling.temperature must be"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(temperature=float("nan"))}, "sampling.temperature"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(top_p=1.5)}, r"sampling.top_p must be in \[0, 1\]"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(top_k=-1)}, "sampling.top_k must be an integer >= 0"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(min_p=-0.1)}, r"sampling.min_p must be in \[0, 1\]"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(repetition_penalty=-1)}, "sampling.repetition_penalty"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens must be >= 0"),
    ({"prompt": ""}, "prompt is empty"),
    ({}, "set one of prompt, chat or token_ids"),
    ({"chat": chat()}, "chat.messages is empty"),
    ({"chat": chat("user", "tool")}, r"chat.messages\[1\].role 'tool' is not allowed .*system, user, assistant"),
    ({"token_ids": pb.TokenIds()}, "token_ids is empty"),
    ({"token_ids": pb.TokenIds(ids=[1, 49152, -3])}, r"token_ids must be token ids in \[0, 49152\); got \[49152"),
    ({"token_ids": pb.TokenIds(ids=[1]), "system": "x"}, "system applies to prompt and chat"),
    ({"prompt": "hi", "stop_token_ids": [99999]}, "stop_token_ids must be token ids"),
]


@pytest.mark.parametrize(("request_fields", "message"), BAD)
def test_bad_input(engine, pipeline, registry, request_fields, message):
    with pytest.raises(ServiceError, match=message) as e:
        next(engine.generate(pb.GenerateRequest(**request_fields)))
    assert e.value.code == INVALID
    assert sessions(pipeline) == [0, 0, 0, 0]
    assert status_count(registry, "invalid") == 1 and registry.get_sample_value("splitllm_requests_running") == 0


# --- cancellation, deadline, queueing ---------------------------------------------------------------------

def test_cancel_mid_stream_releases_the_session(engine, pipeline, registry):
    cancelled = threading.Event()
    stream = engine.generate(pb.GenerateRequest(prompt="Count to fifty.", max_tokens=50), cancelled.is_set)
    next(stream), next(stream)
    assert sessions(pipeline) == [1, 1, 1, 1]
    cancelled.set()
    with pytest.raises(ServiceError) as e:
        list(stream)
    assert e.value.code == grpc.StatusCode.CANCELLED and sessions(pipeline) == [0, 0, 0, 0]

    stream = engine.generate(pb.GenerateRequest(prompt="Count to fifty.", max_tokens=50))
    next(stream)
    stream.close()  # the consumer walks away
    assert sessions(pipeline) == [0, 0, 0, 0] and status_count(registry, "cancelled") == 2


def test_deadline(engine, pipeline, registry):
    left = iter([5.0, 5.0, 5.0, 5.0, 0.0])
    with pytest.raises(ServiceError) as e:
        list(engine.generate(pb.GenerateRequest(prompt="Count to fifty.", max_tokens=50),
                             time_remaining=lambda: next(left, 0.0)))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert sessions(pipeline) == [0, 0, 0, 0] and status_count(registry, "deadline") == 1


def queued(engine: Engine, registry: CollectorRegistry) -> tuple[list, threading.Thread]:
    """A 2-token request started in a thread, checked to be waiting for a slot: (its responses, the thread)."""
    second: list = []
    waiter = threading.Thread(target=lambda: second.extend(engine.generate(
        pb.GenerateRequest(prompt="hi", max_tokens=2))))
    waiter.start()
    time.sleep(0.2)
    assert registry.get_sample_value("splitllm_requests_waiting") == 1 and not second
    return second, waiter


def test_queue_waits_for_a_slot(pipeline, artifacts, registry):
    engine = Engine(pipeline, CoordinatorMetrics(registry), artifacts=artifacts, max_concurrent=1)
    first = engine.generate(pb.GenerateRequest(prompt="hi", max_tokens=20))
    next(first)
    second, waiter = queued(engine, registry)
    assert sessions(pipeline) == [1, 1, 1, 1]
    first.close()
    waiter.join(10)
    assert len(second) == 2 and registry.get_sample_value("splitllm_requests_waiting") == 0
    assert registry.get_sample_value("splitllm_request_queue_seconds_sum") >= 0.2


# --- Tokenize, ModelInfo ----------------------------------------------------------------------------------

def test_tokenize(engine, prompts):
    case = prompts[0]
    out = engine.tokenize(pb.TokenizeRequest(chat=pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content=case["prompt"])])))
    assert list(out.ids) == case["prompt_token_ids"] and out.rendered == case["rendered_prompt"]
    out = engine.tokenize(pb.TokenizeRequest(text="hello world"))
    assert list(out.tokens) == ["hello", "Ġworld"] and out.rendered == "hello world"
    with pytest.raises(ServiceError, match="role 'bot' is not allowed"):
        engine.tokenize(pb.TokenizeRequest(chat=chat("bot")))


def test_model_info(engine):
    info = engine.model_info()
    assert (info.architecture, info.num_layers, info.vocab_size, info.num_kv_heads) == ("llama", 30, 49152, 3)
    assert (info.context_length, info.prefill_length, info.num_stages) == (1024, 128, 4)
    assert list(info.stop_token_ids) == [2, 0] and len(info.manifest_sha256) == 64
    assert list(info.stage_addresses) == ["local"] * 4 and "4-bit" in info.quantization


# --- over gRPC --------------------------------------------------------------------------------------------

def test_grpc_server(engine, pipeline, prompts, registry):
    served = serve_coordinator(engine, "127.0.0.1:0", max_workers=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{served.port}")
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        case = prompts[1]
        out = list(stub.Generate(pb.GenerateRequest(prompt=case["prompt"], max_tokens=30), timeout=30))
        assert "".join(o.text for o in out) == case["greedy_text"] and out[-1].finish_reason == pb.STOP
        assert stub.ModelInfo(pb.ModelInfoRequest()).num_stages == 4
        assert list(stub.Tokenize(pb.TokenizeRequest(text="hello world")).ids) == [28120, 905]

        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=2))))
        assert e.value.code() == INVALID and "sampling.top_p" in e.value.details()

        call = stub.Generate(pb.GenerateRequest(prompt="Count to a hundred.", max_tokens=200))
        next(call), next(call)
        call.cancel()
        for _ in range(100):
            if sessions(pipeline) == [0, 0, 0, 0] and status_count(registry, "cancelled") == 1:
                break
            time.sleep(0.05)
        assert sessions(pipeline) == [0, 0, 0, 0] and status_count(registry, "cancelled") == 1

        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING
        served.set_serving(False)
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert SERVICE_NAME in ProtoReflectionDescriptorDatabase(channel).get_services()
    finally:
        channel.close()
        served.stop(0)


class Slowed(FullLogits):
    """Each token step 10 ms slower: a generation outlasts a short deadline however fast the machine (the answer to
    "Count to a hundred." is ~80 tokens, which a fast host generated within 0.5 s)."""

    def submit(self, session_id, position, tokens, top_k=0, last=False, logit_rows=1):
        time.sleep(0.01)
        return super().submit(session_id, position, tokens, top_k, last, logit_rows)


def test_grpc_deadline_ends_the_call_and_releases_its_session(pipeline, artifacts, registry):
    engine = Engine(Slowed(pipeline), CoordinatorMetrics(registry), artifacts=artifacts)
    served = serve_coordinator(engine, "127.0.0.1:0", max_workers=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{served.port}")
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(prompt="Count to a hundred.", max_tokens=500), timeout=0.5))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):  # the session is released after the call has ended
            if sessions(pipeline) == [0, 0, 0, 0] and status_count(registry, "deadline") == 1:
                break
            time.sleep(0.05)
        assert sessions(pipeline) == [0, 0, 0, 0] and status_count(registry, "deadline") == 1
    finally:
        channel.close()
        served.stop(0)


def test_prefill_chunks_spread_a_prompt_over_the_stages():
    from splitllm.services.coordinator.remote import MIN_CHUNK, prefill_chunk

    assert MIN_CHUNK == 16
    assert prefill_chunk(12, 128, 4, spread=True) == 12  # one chunk
    assert prefill_chunk(32, 128, 4, spread=True) == 16
    assert prefill_chunk(33, 128, 4, spread=True) == 17  # balanced: 17 + 16, not 16 + 16 + 1
    assert prefill_chunk(64, 128, 4, spread=True) == 16
    assert prefill_chunk(128, 128, 4, spread=True) == 32  # four chunks, one per stage
    assert prefill_chunk(300, 128, 4, spread=True) == 75
    assert prefill_chunk(1024, 128, 4, spread=True) == 128  # capped at the prefill length
    assert prefill_chunk(1030, 128, 4, spread=True) == 115  # nine chunks of 114-115
    assert prefill_chunk(128, 128, 4, spread=False) == 128  # qnn pads every chunk; cores shared by stages


class HeldRelease(FullLogits):
    """Releases on the stages at once, but confirms (`then`) only when the test lets it: a slow stage."""

    def __init__(self, inner: LocalPipeline) -> None:
        super().__init__(inner)
        self.unconfirmed: list = []

    def release(self, session_id, then=None):
        self.inner.release(session_id)
        self.unconfirmed.append(then)


def test_call_ends_before_the_release_is_confirmed_but_its_slot_waits_for_it(pipeline, artifacts, registry):
    held = HeldRelease(pipeline)
    engine = Engine(held, CoordinatorMetrics(registry), artifacts=artifacts, max_concurrent=1)
    assert len(list(engine.generate(pb.GenerateRequest(prompt="hi", max_tokens=2)))) == 2  # the call ended
    assert len(held.unconfirmed) == 1 and registry.get_sample_value("splitllm_requests_running") == 1
    second, waiter = queued(engine, registry)
    held.unconfirmed.pop()()  # every stage has answered
    waiter.join(10)
    assert len(second) == 2 and registry.get_sample_value("splitllm_requests_waiting") == 0
    held.unconfirmed.pop()()
    assert registry.get_sample_value("splitllm_requests_running") == 0 and sessions(pipeline) == [0, 0, 0, 0]
