# Sourced by the examples: use an installed megatron-llama, or install it into a virtualenv
# of the repository's own (.venv-quickstart), never into the active Python.
if ! { megatron-llama info --presets-only && python3 -c "import megatron.core"; } >/dev/null 2>&1
then
    if [ ! -x .venv-quickstart/bin/python ]; then
        echo "creating the virtualenv .venv-quickstart (delete it to start over)"
        python3 -m venv .venv-quickstart
    fi
    . .venv-quickstart/bin/activate
    if ! python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1; then
            pip install torch==2.13.0        # the CUDA build
        else                                 # CPU host: PyTorch's CPU wheel, no CUDA download
            pip install --retries 0 torch==2.13.0 \
                --extra-index-url https://download.pytorch.org/whl/cpu
        fi
    fi
    [ -x .venv-quickstart/bin/megatron-llama ] || pip install -e ".[plot]"
fi
export WANDB_MODE=${WANDB_MODE:-offline}
