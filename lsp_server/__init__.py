"""editkv's language server: `editkv lsp` and the rest of the command line."""

from importlib.metadata import PackageNotFoundError, version


def server_version() -> str:
    """editkv's installed version (what `initialize` and `--version` report)."""
    try:
        return version("editkv")
    except PackageNotFoundError:
        return "0+unknown"
