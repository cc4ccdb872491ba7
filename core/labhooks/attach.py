"""Attaching interventions to a model with forward hooks, and reading activations.

:func:`attach` registers hooks and nothing else: no module is replaced, so ``state_dict``
keys, attributes and hooks registered by anyone else stay as they are. The returned
:class:`AttachHandle` removes exactly the hooks it registered, on ``remove()`` or when a
``with`` block exits, normally or by an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from labhooks.errors import PositionError
from labhooks.intervention import FunctionIntervention, Intervention, InterventionContext
from labhooks.positions import ForwardContext, Positions
from labhooks.resolve import ModelSites, ResolvedSite, unwrap_model
from labhooks.sites import Site, SiteSpec

logger = logging.getLogger(__name__)


def _past_length(kwargs: dict[str, Any]) -> int:
    # transformers 5 passes the KV cache as `cache`; earlier releases and direct calls use `past_key_values`.
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    return 0


class ContextTracker:
    """Reads each forward call's inputs at the model root and keeps the token context.

    The prompt length of each row is fixed at prefill. A call with an empty KV cache whose
    input ids extend the previous call's ids is taken as an uncached decode step of the same
    generation, so the prompt length carries over.
    """

    def __init__(self) -> None:
        self.context: ForwardContext | None = None
        # (batch, tokens) of this call when every token in it is real, else None: hooks that
        # select all positions then skip the per-position work.
        self.all_real_shape: tuple[int, int] | None = None
        self._previous_ids: torch.Tensor | None = None
        self._masks: dict[tuple[Positions, int], tuple[torch.Tensor, bool]] = {}

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._masks.clear()
        self.all_real_shape = None
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            input_ids = args[0]
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if not isinstance(reference, torch.Tensor) or reference.dim() < 2:
            self.context = None
            return

        batch, length = int(reference.shape[0]), int(reference.shape[1])
        past = _past_length(kwargs)
        mask = kwargs.get("attention_mask")
        position_ids = kwargs.get("position_ids")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= length:
            full = mask.bool()
            absolute = (full.long().cumsum(-1) - 1).masked_fill(~full, -1)
            positions = absolute[:, -length:]
        else:
            # No 2-D mask (transformers drops an all-ones mask): every token is real, and the
            # position ids, when given, already count from the first real token.
            full = torch.ones(batch, past + length, dtype=torch.bool, device=reference.device)
            if isinstance(position_ids, torch.Tensor) and position_ids.shape[-2:] == (batch, length):
                positions = position_ids.reshape(batch, length).long()
            else:
                positions = torch.arange(past, past + length, device=reference.device).expand(batch, length)
        current_mask = full[:, -length:]

        continues = (
            past == 0
            and input_ids is not None
            and self._previous_ids is not None
            and self.context is not None
            and self._previous_ids.shape[0] == batch
            and self._previous_ids.shape[1] < length
            and torch.equal(input_ids[:, : self._previous_ids.shape[1]], self._previous_ids)
        )
        if past > 0 and self.context is not None and self.context.batch_size == batch:
            prompt_lengths = self.context.prompt_lengths
            is_prefill = False
        elif past > 0:
            # Attached in the middle of a generation: count everything before this call as prompt.
            prompt_lengths = full[:, :-length].sum(-1)
            is_prefill = False
        elif continues:
            assert self.context is not None
            prompt_lengths = self.context.prompt_lengths
            is_prefill = False
        else:
            prompt_lengths = current_mask.sum(-1)
            is_prefill = True
        self._previous_ids = input_ids.detach() if input_ids is not None else None
        self.context = ForwardContext(current_mask, positions, prompt_lengths, is_prefill, past)
        if bool(current_mask.all()):
            self.all_real_shape = (batch, length)

    def selection(self, positions: Positions, num_tokens: int) -> tuple[torch.Tensor, bool]:
        """Return the selected positions for the last ``num_tokens`` tokens, and whether all are."""
        key = (positions, num_tokens)
        cached = self._masks.get(key)
        if cached is None:
            assert self.context is not None
            mask = positions.mask(self.context)[:, -num_tokens:]
            cached = (mask, bool(mask.all()))
            self._masks[key] = cached
        return cached


class _Hook:
    """The callable registered for one intervention at one resolved site."""

    def __init__(self, intervention: Intervention, resolved: ResolvedSite, tracker: ContextTracker) -> None:
        self.intervention = intervention
        self.site = resolved.site
        self.tracker = tracker
        self.num_heads = resolved.num_heads
        self.head_dim = resolved.head_dim
        heads = resolved.site.heads
        self.all_heads = heads is None or (self.num_heads is not None and list(heads) == list(range(self.num_heads)))
        self.head_index = torch.tensor(heads) if heads is not None else None
        self.positions = intervention.positions
        self.selects_all = intervention.positions.is_all
        # Whether forward_hook may take its short path when every token is real.
        self.direct = self.selects_all and self.num_heads is None

    def _run(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor | None:
        intervention = self.intervention
        # nn.Module.__call__ costs several microseconds per hook; skip it unless someone
        # registered hooks on the intervention module itself.
        if intervention._forward_hooks or intervention._forward_pre_hooks:
            return intervention(hidden, context)
        return intervention.forward(hidden, context)

    def _call(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        if self.num_heads is None:
            edited = self._run(hidden, context)
            return hidden if edited is None else edited
        split = hidden.reshape(*hidden.shape[:-1], self.num_heads, int(self.head_dim or 0))
        if self.all_heads:
            edited = self._run(split, context)
            return hidden if edited is None else edited.reshape(hidden.shape)
        index = self.head_index.to(hidden.device)  # type: ignore[union-attr]
        edited = self._run(split.index_select(-2, index), context)
        if edited is None:
            return hidden
        return split.index_copy(-2, index, edited.to(split.dtype)).reshape(hidden.shape)

    def edit(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = self.positions
        forward = self.tracker.context
        per_token = hidden.dim() >= 3 and forward is not None
        if per_token:
            assert forward is not None
            per_token = hidden.shape[0] == forward.batch_size and hidden.shape[1] <= forward.num_tokens
        if not per_token:
            if not self.selects_all:
                raise PositionError(
                    f"site {self.site} has no token axis that matches the model input (shape "
                    f"{tuple(hidden.shape)}), so only the position selector 'all' applies, not '{positions}'"
                )
            edited = self._call(hidden, InterventionContext(self.site, forward if hidden.dim() >= 3 else None))
        else:
            assert forward is not None
            mask, everything = self.tracker.selection(positions, hidden.shape[1])
            if everything:
                edited = self._call(hidden, InterventionContext(self.site, forward, None, mask))
            else:
                rows, columns = mask.nonzero(as_tuple=True)
                if rows.numel() == 0:
                    return hidden
                selected = hidden[rows, columns]
                context = InterventionContext(self.site, forward, rows, mask)
                edited_rows = self._call(selected, context)
                edited = hidden.index_put((rows, columns), edited_rows.to(hidden.dtype))
        if edited.dtype != hidden.dtype:
            edited = edited.to(hidden.dtype)
        return edited

    def forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        tracker = self.tracker
        real = tracker.all_real_shape
        shape = hidden.shape
        if self.direct and real is not None and len(shape) >= 3 and shape[0] == real[0] and shape[1] == real[1]:
            # The common case, every token real and selected, takes the shortest path, because a
            # hook runs right after a block's heavy kernels, when each Python call and tensor
            # attribute read costs microseconds. It repeats _call and the end of edit() without
            # masks, gathers or a second look at the shape.
            forward = tracker.context
            assert forward is not None
            edited = self._run(hidden, InterventionContext(self.site, forward, None, forward.attention_mask))
            if edited is None or edited is hidden:
                return None
            if edited.dtype != hidden.dtype:
                edited = edited.to(hidden.dtype)
        else:
            edited = self.edit(hidden)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    def forward_pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        return (self.edit(args[0]), *args[1:])


class AttachHandle:
    """The hooks of one :func:`attach` call; a context manager that removes them on exit."""

    def __init__(self, model: nn.Module, interventions: list[Intervention], handles: list[RemovableHandle]) -> None:
        self.model = model
        self.interventions = interventions
        self._handles = handles

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def num_hooks(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        """Remove every hook this handle registered; calling it again does nothing."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = f"{len(self._handles)} hooks" if self._handles else "removed"
        return f"AttachHandle({len(self.interventions)} interventions, {state})"


def _as_list(interventions: Intervention | Iterable[Intervention]) -> list[Intervention]:
    if isinstance(interventions, Intervention):
        return [interventions]
    items = list(interventions)
    for item in items:
        if not isinstance(item, Intervention):
            raise TypeError(f"attach() takes Intervention objects, got {type(item).__name__}: {item!r}")
    return items


def _device_of(module: nn.Module) -> torch.device | None:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return None


def attach(model: nn.Module, interventions: Intervention | Iterable[Intervention]) -> AttachHandle:
    """Register forward hooks that run the interventions at their sites.

    Every site is resolved and every parameter width checked before the first hook is
    registered, so a bad site leaves the model untouched. Several interventions at one site
    run in the order given. Works on peft-wrapped models. An intervention is moved to the
    device of the module it hooks; its output is cast to the dtype of the hidden state.
    """
    items = _as_list(interventions)
    root = unwrap_model(model)
    model_sites = ModelSites(root)

    plan: list[tuple[Intervention, ResolvedSite]] = []
    for intervention in items:
        for resolved in model_sites.resolve(intervention.site):
            intervention.check_width(resolved.width, resolved.site)
            plan.append((intervention, resolved))

    tracker = ContextTracker()
    handles: list[RemovableHandle] = []
    try:
        handles.append(root.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
        for intervention, resolved in plan:
            device = _device_of(resolved.module)
            intervention_device = _device_of(intervention)
            if device is not None and intervention_device is not None and device != intervention_device:
                intervention.to(device)
            hook = _Hook(intervention, resolved, tracker)
            if resolved.hook == "input":
                handles.append(resolved.module.register_forward_pre_hook(hook.forward_pre_hook))
            else:
                handles.append(resolved.module.register_forward_hook(hook.forward_hook))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    logger.debug("attached %d interventions with %d hooks", len(items), len(handles))
    return AttachHandle(root, items, handles)


class ActivationRecord:
    """Activations read by :func:`record`, keyed by concrete site string.

    Each entry is a list with one tensor per forward call; a tensor has shape (selected
    tokens, width), in row-major order of (batch row, position), on the CPU.
    """

    def __init__(self) -> None:
        self.activations: dict[str, list[torch.Tensor]] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}

    def __getitem__(self, site: str) -> torch.Tensor:
        return torch.cat(self.activations[site])

    def sites(self) -> list[str]:
        return list(self.activations)


@contextmanager
def record(
    model: nn.Module, sites: str | SiteSpec | Site | Iterable[str | SiteSpec | Site], positions: str | Positions = "all"
) -> Iterator[ActivationRecord]:
    """Read hidden states at sites without editing them, inside a ``with`` block.

    With a per-token selector, each record contains the selected tokens of every call, and
    ``ActivationRecord.rows`` the batch row each came from.
    """
    if isinstance(sites, str | SiteSpec | Site):
        sites = [sites]
    result = ActivationRecord()
    model_sites = ModelSites(unwrap_model(model))
    interventions = []
    for spec in sites:
        for resolved in model_sites.resolve(spec):
            key = str(resolved.site)
            result.activations.setdefault(key, [])
            result.rows.setdefault(key, [])

            def keep(hidden: torch.Tensor, context: InterventionContext, key: str = key) -> None:
                flat = hidden.detach().reshape(-1, *hidden.shape[-1:]) if context.row_index is None else hidden.detach()
                result.activations[key].append(flat.float().cpu())
                if context.row_index is not None:
                    result.rows[key].append(context.row_index.cpu())
                elif hidden.dim() >= 2:
                    batch = hidden.shape[0]
                    per_row = flat.shape[0] // batch
                    result.rows[key].append(torch.arange(batch).repeat_interleave(per_row))

            interventions.append(FunctionIntervention(resolved.site, keep, positions))
    with attach(model, interventions):
        yield result
