"""`splitllm export`: checkpoint -> artifact directory (manifest, tokenizer, per-stage graphs).

Weights stream one tensor at a time from the checkpoint into each stage's weights file, so peak
memory is about one layer's working set whatever the depth. The directory appears only when complete:
everything is written into a hidden sibling and renamed into place at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from splitllm.export.calibrate import ActivationStats
from splitllm.export.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from splitllm.export.graph_cpu import CpuStageGraph
from splitllm.export.onnx_writer import GraphBuilder, WeightsFile
from splitllm.export.quantize import NBitsWeight, RowQuantized, concat, is_q8_0, quantize, quantize_rows
from splitllm.export.tokenizer import compact_merges
from splitllm.services.common.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    GraphSpec,
    Manifest,
    ModelConfig,
    StagePlan,
    sha256_file,
)

LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
# Float tensors are read and quantized in row blocks of at most this many float32 bytes, so a 128256 x 4096
# embedding or lm_head costs its quantized form plus one block, not 2.1 GB of float32 and temporaries.
CHUNK_BYTES = 64 << 20
GROUPS = {"embed": "embedding", "lm_head": "lm_head", "norm": "norms", "attn_norm": "norms", "ffn_norm": "norms"}


class ExportError(ValueError):
    """Bad export arguments or source; the message is the one-line error users see."""


BALANCES = ("compute", "bytes")
KERNELS = ("splitllm", "onnxruntime")  # who runs GGUF Q4_1 / Q8_0 weights on the CPU (export's `kernels`)


def split_plan(
    layer_bytes: list[int], head_bytes: int, tail_bytes: int, stages: int, balance: str = "bytes"
) -> list[tuple[int, int]]:
    """Contiguous layer ranges, at least one layer each, minimising the largest stage's bytes.

    The first stage also holds `head_bytes` (embedding), the last `tail_bytes` (final norm, lm_head).
    balance "bytes" evens out weight memory (what an NPU's per-graph limit wants). "compute" first evens out
    the layers (a prompt's work: the embedding is a lookup and lm_head runs on one row per chunk), at most
    ceil(layers / stages) each, then bytes among such plans. SmolLM2 on 2 cores, 7/8/8/7 layers against the
    bytes plan's 1/13/15/1 (same-run A/B, 6 repetitions): TTFT at 32 / 128 tokens 81 -> 66 / 240 -> 193 ms,
    TPOT 15.0 -> 13.6 ms, 4 streams +7 %, 1024-token prompt +2 %. With 15 layers in one stage, that stage ran
    a short prompt's chunks one after another while the others waited.
    """
    n = len(layer_bytes)
    if not 1 <= stages <= n:
        raise ExportError(f"--stages {stages} is not possible: the model has {n} layers (allowed: 1 to {n})")
    if balance not in BALANCES:
        raise ExportError(f"--balance {balance!r} is not known (allowed: {', '.join(BALANCES)})")
    most = -(-n // stages) if balance == "compute" else n
    prefix = np.concatenate([[0], np.cumsum(layer_bytes)])

    def cost(k: int, a: int, b: int) -> float:  # stage k holds layers a..b-1
        return prefix[b] - prefix[a] + (head_bytes if k == 0 else 0) + (tail_bytes if k == stages - 1 else 0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[k][j]: first j layers in k stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(max(k - 1, j - most), j):
                c = max(best[k - 1][i], cost(k - 1, i, j))
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    ranges, j = [], n
    for k in range(stages, 0, -1):
        ranges.append((cut[k][j], j))
        j = cut[k][j]
    return ranges[::-1]


def estimated_bytes(cfg: ModelConfig) -> tuple[list[int], int, int]:
    """Weight bytes per layer (4-bit + scales), embedding and lm_head (8-bit + scales)."""
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    layer = (h * h * 2 + h * kv * 2 + 3 * h * f) * (0.5 + 4 / 32) + 2 * h * 4
    table = cfg.vocab_size * h * (1 + 4 / 32)
    return [int(layer)] * cfg.num_layers, int(table), int(table + h * 4)


class WeightSource:
    """Checkpoint tensors in the form the graphs take: 4-bit layers, 8-bit embedding and lm_head.

    Tensors that arrive quantized (GGUF) pass through exactly; float ones are quantized here.
    Records what happened to each tensor group for the manifest.
    """

    def __init__(
        self, ckpt: Checkpoint, layer_bits: int = 4, block_size: int = 32, progress: Progress | None = None
    ) -> None:
        self.ckpt, self.layer_bits, self.block_size, self.progress = ckpt, layer_bits, block_size, progress
        self.groups: dict[str, dict] = {}
        self.importance = ActivationStats(ckpt)  # lazy: runs only for float layers to quantize

    def _record(self, group: str, w: object, quantized_here: bool) -> None:
        if isinstance(w, np.ndarray):
            info = {"bits": 32, "dtype": "float32"}
        elif isinstance(w, RowQuantized):
            info = {"bits": 8, "block_size": w.block_size, "format": "int8 rows (Gather + scale)"}
        else:
            assert isinstance(w, NBitsWeight)
            info = {
                "bits": w.bits,
                "block_size": w.block_size,
                "format": "Q4_1 (d * code + m)" if w.block_offsets is not None
                else "Q8_0 (d * q)" if is_q8_0(w) else "MatMulNBits",
                "zero_points": w.zero_points is not None,
                "block_offsets": w.block_offsets is not None,
            }
        info["origin"] = "quantized by export" if quantized_here else "from checkpoint (exact)"
        self.groups.setdefault(group, info)

    def _convert(self, name: str, w: object) -> object:
        short = name.rsplit(".", 1)[-1]
        if not (isinstance(w, np.ndarray) and w.ndim == 2):
            return w
        if short == "embed":
            return quantize_rows(w, block_size=self.block_size)
        if short == "lm_head":
            return quantize(w, bits=8, block_size=self.block_size)
        if short in LINEAR:
            return quantize(w, self.layer_bits, self.block_size, importance=self.importance(name))
        return w

    def __call__(self, name: str) -> object:
        if self.progress:
            self.progress.doing(name)
        short = name.rsplit(".", 1)[-1]
        group = GROUPS.get(short, "layers.attention" if short in "qkvo" else "layers.mlp")
        pieces, fresh = [], False
        for chunk in self.ckpt.row_chunks(name, CHUNK_BYTES):
            fresh = isinstance(chunk, np.ndarray) and chunk.ndim == 2
            pieces.append(self._convert(name, chunk))
            del chunk  # the float block goes before the next one is read
        w = pieces[0] if len(pieces) == 1 else concat(pieces)
        self._record(group, w, fresh)
        if self.progress:
            self.progress.step(name)
        return w


class Progress:
    """One line on stderr, redrawn in place when stderr is a terminal: bar, count, elapsed, current work."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.prefix = ""
        self.doing("starting")

    def doing(self, label: str) -> None:
        """Show what is being worked on now."""
        if not self.tty:
            return
        filled = 30 * self.done // self.total
        t = time.monotonic() - self.start
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {int(t // 60)}:{t % 60:04.1f} "
            f"{self.prefix}{label}\x1b[K"  # erase the rest of a longer previous line
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def step(self, label: str) -> None:
        """One more unit done."""
        self.done += 1
        self.doing(label)


def export(
    source: str | Path,
    out: str | Path,
    stages: int = 4,
    context: int = 1024,
    prefill: int = 128,
    target: str = "cpu",
    accuracy_level: int = 4,
    calibration: str | Path | None = None,
    qnn_context: bool = False,
    qnn_w8: tuple[str, ...] = (),
    balance: str | None = None,
    kernels: str = "splitllm",
) -> Manifest:
    """Target qnn writes the cpu graphs too (export/build_qnn.py), so one artifact serves mixed pipelines.
    `balance` (split_plan): by default "compute" for cpu and "bytes" for qnn. `kernels`: "splitllm" runs GGUF Q4_1 and
    Q8_0 weights as our own ops at accuracy level 4 (AVX2; portable C on other CPUs), "onnxruntime" as MatMulNBits
    (ONNX Runtime's kernels, NEON included)."""
    out = Path(out)
    if target not in ("cpu", "qnn"):
        raise ExportError(f"--target {target!r} is not available in this build (allowed: cpu, qnn)")
    if kernels not in KERNELS:
        raise ExportError(f"--kernels {kernels!r} is not known (allowed: {', '.join(KERNELS)})")
    if prefill < 1 or context < 1:
        raise ExportError(f"--prefill-len {prefill} and --context {context} must be positive")
    if prefill > context:
        raise ExportError(
            f"--prefill-len {prefill} is larger than --context {context} (allowed: 1 to {context})"
        )
    try:
        ckpt = open_checkpoint(source)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if target == "qnn":
        from splitllm.export.build_qnn import check_shapes

        check_shapes(context, prefill)
    cfg = ckpt.config
    balance = balance or ("bytes" if target == "qnn" else "compute")
    ranges = split_plan(*estimated_bytes(cfg), stages=stages, balance=balance)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_FILE).exists():
        raise ExportError(f"{out} exists and is not an artifact directory; refusing to overwrite it")
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        manifest = _write(ckpt, cfg, work, ranges, context, prefill, accuracy_level, kernels == "splitllm")
        if target == "qnn":
            from splitllm.export.build_qnn import add_qnn_target

            manifest = add_qnn_target(ckpt, manifest, work, calibration and Path(calibration), qnn_context, qnn_w8)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write(
    ckpt: Checkpoint,
    cfg: ModelConfig,
    work: Path,
    ranges: list[tuple[int, int]],
    context: int,
    prefill: int,
    accuracy_level: int,
    own_kernels: bool,
) -> Manifest:
    tok = ckpt.tokenizer()
    (work / "tokenizer.json").write_text(compact_merges(tok.tokenizer_json))
    progress = Progress(9 * cfg.num_layers + 4)  # every tensor (embed, layers, norm, lm_head), then checksums
    weights = WeightSource(ckpt, progress=progress)
    plans = []
    for k, (first, last) in enumerate(ranges):
        name = f"stage{k + 1}.cpu"
        progress.prefix = f"stage {k + 1}/{len(ranges)}: "
        wf = WeightsFile(work / f"{name}.weights")
        b = GraphBuilder(name, wf)
        graph = CpuStageGraph(b, cfg, context, accuracy_level, own_kernels)
        ins, outs = graph.build(
            first,
            last,
            has_embedding=k == 0,
            has_lm_head=k == len(ranges) - 1,
            weight=weights,
        )
        wf.close()
        b.save(work / f"{name}.onnx")
        spec = dict(file=f"{name}.onnx", weights=wf.path.name, inputs=ins, outputs=outs)
        plans.append(
            StagePlan(
                index=k,
                first_layer=first,
                last_layer=last,
                has_embedding=k == 0,
                has_lm_head=k == len(ranges) - 1,
                weight_bytes=wf.offset,
                graphs={
                    "cpu": {
                        "pp": GraphSpec(max_tokens=prefill, **spec),
                        "tg": GraphSpec(max_tokens=1, **spec),
                    }
                },
            )
        )
    kv_bytes = 2 * cfg.num_kv_heads * cfg.head_dim * np.dtype(graph.kv_dtype).itemsize
    progress.prefix = ""
    progress.doing("checksums")
    files = {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file()}
    progress.step("done")
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model=cfg,
        context_length=context,
        prefill_length=prefill,
        kv={
            "layout": "per layer: key and value [batch, kv_heads, context, head_dim] (batch: sessions in "
                      "consecutive pool slots), written in place",
            "dtype": graph.kv_dtype,
            "bytes_per_token_per_layer": kv_bytes,
            "attention": "ai.splitllm Attention" if own_kernels else "com.microsoft GroupQueryAttention",
        },
        quantization={
            "groups": weights.groups,
            "accuracy_level": accuracy_level,
            "cpu_kernels": "splitllm" if own_kernels else "onnxruntime",
            # MatMulQ4_1 / MatMulQ8_0's d and m: [N, K/32] (before 2026-12-07 padded to a multiple of 8 blocks)
            **({"block_scales": "K/32 a row"} if own_kernels else {}),
        },
        tokenizer={
            "file": "tokenizer.json",
            "chat_template": tok.chat_template,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "stop_token_ids": tok.stop_token_ids,
            "add_bos": tok.add_bos,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
        },
        stages=plans,
        files=files,
        source=ckpt.describe(),
    )
    (work / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest
