#!/usr/bin/env bash
# One call on a machine with a GPU, sized for the lent GPU machines (at most
# 10 minutes a command, 15 minutes of device time in all, 8 files back):
#   1. environment: glibc, nvidia-smi, `linattn info` (what linattn sees)
#   2. every test binary on the GPU only (LINATTN_TEST_DEVICES=gpu); a
#      failing binary is rerun alone on its failing tests with
#      CUDA_LAUNCH_BLOCKING=1 LINATTN_SYNC_LAUNCHES=1 --test-threads=1.
#      A binary linked against CUDA libraries (candle-cuda: linattn-candle's
#      CUDA tests: cuBLAS, cuRAND, the CUDA runtime) gets torch's copies
#      (python3's site-packages/nvidia/*/lib, or LINATTN_GPU_CHECK_CUDA_LIBS
#      = dirs separated by ':') on LD_LIBRARY_PATH, for it alone; a library
#      still missing is a SKIPPED row naming it (NO GPU for libcuda.so.1)
#   3. device-to-device copy bandwidth (torch)
#   4. the kernel benches at the anchor shapes (benches/kernels.rs)
#   5. flash-linear-attention and torch SDPA at the same shapes
#   6. compute-sanitizer memcheck + racecheck on small cases, last (the
#      gVisor runtime refuses it: reported as skipped, not failed)
# --quick: steps 1-5 at the first anchor shape only, in under 3 minutes.
#
# Every step runs under `timeout` with a stated budget: full 370 s, quick
# 180 s in all; time a step leaves unused goes to the next ones, and no step
# eats into the budgets of those after it. LINATTN_GPU_CHECK_BUDGET_<STEP>=s
# overrides one (STEP: ENV UNPACK TESTS COPY BENCH PEERS SANITIZER).
#
# $OUT (default target/gpu-check) receives at most 4 files, each refreshed
# as the steps finish, so a run cut short still returns what it did:
#   table.md      one row per check, appended as each step finishes (the
#                 bench's own table follows the rows at the end)
#   bench.md      the bench's event-timed table (ms, GB/s, % of memory floor)
#   logs.tar.gz   every log so far (re-packed after each step)
#
# Two modes:
#   cargo:  the machine has cargo: build with nvcc (no spills allowed; its
#           own budget, before the clock starts), then run what cargo built.
#   bundle: no cargo (the lent GPU machines): run the executables that
#           scripts/gpu-bundle.sh built elsewhere into ./.gpu-bundle.
# Without a GPU the GPU steps say "NO GPU" and are skipped;
# LINATTN_GPU_CHECK_FORCE=1 runs them anyway (to dry-run this script).
# Usage: scripts/gpu-check.sh [--quick]
#        (LINATTN_GPU_CHECK_MODE=cargo|bundle forces a mode)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
quick=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument '$arg' (expected --quick)" >&2; exit 2 ;;
  esac
done
out=${OUT:-$root/target/gpu-check}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/linattn-gpu-check.XXXXXX")
logs=$work/logs
mkdir -p "$logs"
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
case $mode in cargo | bundle) ;; *) echo "gpu-check: LINATTN_GPU_CHECK_MODE=$mode: expected cargo or bundle" >&2; exit 2 ;; esac

# ---- the table, the log archive, the clock ----------------------------------
table=$out/table.md
rm -f "$table" "$out/bench.md" "$out/logs.tar.gz"
printf '| %-30s | %-8s | %s |\n|---|---|---|\n' "check" "result" "detail" > "$table"
failed=0
row() {
  local line
  line=$(printf '| %-30s | %-8s | %s |' "$1" "$2" "${3//|//}")
  printf '%s\n' "$line" >> "$table"
  printf '%s\n' "$line"
  case $2 in FAIL | TIMEOUT) failed=1 ;; esac
}
pack() {
  tar -C "$work" -czf "$out/logs.tar.gz.part" logs 2>/dev/null && mv -f "$out/logs.tar.gz.part" "$out/logs.tar.gz"
}
trap 'pack; rm -rf "$work"' EXIT
child=""
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; row "stopped" "TIMEOUT" "by a signal from outside, $(($(date +%s) - ${start:-0})) s in"; exit 143' TERM INT

steps=(unpack env tests copy bench peers sanitizer)
declare -A budget
if [ "$quick" = 1 ]; then
  budget=([env]=20 [unpack]=30 [tests]=80 [copy]=10 [bench]=20 [peers]=20 [sanitizer]=0)
else
  budget=([env]=20 [unpack]=30 [tests]=130 [copy]=15 [bench]=75 [peers]=60 [sanitizer]=40)
fi
total=0
for s in "${steps[@]}"; do
  v=LINATTN_GPU_CHECK_BUDGET_${s^^}
  if [ -n "${!v:-}" ]; then
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "gpu-check: $v=${!v}: expected whole seconds" >&2; exit 2; }
    budget[$s]=${!v}
  fi
  total=$((total + budget[$s]))
done

# Seconds step $1 may take: what is left of the run minus the budgets of
# the steps after it (so unused time flows forward, never backward).
allot() {
  local later=0 seen=0 s
  for s in "${steps[@]}"; do
    [ "$seen" = 1 ] && later=$((later + budget[$s]))
    [ "$s" = "$1" ] && seen=1
  done
  echo $((deadline - $(date +%s) - later))
}
# limited SECONDS LOG CMD...: runs CMD under timeout into LOG; the status is
# CMD's, 124 when the time ran out.
limited() {
  local t=$1 log=$2
  shift 2
  if [ "$t" -lt 1 ]; then echo "gpu-check: no time left" > "$log"; return 124; fi
  # In the background, so that a signal to this script is handled at once
  # (the trap stops the step) rather than when the step ends; stdin is
  # passed on explicitly (the heredocs).
  timeout -k 5 "$t" "$@" <&0 > "$log" 2>&1 &
  child=$!
  wait "$child"
  local rc=$?
  child=""
  [ "$rc" = 137 ] && rc=124
  return "$rc"
}

# ---- cargo mode: build first, outside the clock -----------------------------
if [ "$mode" = cargo ]; then
  if [ -z "${NVCC:-}" ]; then
    if command -v nvcc >/dev/null; then NVCC=$(command -v nvcc); else NVCC=$(scripts/install-nvcc.sh | tail -n1); fi
  fi
  export NVCC
  tb=${LINATTN_GPU_CHECK_BUDGET_BUILD:-1800}
  if limited "$tb" "$logs/build.log" bash -c '
      set -e
      LINATTN_DENY_SPILLS=1 cargo build --release -p linattn-kernels
      cargo build --release --bin linattn
      cargo test --release --no-run --message-format=json -p linattn -p linattn-kernels -p linattn-model \
        --features linattn-kernels/nccl > "$1"
      cargo bench --bench kernels --no-run --message-format=json --features linattn-kernels/nccl > "$2"' _ "$work/tests.json" "$work/bench.json"; then
    row "build (nvcc, no spills)" "ok" "$("$NVCC" --version | tail -n1); budget ${tb} s, outside the run's clock"
  else
    rc=$?
    [ "$rc" = 124 ] && row "build (nvcc, no spills)" "TIMEOUT" "after ${tb} s" ||
      row "build (nvcc, no spills)" "FAIL" "$(grep -m1 -E '^error' "$logs/build.log" | cut -c1-120) (build.log)"
    pack
    exit 1
  fi
  target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  bin=$work/bin
  mkdir -p "$bin/tests"
  # Executables from cargo's JSON messages, as gpu-bundle.sh lays them out.
  python3 - "$work/tests.json" "$work/bench.json" "$bin" <<'PY'
import json, os, sys
for src in sys.argv[1:3]:
    for line in open(src):
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") != "compiler-artifact" or not m.get("executable"):
            continue
        name, kind = m["target"]["name"], m["target"]["kind"][0]
        if kind == "bench":
            dest = os.path.join(sys.argv[3], "kernels-bench")
        elif kind in ("bin", "example"):
            continue
        else:
            dest = os.path.join(sys.argv[3], "tests", ("lib-" if kind == "lib" else "") + name)
        if not os.path.lexists(dest):
            os.symlink(m["executable"], dest)
PY
  ln -s "$target_dir/release/linattn" "$bin/linattn"
  export CRITERION_HOME=$target_dir/criterion
fi

start=$(date +%s)
deadline=$((start + total))
echo "gpu-check: mode $mode, $([ "$quick" = 1 ] && echo quick || echo full), budget $total s (${steps[*]}: $(for s in "${steps[@]}"; do printf '%s ' "${budget[$s]}"; done)s)"

# ---- bundle mode: unpack ----------------------------------------------------
if [ "$mode" = bundle ]; then
  t=$(allot unpack)
  t0=$(date +%s)
  bin=$bundle/bin
  if [ ! -d "$bin" ]; then
    bin=$work/bundle/bin
    mkdir -p "$work/bundle"
    # Python's lzma, in case the image has no xz.
    if ! limited "$t" "$logs/unpack.log" python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
         "$bundle/bin.tar.xz" "$work/bundle"; then
      row "unpack bundle" "FAIL" "$(tail -n1 "$logs/unpack.log" | cut -c1-100) (budget $t s)"
      pack
      exit 1
    fi
  fi
  # Tests find the CLI and the sources by the paths they were built under.
  built_root=$(awk '$1 == "repo_root" {print $2}' "$bundle/paths")
  built_target=$(awk '$1 == "target_dir" {print $2}' "$bundle/paths")
  if [ ! -e "$built_root" ]; then mkdir -p "$(dirname "$built_root")" && ln -s "$root" "$built_root"; fi
  if [ ! -e "$built_target/release/linattn" ]; then
    mkdir -p "$built_target/release" && cp "$bin/linattn" "$built_target/release/linattn"
  fi
  export CRITERION_HOME=$work/criterion
  row "unpack bundle" "ok" "$(ls "$bin/tests" | wc -l) test binaries, bench, CLI in $(($(date +%s) - t0)) s"
fi
# ---- 1. environment ---------------------------------------------------------
t=$(allot env)
step_end=$(($(date +%s) + t))
left() { echo $((step_end - $(date +%s))); }
limited "$(left)" "$logs/ldd.txt" ldd --version
glibc=$(head -n1 "$logs/ldd.txt" | grep -oE '[0-9]+\.[0-9]+$')
built_glibc=""
[ "$mode" = bundle ] && built_glibc=$(awk '$1 == "glibc" {print $2}' "$bundle/paths" 2>/dev/null)
row "glibc" "info" "${glibc:-unknown}${built_glibc:+ (bundle built against $built_glibc)}; mode $mode; $(git -C "$root" log -1 --format='%h %s' 2>/dev/null | cut -c1-50)"
smi=0
if ! command -v nvidia-smi > /dev/null; then
  row "GPU (nvidia-smi)" "NO GPU" "nvidia-smi not installed"
elif limited "$(left)" "$logs/nvidia-smi.txt" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; then
  smi=1
  row "GPU (nvidia-smi)" "info" "$(head -n1 "$logs/nvidia-smi.txt")"
else
  row "GPU (nvidia-smi)" "NO GPU" "$(head -n1 "$logs/nvidia-smi.txt" | cut -c1-100)"
fi
command -v nvidia-smi > /dev/null && limited "$(left)" "$logs/nvidia-smi-full.txt" nvidia-smi

limited "$(left)" "$logs/info.txt" "$bin/linattn" info
# The tests and benches cannot use the GPU when linattn cannot: say so. A
# GPU that nvidia-smi sees and linattn does not is a failure, and the GPU
# steps still run (the tests then fail with "GPU skipped: <why>").
run_gpu=$smi
why=$(grep -m1 -E '^driver: (not|present, (but|0))|^device code: not' "$logs/info.txt" | cut -c1-100)
if grep -q '^  \[0\] .* compute ' "$logs/info.txt" && [ -z "$why" ]; then
  run_gpu=1
  row "GPU seen by linattn" "ok" "$(grep -m1 '^  \[0\]' "$logs/info.txt" | cut -c7-90); $(grep -m1 '^device code' "$logs/info.txt" | cut -c1-60)"
elif [ "$smi" = 1 ]; then
  row "GPU seen by linattn" "FAIL" "nvidia-smi sees a GPU, linattn does not: ${why:-see info.txt}"
else
  row "GPU seen by linattn" "NO GPU" "${why:-see info.txt}"
fi
[ "${LINATTN_GPU_CHECK_FORCE:-0}" = 1 ] && run_gpu=1
pack

# The folders of the CUDA libraries torch's wheels installed (nvidia-cublas
# and the like put them under site-packages/nvidia/<name>/lib), for the test
# binaries that link them; LINATTN_GPU_CHECK_CUDA_LIBS overrides.
cuda_lib_dirs() {
  if [ -n "${LINATTN_GPU_CHECK_CUDA_LIBS+set}" ]; then
    echo "$LINATTN_GPU_CHECK_CUDA_LIBS"
    return
  fi
  python3 - 2> /dev/null <<'PY'
import glob, os, site
roots = []
try:
    import nvidia  # the namespace package of NVIDIA's wheels
    roots = list(nvidia.__path__)
except ImportError:
    pass
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    roots.append(os.path.join(sp, "nvidia"))
seen = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        d = os.path.realpath(d)
        if d not in seen:
            seen.append(d)
print(":".join(seen))
PY
}
# needs_libs EXE: sets exe_env to what EXE needs on LD_LIBRARY_PATH (empty
# when it starts as it is) and missing to the libraries nothing provides.
needs_libs() {
  exe_env=""
  missing=""
  command -v ldd > /dev/null || return 0
  ldd "$1" 2> /dev/null | grep -q 'not found' || return 0
  [ -n "${cuda_libs+set}" ] || cuda_libs=$(cuda_lib_dirs)
  exe_env=$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  missing=$(LD_LIBRARY_PATH=$exe_env ldd "$1" 2> /dev/null | awk '$2 == "=>" && $3 == "not" {print $1}' | sort -u | tr '\n' ' ')
  missing=${missing% }
}

# ---- 2. tests on the GPU ----------------------------------------------------
# Every binary that can reach a GPU, on the GPU only (tests/common: the
# emulator is CI's job). A failing binary is rerun alone, on its failing
# tests (all of it when it crashed), with launches synchronised so the
# error names the kernel.
t=$(allot tests)
step_end=$(($(date +%s) + t))
if [ "$run_gpu" = 0 ]; then
  row "tests" "skipped" "NO GPU"
else
  export LINATTN_TEST_DEVICES=gpu
  # The project's own binaries first; candle's last, so that a step cut
  # short leaves the kernels' rows complete.
  exes=()
  for exe in "$bin"/tests/*; do [ "$(basename "$exe")" = candle-cuda ] || exes+=("$exe"); done
  [ -e "$bin/tests/candle-cuda" ] && exes+=("$bin/tests/candle-cuda")
  for exe in "${exes[@]}"; do
    name=$(basename "$exe")
    log=$logs/test-$name.log
    tl=$(left)
    if [ "$tl" -lt 1 ]; then row "test $name" "TIMEOUT" "not run: the step's ${t} s were used up"; continue; fi
    needs_libs "$exe"
    if [ -n "$missing" ]; then
      others=$(tr ' ' '\n' <<< "$missing" | grep -v '^libcuda\.so' | tr '\n' ' ')
      others=${others% }
      where="looked in ${cuda_libs:-no nvidia/*/lib folder from python3}"
      if [ -n "$others" ]; then
        row "test $name" "SKIPPED" "${others// /, } not found ($where)"
      else
        row "test $name" "NO GPU" "libcuda.so.1 not found: no CUDA driver"
      fi
      { echo "missing: $missing"; echo "$where"; LD_LIBRARY_PATH=$exe_env ldd "$exe"; } > "$log" 2>&1
      continue
    fi
    t0=$(date +%s)
    limited "$tl" "$log" env ${exe_env:+LD_LIBRARY_PATH="$exe_env"} "$exe"
    rc=$?
    secs=$(($(date +%s) - t0))
    pack
    summary=$(grep -E '^test result:' "$log" | tail -n1 |
      sed -E 's/^test result: [A-Za-z]+\. //; s/; 0 (ignored|measured|filtered out)//g; s/; finished in .*//')
    if [ "$rc" = 0 ]; then
      row "test $name" "ok" "$summary (${secs} s)"
      continue
    fi
    if [ "$rc" = 124 ]; then
      row "test $name" "TIMEOUT" "after ${tl} s (the step's budget: ${t} s)"
      continue
    fi
    grep -q "GPU skipped" "$log" && gpu_note=", GPU skipped" || gpu_note=""
    mapfile -t names < <(sed -nE 's/^test (.*) \.\.\. FAILED$/\1/p' "$log")
    row "test $name" "FAIL" "${summary:-crashed (status $rc)}${gpu_note}: ${names[*]:0:4} (${secs} s)"
    rlog=$logs/test-$name.rerun.log
    tl=$(left)
    if [ "${#names[@]}" -gt 0 ]; then
      limited "$tl" "$rlog" env ${exe_env:+LD_LIBRARY_PATH="$exe_env"} CUDA_LAUNCH_BLOCKING=1 LINATTN_SYNC_LAUNCHES=1 \
        "$exe" --test-threads=1 --exact "${names[@]}"
    else
      limited "$tl" "$rlog" env ${exe_env:+LD_LIBRARY_PATH="$exe_env"} CUDA_LAUNCH_BLOCKING=1 LINATTN_SYNC_LAUNCHES=1 \
        "$exe" --test-threads=1
    fi
    rc=$?
    if [ "$rc" = 0 ]; then
      row "  rerun alone, sync launches" "ok" "passes alone: a race or an interaction between tests"
    elif [ "$rc" = 124 ]; then
      row "  rerun alone, sync launches" "TIMEOUT" "after ${tl} s"
    else
      why=$(grep -m1 -A1 'panicked at' "$rlog" | tail -n1 | cut -c1-140)
      row "  rerun alone, sync launches" "FAIL" "${why:-status $rc} (test-$name.rerun.log)"
    fi
  done
  unset LINATTN_TEST_DEVICES
fi
pack

# ---- 3. copy bandwidth ------------------------------------------------------
t=$(allot copy)
if [ "$run_gpu" = 0 ]; then
  row "D2D copy bandwidth (torch)" "skipped" "NO GPU"
else
  limited "$t" "$logs/copy.log" python3 - <<'PY'
import torch
x = torch.empty(1 << 29, dtype=torch.int16, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
print(f"{2 * x.numel() * 2 * 20 / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s (read + write, 1 GiB)")
PY
  case $? in
    0) row "D2D copy bandwidth (torch)" "ok" "$(tail -n1 "$logs/copy.log")" ;;
    124) row "D2D copy bandwidth (torch)" "TIMEOUT" "after $t s" ;;
    *) row "D2D copy bandwidth (torch)" "FAIL" "$(tail -n1 "$logs/copy.log" | cut -c1-100)" ;;
  esac
fi
pack

# ---- 4. kernel benches ------------------------------------------------------
# Criterion's log, and the bench's own event-timed table (ms, GB/s, % of the
# memory floor at the copy bandwidth it measures).
t=$(allot bench)
if [ "$run_gpu" = 0 ]; then
  row "kernel benches" "skipped" "NO GPU"
else
  export LINATTN_BENCH_TABLE=$work/bench.md
  [ "$quick" = 1 ] && export LINATTN_BENCH_ANCHORS=1
  limited "$t" "$logs/bench.log" "$bin/kernels-bench" --bench --noplot
  rc=$?
  shapes=$([ "$quick" = 1 ] && echo "first anchor shape" || echo "anchor shapes, N sweep, decode, feature map")
  if [ "$rc" = 0 ] && [ -s "$LINATTN_BENCH_TABLE" ]; then
    cp "$LINATTN_BENCH_TABLE" "$out/bench.md"
    row "kernel benches" "ok" "$(grep -c '^| [a-z_0-9]* | [A-Z0-9]' "$LINATTN_BENCH_TABLE") cases ($shapes); table at the end and in bench.md"
  elif [ "$rc" = 124 ]; then
    row "kernel benches" "TIMEOUT" "after $t s; last: $(grep -E '^[a-z_0-9]+/' "$logs/bench.log" | tail -n1 | cut -c1-60)"
  elif grep -q 'benching nothing' "$logs/bench.log"; then
    row "kernel benches" "FAIL" "$(grep -m1 'benching nothing' "$logs/bench.log" | cut -c1-100)"
  else
    row "kernel benches" "FAIL" "status $rc: $(grep -m1 -A1 'panicked at' "$logs/bench.log" | tail -n1 | cut -c1-100)"
  fi
  unset LINATTN_BENCH_TABLE LINATTN_BENCH_ANCHORS
fi
pack

# ---- 5. peers at the same shapes --------------------------------------------
# torch SDPA (causal, forward) and flash-linear-attention's chunked linear
# attention (forward, forward + backward), bf16, from the carried wheels.
t=$(allot peers)
step_end=$(($(date +%s) + t))
if [ "$run_gpu" = 0 ]; then
  row "peers (torch SDPA, FLA)" "skipped" "NO GPU"
else
  if ls "$bundle"/whl/*.whl > /dev/null 2>&1; then
    limited "$(left)" "$logs/fla-install.log" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$work/fla-site" "$bundle"/whl/*.whl && export PYTHONPATH=$work/fla-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  peer_shapes="1,8192,96,128 2,16384,16,128 4,2048,16,128 4,4096,64,128 8,2048,32,256 8,1024,8,64"
  [ "$quick" = 1 ] && peer_shapes=${peer_shapes%% *}
  tl=$(left)
  # shellcheck disable=SC2086
  limited "$tl" "$logs/peers.log" python3 -u - $peer_shapes <<'PY'
import sys, torch, torch.nn.functional as F
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
for arg in sys.argv[1:]:
    b, t, h, d = map(int, arg.split(","))
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
  rc=$?
  while read -r s _ sd _ _ fl _ _ flb _; do
    row "peers $s" "ms" "torch SDPA causal fwd $sd; FLA chunk_linear_attn fwd $fl, fwd+bwd $flb"
  done < <(grep -E '^B[0-9]+_T' "$logs/peers.log")
  grep -q '^# FLA' "$logs/peers.log" && row "FLA" "missing" "$(grep -m1 '^# FLA' "$logs/peers.log" | cut -c3-100)"
  if [ "$rc" = 124 ]; then
    row "peers (torch SDPA, FLA)" "TIMEOUT" "after $tl s (the rows above are the shapes it finished)"
  elif [ "$rc" != 0 ]; then
    row "peers (torch SDPA, FLA)" "FAIL" "$(tail -n1 "$logs/peers.log" | cut -c1-100)"
  fi
fi
pack

# ---- 6. compute-sanitizer, last ---------------------------------------------
# Small cases of every kernel family: forward walk and split, the
# backward's whole-head and tiled walks, decode; memcheck, then racecheck.
if [ "$quick" = 0 ]; then
  t=$(allot sanitizer)
  step_end=$(($(date +%s) + t))
  san=$(command -v compute-sanitizer ||
        ls /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer \
           /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -n1)
  if [ -z "$san" ]; then
    row "compute-sanitizer" "skipped" "not installed"
  elif [ "$run_gpu" = 0 ]; then
    row "compute-sanitizer" "skipped" "NO GPU"
  else
    export LINATTN_TEST_DEVICES=gpu
    refused=0
    for tool in memcheck racecheck; do
      for spec in "forward split_and_resume deterministic" \
                  "backward whole_head_walks multi_tile_heads" \
                  "decode decode_matches_reference"; do
        read -r name filters <<< "$spec"
        log=$logs/san-$tool-$name.log
        if [ "$refused" = 1 ]; then continue; fi
        tl=$(left)
        if [ "$tl" -lt 1 ]; then row "compute-sanitizer $tool $name" "TIMEOUT" "not run: the step's $t s were used up"; continue; fi
        # shellcheck disable=SC2086
        limited "$tl" "$log" "$san" --tool "$tool" --error-exitcode 1 "$bin/tests/$name" $filters
        rc=$?
        if grep -qE 'Device not supported|error 999|CUDA_ERROR_UNKNOWN' "$log"; then
          refused=1
          row "compute-sanitizer" "skipped" "runtime refuses it: $(grep -m1 -E 'Device not supported|error 999|CUDA_ERROR_UNKNOWN' "$log" | cut -c1-90)"
        elif [ "$rc" = 0 ]; then
          row "compute-sanitizer $tool $name" "ok" "$filters"
        elif [ "$rc" = 124 ]; then
          row "compute-sanitizer $tool $name" "TIMEOUT" "after $tl s"
        else
          row "compute-sanitizer $tool $name" "FAIL" "$(grep -m1 -E '^========= [A-Z]' "$log" | cut -c1-100) (san-$tool-$name.log)"
        fi
      done
    done
    unset LINATTN_TEST_DEVICES
  fi
fi

row "total" "$([ "$failed" = 0 ] && echo ok || echo FAIL)" "$(($(date +%s) - start)) s of the $total s budget"
if [ -s "$out/bench.md" ]; then
  { echo; cat "$out/bench.md"; } >> "$table"
fi
pack
echo
cat "$table"
exit "$failed"
