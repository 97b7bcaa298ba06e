"""What a completion asks of a backend (lsp_server/backend.py serves it; the warm-up makes its own)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompletionRequest:
    """One completion at a position of an open document."""

    uri: str
    line: int
    character: int
    encoding: str = "utf-16"
    max_tokens: int = 64
    max_lines: int | None = 1  # None: no line limit (multi-line policy "always")
    # several lines end at the first line end after this many ms from the request's start (None: the
    # device's MULTILINE_MS; 0: no time limit)
    multiline_ms: int | None = None
    num_drafts: int = 1
    view: str = "auto"  # "auto" (ModelBackend.view_choice: calibrated, else the model's own), "fim", "l2r"
    suffix: str = "next_line"  # FIM: "next_line" leaves the rest of the cursor's line out
    roots: tuple[str, ...] = ()  # workspace folders: cross-file context reads imported files there
