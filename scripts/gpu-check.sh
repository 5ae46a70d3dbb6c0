#!/usr/bin/env bash
# One call on a machine with a GPU: every test on the GPU (and the emulator),
# compute-sanitizer memcheck + racecheck on a small case, a device-to-device
# copy bandwidth, the kernel benches (forward, forward + backward, decode),
# and, where Python with torch is installed, flash-linear-attention and torch
# SDPA at the same shapes. Ends with one table (also in $OUT/table.md).
#
# Two modes:
#   cargo:  the machine has cargo: build with nvcc (no spills allowed), then
#           run through cargo.
#   bundle: no cargo (the lent GPU machines): run the executables that
#           scripts/gpu-bundle.sh built elsewhere into ./.gpu-bundle.
# Usage: scripts/gpu-check.sh   (LINATTN_GPU_CHECK_MODE=cargo|bundle forces one)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/target/gpu-check}
mkdir -p "$out"
bundle=$root/.gpu-bundle
mode=${LINATTN_GPU_CHECK_MODE:-}
if [ -z "$mode" ]; then
  if command -v cargo >/dev/null; then mode=cargo
  elif [ -e "$bundle/bin.tar.xz" ] || [ -d "$bundle/bin" ]; then mode=bundle
  else
    echo "gpu-check: no cargo here and no .gpu-bundle: run scripts/gpu-bundle.sh on a machine with cargo and carry .gpu-bundle" >&2
    exit 2
  fi
fi
declare -a table
row() { table+=("$(printf '| %-34s | %-10s | %s |' "$1" "$2" "$3")"); }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > "$out/gpu.txt" 2>&1
row "GPU" "info" "$(head -n1 "$out/gpu.txt")"
row "mode" "$mode" "$(git -C "$root" log -1 --format='%h %s' 2>/dev/null | cut -c1-60)"

# 1. Build (cargo mode) or the bundle's embedded ptxas report (bundle mode).
if [ "$mode" = cargo ]; then
  if [ -z "${NVCC:-}" ]; then
    if command -v nvcc >/dev/null; then NVCC=$(command -v nvcc); else NVCC=$(scripts/install-nvcc.sh | tail -n1); fi
  fi
  export NVCC
  if LINATTN_DENY_SPILLS=1 cargo build --release -p linattn-kernels > "$out/build.log" 2>&1 &&
     cargo build --release --bin linattn >> "$out/build.log" 2>&1; then
    row "build (nvcc, no spills)" "ok" "$("$NVCC" --version | tail -n1)"
  else
    row "build (nvcc, no spills)" "FAIL" "see $out/build.log"
  fi
  cli=$root/target/release/linattn
else
  bin=$bundle/bin
  if [ ! -d "$bin" ]; then
    # Python's lzma, in case the image has no xz.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$bundle/bin.tar.xz" /tmp/linattn-bundle && bin=/tmp/linattn-bundle/bin
  fi
  # Tests find the CLI and the sources by the paths they were built under.
  read -r _ built_root < <(grep '^repo_root' "$bundle/paths")
  read -r _ built_target < <(grep '^target_dir' "$bundle/paths")
  if [ ! -e "$built_root" ]; then mkdir -p "$(dirname "$built_root")" && ln -s "$root" "$built_root"; fi
  if [ ! -e "$built_target/release/linattn" ]; then
    mkdir -p "$built_target/release" && cp "$bin/linattn" "$built_target/release/linattn"
  fi
  cli=$bin/linattn
  row "build" "bundle" "built elsewhere with LINATTN_DENY_SPILLS=1 (see linattn info)"
fi
"$cli" info > "$out/info.txt" 2>&1
# The tests and benches fall back to the emulator alone when the GPU is not
# usable, so say loudly whether linattn itself sees one.
if grep -q '^  \[0\] .* compute ' "$out/info.txt"; then
  row "GPU seen by linattn" "ok" "$(grep -m1 '^  \[0\]' "$out/info.txt" | cut -c7-90)"
else
  row "GPU seen by linattn" "NO" "$(grep -m1 '^driver' "$out/info.txt" | cut -c1-70); tests ran on the emulator only"
fi

# 2. All tests: tests/common::devices() includes the GPU when present.
if [ "$mode" = cargo ]; then
  if cargo test --release --workspace > "$out/tests.log" 2>&1; then
    row "cargo test (GPU + emulator)" "ok" "$(grep -c '^test .* ok$' "$out/tests.log") tests"
  else
    row "cargo test (GPU + emulator)" "FAIL" "see $out/tests.log"
  fi
else
  : > "$out/tests.log"
  failed=""
  for t in "$bin"/tests/*; do
    echo "=== $(basename "$t")" >> "$out/tests.log"
    (cd "$root" && "$t" >> "$out/tests.log" 2>&1) || failed="$failed $(basename "$t")"
  done
  if [ -z "$failed" ]; then
    row "tests (GPU + emulator)" "ok" "$(grep -c '^test .* ok$' "$out/tests.log") tests"
  else
    row "tests (GPU + emulator)" "FAIL" "$failed (see $out/tests.log)"
  fi
fi
grep -q "GPU skipped" "$out/tests.log" && row "tests on the GPU" "SKIPPED" "$(grep -m1 'GPU skipped' "$out/tests.log")"

# 3. compute-sanitizer on small cases of every kernel family: forward walk
#    and split, the backward's whole-head and tiled walks, decode.
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -n1)
test_exe() {
  if [ "$mode" = cargo ]; then
    cargo test --release --test "$1" --no-run > /dev/null 2>&1
    ls -t target/release/deps/"$1"-* 2>/dev/null | grep -v '\.d$' | head -n1
  else
    echo "$bin/tests/$1"
  fi
}
if [ -n "$san" ]; then
  for spec in "forward split_and_resume deterministic" \
              "backward whole_head_walks multi_tile_heads" \
              "decode decode_matches_reference"; do
    read -r name filters <<< "$spec"
    exe=$(test_exe "$name")
    [ -x "$exe" ] || { row "compute-sanitizer $name" "missing" "$exe"; continue; }
    for tool in memcheck racecheck; do
      # shellcheck disable=SC2086
      if "$san" --tool "$tool" --error-exitcode 1 "$exe" $filters > "$out/san-$tool-$name.log" 2>&1; then
        row "compute-sanitizer $tool $name" "ok" "$filters"
      else
        row "compute-sanitizer $tool $name" "FAIL" "see $out/san-$tool-$name.log"
      fi
    done
  done
else
  row "compute-sanitizer" "skipped" "not installed"
fi

# 4. Device-to-device copy bandwidth (1 GiB each way, via torch if present).
bw=$(python3 - <<'PY' 2>/dev/null
import torch
x = torch.empty(1 << 29, dtype=torch.int16, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
print(f"{2 * x.numel() * 2 * 20 / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s (read + write)")
PY
)
row "D2D copy bandwidth" "${bw:+ok}" "${bw:-torch not available}"

# 5. Kernel benches: criterion's log, and the bench's own event-timed table
#    (ms, GB/s, % of the memory floor at the copy bandwidth it measures).
export LINATTN_BENCH_TABLE=$out/bench-table.md
rm -f "$LINATTN_BENCH_TABLE"
if [ "$mode" = cargo ]; then
  cargo bench --bench kernels > "$out/bench.log" 2>&1
else
  "$bin/kernels-bench" --bench > "$out/bench.log" 2>&1
fi
if [ $? -eq 0 ] && [ -s "$LINATTN_BENCH_TABLE" ]; then
  row "kernel benches" "ok" "$(grep -c '^| [a-z_0-9]* | [A-Z0-9]' "$LINATTN_BENCH_TABLE") cases; table below (bench-table.md)"
elif grep -q 'benching nothing' "$out/bench.log"; then
  row "kernel benches" "none" "$(grep -m1 'benching nothing' "$out/bench.log" | cut -c1-90)"
else
  row "kernel benches" "FAIL" "see $out/bench.log"
fi

# 6. Peers at the same shapes, where installed: FLA from the carried wheels.
if ls "$bundle"/whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fla-site "$bundle"/whl/*.whl \
    > "$out/fla-install.log" 2>&1 && export PYTHONPATH=/tmp/fla-site${PYTHONPATH:+:$PYTHONPATH}
fi
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
except Exception as err:
    print("# FLA unavailable:", err)
    chunk_linear_attn = None
for b, t, h, d in shapes:
    q = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    qt = q.detach().transpose(1, 2)
    sd = bench(lambda: F.scaled_dot_product_attention(qt, qt, qt, is_causal=True))
    fl = flb = "n/a"
    if chunk_linear_attn is not None:
        # FLA applies no feature map (callers do); ours is fused in.
        fl = f"{bench(lambda: chunk_linear_attn(q.detach(), q.detach(), q.detach())):.3f}"
        def fwd_bwd():
            o, _ = chunk_linear_attn(q, q, q)
            o.backward(do)
        flb = f"{bench(fwd_bwd):.3f}"
    print(f"B{b}_T{t}_H{h}_D{d} sdpa {sd:.3f} ms fla {fl} ms fla_fwd_bwd {flb} ms")
PY
if [ $? -eq 0 ]; then
  grep -v '^#' "$out/peers.txt" | while read -r s _ sd _ _ fl _ _ flb _; do echo "$s|$sd|$fl|$flb"; done > "$out/peers.rows"
  while IFS='|' read -r s sd fl flb; do
    row "peers $s" "ms" "torch SDPA causal fwd $sd, FLA chunk_linear_attn fwd $fl, fwd+bwd $flb"
  done < "$out/peers.rows"
  grep -q '^#' "$out/peers.txt" && row "FLA" "missing" "$(grep -m1 '^#' "$out/peers.txt" | cut -c3-90)"
else
  row "peers (torch SDPA, FLA)" "skipped" "$(tail -n1 "$out/peers.txt")"
fi

{
  printf '| %-34s | %-10s | %s |\n|---|---|---|\n' "check" "result" "detail"
  printf '%s\n' "${table[@]}"
  if [ -s "$LINATTN_BENCH_TABLE" ]; then echo; cat "$LINATTN_BENCH_TABLE"; fi
} | tee "$out/table.md"
