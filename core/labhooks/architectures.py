"""Architecture adapters: where each site lives in a model family.

One :class:`ArchitectureAdapter` per family, keyed by the Hugging Face ``model_type``
string (never by Python class), names the block list, the attention and MLP submodules and
the attention output projection. Paths are tried in order, so one adapter serves both the
bare model (``LlamaModel``) and the one with a head (``LlamaForCausalLM``). Models that have
no ``model_type`` (open_clip) are matched by ``detect``.

Plugins add adapters through the ``labhooks_architectures`` hook.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TowerLayout:
    """Where the sites of one tower (a stack of blocks) live.

    ``layers`` and ``embeddings``/``logits`` are dotted paths from the model root;
    ``attention``, ``mlp`` and ``attention_output_projection`` are paths inside one block.
    The attention module's output (or its first element, for tuples) is the attention output
    before the residual add; the projection's input is the concatenation of the heads.
    """

    layers: tuple[str, ...]
    attention: str | None
    mlp: str | None
    attention_output_projection: str | None = None
    embeddings: tuple[str, ...] = ()
    logits: tuple[str, ...] = ()
    config_attribute: str | None = None


@dataclass(frozen=True)
class ArchitectureAdapter:
    """The site table of one model family.

    ``parallel_block`` marks families whose attention and MLP both read the block input
    (GPT-NeoX, GPT-J, Phi-1/2): there ``pre_mlp`` is the attention output, which the MLP
    does not read, and the residual stream has no point between attention and MLP.
    """

    name: str
    model_types: tuple[str, ...]
    towers: Mapping[str, TowerLayout]
    default_tower: str = "text"
    parallel_block: Callable[[Any], bool] | bool = False
    detect: Callable[[nn.Module], bool] | None = None
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def is_parallel(self, config: Any) -> bool:
        if callable(self.parallel_block):
            return bool(self.parallel_block(config))
        return bool(self.parallel_block)


_LLAMA_LIKE = TowerLayout(
    layers=("model.layers", "layers", "model.language_model.layers", "language_model.layers"),
    attention="self_attn",
    mlp="mlp",
    attention_output_projection="self_attn.o_proj",
    embeddings=("model.embed_tokens", "embed_tokens", "model.language_model.embed_tokens"),
    logits=("lm_head",),
)

# Gemma 2 and 3 normalise the attention and MLP outputs before the residual add, so the
# value added to the residual stream is the output of those norms.
_GEMMA2_LIKE = TowerLayout(
    layers=_LLAMA_LIKE.layers,
    attention="post_attention_layernorm",
    mlp="post_feedforward_layernorm",
    attention_output_projection="self_attn.o_proj",
    embeddings=_LLAMA_LIKE.embeddings,
    logits=("lm_head",),
)

_BERT_LIKE = TowerLayout(
    layers=("bert.encoder.layer", "roberta.encoder.layer", "electra.encoder.layer", "encoder.layer"),
    attention="attention.output.dense",
    mlp="output.dense",
    attention_output_projection="attention.output.dense",
    embeddings=("bert.embeddings", "roberta.embeddings", "electra.embeddings", "embeddings"),
    logits=("cls.predictions.decoder", "lm_head.decoder", "classifier"),
)

BUILTIN_ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter(
        name="llama-like decoders",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2", "smollm3"),
        towers={"text": _LLAMA_LIKE},
        notes=(
            "Pre-norm decoder. Gemma's embed_tokens multiplies by sqrt(hidden_size) itself "
            "(transformers 5), so the embeddings site sees scaled embeddings."
        ),
    ),
    ArchitectureAdapter(
        name="gemma2/gemma3 decoders",
        model_types=("gemma2", "gemma3", "gemma3_text"),
        towers={"text": _GEMMA2_LIKE},
        notes=(
            "pre_mlp and post_mlp are the outputs of post_attention_layernorm and "
            "post_feedforward_layernorm, the values added to the residual stream. head_dim is "
            "set in the config and need not equal hidden_size / heads. The embeddings site "
            "sees embeddings already scaled by sqrt(hidden_size), which embed_tokens applies "
            "(transformers 5)."
        ),
    ),
    ArchitectureAdapter(
        name="gpt2",
        model_types=("gpt2",),
        towers={
            "text": TowerLayout(
                layers=("transformer.h", "h"),
                attention="attn",
                mlp="mlp",
                attention_output_projection="attn.c_proj",
                embeddings=("transformer.wte", "wte"),
                logits=("lm_head",),
            )
        },
        notes="The embeddings site is the token embedding (wte); position embeddings are added after it.",
    ),
    ArchitectureAdapter(
        name="gpt_neox",
        model_types=("gpt_neox",),
        towers={
            "text": TowerLayout(
                layers=("gpt_neox.layers", "layers"),
                attention="attention",
                mlp="mlp",
                attention_output_projection="attention.dense",
                embeddings=("gpt_neox.embed_in", "embed_in"),
                logits=("embed_out", "lm_head"),
            )
        },
        parallel_block=lambda config: getattr(config, "use_parallel_residual", True),
        notes=(
            "With use_parallel_residual (the default, as in Pythia) the block computes "
            "x + attn(ln1(x)) + mlp(ln2(x)): pre_mlp is the attention output, which the MLP does "
            "not read, and post_block is the only residual-stream site."
        ),
    ),
    ArchitectureAdapter(
        name="bert-like encoders",
        model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
        towers={"text": _BERT_LIKE},
        notes=(
            "Post-norm encoder: each sublayer's LayerNorm is applied after the residual add, "
            "so post_block is the LayerNorm output. embeddings is the embedding layer output "
            "(word + position + token type, normalised)."
        ),
    ),
    ArchitectureAdapter(
        name="distilbert",
        model_types=("distilbert",),
        towers={
            "text": TowerLayout(
                layers=("distilbert.transformer.layer", "transformer.layer"),
                attention="attention",
                mlp="ffn",
                attention_output_projection="attention.out_lin",
                embeddings=("distilbert.embeddings", "embeddings"),
            )
        },
        notes="Post-norm encoder, like BERT.",
    ),
    ArchitectureAdapter(
        name="clip (transformers)",
        model_types=("clip", "clip_text_model", "clip_vision_model"),
        towers={
            "text": TowerLayout(
                layers=("text_model.encoder.layers",),
                attention="self_attn",
                mlp="mlp",
                attention_output_projection="self_attn.out_proj",
                embeddings=("text_projection",),
                config_attribute="text_config",
            ),
            "vision": TowerLayout(
                layers=("vision_model.encoder.layers",),
                attention="self_attn",
                mlp="mlp",
                attention_output_projection="self_attn.out_proj",
                embeddings=("visual_projection",),
                config_attribute="vision_config",
            ),
        },
        notes=(
            "Two towers: prefix sites with text. or vision. (text is the default). embeddings is "
            "the projected embedding used for image-text similarity (text_projection, "
            "visual_projection). Vision sites have patch positions, so only the 'all' position "
            "selector applies there."
        ),
    ),
    ArchitectureAdapter(
        name="open_clip",
        model_types=("open_clip",),
        towers={
            "text": TowerLayout(layers=("transformer.resblocks",), attention="ls_1", mlp="ls_2"),
            "vision": TowerLayout(layers=("visual.transformer.resblocks",), attention="ls_1", mlp="ls_2", embeddings=("visual",)),
        },
        detect=lambda model: type(model).__module__.startswith("open_clip"),
        notes=(
            "pre_mlp and post_mlp are the outputs of the layer-scale modules ls_1 and ls_2 "
            "(identity when layer scale is off). Heads are not addressable: "
            "nn.MultiheadAttention applies its output projection without calling the module. "
            "The text tower's projected embedding is a bare parameter product with no module "
            "to hook, so text.embeddings is unavailable; the zero-shot classifier wrapper "
            "exposes it."
        ),
    ),
)


def model_type_of(model: nn.Module) -> str | None:
    """Return the Hugging Face ``model_type`` of a model, or None for other modules."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) else None


def find_adapter(model: nn.Module, adapters: tuple[ArchitectureAdapter, ...]) -> ArchitectureAdapter | None:
    """Find the adapter for a model: by ``model_type`` first, then by each ``detect``."""
    model_type = model_type_of(model)
    if model_type is not None:
        for adapter in adapters:
            if model_type in adapter.model_types:
                return adapter
    for adapter in adapters:
        if adapter.detect is not None and adapter.detect(model):
            return adapter
    return None


_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_PROJECTION_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")


def structural_adapter(model: nn.Module) -> ArchitectureAdapter | None:
    """Build an adapter for an unknown decoder by looking at its module tree.

    The block list is the longest ``nn.ModuleList`` whose children share one class; the
    attention and MLP submodules and the output projection are found by their usual names.
    Returns None when no block list is found.
    """
    best_path = None
    best_length = 0
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_length:
            classes = {type(child) for child in module}
            if len(classes) == 1:
                best_path, best_length = path, len(module)
    if best_path is None:
        return None

    block = next(iter(model.get_submodule(best_path).children()))
    children = dict(block.named_children())
    attention = next((name for name in _ATTENTION_NAMES if name in children), None)
    mlp = next((name for name in _MLP_NAMES if name in children), None)
    projection = None
    if attention is not None:
        attention_children = dict(children[attention].named_children())
        found = next((name for name in _PROJECTION_NAMES if name in attention_children), None)
        projection = f"{attention}.{found}" if found else None

    embeddings: tuple[str, ...] = ()
    logits: tuple[str, ...] = ()
    names = {module: path for path, module in model.named_modules()}
    get_input = getattr(model, "get_input_embeddings", None)
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_input) and get_input() in names:
        embeddings = (names[get_input()],)
    if callable(get_output) and get_output() is not None and get_output() in names:
        logits = (names[get_output()],)

    logger.warning(
        "No architecture adapter for model_type %r; found blocks at %r by structure. "
        "Check `labhooks sites` and contribute an adapter if this family is common.",
        model_type_of(model),
        best_path,
    )
    return ArchitectureAdapter(
        name=f"structural fallback ({model_type_of(model) or type(model).__name__})",
        model_types=(),
        towers={"text": TowerLayout((best_path,), attention, mlp, projection, embeddings, logits)},
        notes="Found by structure, not from a table: check that each site is what you expect.",
    )
