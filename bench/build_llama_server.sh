#!/usr/bin/env bash
# Build llama.cpp's own llama-server, llama-batched-bench, llama-bench and rpc-server from the
# llama.cpp that the installed llama-cpp-python vendors (same commit, same CPU flags as our wheel,
# plus the RPC backend), for the serving baselines and the RPC worker tests. Prints the
# llama-server path; the others (ggml-rpc-server is the rpc-server) sit beside it. About 15 min on 2 cores.
#
# usage: bench/build_llama_server.sh [PYTHON]
set -euo pipefail

python=${1:-.venv/bin/python}
version=$("$python" -c "import llama_cpp; print(llama_cpp.__version__)")
flags="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_RPC=ON"
home="${XDG_CACHE_HOME:-$HOME/.cache}/qwen-appliance/llama-server-$version-rpc"
binary="$home/src/vendor/llama.cpp/build/bin/llama-server"

if [[ ! -x $binary || ! -x ${binary%/*}/ggml-rpc-server ]]; then
    mkdir -p "$home"
    "$python" -m pip download --quiet --no-binary :all: --no-deps -d "$home" \
        "llama-cpp-python==$version" >&2
    rm -rf "$home/src" && mkdir "$home/src"
    tar -xzf "$home/llama_cpp_python-$version.tar.gz" -C "$home/src" --strip-components=1
    # shellcheck disable=SC2086  # the flags are separate words
    cmake -S "$home/src/vendor/llama.cpp" -B "$home/src/vendor/llama.cpp/build" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF $flags >&2
    cmake --build "$home/src/vendor/llama.cpp/build" -j "$(nproc)" \
        --target llama-server llama-batched-bench llama-bench ggml-rpc-server >&2
fi
echo "$binary"
