"""Position selectors and the per-forward context they read.

Positions are absolute: position 0 is the first real (non-pad) token of a row, whatever
the padding side, and a token keeps its position across the prefill call and the decode
steps of ``generate()``. The prompt is what the row held at prefill; every later token is
generated. A selector picks absolute positions, so an edit lands on the same tokens with
the KV cache on or off, and pad positions are never selected.

Selector strings::

    all                   every real token
    prompt                every prompt token
    generated             every generated token
    last_prompt           the last prompt token (present only in the prefill call when the
                          KV cache is on, and in every call when it is off)
    first_prompt:K        the first K prompt tokens
    last_prompt:K         the last K prompt tokens
    at:3,7,-1             explicit positions; negative ones count back from the prompt end
    last_prompt+generated a union of any of the above
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labhooks.errors import PositionError

_SIMPLE = ("all", "prompt", "generated", "last_prompt")
_COUNTED = ("first_prompt", "last_prompt")


@dataclass
class ForwardContext:
    """The token context of one forward call of the model.

    ``attention_mask`` (bool) and ``positions`` (long, -1 at pads) have the shape
    (batch, tokens in this call). ``prompt_lengths`` counts the real prompt tokens of each
    row. ``is_prefill`` is False for a decode step of ``generate()``, cached or not.
    """

    attention_mask: torch.Tensor
    positions: torch.Tensor
    prompt_lengths: torch.Tensor
    is_prefill: bool
    past_length: int

    @property
    def batch_size(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.shape[1])


def _parse_part(part: str) -> tuple[str, tuple[int, ...]]:
    if part in _SIMPLE:
        return part, ()
    name, separator, argument = part.partition(":")
    if separator and name in _COUNTED:
        if not argument.isdigit() or int(argument) < 1:
            raise PositionError(f"invalid position selector {part!r}: {name}:K needs a whole number K >= 1")
        return name, (int(argument),)
    if separator and name == "at":
        try:
            values = tuple(int(item) for item in argument.split(","))
        except ValueError:
            raise PositionError(f"invalid position selector {part!r}: write at:3,7,-1 with integer positions") from None
        return name, values
    raise PositionError(
        f"invalid position selector {part!r}: use all, prompt, generated, last_prompt, "
        "first_prompt:K, last_prompt:K or at:P1,P2 (join several with +)"
    )


@dataclass(frozen=True)
class Positions:
    """A parsed position selector; ``str()`` gives back its canonical string."""

    parts: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def parse(cls, text: str | Positions | None) -> Positions:
        if text is None:
            return cls((("all", ()),))
        if isinstance(text, Positions):
            return text
        if not isinstance(text, str) or not text.strip():
            raise PositionError(f"invalid position selector {text!r}: expected a string such as 'all' or 'last_prompt'")
        return cls(tuple(_parse_part(part.strip()) for part in text.split("+")))

    def __str__(self) -> str:
        texts = []
        for name, values in self.parts:
            if name == "at":
                texts.append("at:" + ",".join(str(v) for v in values))
            elif values:
                texts.append(f"{name}:{values[0]}")
            else:
                texts.append(name)
        return "+".join(texts)

    @property
    def is_all(self) -> bool:
        return any(name == "all" for name, _ in self.parts)

    def mask(self, context: ForwardContext) -> torch.Tensor:
        """Return a bool mask (batch, tokens) of the selected real positions in this call."""
        real = context.attention_mask
        if self.is_all:
            return real
        positions = context.positions
        prompt = context.prompt_lengths.unsqueeze(1)
        selected = torch.zeros_like(real)
        for name, values in self.parts:
            if name == "prompt":
                selected |= positions < prompt
            elif name == "generated":
                selected |= positions >= prompt
            elif name == "last_prompt" and not values:
                selected |= positions == prompt - 1
            elif name == "first_prompt":
                selected |= (positions < prompt) & (positions < values[0])
            elif name == "last_prompt":
                selected |= (positions < prompt) & (positions >= prompt - values[0])
            elif name == "at":
                for value in values:
                    target = prompt + value if value < 0 else torch.full_like(prompt, value)
                    selected |= positions == target
        return selected & real & (positions >= 0)
