"""Re-running only the layers that changed: forward passes that start from a cached layer input.

Depth scoring (loss with layer ``i`` skipped, for every ``i``) and least-squares reconstruction (layer ``l``
refitted on the already-refitted layers' output, for every ``l``) both run many passes over the same windows
in which the layers before some index produce exactly what they produced in the previous pass. A
:class:`PrefixReplay` pass starting at layer ``start`` does not re-run them: layer ``start - 1`` hands back
its cached output (the input of layer ``start``, one tensor per micro-batch, in order) and the layers before
it are the identity. Layers after ``last`` can be made the identity too, and the output layer a no-op, when
the pass exists for hooks on a layer rather than for its loss.

Everything else is megatron's forward-only schedule, unchanged, so it works at every layout: each rank
caches what its own layer produced (its DP share of the windows, its TP copy or sequence-parallel slice, on
the pipeline stage holding the layer). Memory: one hidden-state tensor over this rank's windows
(``n/DP x seq x hidden``) on that stage.
"""

from __future__ import annotations

import contextlib

from nemo_minitron.model.shards import layer_offset


def _identity(hidden_states=None, *a, **k):
    return (hidden_states if hidden_states is not None else a[0], None)


def _no_logits(x, *a, **k):
    """Stand-in for the output layer: one zero logit per token (no vocabulary matmul)."""
    return x.new_zeros(*x.shape[:-1], 1), None


def _zero_loss(labels, logits):
    """Stand-in for the cross-entropy: a zero loss per token ([b, s], as megatron returns)."""
    return labels.new_zeros(labels.shape, dtype=logits.dtype)


class PrefixReplay:
    def __init__(self, model):
        self.model = model
        self.off = layer_offset(model)
        self.cache = None  # per micro-batch: the input of the layer the cache was recorded for

    @contextlib.contextmanager
    def run(self, start: int = 0, skip: frozenset = frozenset(), record: int | None = None,
            last: int | None = None, skip_output_layer: bool = False):
        """A forward pass (run ``lm_loss`` inside) in which:

        - layers ``< start`` are not run: layer ``start - 1`` replays the cache (the input of layer ``start``);
        - layers in ``skip`` and layers ``> last`` are the identity;
        - layer ``record`` (``>= start``) is run and its output becomes the cache (the input of layer
          ``record + 1``) once the pass ends, also when ``record`` is in ``skip`` (its output is then
          recorded but not passed on);
        - ``skip_output_layer``: no output layer and no cross-entropy (the loss is zero).
        """
        layers = {self.off + j: layer for j, layer in enumerate(self.model.decoder.layers)}
        if start > 0 and start - 1 in layers and self.cache is None:
            raise RuntimeError(f"no cached input for layer {start}")
        saved, recorded, calls = [], [], [0]

        def replay(*a, **k):
            m = calls[0]
            calls[0] += 1
            return self.cache[m].clone(), None

        def recording(fwd, skipped):
            def f(hidden_states, *a, **k):
                out = fwd(hidden_states, *a, **k)
                y = out[0] if isinstance(out, tuple) else out
                recorded.append(y.detach())
                return (hidden_states, None) if skipped else out
            return f

        for i, layer in layers.items():
            if i < start - 1:
                patch = _identity
            elif i == start - 1:
                patch = replay
            elif i == record:
                patch = recording(layer.forward, i in skip or (last is not None and i > last))
            elif i in skip or (last is not None and i > last):
                patch = _identity
            else:
                continue
            saved.append((layer, layer.forward))
            layer.forward = patch
        if skip_output_layer and getattr(self.model, "post_process", False):
            saved.append((self.model.output_layer, self.model.output_layer.forward))
            self.model.output_layer.forward = _no_logits
            saved.append((self.model, None))  # the instance attribute below is deleted on restore
            self.model.compute_language_model_loss = _zero_loss
        try:
            yield
        finally:
            for mod, fwd in saved:
                if fwd is None:
                    del mod.compute_language_model_loss
                else:
                    mod.forward = fwd
        if record is not None:
            # the next pass replays at layer `record`: only the stage holding it keeps a cache
            self.cache = recorded if record in layers else None
