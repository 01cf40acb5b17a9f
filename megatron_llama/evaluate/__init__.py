"""Evaluation: the lm-evaluation-harness backend, the paper's scoring, the built-in suite."""
