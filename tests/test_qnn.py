"""The qnn target and backend: float graph vs the reference, QDQ export, the four stages on the HTP backend
(simulator) against the same QDQ graphs on the CPU and against the cpu target, context binaries, CPU fallback,
mixed pipelines and the process pipeline."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import write_tiny_llama3
from onnx import TensorProto, helper

from splitllm.export.build import ExportError, export
from splitllm.export.checkpoint import open_checkpoint
from splitllm.export.graph_qnn import QnnStageGraph, save
from splitllm.export.onnx_writer import GraphBuilder, WeightsFile
from splitllm.export.quantize import NBitsWeight
from splitllm.export.quantize import _pack as pack
from splitllm.export.reference import ReferenceModel
from splitllm.services.common.manifest import load_manifest, stage_files
from splitllm.services.stage.chain import LocalChain
from splitllm.services.stage.qnn import QnnError, QnnGraph, open_graph
from splitllm.services.stage.runtime import Entry, StageRuntime

pytest.importorskip("onnxruntime_qnn")

C, P = 64, 16
PROMPT = [int(t) for t in np.random.default_rng(1).integers(5, 448, 21)]  # two chunks, the second padded


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))


def agreement(xs: list[np.ndarray], ys: list[np.ndarray]) -> dict:
    """Per-step logits compared: cosine (min, mean), max |difference|, steps whose argmax agrees."""
    pairs = list(zip(xs, ys, strict=True))
    c = [cos(a, b) for a, b in pairs]
    return {
        "cos_min": min(c),
        "cos_mean": float(np.mean(c)),
        "max_diff": max(float(np.abs(a - b).max()) for a, b in pairs),
        "argmax": sum(int(np.argmax(a) == np.argmax(b)) for a, b in pairs),
        "steps": len(pairs),
    }


def show(name: str, a: dict) -> str:
    return (f"{name}: cos min {a['cos_min']:.6f} mean {a['cos_mean']:.6f}, max |diff| {a['max_diff']:.4f}, "
            f"argmax {a['argmax']}/{a['steps']}")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_tiny_llama3(tmp_path_factory.mktemp("qnn") / "ckpt")


@pytest.fixture(scope="module")
def artifacts(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qnn") / "art"
    export(source, out, stages=4, context=C, prefill=P, target="qnn", accuracy_level=0)
    return out


@pytest.fixture(scope="module")
def context_artifacts(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qnn") / "art-ctx"
    export(source, out, stages=4, context=C, prefill=P, target="qnn", accuracy_level=0, qnn_context=True,
           qnn_w8=("layers.3.*",))  # stage 4; stage 2 is compared below
    return out


class Stages:
    """Any per-stage runtimes chained in one process (LocalChain takes one backend for all)."""

    def __init__(self, runtimes: list) -> None:
        self.runtimes = runtimes

    def step(self, sid: str, position: int, x: np.ndarray) -> np.ndarray:
        for r in self.runtimes:
            x = r.forward(Entry(sid, position, x)) if isinstance(r, StageRuntime) else r.step(sid, position, x)
        return x

    def trace(self, prompt: list[int], steps: int, sid: str = "t") -> list[np.ndarray]:
        """Logits after the prompt (chunks of P) and after each of `steps` forced tokens (1, 2, 3, ...)."""
        out = [self.step(sid, s, np.asarray(prompt[s : s + P], np.int32)) for s in range(0, len(prompt), P)][-1:]
        for i in range(steps):
            out.append(self.step(sid, len(prompt) + i, np.array([10 + i], np.int32)))
        for r in self.runtimes:
            r.release(sid)
        return out


class QdqOnCpu:
    """One stage's qnn graphs (the QDQ models) on the CPU EP, through the same QnnGraph logic."""

    def __init__(self, artifacts: Path, stage: int) -> None:
        m, _ = load_manifest(artifacts, verify=[])
        self.graph = QnnGraph.from_manifest(artifacts, m, stage, 1, on_cpu=True)
        self.buffers: dict[str, dict[str, np.ndarray]] = {}

    def step(self, sid: str, position: int, x: np.ndarray) -> np.ndarray:
        if position == 0:
            self.buffers[sid] = {n: np.zeros(s, np.float32) for n, s in self.graph.kv_shapes.items()}
        return self.graph.step(self.buffers[sid], x, position)

    def release(self, sid: str) -> None:
        self.buffers.pop(sid, None)


def test_float_graph_layout_matches_reference(tmp_path, source):
    """The static layout (past slots, additive mask, new entries only, padded chunks, row-by-row fallback)
    reproduces the numpy reference in float: the runtime logic is right before any quantization."""
    ckpt = open_checkpoint(source)
    cfg, weight = ckpt.config, ckpt.tensor
    ranges = [(0, 3), (3, 4)]
    stages = []
    for k, (a, b) in enumerate(ranges):
        wf = WeightsFile(tmp_path / f"s{k}.weights")
        sessions = {}
        for mode, seq in (("pp", P), ("tg", 1)):
            builder = GraphBuilder(mode, wf)
            QnnStageGraph(builder, cfg, C, seq).build(range(a, b), k == 0, k == len(ranges) - 1, weight)
            save(builder, tmp_path / f"s{k}.{mode}.onnx")
            onnx.checker.check_model(str(tmp_path / f"s{k}.{mode}.onnx"))
        wf.close()
        for mode in ("pp", "tg"):
            path = str(tmp_path / f"s{k}.{mode}.onnx")
            sessions[mode] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        g = QnnGraph(cfg, range(a, b), C, P, k == 0, k == 1, lambda m, f, s=sessions: s[m].run(None, f))
        stages.append((g, {n: np.zeros(s, np.float32) for n, s in g.kv_shapes.items()}))

    def run(x: np.ndarray, position: int) -> np.ndarray:
        for g, buffers in stages:
            x = g.run(type("S", (), {"buffers": buffers})(), x, position)
        return x

    ref = ReferenceModel(cfg, weight)
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, 448, 53)]
    # chunks at 0, 16, 32 (pp), a 2-row chunk at 48 (pp, = C - P), 3 rows at 50 (> C - P: token graph row by row)
    for start, end in ((0, 16), (16, 32), (32, 48), (48, 50), (50, 53)):
        got = run(np.asarray(tokens[start:end], np.int32), start)
        want, _ = ref.forward(tokens[:end])
        assert np.abs(got - want[-1]).max() < 1e-4, (start, end)


def q4_1(w: np.ndarray) -> NBitsWeight:
    """A weight as GGUF Q4_1 stores it (blocks of 32: d * q + m), in export/quantize.py's exact form."""
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    lo, hi = blocks.min(-1), blocks.max(-1)
    d = (hi - lo) / 15
    q = np.clip(np.round((blocks - lo[..., None]) / d[..., None]), 0, 15).astype(np.uint8)
    return NBitsWeight(4, 32, pack(q, 4), d.astype(np.float32), None, np.ascontiguousarray((lo + 8 * d).T))


def test_checkpoint_4bit_weights_pass_through_exactly(tmp_path, source):
    """GGUF 4-bit weights keep their codes, block scales and (Q4_1) block offsets: the QDQ graph stays within
    the 16-bit activation error of the float graph; quantizing them a second time costs far more."""
    from splitllm.export.qnn_quantize import quantize_graph, share_weights

    ckpt = open_checkpoint(source)
    cfg = ckpt.config

    def weight(name: str) -> object:
        w = ckpt.tensor(name)
        return q4_1(w) if name.rsplit(".", 1)[-1] in ("q", "k", "v", "o", "gate", "up", "down") else w

    wf = WeightsFile(tmp_path / "f.weights")
    g = QnnStageGraph(GraphBuilder("pp", wf), cfg, C, P)
    g.build(range(0, 2), True, False, weight)
    save(g.b, tmp_path / "f.onnx")
    wf.close()
    assert len(g.exact) == 14
    session = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    feeds: list[dict] = []
    graph = QnnGraph(cfg, range(0, 2), C, P, True, False, lambda m, f: feeds.append(f) or session.run(None, f))
    buffers = {n: np.zeros(s, np.float32) for n, s in graph.kv_shapes.items()}
    tokens = np.random.default_rng(4).integers(0, 448, 48).astype(np.int32)
    want = [graph.step(buffers, tokens[i : i + P], i) for i in range(0, 48, P)]
    got = {}
    for exact in (g.exact, {}):
        model = quantize_graph(tmp_path / "f.onnx", feeds, ("embed",), exact=exact)
        share_weights({tmp_path / "q.onnx": model}, tmp_path / "q.weights")
        q = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
        got[bool(exact)] = min(cos(q.run(None, f)[0], w) for f, w in zip(feeds, want, strict=True))
        if exact:  # block offsets (ReduceSum + MatMul) and float block scales run whole on HTP too
            htp = open_graph(tmp_path / "q.onnx").run(None, feeds[-1])[0]
            assert cos(htp, q.run(None, feeds[-1])[0]) > 0.9999
    print(f"\n2 layers, Q4_1 weights vs float: cos {got[True]:.5f} kept exactly, {got[False]:.5f} quantized again")
    assert got[True] > 0.9995 and 1 - got[False] > 5 * (1 - got[True])


def test_export_qnn_manifest(artifacts):
    m, _ = load_manifest(artifacts)  # every checksum
    q = m.quantization["qnn"]
    assert q["groups"]["embedding"]["bits"] == 8 and q["groups"]["lm_head"]["bits"] == 8
    assert q["groups"]["layers"]["bits"] == 4 and q["calibration"]["prompt_runs"] > 0
    assert "lm_head" in q["w8a16"] and "embed" in q["w8a16"]
    for s in m.stages:
        pp, tg = s.graph("qnn", "pp"), s.graph("qnn", "tg")
        assert s.graph("cpu", "pp").file  # the cpu graphs stay: mixed pipelines use one artifact
        assert pp.weights == tg.weights and pp.file != tg.file and (pp.max_tokens, tg.max_tokens) == (P, 1)
        for g, seq in ((pp, P), (tg, 1)):
            floats = [t.name for t in g.inputs + g.outputs if t.dtype == "float32"]
            # every float graph input and output but the residual stream's, which stays float on HTP (fp16)
            assert sorted(g.quant_params) == sorted(set(floats) - {"hidden_in", "hidden_out"})
            assert all(v["dtype"] == "uint16" for v in g.quant_params.values())
            key = next(t for t in g.inputs if t.name.startswith("past_key"))
            assert key.shape == [m.model.num_kv_heads, 1, m.model.head_dim, C - seq]
        # pp and tg use the same encodings for every I/O they share (KV cache included)
        shared = set(pp.quant_params) & set(tg.quant_params)
        assert len(shared) >= 5 and all(pp.quant_params[n] == tg.quant_params[n] for n in shared)
    assert q["groups"]["residual_stream"]["float_io"] == ["hidden_in", "hidden_out"]
    assert m.stages[-1].graph("qnn", "pp").inputs[-1].name == "last_index"
    assert m.stages[-1].graph("qnn", "pp").outputs[0].shape == [1, m.model.vocab_size]


def encodings(path: Path) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of every quantized activation of a QDQ graph."""
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    return {
        n.input[0]: (float(numpy_helper.to_array(inits[n.input[1]])), int(numpy_helper.to_array(inits[n.input[2]])))
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    }


def test_residual_stream_stays_float(artifacts):
    """The residual Adds and the RMSNorms run in float: no QuantizeLinear reads the stream, the norms' weights
    are float; every MatMul still reads quantized (dequantized) operands. The last stage's final norm runs on every
    row and the prompt graph picks the last row after it: lm_head's input encoding is calibrated on every row, one
    encoding in both graphs."""
    m, _ = load_manifest(artifacts, verify=[])
    for s in m.stages:
        model = onnx.load(str(artifacts / s.graph("qnn", "pp").file), load_external_data=False)
        nodes = model.graph.node
        stream = {"hidden_in"} | {n.output[0] for n in nodes if ".residual_" in n.output[0]}
        assert len(stream) == 1 + 2 * (s.last_layer - s.first_layer)
        assert not [n.name for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] in stream]
        norms = [n for n in nodes if n.op_type == "RMSNormalization"]
        embedded = [n.input[0] for n in norms if n.input[0] not in stream]  # stage 1: the (dequantized) embedding
        assert len(embedded) == s.has_embedding and all(e.startswith("gather_") for e in embedded)
        assert norms and all(n.input[1].endswith("norm") for n in norms)  # float weights, no DequantizeLinear
        producers = {o: n.op_type for n in nodes for o in n.output}
        assert all(producers.get(i) == "DequantizeLinear" for n in nodes if n.op_type == "MatMul" for i in n.input)
    last = m.stages[-1]
    gather = next(n for n in nodes if n.op_type == "Gather")
    assert list(gather.input) == ["final_norm", "last_index"]  # float (fp16 on HTP): a uint16 one fails there
    pp, tg = (encodings(artifacts / last.graph("qnn", mode).file) for mode in ("pp", "tg"))
    assert pp["last_row"] == tg["final_norm"] and pp["lm_head_out"] == tg["lm_head_out"]
    for s in m.stages:  # the token graph takes every encoding it shares with the prompt graph
        pp, tg = (encodings(artifacts / s.graph("qnn", mode).file) for mode in ("pp", "tg"))
        assert all(pp[t] == tg[t] for t in set(pp) & set(tg)), s.first_layer


def test_export_qnn_needs_context_multiple_of_prefill(tmp_path, source):
    with pytest.raises(ExportError, match="multiple of --prefill-len"):
        export(source, tmp_path / "bad", stages=2, context=60, prefill=16, target="qnn")
    with pytest.raises(ExportError, match="no such file"):
        export(source, tmp_path / "bad", stages=2, context=64, prefill=16, target="qnn", calibration=tmp_path / "x")
    assert not (tmp_path / "bad").exists()


def test_htp_matches_qdq_on_cpu_and_cpu_target(artifacts):
    """Four stages on the HTP backend: the same numbers as the QDQ graphs on the CPU (the backend adds
    nothing), and within the w4a16 error of the cpu target."""
    htp = Stages([StageRuntime(artifacts, k, "qnn") for k in range(4)]).trace(PROMPT, 6)
    qdq = Stages([QdqOnCpu(artifacts, k) for k in range(4)]).trace(PROMPT, 6)
    cpu = Stages([StageRuntime(artifacts, k, "cpu") for k in range(4)]).trace(PROMPT, 6)
    backend, vs_cpu = agreement(htp, qdq), agreement(htp, cpu)
    print(f"\n{show('HTP vs QDQ on CPU', backend)}\n{show('HTP vs cpu target', vs_cpu)} "
          f"(|logits| max {max(float(np.abs(b).max()) for b in cpu):.2f})")
    assert backend["cos_min"] > 0.999 and backend["argmax"] >= backend["steps"] - 1  # near-ties may flip
    assert vs_cpu["cos_min"] > 0.9 and vs_cpu["argmax"] >= vs_cpu["steps"] // 2


def test_context_binaries(artifacts, context_artifacts):
    m, _ = load_manifest(context_artifacts)
    assert {"layers.3.q", "layers.3.down", "lm_head"} <= set(m.quantization["qnn"]["w8a16"])  # --qnn-w8
    for k, s in enumerate(m.stages):
        for mode in ("pp", "tg"):
            ctx = s.graph("qnn", mode).context
            assert ctx[0].endswith(".ctx.onnx") and ctx[1].endswith(".bin")
            assert set(ctx) <= set(stage_files(m, k, "qnn"))
    times = {}
    for name, art in (("QDQ (compiled at start)", artifacts), ("context binary", context_artifacts)):
        t = time.monotonic()
        runtime = StageRuntime(art, 1, "qnn")
        times[name] = time.monotonic() - t
        x = np.random.default_rng(0).standard_normal((5, m.model.hidden_size)).astype(np.float32)
        times[name + " out"] = runtime.forward(Entry("c", 0, x))
    print(f"\nstage 2 start: {times['QDQ (compiled at start)']:.2f} s from QDQ, {times['context binary']:.2f} s "
          "from the context binary")
    assert np.allclose(times["QDQ (compiled at start) out"], times["context binary out"], atol=1e-6)


def erf_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Erf", ["r"], ["e"], name="the_erf"),
             helper.make_node("Add", ["e", "r"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def test_unsupported_operator_is_named_and_fallback_runs_it(tmp_path, caplog):
    path = erf_model(tmp_path / "erf.onnx")
    with pytest.raises(QnnError, match=r"fall back to the CPU: Erf .*--allow-cpu-fallback"):
        open_graph(path)
    with caplog.at_level(logging.WARNING, logger="splitllm.stage.qnn"):
        s = open_graph(path, allow_cpu_fallback=True)
    assert "Erf" in caplog.text and "the_erf" in caplog.text
    x = np.linspace(-1, 1, 8, dtype=np.float32)[None]
    from math import erf

    want = np.array([[erf(v) + v for v in np.maximum(x[0], 0)]], np.float32)
    assert np.allclose(s.run(None, {"x": x})[0], want, atol=1e-2)


def test_stage_refuses_graph_that_falls_out(artifacts, tmp_path):
    """StageRuntime with backend qnn fails at start, naming the operator, unless fallback is allowed."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifacts, art)
    m, _ = load_manifest(art, verify=[])
    pp = art / m.stages[1].graph("qnn", "pp").file
    model = onnx.load(str(pp), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    node.op_type = "Erf"  # not what a Llama layer computes: only whether it runs
    pp.write_bytes(model.SerializeToString())
    with pytest.raises(QnnError, match="Erf"):
        StageRuntime(art, 1, "qnn", verify=False)
    runtime = StageRuntime(art, 1, "qnn", verify=False, allow_cpu_fallback=True)
    x = np.random.default_rng(0).standard_normal((3, m.model.hidden_size)).astype(np.float32)
    assert np.isfinite(runtime.forward(Entry("f", 0, x))).all()


def test_mixed_pipeline(artifacts):
    """Stages 1-2 on cpu, 3-4 on qnn: one artifact, same wire; greedy close to all-qnn and all-cpu."""
    mixed = Stages([StageRuntime(artifacts, k, "cpu" if k < 2 else "qnn") for k in range(4)]).trace(PROMPT, 6)
    qnn = Stages([StageRuntime(artifacts, k, "qnn") for k in range(4)]).trace(PROMPT, 6)
    cpu = Stages([StageRuntime(artifacts, k, "cpu") for k in range(4)]).trace(PROMPT, 6)
    for name, other in (("qnn", qnn), ("cpu", cpu)):
        a = agreement(mixed, other)
        print(f"\n{show('mixed vs ' + name, a)}")
        assert a["cos_min"] > 0.9 and a["argmax"] >= a["steps"] // 2


@pytest.mark.slow
def test_process_pipeline_on_qnn(artifacts):
    """Four `splitllm stage --backend qnn` processes and the coordinator: same greedy tokens as in-process."""
    from splitllm.bench.runtimes import free_port_block
    from splitllm.services.client.client import Client
    from splitllm.services.client.launcher import Pipeline

    want = LocalChain(artifacts, backend="qnn").greedy(PROMPT, 8)
    base = free_port_block(5)
    with Pipeline(artifacts, base_port=base, coordinator_port=base + 4, metrics_base=None, kv_capacity=2,
                  backend="qnn") as p, Client(p.coordinator.address) as c:
        got = c.generate(token_ids=PROMPT, max_tokens=8)
    assert list(got.token_ids) == want[: len(got.token_ids)] and len(got.token_ids) >= 1
