"""services/stage/cpu_attention.c: ai.splitllm Attention against ONNX Runtime's GroupQueryAttention (the op it
replaces) and against numpy, on prompt chunks, batched decode, the KV cache written in place, and bad input. The
one-node graphs are bench/attention_speed.py's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from splitllm.bench.attention_speed import bound_run, model, tables
from splitllm.services.stage.runtime import session_options

ROOT = Path(__file__).resolve().parent.parent
C = 48  # context


def session(op: str, h: int, g: int, d: int, context: int = C) -> ort.InferenceSession:
    return ort.InferenceSession(model(op, h, g, d, context), session_options(2, spin=True),
                                providers=["CPUExecutionProvider"])


def feed(rng: np.random.Generator, h: int, g: int, d: int, seqlens: list[int], rows: int,
         context: int = C) -> dict[str, np.ndarray]:
    b = len(seqlens)
    cos, sin = tables(d, context)
    kv = rng.normal(0, 1, (2, b, g, context, d)).astype(np.float16)  # our cache
    return {"qkv": rng.normal(0, 1, (b * rows, (h + 2 * g) * d)).astype(np.float32), "past_key": kv[0],
            "past_value": kv[1], "seqlens_k": np.array(seqlens, np.int32),
            "total": np.array(max(seqlens) + 1, np.int32), "cos": cos, "sin": sin}


def for_gqa(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same feed with the cache in float32, GroupQueryAttention's."""
    return {**f, "past_key": f["past_key"].astype(np.float32), "past_value": f["past_value"].astype(np.float32)}


def reference(f: dict[str, np.ndarray], h: int, g: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The op's math in numpy (float64), but for the new keys and values: rotated in float32 as the op does, then
    rounded to the float16 cache. Returns y and the caches (float16)."""
    b = len(f["seqlens_k"])
    rows = f["qkv"].shape[0] // b
    k_cache, v_cache = f["past_key"].astype(np.float64), f["past_value"].astype(np.float64)
    x = f["qkv"].astype(np.float64).reshape(b, rows, h + 2 * g, d)
    y = np.zeros((b, rows, h, d))
    for i, last in enumerate(f["seqlens_k"]):
        pos = np.arange(last - rows + 1, last + 1)
        cos, sin = f["cos"][pos][:, None], f["sin"][pos][:, None]

        def rotate(t: np.ndarray, cos: np.ndarray = cos, sin: np.ndarray = sin) -> np.ndarray:
            a, c = t[..., : d // 2], t[..., d // 2 :]
            return np.concatenate([a * cos - c * sin, c * cos + a * sin], -1)

        q, v = rotate(x[i, :, :h]), x[i, :, h + g :].astype(np.float16)
        k = rotate(f["qkv"].reshape(b, rows, h + 2 * g, d)[i, :, h : h + g], cos.astype(np.float32),
                   sin.astype(np.float32)).astype(np.float16)
        k_cache[i][:, pos], v_cache[i][:, pos] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        for head in range(h):
            kv = head // (h // g)
            scores = q[:, head] @ k_cache[i, kv, : last + 1].T / np.sqrt(d)
            scores[np.arange(rows)[:, None] < np.arange(last + 1)[None] - pos[0]] = -np.inf  # causal
            p = np.exp(scores - scores.max(-1, keepdims=True))
            y[i, :, head] = (p / p.sum(-1, keepdims=True)) @ v_cache[i, kv, : last + 1]
    return y.reshape(b * rows, h * d), k_cache.astype(np.float16), v_cache.astype(np.float16)


# (num_heads, kv_num_heads, head_dim): SmolLM2's, Llama 3's head size, a head size not a multiple of 32, and
# groups of 5 and 2 q heads per kv head (tiles take the q heads 4 at a time; with AVX-512, head sizes that are multiples
# of 64 decode in 16 lanes)
HEADS = [(9, 3, 64), (4, 1, 128), (6, 2, 16), (10, 2, 32), (8, 4, 48), (4, 2, 96), (10, 2, 64)]
CASES = [([6], 7), ([25], 5), ([0], 1), ([30, 3, 17], 1), ([47], 1), ([40, 40], 2)]  # seqlens_k, rows per sequence


def check_against_gqa_and_numpy(h: int, g: int, d: int) -> None:
    ours, gqa = session("Attention", h, g, d), session("GroupQueryAttention", h, g, d)
    rng = np.random.default_rng(h * 100 + d)
    for seqlens, rows in CASES:
        f = feed(rng, h, g, d, seqlens, rows)
        y, k, v = ours.run(None, f)
        ref = reference(f, h, g, d)
        assert y.shape == (len(seqlens) * rows, h * d)
        assert np.abs(y - ref[0]).max() < 1e-5, (seqlens, rows)
        assert np.array_equal(k, ref[1]) and np.array_equal(v, ref[2]), (seqlens, rows)
        if len(seqlens) > 1 and rows > 1:
            continue  # GroupQueryAttention takes several rows of one sequence only
        want = gqa.run(None, for_gqa(f))  # its new keys and values stay float32: within float16's rounding of ours
        assert np.abs(y - want[0]).max() < 4e-3, (seqlens, rows)
        for i, last in enumerate(seqlens):  # GroupQueryAttention leaves a present it did not share zero past the end
            for got, w in ((k, want[1]), (v, want[2])):
                assert np.allclose(got[i, :, : last + 1], w[i, :, : last + 1], rtol=1e-3, atol=1e-4), (seqlens, rows)


@pytest.mark.parametrize("h,g,d", HEADS)
def test_attention_matches_group_query_attention(h, g, d):
    check_against_gqa_and_numpy(h, g, d)


def check_cache_rounding() -> None:
    """New values reach the float16 cache rounded as numpy rounds them: ties to even, subnormals, overflow to
    infinity, infinities and NaN."""
    h, g, d = 4, 1, 64
    special = np.array([1e-6, 6e-8, 3e-8, 2.9e-8, 65504, 65519, 65520, 1e6, -1e6, np.inf, -np.inf, np.nan, 0.0, -0.0,
                        1 + 2**-11, 1 + 3 * 2**-11, 6.1e-5, -6.1e-5], np.float32)
    values = np.random.default_rng(9).normal(0, 100, d).astype(np.float32)
    values[: len(special)] = special
    f = feed(np.random.default_rng(10), h, g, d, [3], 1)
    f["qkv"][0, (h + g) * d :] = values
    cache = session("Attention", h, g, d).run(None, f)[2][0, 0, 3]
    with np.errstate(over="ignore"):  # the values past float16's range: infinity, as they should
        want = values.astype(np.float16)
    assert np.array_equal(np.isnan(cache), np.isnan(want))
    assert np.array_equal(cache[~np.isnan(want)].view(np.uint16), want[~np.isnan(want)].view(np.uint16))


def test_the_cache_rounds_like_numpy():
    check_cache_rounding()


def test_the_portable_path_matches_too():
    """SPLITLLM_CPU_KERNELS=scalar (CPUs without AVX2), in a process of its own: the library picks once."""
    code = ("import sys; sys.path.insert(0, 'tests')\n"
            "from test_cpu_attention import HEADS, check_against_gqa_and_numpy, check_cache_rounding\n"
            "for h, g, d in HEADS: check_against_gqa_and_numpy(h, g, d)\n"
            "check_cache_rounding()\n")
    env = {**os.environ, "SPLITLLM_CPU_KERNELS": "scalar"}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize(("h", "g", "d"), [(9, 3, 64), (4, 1, 128)])  # SmolLM2's heads; Llama 3's head size
def test_a_long_prompt_chunk_spreads_over_threads_and_agrees(h, g, d):
    """Enough work for the thread pool (rows in several blocks, positions near the end of the context: many key
    tiles, converted once a block where the kernels do that for the head size)."""
    ours = session("Attention", h, g, d)
    f = feed(np.random.default_rng(5), h, g, d, [C - 1], 40)
    for got, want in zip(ours.run(None, f), reference(f, h, g, d), strict=True):
        assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("seqlens", [[1500], [1700, 30], [2047, 600, 64]])
def test_long_decode_steps_split_over_the_keys_and_agree(seqlens):
    """A few sessions' one-row steps far into a long context: their keys are shared out in runs, then merged (a run
    past the end of a shorter session has no keys)."""
    h, g, d, context = 9, 3, 64, 2048
    ours = session("Attention", h, g, d, context)
    f = feed(np.random.default_rng(8), h, g, d, seqlens, 1, context)
    for got, want in zip(ours.run(None, f), reference(f, h, g, d), strict=True):
        assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("last", [20, 700, 1900])  # serial; over the threads; split over the keys (AVX2)
def test_a_short_step_gives_each_row_the_bits_of_one_row_at_a_time(last):
    """A speculative step (a token and a few draft tokens) must yield the tokens of one step at a time: its rows
    attend one by one, as decode steps do, where a prompt chunk's block of rows sums in another order."""
    h, g, d, context = 9, 3, 64, 2048
    ours = session("Attention", h, g, d, context)
    for rows in (2, 4, 8):
        f = feed(np.random.default_rng(rows), h, g, d, [last], rows, context)
        y, k, v = ours.run(None, f)
        cache, alone = {"past_key": f["past_key"], "past_value": f["past_value"]}, []
        for r in range(rows):
            one = {**f, **cache, "qkv": f["qkv"][r : r + 1], "seqlens_k": np.array([last - rows + 1 + r], np.int32)}
            y1, cache["past_key"], cache["past_value"] = ours.run(None, one)
            alone.append(y1)
        assert np.array_equal(y, np.concatenate(alone)), rows
        assert np.array_equal(k, cache["past_key"]) and np.array_equal(v, cache["past_value"])


def test_the_cache_is_written_in_place_when_past_and_present_share_a_buffer():
    """As the stage binds them: only the new positions change, and the next step reads them."""
    h, g, d = 9, 3, 64
    s = session("Attention", h, g, d)
    rng = np.random.default_rng(6)
    f = feed(rng, h, g, d, [9], 4)
    kv = {n: f[n].copy() for n in ("past_key", "past_value")}
    before = {n: a.copy() for n, a in kv.items()}
    binding = bound_run(s, {**f, **kv})
    s.run_with_iobinding(binding)
    y = binding.copy_outputs_to_cpu()[-1]  # bound last: after present_key and present_value
    want_y, want_k, want_v = reference(f, h, g, d)
    assert np.abs(y - want_y).max() < 1e-5
    assert np.abs(kv["past_key"] - want_k).max() < 1e-5 and np.abs(kv["past_value"] - want_v).max() < 1e-5
    for name, a in kv.items():
        untouched = np.ones(C, bool)
        untouched[6:10] = False
        assert np.array_equal(a[:, :, untouched], before[name][:, :, untouched])


def test_bad_input_is_refused_by_name_and_the_session_still_serves():
    h, g, d = 9, 3, 64
    s = session("Attention", h, g, d)
    rng = np.random.default_rng(7)
    good = feed(rng, h, g, d, [5], 2)
    bad = [
        ({"seqlens_k": np.array([C], np.int32)}, "seqlens_k[0] = 48"),  # past the context
        ({"seqlens_k": np.array([0], np.int32)}, "seqlens_k[0] = 0"),  # 2 rows cannot end at position 0
        ({"qkv": good["qkv"][:, :-64]}, "qkv must be"),
        ({"seqlens_k": np.array([5, 5], np.int32)}, "seqlens_k must be [batch]"),
    ]
    for change, message in bad:
        with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
            s.run(None, {**good, **change})
    y = s.run(None, good)[0]
    assert np.abs(y - reference(good, h, g, d)[0]).max() < 1e-5
    with pytest.raises(Exception, match="num_heads = 8 must be a positive multiple of kv_num_heads = 3"):
        session("Attention", 8, 3, 64)
