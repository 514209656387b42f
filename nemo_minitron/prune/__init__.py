"""Pruning: activation importance (importance.py), keep-index plans (plan.py), trimming of weights
(trim.py), the width-pruning entry points over megatron modules (width.py), and the NeMo callback
(callbacks.py)."""
