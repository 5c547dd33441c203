"""`splitllm export --target qnn`: QDQ stage graphs for the QNN HTP backend, added next to the cpu graphs.

Stage by stage: build the float prompt and token graphs (graph_qnn.py), run them on the CPU over the
calibration text exactly as the stage runtime would (services/stage/qnn.QnnGraph), quantize them
(qnn_quantize.py), and pass the stage's outputs on as the next stage's calibration inputs. With
`context_binaries`, each graph is also compiled once into an EPContext model, so stages start without
graph preparation.

The prompt and token graphs of a stage share one weights file; their context binaries do not share weights:
QNN can write a shared context (ep.share_ep_contexts) but loading it crashes the x86 HTP simulator.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from splitllm.export.build import ExportError, Progress
from splitllm.export.checkpoint import Checkpoint
from splitllm.export.graph_qnn import QnnStageGraph, io_specs, save
from splitllm.export.onnx_writer import GraphBuilder, WeightsFile
from splitllm.export.qnn_quantize import (
    ACTIVATIONS,
    BLOCK,
    W8_DEFAULT,
    activation_encodings,
    io_params,
    quantize_graph,
    share_weights,
    weight_bits,
)
from splitllm.services.common.manifest import MANIFEST_FILE, GraphSpec, Manifest, sha256_file
from splitllm.services.stage.qnn import HTP_TARGET, MASK_VALUE, QnnGraph, qnn_session

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
MAX_PROMPT_RUNS = 16  # calibration samples of the prompt graph (each a full chunk of P tokens)
TOKEN_RUNS = 2  # token-graph runs after each window's prompt (their encodings come from the prompt graph)

RESIDUAL_STREAM = {
    "dtype": "float: float32 in the graphs, fp16 on HTP (QNN EP enable_htp_fp16_precision)",
    "nodes": "the layers.*.residual_attn / residual_mlp Adds, the RMSNormalization nodes reading them, the Identity "
    "naming hidden_out; and the last stage's last-row Gather after the final norm (fp16: a uint16 one fails to "
    "finalize on the HTP simulator)",
    "float_io": ["hidden_in", "hidden_out"],
    "why": "the first position's residual reaches ~25000 (SmolLM2: an attention sink) while other tokens' are ~1-100; "
    "one uint16 encoding per tensor had a step of ~0.39 on the residual Adds of 18 layers. MatMuls, attention and "
    "MLP stay QDQ; their outputs are dequantized into the float Adds",
}

Step = tuple[int, np.ndarray]  # (position, token ids or hidden states)


def check_shapes(context: int, prefill: int) -> None:
    if context % prefill:
        raise ExportError(
            f"--target qnn needs --context {context} to be a multiple of --prefill-len {prefill}: the prompt graph "
            "reads C - P past slots, so prompt chunks must start at multiples of P"
        )


def calibration_windows(
    ckpt: Checkpoint, text: Path | None, context: int, prefill: int
) -> tuple[list[list[Step]], dict]:
    """The calibration text as windows of full prompt chunks, each followed by TOKEN_RUNS single tokens, in two
    passes: windows starting with the BOS token, as served (chat) prompts do, then plain text.

    The first position carries the model's largest activations (SmolLM2: ~25000 in the residual, depending on
    the token), and ranges calibrated on another first token clip them: BOS-started windows alone took a 13-layer
    SmolLM2 stage from 0.9939 to 0.9985 cosine on a chat prompt."""
    path = Path(text) if text else CALIBRATION_TEXT
    if not path.is_file():
        raise ExportError(f"--calibration {path}: no such file")
    bundle = ckpt.tokenizer()
    ids = Tokenizer.from_str(bundle.tokenizer_json).encode(path.read_text(), add_special_tokens=False).ids
    chunks = (context - TOKEN_RUNS) // prefill  # per window
    windows: list[list[Step]] = []
    runs = 0
    for bos in ([bundle.bos_token_id], []):  # two passes over the text: served prompts, and plain text
        start = 0
        while runs < MAX_PROMPT_RUNS:
            w = bos + ids[start : start + chunks * prefill + TOKEN_RUNS - len(bos)]
            n = min((len(w) - TOKEN_RUNS) // prefill, MAX_PROMPT_RUNS - runs)
            if n < 1:
                break
            steps = [(p, np.asarray(w[p : p + prefill], np.int32)) for p in range(0, n * prefill, prefill)]
            steps += [(p, np.asarray(w[p : p + 1], np.int32)) for p in range(n * prefill, n * prefill + TOKEN_RUNS)]
            windows.append(steps)
            runs += n
            start += n * prefill + TOKEN_RUNS - len(bos)
    if not windows:
        raise ExportError(
            f"--calibration {path} has {len(ids)} tokens; the qnn target needs at least {prefill + TOKEN_RUNS}"
        )
    info = {
        "text": path.name,
        "sha256": sha256_file(path),
        "tokens": len(ids),
        "prompt_runs": runs,
        "token_runs": TOKEN_RUNS * len(windows),
    }
    return windows, info


def float_graphs(ckpt: Checkpoint, manifest: Manifest, k: int, tmp: Path) -> tuple[dict[str, Path], dict]:
    """Stage k's float prompt and token graphs (one weights file), and the checkpoint's exact 4-bit weights."""
    plan, cfg = manifest.stages[k], manifest.model
    wf = WeightsFile(tmp / f"stage{k + 1}.float.weights")
    paths = {}
    for mode, seq in (("pp", manifest.prefill_length), ("tg", 1)):
        g = QnnStageGraph(GraphBuilder(f"stage{k + 1}.qnn.{mode}", wf), cfg, manifest.context_length, seq)
        g.build(range(plan.first_layer, plan.last_layer), plan.has_embedding, plan.has_lm_head, ckpt.tensor)
        paths[mode] = tmp / f"stage{k + 1}.float.{mode}.onnx"
        save(g.b, paths[mode])
    wf.close()
    return paths, g.exact


def calibrate(
    manifest: Manifest, k: int, graphs: dict[str, Path], windows: list[list[Step]]
) -> tuple[dict[str, list[dict]], list[list[Step]]]:
    """Run the float graphs over the windows; the recorded graph inputs and the stage's outputs."""
    plan = manifest.stages[k]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = {m: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for m, p in graphs.items()}
    feeds: dict[str, list[dict]] = {"pp": [], "tg": []}

    def runner(mode: str, f: dict) -> list[np.ndarray]:
        feeds[mode].append(f)
        return sessions[mode].run(None, f)

    g = QnnGraph(
        manifest.model,
        range(plan.first_layer, plan.last_layer),
        manifest.context_length,
        manifest.prefill_length,
        plan.has_embedding,
        plan.has_lm_head,
        runner,
    )
    outputs = []
    for steps in windows:
        buffers = {name: np.zeros(shape, np.float32) for name, shape in g.kv_shapes.items()}
        outputs.append([(p, g.step(buffers, x, p)) for p, x in steps])
    return feeds, outputs


def context_model(qdq: Path) -> list[str]:
    """Compile `qdq` on the HTP backend into an EPContext model (+ context binary) next to it."""
    ctx = qdq.with_name(qdq.stem + ".ctx.onnx")
    config = {"ep.context_enable": "1", "ep.context_file_path": str(ctx), "ep.context_embed_mode": "0"}
    qnn_session(qdq, config=config)
    bins = sorted(p.name for p in qdq.parent.glob(ctx.stem + "*.bin"))
    return [ctx.name, *bins]


def add_qnn_target(
    ckpt: Checkpoint,
    manifest: Manifest,
    work: Path,
    calibration: Path | None = None,
    context_binaries: bool = False,
    w8_extra: tuple[str, ...] = (),
) -> Manifest:
    """Write the qnn graphs of every stage into `work` and return the manifest that lists them.
    `w8_extra`: weight name patterns (fnmatch, e.g. 'layers.*.v') that get 8 bits besides embed and lm_head."""
    w8 = W8_DEFAULT + tuple(w8_extra)
    C, P = manifest.context_length, manifest.prefill_length
    check_shapes(C, P)
    windows, calib_info = calibration_windows(ckpt, calibration, C, P)
    tmp = work / ".qnn-tmp"
    tmp.mkdir()
    progress = Progress(2 * manifest.num_stages)
    stages, w8_names, exact_names = [], set(), set()
    start = time.monotonic()
    try:
        for k, plan in enumerate(manifest.stages):
            layers = range(plan.first_layer, plan.last_layer)
            graphs, exact = float_graphs(ckpt, manifest, k, tmp)
            exact_names |= {n for n in exact if weight_bits(n, w8) == 4}
            feeds, windows = calibrate(manifest, k, graphs, windows)
            progress.step(f"calibrated stage {k + 1}")
            qpp = quantize_graph(graphs["pp"], feeds["pp"], w8, exact=exact)
            qtg = quantize_graph(graphs["tg"], feeds["tg"], w8, activation_encodings(qpp), exact)
            matrices = [
                t.name
                for t in onnx.load(str(graphs["pp"]), load_external_data=False).graph.initializer
                if len(t.dims) == 2
            ]
            w8_names |= {n for n in matrices if weight_bits(n, w8) == 8}
            name = f"stage{k + 1}.qnn"
            files = {"pp": work / f"{name}.pp.onnx", "tg": work / f"{name}.tg.onnx"}
            share_weights({files["pp"]: qpp, files["tg"]: qtg}, work / f"{name}.weights")
            specs = {}
            for mode, seq, qdq in (("pp", P, qpp), ("tg", 1, qtg)):
                ins, outs = io_specs(manifest.model, layers, C, seq, plan.has_embedding, plan.has_lm_head)
                specs[mode] = GraphSpec(
                    file=files[mode].name,
                    weights=f"{name}.weights",
                    max_tokens=seq,
                    inputs=ins,
                    outputs=outs,
                    quant_params=io_params(qdq),
                    context=context_model(files[mode]) if context_binaries else [],
                )
            stages.append(dataclasses.replace(plan, graphs={**plan.graphs, "qnn": specs}))
            shutil.rmtree(tmp)
            tmp.mkdir()
            progress.step(f"quantized stage {k + 1}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    layers = {
        "scheme": "w4a16 (w8a16 where named in w8a16)",
        "bits": 4,
        "granularity": f"symmetric int4 in blocks of {BLOCK} input rows with float scales (block-wise DQ)",
        "kept_from_checkpoint": len(exact_names),
        "kept_from_checkpoint_note": "GGUF Q4_0/Q4_1 weights keep their codes and block-32 scales; Q4_1 block "
        "minimums become blocksum(x) @ offsets (int8 per channel)",
    }
    quant = dict(manifest.quantization)
    quant["qnn"] = {
        "activations": f"{ACTIVATIONS}, per tensor, asymmetric, MinMax over the calibration runs; the residual "
        "stream is float (residual_stream below)",
        "groups": {
            "layers": layers,
            "embedding": {"scheme": "w8a16", "bits": 8, "granularity": "per tensor, uint8 (Gather table)"},
            "lm_head": {
                "scheme": "w8a16",
                "bits": 8,
                "granularity": "per output channel, symmetric int8",
                "input": "final_norm, uint16 per tensor calibrated on every row of the calibration runs (the prompt "
                "graph picks the last row after the final norm; the token graph copies the encoding)",
            },
            "norms": {"dtype": "float", "granularity": "RMSNormalization weights and op in float (fp16 on HTP)"},
            "residual_stream": RESIDUAL_STREAM,
        },
        "w8a16": sorted(w8_names),
        "w8_patterns": list(w8),
        "calibration": calib_info,
        "mask_value": MASK_VALUE,
        "htp_target": HTP_TARGET,
        "context_binaries": context_binaries,
        "context_sharing": "none: pp and tg contexts are separate (loading a shared context crashes the simulator)",
        "export_seconds": round(time.monotonic() - start, 1),
    }
    kv = dict(manifest.kv)
    kv["qnn_layout"] = (
        "per layer: key [kv_heads, 1, head_dim, C] (transposed) and value [kv_heads, 1, C, head_dim], float32 in "
        "the stage; a graph of S tokens reads the first C - S slots as past and returns only its S new entries"
    )
    (work / MANIFEST_FILE).unlink()
    files = {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file()}
    out = dataclasses.replace(manifest, stages=stages, quantization=quant, kv=kv, files=files)
    (work / MANIFEST_FILE).write_text(out.to_json())
    return out
