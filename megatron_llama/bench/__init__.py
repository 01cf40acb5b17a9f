"""Measuring and planning: the training benchmark (tokens/s/GPU, MFU, memory), its report, the
CPU GEMM ceiling, the comparison with transformers, and the cluster planner."""
