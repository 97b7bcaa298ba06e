#!/usr/bin/env bash
# Phase 2 extras (quality only, side by side with the rest): Qwen's calibrations and AdaDec.
G=$1; D=.gpu/data; R=/root/results
export PYTHONPATH=/tmp/site:/tmp/pkgs PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/root/xdg
# reference code that is not in the evaluation data: Python's standard library
CAL=$(python3 -c "import os, json; print(os.path.dirname(os.path.dirname(json.__file__)))")
timeout 600 python3 -m editkv.lsp_server.cli calibrate --model $G --device cuda --data $CAL > $R/calibrate_adadec.txt 2>&1
[ "${VIEW:-0}" = 1 ] && timeout 600 python3 -m editkv.lsp_server.cli calibrate --view --model $G --device cuda --data $CAL > $R/calibrate_view.txt 2>&1
# AdaDec in three shards, each keeping a partial --json after every target (merge: bench/adadec.py realedits --merge);
# measured in session 13 (BENCHMARKS.md): ADADEC=1 runs it again
[ "${ADADEC:-0}" = 1 ] && for i in 0 1 2; do
  timeout 900 python3 bench/adadec.py realedits --device cuda --model $G --data $D/dev150.jsonl.gz --subset 150 \
    --views fim,l2r --shard $i/3 --progress --json $R/adadec_$i.json > $R/adadec_$i.txt 2>&1 &
done
wait
