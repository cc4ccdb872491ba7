"""Evaluation without a judge model: the preference margin and side-by-side generations.

The preference margin is the mean, over held-out pairs, of the log-likelihood gap between
the preferred and the dispreferred response under the steered model, minus the same gap
under the base model. Log-likelihoods are per-token means of the response given the
chat-formatted query. A positive margin means steering moved probability toward the
responses the model itself wrote as preferred.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

import labhooks
from labhooks.generation import format_prompt, generate_texts
from labhooks.intervention import Intervention
from labhooks.progress import LoggingProgress, Progress
from labhooks_alignez.preferences import PreferencePair
from labhooks_alignez.representations import encode_texts, pad_sequences, position_ids_for


@torch.no_grad()
def response_log_likelihoods(
    model: nn.Module,
    tokenizer: object,
    queries: Sequence[str],
    responses: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 8,
    progress: Progress | None = None,
    description: str = "scoring responses",
) -> torch.Tensor:
    """Return the mean log-probability per token of each response given its query, shape (responses,).

    The query is a prefill call and the response a second call on its KV cache, as in
    generation, so interventions attached with positions such as ``last_prompt+generated``
    edit the same tokens they edit while generating.
    """
    if len(queries) != len(responses):
        raise ValueError(f"got {len(queries)} queries but {len(responses)} responses")
    progress = progress or LoggingProgress()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    prompts = encode_texts(tokenizer, [format_prompt(tokenizer, query) for query in queries])
    answers = encode_texts(tokenizer, list(responses))
    empty = [index for index, answer in enumerate(answers) if not answer]
    if empty:
        raise ValueError(f"responses {empty} are empty; a log-likelihood needs at least one token")

    # transformers 5.25 names the KV cache argument `cache`; earlier releases name it `past_key_values`.
    cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    scores = []
    starts = list(range(0, len(prompts), batch_size))
    for start in progress.track(starts, description, total=len(starts)):
        prompt_ids, prompt_mask = pad_sequences(prompts[start : start + batch_size], pad_id, "left")
        answer_ids, answer_mask = pad_sequences(answers[start : start + batch_size], pad_id, "right")
        prompt_ids, prompt_mask, answer_ids, answer_mask = (t.to(device) for t in (prompt_ids, prompt_mask, answer_ids, answer_mask))

        # One attach per batch, so the core's context tracker reads this batch's prefill and then its continuation.
        with labhooks.attach(model, list(interventions)) if interventions else nullcontext():
            prefill = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_for(prompt_mask), use_cache=True)
            cache = getattr(prefill, "cache", None) or prefill.past_key_values
            continuation = model(
                input_ids=answer_ids,
                attention_mask=torch.cat([prompt_mask, answer_mask], dim=1),
                position_ids=position_ids_for(answer_mask, past=prompt_mask.sum(-1)),
                use_cache=True,
                **{cache_keyword: cache},
            )
        logits = torch.cat([prefill.logits[:, -1:], continuation.logits[:, :-1]], dim=1).float()
        token_log_probs = torch.log_softmax(logits, dim=-1).gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
        real = answer_mask.float()
        scores.append(((token_log_probs * real).sum(-1) / real.sum(-1)).cpu())
    return torch.cat(scores)


@dataclass
class MarginResult:
    """Per-pair log-likelihood gaps (preferred minus dispreferred) under the base and the steered model."""

    base_gaps: torch.Tensor
    steered_gaps: torch.Tensor

    @property
    def pairs(self) -> int:
        return int(self.base_gaps.shape[0])

    @property
    def base_gap(self) -> float:
        return float(self.base_gaps.mean())

    @property
    def steered_gap(self) -> float:
        return float(self.steered_gaps.mean())

    @property
    def margin(self) -> float:
        return self.steered_gap - self.base_gap

    @property
    def margin_stderr(self) -> float:
        """Standard error of the margin over pairs; NaN for fewer than two pairs."""
        if self.pairs < 2:
            return float("nan")
        return float((self.steered_gaps - self.base_gaps).std() / self.pairs**0.5)

    def subset(self, rows: Sequence[int]) -> MarginResult:
        index = torch.tensor(list(rows), dtype=torch.long)
        return MarginResult(self.base_gaps[index], self.steered_gaps[index])


def preference_margin(
    model: nn.Module,
    tokenizer: object,
    pairs: Sequence[PreferencePair],
    interventions: Sequence[Intervention],
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> MarginResult:
    """Score every pair's two responses with and without the interventions and return the gaps."""
    if not pairs:
        raise ValueError("no held-out pairs to score")
    queries = [pair.query for pair in pairs] * 2
    responses = [pair.preferred for pair in pairs] + [pair.dispreferred for pair in pairs]
    count = len(pairs)

    base = response_log_likelihoods(
        model, tokenizer, queries, responses, batch_size=batch_size, progress=progress, description="margin: base"
    )
    steered = response_log_likelihoods(
        model,
        tokenizer,
        queries,
        responses,
        interventions=interventions,
        batch_size=batch_size,
        progress=progress,
        description="margin: steered",
    )
    return MarginResult(base[:count] - base[count:], steered[:count] - steered[count:])


def compare_generations(
    model: nn.Module,
    tokenizer: object,
    prompts: list[str],
    interventions: Sequence[Intervention],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: Progress | None = None,
) -> tuple[list[str], list[str]]:
    """Generate greedily without and with the interventions, exactly as ``labhooks generate`` does."""
    base = generate_texts(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, description="base"
    )
    with labhooks.attach(model, list(interventions)):
        steered = generate_texts(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, description="steered"
        )
    return base, steered
