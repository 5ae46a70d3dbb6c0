#!/usr/bin/env bash
# Installs nvcc (and cuobjdump) from PyPI into ./.venv-nvcc, for machines
# without a CUDA toolkit. The set is pinned so that its PTX (ISA 9.0) loads
# on CUDA 13.0 drivers: pinning nvcc alone pulls a newer nvvm whose PTX the
# 13.0 ptxas rejects. Prints the nvcc path on its last line.
# linattn-kernels' build.rs finds ./.venv-nvcc by itself; or export NVCC.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-nvcc"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-cuobjdump==13.5.37
)
nvcc_path() { ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n1; }
stamp="$venv/.linattn-pins"
if [ -x "$(nvcc_path)" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${pins[*]}" ]; then
  nvcc_path
  exit 0
fi
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
echo "${pins[*]}" > "$stamp"
nvcc_path
