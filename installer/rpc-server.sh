#!/usr/bin/env bash
# Build (once) and print the path of llama.cpp's RPC worker, `ggml-rpc-server`, from the llama.cpp
# that llama-cpp-python VERSION vendors, with the wheel's CMake flags (so a worker speaks the same
# RPC protocol as the daemon and uses the same backends: CUDA on a GPU machine).
#
# Linked statically (BUILD_SHARED_LIBS=OFF): the binary runs from wherever it is copied (the
# installer puts it in the venv's bin/, where `appliance worker` finds it). Cached by version and
# flags beside the wheels, like installer/llama-wheel.sh. A few minutes on two cores.
#
# usage: installer/rpc-server.sh PYTHON VERSION "CMAKE_ARGS"
set -euo pipefail

python=$1
version=$2
cmake_args=$3
# The worker exists only in an RPC build; the wheel's flags carry it, a caller's may not.
case " $cmake_args " in *" -DGGML_RPC=ON "*) ;; *) cmake_args="$cmake_args -DGGML_RPC=ON" ;; esac

cache_root=${APPLIANCE_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/qwen-appliance/wheels}
key=$(printf 'rpc-server|%s|%s' "$version" "$cmake_args" | sha256sum | cut -c1-16)
house="$cache_root/rpc-server-$key"
binary="$house/ggml-rpc-server"

if [ ! -x "$binary" ]; then
    echo "building ggml-rpc-server $version with: $cmake_args (one time; a few minutes)" >&2
    work="$house.partial"
    rm -rf "$work" && mkdir -p "$work/src"
    "$python" -m pip download --quiet --no-binary :all: --no-deps -d "$work" \
        "llama-cpp-python==$version" >&2
    tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work/src" --strip-components=1
    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    # shellcheck disable=SC2086  # the flags are separate words
    cmake -S "$work/src/vendor/llama.cpp" -B "$work/build" "${generator[@]}" \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $cmake_args >&2
    cmake --build "$work/build" -j "$(nproc 2>/dev/null || echo 2)" --target ggml-rpc-server >&2
    mkdir -p "$house"
    install -m 0755 "$work/build/bin/ggml-rpc-server" "$binary.new"
    mv -f "$binary.new" "$binary"
    printf '%s\n' "$cmake_args" > "$house/CMAKE_ARGS"
    rm -rf "$work"
fi
printf '%s\n' "$binary"
