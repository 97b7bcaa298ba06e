"""editkv's Triton kernels, each beside a pure-torch reference (`*_ref`).

Note: Hugging Face publishes an unrelated PyPI package also named `kernels`, which
transformers probes for. transformers only treats it as present when the installed
distribution providing `kernels` reports a version inside its supported range; editkv's
distribution is `editkv` (0.x), so the probe answers False (tests/test_kernels_name.py).
"""
