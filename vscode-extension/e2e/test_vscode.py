"""The extension in a real VS Code, against the real `editkv lsp` on the embedded model (CPU).

code-server 4.139.1 (Code 1.139.1) serves the editor; Debian's Chromium, driven headless by
Playwright, is the window. setup.sh installs both (and Node 24 for code-server) into a cache
folder; this module builds the .vsix with the extension's own `npm run package`, installs it
into a fresh code-server profile, opens a workspace of Python files and does what a user does:
type, look at the ghost text, Tab, Alt+], Ctrl+Space, the status bar item.

What the editor shows is read from the DOM; what editkv answered is read from the extension's
log (the editkv output channel at Trace level with `editkv.trace.server: verbose`, which logs
each JSON-RPC result), so a ghost text or dropdown row is checked against editkv's own items;
what the server counted is read from `editkv: Show Statistics` (the `editkv/stats` answer).

Screenshots go to $EDITKV_E2E_ARTIFACTS, else vscode-extension/e2e/artifacts/ (ignored by git).
Skipped, with the reason, only when setup.sh cannot install what it needs, Playwright for
Python is missing, or there is no editkv server at $EDITKV_COMMAND / .venv/bin/editkv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (pip install -e '.[test]')")

EXTENSION = Path(__file__).resolve().parents[1]
ROOT = EXTENSION.parent
ARTIFACTS = Path(os.environ.get("EDITKV_E2E_ARTIFACTS") or EXTENSION / "e2e" / "artifacts")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SERVER_READY_S = 180  # code-server start, the extension's activation, the model load (CPU)
ANSWER_S = 60  # one completion on the CPU, with the worker busy with earlier requests
SOURCE = (
    "import os\n"
    "\n"
    "\n"
    "def read_lines(path):\n"
    "    with open(path) as f:\n"
    "        return f.readlines()\n"
    "\n"
    "\n"
    "def main(path):\n"
)


def _editkv_command() -> str | None:
    named = os.environ.get("EDITKV_COMMAND")
    if named:
        return named
    default = ROOT / ".venv" / "bin" / "editkv"
    return str(default) if default.exists() else None


@dataclass
class Tools:
    node: Path
    code_server: Path


@pytest.fixture(scope="module")
def tools() -> Tools:
    """Chromium, Node 24 and code-server, installed (or found in the cache) by setup.sh."""
    proc = subprocess.run(["bash", str(EXTENSION / "e2e" / "setup.sh")], capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.skip(f"the VS Code end-to-end setup could not be installed: {proc.stderr.strip()[-2000:]}")
    found = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    return Tools(node=Path(found["node"]), code_server=Path(found["code-server"]))


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A private temporary folder (pytest's basetemp keeps only the last three runs of anyone's
    pytest on the machine, and a concurrent run may delete ours under code-server)."""
    path = Path(tempfile.mkdtemp(prefix="editkv-e2e-"))
    yield path
    if not os.environ.get("EDITKV_E2E_KEEP"):  # set it to look at the profile and logs afterwards
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def vsix(scratch: Path) -> Path:
    """The extension packaged by its own `npm run package` (esbuild, then vsce, offline)."""
    if shutil.which("npm") is None:
        pytest.skip("npm not found: the extension can't be built")
    if not (EXTENSION / "node_modules").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=EXTENSION, check=True,
                       stdin=subprocess.DEVNULL)
    out = scratch / "editkv.vsix"
    subprocess.run(["npm", "run", "-s", "package", "--", "--out", str(out)], cwd=EXTENSION, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return out


@dataclass
class Session:
    """A code-server with the extension installed, its profile and workspace."""

    url: str
    root: Path
    workspace: Path
    process: subprocess.Popen

    def log_file(self) -> Path:
        """The editkv output channel as VS Code writes it to disk."""
        found = sorted(self.root.glob("data/logs/*/exthost*/editkv.editkv/editkv.log"))
        assert found, f"no editkv log under {self.root / 'data' / 'logs'}"
        return found[-1]

    def log(self) -> str:
        return self.log_file().read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def session(tools: Tools, vsix: Path, scratch: Path) -> Iterator[Session]:
    command = _editkv_command()
    if command is None:
        pytest.skip(f"no editkv server at {ROOT / '.venv/bin/editkv'}: set EDITKV_COMMAND or run bash scripts/test.sh")
    root = scratch / "code-server"
    workspace = root / "workspace"
    workspace.mkdir(parents=True)
    for name in ("ghost.py", "cycle.py", "dropdown.py", "off.py"):
        (workspace / name).write_text(SOURCE)
    user = root / "data" / "User"
    user.mkdir(parents=True)
    (user / "settings.json").write_text(json.dumps({
        "security.workspace.trust.enabled": False,  # else Restricted Mode, where the extension doesn't run
        "workbench.startupEditor": "none",
        "workbench.secondarySideBar.defaultVisibility": "hidden",
        "chat.disableAIFeatures": True,
        "extensions.autoCheckUpdates": False,
        "files.autoSave": "off",
        "workbench.editor.enablePreview": False,  # a dirty preview editor asks to be saved when replaced
        "editkv.server.command": command,
        "editkv.trace.server": "verbose",
        "editkv.statsFile": False,
    }, indent=1))
    env = {**os.environ, "PATH": f"{tools.node.parent}{os.pathsep}{os.environ['PATH']}",
           "XDG_CONFIG_HOME": str(root / "config"), "XDG_DATA_HOME": str(root / "share"),
           "XDG_CACHE_HOME": str(root / "cache")}
    profile = ["--user-data-dir", str(root / "data"), "--extensions-dir", str(root / "extensions")]
    subprocess.run([str(tools.code_server), *profile, "--install-extension", str(vsix)], env=env, check=True,
                   capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    port = _free_port()
    server_log = open(root / "code-server.log", "w")  # noqa: SIM115 (closed at teardown)
    process = subprocess.Popen(
        [str(tools.code_server), "--bind-addr", f"127.0.0.1:{port}", "--auth", "none", "--disable-telemetry",
         "--disable-update-check", "--disable-workspace-trust", *profile, str(workspace)],
        env=env, stdout=server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)  # its own process group: teardown ends code-server and all it started
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "healthz", timeout=5).read()
                break
            except OSError:
                assert process.poll() is None, (root / "code-server.log").read_text()
                assert time.monotonic() < deadline, "code-server did not answer within 60 s"
                time.sleep(0.5)
        yield Session(url, root, workspace, process)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
        server_log.close()
        if ARTIFACTS.is_dir():
            shutil.copy(root / "code-server.log", ARTIFACTS / "code-server.log")
            try:
                shutil.copy(session_log_path(root), ARTIFACTS / "editkv.log")
            except FileNotFoundError:
                pass


def session_log_path(root: Path) -> Path:
    found = sorted(root.glob("data/logs/*/exthost*/editkv.editkv/editkv.log"))
    if not found:
        raise FileNotFoundError("no editkv log")
    return found[-1]


@pytest.fixture(scope="module")
def page(session: Session) -> Iterator[sync_api.Page]:
    """The workbench in Chromium, the editkv server ready, its channel logging at Trace."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=session.url.rstrip("/"))
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(f"{session.url}?folder={session.workspace}")
        try:
            status_item(page).filter(has_text=re.compile("default_model")).wait_for(timeout=SERVER_READY_S * 1000)
            set_log_level_trace(page)
            yield page
        except Exception:
            page.screenshot(path=ARTIFACTS / "failure.png")
            raise
        finally:
            browser.close()


# ---- reading and driving the workbench ----------------------------------------------------------


def status_item(page: sync_api.Page) -> sync_api.Locator:
    return page.locator(".statusbar-item", has_text=re.compile("editkv|default_model")).first


def run_command(page: sync_api.Page, title: str) -> None:
    """Run a command from the palette by its title, as a user would."""
    box = page.locator(".quick-input-box input")
    for attempt in range(3):
        page.keyboard.press("F1")
        try:
            box.wait_for(state="visible", timeout=5000)
            break
        except sync_api.TimeoutError:
            if attempt == 2:
                raise
            page.locator(".monaco-editor .view-lines").first.click()  # the focus was somewhere F1 is not bound
    box.fill(f">{title}")
    _row(page, title).click()


def pick(page: sync_api.Page, label: str) -> None:
    """Choose `label` in the open quick pick."""
    box = page.locator(".quick-input-box input")
    box.fill(label)
    _row(page, label).click()


def _row(page: sync_api.Page, label: str) -> sync_api.Locator:
    """The quick pick's row labelled exactly `label` (the first row may be another, recently used)."""
    name = page.locator(".label-name", has_text=re.compile(rf"^\W*{re.escape(label)}$"))
    return page.locator(".quick-input-list .monaco-list-row").filter(has=name).first


def set_log_level_trace(page: sync_api.Page) -> None:
    """The editkv channel at Trace: vscode-languageclient logs the JSON-RPC traffic only then."""
    run_command(page, "Developer: Set Log Level...")
    pick(page, "editkv")
    pick(page, "Trace")


def open_file(page: sync_api.Page, name: str) -> None:
    run_command(page, "Go to File...")
    pick(page, name)
    page.locator(".tab.active", has_text=name).wait_for()
    page.locator(".monaco-editor .view-lines").first.click()


def ghost_text(page: sync_api.Page) -> str:
    """The ghost text on screen ('' when none): its first line and any lines below it.

    Beside an open dropdown, the part the selected item would insert is `-decoration` and the
    rest `-decoration-preview`."""
    return page.evaluate("""() => {
        const first = [...document.querySelectorAll(
            '.monaco-editor .ghost-text-decoration, .monaco-editor .ghost-text-decoration-preview')]
            .map((e) => e.textContent).join('');
        const more = [...document.querySelectorAll('.monaco-editor .ghost-text .view-line')]
            .map((e) => e.textContent);
        return [first, ...more].join('\\n').replace(/\\u00a0/g, ' ');
    }""")


def wait_for(what: str, probe: Callable[[], object], timeout_s: float = ANSWER_S) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@dataclass
class Served:
    """One item editkv sent, as the trace logged it."""

    id: str
    text: str
    line: int
    character: int


def served_items(log: str, method: str = "textDocument/inlineCompletion") -> list[list[Served]]:
    """The items of every answer to `method` in the trace, in order (an empty list for null)."""
    answers = []
    pattern = rf"Received response '{re.escape(method)} - \(\d+\)' in \d+ms\.\nResult: (.*?)\n(?=\d{{4}}-\d\d-\d\d |\Z)"
    for match in re.finditer(pattern, log, re.S):
        data = json.loads(match.group(1))
        items = data if isinstance(data, list) else (data or {}).get("items", [])
        answers.append([_served(item) for item in items])
    return answers


def _served(item: dict) -> Served:
    edit = item.get("textEdit")
    text = edit["newText"] if edit else item["insertText"]
    text = text if isinstance(text, str) else text["value"]
    start = (edit or item)["range"]["start"] if (edit or item).get("range") else {"line": -1, "character": -1}
    return Served(item["command"]["arguments"][0], text, start["line"], start["character"])


def requests_sent(log: str, method: str) -> int:
    return log.count(f"Sending request '{method} - (")


def read_stats(page: sync_api.Page) -> dict:
    """The server's `editkv/stats` answer, as `editkv: Show Statistics` shows it."""
    run_command(page, "editkv: Show Statistics")
    page.locator(".tab.active", has_text="statistics.json").wait_for()
    page.locator(".monaco-editor .view-lines").first.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Control+C")
    text = page.evaluate("navigator.clipboard.readText()")
    run_command(page, "View: Close Editor")
    return json.loads(text)


def events_since(before: dict, after: dict) -> list[tuple[str, str]]:
    """(id, event) of the suggestion events counted between two stats answers."""
    seen = {(e["id"], e["event"], e["at"]) for e in before["recent_events"]}
    return [(e["id"], e["event"]) for e in after["recent_events"] if (e["id"], e["event"], e["at"]) not in seen]


def save_and_read(page: sync_api.Page, session: Session, name: str) -> str:
    page.keyboard.press("Control+S")
    page.locator(".tab.active.dirty", has_text=name).wait_for(state="detached")
    return (session.workspace / name).read_text()


# ---- the tests: each works in its own file of the workspace, in one VS Code session ---------------


@pytest.fixture(autouse=True)
def no_widgets(page: sync_api.Page) -> None:
    """Each test starts without a dropdown, ghost text or quick pick left by the one before."""
    for _ in range(3):
        page.keyboard.press("Escape")


def test_status_bar_shows_model_and_device(page):
    text = status_item(page).inner_text()
    assert re.search(r"default_model · cpu", text), text


def test_ghost_text_comes_from_editkv_and_tab_accepts_it(page, session):
    before = read_stats(page)
    open_file(page, "ghost.py")
    page.keyboard.press("Control+End")
    typed = "    lines = "  # ends in a space: no word for VS Code's own dropdown to complete
    page.keyboard.type(typed, delay=50)
    ghost = wait_for("ghost text", lambda: ghost_text(page))
    page.screenshot(path=ARTIFACTS / "ghost-text.png")
    page.screenshot(path=ARTIFACTS / "ghost-text-small.png", clip={"x": 352, "y": 36, "width": 640, "height": 260})
    page.keyboard.press("Tab")
    text = save_and_read(page, session, "ghost.py")
    after = read_stats(page)

    served = {item.id: item for answer in served_items(session.log()) for item in answer}
    events = events_since(before, after)
    accepted = [sid for sid, event in events if event == "accepted"]
    assert after["suggestions"]["accepted"] == before["suggestions"]["accepted"] + 1
    assert len(accepted) == 1 and accepted[0] in served, (events, served)
    item = served[accepted[0]]
    assert (accepted[0], "shown") in events  # counted as shown, then accepted
    assert item.line == SOURCE.count("\n") and item.character <= len(typed)
    # the ghost text was the rest of editkv's item, and Tab put exactly that item in the file
    assert ghost == item.text[len(typed) - item.character:], (ghost, item)
    assert text == SOURCE + typed[: item.character] + item.text
    # the statistics document is the extension's own, not a file the server is sent
    assert not re.search(r'"uri": "(untitled|editkv):', session.log())


def test_alt_bracket_cycles_to_another_editkv_suggestion(page, session):
    before = read_stats(page)
    open_file(page, "cycle.py")
    page.keyboard.press("Control+End")
    typed = "    for line in "
    page.keyboard.type(typed, delay=50)
    wait_for("ghost text", lambda: ghost_text(page))
    answered = len(served_items(session.log()))
    page.keyboard.press("Alt+Backslash")  # ask explicitly: several suggestions
    answer = wait_for("an answer with several suggestions", lambda: next(
        (a for a in served_items(session.log())[answered:] if len({i.text for i in a}) >= 2), None))
    first = wait_for("ghost text", lambda: ghost_text(page))
    page.keyboard.press("Alt+]")
    second = wait_for("another ghost text", lambda: (g := ghost_text(page)) != first and g)
    page.screenshot(path=ARTIFACTS / "ghost-text-cycled.png")
    page.keyboard.press("Tab")
    text = save_and_read(page, session, "cycle.py")
    after = read_stats(page)

    rest = {item.text[len(typed) - item.character:]: item for item in answer}
    everything = {item.text[len(typed) - item.character:] for a in served_items(session.log()) for item in a
                  if item.line == SOURCE.count("\n")}
    # the first ghost text may still be the answer to typing, shown until the explicit one arrives
    assert first in everything and second in rest and first != second, (first, second, answer)
    assert text == SOURCE + typed[: rest[second].character] + rest[second].text
    events = events_since(before, after)
    # the cycled-to item: shown when accepted (VS Code does not say when it was displayed)
    assert (rest[second].id, "shown") in events and (rest[second].id, "accepted") in events, events
    assert after["suggestions"]["accepted"] == before["suggestions"]["accepted"] + 1


def test_dropdown_lists_editkv_items(page, session):
    before = read_stats(page)
    open_file(page, "dropdown.py")
    page.keyboard.press("Control+End")
    typed = "    return read"
    page.keyboard.type(typed, delay=50)
    page.keyboard.press("Escape")
    answered = len(served_items(session.log(), "textDocument/completion"))
    page.keyboard.press("Control+Space")
    rows = page.locator(".suggest-widget .monaco-list-row", has_text="editkv")
    rows.first.wait_for(timeout=ANSWER_S * 1000)
    page.screenshot(path=ARTIFACTS / "dropdown.png")
    labels = [label.replace("\u00a0", " ") for label in rows.locator(".label-name").all_inner_texts()]
    answer = served_items(session.log(), "textDocument/completion")[answered]
    assert labels and all(any(item.text.startswith(label.rstrip("…")) for item in answer) for label in labels), \
        (labels, answer)
    rows.first.click()
    text = save_and_read(page, session, "dropdown.py")
    after = read_stats(page)

    chosen = next(item for item in answer if item.text.startswith(labels[0].rstrip("…")))
    assert text.startswith(SOURCE + typed[: chosen.character] + chosen.text), (text, chosen)
    # VS Code ran the item's command: the server counted the acceptance
    assert (chosen.id, "accepted") in events_since(before, after)
    assert after["suggestions"]["by_kind"]["completion"]["accepted"] == \
        before["suggestions"]["by_kind"].get("completion", {}).get("accepted", 0) + 1


def test_status_item_turns_suggestions_off(page, session):
    open_file(page, "off.py")
    status_item(page).click()
    pick(page, "Turn suggestions off")
    status_item(page).filter(has_text="editkv off").wait_for()
    asked = requests_sent(session.log(), "textDocument/inlineCompletion")
    page.keyboard.press("Control+End")
    page.keyboard.type("    lines = read_", delay=50)
    page.keyboard.press("Alt+Backslash")
    time.sleep(3)  # no request should start; give one the time it would need to leave
    assert requests_sent(session.log(), "textDocument/inlineCompletion") == asked
    assert ghost_text(page) == ""
    settings = json.loads((session.root / "data" / "User" / "settings.json").read_text())
    assert settings["editkv.enable"] is False
