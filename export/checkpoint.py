"""Checkpoint readers: GGUF files and Hugging Face directories, one tensor at a time.

Both present the same canonical tensor names and Hugging Face conventions (rotate-half rotary, so
GGUF's Q/K rows are un-permuted here), so everything downstream is source-agnostic:

    embed, norm, lm_head, layers.{i}.{attn_norm,q,k,v,o,ffn_norm,gate,up,down}

`tensor(name)` returns float32 arrays or, for GGUF weights already quantized, an exact NBitsWeight /
RowQuantized (never quantized a second time). Only one tensor is resident at a time; `row_chunks` reads
a float tensor in row blocks (Hugging Face), so even a 128256 x 4096 embedding never is.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from splitllm.export.quantize import NBitsWeight, RowQuantized, from_gguf, rows_from_gguf
from splitllm.export.tokenizer import TokenizerBundle, tokenizer_from_gguf, tokenizer_from_hf_dir
from splitllm.services.common.manifest import ModelConfig

Weight = np.ndarray | NBitsWeight | RowQuantized
LAYER_TENSORS = ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down")
SUPPORTED_ARCH = "llama (LlamaForCausalLM: Llama 2/3, SmolLM, TinyLlama, ...)"


class CheckpointError(ValueError):
    """The source cannot be exported; the message names the problem."""


class Checkpoint:
    config: ModelConfig

    def tensor(self, name: str) -> Weight:
        raise NotImplementedError

    def row_chunks(self, name: str, max_bytes: int) -> Iterator[Weight]:
        """The tensor in blocks of rows of at most `max_bytes` as float32 (at least one row); readers that
        cannot split a tensor (GGUF) yield it whole."""
        yield self.tensor(name)

    def tokenizer(self) -> TokenizerBundle:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


def open_checkpoint(source: str | Path) -> Checkpoint:
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return HFCheckpoint(path)
    return GGUFCheckpoint(path)


def unpermute_qk(w: Weight, n_heads: int) -> Weight:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary -> rotate-half)."""
    rows = w.shape[0] if isinstance(w, np.ndarray) else w.scales.shape[0]
    hd = rows // n_heads
    perm = np.arange(rows).reshape(n_heads, hd // 2, 2).transpose(0, 2, 1).reshape(-1)
    if isinstance(w, np.ndarray):
        return w[perm]
    return dataclasses.replace(
        w,
        packed=w.packed[perm],
        scales=w.scales[perm],
        zero_points=None if w.zero_points is None else w.zero_points[perm],
        block_offsets=None if w.block_offsets is None else w.block_offsets[:, perm],
    )


# ---------------------------------------------------------------------------------------------- GGUF

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
GGUF_NAMES = {
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
    "attn_norm": "attn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
}


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the gguf package raises bare ValueError/struct errors on bad files
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self._field("general.architecture")
        if arch != "llama":
            raise CheckpointError(
                f"{path}: architecture {arch!r} is not supported; supported: {SUPPORTED_ARCH}"
            )
        a = "llama."
        n_heads = int(self._field(a + "attention.head_count"))
        hidden = int(self._field(a + "embedding_length"))
        self._check_tensors()
        vocab = self._field(a + "vocab_size", None)
        if vocab is None:
            vocab = int(self.tensors["token_embd.weight"].shape[1])
        self.config = ModelConfig(
            name=str(self._field("general.name", path.stem)),
            architecture="llama",
            num_layers=int(self._field(a + "block_count")),
            hidden_size=hidden,
            intermediate_size=int(self._field(a + "feed_forward_length")),
            num_heads=n_heads,
            num_kv_heads=int(self._field(a + "attention.head_count_kv", n_heads)),
            head_dim=int(self._field(a + "rope.dimension_count", hidden // n_heads)),
            vocab_size=int(vocab),
            rms_norm_eps=float(self._field(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self._field(a + "rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(),
            tie_word_embeddings="output.weight" not in self.tensors,
        )

    def _field(self, key: str, default: object = KeyError) -> object:
        f = self.reader.fields.get(key)
        if f is None:
            if default is KeyError:
                raise CheckpointError(f"{self.path}: GGUF metadata lacks {key}")
            return default
        return f.contents()

    def _rope_scaling(self) -> dict | None:
        if "rope_freqs.weight" in self.tensors:  # Llama 3.1 GGUFs carry the per-frequency factors
            factors = np.asarray(self.tensors["rope_freqs.weight"].data, dtype=np.float32)
            return {"rope_type": "factors", "factors": factors.tolist()}
        return None

    def _check_tensors(self) -> None:
        for t in self.reader.tensors:
            if t.tensor_type.name not in GGUF_TYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} has GGUF type {t.tensor_type.name}; "
                    f"supported: {', '.join(GGUF_TYPES)}"
                )
            n_bytes = int(t.data.nbytes)
            if n_bytes != int(t.n_bytes):
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} is truncated ({n_bytes} of {t.n_bytes} bytes)"
                )

    def _gguf_name(self, name: str) -> str:
        if name.startswith("layers."):
            _, i, short = name.split(".")
            return f"blk.{i}.{GGUF_NAMES[short]}"
        if name == "lm_head" and self.config.tie_word_embeddings:
            return GGUF_NAMES["embed"]
        return GGUF_NAMES[name]

    def tensor(self, name: str) -> Weight:
        gname = self._gguf_name(name)
        t = self.tensors.get(gname)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {gname} is missing")
        n, k = (int(t.shape[1]), int(t.shape[0])) if len(t.shape) == 2 else (int(t.shape[0]), 1)
        try:
            if name == "embed":
                return rows_from_gguf(np.asarray(t.data), t.tensor_type, (n, k))
            w = from_gguf(np.asarray(t.data), t.tensor_type, (n, k) if len(t.shape) == 2 else (n,))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: tensor {gname}: {e}") from None
        short = name.rsplit(".", 1)[-1]
        if short == "q":
            return unpermute_qk(w, self.config.num_heads)
        if short == "k":
            return unpermute_qk(w, self.config.num_kv_heads)
        return w

    def tokenizer(self) -> TokenizerBundle:
        try:
            return tokenizer_from_gguf(self.reader)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    def describe(self) -> dict:
        types = sorted({t.tensor_type.name for t in self.reader.tensors})
        return {"kind": "gguf", "path": str(self.path), "tensor_types": types}


# ------------------------------------------------------------------------------------- Hugging Face

HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _float32(flat: np.ndarray, dtype: str) -> np.ndarray:
    if dtype != "BF16":
        return flat.astype(np.float32)
    out = np.zeros(flat.size, np.float32)  # bf16 is a float32's high half: one allocation, no temporaries
    out.view(np.uint16)[1::2] = flat
    return out


class HFCheckpoint(Checkpoint):
    """A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: config.json is missing (not a Hugging Face checkpoint directory)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
        model_type = cfg.get("model_type")
        if model_type != "llama":
            raise CheckpointError(
                f"{path}: model_type {model_type!r} is not supported; supported: {SUPPORTED_ARCH}"
            )
        n_heads = int(cfg["num_attention_heads"])
        self.config = ModelConfig(
            name=str(cfg.get("_name_or_path") or path.name),
            architecture="llama",
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=n_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=cfg.get("rope_scaling"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
        scaling = self.config.rope_scaling
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
            raise CheckpointError(f"{path}: rope_scaling {scaling!r} is not supported (supported: llama3)")
        self.index = self._index()

    def _index(self) -> dict[str, tuple[Path, str, list[int], int, int]]:
        """tensor name -> (file, dtype, shape, begin, end) from the safetensors headers."""
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        index = {}
        for f in files:
            try:
                with open(f, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{f}: not a valid safetensors file ({e})") from None
            size = f.stat().st_size
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                if 8 + n + end > size:
                    raise CheckpointError(f"{f}: truncated (tensor {name} ends past the end of the file)")
                index[name] = (f, meta["dtype"], meta["shape"], 8 + n + begin, 8 + n + end)
        return index

    def _hf_name(self, name: str) -> str:
        if name.startswith("layers."):
            _, i, short = name.split(".")
            return f"model.layers.{i}.{HF_NAMES[short]}"
        if name == "lm_head" and self.config.tie_word_embeddings:
            return HF_NAMES["embed"]
        return HF_NAMES[name]

    def tensor(self, name: str) -> Weight:
        (whole,) = self.row_chunks(name, 1 << 62)
        return whole

    def row_chunks(self, name: str, max_bytes: int) -> Iterator[np.ndarray]:
        hname = self._hf_name(name)
        if hname not in self.index:
            raise CheckpointError(f"{self.path}: tensor {hname} is missing")
        file, dtype, shape, begin, end = self.index[hname]
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {hname} has dtype {dtype}; supported: F32, F16, BF16")
        np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
        row = int(np.prod(shape[1:]))  # elements per row
        step = max(1, max_bytes // (4 * row))
        with open(file, "rb") as fh:  # plain reads, not mmap: mapped pages would count in RSS
            fh.seek(begin)
            for r in range(0, shape[0], step):
                m = min(step, shape[0] - r)
                raw = np.frombuffer(fh.read(m * row * np_dtype.itemsize), np_dtype)
                yield _float32(raw, dtype).reshape(m, *shape[1:])

    def tokenizer(self) -> TokenizerBundle:
        try:
            return tokenizer_from_hf_dir(self.path)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    def describe(self) -> dict:
        dtypes = sorted({v[1] for v in self.index.values()})
        return {"kind": "hf", "path": str(self.path), "tensor_types": dtypes}
