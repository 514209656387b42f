"""The training data module: megatron-core's GPT datasets through NeMo's ``PreTrainingDataModule``.

Every training path (``distill``, ``finetune``, teacher correction, the search's finalists, the pipeline)
reads through :class:`GPTDataModule`, which is NeMo's own pre-training data module (the one NeMo's
pre-training and distillation recipes use) given our :class:`~nemo_minitron.data.blend.DataSettings`:

- ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig`` + ``GPTDataset``: the ``.bin`` files are
  memory-mapped, samples of ``seq_length + 1`` tokens run across document boundaries (as Megatron-LM),
  the document order is shuffled per epoch and the samples shuffled, all by ``data.seed``; the indices are
  built once (rank 0 builds, the other ranks wait and read them) and cached in ``data.index_cache_dir``.
  Memory does not grow with the data (``bench/data_scale.py``).
- a weighted blend draws each component's share of every stretch of samples (``BlendedDataset``).
- NeMo's ``MegatronDataSampler``: each data-parallel rank reads its own slice of every global batch; the
  consumed-samples count travels with the trainer checkpoint, so a resumed run reads exactly the samples
  the uninterrupted run would have read next.

Calibration and held-out evaluation do not use this module: they keep deterministic consecutive windows
(:func:`nemo_minitron.data.indexed.windows`), so their numbers stay comparable over time.

``NEMO_MINITRON_TRACE_BATCHES=DIR`` makes every rank append the token ids of each micro-batch it reads to
``DIR/rank<R>.jsonl`` (step, mode, data-parallel rank): how the tests prove which samples a run read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule

from nemo_minitron import platform
from nemo_minitron.data.blend import DataSettings

TRACE_ENV = "NEMO_MINITRON_TRACE_BATCHES"


class TokenIds:
    """The tokenizer megatron-core's ``GPTDataset`` asks for, when the data is token ids already: no
    padding id (its default applies), no end-of-document id (only needed by ``reset_*`` / ``eod_mask_loss``,
    which stay off as in Megatron-LM's defaults)."""

    unique_identifiers = {"class": "nemo_minitron.TokenIds"}
    eod = None


class GPTDataModule(PreTrainingDataModule):
    """NeMo's ``PreTrainingDataModule`` built from :class:`DataSettings` (blends per split, index cache)."""

    def __init__(self, settings: DataSettings, cache_dir: Path):
        super().__init__(
            paths=list(settings.train.prefixes), seq_length=settings.seq_length, tokenizer=TokenIds(),
            micro_batch_size=settings.micro_batch_size, global_batch_size=settings.global_batch_size,
            num_workers=settings.num_workers, pin_memory=platform.has_cuda(),
            persistent_workers=settings.num_workers > 0, seed=settings.seed,
            create_attention_mask=not platform.has_transformer_engine(),
            index_mapping_dir=str(cache_dir), output_log=False)
        self.settings = settings
        if settings.validation is not None:
            self.build_kwargs = {"blend_per_split": [settings.train.megatron(), settings.validation.megatron(), None]}
        else:
            self.build_kwargs = {"blend": settings.train.megatron(), "split": settings.split or "1,0,0"}
        self.build_kwargs["mmap_bin_files"] = True

    def build(self, trainer_max_steps: int, trainer_val_check_interval: int, trainer_limit_val_batches,
              trainer_limit_test_batches=0):
        Path(self.index_mapping_dir).mkdir(parents=True, exist_ok=True)
        super().build(trainer_max_steps, trainer_val_check_interval, trainer_limit_val_batches,
                      trainer_limit_test_batches)

    def setup(self, stage: str = "") -> None:
        if getattr(self, "_train_ds", None) is None:
            super().setup(stage)

    def _create_dataloader(self, dataset, mode, **kwargs):
        if self.trainer is None:  # outside a trainer (tests, benches): the loader at step 0
            from nemo.lightning.data import WrappedDataLoader
            from torch.utils import data

            return WrappedDataLoader(mode=mode, dataset=dataset, num_workers=self.num_workers,
                                     collate_fn=data.dataloader.default_collate, **kwargs)
        return super()._create_dataloader(dataset, mode, **kwargs)

    def val_dataloader(self):
        return [] if self._validation_ds is None else super().val_dataloader()


def trace_batch(batch: dict, training: bool, step: int) -> None:
    """Append this micro-batch's token ids to ``$NEMO_MINITRON_TRACE_BATCHES/rank<R>.jsonl`` (when set)."""
    out = os.environ.get(TRACE_ENV)
    if not out:
        return
    import torch.distributed as dist
    from megatron.core import parallel_state

    tokens = batch.get("tokens")
    if tokens is None:
        tokens = batch.get("labels")
    if tokens is None:
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    rec = {"step": step, "mode": "train" if training else "val",
           "dp_rank": parallel_state.get_data_parallel_rank(), "dp_size": parallel_state.get_data_parallel_world_size(),
           "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
           "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
           "tokens": tokens.cpu().tolist()}
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / f"rank{rank}.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")
