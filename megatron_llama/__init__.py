"""megatron_llama: train LLaMA the way the paper did, as a thin plugin on megatron-core.

The folders name the stages (README, "How it is built"); imports only go to lower stages.
"""
