#!/bin/sh
# Run a command as on a CPU without AVX-512, bf16 or AMX (the common laptop and cloud CPU), on a
# machine that has them: to measure the fp32-only class where no such machine is at hand.
#
#     sudo benchmarks/as_fp32_only.sh python benchmarks/train_throughput.py --matmul-share --json
#
# PyTorch's own kernels are capped at AVX2 (ATEN_CPU_CAPABILITY), so are oneDNN's convolutions
# (ONEDNN_MAX_CPU_ISA) and MKL's matmuls (MKL_ENABLE_INSTRUCTIONS), and the command sees a
# /proc/cpuinfo without the avx512*/amx* flags (bind-mounted in a private mount namespace: needs
# root), so sweeper's CPU class is "fp32-only" and `precision = "auto"` trains as it would there.
# What it cannot change: the cores' clock, caches and memory bandwidth, and an AVX-512 core's AVX2
# rate (on AMD Zen 4 a 512-bit op is two 256-bit halves, so its AVX2 fp32 rate is its full rate).
set -eu
fake=$(mktemp /tmp/cpuinfo-fp32-only.XXXXXX)
sed -E '/^flags/ s/ (avx512[a-z0-9_]*|amx[a-z0-9_]*)//g' /proc/cpuinfo >"$fake"
export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
exec unshare --mount --propagation private sh -c 'mount --bind "$1" /proc/cpuinfo && shift && exec "$@"' sh "$fake" "$@"
