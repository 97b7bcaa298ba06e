"""Cross-file context in the server (lsp_server/context.py): which open documents are shown,
in what order, and the block through the real model path (ModelBackend on the default model,
and `editkv lsp` on a tiny one)."""

import asyncio
from types import SimpleNamespace

import pytest
import pytest_lsp
from editkv.edit_cache.positions import Position, Range, to_position
from editkv.engine.loading import load_model
from editkv.lsp_server.backend import CompletionRequest, ModelBackend
from editkv.lsp_server.context import context_sources, imported_modules, module_parts, relative_paths
from editkv.lsp_server.settings import CrossFileOptions, Settings, parse_settings
from editkv.lsp_server.worker import cache_options
from lsp_testing import SERVER_ENV, lsp_command
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities
from test_protocol import inline, open_doc, server_stats, wait_loaded

UTIL = '''"""Vector helpers."""


def scale_vector(v, k):
    """Every component times k."""
    return [k * x for x in v]


def add_vectors(a, b):
    return [x + y for x, y in zip(a, b)]
'''
OTHER = "NAMES = ['a', 'b']\n\n\ndef shout(s):\n    return s.upper() + '!'\n"
MAIN = "from geometry.util import scale_vector\n\n\ndef double(v):\n    return "


def test_imported_modules_are_read_from_import_statements():
    text = ("import os, json\nimport pkg.util as u\nfrom .helpers import x\nfrom . import y\n"
            "    from a.b.c import (d,\n        e)\nx = 'import nothing'\n")
    assert imported_modules(text) == [("os",), ("json",), ("pkg", "util"), ("helpers",), ("helpers", "x"), ("y",),
                                      ("a", "b", "c"), ("a", "b", "c", "d")]


def test_module_parts_of_uris():
    assert module_parts("file:///w/pkg/mod.py")[-2:] == ("pkg", "mod")
    assert module_parts("file:///w/pkg/__init__.py")[-2:] == ("w", "pkg")
    assert module_parts("file:///w/my%20dir/a.py")[-2:] == ("my dir", "a")


def test_sources_imported_first_then_most_recent_and_only_encoded_ones_shown():
    def doc(encoded=True):
        return SimpleNamespace(cache=object() if encoded else None, num_unencoded=0, ids=[1, 2])

    docs = {"file:///w/geometry/util.py": doc(), "file:///w/old.py": doc(), "file:///w/new.py": doc(),
            "file:///w/cold.py": doc(encoded=False), "file:///w/main.py": doc()}
    ready, waiting = context_sources("file:///w/main.py", MAIN, docs, max_files=3)
    assert [u for u, _ in ready] == ["file:///w/geometry/util.py", "file:///w/new.py"]  # imported, then recent
    assert waiting == ["file:///w/cold.py"]  # picked, but no keys yet: the background encodes it
    # `from geometry import util`: util may be a submodule
    ready, _ = context_sources("file:///w/main.py", "from geometry import util\n", docs, max_files=1)
    assert [u for u, _ in ready] == ["file:///w/geometry/util.py"]
    ready, waiting = context_sources("file:///w/main.py", MAIN, docs, max_files=1)
    assert [u for u, _ in ready] == ["file:///w/geometry/util.py"] and waiting == []


def test_paths_relative_to_the_shared_folder():
    repo, paths = relative_paths("file:///w/proj/app/main.py", ["file:///w/proj/geometry/util.py"])
    assert repo == "proj" and paths == ["app/main.py", "geometry/util.py"]


def test_settings_range_checked():
    settings, problems = parse_settings({"editkv": {"crossFile": True, "crossFileBudget": 99999,
                                                    "crossFileRecompute": 15}})
    assert settings.cross_file is True and settings.cross_file_budget == Settings().cross_file_budget
    assert problems and "crossFileBudget" in problems[0]
    assert CrossFileOptions.from_settings(settings) == CrossFileOptions(True, 1024, 15)


@pytest.fixture(scope="module")
def trained():
    return load_model(None)


def _request(uri, text, **kw):
    pos = to_position(text, len(text))
    return CompletionRequest(uri, pos.line, pos.character, max_tokens=8, **kw)


def test_other_documents_reach_the_view_through_the_backend(trained):
    """Off: no block. On: an imported document without keys is encoded in the background, then
    its cache is shown before the file's; the block is kept while typing and rebuilt when the
    other file changes."""
    backend = ModelBackend(trained, **cache_options(Settings(cross_file=True)))
    main, util, other = "file:///w/app/main.py", "file:///w/geometry/util.py", "file:///w/app/other.py"
    backend.open(util, UTIL)
    backend.open(other, OTHER)
    backend.open(main, MAIN)
    first = backend.complete(_request(main, MAIN))
    assert first.stats["context_files"] == 0 and first.stats["context_waiting"] == 2  # no keys yet
    while backend.refresh_idle():  # what the worker does when the editor is idle
        pass
    on = backend.complete(_request(main, MAIN))
    assert on.stats["context_files"] == 2 and on.stats["context_built"] is True
    assert on.stats["context_reused_tokens"] > 0 and on.stats["context_tokens"] > on.stats["context_reused_tokens"]
    # recompute 15%: the selected reused tokens and the format's wrapper tokens are encoded
    assert 0 < on.stats["context_recomputed_tokens"] < on.stats["context_tokens"]
    # the block's encoded tokens count as this request's
    assert on.stats["encoded_tokens"] >= on.stats["context_recomputed_tokens"] + on.stats["view_encoded_tokens"]
    again = backend.complete(_request(main, MAIN))
    assert again.stats["context_built"] is False and again.stats["context_recomputed_tokens"] == 0
    assert again.stats["context_tokens"] == on.stats["context_tokens"]

    # typing in main.py keeps the block; an edit of util.py rebuilds it
    end = to_position(MAIN, len(MAIN))
    backend.change(main, [(Range(end, end), "s")])
    typed = backend.complete(_request(main, MAIN + "s"))
    assert typed.stats["context_built"] is False
    at = Position(0, 0)
    backend.change(util, [(Range(at, at), "# edited\n")])
    edited = backend.complete(_request(main, MAIN + "s"))
    assert edited.stats["context_built"] is True and edited.stats["context_tokens"] > on.stats["context_tokens"]

    backend.configure(**cache_options(Settings(cross_file=False)))
    off = backend.complete(_request(main, MAIN + "s"))
    assert "context_files" not in off.stats and not backend.context.blocks
    backend.close(main)


def test_context_blocks_count_against_the_kv_budget(trained):
    """A block's KV is part of the budget: building one with the documents just under the budget
    evicts the least recently used document's cache (never the one being served)."""
    backend = ModelBackend(trained, **cache_options(Settings(cross_file=True)))
    main, util, other = "file:///w/app/main.py", "file:///w/geometry/util.py", "file:///w/app/other.py"
    backend.open(util, UTIL)
    backend.open(other, OTHER)
    backend.open(main, MAIN)
    backend.complete(_request(main, MAIN))
    while backend.refresh_idle():
        pass
    docs = backend.cache.docs
    documents = sum(d.kv_bytes() for d in docs.values())
    assert backend.context.kv_bytes() == 0 and backend.cache.total_kv_bytes() == documents
    backend.cache.budget_bytes = documents  # every document fits, nothing more
    served = backend.complete(_request(main, MAIN))
    assert served.stats["context_built"] is True
    block = backend.context.blocks[main][1]
    assert backend.context.kv_bytes() == block.cache.nbytes() > 0
    assert backend.cache.evictions >= 1 and docs[main].kv_bytes() > 0
    assert backend.cache.total_kv_bytes() <= backend.cache.budget_bytes
    assert backend.cache.total_kv_bytes() == sum(d.kv_bytes() for d in docs.values()) + block.cache.nbytes()


def test_context_changes_what_the_model_reads(trained):
    """The block holds the other file's tokens in the model's format, before the document's head,
    and the view over it gives another first-token distribution than the document alone."""
    import torch
    from editkv.edit_cache.views import left_to_right

    backend = ModelBackend(trained, **cache_options(Settings(cross_file=True, cross_file_recompute=100)))
    main, util = "file:///w/app/main.py", "file:///w/geometry/util.py"
    backend.open(util, UTIL)
    backend.open(main, MAIN)
    doc_util, _ = backend.cache.prepare(util)
    doc, _ = backend.cache.prepare(main)
    block, stats = backend.context.block_for(main, doc, backend.cache.docs, backend.cross_file)
    assert stats["context_recomputed_tokens"] == block.length  # 100%: the whole block re-encoded
    ids = block.ids
    assert any(ids[i:i + len(doc_util.ids)] == doc_util.ids for i in range(len(ids)))  # util.py, whole
    assert ids[block.length - block.head:] == doc.head
    assert "geometry/util.py" in trained.tokenizer.decode(ids)
    with_block = left_to_right(doc, len(MAIN), max_new_tokens=4, block=block)
    alone = left_to_right(doc, len(MAIN), max_new_tokens=4)
    assert not torch.allclose(with_block.first_logits, alone.first_logits, atol=1e-3)


def test_imported_files_are_read_from_the_workspace_once(trained, tmp_path):
    """An imported module no open document holds: read from the workspace folder into a document
    of its own (encoded in the background, then shown); found at the root or under src/, a
    package's __init__.py too; too large or undecodable files are not read."""
    from editkv.lsp_server import context as ctx

    (tmp_path / "src" / "geometry").mkdir(parents=True)
    (tmp_path / "src" / "geometry" / "util.py").write_text(UTIL)
    (tmp_path / "shapes").mkdir()
    (tmp_path / "shapes" / "__init__.py").write_text("SIDES = {'square': 4}\n")
    (tmp_path / "big.py").write_text("x = 1\n" * (ctx.MAX_FILE_BYTES // 6 + 1))
    (tmp_path / "blob.py").write_bytes(b"\xff\xfe\x00binary")
    text = "import big, blob\nfrom shapes import SIDES\n" + MAIN
    main = (tmp_path / "app" / "main.py").as_uri()
    backend = ModelBackend(trained, **cache_options(Settings(cross_file=True)))
    backend.open(main, text)
    first = backend.complete(_request(main, text, roots=(str(tmp_path),)))
    util, shapes = (tmp_path / "src/geometry/util.py").as_uri(), (tmp_path / "shapes/__init__.py").as_uri()
    assert set(backend.context.from_disk) == {util, shapes} and backend.cache.get(util).text == UTIL
    assert first.stats["context_waiting"] == 2
    while backend.refresh_idle():
        pass
    second = backend.complete(_request(main, text, roots=(str(tmp_path),)))
    assert second.stats["context_files"] == 2 and second.stats["context_built"] is True
    third = backend.complete(_request(main, text, roots=(str(tmp_path),)))
    assert third.stats["context_built"] is False  # nothing read again, nothing rebuilt
    # the client opens the file: its text wins, and it is no longer a workspace copy
    backend.open(util, UTIL + "\n\nZERO = [0, 0]\n")
    assert util not in backend.context.from_disk
    backend.complete(_request(main, text, roots=(str(tmp_path),)))
    assert backend.cache.get(util).text.endswith("ZERO = [0, 0]\n")


def test_a_workspace_file_changed_on_disk_is_read_again_as_an_edit(trained, tmp_path):
    """A file read from the workspace and then changed on disk: the next request that imports it
    reads it again, and its document takes the difference as one edit (the same document, its
    cache repaired by PIE, not reopened); an unchanged file is not read again."""
    import os

    from editkv.lsp_server import context as ctx

    (tmp_path / "geometry").mkdir()
    path = tmp_path / "geometry" / "util.py"
    path.write_text(UTIL)
    main = (tmp_path / "app" / "main.py").as_uri()
    util = path.as_uri()
    backend = ModelBackend(trained, **cache_options(Settings(cross_file=True)))
    backend.open(main, MAIN)
    backend.complete(_request(main, MAIN, roots=(str(tmp_path),)))
    while backend.refresh_idle():
        pass
    doc = backend.cache.get(util)
    assert doc.text == UTIL
    version = doc.version
    backend.complete(_request(main, MAIN, roots=(str(tmp_path),)))
    assert backend.cache.get(util) is doc and doc.version == version  # unchanged: not read again
    changed = UTIL.replace("def ", "def  ", 1) + "\nZERO = [0, 0]\n"
    path.write_text(changed)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a later mtime, whatever the clock
    backend.complete(_request(main, MAIN, roots=(str(tmp_path),)))
    assert backend.cache.get(util) is doc and doc.text == changed and doc.version > version
    assert backend.context.from_disk[util] == (path.stat().st_mtime_ns, path.stat().st_size)
    rng, new = ctx.text_change("abcXYZdef", "abcQdef")
    assert (rng.start.character, rng.end.character, new) == (3, 6, "Q")
    rng, new = ctx.text_change("a\nb😀c\n", "a\nb😀dc\n")
    assert (rng.start.line, rng.start.character, rng.end.character, new) == (1, 2, 2, "d")


def test_workspace_copies_are_bounded(tmp_path, monkeypatch):
    from editkv.lsp_server import context as ctx

    monkeypatch.setattr(ctx, "MAX_DISK_FILES", 2)
    closed = []
    cache = SimpleNamespace(close=closed.append)
    context = ctx.CrossFileContext()
    for name in "abc":
        (tmp_path / f"{name}.py").write_text(f"{name} = 1\n")
    files = context.workspace_files("file:///elsewhere/main.py", "import a, b, c\n", (str(tmp_path),), {})
    assert [u for u, _ in files] == [(tmp_path / f"{n}.py").as_uri() for n in "abc"]
    context.forget_workspace_files(cache)
    assert closed == [(tmp_path / "a.py").as_uri()] and len(context.from_disk) == 2
    # only the first `limit` files the imports name are read
    again = ctx.CrossFileContext().workspace_files("file:///elsewhere/main.py", "import a, b, c\n",
                                                   (str(tmp_path),), {}, limit=2)
    assert [u for u, _ in again] == [(tmp_path / f"{n}.py").as_uri() for n in "ab"]


@pytest_lsp.fixture(config=ClientServerConfig(server_command=lsp_command("--device", "cpu"), server_env=SERVER_ENV))
async def client(lsp_client: LanguageClient):
    yield
    await lsp_client.shutdown_session()


@pytest.mark.asyncio
async def test_cross_file_context_through_the_server(client: LanguageClient, tiny_model, tmp_path):
    """`editkv lsp` with a workspace folder: main.py imports geometry.util, which is open, and
    shapes, which is only on disk; both reach the view once the idle worker has encoded them."""
    (tmp_path / "shapes.py").write_text("SIDES = {'square': 4}\n")
    params = types.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"), root_uri=tmp_path.as_uri(),
        workspace_folders=[types.WorkspaceFolder(uri=tmp_path.as_uri(), name="w")],
        initialization_options={"statsFile": False, "model": str(tiny_model), "debounceMs": 0, "maxTokens": 4,
                                "crossFile": True, "idleRefreshMs": 20})
    await client.initialize_session(params)
    await wait_loaded(client)
    main, text = (tmp_path / "app" / "main.py").as_uri(), "import shapes\n" + MAIN
    open_doc(client, UTIL, (tmp_path / "geometry" / "util.py").as_uri())
    open_doc(client, text, main)
    assert await inline(client, 5, 11, uri=main) is not None
    for _ in range(100):  # the idle worker encodes util.py and shapes.py for the next request
        await asyncio.sleep(0.05)
        assert await inline(client, 5, 11, uri=main) is not None
        last = (await server_stats(client))["backend"]["last_request"]
        if last["context_files"] == 2:
            break
    assert last["context_files"] == 2 and last["context_reused_tokens"] > 0
    assert (await server_stats(client))["settings"]["cross_file"] is True
