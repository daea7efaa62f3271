#!/usr/bin/env bash
# Print the CMake flags that choose the x86 instruction sets llama.cpp is built for; the one
# place the installer, tests/run and the benches compose them (llama-wheel.sh keys its cache on
# the whole flag string, so each choice gets its own wheel).
#
# usage: installer/cpu-flags.sh [portable|native] [CPUINFO]
#   portable (the default, or APPLIANCE_LLAMA_CPU): AVX2 + FMA + F16C (+ BMI2, SSE4.2, AVX, which
#            ggml turns on with them): runs on any x86-64 CPU of the last ten years.
#   native:  what this CPU has, read from /proc/cpuinfo: AVX-512 F/CD/VL/DQ/BW as ggml's one
#            GGML_AVX512 switch, VBMI, VNNI, BF16, AVX-VNNI. Never AMX: on an AMX machine its
#            matmul path crashed in llama_decode, and -march=native (GGML_NATIVE) would turn it
#            on, so the sets are named one by one instead.
# Not the default: on an AVX-512 machine a native build decoded no faster single-stream (74 vs 75
# tok/s on the 0.6B shape, memory-bound), and on this project's AVX2-only CPUs it is the same
# ISA as the portable build. Choose it with APPLIANCE_LLAMA_CPU=native where a measurement of
# batched or prompt speed shows a gain.
set -euo pipefail

mode=${1:-${APPLIANCE_LLAMA_CPU:-portable}}
cpuinfo=${2:-/proc/cpuinfo}
portable="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
no_amx="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

case "$mode" in
    portable)
        printf '%s\n' "$portable"
        ;;
    native)
        # The flags line of the first CPU, as words with a space either side for exact matches.
        have=" $(grep -m1 '^flags' "$cpuinfo" | cut -d: -f2-) "
        has() { for f in "$@"; do [[ "$have" == *" $f "* ]] || return 1; done; }
        flags="-DGGML_NATIVE=OFF"
        has avx2 && flags+=" -DGGML_AVX2=ON" || flags+=" -DGGML_AVX2=OFF"
        has fma && flags+=" -DGGML_FMA=ON" || flags+=" -DGGML_FMA=OFF"
        has f16c && flags+=" -DGGML_F16C=ON" || flags+=" -DGGML_F16C=OFF"
        has bmi2 && flags+=" -DGGML_BMI2=ON" || flags+=" -DGGML_BMI2=OFF"
        has avx_vnni && flags+=" -DGGML_AVX_VNNI=ON"
        if has avx512f avx512cd avx512vl avx512dq avx512bw; then
            flags+=" -DGGML_AVX512=ON"
            has avx512vbmi && flags+=" -DGGML_AVX512_VBMI=ON"
            has avx512_vnni && flags+=" -DGGML_AVX512_VNNI=ON"
            has avx512_bf16 && flags+=" -DGGML_AVX512_BF16=ON"
        fi
        printf '%s %s\n' "$flags" "$no_amx"
        ;;
    *)
        echo "cpu-flags.sh: unknown mode '$mode' (portable or native)" >&2
        exit 2
        ;;
esac
