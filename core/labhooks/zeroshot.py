"""Zero-shot classification with an encoder and class prompts, as one hookable module.

:class:`ZeroShotClassifier` wraps an encoder and one prompt (or several) per class. Its
forward returns logits of shape (batch, classes), and two of its submodules are sites:

* ``embeddings``: the embedding of each input used for similarity, after pooling and
  projection and before L2 normalisation, shape (batch, embedding width);
* ``logits``: ``logit_scale * cos(embedding, class embedding) + logit_bias``, shape
  (batch, classes).

Supported encoders: sentence encoders loaded with transformers (mean pooling over the
attention mask, for example all-MiniLM-L6-v2), transformers' ``CLIPModel`` and open_clip
models, each with text or image inputs. ``post_block[l]`` reaches the blocks of the input
encoder. The site layout is :data:`ZEROSHOT_ADAPTER`, which the ``roboshot`` plugin
registers.

The evaluation helpers report accuracy and, with group labels, average accuracy,
worst-group accuracy and their gap.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labhooks.architectures import ArchitectureAdapter, TowerLayout
from labhooks.config import option
from labhooks.errors import ConfigError
from labhooks.models import LoadedModel
from labhooks.progress import LoggingProgress, Progress

logger = logging.getLogger(__name__)

ZEROSHOT_MODEL_TYPE = "labhooks_zeroshot"

# The similarity scale of sentence encoders, which define none: the default ``scale`` of
# sentence-transformers' MultipleNegativesRankingLoss (20.0 in sentence-transformers 6.3).
SENTENCE_ENCODER_LOGIT_SCALE = 20.0

ClassPrompts = Sequence[str | Sequence[str]]
TextEncoder = Callable[[list[str]], torch.Tensor]


@dataclass
class ZeroShotConfig:
    """Facts about a :class:`ZeroShotClassifier` that site resolution and bundles read.

    ``hidden_size`` is the width of the input encoder's blocks (the ``post_block`` sites).
    The ``embeddings`` site takes its width from its own module: the projection of
    transformers' CLIP, the ``output_dim`` of an open_clip embedder, and ``hidden_size``
    again for sentence encoders, whose embedding is the mean of the last block's output.
    """

    hidden_size: int
    num_labels: int
    encoder_type: str
    modality: str
    logit_scale: float
    logit_bias: float = 0.0
    model_type: str = ZEROSHOT_MODEL_TYPE
    _name_or_path: str | None = None


class ClassSimilarityHead(nn.Module):
    """The ``logits`` site: scaled cosine similarity of each embedding with each class embedding."""

    class_embeddings: torch.Tensor

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float, logit_bias: float = 0.0) -> None:
        super().__init__()
        if class_embeddings.dim() != 2:
            raise ValueError(f"class_embeddings must have shape (classes, width), got {tuple(class_embeddings.shape)}")
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.detach().float(), dim=-1))
        self.logit_scale = float(logit_scale)
        self.logit_bias = float(logit_bias)
        # Site resolution reads the logits width from ``out_features``.
        self.in_features = int(class_embeddings.shape[1])
        self.out_features = int(class_embeddings.shape[0])

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        normalized = F.normalize(embeddings, dim=-1)
        class_embeddings = self.class_embeddings.to(device=normalized.device, dtype=normalized.dtype)
        return self.logit_scale * normalized @ class_embeddings.T + self.logit_bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, logit_scale={self.logit_scale:g}"


# Embedders: the input side of a classifier. ``forward`` produces the ``embeddings`` site;
# ``encode`` computes the same values without passing through that site's hook, for class
# prompts and insight texts.


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average token states over the real (unmasked) tokens of each row."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class MeanPoolingEmbedder(nn.Module):
    """A transformers encoder whose token states are mean-pooled over the attention mask."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 256) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        options = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            options["token_type_ids"] = token_type_ids
        output = self.model(input_ids=input_ids, **options)
        return mean_pool(output.last_hidden_state, attention_mask)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.encode(input_ids, attention_mask, token_type_ids)


class CLIPTextEmbedder(nn.Module):
    """The text tower of a transformers ``CLIPModel``: pooled output, then ``text_projection``."""

    def __init__(self, text_model: nn.Module, text_projection: nn.Linear, tokenizer: Any, max_length: int = 77) -> None:
        super().__init__()
        self.text_model = text_model
        self.text_projection = text_projection
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}

    def _pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(self._pooled(input_ids, attention_mask), self.text_projection.weight, self.text_projection.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_projection(self._pooled(input_ids, attention_mask))


class CLIPImageEmbedder(nn.Module):
    """The vision tower of a transformers ``CLIPModel``: pooled output, then ``visual_projection``."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Linear) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def _pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).pooler_output

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.linear(self._pooled(pixel_values), self.visual_projection.weight, self.visual_projection.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self._pooled(pixel_values))


class OpenCLIPTextEmbedder(nn.Module):
    """The text side of an open_clip model (``encode_text``, unnormalised)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.output_dim: int | None = None  # the embedding width, set once measured

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(texts)}

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, normalize=False)  # type: ignore[operator]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encode(input_ids)


class OpenCLIPImageEmbedder(nn.Module):
    """The vision tower of an open_clip model (``model.visual``, projected and unnormalised)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.output_dim: int | None = None  # the embedding width, set once measured

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.visual(pixel_values)
        return output[0] if isinstance(output, tuple) else output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode(pixel_values)


def _batched_encode(
    encode: Callable[..., torch.Tensor], tokenize: Callable[[list[str]], dict[str, torch.Tensor]], device: torch.device, batch_size: int
) -> TextEncoder:
    @torch.no_grad()
    def encode_texts(texts: list[str]) -> torch.Tensor:
        parts = []
        for start in range(0, len(texts), batch_size):
            inputs = {key: value.to(device) for key, value in tokenize(texts[start : start + batch_size]).items()}
            parts.append(encode(**inputs).float().cpu())
        return torch.cat(parts) if parts else torch.empty(0)

    return encode_texts


def _device_of(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def _is_open_clip(model: nn.Module) -> bool:
    return type(model).__module__.startswith("open_clip")


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


class ZeroShotClassifier(nn.Module):
    """Zero-shot classification by similarity between input embeddings and class-prompt embeddings.

    Build one with :meth:`from_model` (or :meth:`from_loaded`). The constructor takes the
    parts directly; an embedder of another kind must keep its block list at one of the
    paths of :data:`ZEROSHOT_ADAPTER`, or :func:`labhooks.attach` cannot resolve sites on
    it. Class prompts are embedded once, at construction, so interventions attached later
    never edit them. Each class may have several prompts, whose normalised embeddings are
    averaged.

    ``forward(**inputs)`` takes what the embedder takes: ``input_ids`` (and
    ``attention_mask``) for text, ``pixel_values`` for images. :meth:`predict_logits` takes
    raw texts or an image tensor and batches them.
    """

    def __init__(
        self,
        embedder: nn.Module,
        encode_texts: TextEncoder,
        class_prompts: ClassPrompts,
        *,
        config: ZeroShotConfig,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        prompts = _normalise_prompts(class_prompts)
        self.class_names = list(class_names) if class_names is not None else [group[0] for group in prompts]
        if len(self.class_names) != len(prompts):
            raise ConfigError(f"got {len(self.class_names)} class names but {len(prompts)} prompt sets; give one prompt set per class")
        self.class_prompts = prompts
        self.embedder = embedder
        # A plain attribute, not a submodule: the text side of an image classifier stays out
        # of the state dict and out of site resolution.
        self._encode_texts = encode_texts
        self.head = ClassSimilarityHead(self._class_embeddings(prompts), config.logit_scale, config.logit_bias)
        config.num_labels = len(prompts)
        self.config = config

    # Construction ----------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Any,
        class_prompts: ClassPrompts,
        *,
        class_names: Sequence[str] | None = None,
        modality: str | None = None,
        logit_scale: float | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        name: str | None = None,
    ) -> ZeroShotClassifier:
        """Build a classifier around a sentence encoder, a transformers CLIPModel or an open_clip model.

        ``modality`` is "text" or "image" (default: "image" for CLIP models, "text" for
        sentence encoders). ``logit_scale`` defaults to the CLIP model's own
        ``exp(logit_scale)``, and to :data:`SENTENCE_ENCODER_LOGIT_SCALE` for sentence
        encoders. ``tokenizer`` is the model's tokenizer (open_clip: from
        ``open_clip.get_tokenizer``).
        """
        if _is_open_clip(model):
            return cls._from_open_clip(model, tokenizer, class_prompts, class_names, modality or "image", logit_scale, batch_size, name)
        if _model_type(model) == "clip":
            return cls._from_clip(
                model, tokenizer, class_prompts, class_names, modality or "image", logit_scale, max_length, batch_size, name
            )
        if getattr(model, "config", None) is None:
            raise ConfigError(
                f"cannot build a zero-shot classifier around {type(model).__name__}: expected a transformers "
                "sentence encoder, a transformers CLIPModel or an open_clip model"
            )
        if modality not in (None, "text"):
            raise ConfigError(f"a sentence encoder classifies text, not {modality!r}; leave modality unset")
        return cls._from_sentence_encoder(model, tokenizer, class_prompts, class_names, logit_scale, max_length, batch_size, name)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, class_prompts: ClassPrompts, **options: Any) -> ZeroShotClassifier:
        """Build a classifier from :func:`labhooks.load_model` output (``kind="encoder"``)."""
        options.setdefault("name", loaded.name)
        return cls.from_model(loaded.model, loaded.tokenizer, class_prompts, **options)

    @classmethod
    def _from_sentence_encoder(
        cls,
        model: nn.Module,
        tokenizer: Any,
        class_prompts: ClassPrompts,
        class_names: Sequence[str] | None,
        logit_scale: float | None,
        max_length: int | None,
        batch_size: int,
        name: str | None,
    ) -> ZeroShotClassifier:
        if tokenizer is None:
            raise ConfigError("a sentence encoder needs its tokenizer to embed the class prompts")
        embedder = MeanPoolingEmbedder(model, tokenizer, max_length or 256)
        encode_texts = _batched_encode(embedder.encode, embedder.tokenize, _device_of(model), batch_size)
        model_config: Any = model.config
        hidden_size = int(model_config.hidden_size)
        config = ZeroShotConfig(
            hidden_size=hidden_size,
            num_labels=0,
            encoder_type="sentence_encoder",
            modality="text",
            logit_scale=SENTENCE_ENCODER_LOGIT_SCALE if logit_scale is None else float(logit_scale),
            _name_or_path=name or getattr(model_config, "_name_or_path", None),
        )
        return cls(embedder, encode_texts, class_prompts, config=config, class_names=class_names)

    @classmethod
    def _from_clip(
        cls,
        model: nn.Module,
        tokenizer: Any,
        class_prompts: ClassPrompts,
        class_names: Sequence[str] | None,
        modality: str,
        logit_scale: float | None,
        max_length: int | None,
        batch_size: int,
        name: str | None,
    ) -> ZeroShotClassifier:
        if tokenizer is None:
            raise ConfigError("a CLIP classifier needs the CLIP tokenizer to embed the class prompts")
        model_config: Any = model.config
        text_length = max_length or int(model_config.text_config.max_position_embeddings)
        text_embedder = CLIPTextEmbedder(model.text_model, model.text_projection, tokenizer, text_length)  # type: ignore[arg-type]
        encode_texts = _batched_encode(text_embedder.encode, text_embedder.tokenize, _device_of(model), batch_size)
        if modality == "text":
            embedder: nn.Module = text_embedder
            hidden_size = int(model_config.text_config.hidden_size)
        elif modality == "image":
            embedder = CLIPImageEmbedder(model.vision_model, model.visual_projection)  # type: ignore[arg-type]
            hidden_size = int(model_config.vision_config.hidden_size)
        else:
            raise ConfigError(f"invalid modality {modality!r}: choose text or image")
        config = ZeroShotConfig(
            hidden_size=hidden_size,
            num_labels=0,
            encoder_type="clip",
            modality=modality,
            logit_scale=float(model.logit_scale.detach().exp()) if logit_scale is None else float(logit_scale),  # type: ignore[operator]
            _name_or_path=name or getattr(model_config, "_name_or_path", None) or "clip",
        )
        return cls(embedder, encode_texts, class_prompts, config=config, class_names=class_names)

    @classmethod
    def _from_open_clip(
        cls,
        model: nn.Module,
        tokenizer: Any,
        class_prompts: ClassPrompts,
        class_names: Sequence[str] | None,
        modality: str,
        logit_scale: float | None,
        batch_size: int,
        name: str | None,
    ) -> ZeroShotClassifier:
        if tokenizer is None:
            raise ConfigError("an open_clip classifier needs the model's tokenizer (open_clip.get_tokenizer(model_name))")
        text_embedder = OpenCLIPTextEmbedder(model, tokenizer)
        encode_texts = _batched_encode(text_embedder.encode, text_embedder.tokenize, _device_of(model), batch_size)
        if modality == "text":
            embedder: OpenCLIPTextEmbedder | OpenCLIPImageEmbedder = text_embedder
        elif modality == "image":
            embedder = OpenCLIPImageEmbedder(model.visual)  # type: ignore[arg-type]
        else:
            raise ConfigError(f"invalid modality {modality!r}: choose text or image")
        embedding_width = int(encode_texts(["a"]).shape[-1])
        # The embeddings site reads its width from ``output_dim``, and post_block[l] reads
        # the tower width from the config.
        embedder.output_dim = embedding_width
        tower = model.transformer if modality == "text" else getattr(model.visual, "transformer", None)
        bias = getattr(model, "logit_bias", None)
        config = ZeroShotConfig(
            hidden_size=int(getattr(tower, "width", embedding_width)),
            num_labels=0,
            encoder_type="open_clip",
            modality=modality,
            logit_scale=float(model.logit_scale.detach().exp()) if logit_scale is None else float(logit_scale),  # type: ignore[operator]
            logit_bias=float(bias) if isinstance(bias, torch.Tensor) else 0.0,
            _name_or_path=name or "open_clip",
        )
        return cls(embedder, encode_texts, class_prompts, config=config, class_names=class_names)

    # Use -------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Return unnormalised text embeddings in the classifier's embedding space, on the CPU.

        The ``embeddings`` site hook does not run here. Hooks on encoder blocks
        (``post_block[l]``) do, for text classifiers, so embed texts before attaching those.
        """
        texts = list(texts)
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("embed_texts takes a sequence of strings")
        return self._encode_texts(texts)

    def _class_embeddings(self, prompts: list[list[str]]) -> torch.Tensor:
        flat = [prompt for group in prompts for prompt in group]
        embeddings = F.normalize(self._encode_texts(flat), dim=-1)
        rows = []
        start = 0
        for group in prompts:
            rows.append(embeddings[start : start + len(group)].mean(dim=0))
            start += len(group)
        return torch.stack(rows)

    def prepare_inputs(self, batch: Sequence[str] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Turn raw texts (tokenized) or an image tensor into ``forward`` keyword arguments."""
        device = _device_of(self.embedder)
        if isinstance(batch, torch.Tensor):
            if self.config.modality != "image":
                raise TypeError("this classifier takes texts; pass a list of strings")
            return {"pixel_values": batch.to(device)}
        if self.config.modality != "text":
            raise TypeError("this classifier takes images; pass a (batch, channels, height, width) tensor")
        tokenize: Callable[[list[str]], dict[str, torch.Tensor]] = self.embedder.tokenize  # type: ignore[assignment]
        return {key: value.to(device) for key, value in tokenize(list(batch)).items()}

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(**inputs))

    @torch.no_grad()
    def predict_logits(
        self, inputs: Sequence[str] | torch.Tensor, batch_size: int = 32, progress: Progress | None = None, description: str = "classifying"
    ) -> torch.Tensor:
        """Return the logits (inputs, classes) on the CPU, running ``forward`` in batches.

        Interventions attached to this classifier run on every batch; an intervention that
        rebalances a batch at the ``logits`` site receives ``batch_size`` rows at a time.
        """
        return self._run_batches(lambda batch: self(**batch), inputs, batch_size, progress, description, self.num_classes)

    @torch.no_grad()
    def predict_embeddings(
        self, inputs: Sequence[str] | torch.Tensor, batch_size: int = 32, progress: Progress | None = None, description: str = "embedding"
    ) -> torch.Tensor:
        """Return the ``embeddings`` site values (inputs, width) on the CPU; hooks up to that site run.

        ``classifier.head(embeddings)`` then gives the logits, so one pass over the inputs
        serves several edits of the embedding.
        """
        return self._run_batches(lambda batch: self.embedder(**batch), inputs, batch_size, progress, description, self.head.in_features)

    def _run_batches(
        self,
        run: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        inputs: Sequence[str] | torch.Tensor,
        batch_size: int,
        progress: Progress | None,
        description: str,
        width: int,
    ) -> torch.Tensor:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        progress = progress or LoggingProgress()
        starts = list(range(0, len(inputs), batch_size))
        parts = []
        for start in progress.track(starts, description, total=len(starts)):
            chunk = inputs[start : start + batch_size]
            parts.append(run(self.prepare_inputs(chunk)).float().cpu())
        if not parts:
            return torch.empty(0, width)
        return torch.cat(parts)

    def metadata(self) -> dict[str, Any]:
        """Return what rebuilds this classifier around the same encoder: JSON values for a bundle."""
        return {
            "class_names": list(self.class_names),
            "class_prompts": [list(group) for group in self.class_prompts],
            "modality": self.config.modality,
            "logit_scale": self.config.logit_scale,
            "encoder_type": self.config.encoder_type,
        }

    def extra_repr(self) -> str:
        return f"encoder={self.config.encoder_type}, modality={self.config.modality}, classes={self.class_names}"


def _normalise_prompts(class_prompts: ClassPrompts) -> list[list[str]]:
    if isinstance(class_prompts, str) or not isinstance(class_prompts, Sequence) or len(class_prompts) < 2:
        raise ConfigError(f"class_prompts must list at least two classes (one prompt or a list of prompts each), got {class_prompts!r}")
    prompts = []
    for index, item in enumerate(class_prompts):
        group = [item] if isinstance(item, str) else list(item)
        if not group or not all(isinstance(text, str) and text.strip() for text in group):
            raise ConfigError(f"class prompt {index} ({item!r}) is empty; give each class at least one non-empty prompt")
        prompts.append(group)
    return prompts


def classifier_from_metadata(loaded: LoadedModel, metadata: Mapping[str, Any], **options: Any) -> ZeroShotClassifier:
    """Rebuild the classifier a bundle was fitted on, from the bundle's ``zeroshot`` metadata."""
    try:
        prompts = metadata["class_prompts"]
    except (KeyError, TypeError):
        raise ConfigError(
            "the metadata contains no zero-shot classifier (no 'class_prompts'); pass the metadata of a roboshot or otter bundle"
        ) from None
    options.setdefault("class_names", metadata.get("class_names"))
    options.setdefault("modality", metadata.get("modality"))
    if metadata.get("encoder_type") == "sentence_encoder":
        options.setdefault("logit_scale", metadata.get("logit_scale"))
    return ZeroShotClassifier.from_loaded(loaded, prompts, **options)


ZEROSHOT_ADAPTER = ArchitectureAdapter(
    name="zero-shot classifier",
    model_types=(ZEROSHOT_MODEL_TYPE,),
    towers={
        "input": TowerLayout(
            layers=(
                "embedder.model.encoder.layer",
                "embedder.model.transformer.layer",
                "embedder.model.layers",
                "embedder.text_model.encoder.layers",
                "embedder.vision_model.encoder.layers",
                "embedder.model.transformer.resblocks",
                "embedder.visual.transformer.resblocks",
            ),
            attention=None,
            mlp=None,
            embeddings=("embedder.visual_projection", "embedder.text_projection", "embedder"),
            logits=("head",),
        )
    },
    default_tower="input",
    notes=(
        "embeddings is the input's embedding used for similarity (pooled and projected, not "
        "normalised); logits is the (batch, classes) similarity. post_block[l] is the input "
        "encoder's residual stream; pre_mlp and post_mlp are reached by attaching to the encoder "
        "itself."
    ),
)


# Evaluation ----------------------------------------------------------------------------


def accuracy(predictions: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int]) -> float:
    """Return the fraction of predictions equal to the labels."""
    predicted = torch.as_tensor(predictions).reshape(-1)
    expected = torch.as_tensor(labels).reshape(-1)
    if predicted.numel() != expected.numel():
        raise ValueError(f"got {predicted.numel()} predictions for {expected.numel()} labels")
    if predicted.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((predicted == expected).float().mean())


@dataclass
class GroupAccuracy:
    """Accuracy over groups: average (over all inputs), worst group and the gap between them."""

    average: float
    worst_group: float
    gap: float
    per_group: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def as_row(self, scale: float = 100.0) -> list[float]:
        """Return [average, worst group, gap], in percent by default."""
        return [round(self.average * scale, 2), round(self.worst_group * scale, 2), round(self.gap * scale, 2)]


def group_accuracy(predictions: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int], groups: Sequence[Any]) -> GroupAccuracy:
    """Return average accuracy, worst-group accuracy and their gap (average minus worst group)."""
    predicted = torch.as_tensor(predictions).reshape(-1)
    expected = torch.as_tensor(labels).reshape(-1)
    if len(groups) != expected.numel():
        raise ValueError(f"got {len(groups)} group labels for {expected.numel()} inputs")
    correct = (predicted == expected).float()
    per_group: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name in sorted({str(group) for group in groups}):
        index = torch.tensor([str(group) == name for group in groups])
        per_group[name] = float(correct[index].mean())
        counts[name] = int(index.sum())
    average = accuracy(predicted, expected)
    worst = min(per_group.values())
    return GroupAccuracy(average, worst, average - worst, per_group, counts)


# Labeled text files ----------------------------------------------------------------------


@dataclass
class LabeledTexts:
    """Texts with optional class indices and group labels, read from a data file."""

    texts: list[str]
    labels: torch.Tensor | None
    groups: list[str] | None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | torch.Tensor) -> LabeledTexts:
        positions = torch.as_tensor(index, dtype=torch.long).tolist()
        return LabeledTexts(
            [self.texts[i] for i in positions],
            self.labels[positions] if self.labels is not None else None,
            [self.groups[i] for i in positions] if self.groups is not None else None,
        )


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL, JSON (a list of objects) or CSV file into a list of dicts."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"data file {str(source)!r} not found")
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ConfigError(f"{source}:{number} is not valid JSON ({error})") from None
    elif suffix == ".json":
        try:
            records = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source} is not valid JSON ({error})") from None
        if not isinstance(records, list):
            raise ConfigError(f"{source} must contain a JSON list of objects")
    elif suffix == ".csv":
        with source.open(newline="", encoding="utf-8") as handle:
            records = list(csv.DictReader(handle))
    else:
        raise ConfigError(f"data file {str(source)!r} must end in .jsonl, .json or .csv")
    if not records or not all(isinstance(record, dict) for record in records):
        raise ConfigError(f"{source} contains no records (objects with named fields)")
    return records


def _label_index(value: Any, classes: Sequence[str], where: str) -> int:
    if isinstance(value, str) and value in classes:
        return list(classes).index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(classes):
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) < len(classes):
        return int(value)
    raise ConfigError(f"{where}: label {value!r} is not one of the classes {', '.join(classes)} (nor an index 0 to {len(classes) - 1})")


def read_labeled_texts(
    path: str | Path,
    classes: Sequence[str],
    text_field: str = "text",
    label_field: str = "label",
    group_field: str | None = "group",
) -> LabeledTexts:
    """Read texts, labels (class names or indices) and groups from a JSONL, JSON or CSV file.

    Labels and groups are optional, but a file either labels every record or none.
    """
    records = read_records(path)
    texts = []
    for number, record in enumerate(records, start=1):
        text = record.get(text_field)
        if not isinstance(text, str) or not text.strip():
            fields = ", ".join(sorted(record))
            raise ConfigError(f"{path}: record {number} has no text in field {text_field!r} (its fields: {fields}); set text_field=")
        texts.append(text)

    labels = None
    with_label = [label_field in record and record[label_field] not in (None, "") for record in records]
    if any(with_label):
        if not all(with_label):
            missing = with_label.index(False) + 1
            raise ConfigError(f"{path}: record {missing} has no {label_field!r}, but others do; label every record or none")
        labels = torch.tensor(
            [_label_index(record[label_field], classes, f"{path}: record {number}") for number, record in enumerate(records, start=1)]
        )

    groups = None
    if group_field and any(group_field in record for record in records):
        groups = [str(record.get(group_field, "")) for record in records]
    return LabeledTexts(texts, labels, groups)


@dataclass
class TextDataConfig:
    """Options shared by methods that classify a file of texts zero-shot.

    Method configs extend it with their own fields; ``validate`` checks the shared ones.
    """

    data: str = option("", "JSONL, JSON or CSV file of inputs: a text field and an optional label field")
    classes: list[str] = option([], "class names, comma-separated, in the order of label indices")
    class_prompts: list[str] = option([], "one prompt per class, comma-separated (default: the class names)")
    text_field: str = option("text", "field of the data file that contains the text")
    label_field: str = option("label", "field that contains the label (a class name or index)")
    limit: int | None = option(None, "use only the first N records of the data file", unit="records")
    logit_scale: float | None = option(None, "similarity scale (default: the CLIP model's own, 20 for sentence encoders)")
    max_length: int = option(256, "token limit of each input text", unit="tokens")
    batch_size: int = option(32, "inputs per forward pass", unit="inputs")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("missing data=FILE: a JSONL, JSON or CSV file of texts to classify")
        if len(self.classes) < 2:
            raise ConfigError(f"classes= needs at least two class names, comma-separated; got {self.classes}")
        if self.class_prompts and len(self.class_prompts) != len(self.classes):
            raise ConfigError(f"class_prompts= gives {len(self.class_prompts)} prompts for {len(self.classes)} classes; give one per class")
        for name in ("max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")

    def read_data(self, group_field: str | None = None) -> LabeledTexts:
        """Read the data file, keeping the first ``limit`` records."""
        data = read_labeled_texts(self.data, self.classes, self.text_field, self.label_field, group_field)
        if self.limit is not None:
            data = data.subset(range(min(self.limit, len(data))))
        return data

    def classifier(self, loaded: LoadedModel) -> ZeroShotClassifier:
        """Build the zero-shot classifier these options describe around a loaded encoder."""
        return ZeroShotClassifier.from_loaded(
            loaded,
            self.class_prompts or self.classes,
            class_names=self.classes,
            logit_scale=self.logit_scale,
            max_length=self.max_length,
            batch_size=self.batch_size,
        )
