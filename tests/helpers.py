"""Shared test material: a tiny Llama-3-style Hugging Face checkpoint written by the tests themselves, and whether a
process still runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from splitllm.export.tokenizer import PRE_TOKENIZER_REGEXES

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "../shared/reference/smollm2"

# Meta-Llama-3-8B-Instruct's chat template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MULTIBYTE = "Grüße, naïve café 😀🚀 日本語のテキスト 한국어 👩‍👩‍👧 ok"


def running(pid: int) -> bool:
    """Neither gone nor a zombie (this sandbox's init may not reap the orphans it adopts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tiny_llama3_tokenizer() -> Tokenizer:
    """A tiny byte-level BPE laid out like Llama 3's tokenizer.json (specials get ids 0..4 here)."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES["llama-bpe"][0]), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
        "Where is California? It is a state in the west of the United States.",
        MULTIBYTE,
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    return tok


def write_tokenizer_dir(path: Path) -> None:
    tiny_llama3_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": {"content": "<|eot_id|>", "special": True},
                "chat_template": LLAMA3_TEMPLATE,
            }
        )
    )
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 4]}))


def to_bf16(a: np.ndarray) -> bytes:
    """float32 -> bfloat16 bytes, round to nearest even."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "BF16") -> None:
    """A safetensors file in bf16 (numpy has no bfloat16, so the header is written here)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        blob = to_bf16(a) if dtype == "BF16" else np.ascontiguousarray(a, np.float32).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for b in blobs:
            f.write(b)


def tiny_config(layers: int = 4, tied: bool = False, **over: object) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "vocab_size": 448,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16",
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    cfg.update(over)
    return cfg


def write_tiny_llama3(
    path: Path, layers: int = 4, tied: bool = False, seed: int = 0, shards: int = 2, **over: object
) -> Path:
    """A random Llama-3-architecture checkpoint in Hugging Face layout (bf16 shards, GQA, llama3 rope)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(layers, tied, **over)
    (path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer_dir(path)
    rng = np.random.default_rng(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)  # noqa: E731
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32),
        "model.norm.weight": 1 + 0.1 * rng.standard_normal(h).astype(np.float32),
    }
    if not tied:
        tensors["lm_head.weight"] = w(v, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": 1 + 0.1 * rng.standard_normal(h).astype(np.float32),
            p + "post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(h).astype(np.float32),
            p + "self_attn.q_proj.weight": w(q, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(f, h),
            p + "mlp.up_proj.weight": w(f, h),
            p + "mlp.down_proj.weight": w(h, f),
        }
    names = list(tensors)
    per = -(-len(names) // shards)
    for k in range(shards):
        part = {n: tensors[n] for n in names[k * per : (k + 1) * per]}
        write_safetensors(path / f"model-{k + 1:05d}-of-{shards:05d}.safetensors", part)
    return path
