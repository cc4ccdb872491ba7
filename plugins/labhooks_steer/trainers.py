"""The trainable methods of the steer plugin and their typed configs.

Each method builds its interventions (or wraps the model with LoRA), runs the core
trainer :func:`labhooks.training.fit` on the same data pipeline, and returns a
:class:`labhooks.training.TrainResult`. Activation-space methods freeze the base model;
the LoRA and full fine-tuning (SFT) baselines train weights, which the bundle stores as
``weights.*`` tensors (see :func:`apply_trained_weights`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from labhooks.bundles import Bundle
from labhooks.config import option
from labhooks.errors import ConfigError
from labhooks.intervention import Intervention, SteeringVector
from labhooks.models import LoadedModel
from labhooks.resolve import ModelSites, ResolvedSite
from labhooks.training import (
    WEIGHTS_PREFIX,
    TrainableMethod,
    TrainingConfig,
    TrainInputs,
    TrainResult,
    build_result,
    count_base_parameters,
    count_trainable_parameters,
    fit,
    load_checkpoint,
    load_weight_tensors,
    naming_for,
    split_examples,
    trainable_weights,
)
from labhooks_steer.interventions import ACTIVATIONS, JoLA, LoFIT, LowRankAdapter, ReFT

logger = logging.getLogger(__name__)

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Configs -----------------------------------------------------------------------------


@dataclass
class PostBlockConfig(TrainingConfig):
    """Options of the post-block low-rank adapter."""

    positive_options: ClassVar[tuple[str, ...]] = ("rank",)
    site: str = option("post_block[*]", "site of the adapters; one adapter per concrete site")
    positions: str = option("all", "token positions the adapters edit (all, prompt, last_prompt, last_prompt:K, ...)")
    rank: int = option(8, "adapter rank r (1: the rank-1 adapter)")
    activation: str = option(
        "silu", "nonlinearity φ between the down and up projections (none: the linear variant)", choices=tuple(ACTIVATIONS)
    )
    init_scale: float = option(1e-3, "factor on the Kaiming-uniform initialisation of W_down")


@dataclass
class VectorConfig(TrainingConfig):
    """Options of the fixed steering vector."""

    learning_rate: float = option(5e-3, "peak learning rate of AdamW")
    site: str = option("post_block[*]", "site of the vectors; one vector per concrete site")
    positions: str = option("all", "token positions the vectors are added at")


@dataclass
class ReFTConfig(TrainingConfig):
    """Options of LoReFT and its variants."""

    positive_options: ClassVar[tuple[str, ...]] = ("rank",)
    learning_rate: float = option(2e-3, "peak learning rate of AdamW")
    site: str = option("post_mlp[*]", "site of the interventions; one per concrete site")
    positions: str = option("last_prompt:5", "token positions edited (last_prompt, last_prompt:K, first_prompt:K, or a union with +)")
    rank: int = option(8, "rank r of the subspace R")
    variant: str = option("loreft", "loreft keeps R orthonormal; noreft drops the constraint", choices=("loreft", "noreft"))
    activation: str = option("none", "nonlinearity on both projections (none: LoReFT)", choices=tuple(ACTIVATIONS))


@dataclass
class LoFITConfig(TrainingConfig):
    """Options of LoFIT."""

    positive_options: ClassVar[tuple[str, ...]] = ("top_k",)
    learning_rate: float = option(5e-3, "peak learning rate of AdamW")
    site: str = option("pre_mlp[*].heads[*]", "head sites searched in the selection stage")
    positions: str = option("all", "token positions edited")
    top_k: int = option(16, "heads kept after the selection stage, ranked by ||A|| over all searched heads", unit="heads")
    l1: float = option(5e-4, "weight of the L1 penalty on the scales A in the selection stage")
    selection_steps: int | None = option(
        None, "steps of the selection stage (None: half of steps); the offset stage gets the rest", unit="steps"
    )

    def validate(self) -> None:
        super().validate()
        self.selection_stage_steps()

    def selection_stage_steps(self) -> int:
        """Return the steps of the selection stage; both stages need at least one."""
        chosen = self.selection_steps if self.selection_steps is not None else self.steps // 2
        if not 1 <= chosen < self.steps:
            raise ConfigError(
                f"invalid selection_steps={chosen}: must be between 1 and steps - 1 ({self.steps - 1}), so that both stages train"
            )
        return chosen


@dataclass
class JoLAConfig(TrainingConfig):
    """Options of JoLA."""

    learning_rate: float = option(5e-3, "peak learning rate of AdamW")
    site: str = option("pre_mlp[*].heads[*]", "head sites with gated edits")
    positions: str = option("all", "token positions edited")
    l0_weight: float = option(1e-3, "final weight of the expected-L0 penalty on the gates")
    l0_warmup: float = option(0.5, "fraction of the steps over which the L0 weight rises linearly from 0", unit="fraction")
    initial_log_alpha: float = option(1.0, "initial gate log-alpha (1.0 opens a deterministic gate to 0.78)")


@dataclass
class LoRAConfig(TrainingConfig):
    """Options of the LoRA baseline (peft)."""

    positive_options: ClassVar[tuple[str, ...]] = ("rank",)
    learning_rate: float = option(1e-3, "peak learning rate of AdamW")
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(16.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    dropout: float = option(0.0, "dropout on the LoRA input")
    target_modules: str = option(
        "all-linear", "comma-separated module names to adapt, or all-linear (every linear layer but the output head)"
    )


@dataclass
class SFTConfig(TrainingConfig):
    """Options of full fine-tuning."""

    learning_rate: float = option(5e-5, "peak learning rate of AdamW")


@dataclass
class JointConfig(LoRAConfig):
    """Options of LoRA and post-block adapters trained together."""

    positive_options: ClassVar[tuple[str, ...]] = ("rank", "adapter_rank")
    site: str = option("post_block[*]", "site of the adapters")
    positions: str = option("all", "token positions the adapters edit")
    adapter_rank: int = option(8, "rank of the post-block adapters")
    activation: str = option("silu", "nonlinearity of the adapters", choices=tuple(ACTIVATIONS))
    adapter_learning_rate: float = option(1e-3, "peak learning rate of the adapters (LoRA uses learning_rate)")


# Shared steps ------------------------------------------------------------------------


def resolve_sites(loaded: LoadedModel, site: str) -> list[ResolvedSite]:
    """Resolve a site string on the model, raising the core's SiteError on a bad one."""
    return ModelSites(loaded.model).resolve(site)


def _width(resolved: ResolvedSite) -> int:
    if resolved.width is None:
        raise ConfigError(f"site {resolved.site} has no known width on this model; choose a residual-stream or head site")
    return resolved.width


def _head_count(resolved: ResolvedSite) -> tuple[int, int]:
    if resolved.num_heads is None or resolved.head_dim is None:
        raise ConfigError(f"site {resolved.site} is not a head site; use pre_mlp[l].heads[...]")
    heads = len(resolved.site.heads) if resolved.site.heads is not None else resolved.num_heads
    return heads, resolved.head_dim


def _resume(config: TrainingConfig, model: nn.Module) -> Bundle | None:
    return load_checkpoint(config.resume_from, model) if config.resume_from else None


def _run(
    inputs: TrainInputs,
    method: str,
    interventions: Sequence[Intervention],
    *,
    model: nn.Module | None = None,
    freeze_base: bool = True,
    parameter_groups: Sequence[dict[str, Any]] | None = None,
    penalty: Callable[[float], torch.Tensor] | None = None,
    base_parameters: int | None = None,
) -> TrainResult:
    config: TrainingConfig = inputs.config
    train_examples, eval_examples = split_examples(config, inputs.examples, inputs.eval_examples)
    run_model = model if model is not None else inputs.loaded.model
    base = base_parameters if base_parameters is not None else count_base_parameters(inputs.loaded.model)
    fitted = fit(
        inputs.loaded,
        config,
        train_examples,
        eval_examples,
        interventions=interventions,
        model=run_model,
        freeze_base=freeze_base,
        parameter_groups=parameter_groups,
        penalty=penalty,
        naming=naming_for(inputs, method),
        resume=_resume(config, run_model),
        progress=inputs.progress,
    )
    parameters = count_trainable_parameters([run_model, *interventions], base)
    weights = {f"{WEIGHTS_PREFIX}{name}": tensor.detach() for name, tensor in trainable_weights(run_model).items()}
    return build_result(method, fitted, parameters, interventions=interventions, tensors=weights)


def _seed(config: TrainingConfig) -> None:
    torch.manual_seed(config.seed)


# Activation-space methods --------------------------------------------------------------


def build_post_block(loaded: LoadedModel, config: PostBlockConfig) -> list[Intervention]:
    """Build one low-rank adapter per concrete site of ``config.site``."""
    return [
        LowRankAdapter(resolved.site, _width(resolved), config.rank, config.activation, config.init_scale, config.positions)
        for resolved in resolve_sites(loaded, config.site)
    ]


def train_post_block(inputs: TrainInputs) -> TrainResult:
    _seed(inputs.config)
    return _run(inputs, "post_block", build_post_block(inputs.loaded, inputs.config))


def train_vector(inputs: TrainInputs) -> TrainResult:
    config: VectorConfig = inputs.config
    _seed(config)
    vectors: list[Intervention] = [
        SteeringVector(resolved.site, _width(resolved), positions=config.positions, trainable=True)
        for resolved in resolve_sites(inputs.loaded, config.site)
    ]
    return _run(inputs, "vector", vectors)


def build_reft(loaded: LoadedModel, config: ReFTConfig) -> list[Intervention]:
    """Build one ReFT intervention per concrete site of ``config.site``."""
    return [
        ReFT(resolved.site, _width(resolved), config.rank, config.variant, config.activation, config.positions)
        for resolved in resolve_sites(loaded, config.site)
    ]


def train_reft(inputs: TrainInputs) -> TrainResult:
    _seed(inputs.config)
    return _run(inputs, "reft", build_reft(inputs.loaded, inputs.config))


def select_heads(interventions: Sequence[LoFIT], top_k: int) -> dict[int, list[int]]:
    """Return the top-k heads by ||A|| over all interventions, as {layer: [head, ...]} in order.

    Head numbers are the model's, read from each intervention's site.
    """
    scored = []
    for intervention in interventions:
        norms = intervention.head_norms()
        for index, norm in enumerate(norms.tolist()):
            site = intervention.site
            layer = int(site.layers.text) if site.layers is not None else 0
            head = int(site.heads.text.split(",")[index]) if site.heads is not None and site.heads.text != "*" else index
            scored.append((norm, layer, head))
    scored.sort(key=lambda item: -item[0])
    chosen: dict[int, list[int]] = {}
    for _, layer, head in scored[:top_k]:
        chosen.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def train_lofit(inputs: TrainInputs) -> TrainResult:
    """Train LoFIT in two stages: scales with an L1 penalty to pick heads, then offsets on those heads."""
    config: LoFITConfig = inputs.config
    _seed(config)
    loaded = inputs.loaded
    selection_steps = config.selection_stage_steps()
    train_examples, eval_examples = split_examples(config, inputs.examples, inputs.eval_examples)
    base = count_base_parameters(loaded.model)
    naming = naming_for(inputs, "lofit")
    resume = _resume(config, loaded.model)
    resume_phase = resume.manifest["metadata"]["training"]["phase"] if resume is not None else None

    selection_history: list[dict[str, Any]] = []
    if resume_phase == "offsets":
        assert resume is not None
        chosen_sites = [str(intervention.site) for intervention in resume.interventions]
    else:
        scorers = []
        for resolved in resolve_sites(loaded, config.site):
            heads, head_dim = _head_count(resolved)
            scorers.append(LoFIT(resolved.site, heads, head_dim, train_scale=True, train_bias=False, positions=config.positions))

        def l1_penalty(fraction: float) -> torch.Tensor:
            return config.l1 * sum((scorer.scale.abs().sum() for scorer in scorers), torch.zeros(()))

        selection_config = _with_steps(config, selection_steps, no_evaluation=True)
        selection = fit(
            loaded,
            selection_config,
            train_examples,
            (),
            interventions=scorers,
            penalty=l1_penalty,
            naming=naming,
            phase="scales",
            resume=resume,
            progress=inputs.progress,
        )
        chosen = select_heads(scorers, config.top_k)
        chosen_sites = [f"pre_mlp[{layer}].heads[{','.join(str(h) for h in heads)}]" for layer, heads in chosen.items()]
        resume = None
        selection_history = selection.history
        logger.info("LoFIT kept %d heads: %s", config.top_k, ", ".join(chosen_sites))

    offsets_config = _with_steps(config, config.steps - selection_steps)
    _seed(config)
    offsets = []
    for site in chosen_sites:
        (resolved,) = resolve_sites(loaded, site)
        heads, head_dim = _head_count(resolved)
        offsets.append(LoFIT(site, heads, head_dim, train_scale=False, train_bias=True, positions=config.positions))
    fitted = fit(
        loaded,
        offsets_config,
        train_examples,
        eval_examples,
        interventions=offsets,
        naming=naming,
        phase="offsets",
        resume=resume,
        progress=inputs.progress,
    )
    parameters = count_trainable_parameters(offsets, base)
    # One history over both stages: the offset stage's steps follow the selection stage's.
    fitted.history = [dict(entry, phase="scales") for entry in selection_history] + [
        dict(entry, step=entry["step"] + selection_steps, phase="offsets") for entry in fitted.history
    ]
    return build_result("lofit", fitted, parameters, interventions=offsets, metadata={"selected_heads": chosen_sites})


def _with_steps(config: Any, steps: int, no_evaluation: bool = False) -> Any:
    changes: dict[str, Any] = {"steps": steps}
    if no_evaluation:
        changes["eval_every"] = 0
    return replace(config, **changes)


def train_jola(inputs: TrainInputs) -> TrainResult:
    config: JoLAConfig = inputs.config
    _seed(config)
    gated = []
    for resolved in resolve_sites(inputs.loaded, config.site):
        heads, head_dim = _head_count(resolved)
        gated.append(JoLA(resolved.site, heads, head_dim, config.initial_log_alpha, positions=config.positions))

    def l0_penalty(fraction: float) -> torch.Tensor:
        ramp = min(1.0, fraction / config.l0_warmup) if config.l0_warmup > 0 else 1.0
        return config.l0_weight * ramp * sum((intervention.expected_l0() for intervention in gated), torch.zeros(()))

    result = _run(inputs, "jola", gated, penalty=l0_penalty)
    open_gates = sum(int((intervention.eval().gate(intervention.bias_log_alpha) > 0).sum()) for intervention in gated)
    result.metrics["open_offset_gates"] = float(open_gates)
    return result


# Weight-space baselines ----------------------------------------------------------------


def lora_config(config: LoRAConfig) -> Any:
    """Build the peft ``LoraConfig`` for a LoRA or joint config."""
    from peft import LoraConfig

    targets: str | list[str] = config.target_modules
    if targets != "all-linear":
        targets = [name.strip() for name in config.target_modules.split(",") if name.strip()]
        if not targets:
            raise ConfigError("target_modules is empty; give module names such as q_proj,v_proj or all-linear")
    return LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )


def wrap_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Inject LoRA layers into ``model`` (in place) and return the peft model."""
    from peft import get_peft_model

    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated is_gradient_checkpointing, so the warning is not ours.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lora_config(config))
    except ValueError as error:
        raise ConfigError(f"LoRA could not be applied: {error}") from None


def train_lora(inputs: TrainInputs) -> TrainResult:
    """Train LoRA through peft, then remove the LoRA layers; the bundle stores the LoRA weights."""
    config: LoRAConfig = inputs.config
    _seed(config)
    base = count_base_parameters(inputs.loaded.model)
    peft_model = wrap_lora(inputs.loaded.model, config)
    try:
        return _run(inputs, "lora", [], model=peft_model, freeze_base=False, base_parameters=base)
    finally:
        peft_model.unload()


def train_sft(inputs: TrainInputs) -> TrainResult:
    """Fine-tune every weight of the model in place; the bundle stores all weights."""
    _seed(inputs.config)
    for parameter in inputs.loaded.model.parameters():
        parameter.requires_grad_(True)
    try:
        return _run(inputs, "sft", [], freeze_base=False)
    finally:
        for parameter in inputs.loaded.model.parameters():
            parameter.requires_grad_(False)


def train_joint(inputs: TrainInputs) -> TrainResult:
    """Train LoRA and post-block adapters together, each with its own learning rate."""
    config: JointConfig = inputs.config
    _seed(config)
    base = count_base_parameters(inputs.loaded.model)
    adapters = [
        LowRankAdapter(resolved.site, _width(resolved), config.adapter_rank, config.activation, positions=config.positions)
        for resolved in resolve_sites(inputs.loaded, config.site)
    ]
    peft_model = wrap_lora(inputs.loaded.model, config)
    lora_parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    groups = [
        {"params": lora_parameters, "lr": config.learning_rate},
        {"params": [parameter for adapter in adapters for parameter in adapter.parameters()], "lr": config.adapter_learning_rate},
    ]
    try:
        return _run(inputs, "joint", adapters, model=peft_model, freeze_base=False, parameter_groups=groups, base_parameters=base)
    finally:
        peft_model.unload()


def apply_trained_weights(loaded: LoadedModel, bundle: Bundle) -> nn.Module:
    """Put the weights of a LoRA, joint or SFT bundle into the model and return the model to run.

    For LoRA and joint bundles the model is wrapped with peft (in place), and the peft
    model is returned. For SFT the weights are copied into ``loaded.model``.
    """
    method = bundle.method
    if method in ("lora", "joint"):
        config_class = JointConfig if method == "joint" else LoRAConfig
        known = {name for name in config_class.__dataclass_fields__}
        values = {key: value for key, value in bundle.config.items() if key in known}
        model = wrap_lora(loaded.model, config_class(**values))
    else:
        model = loaded.model
    if not any(key.startswith(WEIGHTS_PREFIX) for key in bundle.tensors):
        raise ConfigError(f"{bundle.path} contains no trained weights (method {method!r}); attach its interventions instead")
    load_weight_tensors(model, bundle.tensors)
    return model


TRAINERS: tuple[TrainableMethod, ...] = (
    TrainableMethod("post_block", PostBlockConfig, train_post_block, "low-rank adapters on the residual stream after each block"),
    TrainableMethod("vector", VectorConfig, train_vector, "one trained steering vector per site"),
    TrainableMethod("reft", ReFTConfig, train_reft, "LoReFT: low-rank edits in an orthonormal subspace at selected positions"),
    TrainableMethod("lofit", LoFITConfig, train_lofit, "LoFIT: per-head scales pick the top-k heads, then per-head offsets train"),
    TrainableMethod("jola", JoLAConfig, train_jola, "JoLA: per-head scales and offsets with Hard-Concrete gates"),
    TrainableMethod("lora", LoRAConfig, train_lora, "LoRA baseline through peft", apply_trained_weights),
    TrainableMethod("sft", SFTConfig, train_sft, "full fine-tuning baseline", apply_trained_weights),
    TrainableMethod("joint", JointConfig, train_joint, "LoRA and post-block adapters trained together", apply_trained_weights),
)
