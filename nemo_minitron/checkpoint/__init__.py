"""Checkpoint I/O: Hugging Face <-> megatron state dicts, and NeMo 2 checkpoints (context/ + weights/)."""
