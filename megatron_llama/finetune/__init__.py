"""Instruction fine-tuning: recipes, the run (full or LoRA) and its command."""
