"""Other completion backends the benchmarks compare editkv with (built and driven by bench/ only)."""
