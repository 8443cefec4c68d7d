#!/usr/bin/env bash
# One-shot GPU benchmark for a machine that has a GPU (and its driver / CUDA toolkit) but no Rust.
#
# Build the binary on a machine with Rust (x86-64 Linux), from the repository root:
#   cargo build --release -p xtask --features cuda,wgpu
# carry target/release/xtask to the GPU machine with the repository, then run there:
#   scripts/gpu-bench.sh [STEPS]          # default 10 steps (+3 warm-up) per configuration
#
# It prints the GPU, then `cargo xtask bench`'s table for the CUDA and the wgpu (Vulkan) backend, with
# the peak GPU memory of each configuration sampled by nvidia-smi, and leaves bench_<backend>.json and
# gpu_memory_<backend>.tsv in $OUT (default: the current folder). Nothing is compiled here; each
# backend gets at most $LIMIT seconds (default 240).
set -uo pipefail

BIN=${XTASK_BIN:-target/release/xtask}
STEPS=${1:-10}
OUT=${OUT:-.}
LIMIT=${LIMIT:-240}
CONFIGS=${CONFIGS:-full lora full_precompute lora_precompute full_bf16 lora_bf16 full_t1024 lora_t1024}

if [ ! -x "$BIN" ]; then
  echo "no executable at $BIN: build it with 'cargo build --release -p xtask --features cuda,wgpu' and carry it" >&2
  exit 2
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(nvidia-smi not found)"

peak_gpu_mib() { # samples used GPU memory every 0.2 s while "$@" runs; prints the maximum
  local log; log=$(mktemp)
  ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 >> "$log"; sleep 0.2; done ) &
  local sampler=$!
  "$@"; local rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  echo "peak_gpu_mib $(sort -n "$log" | tail -1)"
  rm -f "$log"
  return $rc
}

for backend in cuda wgpu; do
  echo "== $backend =="
  : > "$OUT/gpu_memory_$backend.tsv"
  started=$(date +%s)
  for config in $CONFIGS; do
    left=$(( LIMIT - ($(date +%s) - started) ))
    if [ "$left" -le 5 ]; then echo "$backend: time limit reached before $config"; break; fi
    result=$(peak_gpu_mib timeout "$left" "$BIN" bench --backend "$backend" --steps "$STEPS" --warmup 3 \
      --configs "$config" --out "$OUT/bench_${backend}_$config.json" 2>&1)
    echo "$result" | grep -v '^peak_gpu_mib' | grep -v '^config ' | grep -v '^wrote '
    printf '%s\t%s\n' "$config" "$(echo "$result" | awk '/^peak_gpu_mib/ {print $2}')" >> "$OUT/gpu_memory_$backend.tsv"
  done
  echo "peak GPU memory (MiB) per configuration:"; cat "$OUT/gpu_memory_$backend.tsv"
done
