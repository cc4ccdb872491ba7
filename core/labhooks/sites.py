"""The site grammar: parsing, aliases and expansion to concrete sites.

A site names a place in the forward pass where a hidden state can be read or replaced::

    embeddings                    token embeddings (language models) or the output embedding
    pre_mlp[l]                    attention output of block l, before the residual add
    pre_mlp[l].heads[h]           single heads: the input of the attention output projection
    post_mlp[l]                   MLP output of block l, before the residual add
    post_block[l]                 residual stream after block l
    logits                        output scores

A layer or head selector is an index (``3``, ``-1``), a slice (``4:8``), a list (``0,5``)
or ``*``. Models with two towers (CLIP) take a tower prefix: ``vision.post_block[2]``.
Parsing needs no model; :meth:`SiteSpec.expand` checks the indices against one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from labhooks.errors import SiteError

SITE_KINDS = ("embeddings", "pre_mlp", "post_mlp", "post_block", "logits")
LAYERED_KINDS = ("pre_mlp", "post_mlp", "post_block")

# Names that users of TransformerLens and pyvene already know, mapped to labhooks kinds.
KIND_ALIASES = {
    "resid_post": "post_block",
    "hook_resid_post": "post_block",
    "block_output": "post_block",
    "mlp_out": "post_mlp",
    "hook_mlp_out": "post_mlp",
    "mlp_output": "post_mlp",
    "attn_out": "pre_mlp",
    "hook_attn_out": "pre_mlp",
    "attention_output": "pre_mlp",
    "embed": "embeddings",
    "hook_embed": "embeddings",
    "unembed": "logits",
}

_TL_BLOCK = re.compile(r"^blocks\.(?P<layer>-?\d+)\.(?P<name>hook_resid_post|hook_mlp_out|hook_attn_out|attn\.hook_z)$")
_SITE = re.compile(
    r"^(?:(?P<tower>[a-z_]+)\.)??(?P<kind>[a-z_]+)"
    r"(?:\[(?P<layers>[^\]]*)\])?"
    r"(?:\.heads\[(?P<heads>[^\]]*)\])?$"
)
_SELECTOR_ITEM = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class Selector:
    """A layer or head selector: ``*``, an index, a slice or a list of indices."""

    text: str

    @classmethod
    def parse(cls, text: str, what: str) -> Selector:
        text = text.replace(" ", "")
        if text == "*":
            return cls(text)
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3) or not all(p == "" or _SELECTOR_ITEM.match(p) for p in parts):
                raise SiteError(f"invalid {what} slice {text!r}: write start:stop or start:stop:step, e.g. 4:8")
            if len(parts) == 3 and parts[2] in ("0", "-0"):
                raise SiteError(f"invalid {what} slice {text!r}: the step must not be zero")
            return cls(text)
        items = text.split(",")
        if not items or not all(_SELECTOR_ITEM.match(item) for item in items):
            raise SiteError(f"invalid {what} selector {text!r}: use an index (3, -1), a slice (4:8), a list (0,5) or *")
        return cls(text)

    def resolve(self, count: int, what: str) -> tuple[int, ...]:
        """Return the selected indices, non-negative and in order, for ``count`` items."""
        if self.text == "*":
            return tuple(range(count))
        if ":" in self.text:
            parts = [int(p) if p else None for p in self.text.split(":")]
            selected = tuple(range(count)[slice(*parts)])
            if not selected:
                raise SiteError(f"{what} slice [{self.text}] selects nothing: the model has {count} {what}s (0 to {count - 1})")
            return selected
        indices = []
        for item in self.text.split(","):
            index = int(item)
            if not -count <= index < count:
                raise SiteError(
                    f"{what} index {index} is out of range: the model has {count} {what}s (0 to {count - 1}, or -{count} to -1)"
                )
            indices.append(index % count)
        return tuple(indices)


@dataclass(frozen=True)
class Site:
    """One concrete site: a kind, a layer (for per-block kinds), optional heads and tower."""

    kind: str
    layer: int | None = None
    heads: tuple[int, ...] | None = None
    tower: str | None = None

    def __str__(self) -> str:
        text = f"{self.tower}.{self.kind}" if self.tower else self.kind
        if self.layer is not None:
            text += f"[{self.layer}]"
        if self.heads is not None:
            text += ".heads[" + ",".join(str(h) for h in self.heads) + "]"
        return text


@dataclass(frozen=True)
class SiteSpec:
    """A parsed site string that may select several layers or heads."""

    kind: str
    layers: Selector | None = None
    heads: Selector | None = None
    tower: str | None = None

    def __str__(self) -> str:
        text = f"{self.tower}.{self.kind}" if self.tower else self.kind
        if self.layers is not None:
            text += f"[{self.layers.text}]"
        if self.heads is not None:
            text += f".heads[{self.heads.text}]"
        return text

    def expand(self, num_layers: int, num_heads: int | None = None) -> list[Site]:
        """List the concrete sites this spec selects on a model with the given sizes."""
        heads: tuple[int, ...] | None = None
        if self.heads is not None:
            if num_heads is None:
                raise SiteError(f"site {self}: this model has no addressable attention heads")
            heads = self.heads.resolve(num_heads, "head")
        if self.layers is None:
            return [Site(self.kind, None, heads, self.tower)]
        return [Site(self.kind, layer, heads, self.tower) for layer in self.layers.resolve(num_layers, "layer")]


def _valid_sites_text() -> str:
    return "embeddings, pre_mlp[l], pre_mlp[l].heads[h], post_mlp[l], post_block[l], logits"


def parse_site(text: str | SiteSpec | Site) -> SiteSpec:
    """Parse a site string (or pass a parsed one through), normalising known aliases.

    Raises :class:`SiteError` with the valid forms when the string is not a site.
    """
    if isinstance(text, SiteSpec):
        return text
    if isinstance(text, Site):
        layers = Selector(str(text.layer)) if text.layer is not None else None
        heads = Selector(",".join(str(h) for h in text.heads)) if text.heads is not None else None
        return SiteSpec(text.kind, layers, heads, text.tower)
    if not isinstance(text, str):
        raise SiteError(f"a site must be a string such as 'post_block[3]', not {type(text).__name__}")

    stripped = text.strip()
    transformer_lens = _TL_BLOCK.match(stripped)
    if transformer_lens:
        name = transformer_lens["name"]
        layer = transformer_lens["layer"]
        if name == "attn.hook_z":
            stripped = f"pre_mlp[{layer}].heads[*]"
        else:
            stripped = f"{KIND_ALIASES[name]}[{layer}]"

    match = _SITE.match(stripped)
    if not match:
        raise SiteError(f"invalid site {text!r}: valid sites are {_valid_sites_text()}")
    kind = KIND_ALIASES.get(match["kind"], match["kind"])
    if kind not in SITE_KINDS:
        raise SiteError(f"unknown site kind {match['kind']!r} in {text!r}: valid sites are {_valid_sites_text()}")

    layers_text = match["layers"]
    heads_text = match["heads"]
    if kind in LAYERED_KINDS:
        if layers_text is None:
            raise SiteError(f"site {text!r} needs a layer, e.g. {kind}[3], {kind}[-1], {kind}[4:8] or {kind}[*]")
        layers = Selector.parse(layers_text, "layer")
    else:
        if layers_text is not None:
            raise SiteError(f"site {text!r}: {kind} takes no layer index")
        layers = None
    heads = None
    if heads_text is not None:
        if kind != "pre_mlp":
            raise SiteError(f"site {text!r}: heads can only be addressed at pre_mlp[l].heads[...]")
        heads = Selector.parse(heads_text, "head")
    return SiteSpec(kind, layers, heads, match["tower"])
