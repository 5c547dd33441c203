from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REFERENCE_DIR, write_tiny_llama3

from splitllm.export.build import export
from splitllm.export.sources import smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((REFERENCE_DIR / "llamacpp_chat_greedy.json").read_text())


@pytest.fixture(scope="session")
def smollm2_artifacts(tmp_path_factory, smollm2_path) -> Path:
    out = tmp_path_factory.mktemp("art") / "smollm2"
    export(smollm2_path, out, stages=4)
    return out


@pytest.fixture(scope="session")
def smollm2_exact_artifacts(tmp_path_factory, smollm2_path) -> Path:
    """SmolLM2 in float arithmetic throughout, for tests that compare exactly: float matmuls (accuracy level 0) and
    ONNX Runtime's GroupQueryAttention over a float32 cache (--kernels onnxruntime).

    The kernels for one row and for several sum in different orders: a last-bit difference. Where something rounds
    (level 4's int8 activations, our Attention's float16 cache) it can flip a rounding that then grows through 30
    layers, so a session decoded alone and in a batch can part at a near-tie. In float the two agree to ~1e-6, so
    outputs equal exactly unless something is really wrong (a mixed-up session or slot)."""
    out = tmp_path_factory.mktemp("art") / "smollm2-exact"
    export(smollm2_path, out, stages=4, accuracy_level=0, kernels="onnxruntime")
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_llama3(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint in 2 stages, context 64, prefill 16, float matmuls (see smollm2_exact_artifacts)."""
    out = tmp_path_factory.mktemp("art") / "tiny"
    export(tiny_checkpoint, out, stages=2, context=64, prefill=16, accuracy_level=0)
    return out
