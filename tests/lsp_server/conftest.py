"""Fixtures of the language-server tests."""

from pathlib import Path

import pytest
import pytest_lsp
from helpers import make_checkpoint
from lsp_testing import SERVER_ENV, lsp_command
from pytest_lsp import ClientServerConfig, LanguageClient


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Qwen2 checkpoint with FIM tokens (written once per test session)."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen2-lsp"), "qwen2")


@pytest_lsp.fixture(config=ClientServerConfig(server_command=lsp_command("--fake"), server_env=SERVER_ENV))
async def client(lsp_client: LanguageClient):
    """`editkv lsp --fake`: instant answers naming their position (a module may define its own `client`)."""
    yield
    await lsp_client.shutdown_session()


@pytest_lsp.fixture(config=ClientServerConfig(server_command=lsp_command("--fake", "--fake-delay-ms", "2000"),
                                              server_env=SERVER_ENV))
async def slow_client(lsp_client: LanguageClient):
    """A fake engine that takes 2 s per completion (polling its stop callback every 5 ms)."""
    yield
    await lsp_client.shutdown_session()
