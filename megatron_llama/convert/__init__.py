"""Checkpoint conversion, hub and spoke: every format is read into and written from full
tensors under Meta's names (`model.canonical`), one layer at a time."""
