#!/usr/bin/env bash
# llama-server with CUDA (sm_90) for the side-by-side replay (issue 23), built from the staged sdist
# (/root/stage/llama.tar.gz) into $XDG_CACHE_HOME/editkv/peers while the quality runs use the GPU: nice 19,
# so the build takes only the cores they leave. cmake and ninja come from their wheels (/tmp/tools).
export XDG_CACHE_HOME=/root/xdg PYTHONPATH=/tmp/tools:/tmp/site:/tmp/pkgs
export PATH=/tmp/tools/cmake/data/bin:/tmp/site/ninja/data/bin:/tmp/tools/bin:/usr/local/cuda/bin:$PATH
R=/root/results
echo "[$(date +%T)] peer build start ($(which cmake ninja nvcc | tr '\n' ' '))" >> $R/progress.log
nice -n 19 python3 bench/peers/llama_server.py build --cuda --sdist /root/stage/llama.tar.gz -j 16 > $R/peer_build.log 2>&1
echo "[$(date +%T)] peer build rc=$? $(tail -1 $R/peer_build.log)" >> $R/progress.log
