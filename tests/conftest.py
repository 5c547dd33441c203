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
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_llama3(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint in 2 stages, context 64, prefill 16."""
    out = tmp_path_factory.mktemp("art") / "tiny"
    export(tiny_checkpoint, out, stages=2, context=64, prefill=16)
    return out
