"""The project's megatron forward as an lm-evaluation-harness model (registered as ``nemo_minitron``).

lm-eval drives every task (prompts, few-shot, metrics); this class answers its log-likelihood requests with
:func:`nemo_minitron.model.forward.score_tokens` at whatever TP/PP/DP layout the process runs:

* tokenization is lm-eval's ``TemplateLM`` pair encoding with the ``hf`` model's ``tok_encode`` rules, and a
  request's input is truncated on the left to the model's length as the ``hf`` model does, so the numbers are
  the ``hf`` model's (tests/test_downstream.py checks 1e-4);
* each context is computed once: requests with the same input tokens (a multiple-choice question's one-token
  answers: MMLU's " A".." D") are one sequence, and the choices of one context (PIQA's two solutions,
  HellaSwag's four endings) are branches of one sequence after it, each seeing the context and itself only
  (:func:`_pack`); only the positions a request asks about reach the output layer;
* the distinct sequences, longest first, are dealt round-robin to the data-parallel ranks (every rank of a
  DP group runs the same share: TP and PP split each forward); the scores are all-gathered, so every rank
  holds every answer and lm-eval runs unchanged (it is told rank 0 of 1) on every rank.
"""

from __future__ import annotations

import time

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from nemo_minitron import parallel


@register_model("nemo_minitron")
class MegatronLM(TemplateLM):
    """``model``: this rank's megatron chunk (built and loaded at the current layout); ``tokenizer``: the HF
    tokenizer of its checkpoint. From lm-eval's own CLI: ``--model nemo_minitron --model_args pretrained=CKPT``
    (optionally ``tensor_model_parallel_size=..,pipeline_model_parallel_size=..`` under torchrun)."""

    backend = "causal"

    def __init__(self, model=None, tokenizer=None, max_length: int | None = None, batch_size: int = 16,
                 batch_tokens: int | None = 8192,
                 pretrained: str | None = None, tensor_model_parallel_size: int = 1,
                 pipeline_model_parallel_size: int = 1, add_bos_token: bool | None = None, log=print, **_):
        super().__init__()
        if model is None:
            from nemo_minitron.checkpoint.loader import load_model
            from nemo_minitron.data import tokenizer as tok

            if pretrained is None:
                raise ValueError("nemo_minitron needs pretrained=CHECKPOINT (a NeMo 2 or Hugging Face directory)")
            tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
            parallel.initialize(tp, pp)
            model, spec, _ = load_model(pretrained, tp, pp)
            tokenizer = tok.load(pretrained)
            max_length = max_length or spec.get("seq_length")
        self.model, self.tokenizer = model, tokenizer
        self._max_length = int(max_length or 2048)
        self.batch_size = int(batch_size)
        self.batch_tokens = int(batch_tokens) if batch_tokens else None
        self.add_bos_token = add_bos_token
        self.log = log
        self.stats = {"requests": 0, "sequences": 0, "tokens": 0}

    # ---- tokenization: the hf model's rules --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        from lm_eval.models.utils import _add_special_kwargs
        from lm_eval.models.utils import has_bos_prefix

        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    # ---- scoring -------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)  # no tokenizing bar: progress is logged

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from nemo_minitron.model.forward import shares_contexts

        units, asks = _pack(requests, self.max_length, shares_contexts(self.model))
        scores = self._score(units)
        out = []
        for (u, qs), req in zip(asks, requests):
            lp = float(sum(scores[u][j][0] for j in qs))
            greedy = all(scores[u][j][1] > 0.5 for j in qs)
            out.append((lp, greedy))
            self.cache_hook.add_partial("loglikelihood", req[0], (lp, greedy))
        self.stats["requests"] += len(requests)
        self.stats["sequences"] += len(units)
        self.stats["tokens"] += sum(len(u.tokens) for u in units)
        return out

    def _score(self, units: list) -> list:
        """Per unit, its queries' [(logprob, greedy)], with the units shared out over the DP ranks."""
        from megatron.core import parallel_state

        from nemo_minitron.model.forward import score_tokens

        order = sorted(range(len(units)), key=lambda i: -len(units[i].tokens))  # longest first: least padding
        dp = parallel.data_parallel_size()
        r = parallel_state.get_data_parallel_rank() if dp > 1 else 0
        mine = [units[i] for i in order[r::dp]]
        report = _Progress(self.log, len(mine), self.batch_size) if parallel.is_rank0() else None
        flat = score_tokens(self.model, [u.tokens for u in mine], [list(u.queries) for u in mine],
                            self.batch_size, progress=report, max_tokens=self.batch_tokens,
                            layouts=[u.layout() for u in mine])
        parts = [flat] if dp == 1 else parallel.all_gather_tensors(flat, group=parallel_state.get_data_parallel_group())
        result = [None] * len(units)
        for rank, part in enumerate(parts):
            rows = parallel.to_host(part).tolist()
            k = 0
            for i in order[rank::dp]:
                result[i] = rows[k:k + len(units[i].queries)]
                k += len(units[i].queries)
        return result

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("nemo_minitron scores log-likelihood tasks (multiple choice, perplexity); "
                                  "generative tasks are not supported")


class _Unit:
    """One sequence the model runs: ``tokens``; ``queries`` {(position, token): index}; for a shared context,
    ``branch[i]`` (0: the context, k: the k-th continuation) and ``positions[i]`` (the token's position in its own
    request), else None (one plain causal sequence)."""

    __slots__ = ("tokens", "queries", "branch", "positions", "branches")

    def __init__(self, tokens):
        self.tokens, self.queries, self.branch, self.positions, self.branches = list(tokens), {}, None, None, None

    def ask(self, position: int, token: int) -> int:
        return self.queries.setdefault((position, int(token)), len(self.queries))

    def layout(self):
        return None if self.branch is None else (self.positions, self.branch)


def _pack(requests, max_length: int, share: bool):
    """lm-eval's (context, continuation) token requests -> (units to run, per request (unit, its query indices)).

    A request's input is ``(context + continuation)[:-1]``, cut on the left to ``max_length`` tokens (the ``hf``
    model's rule). Requests with the same input are one unit (MMLU's one-token answers). With ``share`` (a model
    whose attention takes a mask and whose positions follow ``position_ids``: :func:`shares_contexts`), the
    requests of one context (a multiple-choice question's choices) are one unit: the context once, then each
    distinct continuation as a branch that sees the context and itself only, at the positions it has in its own
    request; a request cut on the left keeps a unit of its own."""
    units, asks, by_input, by_context = [], [], {}, {}
    for _, ctx, cont in requests:
        ctx, cont = list(ctx), list(cont)
        full = (ctx + cont)[-(max_length + 1):]
        inp, n = tuple(full[:-1]), len(cont)
        if share and len(ctx) + n <= max_length + 1 and len(ctx) > 0:
            u = by_context.get(tuple(ctx))
            if u is None:
                u = by_context[tuple(ctx)] = len(units)
                units.append(_Unit(ctx))
                units[u].branch, units[u].positions = [0] * len(ctx), list(range(len(ctx)))
                units[u].branches = {}
            unit = units[u]
            qs = [unit.ask(len(ctx) - 1, cont[0])]
            if n > 1:  # the continuation's own tokens (all but its last) as a branch
                key = tuple(cont[:-1])
                start = unit.branches.get(key)
                if start is None:
                    start = unit.branches[key] = len(unit.tokens)
                    k = len(unit.branches)
                    unit.tokens += key
                    unit.branch += [k] * len(key)
                    unit.positions += range(len(ctx), len(ctx) + len(key))
                qs += [unit.ask(start + j, cont[j + 1]) for j in range(n - 1)]
            asks.append((u, qs))
            continue
        u = by_input.get(inp)
        if u is None:
            u = by_input[inp] = len(units)
            units.append(_Unit(inp))
        first = len(inp) - n
        asks.append((u, [units[u].ask(first + j, t) for j, t in enumerate(cont)]))
    for unit in units:  # a context with one branch (or none) runs as a plain sequence
        if unit.branch is not None and max(unit.branch) <= 1:
            unit.branch = unit.positions = None
    return units, asks


class _Progress:
    """Every ~10% (and at the end): sequences scored, of this rank's share."""

    def __init__(self, log, total: int, batch: int):
        self.log, self.total, self.t0, self.next = log, total, time.time(), max(total // 10, batch)

    def __call__(self, done: int) -> None:
        if done >= self.next or done == self.total:
            rate = done / max(time.time() - self.t0, 1e-9)
            self.log(f"downstream: scored {done}/{self.total} sequences ({rate:.1f}/s)")
            self.next = done + max(self.total // 10, 1)
