"""NeMo/Lightning data module over Megatron indexed datasets: fixed-length token windows.

Batches are NeMo's GPT batch dicts (``tokens``, ``labels``, ``loss_mask``, ``position_ids`` and, without
Transformer Engine, an explicit causal ``attention_mask``), and batching goes through NeMo's
``MegatronDataSampler`` (micro/global batch sizes, consumed-samples resume).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from nemo.lightning.data import WrappedDataLoader
from torch.utils.data import Dataset

from nemo_minitron import platform
from nemo_minitron.data import indexed


class WindowDataset(Dataset):
    def __init__(self, windows: torch.Tensor, with_mask: bool, length: int | None = None):
        self.windows, self.with_mask = windows, with_mask
        self.length = length or len(windows)  # longer than the data: later epochs repeat it
        L = windows.shape[1] - 1
        self.mask = torch.triu(torch.ones(1, L, L, dtype=torch.bool), diagonal=1) if with_mask else None
        self.pos = torch.arange(L)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        w = self.windows[i % len(self.windows)]
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
        have = available_windows(self.train_prefix, self.seq_length)
        train = indexed.windows(self.train_prefix, min(have, self.num_train), self.seq_length)
        self._train = WindowDataset(train, mask, length=self.num_train)
        if self.val_prefix and self.num_val:
            self._val = WindowDataset(indexed.windows(self.val_prefix, self.num_val, self.seq_length), mask)

    def train_dataloader(self):
        self.init_global_step = self.trainer.global_step if self.trainer is not None else 0
        self.data_sampler.init_global_step = self.init_global_step
        return WrappedDataLoader(mode="train", dataset=self._train, num_workers=0, collate_fn=_collate)

    # resume: the position in the data travels with NeMo's trainer checkpoint (as NeMo's GPT data modules)
    def state_dict(self):
        step = self.trainer.global_step - getattr(self, "init_global_step", 0)
        return {"consumed_samples": self.data_sampler.compute_consumed_samples(step)}

    def load_state_dict(self, state_dict) -> None:
        from megatron.core.num_microbatches_calculator import update_num_microbatches

        consumed = state_dict["consumed_samples"]
        self.data_sampler.init_consumed_samples = consumed
        self.data_sampler.prev_consumed_samples = consumed
        update_num_microbatches(consumed_samples=consumed, consistency_check=False)
        self.data_sampler.if_first_step = 1

    def val_dataloader(self):
        if not hasattr(self, "_val"):
            return []
        return WrappedDataLoader(mode="validation", dataset=self._val, num_workers=0, collate_fn=_collate)


def available_windows(prefix, seq_length: int) -> int:
    """How many non-overlapping windows of ``seq_length + 1`` tokens the dataset holds."""
    return max(0, (len(indexed.token_stream(prefix)) - 1) // seq_length)


def _collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
