"""Data: text/jsonl -> Megatron indexed datasets, tokenizers, and fixed-length token windows."""
