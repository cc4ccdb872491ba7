"""Hidden states at the last real token of each sequence, at every layer of a site.

Rows are padded in batches on either side. Position ids follow the attention mask, so a
padded row gets the same positions as the row run alone, and the core's ``last_prompt``
selector picks the last real token whatever the padding side. The result for a row does
not depend on the batch it ran in, up to floating-point noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import labhooks
from labhooks.errors import ConfigError
from labhooks.progress import LoggingProgress, Progress


def encode_texts(tokenizer: object, texts: list[str]) -> list[list[int]]:
    """Tokenize full texts without adding special tokens (chat-formatted texts already hold them)."""
    encoded = tokenizer(texts, add_special_tokens=False)  # type: ignore[operator]
    return [list(ids) for ids in encoded["input_ids"]]


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to one (batch, length) tensor; return the ids and the attention mask."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = width - len(sequence) if side == "left" else 0
        ids[row, start : start + len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, start : start + len(sequence)] = 1
    return ids, mask


def position_ids_for(mask: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
    """Return position ids that count real tokens only, continuing after ``past`` real tokens per row."""
    positions = mask.long().cumsum(-1) - 1
    if past is not None:
        positions = positions + past.unsqueeze(1)
    return positions.clamp(min=0)


def site_layers(model: nn.Module, site: str) -> list[int]:
    """Return the layer indices that a per-layer site spec such as ``post_mlp[*]`` selects."""
    layers = [resolved.site.layer for resolved in labhooks.sites(model).resolve(site)]
    if any(layer is None for layer in layers):
        raise ConfigError(f"site {site!r} has no layers; AlignEZ needs a per-layer site such as post_mlp[*]")
    return [int(layer) for layer in layers if layer is not None]


@torch.no_grad()
def last_token_states(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    site: str,
    *,
    pad_id: int,
    batch_size: int = 8,
    padding_side: str = "left",
    progress: Progress | None = None,
    description: str = "reading representations",
) -> torch.Tensor:
    """Return the hidden state at the last real token of each sequence: (sequences, layers, width).

    Layers follow the order of ``site`` (``post_mlp[*]`` gives layers 0 to L-1). The
    states are float32 on the CPU.
    """
    if not sequences:
        raise ValueError("no sequences to read")
    empty = [index for index, sequence in enumerate(sequences) if len(sequence) == 0]
    if empty:
        raise ValueError(f"sequences {empty} are empty; every sequence needs at least one token")
    progress = progress or LoggingProgress()
    keys = [str(resolved.site) for resolved in labhooks.sites(model).resolve(site)]
    device = next(model.parameters()).device

    batches = []
    starts = list(range(0, len(sequences), batch_size))
    for start in progress.track(starts, description, total=len(starts)):
        ids, mask = pad_sequences(sequences[start : start + batch_size], pad_id, padding_side)
        # A fresh record per batch: the core's context tracker would read a batch whose ids
        # extend the previous call's ids as a decode step of the same generation.
        with labhooks.record(model, site, positions="last_prompt") as activations:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids_for(mask).to(device), use_cache=False)
        batches.append(torch.stack([activations[key] for key in keys], dim=1))
    return torch.cat(batches)
