"""editkv: a code-completion backend that keeps each open file's KV cache alive across edits.

The one import root of the distribution. The repository keeps the project's layout
(`kernels/`, `engine/`, `edit_cache/`, `lsp_server/` at the top level); packaging maps each
folder under this package, so they import as `editkv.kernels`, `editkv.engine`,
`editkv.edit_cache` and `editkv.lsp_server`, and nothing of editkv is importable under a
bare generic name (Hugging Face's `kernels`, which transformers imports, stays theirs).
Imports point one way: lsp_server -> edit_cache -> engine -> kernels.
"""
