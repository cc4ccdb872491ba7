"""Batched text generation for chat and base language models.

Prompts are formatted with the tokenizer's chat template when it has one, left-padded in
batches, and generated greedily (or sampled with a seed). Used by methods that make their
own data and by ``labhooks generate``.
"""

from __future__ import annotations

import torch
from torch import nn

from labhooks.progress import LoggingProgress, Progress


def format_prompt(tokenizer: object, prompt: str, system: str | None = None, chat: bool | None = None) -> str:
    """Return the prompt text to tokenize: the chat template applied when the tokenizer has one.

    ``chat=None`` uses the template if present; ``False`` passes the prompt through.
    """
    template = getattr(tokenizer, "chat_template", None)
    if chat is False or (chat is None and not template):
        return prompt
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]


def _encode(
    tokenizer: object, texts: list[str], device: torch.device, padding_side: str = "left", templated: bool = True
) -> dict[str, torch.Tensor]:
    previous = tokenizer.padding_side  # type: ignore[attr-defined]
    tokenizer.padding_side = padding_side  # type: ignore[attr-defined]
    try:
        # Chat templates already contain the special tokens they need; plain prompts get the
        # tokenizer's own (BOS), without which base models such as Gemma degenerate.
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)  # type: ignore[operator]
    finally:
        tokenizer.padding_side = previous  # type: ignore[attr-defined]
    return {key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: object,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    system: str | None = None,
    chat: bool | None = None,
    progress: Progress | None = None,
    description: str = "generating",
) -> list[str]:
    """Generate one completion per prompt and return the decoded new text of each.

    Sampling is seeded per batch (``seed`` + batch index), so a run is reproducible on the
    same machine and batch size.
    """
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    progress = progress or LoggingProgress()
    device = next(model.parameters()).device
    texts = [format_prompt(tokenizer, prompt, system, chat) for prompt in prompts]
    templated = chat is not False and bool(getattr(tokenizer, "chat_template", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # type: ignore[attr-defined]

    outputs: list[str] = []
    starts = list(range(0, len(texts), batch_size))
    for batch_index, start in enumerate(progress.track(starts, description, total=len(starts))):
        batch = _encode(tokenizer, texts[start : start + batch_size], device, templated=templated)
        options: dict[str, object] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id, "do_sample": do_sample}
        if do_sample:
            torch.manual_seed(seed + batch_index)
            options.update(temperature=temperature, top_p=top_p)
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        generated = model.generate(**batch, **options)  # type: ignore[operator]
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))  # type: ignore[attr-defined]
    return outputs
