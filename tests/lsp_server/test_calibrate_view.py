"""`editkv calibrate --view`: masked lines of the user's files measure l2r against FIM, the better view
is stored beside the AdaDec threshold, and `view: auto` serves it (reporting why)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from editkv.edit_cache.positions import to_position
from editkv.engine.calibrate import (
    ViewCalibration,
    ViewScore,
    auto_view,
    choose_view,
    eligible_lines,
    fingerprint,
    load_view_calibration,
    view_calibration_path,
)
from editkv.engine.errors import EngineError
from editkv.engine.loading import DEFAULT_MODEL_DIR, load_model
from editkv.lsp_server.backend import CompletionRequest, ModelBackend
from editkv.lsp_server.calibrate_view import masked_lines, measure_views
from helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "editkv"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture
def workspace(tmp_path):
    """A few Python files, as a user's workspace would have."""
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("geometry.py", "inventory.py", "textutil.py"):
        src = ROOT / "lsp_server" / "examples" / "inventory.py" if name == "inventory.py" else None
        if src is not None and src.is_file():
            (ws / name).write_text(src.read_text())
        else:
            body = "".join(f"def {name[:-3]}_{i}(value, scale={i}):\n    result = value * scale + {i}\n"
                           f"    return round(result, {i % 4})\n\n\n" for i in range(12))
            (ws / name).write_text("import math\n\n\n" + body)
    return ws


def _score(em, es, n=10):
    return ViewScore(em, es, n)


def test_choose_view_prefers_exact_matches_then_similarity_then_fim():
    assert choose_view({"l2r": _score(20, 40), "fim": _score(10, 60)}) == "l2r"
    assert choose_view({"l2r": _score(10, 40), "fim": _score(10, 45)}) == "fim"
    assert choose_view({"l2r": _score(10, 50), "fim": _score(10, 45)}) == "l2r"
    assert choose_view({"l2r": _score(10, 45), "fim": _score(10, 45)}) == "fim"


def test_view_calibration_round_trip_and_unreadable_file(tiny_ckpt, user_cache):
    assert load_view_calibration(tiny_ckpt) is None
    cal = ViewCalibration("l2r", {"l2r": _score(30.0, 55.5), "fim": _score(20.0, 50.0)}, model=str(tiny_ckpt),
                          created="2026-01-01 00:00:00")
    path = cal.save(view_calibration_path(tiny_ckpt))
    assert path == user_cache / "view" / f"{fingerprint(tiny_ckpt)}.json"
    assert load_view_calibration(tiny_ckpt) == cal
    assert "10 masked lines" in cal.reason() and "l2r EM 30.0%" in cal.reason()
    path.write_text('{"format": "something else"}')
    with pytest.raises(EngineError, match="calibrate --view"):
        load_view_calibration(tiny_ckpt)


def test_masked_lines_delete_eligible_text_and_are_seeded(workspace):
    files = sorted(workspace.glob("*.py"))
    a = masked_lines(files, max_files=3, lines_per_file=3, seed=1, max_chars=50_000)
    assert a == masked_lines(files, max_files=3, lines_per_file=3, seed=1, max_chars=50_000)
    assert len(a) == 9 and len({path for path, *_ in a}) == 3
    for path, text, cursor, expected in a:
        original = path.read_text()
        assert text[:cursor] + expected + text[cursor:] == original
        assert len(expected) >= 6 and not expected.startswith("#") and "\n" not in expected
        assert (text[:cursor].rsplit("\n", 1)[-1]).strip() == ""  # the cursor is after the indentation
    assert masked_lines(files, max_files=3, lines_per_file=3, seed=2, max_chars=50_000) != a
    assert eligible_lines("x = 1\n    # a comment here\n    value = 10\n") == [(27, 31, 41)]


def test_auto_view_without_calibration_is_the_models_own_and_says_why(tiny_ckpt, tmp_path):
    loaded = load_model(tiny_ckpt)
    assert auto_view(loaded) == ("fim", "the model has FIM tokens; `editkv calibrate --view` measures which "
                                        "view is better")
    folder = tmp_path / "with_json"
    folder.mkdir()
    for f in tiny_ckpt.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "editkv.json").write_text(json.dumps({"preferred_view": "l2r"}))
    assert auto_view(load_model(folder)) == ("l2r", "preferred_view in the model's editkv.json; `editkv calibrate "
                                                    "--view` measures which view is better")


def test_calibrate_view_end_to_end_on_a_tiny_model(tiny_ckpt, workspace, user_cache, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(user_cache.parent)}
    proc = subprocess.run([sys.executable, "-m", "editkv.lsp_server.cli", "calibrate", "--view", "--model",
                           str(tiny_ckpt), "--data", str(workspace), "--view-files", "2", "--view-lines", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    stored = load_view_calibration(tiny_ckpt)
    assert stored is not None and stored.view in ("l2r", "fim")
    assert f"view = {stored.view}" in proc.stdout and str(view_calibration_path(tiny_ckpt)) in proc.stdout
    assert {v: s.n for v, s in stored.scores.items()} == {"l2r": 4, "fim": 4}
    assert stored.data["files"] == 2 and stored.fingerprint == fingerprint(tiny_ckpt)
    assert stored.view == choose_view(stored.scores)
    # the server serves the stored view for `view: auto`, whichever it is, and says why
    source = (workspace / "geometry.py").read_text()
    pos = to_position(source, source.index("    result") + 4)
    for view in ("l2r", "fim"):
        ViewCalibration(view, stored.scores, created=stored.created).save(view_calibration_path(tiny_ckpt))
        backend = ModelBackend(load_model(tiny_ckpt))
        assert backend.view_choice["auto"] == view and backend.view_choice["why"].startswith("calibrated on 4")
        backend.open("file:///g.py", source)
        stats = backend.complete(CompletionRequest("file:///g.py", pos.line, pos.character, max_tokens=4)).stats
        assert stats["view"] == view and stats["view_why"].startswith("auto: calibrated on 4 masked lines")
        stats = backend.complete(CompletionRequest("file:///g.py", pos.line, pos.character, max_tokens=4,
                                                   view="fim")).stats
        assert stats["view"] == "fim" and stats["view_why"] == "the view setting"
        # `editkv complete --mode auto` follows the calibration too
        (tmp_path / "g.py").write_text(source)
        proc = subprocess.run([sys.executable, "-m", "editkv.lsp_server.cli", "complete", str(tmp_path / "g.py"),
                               "--line", str(pos.line + 1), "--col", str(pos.character + 1), "--model",
                               str(tiny_ckpt), "--max-tokens", "2", "--json"],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["mode"] == view


def test_calibrate_view_refuses_a_model_without_fim_tokens(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama")
    text = (ckpt / "tokenizer.json").read_text().replace("<|fim_", "<|xim_")  # no FIM markers any more
    (ckpt / "tokenizer.json").write_text(text)
    assert load_model(ckpt).tokenizer.fim is None
    from editkv.lsp_server.calibrate_view import run

    (tmp_path / "a.py").write_text("def f(value):\n    return value + 1\n" * 40)
    with pytest.raises(EngineError, match="no FIM tokens"):
        run(str(ckpt), [tmp_path / "a.py"])


def test_calibrate_view_on_the_default_model(workspace, user_cache):
    """A small real run: the embedded model, a few files of a workspace, both views through the server's path."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("no default model")
    loaded = load_model(None)
    samples = masked_lines(sorted(workspace.glob("*.py")), max_files=3, lines_per_file=2, seed=0, max_chars=20_000)
    scores = measure_views(loaded, samples, max_tokens=24)
    assert set(scores) == {"l2r", "fim"} and all(s.n == 6 for s in scores.values())
    assert all(0 <= s.em <= 100 and 0 <= s.es <= 100 for s in scores.values())
    # the files repeat a pattern: a trained code model completes some lines exactly in at least one view
    assert max(s.es for s in scores.values()) > 50
    # a stored choice wins over the model's editkv.json (which says l2r)
    view, why = auto_view(loaded)
    assert view == "l2r" and why.startswith("preferred_view in the model's editkv.json")
    ViewCalibration("fim", scores, created="now").save(view_calibration_path(None))
    assert auto_view(loaded)[0] == "fim" and ModelBackend(loaded).view_choice["auto"] == "fim"
