#!/usr/bin/env bash
# A short GPU check (what's left of a session's device time): the human-pace Qwen replay (default
# against full) and the real-weight latency, the GPU alone. Same setup as session_job.sh (the repo
# at /root/repo, the GGUF staged into /root/stage, then /root/stage/ok); writes under /root/results.
cd /root/repo
export PYTHONPATH=/tmp/site:/tmp/pkgs PYTHONUNBUFFERED=1
R=/root/results; mkdir -p $R
log() { echo "[$(date +%T)] $*" | tee -a $R/progress.log; }
D=.gpu/data
G=/root/stage/qwen2.5-coder-0.5b-instruct-q4.gguf
for i in $(seq 1 120); do [ -f /root/stage/ok ] && break; sleep 2; done
# convert the GGUF once (the servers then read the conversion cache; without it each server's start
# took ~90 s of the replay's time limit in session 12's try, which then timed out)
python3 -c "from editkv.engine.loading import load_model; load_model('$G', device='cuda')" > $R/qwen_load.txt 2>&1
log "served replay, human pace"
timeout 300 python3 bench/lsp_replay.py --device cuda --model $G --data $D/dev150.jsonl.gz --limit 6 --max-keys 60 \
  --methods default,full --pace human --json $R/replay_qwen.json > $R/replay_qwen.txt 2>&1
log "replay rc=$?"
timeout 90 python3 bench/latency_gpu.py --device cuda --models model --model $G --data $D/dev150.jsonl.gz \
  --contexts 8192 --json $R/latency_qwen.json > $R/latency_qwen.txt 2>&1
log "latency rc=$?"
touch $R/done
