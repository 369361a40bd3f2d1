"""rmoe's model as an lm-evaluation-harness ``LM`` (EleutherAI's lm-eval, the optional extra ``eval``).

It scores the way lm-eval's own ``hf`` model (``HFLM``) scores a causal LM, so the same model gives the same
numbers through ``rmoe eval`` and through ``lm_eval --model hf`` on its ``rmoe export`` folder (tested):

- ``loglikelihood``: lm-eval's ``TemplateLM`` splits context and continuation into tokens (the whole string
  encoded, the context's tokens cut off); the input is ``(context + continuation)[-(max_length + 1):][:-1]``,
  right-padded in a batch; the continuation's log-probabilities (fp32 log-softmax) are summed, and it is greedy
  when every continuation token is the argmax. Longest requests first, ``batch_size`` rows per forward.
- ``loglikelihood_rolling``: disjoint windows of ``max_length`` tokens after the prefix token (``<eos>``, the
  document separator rmoe trains with), lm-eval's ``get_rolling_token_windows``; their sums added.
- ``generate_until``: greedy decoding with the KV cache (:func:`rmoe.generate.generate`) up to ``max_gen_toks``
  (256 unless the task says), cut at the first of the task's ``until`` strings; the context keeps its last
  ``max_length - max_gen_toks`` tokens.

``max_length`` is the trained context length (the export's ``max_position_embeddings``, which is what HFLM reads).
Only routers that are causal in evaluation are scored: padding and later tokens must not change a token's experts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from rmoe.errors import RmoeError
from rmoe.generate import SamplingConfig, generate
from rmoe.inference import LoadedModel, non_causal_reason

DEFAULT_MAX_LENGTH = 2048  # HFLM's default where a model states none
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class RmoeLM(TemplateLM):
    """An rmoe model (:class:`~rmoe.inference.LoadedModel`) for lm-eval.

    Args:
        loaded: The model, its tokenizer and context length (:func:`rmoe.inference.load_model`).
        batch_size: Rows per forward pass (scores do not depend on it).
    """

    def __init__(self, loaded: LoadedModel, batch_size: int = 8) -> None:
        super().__init__()
        reason = non_causal_reason(loaded.config)
        if reason is not None:
            raise RmoeError(
                f"rmoe eval scores each token from the tokens before it (padded batches, decoding with a KV cache); "
                f"{reason}. Evaluate a causal router, or one with its causal evaluation (eval_routing: topk)."
            )
        if loaded.tokenizer is None:
            raise RmoeError("rmoe eval needs the model's tokenizer.")
        self.loaded, self.model, self.rmoe_tokenizer = loaded, loaded.model.eval(), loaded.tokenizer
        self.batch_size = batch_size
        self.max_length = loaded.context_length or DEFAULT_MAX_LENGTH
        self._device = next(self.model.parameters()).device

    # -- tokens

    @property
    def eot_token_id(self) -> int:
        return self.rmoe_tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.rmoe_tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.rmoe_tokenizer.decode(tokens)

    def _check_encodable(self, requests: Sequence[Any]) -> None:
        """Refuse text the tokenizer cannot encode, naming the task (one paragraph, not a KeyError deep inside)."""
        for request in requests:
            for text in request.args:
                if isinstance(text, str) and text:
                    bad = self.rmoe_tokenizer.unencodable(text)
                    if bad:
                        shown = ", ".join(repr(b) for b in bad[:5])
                        raise RmoeError(
                            f"task {request.task_name!r}: the model's tokenizer cannot encode {shown} in its text "
                            f"({request.args[0][:60]!r}...); evaluate a model whose tokenizer covers the task's text."
                        )

    # -- scoring

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._check_encodable(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for chunk in _chunks(order, self.batch_size):
            inputs, continuations = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
                continuations.append(continuation)
            longest = max(len(x) for x in inputs)
            ids_BS = torch.full((len(inputs), longest), self.rmoe_tokenizer.pad_id, dtype=torch.long)
            for b, x in enumerate(inputs):  # right padding: a causal model's real positions do not see it
                ids_BS[b, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            logprobs_BSV = F.log_softmax(self.model(ids_BS.to(self._device)).logits.float(), dim=-1)
            for b, i in enumerate(chunk):
                n, end = len(continuations[b]), len(inputs[b])
                target_N = torch.as_tensor(continuations[b], dtype=torch.long, device=self._device)
                logprobs_NV = logprobs_BSV[b, end - n : end]
                total = float(logprobs_NV.gather(-1, target_N[:, None]).sum())
                results[i] = (total, bool((logprobs_NV.argmax(dim=-1) == target_N).all()))
        return [r for r in results if r is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        self._check_encodable(requests)
        out = []
        for request in requests:
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pieces = [(None, *make_disjoint_window(w)) for w in windows]
            out.append(sum(score for score, _ in self._loglikelihood_tokens(pieces)))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        self._check_encodable(requests)
        out: list[str | None] = [None] * len(requests)
        # one batch per set of generation options, longest contexts first (left padding, KV cache)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                raise RmoeError("rmoe eval generates greedily; a task asking for sampling is not supported.")
            keep = max(1, self.max_length - max_new)
            contexts = {i: self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in members}
            ordered = sorted(members, key=lambda i: -len(contexts[i]))
            sampling = SamplingConfig(max_new_tokens=max_new, temperature=0.0, stop_at_eos=True)
            for chunk in _chunks(ordered, self.batch_size):
                generations = generate(
                    self.model,
                    [contexts[i] for i in chunk],
                    sampling,
                    eos_id=self.eot_token_id,
                    pad_id=self.rmoe_tokenizer.pad_id,
                    num_valid_ids=self.rmoe_tokenizer.vocab_size,
                )
                for i, generation in zip(chunk, generations, strict=True):
                    ids = [t for t in generation.new_ids if t != self.eot_token_id]
                    text = self.tok_decode(ids)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
        return [t if t is not None else "" for t in out]
