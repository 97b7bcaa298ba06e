#!/usr/bin/env bash
# One GPU session's measurements, started detached (setsid nohup) from a copy of the repository at
# /root/repo after the first device call; the Qwen GGUF arrives by the staging tool into /root/stage
# (then /root/stage/ok), the dev data into /root/stage/data. Writes under /root/results; touch
# /root/go3 to stop the quality runs and start the timings. Needs PYTHONPATH with editkv on it
# (a symlink /tmp/pkgs/editkv -> /root/repo worked where `pip install -e .` did not).
cd /root/repo
export PYTHONPATH=/tmp/site:/tmp/pkgs PYTHONUNBUFFERED=1
R=/root/results; mkdir -p $R
log() { echo "[$(date +%T)] $*" | tee -a $R/progress.log; }
D=.gpu/data
log "gpu tests (beside the staging and the quality runs: correctness only)"
# only the files with GPU tests (collecting the others would import hypothesis, whose wheel stays off the device)
GPU_TESTS_PATHS=${GPU_TESTS_PATHS:-$(grep -rl 'mark\.gpu' tests | sort | tr '\n' ' ')}
[ "${GPU_TESTS:-1}" = 1 ] && (timeout 600 python3 -m pytest -m gpu -q -p no:cacheprovider $GPU_TESTS_PATHS > $R/gpu_tests.log 2>&1; log "gpu tests rc=$? $(tail -1 $R/gpu_tests.log)") &
log "waiting for the GGUF and the data"
for i in $(seq 1 120); do [ -f /root/stage/ok ] && break; sleep 5; done
G=/root/stage/qwen2.5-coder-0.5b-instruct-q4.gguf
cp /root/stage/data/* $D/ 2>/dev/null
log "qwen load (conversion cache)"
python3 -c "from editkv.engine.loading import load_model; import time; t=time.time(); m=load_model('$G', device='cuda'); print('first load', time.time()-t, m.source)" > $R/qwen_load.txt 2>&1
touch $R/phase1_done
log "phase 2: beside the peer's CPU build (nice 19)"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# realedits FIM over the whole dev set, PIE against the exact FIM prefill (session 13: -0.77 EM); RE=1 runs it
if [ "${RE:-0}" = 1 ]; then
  mkdir -p $R/re
  for i in $(seq 0 7); do
    timeout 1200 python3 bench/realedits.py --device cuda --model $G --data $D/dev.jsonl.gz --views fim \
      --methods full,pie --fim-fresh-suffix ${FRESH:-384} --progress --shard $i/8 --json $R/re/re_$i.json \
      > $R/re/re_$i.txt 2>&1 &
  done
fi
# served-path quality against full recompute (session 13: equal EM); LINES=1 runs it
[ "${LINES:-0}" = 1 ] && timeout 900 python3 bench/lsp_replay.py --device cuda --model $G --data $D/dev150.jsonl.gz \
  --limit 40 --max-keys 300 --methods default,full --pace lines --json $R/lines_qwen.json > $R/lines_qwen.txt 2>&1 &
EDITKV_FAULTS_DEVICE=cuda timeout 900 python3 -m pytest -q -p no:cacheprovider tests/lsp_server/test_faults.py > $R/faults_cuda.log 2>&1 &
[ "${EXTRA:-0}" = 1 ] && bash scripts/gpu/session_extra.sh $G > $R/extra.log 2>&1 &
# realedits, left-to-right view, all four methods over the dev set in 24 shards, 8 at a time (RE_L2R=1);
# shards still running when phase 2 ends are stopped, each keeping its whole records (--progress); shards from
# earlier sessions in /root/stage/data/rel/ (carried in .gdata/rel/) are resumed (--resume)
if [ "${RE_L2R:-0}" = 1 ]; then
  mkdir -p $R/rel
  cp /root/stage/data/rel/rel_*.json $R/rel/ 2>/dev/null  # earlier sessions' shards, resumed
  (seq 0 23 | xargs -P 8 -I{} sh -c "timeout 900 python3 bench/realedits.py --device cuda --model $G --data $D/dev.jsonl.gz \
      --views l2r --methods full,pie,conflict,prefix_reuse --shard {}/24 --progress --resume --json $R/rel/rel_{}.json \
      > $R/rel/rel_{}.txt 2>&1") &
fi
# cross-file FIM (issue 25): CacheBlend with the document's last 128 tokens re-encoded (blend_r15) against the
# view before (blend_r15_p0), the suffix cut at its re-encoded window (blend_r15_s0), none and exact (XF_METHODS),
# 240 xfile targets in XF_SHARDS shards (XF=1; needs the blobs in $D)
if [ "${XF:-0}" = 1 ]; then
  mkdir -p $R/xf
  N=${XF_SHARDS:-4}
  for i in $(seq 0 $((N - 1))); do
    timeout 1500 python3 bench/crossfile.py --device cuda --model $G --data $D/dev.jsonl.gz --crossfile $D/dev-crossfile.jsonl.gz \
      --blobs $D/dev-blobs.jsonl.gz --budget 2048 --sets xfile --subset 240 --views fim \
      --methods ${XF_METHODS:-none,exact,blend_r15_p0,blend_r15,blend_r15_s0} --progress --shard $i/$N --json $R/xf/xf_$i.json > $R/xf/xf_$i.txt 2>&1 &
  done
fi
P2=$(date +%s)
# phase 2 ends when its jobs do, at /root/go3, or PHASE2_S seconds after it began
while [ "$(jobs -r | wc -l)" -gt 0 ] && [ ! -f /root/go3 ]; do
  sleep 5
  if [ -n "${PHASE2_S:-}" ] && [ $(( $(date +%s) - P2 )) -ge "$PHASE2_S" ] && ! pgrep -f 'pytest -m gpu' > /dev/null; then
    touch /root/go3
  fi
done
unset PYTORCH_CUDA_ALLOC_CONF
if [ -f /root/go3 ]; then
  log "go3: stopping $(jobs -r | wc -l) jobs"
  pkill -f 'xargs -P 8'; pkill -f 'bench/(realedits|fim_prompts|crossfile|multidraft|adadec|lsp_replay).py'; pkill -f 'lsp_server.cli lsp'; pkill -f 'pytest -m fuzz_long'; pkill -f 'test_faults.py'; pkill -f 'editkv calibrate'; pkill -f 'pytest -m gpu'
  sleep 5
fi
log "phase 2 done"
[ -d $R/re ] && python3 bench/realedits.py --merge $R/re/re_*.json > $R/re_merged.txt 2>&1
[ -d $R/xf ] && python3 bench/crossfile.py --merge $R/xf/xf_*.json > $R/xf_merged.txt 2>&1
[ -d $R/rel ] && ls $R/rel/rel_*.json > /dev/null 2>&1 && python3 bench/realedits.py --merge $R/rel/rel_*.json > $R/rel_merged.txt 2>&1
hop() {
    local hs='nowarm={"warmUp": false}'  # HOP_SETTINGS: the method beside default, e.g. 'kv1g={"kvBudgetMb": 1024}'
    [ -n "${HOP_SETTINGS:-}" ] && hs=$HOP_SETTINGS
    log "served replay hopping between 50 documents (default against $hs)"
    timeout 420 python3 bench/lsp_replay.py --device cuda --model $G --data $D/dev150.jsonl.gz --pace hop --docs 50 \
      --rounds ${HOP_ROUNDS:-3} --keys-per-turn 4 --methods default --method-settings "$hs" \
      --json $R/hop_qwen.json > $R/hop_qwen.txt 2>&1
    log "hop rc=$?"
}
# HOP_FIRST=1: the hop replay (no peer) while the peer still builds at nice 19, for a short session
[ "${HOP:-0}" = 1 ] && [ "${HOP_FIRST:-0}" = 1 ] && hop
PEER=/root/xdg/editkv/peers/llama-b11434-cuda/bin/llama-server
for i in $(seq 1 60); do [ -x $PEER ] || ! pgrep -f 'llama_server.py build' > /dev/null && break; sleep 5; done
log "phase 3: timings alone"
if [ -x $PEER ]; then M=default,vscode,full,llama; else M=default,vscode,full; fi
M=${REPLAY_METHODS:-$M}  # a short session: e.g. default,full
log "served replay, human pace ($M)"
timeout 300 python3 bench/lsp_replay.py --device cuda --model $G --data $D/dev150.jsonl.gz --limit 6 --max-keys 60 \
  --crossfile $D/dev-crossfile.jsonl.gz --peer-bin $PEER --peer-log $R/peer.log \
  --methods $M --pace human --json $R/replay_qwen.json > $R/replay_qwen.txt 2>&1
log "replay rc=$?"
if [ "${ML_AB:-0}" = 1 ]; then  # issue 21's tail: multi-line decodes at a new line, multilineMs 20 (the default) against 30
  log "served replay, human pace, multilineMs 30 (the default before session 17) against the default"
  timeout 300 python3 bench/lsp_replay.py --device cuda --model $G --data $D/dev150.jsonl.gz --limit 6 --max-keys 60 \
    --methods default --method-settings 'ml30={"multilineMs": 30}' --pace human --json $R/replay_ml30.json > $R/replay_ml30.txt 2>&1
  log "replay (multilineMs) rc=$?"
fi
[ "${HOP:-0}" = 1 ] && [ "${HOP_FIRST:-0}" = 0 ] && hop  # issue 24: 50 open documents, typed into in turns; the warm-up at load against none
if [ "${LAT:-0}" = 1 ]; then  # issue 24's non-regression: real-weight keystroke latency (session 13's table)
  log "latency bench, Qwen, 2k and 8k tokens"
  timeout 200 python3 bench/latency_gpu.py --device cuda --models model --model $G --data $D/dev150.jsonl.gz \
    --contexts 2048,8192 --json $R/latency_qwen.json > $R/latency_qwen.txt 2>&1
  log "latency rc=$?"
fi
if [ "${HOP_DEFAULT:-0}" = 1 ]; then  # issue 24: the same hop with the embedded default model
  log "served replay hopping between 50 documents, default model"
  timeout 300 python3 bench/lsp_replay.py --device cuda --data $D/dev150.jsonl.gz --pace hop --docs 50 \
    --rounds ${HOP_ROUNDS:-3} --keys-per-turn 4 --methods default --json $R/hop_default.json > $R/hop_default.txt 2>&1
  log "hop (default model) rc=$?"
fi
if [ "${DD:-0}" = 1 ]; then  # issue 22: the dropdown through editkv lsp (textDocument/completion), beam against superposed
  log "served dropdown through editkv lsp (lines pace, beam vs superposed)"
  timeout 300 python3 bench/lsp_replay.py --device cuda --model $G --data $D/dev150.jsonl.gz --limit ${DD_N:-30} --max-keys 300 \
    --pace lines --dropdown --methods default --method-settings 'superposed={"beamSearch": false}' \
    --json $R/dropdown_served.json > $R/dropdown_served.txt 2>&1
  log "served dropdown rc=$?"
fi
if [ ! -f /root/stop ] && [ "${MD:-1}" = 1 ]; then
  log "served dropdown alone (beam lanes vs superposed timings)"
  timeout 200 python3 bench/multidraft.py --device cuda --served --model $G --data $D/dev150.jsonl.gz --subset ${MD_N:-40} \
    --view fim --methods "greedy,superposed,beam k,beam k early" --json $R/md_fim.json > $R/md_fim.txt 2>&1
  log "dropdown rc=$?"
  if [ "${MD_L2R:-0}" = 1 ]; then
    timeout 200 python3 bench/multidraft.py --device cuda --served --model $G --data $D/dev150.jsonl.gz --subset ${MD_N:-40} \
      --view l2r --methods "greedy,superposed,beam k,beam k early" --json $R/md_l2r.json > $R/md_l2r.txt 2>&1
    log "dropdown l2r rc=$?"
  fi
fi
if [ -x $PEER ] && [ "${LINES_LLAMA:-1}" = 1 ] && [ ! -f /root/stop2 ]; then
  log "suggestion quality side by side with llama-server (lines pace)"
  timeout 480 python3 bench/lsp_replay.py --device cuda --model $G --data $D/dev150.jsonl.gz --limit 40 --max-keys 300 \
    --crossfile $D/dev-crossfile.jsonl.gz --peer-bin $PEER --peer-log $R/peer_lines.log \
    --methods default,llama --pace lines --json $R/lines_llama_gpu.json > $R/lines_llama_gpu.txt 2>&1
  log "lines rc=$?"
fi
if [ "${CHUNK_AB:-0}" = 1 ]; then  # the same replay with big eager chunks for a file's first encoding
  log "served replay, human pace, EDITKV_ENCODE_CHUNK=2048"
  EDITKV_ENCODE_CHUNK=2048 timeout 200 python3 bench/lsp_replay.py --device cuda --model $G --data $D/dev150.jsonl.gz \
    --limit 6 --max-keys 60 --methods default --pace human --json $R/replay_chunk2048.json > $R/replay_chunk2048.txt 2>&1
  log "replay (chunk 2048) rc=$?"
fi
touch $R/done
