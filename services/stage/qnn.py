"""The qnn backend: ONNX Runtime sessions on the QNN HTP execution provider, and QnnGraph, the stage's static
prompt (P tokens) and token (1 token) graphs over a KV cache kept in Qualcomm's layout.

Per layer i the session's cache is key [kv, 1, head_dim, C] (transposed) and value [kv, 1, C, head_dim]. A
run feeds the first C - S slots as the past (masked from `position` on), gets the S new entries back and
writes the n valid ones at position..position+n-1. Prompt chunks are padded to P; a chunk that starts after
C - P (possible only when P does not divide the prompt's chunking) runs through the token graph row by row.

On x86 Linux the onnxruntime-qnn wheel runs the HTP backend in a simulator: same graphs, slow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitllm.services.common.manifest import Manifest, ModelConfig
from splitllm.services.common.rope import cos_sin

log = logging.getLogger("splitllm.stage.qnn")

EP = "QNNExecutionProvider"
# Snapdragon 8 Gen 3 (SM8650, HTP v75). The simulator needs a named target: without one, 128-token graphs
# fail to finalize (QNN_COMMON_ERROR_MEM_ALLOC).
HTP_TARGET = {"soc_model": "57", "htp_arch": "75"}
MASK_VALUE = -50.0  # additive mask of excluded positions (Qualcomm clips to -50: -1e4 costs 16-bit range)
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


class QnnError(ValueError):
    """The QNN backend cannot run a graph as asked; the message names the graph and the reason (a ValueError:
    the command line prints it as a one-line error)."""


def devices() -> list:
    """The QNN EP devices, registering the onnxruntime-qnn plugin library once per process."""
    devs = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    if not devs:
        try:
            import onnxruntime_qnn
        except ImportError:
            raise QnnError("the qnn backend needs onnxruntime-qnn (pip install 'splitllm[qnn]')") from None
        try:
            ort.register_execution_provider_library(EP, onnxruntime_qnn.get_library_path())
        except Exception as e:  # a second registration (another thread, another module) is fine
            if "already registered" not in str(e).lower():
                raise
        devs = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    if not devs:
        raise QnnError("onnxruntime-qnn is installed but offers no QNNExecutionProvider device")
    return devs


def qnn_session(
    path: Path,
    threads: int = 1,
    fallback: bool = False,
    target: dict[str, str] | None = None,
    config: dict[str, str] | None = None,
    ep_options: dict[str, str] | None = None,
) -> ort.InferenceSession:
    from splitllm.services.stage.runtime import session_options

    so = session_options(threads)
    so.log_severity_level = 3
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    opts = {
        "backend_type": "htp",
        "htp_performance_mode": "burst",
        "enable_block_quant_weight_optimization": "0",  # block-wise int4 weights keep their float block scales
        # the float residual stream (Adds, RMSNorms, hidden_in/hidden_out) runs in fp16; the simulator computes
        # fp16 with "0" as well, but the QNN EP's documented defaults differ between versions
        "enable_htp_fp16_precision": "1",
        **(target or HTP_TARGET),
        **(ep_options or {}),
    }
    so.add_provider_for_devices(devices(), opts)
    s = ort.InferenceSession(str(path), sess_options=so)
    if EP not in s.get_providers():  # ORT falls back to CPU silently when the EP cannot be created
        raise QnnError(f"{path.name}: the QNN execution provider could not be created (got {s.get_providers()})")
    return s


def cpu_nodes(s: ort.InferenceSession) -> list[tuple[str, str]]:
    """(op type, node name) of the nodes not assigned to the QNN EP."""
    return [
        (n.op_type, n.name) for g in s.get_provider_graph_assignment_info() if g.ep_name != EP for n in g.get_nodes()
    ]


def describe_nodes(nodes: list[tuple[str, str]]) -> str:
    ops = sorted({op for op, _ in nodes if op not in QDQ_OPS}) or sorted({op for op, _ in nodes})
    qdq = sum(op in QDQ_OPS for op, _ in nodes)
    n = len(nodes) - qdq if qdq < len(nodes) else len(nodes)
    extra = f", with {qdq} QuantizeLinear/DequantizeLinear around them" if qdq and qdq < len(nodes) else ""
    return f"{', '.join(ops)} ({n} node{'s' * (n != 1)}{extra})"


def open_graph(
    path: Path, threads: int = 1, allow_cpu_fallback: bool = False, target: dict[str, str] | None = None
) -> ort.InferenceSession:
    """A session that runs `path` on the HTP backend.

    Without fallback a graph the backend does not take whole is a QnnError naming the operators that fell out
    (found by a second session that allows fallback). With fallback the session runs and the fallen nodes are
    logged. Graph I/O quantization stays on QNN there, so only real operators are reported.
    """
    io = {"offload_graph_io_quantization": "0"}
    if allow_cpu_fallback:
        s = qnn_session(path, threads, fallback=True, target=target, ep_options=io)
        if fell := cpu_nodes(s):
            log.warning(
                "%s: %s run on the CPU (fallback allowed): %s",
                path.name,
                describe_nodes(fell),
                ", ".join(name for _, name in fell),
            )
        return s
    try:
        return qnn_session(path, threads, target=target)
    except QnnError:
        raise
    except Exception as e:
        if "fallback" not in str(e).lower():
            raise QnnError(f"{path.name}: the QNN HTP backend rejected the graph: {e}") from None
    fell = cpu_nodes(qnn_session(path, threads, fallback=True, target=target, ep_options=io))
    raise QnnError(
        f"{path.name}: the QNN HTP backend does not take the whole graph; these would fall back to the CPU: "
        f"{describe_nodes(fell)}. Re-export the graph, or allow it with --allow-cpu-fallback"
    )


Runner = Callable[[str, dict[str, np.ndarray]], list[np.ndarray]]


class QnnGraph:
    """The stage's prompt and token graphs (QDQ or EPContext models) and the KV layout they need.

    `runner(mode, feeds)` runs one graph; export's calibration passes float CPU graphs through the same code.
    """

    batched = False  # fixed shapes: one session per run

    def __init__(
        self, cfg: ModelConfig, layers: range, context: int, prefill: int, first: bool, last: bool, runner: Runner
    ) -> None:
        self.cfg, self.layers, self.context, self.prefill = cfg, layers, context, prefill
        self.first, self.last, self.runner = first, last, runner
        self.cos, self.sin = cos_sin(cfg, context + prefill)  # padded rows run past the context
        kv, hd, c = cfg.num_kv_heads, cfg.head_dim, context
        self.kv_shapes = {}
        for i in layers:
            self.kv_shapes[f"past_key_{i}"] = (kv, 1, hd, c)
            self.kv_shapes[f"past_value_{i}"] = (kv, 1, c, hd)

    @staticmethod
    def from_manifest(
        root: Path, manifest: Manifest, stage: int, threads: int, allow_cpu_fallback: bool = False, on_cpu: bool = False
    ) -> QnnGraph:
        """The stage's graphs on the HTP backend, from the context binaries when the export wrote them.
        `on_cpu` runs the QDQ graphs on the CPU EP instead: the same arithmetic to ~1e-6, without the NPU."""
        plan = manifest.stages[stage]
        target = manifest.quantization.get("qnn", {}).get("htp_target")
        sessions = {}
        for mode in ("pp", "tg"):
            g = plan.graph("qnn", mode)
            if on_cpu:
                sessions[mode] = ort.InferenceSession(str(root / g.file), providers=["CPUExecutionProvider"])
                continue
            path = root / (g.context[0] if g.context else g.file)
            try:
                sessions[mode] = open_graph(path, threads, allow_cpu_fallback, target)
            except QnnError:
                if not g.context:
                    raise
                log.warning("%s: context binary unusable, compiling %s instead", path.name, g.file)
                sessions[mode] = open_graph(root / g.file, threads, allow_cpu_fallback, target)
        return QnnGraph(
            manifest.model,
            range(plan.first_layer, plan.last_layer),
            manifest.context_length,
            manifest.prefill_length,
            plan.has_embedding,
            plan.has_lm_head,
            lambda mode, feeds: sessions[mode].run(None, feeds),
        )

    def feeds(self, buffers: dict[str, np.ndarray], x: np.ndarray, position: int, seq: int) -> dict[str, np.ndarray]:
        n, c, past = x.shape[0], self.context, self.context - seq
        pad = np.zeros((seq - n, *x.shape[1:]), x.dtype)
        f = {("input_ids" if self.first else "hidden_in"): np.concatenate([x, pad])[None]}
        mask = np.full((1, 1, seq, c), MASK_VALUE, np.float32)
        mask[..., :position] = 0.0
        mask[0, 0, :, past:] = np.where(np.tril(np.ones((seq, seq), bool)), 0.0, MASK_VALUE)
        f["attention_mask"] = mask
        f["position_cos"] = self.cos[position : position + seq][None, None]
        f["position_sin"] = self.sin[position : position + seq][None, None]
        for i in self.layers:
            f[f"past_key_{i}_in"] = np.ascontiguousarray(buffers[f"past_key_{i}"][..., :past])
            f[f"past_value_{i}_in"] = np.ascontiguousarray(buffers[f"past_value_{i}"][:, :, :past])
        if self.last and seq > 1:
            f["last_index"] = np.array([n - 1], np.int32)
        return f

    def step(self, buffers: dict[str, np.ndarray], x: np.ndarray, position: int) -> np.ndarray:
        """One run of the prompt graph (n > 1) or the token graph (n == 1); writes the new KV entries."""
        n = x.shape[0]
        mode, seq = ("tg", 1) if n == 1 else ("pp", self.prefill)
        out = self.runner(mode, self.feeds(buffers, x, position, seq))
        for k, i in enumerate(self.layers):
            buffers[f"past_key_{i}"][..., position : position + n] = out[1 + 2 * k][..., :n]
            buffers[f"past_value_{i}"][:, :, position : position + n] = out[2 + 2 * k][:, :, :n]
        return out[0][0] if self.last else out[0][0, :n]

    def run(self, s: object, x: np.ndarray, position: int) -> np.ndarray:
        """The CpuGraph interface: hidden states [n, H] or, at the last stage, logits [vocab]."""
        buffers = s.buffers  # type: ignore[attr-defined]
        if x.shape[0] > 1 and position > self.context - self.prefill:
            outs = [self.step(buffers, x[r : r + 1], position + r) for r in range(x.shape[0])]
            return outs[-1] if self.last else np.concatenate(outs)
        return self.step(buffers, x, position)
