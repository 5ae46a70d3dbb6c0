#!/usr/bin/env bash
# Builds, on a machine with cargo (and nvcc, or the PyPI one this installs),
# everything scripts/gpu-check.sh needs on a GPU machine that has neither
# cargo nor a network, into ./.gpu-bundle (ignored by git; carry it there):
#   bin.tar.xz         the executables below; they share most of their bytes
#                      (embedded fatbins, the emulator), so xz with a window
#                      larger than one of them packs ~370 MB into ~5.7 MB
#                      (preset 6: 4-9 minutes on 2 busy cores; 9e took
#                      ~12); with candle-cuda (80 MB stripped, much of it
#                      candle's PTX) ~570 MB into 12.2 MB
#   bin/tests/<name>   release test executables that can reach a GPU
#                      (fatbins embedded, debug info stripped)
#   bin/tests/candle-cuda  linattn-candle's CUDA tests (tests/cuda.rs, the
#                      `cuda` feature, test profile): candle links cuBLAS,
#                      cuRAND, cudart and libcuda dynamically, so this one
#                      needs them to start; they are not carried (~0.8 GB):
#                      gpu-check.sh finds torch's copies (nvidia/*/lib)
#   bin/kernels-bench  the criterion kernels bench
#   bin/linattn        the CLI (`info` prints the embedded ptxas report)
#   whl/               flash-linear-attention + fla-core wheels (the peer)
#   paths              repo root and target dir the executables were built
#                      under (tests find the CLI and sources by those paths;
#                      gpu-check.sh links them to the carried copies), and
#                      the glibc they were linked against (the GPU machine's
#                      must be the same or newer; gpu-check.sh prints both)
# Usage: scripts/gpu-bundle.sh   (then carry `.gpu-bundle`, run gpu-check.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ -z "${NVCC:-}" ]; then
  if command -v nvcc >/dev/null; then NVCC=$(command -v nvcc); else NVCC=$(scripts/install-nvcc.sh | tail -n1); fi
fi
# The libraries candle's CUDA backend links (cuBLAS, cuRAND, NVRTC from
# PyPI, cudart, a libcuda stub), for the linker only: LIBRARY_PATH, set for the
# candle build alone (it is not part of cargo's fingerprints, so nothing
# else rebuilds).
cuda_link=$(scripts/install-nvcc.sh --with-libs | tail -n2 | head -n1)
# One environment for every build below, the one .ci/run's candle step
# uses: candle's build finds nvcc on PATH and takes the compute capability
# from CUDA_COMPUTE_CAP instead of asking nvidia-smi. 80: candle's kernels
# are PTX for compute_80, which the driver JIT-compiles for any newer GPU
# (the lent H200 is sm_90); its GGUF matmul objects are sm_80 SASS, which
# the tests never launch.
cuda_root=$(cd "$(dirname "$NVCC")/.." && pwd)
export NVCC LINATTN_DENY_SPILLS=1 PATH="$(dirname "$NVCC"):$PATH" CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" \
  CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
out=.gpu-bundle
rm -rf "$out"
mkdir -p "$out/bin/tests" "$out/whl"

# Executables from cargo's JSON messages: (target name, path) per test binary.
artifacts() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind = m["target"]["kind"][0]
    if m["profile"]["test"] or kind == "bench":
        print(m["target"]["name"], kind, m["executable"])
'
}

# The packages whose tests can run on a GPU (the reference and the emulator
# crates never touch one; CI runs them everywhere). With the `nccl` feature
# (crates/kernels/tests/nccl.rs): cudarc loads libnccl at run time, so
# nothing here links NCCL and the test skips where the library is missing.
cargo test --release --no-run --message-format=json -p linattn -p linattn-kernels -p linattn-model \
  --features linattn-kernels/nccl 2> "$out/build.log" | artifacts > "$out/tests.txt"
while read -r name kind path; do
  dest="$out/bin/tests/$name"
  [ "$kind" = lib ] && dest="$out/bin/tests/lib-$name"
  # Not run on the GPU: the CLI binary's unit tests, and examples (no harness).
  [ "$kind" = bin ] || [ "$kind" = example ] && continue
  cp "$path" "$dest"
done < "$out/tests.txt"
# linattn-candle's CUDA tests: candle turns cudarc's dynamic linking on for
# this build (see docs/candle.md), so it is a cargo call of its own, in the
# target folder of .ci/run's candle step (it shares candle's kernels, whose
# nvcc build takes the longest), in the test profile: candle's GGUF kernels
# alone take ~30 min of nvcc per profile on 2 cores, and these tests time
# no kernel.
candle_target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/candle-cuda
LIBRARY_PATH="$cuda_link${LIBRARY_PATH:+:$LIBRARY_PATH}" CARGO_TARGET_DIR="$candle_target" \
  cargo test --no-run --message-format=json -p linattn-candle --features cuda --test cuda \
  2>> "$out/build.log" | artifacts > "$out/candle.txt"
read -r _ _ path < "$out/candle.txt"
cp "$path" "$out/bin/tests/candle-cuda"
needed=$(readelf -d "$out/bin/tests/candle-cuda" | sed -nE 's/.*\(NEEDED\).*\[(.*)\]/\1/p' | tr '\n' ' ')
echo "gpu-bundle: candle-cuda needs $needed" >&2
cargo bench --bench kernels --no-run --message-format=json --features linattn-kernels/nccl \
  2>> "$out/build.log" | artifacts |
  while read -r _ kind path; do [ "$kind" = bench ] && cp "$path" "$out/bin/kernels-bench"; done
cargo build --release --bin linattn 2>> "$out/build.log"
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$target_dir/release/linattn" "$out/bin/linattn"
strip --strip-debug "$out"/bin/tests/* "$out/bin/kernels-bench" "$out/bin/linattn"
printf 'repo_root %s\ntarget_dir %s\nglibc %s\ncandle_needs %s\n' "$root" "$target_dir" \
  "$(ldd --version | head -n1 | grep -oE '[0-9]+\.[0-9]+$')" "$needed" > "$out/paths"
tar -C "$out" -cf - bin | xz -6 -T1 --lzma2=preset=6,dict=192MiB > "$out/bin.tar.xz"
rm -rf "$out/bin"

# The peer: flash-linear-attention is pure Python on Triton; torch, triton,
# transformers and einops are already in the GPU image.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d "$out/whl" \
  flash-linear-attention==0.6.0 fla-core==0.6.0 || echo "gpu-bundle: no FLA wheels (offline?); the peer column will say so" >&2

du -sh "$out" "$out/bin.tar.xz" "$out/whl" >&2
size=$(du -sm "$out" | cut -f1)
if [ "$size" -gt 60 ]; then
  echo "gpu-bundle: $size MiB is over what the device tool carries (64 MiB with the tree)" >&2
  exit 1
fi
echo "$out"
