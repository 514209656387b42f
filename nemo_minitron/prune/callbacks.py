"""NeMo/Lightning callbacks: prune the model at the start of a NeMo run.

    trainer = nl.Trainer(..., strategy=nl.MegatronStrategy(tensor_model_parallel_size=2),
                         callbacks=[WidthPruningCallback(source=TEACHER_CKPT, calibration=PREFIX,
                                                         targets={"hidden_size": 3072, "ffn_hidden_size": 9216})])
    trainer.fit(llm.LlamaModel(config), data)   # trains (e.g. distills into) the pruned model

    DepthPruningCallback(source=TEACHER_CKPT, calibration=PREFIX, num_layers=16, depth_method="contiguous")

They run in Lightning's ``setup`` hook: after NeMo's strategy has initialized the parallel state and
before the model is configured and wrapped and the optimizer exists. The source checkpoint is loaded at
the run's TP/PP layout and pruned by :func:`nemo_minitron.prune.stage.prune` (the same function as
``nemo-minitron prune``); the pruned megatron module becomes ``pl_module.module`` (NeMo's
``configure_model`` keeps it) and the NeMo config is updated, so every checkpoint of the run records
the pruned shape.
"""

from __future__ import annotations

import lightning.pytorch as pl

from nemo_minitron.prune.plan import WIDTH_DIMS


class PruningCallback(pl.Callback):
    """Depth and/or width pruning (depth first) of ``source`` into the run's model."""

    def __init__(self, source, targets: dict | None = None, num_layers=None, drop_layers=None,
                 depth_method: str = "lm_loss", calibration=None, calibration_samples: int = 1024,
                 depth_samples: int = 64, seq_length: int = 256, micro_batch_size: int = 4, scores=None,
                 seq_agg: str = "mean", batch_agg: str = "l2", head_importance: str = "contribution",
                 merge_pruned_heads: bool = False, reconstruction: str = "least_squares",
                 reconstruction_damping: float = 0.01):
        from nemo_minitron.checkpoint.loader import describe
        from nemo_minitron.prune.depth import validate_depth
        from nemo_minitron.prune.plan import validate_targets
        from nemo_minitron.prune.stage import check_reconstruction, inputs

        # validate now, before the trainer starts: the error names the problem, nothing runs
        _, self._path, self.spec = describe(source)
        self.spec.require_dense("pruning")
        self.targets = validate_targets(self.spec, dict(targets or {}))
        self.drop = validate_depth(self.spec, num_layers, drop_layers, 1, depth_method)
        self.num_layers, self.depth_method = num_layers, depth_method
        self.samples, self.depth_samples, self.micro_batch_size = calibration_samples, depth_samples, micro_batch_size
        depth = bool(self.drop) or (num_layers is not None and num_layers != self.spec.num_layers)
        check_reconstruction(reconstruction, reconstruction_damping, merge_pruned_heads)
        self.given_scores, self.windows = inputs(self.spec, self.targets, depth, self.drop, scores, calibration,
                                                 calibration_samples, depth_samples, seq_length, micro_batch_size,
                                                 reconstruction=reconstruction)
        self.kw = dict(seq_agg=seq_agg, batch_agg=batch_agg, head_importance=head_importance,
                       merge_pruned_heads=merge_pruned_heads, reconstruction=reconstruction,
                       reconstruction_damping=float(reconstruction_damping))
        self.pruned_spec = self.scores = self.plan = self.depth = self.reconstruction = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.pruned_spec is not None:
            return
        from megatron.core import parallel_state as ps

        from nemo_minitron.checkpoint.loader import load_model
        from nemo_minitron.prune.depth import validate_depth
        from nemo_minitron.prune.plan import validate_targets
        from nemo_minitron.prune.stage import check_split, prune

        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        validate_targets(self.spec, self.targets, tp)
        validate_depth(self.spec, self.num_layers, self.drop, pp, self.depth_method)
        if self.windows is not None:  # now that the trainer's DP is known
            check_split(self.samples, self.depth_samples, self.micro_batch_size, ps.get_data_parallel_world_size())
        model, spec, _ = load_model(self._path, tp, pp)
        w = self.windows
        pruned, self.pruned_spec, self.depth, self.scores, self.plan, self.reconstruction = prune(
            model, spec, self.targets, num_layers=self.num_layers, explicit_drop=self.drop,
            depth_method=self.depth_method, depth_windows=None if w is None else w[: self.depth_samples],
            windows=None if w is None else w[: self.samples], scores=self.given_scores,
            micro_batch_size=self.micro_batch_size, tp=tp, pp=pp, **self.kw)
        del model
        pruned.train()
        pl_module.module = pruned
        for name in ("num_layers", *WIDTH_DIMS, "kv_channels"):
            value = getattr(self.pruned_spec, name)
            setattr(pl_module.config, name, value)
            if hasattr(pl_module, "__io__") and hasattr(pl_module.__io__, "config"):
                setattr(pl_module.__io__.config, name, value)


class WidthPruningCallback(PruningCallback):
    """Width pruning: ``targets`` = {hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups}."""

    def __init__(self, source, targets: dict, **kwargs):
        super().__init__(source, targets=targets, **kwargs)


class DepthPruningCallback(PruningCallback):
    """Depth pruning: ``num_layers`` (chosen by ``depth_method``) or explicit 1-indexed ``drop_layers``."""

    def __init__(self, source, num_layers=None, drop_layers=None, **kwargs):
        if num_layers is None and not drop_layers:
            raise ValueError("DepthPruningCallback needs num_layers or drop_layers")
        super().__init__(source, num_layers=num_layers, drop_layers=drop_layers, **kwargs)
