"""NeMo/Lightning data module over Megatron indexed datasets: fixed-length token windows.

Batches are NeMo's GPT batch dicts (``tokens``, ``labels``, ``loss_mask``, ``position_ids`` and, without
Transformer Engine, an explicit causal ``attention_mask``), and batching goes through NeMo's
``MegatronDataSampler`` (micro/global batch sizes, consumed-samples resume).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from nemo_minitron import platform
from nemo_minitron.data import indexed


class WindowDataset(Dataset):
    def __init__(self, windows: torch.Tensor, with_mask: bool):
        self.windows, self.with_mask = windows, with_mask
        L = windows.shape[1] - 1
        self.mask = torch.triu(torch.ones(1, L, L, dtype=torch.bool), diagonal=1) if with_mask else None
        self.pos = torch.arange(L)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        w = self.windows[i]
        item = {"tokens": w[:-1], "labels": w[1:], "loss_mask": torch.ones(len(w) - 1), "position_ids": self.pos}
        if self.with_mask:
            item["attention_mask"] = self.mask
        return item


class TokenWindowDataModule(pl.LightningDataModule):
    """Train/validation windows of ``seq_length + 1`` tokens from indexed datasets."""

    def __init__(self, train: str, seq_length: int, micro_batch_size: int, global_batch_size: int,
                 num_train_samples: int, validation: str | None = None, num_val_samples: int = 0):
        super().__init__()
        from nemo.lightning.pytorch.plugins import MegatronDataSampler

        self.train_prefix, self.val_prefix = train, validation
        self.seq_length, self.num_train, self.num_val = seq_length, num_train_samples, num_val_samples
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.data_sampler = MegatronDataSampler(seq_len=seq_length, micro_batch_size=micro_batch_size,
                                                global_batch_size=global_batch_size)

    def setup(self, stage: str = "") -> None:
        mask = not platform.has_transformer_engine()
        self._train = WindowDataset(indexed.windows(self.train_prefix, self.num_train, self.seq_length), mask)
        if self.val_prefix and self.num_val:
            self._val = WindowDataset(indexed.windows(self.val_prefix, self.num_val, self.seq_length), mask)

    def train_dataloader(self):
        return DataLoader(self._train, num_workers=0, collate_fn=_collate)

    def val_dataloader(self):
        return DataLoader(self._val, num_workers=0, collate_fn=_collate) if hasattr(self, "_val") else []


def _collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
