"""smollm2 on the qnn target: fidelity against llama.cpp and the cpu target, and stage start-up.

    python -m splitllm.bench.qnn_smollm2 [--artifacts DIR] [--htp-prompts 3] [--htp-tokens 30] [--ppl-windows 4]

Slow: on x86 the HTP backend is a simulator (seconds per stage per token), so greedy decoding on HTP covers the
three reference prompts only, and perplexity runs the same QDQ graphs on the CPU EP (which the HTP matches to
about four digits of cosine; the figure below says how closely on this run). Exports the artifact (with
context binaries) when DIR holds none. Writes bench/results/qnn_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from splitllm.export.evaluate import perplexity
from splitllm.services.common.manifest import MANIFEST_FILE, Manifest, load_manifest
from splitllm.services.coordinator.text import TextCodec
from splitllm.services.stage.chain import LocalChain
from splitllm.services.stage.qnn import QnnGraph, open_graph
from splitllm.services.stage.runtime import Entry, StageRuntime

REFERENCE = Path(__file__).resolve().parents[1] / "../shared/reference/smollm2"
RESULTS = Path(__file__).resolve().parent / "results"


class QdqOnCpuStage:
    """A stage running its qnn graphs (QDQ) on the CPU EP: the HTP arithmetic, at CPU speed."""

    def __init__(self, root: Path, manifest: Manifest, k: int) -> None:
        self.graph = QnnGraph.from_manifest(root, manifest, k, 2, on_cpu=True)
        self.buffers: dict[str, dict[str, np.ndarray]] = {}

    def forward(self, e: Entry) -> np.ndarray:
        if e.position == 0:
            self.buffers[e.session_id] = {n: np.zeros(s, np.float32) for n, s in self.graph.kv_shapes.items()}
        return self.graph.step(self.buffers[e.session_id], e.data, e.position)

    def release(self, sid: str) -> bool:
        return self.buffers.pop(sid, None) is not None


class QdqOnCpuChain(LocalChain):
    def __init__(self, root: Path) -> None:  # noqa: D107 - LocalChain's interface, other stages
        self.manifest, _ = load_manifest(root, verify=[])
        self.prefill = self.manifest.prefill_length
        self.stages = [QdqOnCpuStage(root, self.manifest, k) for k in range(self.manifest.num_stages)]  # type: ignore


def agreeing(got: list[int], want: list[int]) -> dict:
    prefix = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    same = sum(a == b for a, b in zip(got, want, strict=False))
    return {"prefix": prefix, "same_position": same, "of": len(want)}


def startup(root: Path, m: Manifest) -> dict:
    """Seconds to open each stage's two graphs: compiling the QDQ models vs loading the context binaries."""
    out = {}
    for k, s in enumerate(m.stages):
        row = {}
        for kind in ("qdq", "context"):
            t = time.monotonic()
            for mode in ("pp", "tg"):
                g = s.graph("qnn", mode)
                if kind == "context" and not g.context:
                    break
                open_graph(root / (g.context[0] if kind == "context" else g.file))
            else:
                row[kind] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        StageRuntime(root, k, "qnn")
        row["stage_runtime"] = round(time.monotonic() - t, 2)
        out[f"stage{k + 1}"] = row
        print(f"start-up stage {k + 1} ({s.last_layer - s.first_layer} layers): {row}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts/smollm2-qnn")
    ap.add_argument("--htp-prompts", type=int, default=3, help="reference prompts decoded on the HTP simulator")
    ap.add_argument("--htp-tokens", type=int, default=30)
    ap.add_argument("--ppl-windows", type=int, default=4, help="512-token windows of ppl_text.txt (0: skip)")
    ap.add_argument("--skip-startup", action="store_true")
    a = ap.parse_args()
    root = Path(a.artifacts)
    res: dict = {}
    if not (root / MANIFEST_FILE).is_file():
        from splitllm.export.build import export
        from splitllm.export.sources import smollm2_gguf

        t = time.monotonic()
        export(smollm2_gguf(), root, target="qnn", qnn_context=True)
        res["export_seconds"] = round(time.monotonic() - t, 1)
    m, _ = load_manifest(root)
    res["quantization"] = m.quantization["qnn"]
    if not a.skip_startup:
        res["startup_seconds"] = startup(root, m)

    ref = json.loads((REFERENCE / "llamacpp_chat_greedy.json").read_text())
    chains = {"cpu": LocalChain(root, "cpu"), "qnn_qdq_on_cpu": QdqOnCpuChain(root)}
    htp = LocalChain(root, "qnn") if a.htp_prompts else None
    if htp:  # the same graphs on HTP and on the CPU EP: first-token logits of the first prompt
        ids = ref["prompts"][0]["prompt_token_ids"]
        x, y = (c.prefill_tokens("cmp", ids) for c in (htp, chains["qnn_qdq_on_cpu"]))
        htp.release("cmp"), chains["qnn_qdq_on_cpu"].release("cmp")
        res["htp_vs_qdq_on_cpu"] = {
            "cos": float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)),
            "max_diff": float(np.abs(x - y).max()),
            "same_argmax": bool(x.argmax() == y.argmax()),
        }
        print(f"first-token logits, HTP vs QDQ on CPU: {res['htp_vs_qdq_on_cpu']}", flush=True)
    greedy: dict = {}
    for i, p in enumerate(ref["prompts"]):
        want = p["greedy_token_ids"]
        row = {}
        for name, chain in chains.items():
            row[name] = agreeing(chain.greedy(p["prompt_token_ids"], len(want), stop_ids={2}), want)
        if htp and i < a.htp_prompts:
            t = time.monotonic()
            got = htp.greedy(p["prompt_token_ids"], min(a.htp_tokens, len(want)), stop_ids={2})
            row["qnn_htp"] = agreeing(got, want) | {"seconds": round(time.monotonic() - t, 1)}
        greedy[p["prompt"]] = row
        print(f"greedy {p['prompt']!r}: {row}", flush=True)
    res["greedy_vs_llamacpp"] = greedy

    if a.ppl_windows:
        codec = TextCodec.from_file(root / m.tokenizer["file"])
        tokens = codec.encode((REFERENCE / "ppl_text.txt").read_text())[: 512 * a.ppl_windows]
        want = json.loads((REFERENCE / "llamacpp_perplexity.json").read_text())
        ppl = {"llamacpp_second_half": want["ppl_llama_perplexity_style_second_half"], "windows": a.ppl_windows}
        for name, chain in chains.items():
            t = time.monotonic()
            p = perplexity(chain, tokens, 512)
            ppl[name] = {"second_half": round(p.second_half, 4), "all": round(p.all_tokens, 4),
                         "seconds": round(time.monotonic() - t)}
            print(f"perplexity {name}: {ppl[name]}", flush=True)
        res["perplexity"] = ppl
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qnn_smollm2.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "quantization"}, indent=1))


if __name__ == "__main__":
    main()
