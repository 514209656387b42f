"""NeMo/Lightning callback: width-prune the model at the start of a NeMo run.

    trainer = nl.Trainer(..., strategy=nl.MegatronStrategy(tensor_model_parallel_size=2),
                         callbacks=[WidthPruningCallback(source=TEACHER_CKPT, calibration=PREFIX,
                                                         targets={"hidden_size": 3072, "ffn_hidden_size": 9216})])
    trainer.fit(llm.LlamaModel(config), data)   # trains (e.g. distills into) the pruned model

It runs in Lightning's ``setup`` hook: after NeMo's strategy has initialized the parallel state and before
the model is configured and wrapped and the optimizer exists. It loads the source checkpoint at the
run's TP/PP layout, calibrates, prunes (:func:`nemo_minitron.prune.width.prune_width`), installs the pruned
megatron module as ``pl_module.module`` (so NeMo's ``configure_model`` keeps it) and updates the NeMo
config, whose context is then saved with every checkpoint of the run.
"""

from __future__ import annotations

import lightning.pytorch as pl

from nemo_minitron.prune.plan import WIDTH_DIMS


class WidthPruningCallback(pl.Callback):
    def __init__(self, source, targets: dict, calibration=None, calibration_samples: int = 1024,
                 seq_length: int = 256, micro_batch_size: int = 4, scores=None, seq_agg: str = "mean",
                 batch_agg: str = "l2", head_importance: str = "contribution", merge_pruned_heads: bool = False):
        if scores is None and calibration is None:
            raise ValueError("WidthPruningCallback needs calibration=PREFIX or scores=PATH")
        self.source, self.targets = source, dict(targets)
        self.calibration, self.samples, self.seq_length = calibration, calibration_samples, seq_length
        self.micro_batch_size, self.scores_path = micro_batch_size, scores
        self.kw = dict(seq_agg=seq_agg, batch_agg=batch_agg, head_importance=head_importance,
                       merge_pruned_heads=merge_pruned_heads)
        self.pruned_spec = self.scores = self.plan = None
        # validate now, before the trainer starts: the error names the problem, nothing runs
        from nemo_minitron.checkpoint.loader import describe
        from nemo_minitron.prune.plan import validate_targets

        _, self._path, self.spec = describe(source)
        self.targets = validate_targets(self.spec, self.targets)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.pruned_spec is not None or hasattr(pl_module, "module") and getattr(pl_module, "_pruned", False):
            return
        from megatron.core import parallel_state as ps

        from nemo_minitron.checkpoint.loader import load_model
        from nemo_minitron.data import indexed
        from nemo_minitron.prune.command import load_scores
        from nemo_minitron.prune.plan import check_scores, validate_targets
        from nemo_minitron.prune.width import prune_width

        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        validate_targets(self.spec, self.targets, tp)
        model, spec, _ = load_model(self._path, tp, pp)
        scores = windows = None
        if self.scores_path:
            scores = load_scores(self.scores_path)
            check_scores(scores, spec, f"scores={self.scores_path}")
        else:
            windows = indexed.windows(self.calibration, self.samples, self.seq_length)
        pruned, self.pruned_spec, self.scores, self.plan = prune_width(
            model, spec, self.targets, windows=windows, scores=scores, micro_batch_size=self.micro_batch_size,
            tp=tp, pp=pp, **self.kw)
        del model
        pruned.train()
        pl_module.module = pruned
        pl_module._pruned = True
        for name in (*WIDTH_DIMS, "kv_channels"):
            value = getattr(self.pruned_spec, name)
            setattr(pl_module.config, name, value)
            if hasattr(pl_module, "__io__") and hasattr(pl_module.__io__, "config"):
                setattr(pl_module.__io__.config, name, value)
