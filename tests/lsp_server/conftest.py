"""Fixtures of the language-server tests."""

from pathlib import Path

import pytest
from helpers import make_checkpoint


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Qwen2 checkpoint with FIM tokens (written once per test session)."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen2-lsp"), "qwen2")
