"""The project's megatron forward as an lm-evaluation-harness model (registered as ``nemo_minitron``).

lm-eval drives every task (prompts, few-shot, metrics); this class answers its log-likelihood requests with
:func:`nemo_minitron.model.forward.score_tokens` at whatever TP/PP/DP layout the process runs:

* tokenization is lm-eval's ``TemplateLM`` pair encoding with the ``hf`` model's ``tok_encode`` rules, and a
  request's input is truncated on the left to the model's length as the ``hf`` model does, so the numbers are
  the ``hf`` model's (tests/test_downstream.py checks 1e-4);
* requests with the same input tokens (a multiple-choice question's one-token answers: MMLU's " A".." D") are
  one sequence, run once, and only the positions a request asks about reach the output layer;
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
        seqs, index, queries, asks = [], {}, [], []
        for _, ctx, cont in requests:
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            inp, n = tuple(full[:-1]), len(cont)
            s = index.get(inp)
            if s is None:
                s = index[inp] = len(seqs)
                seqs.append(inp)
                queries.append({})
            q = queries[s]
            first = len(inp) - n
            asks.append((s, [q.setdefault((first + j, int(t)), len(q)) for j, t in enumerate(cont)]))
        scores = self._score(seqs, [list(q) for q in queries])
        out = []
        for (s, qs), req in zip(asks, requests):
            lp = float(sum(scores[s][j][0] for j in qs))
            greedy = all(scores[s][j][1] > 0.5 for j in qs)
            out.append((lp, greedy))
            self.cache_hook.add_partial("loglikelihood", req[0], (lp, greedy))
        self.stats["requests"] += len(requests)
        self.stats["sequences"] += len(seqs)
        self.stats["tokens"] += sum(len(s) for s in seqs)
        return out

    def _score(self, seqs: list, queries: list) -> list:
        """Per sequence, its queries' [(logprob, greedy)], with the sequences shared out over the DP ranks."""
        from megatron.core import parallel_state

        from nemo_minitron.model.forward import score_tokens

        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # longest first: least padding
        dp = parallel.data_parallel_size()
        r = parallel_state.get_data_parallel_rank() if dp > 1 else 0
        mine = order[r::dp]
        report = _Progress(self.log, len(mine), self.batch_size) if parallel.is_rank0() else None
        flat = score_tokens(self.model, [list(seqs[i]) for i in mine], [queries[i] for i in mine],
                            self.batch_size, progress=report, max_tokens=self.batch_tokens)
        parts = [flat] if dp == 1 else parallel.all_gather_tensors(flat, group=parallel_state.get_data_parallel_group())
        result = [None] * len(seqs)
        for rank, part in enumerate(parts):
            rows = parallel.to_host(part).tolist()
            k = 0
            for i in order[rank::dp]:
                result[i] = rows[k:k + len(queries[i])]
                k += len(queries[i])
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


class _Progress:
    """Every ~10% (and at the end): sequences scored, of this rank's share."""

    def __init__(self, log, total: int, batch: int):
        self.log, self.total, self.t0, self.next = log, total, time.time(), max(total // 10, batch)

    def __call__(self, done: int) -> None:
        if done >= self.next or done == self.total:
            rate = done / max(time.time() - self.t0, 1e-9)
            self.log(f"downstream: scored {done}/{self.total} sequences ({rate:.1f}/s)")
            self.next = done + max(self.total // 10, 1)
