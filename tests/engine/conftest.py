"""Models the engine tests share: a tiny random Llama checkpoint and the embedded default model
(one of each per test module, as module-scoped fixtures)."""

import pytest
from editkv.engine.loading import DEFAULT_MODEL_DIR, load_model
from helpers import make_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_checkpoint(tmp_path_factory.mktemp("m"), "llama"))


@pytest.fixture(scope="module")
def default():
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("no default model")
    return load_model(None)
