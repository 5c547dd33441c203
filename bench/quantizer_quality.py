#!/usr/bin/env python
"""Quality of the export's 4-bit quantizer: SmolLM2 perplexity after dequantizing and re-quantizing.

    python bench/quantizer_quality.py                 # table + bench/results/quantizer_quality.json
    python bench/quantizer_quality.py --work DIR      # keep the float checkpoint and artifacts in DIR

SmolLM2-135M-Instruct's GGUF (Q4_1 layers, Q8_0 embedding) is dequantized to float32 and written as a
Hugging Face checkpoint; the export then quantizes it as any 16/32-bit checkpoint: layers to 4 bits on
the fast MatMulNBits path (block 32, uint8 zero points), embedding and lm_head to 8 bits. Variants:

  gguf         the GGUF exported directly (exact Q4_1, with the block-offset term): what the float came from
  ours         the export's quantizer: per-block search of scale and zero point, weighted by each input
               channel's mean square activation on random tokens (calibrate.py); accuracy_level 4
  ours_level0  the same weights computed in float (accuracy_level 0)
  unweighted   the same search minimising plain squared weight error
  rtn          plain round-to-nearest over the block's [min, max] (quantize(search=False))

Perplexity as `splitllm eval perplexity --text .../ppl_text.txt` (512-token windows): the second half of
each window (llama-perplexity) and all tokens. Published figures on this text (second half): llama.cpp on
the Q4_1 GGUF 13.47, ONNX Runtime GenAI's builder 17.14 (15.86 asymmetric), llama.cpp Q4_0 15.81.
Also: seconds to quantize one 4096 x 14336 matrix (Llama-3-8B's MLP shape), weighted as in an export.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from splitllm.bench.export_memory import write_safetensors
from splitllm.export import build
from splitllm.export.build import export
from splitllm.export.checkpoint import HF_NAMES, LAYER_TENSORS, open_checkpoint
from splitllm.export.evaluate import perplexity
from splitllm.export.quantize import quantize
from splitllm.export.sources import smollm2_gguf
from splitllm.services.coordinator.text import TextCodec
from splitllm.services.stage.chain import LocalChain

RESULTS = Path(__file__).resolve().parent / "results" / "quantizer_quality.json"
TEXT = Path(__file__).resolve().parents[1] / "../shared/reference/smollm2/ppl_text.txt"
VARIANTS = ["gguf", "ours", "ours_level0", "unweighted", "rtn"]
PUBLISHED = {
    "llama.cpp Q4_1 (the GGUF)": 13.47,
    "ORT GenAI builder": 17.14,
    "ORT GenAI asymmetric": 15.86,
    "llama.cpp Q4_0": 15.81,
}


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """The GGUF, every tensor dequantized to float32, as a Hugging Face checkpoint directory."""
    ckpt = open_checkpoint(gguf)
    c = ckpt.config
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": c.num_layers,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": 8192,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tok = ckpt.tokenizer()
    (out / "tokenizer.json").write_text(tok.tokenizer_json)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "add_bos_token": tok.add_bos,
                "chat_template": tok.chat_template,
            }
        )
    )
    names = {"embed": HF_NAMES["embed"], "norm": HF_NAMES["norm"]}
    if not c.tie_word_embeddings:
        names["lm_head"] = HF_NAMES["lm_head"]
    for i in range(c.num_layers):
        names |= {f"layers.{i}.{t}": f"model.layers.{i}.{HF_NAMES[t]}" for t in LAYER_TENSORS}

    def dense(name: str) -> np.ndarray:
        w = ckpt.tensor(name)
        return np.asarray(w if isinstance(w, np.ndarray) else w.dequantize(), np.float32)

    specs = [(hf, "F32", dense(n).shape) for n, hf in names.items()]  # shapes: cheap enough at 135M
    write_safetensors(out / "model.safetensors", specs, (dense(n).tobytes() for n in names))
    return out


def measure(artifacts: Path, text: Path) -> dict:
    chain = LocalChain(artifacts)
    codec = TextCodec.from_file(artifacts / chain.manifest.tokenizer["file"])
    p = perplexity(chain, codec.encode(text.read_text()), ctx=512)
    return {
        "second_half": round(p.second_half, 4),
        "all_tokens": round(p.all_tokens, 4),
        "scored": [p.scored_second_half, p.scored_all],
    }


def export_variant(variant: str, gguf: Path, hf: Path, out: Path) -> float:
    t = time.perf_counter()
    if variant == "gguf":
        export(gguf, out)
    elif variant == "rtn":
        with mock.patch.object(build, "quantize", functools.partial(quantize, search=False)):
            export(hf, out)
    elif variant == "unweighted":
        with mock.patch.object(build, "ActivationStats", lambda ckpt: lambda name: None):
            export(hf, out)
    else:
        export(hf, out, accuracy_level=0 if variant == "ours_level0" else 4)
    return time.perf_counter() - t


def quantizer_seconds(repeats: int = 2) -> float:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4096, 14336)) * 0.02).astype(np.float32)
    importance = rng.gamma(0.5, size=14336).astype(np.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        quantize(w, importance=importance)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="keep the float checkpoint and artifacts here")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--text", type=Path, default=TEXT)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        gguf = smollm2_gguf()
        hf = work / "smollm2-f32"
        if not (hf / "model.safetensors").exists():
            gguf_to_hf(gguf, hf)
        rows = {}
        for v in a.variants:
            out = work / f"art-{v}"
            seconds = export_variant(v, gguf, hf, out)
            rows[v] = measure(out, a.text) | {"export_s": round(seconds, 1)}
            print(
                f"{v:12s} {rows[v]['second_half']:8.3f} {rows[v]['all_tokens']:8.3f}  (export {seconds:.0f} s)",
                flush=True,
            )
    q_s = quantizer_seconds()
    print(f"\n{'variant':12s} {'ppl 2nd half':>12s} {'ppl all':>8s}")
    for v, r in rows.items():
        print(f"{v:12s} {r['second_half']:12.3f} {r['all_tokens']:8.3f}")
    for k, v in PUBLISHED.items():
        print(f"{'  ' + k:28s} {v:6.2f} (published, second half)")
    print(f"quantize() of a 4096 x 14336 matrix: {q_s:.2f} s")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "text": str(a.text.name),
                "ctx": 512,
                "perplexity": rows,
                "published_second_half": PUBLISHED,
                "quantize_4096x14336_s": round(q_s, 2),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
