"""The artifact manifest: the contract export writes and every service reads (DESIGN.md, Contracts)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODES = ("pp", "tg")
TARGETS = ("cpu", "qnn")
LOGIT_ROWS = "logit_rows"  # the last stage's input: logits for a sequence's last n rows (a speculative step's drafts)


class ManifestError(ValueError):
    """The artifact directory is unusable: wrong schema, missing file or checksum mismatch."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. Dimensions are ints or symbolic names (dynamic)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class GraphSpec:
    file: str
    weights: str
    max_tokens: int  # tokens per run: P for pp, 1 for tg (a dynamic graph takes 1..max_tokens)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quant_params: dict[str, Any] = field(default_factory=dict)  # per I/O name (qnn: scale, zero point)
    context: list[str] = field(default_factory=list)  # qnn: EPContext model, then its context binaries


@dataclass(frozen=True)
class StagePlan:
    index: int
    first_layer: int  # inclusive
    last_layer: int  # exclusive
    has_embedding: bool
    has_lm_head: bool
    weight_bytes: int
    graphs: dict[str, dict[str, GraphSpec]]  # target -> mode -> graph

    def graph(self, target: str, mode: str) -> GraphSpec:
        try:
            return self.graphs[target][mode]
        except KeyError:
            have = ", ".join(sorted(self.graphs)) or "none"
            raise ManifestError(
                f"stage {self.index + 1} has no {mode} graph for target {target!r} (targets here: {have})"
            ) from None


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    model: ModelConfig
    context_length: int
    prefill_length: int
    kv: dict[str, Any]  # layout, dtype, bytes_per_token_per_layer
    quantization: dict[str, Any]  # per tensor group: bits, block, scheme
    tokenizer: dict[str, Any]  # file, chat_template, bos/eos/stop ids, add_bos
    stages: list[StagePlan]
    files: dict[str, str]  # relative path -> sha256
    source: dict[str, Any]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def multi_row_logits(self, backend: str) -> bool:
        """Whether the last stage's graph for `backend` answers logits for more than a sequence's last row (exported
        after 2026-12-07, CPU): what a speculative step needs to verify its draft tokens."""
        graphs = self.stages[-1].graphs.get(backend, {})
        return "pp" in graphs and any(t.name == LOGIT_ROWS for t in graphs["pp"].inputs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Manifest:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {version!r} is not supported (this build reads {SCHEMA_VERSION})"
            )
        try:
            stages = [
                StagePlan(
                    **{k: v for k, v in s.items() if k != "graphs"},
                    graphs={
                        t: {
                            m: GraphSpec(
                                **{k: v for k, v in g.items() if k not in ("inputs", "outputs")},
                                inputs=[TensorSpec(**x) for x in g["inputs"]],
                                outputs=[TensorSpec(**x) for x in g["outputs"]],
                            )
                            for m, g in modes.items()
                        }
                        for t, modes in s["graphs"].items()
                    },
                )
                for s in d["stages"]
            ]
            return Manifest(**{**d, "model": ModelConfig(**d["model"]), "stages": stages})
        except (KeyError, TypeError) as e:
            raise ManifestError(f"manifest is malformed: {e}") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(artifacts: str | Path, verify: list[str] | None = None) -> tuple[Manifest, str]:
    """Read DIR/manifest.json; check the sha256 of `verify` files (all files when None).

    Returns the manifest and the sha256 of manifest.json itself (what services compare).
    """
    root = Path(artifacts)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path} not found: not an artifact directory (run `splitllm export`)")
    raw = path.read_bytes()
    try:
        manifest = Manifest.from_dict(json.loads(raw))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    for rel in manifest.files if verify is None else verify:
        want = manifest.files.get(rel)
        if want is None:
            raise ManifestError(f"{rel} is not listed in {path}")
        file = root / rel
        if not file.is_file():
            raise ManifestError(f"{file} is missing (listed in the manifest)")
        got = sha256_file(file)
        if got != want:
            raise ManifestError(
                f"{file} is corrupt: sha256 {got[:16]}... does not match the manifest's {want[:16]}..."
            )
    return manifest, hashlib.sha256(raw).hexdigest()


def stage_files(manifest: Manifest, stage: int, target: str) -> list[str]:
    """The files one stage needs for one target (what a stage verifies at start)."""
    plan = manifest.stages[stage]
    files: list[str] = []
    for mode in MODES:
        g = plan.graph(target, mode)
        for f in (g.file, g.weights, *g.context):
            if f and f not in files:
                files.append(f)
    return files
