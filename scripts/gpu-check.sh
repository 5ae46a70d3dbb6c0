#!/usr/bin/env bash
# One call on a machine with a GPU: build the kernels with nvcc, run every
# test on the GPU (and the emulator), compute-sanitizer memcheck + racecheck
# on a small case, a device-to-device copy bandwidth, the kernel benches, and
# (where Python with torch is installed) torch SDPA and flash-linear-attention
# at the same shapes. Ends with one table. Usage: scripts/gpu-check.sh
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/target/gpu-check}
mkdir -p "$out"
declare -a table
row() { table+=("$(printf '| %-34s | %-10s | %s |' "$1" "$2" "$3")"); }

# nvcc: $NVCC, the PyPI install script, or PATH.
if [ -z "${NVCC:-}" ]; then
  if command -v nvcc >/dev/null; then NVCC=$(command -v nvcc); else NVCC=$(scripts/install-nvcc.sh | tail -n1); fi
fi
export NVCC
bindir=$(dirname "$NVCC")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
row "GPU" "info" "$(head -n1 "$out/gpu.txt")"

# 1. Build (no spills allowed at the default archs).
if LINATTN_DENY_SPILLS=1 cargo build --release -p linattn-kernels > "$out/build.log" 2>&1; then
  row "build (nvcc, no spills)" "ok" "$("$NVCC" --version | tail -n1)"
else
  row "build (nvcc, no spills)" "FAIL" "see $out/build.log"
fi

# 2. All tests: tests/common::devices() includes the GPU when present.
if cargo test --release --workspace > "$out/tests.log" 2>&1; then
  row "cargo test (GPU + emulator)" "ok" "$(grep -c '^test .* ok$' "$out/tests.log") tests"
else
  row "cargo test (GPU + emulator)" "FAIL" "see $out/tests.log"
fi

# 3. compute-sanitizer on a small case (the forward/decode tests' binaries).
san=$(command -v compute-sanitizer || ls "$bindir"/../../*/bin/compute-sanitizer 2>/dev/null | head -n1)
if [ -n "$san" ]; then
  cargo test --release --test forward --no-run > /dev/null 2>&1
  bin=$(ls -t target/release/deps/forward-* | grep -v '\.d$' | head -n1)
  for tool in memcheck racecheck; do
    if "$san" --tool "$tool" --error-exitcode 1 "$bin" split_and_resume deterministic > "$out/san-$tool.log" 2>&1; then
      row "compute-sanitizer $tool" "ok" "split_and_resume, deterministic"
    else
      row "compute-sanitizer $tool" "FAIL" "see $out/san-$tool.log"
    fi
  done
else
  row "compute-sanitizer" "skipped" "not installed"
fi

# 4. Device-to-device copy bandwidth (1 GiB, via torch if present).
bw=$(python3 - <<'PY' 2>/dev/null
import torch
x = torch.empty(1 << 29, dtype=torch.int16, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
print(f"{2 * x.numel() * 2 * 20 / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s")
PY
)
row "D2D copy bandwidth" "${bw:+ok}" "${bw:-torch not available}"

# 5. Kernel benches (criterion prints time and GB/s per anchor shape).
if cargo bench --bench kernels > "$out/bench.log" 2>&1; then
  while read -r line; do row "bench $(echo "$line" | awk '{print $1}')" "time" "$(echo "$line" | cut -d' ' -f2-)"; done \
    < <(grep -E '^[a-z_0-9]+/B' -A1 "$out/bench.log" | paste - - | sed -E 's/ +/ /g' | awk '{print $1, $4, $5, $6, $7}')
else
  row "cargo bench kernels" "FAIL" "see $out/bench.log"
fi

# 6. Peers at the same shapes, where installed.
python3 - > "$out/peers.txt" 2>&1 <<'PY'
import torch, torch.nn.functional as F
shapes = [(1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (4, 4096, 64, 128), (8, 2048, 32, 256), (8, 1024, 8, 64)]
def bench(f):
    for _ in range(3): f()
    torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10): f()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / 10
try:
    from fla.ops.linear_attn import chunk_linear_attn
except Exception:
    chunk_linear_attn = None
for b, t, h, d in shapes:
    q = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)
    sd = bench(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), is_causal=True))
    fl = f"{bench(lambda: chunk_linear_attn(q, q, q)):.3f}" if chunk_linear_attn else "n/a"
    print(f"B{b}_T{t}_H{h}_D{d} sdpa {sd:.3f} ms fla {fl} ms")
PY
if [ $? -eq 0 ]; then
  while read -r s _ sd _ _ fl _; do row "peers $s" "ms" "torch SDPA causal $sd, FLA chunk_linear_attn $fl"; done < "$out/peers.txt"
else
  row "peers (torch SDPA, FLA)" "skipped" "$(tail -n1 "$out/peers.txt")"
fi

printf '| %-34s | %-10s | %s |\n|---|---|---|\n' "check" "result" "detail"
printf '%s\n' "${table[@]}"
