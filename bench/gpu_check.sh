#!/usr/bin/env bash
# The first run on an NVIDIA GPU, in one go (about 12 minutes on a 16-core H200 box): build
# llama.cpp with CUDA for this card only, make a random-weight Qwen3-8B-shape Q4_K_M with our
# converter (in parallel with the build), then measure and write bench/results/gpu_check-*.json:
#   - the offload plan (weights, KV, compute buffer, context per slot, KV type) against NVML's
#     VRAM for the daemon after the load, and llama.cpp's own buffer sizes for the same shape;
#   - decode tok/s through our API (1, 4, 8 streams) against a raw llama-cpp-python loop and
#     llama-bench on the same file;
#   - KV q8_0 against f16: llama.cpp's bytes and decode speed (bench/kv_cache.py);
#   - the draft speed-up, if bench/speculative.py exists;
#   - embeddings: one request of 256 inputs against one request per input (bench/embed_throughput.py).
# Every step has its own timeout; a failed step is recorded and the rest still run.
#
# usage: bench/gpu_check.sh [--cpu-rehearsal] [--shape qwen3-8b] [--deadline SECONDS]
#   --cpu-rehearsal: every step on this CPU with the 0.6B model (/work/models, or MODEL=...),
#                    the CUDA build reduced to a cmake configure, GPU layers 0.
# env: LLAMA_SRC   llama-cpp-python 0.3.36 source (sdist .tar.gz or unpacked); default: the one
#                  bench/build_llama_server.sh fetched, else `pip download` (needs the network).
#      PYTHON      the interpreter with the project's dependencies (default .venv/bin/python;
#                  without one, a venv with --system-site-packages gets `pip install -e .`).
#      WORK        scratch folder (default /tmp/gpu_check; the 8B needs ~40 GB there).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

rehearsal=0
shape=qwen3-8b
deadline=720
slack_factor=1
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-rehearsal) rehearsal=1; slack_factor=${SLACK:-3} ;;
        --shape) shape=$2; shift ;;
        --deadline) deadline=$2; shift ;;
        *) echo "usage: bench/gpu_check.sh [--cpu-rehearsal] [--shape S] [--deadline S]" >&2; exit 2 ;;
    esac
    shift
done

deadline=$(( deadline * slack_factor ))
work=${WORK:-/tmp/gpu_check}
rm -rf "$work" && mkdir -p "$work"
steps="$work/steps.tsv"
started=$(date +%s)
cores=$(nproc)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
llama_version=0.3.36

left() { echo $(( deadline - ($(date +%s) - started) )); }
# The rehearsal runs on a busy 2-core machine: its timeouts (and deadline) stretch by `slack`.
slack() { echo $(( $1 * slack_factor )); }

# step NAME TIMEOUT COMMAND...: run with its own timeout (never past the deadline), log it.
step() {
    local name=$1 limit=$2; shift 2
    local room; room=$(left)
    [ "$limit" -gt "$room" ] && limit=$room
    if [ "$limit" -le 5 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "no time left" >> "$steps"
        return 1
    fi
    local t0; t0=$(date +%s)
    echo "== $name (timeout ${limit}s)" >&2
    # through bash -c so that exported shell functions (the build, the model) can be steps too
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$work/$name.log" 2>&1
    local rc=$?
    local note=""; [ $rc = 124 ] && note="timed out"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note" >> "$steps"
    [ $rc = 0 ] || tail -n 5 "$work/$name.log" >&2
    return $rc
}

skip() { printf '%s\t%s\t%s\t%s\n' "$1" skipped 0 "$2" >> "$steps"; echo "== $1 skipped: $2" >&2; }

# -- the card ------------------------------------------------------------------------------
if [ $rehearsal = 1 ]; then
    arch=""
    gpu_layers=0
    echo '{"gpu": null, "rehearsal": true}' > "$work/step-probe.json"
else
    command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: use --cpu-rehearsal" >&2; exit 2; }
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '. ')
    gpu_layers=99
    nvidia-smi --query-gpu=name,compute_cap,memory.total,memory.used,driver_version \
        --format=csv,noheader,nounits | head -n1 | "${PYTHON:-python3}" -c '
import json, sys
name, cap, total, used, driver = [f.strip() for f in sys.stdin.read().split(",")]
print(json.dumps({"gpu": name, "compute_cap": cap, "total_mib": int(total),
                  "used_mib": int(used), "driver": driver}))' > "$work/step-probe.json"
fi

# -- llama.cpp for this card (one build: the library for llama-cpp-python, and llama-bench) --
# llama-cpp-python is ctypes over libllama.so: LLAMA_CPP_LIB_PATH points its Python code at this
# build, so one CUDA compile serves the daemon, the raw loop and llama-bench alike.
src=$work/llama-src
build=$work/llama-build
fetch_source() {
    local given=${LLAMA_SRC:-}
    local cached=${XDG_CACHE_HOME:-$HOME/.cache}/qwen-appliance/llama-server-$llama_version-rpc
    if [ -z "$given" ] && [ -f "$cached/llama_cpp_python-$llama_version.tar.gz" ]; then
        given=$cached/llama_cpp_python-$llama_version.tar.gz
    fi
    if [ -z "$given" ]; then
        "${PYTHON:-python3}" -m pip download --quiet --no-binary :all: --no-deps -d "$work" \
            "llama-cpp-python==$llama_version" || return 1
        given=$work/llama_cpp_python-$llama_version.tar.gz
    fi
    mkdir -p "$src"
    if [ -d "$given" ]; then cp -a "$given/." "$src/"
    else tar -xzf "$given" -C "$src" --strip-components=1; fi
}
build_llama() {
    # shellcheck disable=SC2046  # the flags are separate words
    cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        $(installer/cpu-flags.sh) "$@" || return 1
    [ $rehearsal = 1 ] && return 0  # the rehearsal checks the configure only (2 slow cores)
    cmake --build "$build" -j "$cores" --target llama llama-bench
}

export work src build rehearsal llama_version cores
export -f fetch_source build_llama
step source "$(slack 120)" fetch_source
if [ $rehearsal = 1 ]; then
    step build "$(slack 120)" build_llama
    # The rehearsal's libraries: the portable CPU build bench/build_llama_server.sh made, when
    # it is there (the same vendored commit), else the wheel's own.
    cpu_bin=${XDG_CACHE_HOME:-$HOME/.cache}/qwen-appliance/llama-server-$llama_version-rpc/src/vendor/llama.cpp/build/bin
    [ -f "$cpu_bin/libllama.so" ] && lib_dir=$cpu_bin || lib_dir=""
    bench_bin=$cpu_bin/llama-bench
else
    step build 420 build_llama -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" &
    build_pid=$!
    lib_dir=$build/bin
    bench_bin=$build/bin/llama-bench
fi

# -- the model (beside the build: converting is mostly disk and one quantize pass) ----------
if [ $rehearsal = 1 ]; then
    model=${MODEL:-/work/models/qwen3-0.6b-q4_k_m.gguf}
else
    model=$work/models/$shape-q4_k_m.gguf
fi
python=${PYTHON:-$repo/.venv/bin/python}
if [ ! -x "$python" ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages "$work/venv"
    python=$work/venv/bin/python
    step deps 240 "$python" -m pip install -q -e "$repo" || true
fi
make_model() {
    mkdir -p "$work/models"
    "$python" -m converter.synthetic "$work/checkpoint" --shape "$shape" || return 1
    # Not --verify: random weights, and the reference pass would not fit the time.
    "$python" -m appliance.cli convert "$work/checkpoint" --out "$model" --quant Q4_K_M \
        || return 1
    rm -rf "$work/checkpoint"
}
# The draft pair: one random-weight 0.6B at Q8_0 (target) and Q4_K_M (draft), so the draft
# agrees often; random 8B + random 0.6B would agree by chance only.
make_pair() {
    "$python" -m converter.synthetic "$work/pair" --shape qwen3-0.6b || return 1
    for quant in Q8_0 Q4_K_M; do
        "$python" -m appliance.cli convert "$work/pair" --quant "$quant" \
            --out "$work/models/pair-$(echo "$quant" | tr 'A-Z' 'a-z').gguf" || return 1
    done
}
# The embedding model for the one-request-vs-one-per-input figure (a GPU-shaped 5x target).
make_embed() {
    "$python" -m converter.synthetic "$work/embed-src" --shape qwen3-embedding-0.6b || return 1
    "$python" -m appliance.cli convert "$work/embed-src" --quant Q8_0 --out "$embed_model"
}
export python model shape
if [ $rehearsal = 0 ]; then
    embed_model=$work/models/qwen3-embedding-0.6b-q8_0.gguf
else
    embed_model=${EMBED_MODEL:-/work/models/embed/qwen3-embedding-0.6b-q8_0.gguf}
fi
export embed_model
export -f make_model make_pair make_embed
if [ $rehearsal = 0 ]; then
    step model 480 make_model
    [ -f bench/speculative.py ] && step pair 120 make_pair
    step embed_model 120 make_embed
    wait "$build_pid"
    target=$work/models/pair-q8_0.gguf draft=$work/models/pair-q4_k_m.gguf
else
    target=${MODEL:-/work/models/qwen3-0.6b-q4_k_m.gguf} draft=$target  # plumbing only
fi
[ -f "$model" ] || { echo "no model at $model" >&2; }

# -- measurements --------------------------------------------------------------------------
export LLAMA_CPP_LIB_PATH=${lib_dir:-}
[ -n "$LLAMA_CPP_LIB_PATH" ] || unset LLAMA_CPP_LIB_PATH
export PYTHONPATH="$repo${lib_dir:+:$src}${PYTHONPATH:+:$PYTHONPATH}"
if [ $rehearsal = 1 ]; then  # small: this runs beside other work on two cores
    tokens=8; rounds=1; threads=$cores; gpu=none; context=1024; kv_context=2048; kv_fill=256
else
    tokens=128; rounds=3; threads=$cores; gpu=auto; context=auto; kv_context=8192; kv_fill=2048
fi
check=("$python" bench/gpu_check.py)
if [ -f "$model" ]; then
    step daemon "$(slack 150)" "${check[@]}" daemon "$model" "$work/step-daemon.json" \
        --gpu "$gpu" --context "$context" --parallel 8 --tokens "$tokens" --rounds "$rounds" \
        --threads "$threads"
    step raw "$(slack 120)" "${check[@]}" raw "$model" "$work/step-raw.json" --plan "$work/step-daemon.json" \
        --parallel 8 --tokens "$tokens" --rounds "$rounds" --threads "$threads"
    if [ -x "$bench_bin" ]; then
        step llama_bench "$(slack 150)" "${check[@]}" llama-bench "$bench_bin" "$model" \
            "$work/step-llama_bench.json" --gpu-layers "$gpu_layers" --threads "$threads" \
            --tokens "$tokens" --rounds "$rounds" --prompt "$(( tokens * 4 ))" \
            --timeout "$(slack 60)"
    else
        skip llama_bench "no llama-bench at $bench_bin"
    fi
    step kv_cache "$(slack 120)" "$python" bench/kv_cache.py "$model" --context "$kv_context" --fill "$kv_fill" \
        --steps "$tokens" --rounds "$rounds" --threads "$threads" --gpu-layers "$gpu_layers" \
        $([ -x "$bench_bin" ] && echo --llama-bench "$bench_bin") --out "$work/step-kv_cache.json"
    if [ -f bench/speculative.py ] && [ -f "$target" ]; then
        step speculative "$(slack 150)" "$python" bench/speculative.py "$target" "$draft" \
            --tokens "$tokens" --rounds 2 --threads "$threads" --out "$work/step-speculative.json"
    else
        skip speculative "bench/speculative.py is not in this tree"
    fi
    if [ -f "$embed_model" ]; then
        gpu_flag=$([ $rehearsal = 0 ] && echo --gpu)
        step embed "$(slack 150)" "$python" bench/embed_throughput.py "$embed_model" "$model" \
            --threads "$threads" --inputs "$(( tokens * 2 ))" --per-request-inputs "$tokens" \
            --solo-s 5 $gpu_flag --out "$work/step-embed.json"
    else
        skip embed "no embedding model at $embed_model"
    fi
else
    skip measurements "no model"
fi

kind=$([ $rehearsal = 1 ] && echo cpu-rehearsal || echo gpu)
out=bench/results/gpu_check-$kind-$stamp.json
"$python" bench/gpu_check.py merge "$work" "$out" > /dev/null
echo "total $(( $(date +%s) - started ))s; wrote $out" >&2
column -t -s $'\t' "$steps" >&2
