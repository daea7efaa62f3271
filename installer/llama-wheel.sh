#!/usr/bin/env bash
# Build (once) and print the path of a llama-cpp-python wheel for the given CMake flags.
#
# pip's wheel cache does not key on CMAKE_ARGS, so a wheel built with other flags would be reused
# silently; we keep our own wheelhouse with one folder per flag set instead.
#
# usage: installer/llama-wheel.sh PYTHON VERSION "CMAKE_ARGS"
set -euo pipefail

python=$1
version=$2
cmake_args=$3

cache_root=${APPLIANCE_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/qwen-appliance/wheels}
key=$(printf '%s|%s|%s' "$version" "$cmake_args" "$("$python" -c 'import sys; print(sys.version_info[:2])')" \
      | sha256sum | cut -c1-16)
house="$cache_root/$key"

wheel=$(ls "$house"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    mkdir -p "$house"
    echo "building llama-cpp-python $version with: $cmake_args (one time; several minutes)" >&2
    jobs=$(nproc 2>/dev/null || echo 2)
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$jobs \
        "$python" -m pip wheel --no-cache-dir --no-deps -w "$house.partial" \
        "llama-cpp-python==$version" >&2
    mv "$house.partial"/llama_cpp_python-*.whl "$house"/
    rmdir "$house.partial" 2>/dev/null || true
    printf '%s\n' "$cmake_args" > "$house/CMAKE_ARGS"
    wheel=$(ls "$house"/llama_cpp_python-"$version"-*.whl | head -n1)
fi
printf '%s\n' "$wheel"
