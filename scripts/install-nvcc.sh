#!/usr/bin/env bash
# Installs nvcc (and cuobjdump) from PyPI into ./.venv-nvcc, for machines
# without a CUDA toolkit. The set is pinned so that its PTX (ISA 9.0) loads
# on CUDA 13.0 drivers: pinning nvcc alone pulls a newer nvvm whose PTX the
# 13.0 ptxas rejects. Prints the nvcc path on its last line.
# linattn-kernels' build.rs finds ./.venv-nvcc by itself; or export NVCC.
#
# --with-libs also installs the CUDA 13 libraries that candle's CUDA backend
# links (cuBLAS, cuBLASLt, cuRAND, NVRTC: cudarc's `dynamic-linking`, which
# candle turns on), into the same venv, and makes a folder the linker can
# search (`<venv>/link`: unversioned names for them, and a libcuda.so stub
# with the driver API's symbols, since no wheel ships libcuda; the stub is
# named libcuda.so only, so no program ever loads it at run time), and
# libcudart (from the nvcc set: candle's GGUF kernels link it). Only
# scripts/gpu-bundle.sh needs them (to link the candle CUDA test binary):
# CI's `cargo check` links nothing, so it does not ask for them (the wheels
# are ~0.8 GB). Prints the link folder on the line before the nvcc path.
# The pins are CUDA 13.0's: a binary linked against them runs with any
# newer 13.x (same sonames; torch's cu130 wheels on the GPU machine).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-nvcc"
with_libs=0
for arg in "$@"; do
  case $arg in
    --with-libs) with_libs=1 ;;
    *) echo "install-nvcc: unknown argument '$arg' (expected --with-libs)" >&2; exit 2 ;;
  esac
done
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-cuobjdump==13.5.37
)
lib_pins=(
  nvidia-cublas==13.0.0.19
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)
nvcc_path() { ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n1; }
stamp="$venv/.linattn-pins"
if ! [ -x "$(nvcc_path)" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
  echo "${pins[*]}" > "$stamp"
fi

if [ "$with_libs" = 1 ]; then
  link="$venv/link"
  lib_stamp="$venv/.linattn-lib-pins"
  lib=$(dirname "$(nvcc_path)")/../lib
  lib=$(cd "$lib" && pwd)
  if [ "$(cat "$lib_stamp" 2>/dev/null)" != "${lib_pins[*]}" ]; then
    # --no-deps: these wheels need nothing else, and the nvcc set above
    # stays exactly as pinned.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "${lib_pins[@]}" >&2
    echo "${lib_pins[*]}" > "$lib_stamp"
  fi
  # Rebuilt every time (a second): the set may change with candle.
  # libcudart: candle's GGUF kernels (an nvcc-built static library) call
  # the runtime; it comes with the nvcc set (nvidia-cuda-runtime).
  rm -rf "$link"
  mkdir -p "$link"
  for so in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
    [ -e "$lib/$so" ] || { echo "install-nvcc: $so is not in $lib after installing ${lib_pins[*]}" >&2; exit 1; }
    ln -s "$lib/$so" "$link/${so%.so.*}.so"
    ln -s "$lib/$so" "$link/$so"
  done
  # The driver API's entry points, as cudarc declares them (every CUDA
  # version's; a superset of what a binary references). Each stub is a
  # function that is never called: only the names matter to the linker,
  # and the soname makes the binary ask for the real libcuda.so.1.
  cudarc_src=$(cargo metadata --format-version 1 --manifest-path "$root/Cargo.toml" 2>/dev/null |
    python3 -c 'import json, sys, os
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.dirname(p["manifest_path"]))
        break')
  [ -f "$cudarc_src/src/driver/sys/mod.rs" ] || { echo "install-nvcc: cudarc's sources not found (cargo metadata)" >&2; exit 1; }
  grep -oE '^\s*(pub )?fn cu[A-Za-z0-9_]+\(' "$cudarc_src/src/driver/sys/mod.rs" |
    sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u > "$link/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/libcuda-stub.c"
  echo "$link"
fi
nvcc_path
