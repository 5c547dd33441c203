"""StageRuntime without sockets: decode batching across sessions, per-entry errors, KV slots."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from splitllm.services.common.errors import ServiceError
from splitllm.services.stage.runtime import Entry, StageRuntime


def inputs(rt: StageRuntime, rng: np.random.Generator, n: int) -> np.ndarray:
    if rt.is_first:
        return rng.integers(0, rt.manifest.model.vocab_size, n).astype(np.int32)
    return rng.standard_normal((n, rt.hidden)).astype(np.float32)


@pytest.mark.parametrize("stage", [0, 1])
def test_batched_decode_matches_one_by_one(tiny_artifacts, stage):
    """Steps of several sessions in one run give what the same steps give one at a time, also when the batch's
    sessions are first scattered over the slots (between them: sessions without a step, and a free slot) and
    are moved together, and when the sessions that sat out go on later. (Within float16 rounding: one and several
    rows run different kernels, and a last-bit difference can round a cached key the other way.)"""
    batched, single = (StageRuntime(tiny_artifacts, stage, kv_capacity=8, threads=1) for _ in range(2))
    assert batched.graph.batched
    rng = np.random.default_rng(stage)
    lengths = [5, 16, 9, 12, 2, 16, 3]
    for i, n in enumerate(lengths):
        x = inputs(batched, rng, n)
        for rt in (batched, single):
            rt.forward(Entry(f"s{i}", 0, x))
    for rt in (batched, single):
        assert rt.release("s3")  # an empty slot inside the range
    rounds = [[0, 1, 2, 4, 5, 6], [0, 6], [1, 2, 4, 5], [0, 1, 2, 4, 5, 6]]  # 3 and 4 sit out some rounds
    for members in rounds:
        steps = [Entry(f"s{i}", lengths[i], inputs(batched, rng, 1)) for i in members]
        got = batched.forward_many(steps)
        for e, g in zip(steps, got, strict=True):
            np.testing.assert_allclose(g, single.forward(e), rtol=1e-3, atol=1e-3)
        for i in members:
            lengths[i] += 1
        slots = sorted(batched.kv.get(f"s{i}").slot for i in members)
        assert slots == list(range(slots[0], slots[0] + len(members)))  # gathered: the run spans its own rows
    assert [batched.kv.get(f"s{i}").length for i in (0, 1, 2, 4, 5, 6)] == [lengths[i] for i in (0, 1, 2, 4, 5, 6)]


@pytest.mark.parametrize("stage", [0, 1])  # the first (token ids in) and the last (logits out)
def test_one_row_steps_between_prompts_in_one_slot_match_a_fresh_stage(tiny_artifacts, stage):
    """A slot's one-row steps run on buffers bound once; prompt chunks bind their own in between. A session that
    reuses the slot (prompt, steps, a second chunk, steps) gets what a fresh stage gives it, and an output held
    past the next step keeps its values."""
    used, fresh = (StageRuntime(tiny_artifacts, stage, kv_capacity=1, threads=1) for _ in range(2))
    rng = np.random.default_rng(7)
    used.forward(Entry("a", 0, inputs(used, rng, 6)))
    for p in range(6, 9):
        used.forward(Entry("a", p, inputs(used, rng, 1)))
    assert used.release("a")
    steps = [(0, 5), (5, 1), (6, 1), (7, 4), (11, 1), (12, 1)]  # (position, rows): the same slot, now b's
    held = []
    for p, n in steps:
        x = inputs(used, rng, n)
        got = used.forward(Entry("b", p, x))
        want = fresh.forward(Entry("b", p, x))
        np.testing.assert_array_equal(got, want)
        held.append((got, want.copy()))
    for got, want in held:
        np.testing.assert_array_equal(got, want)


def test_a_pinned_stage_runs_its_graph_on_its_first_cpu_and_its_workers_on_the_next(tiny_artifacts):
    """cpus: the thread that runs the graph is pinned on its first run (a stage's event loop or prompt worker), ONNX
    Runtime's worker to the second CPU; the results are the unpinned stage's."""
    import os
    import threading

    from splitllm.services.stage.runtime import session_options

    available = os.sched_getaffinity(0)
    cpus = tuple(sorted(available))[:2]
    so = session_options(3, cpus=(4, 6))  # two workers: the CPUs after the first in turn, numbered from 1
    assert so.get_session_config_entry("session.intra_op_thread_affinities") == "7;7"
    pinned, free = StageRuntime(tiny_artifacts, 0, threads=2, cpus=cpus), StageRuntime(tiny_artifacts, 0, threads=2)
    x = inputs(pinned, np.random.default_rng(3), 4)
    seen: list[set[int]] = []
    out: list[np.ndarray] = []

    def step() -> None:
        out.append(pinned.forward(Entry("s", 0, x)))
        seen.append(os.sched_getaffinity(0))

    t = threading.Thread(target=step)
    t.start()
    t.join()
    assert seen == [{cpus[0]}] and os.sched_getaffinity(0) == available  # the test's own thread: as it was
    np.testing.assert_array_equal(out[0], free.forward(Entry("s", 0, x)))
    with pytest.raises(ValueError, match="CPUs 99999 are not all available to this process"):
        StageRuntime(tiny_artifacts, 0, threads=2, cpus=(99999,))


def test_bad_entry_fails_alone(tiny_artifacts):
    rt = StageRuntime(tiny_artifacts, 0, kv_capacity=4, threads=1)
    rng = np.random.default_rng(0)
    for sid in ("a", "b"):
        rt.forward(Entry(sid, 0, inputs(rt, rng, 4)))
    before = rt.kv.get("b").buffers["past_key.0"].copy()
    out = rt.forward_many([
        Entry("a", 4, inputs(rt, rng, 1)),
        Entry("ghost", 4, inputs(rt, rng, 1)),
        Entry("b", 7, inputs(rt, rng, 1)),  # b is at position 4
        Entry("a", 5, inputs(rt, rng, 1)),  # a twice in one request
        Entry("c", 0, np.array([10**6], np.int32)),  # outside the vocabulary
    ])
    assert isinstance(out[0], np.ndarray) and rt.kv.get("a").length == 5
    codes = [e.code for e in out[1:]]  # type: ignore[union-attr]
    assert codes == [grpc.StatusCode.NOT_FOUND] + [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert "at position 4" in out[2].message and "twice" in out[3].message  # type: ignore[union-attr]
    assert rt.kv.get("b").length == 4 and np.array_equal(rt.kv.get("b").buffers["past_key.0"], before)
    assert rt.kv.in_use == 2  # c was not created
    with pytest.raises(ServiceError) as e:
        rt.forward(Entry("ghost", 1, inputs(rt, rng, 1)))
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_released_slot_is_zeroed_and_reused_first(tiny_artifacts):
    rt = StageRuntime(tiny_artifacts, 1, kv_capacity=3, threads=1)
    rng = np.random.default_rng(0)
    for sid in ("a", "b", "c"):
        rt.forward(Entry(sid, 0, inputs(rt, rng, 8)))
    slot = rt.kv.get("b").slot
    assert slot == 1 and rt.kv.free == []
    assert rt.release("b")
    assert all(not buf.array[slot].any() for buf in rt.kv.buffers.values())
    rt.forward(Entry("d", 0, inputs(rt, rng, 3)))
    assert rt.kv.get("d").slot == slot
    assert sorted(rt.expire(-1.0)) == ["a", "c", "d"]
    assert rt.kv.in_use == 0 and sorted(rt.kv.free) == [0, 1, 2]


def test_interleaved_groups_settle_after_one_move(tiny_artifacts):
    """Two groups whose sessions alternate over the slots (as two coordinators' sessions may): the first batch
    gathers its group, after which neither group's batches move anything."""
    rt = StageRuntime(tiny_artifacts, 1, kv_capacity=6, threads=1)
    moves: list[int] = []
    rt.kv.on_move = lambda: moves.append(1)
    rng = np.random.default_rng(0)
    names = ["a0", "b0", "a1", "b1", "a2", "b2"]
    for sid in names:
        rt.forward(Entry(sid, 0, inputs(rt, rng, 4)))
    groups = [names[0::2], names[1::2]]
    counts = []
    for position in range(4, 8):
        for group in groups:
            assert all(isinstance(o, np.ndarray) for o in rt.forward_many(
                [Entry(sid, position, inputs(rt, rng, 1)) for sid in group]))
            counts.append(len(moves))
    assert counts[0] == 1 and counts[-1] == 1


def test_a_stage_says_when_its_artifact_should_be_exported_again(smollm2_artifacts):
    import dataclasses

    from splitllm.services.common.manifest import load_manifest
    from splitllm.services.stage.server import export_again

    m, _ = load_manifest(smollm2_artifacts, verify=[])
    assert m.quantization["cpu_kernels"] == "splitllm"
    assert export_again(m, batched=True, kernels="avx2") == []
    assert [r.split(":")[0] for r in export_again(m, batched=True, kernels="scalar")] == [
        "this CPU has no AVX2 (with FMA and F16C)"
    ]
    groups = {k: {**g, "format": "MatMulNBits"} for k, g in m.quantization["groups"].items()}
    old = dataclasses.replace(m, quantization={"groups": groups, "accuracy_level": 4})
    assert [r.split(" (")[0] for r in export_again(old, batched=False, kernels="scalar")] == [
        "the artifact runs its Q4_1 layers as MatMulNBits and an offset Gemm",
        "the stage graph has no batch dimension",
    ]
    assert m.kv["attention"] == "ai.splitllm Attention" and m.kv["dtype"] == "float16"
    assert m.kv["bytes_per_token_per_layer"] == 2 * m.model.num_kv_heads * m.model.head_dim * 2
    padded = dataclasses.replace(m, quantization={k: v for k, v in m.quantization.items() if k != "block_scales"})
    assert [r.split(" (")[0] for r in export_again(padded, batched=True, kernels="avx2")] == [
        "the artifact pads its Q4_1 and Q8_0 block scales to 8 blocks a row"
    ]
    gqa = dataclasses.replace(m, kv={k: v for k, v in m.kv.items() if k != "attention"})
    assert [r.split(" (")[0] for r in export_again(gqa, batched=True, kernels="avx2")] == [
        "the artifact runs GroupQueryAttention"
    ]
    last = m.stages[-1]
    pp = last.graphs["cpu"]["pp"]
    one_row = dataclasses.replace(pp, inputs=[t for t in pp.inputs if t.name != "logit_rows"])
    before = dataclasses.replace(m, stages=[*m.stages[:-1], dataclasses.replace(
        last, graphs={"cpu": {"pp": one_row, "tg": last.graphs["cpu"]["tg"]}})])
    assert [r.split(" (")[0] for r in export_again(before, batched=True, kernels="avx2")] == [
        "the last stage answers the logits of a step's last row only"
    ]


def test_an_artifact_with_the_earlier_float32_cache_is_refused_with_what_to_do(tmp_path, smollm2_artifacts):
    """Attention's cache became float16: an artifact exported before (its graphs declare float32) says so at load."""
    import json

    for f in smollm2_artifacts.iterdir():
        (tmp_path / f.name).symlink_to(f)
    manifest = json.loads((smollm2_artifacts / "manifest.json").read_text())
    manifest["kv"]["dtype"] = "float32"
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="float32 KV cache .* export the artifact again"):
        StageRuntime(tmp_path, 1)


def test_a_speculative_step_answers_each_rows_logits_and_a_step_back_drops_the_rest(tiny_artifacts):
    """logit_rows > 1 (a token and draft tokens after it): the last stage answers the logits of each of those rows,
    as steps of one row would; a step at an earlier position then continues the session from there, as if the rows
    after it had never run."""
    last = StageRuntime(tiny_artifacts, 1, kv_capacity=4, threads=1)
    assert last.is_last and last.multi_row_logits
    rng = np.random.default_rng(3)
    x, y = inputs(last, rng, 9), inputs(last, rng, 1)
    for sid in ("a", "b", "c"):
        last.forward(Entry(sid, 0, x[:5]))
    ones = np.stack([last.forward(Entry("a", 5 + i, x[5 + i : 6 + i])) for i in range(4)])
    rows = last.forward(Entry("b", 5, x[5:9], 4))
    assert rows.shape == ones.shape == (4, last.manifest.model.vocab_size)
    np.testing.assert_allclose(rows, ones, rtol=1e-5, atol=1e-5)
    assert np.array_equal(last.forward(Entry("c", 5, x[5:9], 2)), rows[2:])  # the last 2 rows of the same step
    assert last.kv.get("b").length == 9
    back = last.forward(Entry("b", 6, y))  # keeps x[5] only: positions 6.. are dropped and written anew
    last.release("a")
    last.forward(Entry("a", 0, x[:6]))
    np.testing.assert_allclose(back, last.forward(Entry("a", 6, y)), rtol=1e-5, atol=1e-5)
    assert last.kv.get("b").length == 7


def test_logit_rows_beyond_the_step_or_the_artifact_are_refused_and_change_nothing(tmp_path, tiny_artifacts):
    import json

    rng = np.random.default_rng(4)
    for stage in (0, 1):  # every stage checks, so that a refused step changes no stage
        rt = StageRuntime(tiny_artifacts, stage, kv_capacity=2, threads=1)
        rt.forward(Entry("a", 0, inputs(rt, rng, 4)))
        for bad in (0, -1, 3):
            with pytest.raises(ServiceError, match=f"logits.rows must be 0 or 1 .* 2 rows; got {bad}") as e:
                rt.forward(Entry("a", 4, inputs(rt, rng, 2), bad))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and rt.kv.get("a").length == 4
        with pytest.raises(ServiceError, match="at position 4; got a step at 5") as e:
            rt.forward(Entry("a", 5, inputs(rt, rng, 1)))  # a step may go back, never skip ahead
    # an artifact whose last stage answers the last row only (exported before logit_rows)
    for f in tiny_artifacts.iterdir():
        (tmp_path / f.name).symlink_to(f)
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    graph = manifest["stages"][-1]["graphs"]["cpu"]["pp"]
    graph["inputs"] = [t for t in graph["inputs"] if t["name"] != "logit_rows"]
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rt = StageRuntime(tmp_path, 0, kv_capacity=2, threads=1)
    assert not rt.multi_row_logits
    rt.forward(Entry("a", 0, inputs(rt, rng, 4)))
    with pytest.raises(ServiceError, match="answers the last row's logits only") as e:
        rt.forward(Entry("a", 4, inputs(rt, rng, 2), 2))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and rt.kv.get("a").length == 4
