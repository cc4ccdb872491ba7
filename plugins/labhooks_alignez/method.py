"""The ``alignez`` method: self-generated preference pairs in, one intervention per edited layer out.

Steps: draw the queries and hold some out; let the model write a preference pair per query
and axis; read the last-token representation of "query + response" at every layer; drop
near-identical pairs; fit each layer's preference subspace; keep the layers with the largest
projected edit; then measure the preference margin on the held-out pairs and generate base
and steered answers side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from labhooks.errors import ConfigError, LabhooksError
from labhooks.generation import format_prompt
from labhooks.methods import MethodInputs, MethodResult, ReportTable
from labhooks.sites import Site, parse_site
from labhooks_alignez.config import AlignEZConfig, Axis
from labhooks_alignez.evaluation import compare_generations, preference_margin
from labhooks_alignez.intervention import AlignEZIntervention
from labhooks_alignez.preferences import PreferencePair, generate_pairs, query_and_response
from labhooks_alignez.queries import draw_and_split, load_queries
from labhooks_alignez.representations import encode_texts, last_token_states, site_layers
from labhooks_alignez.subspace import MIN_PAIRS, LayerFit, choose_layers, fit_layers, rank_layers

logger = logging.getLogger(__name__)

# Each axis samples from its own seed range, so adding an axis leaves the others' data unchanged.
AXIS_SEED_STRIDE = 100_000


class AlignEZFitError(LabhooksError):
    """AlignEZ found no preference directions to edit with."""


def _read_states(inputs: MethodInputs, texts: list[str], description: str) -> torch.Tensor:
    assert inputs.loaded is not None
    config: AlignEZConfig = inputs.config
    tokenizer = inputs.loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return last_token_states(
        inputs.loaded.model,
        encode_texts(tokenizer, texts),
        config.site,
        pad_id=pad_id,
        batch_size=config.batch_size,
        progress=inputs.progress,
        description=description,
    )


def _generate_axis_pairs(inputs: MethodInputs, index: int, axis: Axis, queries: list[str]) -> list[PreferencePair]:
    assert inputs.loaded is not None
    config: AlignEZConfig = inputs.config
    return generate_pairs(
        inputs.loaded.model,
        inputs.loaded.tokenizer,
        queries,
        axis,
        characteristics_tokens=config.characteristics_tokens,
        response_tokens=config.response_tokens,
        batch_size=config.batch_size,
        seed=config.seed + index * AXIS_SEED_STRIDE,
        progress=inputs.progress,
    )


def _fit_axis(inputs: MethodInputs, axis: Axis, pairs: Sequence[PreferencePair], layers: list[int]) -> list[LayerFit]:
    assert inputs.loaded is not None
    config: AlignEZConfig = inputs.config
    tokenizer = inputs.loaded.tokenizer
    if len(pairs) < MIN_PAIRS:
        raise AlignEZFitError(f"axis {axis.name}: only {len(pairs)} usable preference pairs to fit on, need {MIN_PAIRS}; raise num_queries")

    preferred = _read_states(
        inputs, [query_and_response(tokenizer, pair.query, pair.preferred) for pair in pairs], f"{axis.name}: preferred states"
    )
    dispreferred = _read_states(
        inputs, [query_and_response(tokenizer, pair.query, pair.dispreferred) for pair in pairs], f"{axis.name}: dispreferred states"
    )
    fits = fit_layers(
        preferred,
        dispreferred,
        layers,
        threshold=config.threshold,
        explained_variance=config.explained_variance,
        max_directions=config.max_directions,
    )
    logger.info(
        "axis %s: %d pairs; pairs kept per layer %s; directions per layer %s",
        axis.name,
        len(pairs),
        [fit.pairs_kept for fit in fits],
        [int(fit.directions.shape[0]) for fit in fits],
    )
    return fits


def _build_interventions(
    config: AlignEZConfig, axes: list[Axis], weights: list[float], fits_by_axis: list[list[LayerFit]], chosen: list[int]
) -> list[AlignEZIntervention]:
    spec = parse_site(config.site)
    interventions = []
    for index in chosen:
        fits = [axis_fits[index] for axis_fits in fits_by_axis]
        interventions.append(
            AlignEZIntervention(
                Site(spec.kind, fits[0].layer, None, spec.tower),
                torch.cat([fit.directions for fit in fits]),
                counts=[int(fit.directions.shape[0]) for fit in fits],
                modes=[axis.mode for axis in axes],
                weights=weights,
                alpha=config.alpha,
                form=config.edit_form,
                axes=[axis.name for axis in axes],
                positions=config.positions,
            )
        )
    return interventions


def run(inputs: MethodInputs) -> MethodResult:
    """Fit AlignEZ on the loaded model and return its interventions, report tables and margin."""
    config: AlignEZConfig = inputs.config
    config.validate()
    if inputs.loaded is None:
        raise ConfigError("the alignez method needs a causal language model; pass model=... or leave it out for the embedded default")
    model, tokenizer = inputs.loaded.model, inputs.loaded.tokenizer
    axes, weights = config.parsed_axes(), config.axis_weights()
    layers = site_layers(model, config.site)
    fit_queries, held_queries = draw_and_split(load_queries(config.queries), config.num_queries, config.held_out, config.seed)
    logger.info("alignez: %d queries to fit on, %d held out, axes %s", len(fit_queries), len(held_queries), [axis.name for axis in axes])

    pairs_by_axis = [_generate_axis_pairs(inputs, index, axis, fit_queries + held_queries) for index, axis in enumerate(axes)]
    fit_set = set(fit_queries)
    fits_by_axis = [
        _fit_axis(inputs, axis, [pair for pair in pairs if pair.query in fit_set], layers)
        for axis, pairs in zip(axes, pairs_by_axis, strict=True)
    ]

    # NOTE: the edited layers are chosen once, from the fitting queries, not per query at
    # inference: a hook runs at one layer at a time, so it cannot rank the layers before editing.
    query_states = _read_states(inputs, [format_prompt(tokenizer, query) for query in fit_queries], "query states")
    scores = rank_layers(query_states, fits_by_axis, [axis.mode for axis in axes], weights)
    has_directions = [any(axis_fits[index].directions.shape[0] > 0 for axis_fits in fits_by_axis) for index in range(len(layers))]
    chosen = choose_layers(scores, has_directions, config.top_layers)
    if not chosen:
        raise AlignEZFitError(
            f"no layer of {config.site} kept {MIN_PAIRS} or more pairs below the cosine threshold {config.threshold}, so there is nothing "
            "to edit with; raise threshold (e.g. threshold=0.95) or num_queries"
        )
    interventions = _build_interventions(config, axes, weights, fits_by_axis, chosen)
    logger.info("alignez: editing layers %s", [fits_by_axis[0][index].layer for index in chosen])

    held_pairs = [pair for pairs in pairs_by_axis for pair in pairs if pair.query not in fit_set]
    metrics = _margin_metrics(inputs, axes, held_pairs, interventions)
    prompts = held_queries[: config.compare_prompts]
    base, steered = compare_generations(
        model,
        tokenizer,
        prompts,
        interventions,
        max_new_tokens=config.compare_tokens,
        batch_size=config.batch_size,
        progress=inputs.progress,
    )

    tables = [
        ReportTable(
            f"alignez ({', '.join(axis.name for axis in axes)}): base and steered answers, greedy, {config.compare_tokens} new tokens",
            ["prompt", "base", "steered"],
            [[prompt, base_text, steered_text] for prompt, base_text, steered_text in zip(prompts, base, steered, strict=True)],
        ),
        _layer_table(axes, fits_by_axis, scores, chosen),
    ]
    metadata = {
        "axes": [{"name": axis.name, "preferred": axis.preferred, "dispreferred": axis.dispreferred, "mode": axis.mode} for axis in axes],
        "fit_queries": fit_queries,
        "held_out_queries": held_queries,
        "edited_layers": [fits_by_axis[0][index].layer for index in chosen],
        "comparison": {
            "prompts": prompts,
            "max_new_tokens": config.compare_tokens,
            "batch_size": config.batch_size,
            "base": base,
            "steered": steered,
        },
    }
    return MethodResult(interventions=list(interventions), tables=tables, metrics=metrics, metadata=metadata)


def _margin_metrics(
    inputs: MethodInputs, axes: list[Axis], held_pairs: list[PreferencePair], interventions: list[AlignEZIntervention]
) -> dict[str, float]:
    assert inputs.loaded is not None
    config: AlignEZConfig = inputs.config
    metrics: dict[str, float] = {
        "edited_layers": float(len(interventions)),
        "directions": float(sum(i.directions.shape[0] for i in interventions)),
    }
    if not held_pairs:
        logger.warning("alignez: no held-out pair survived generation, so no preference margin is reported")
        return metrics

    overall = preference_margin(
        inputs.loaded.model, inputs.loaded.tokenizer, held_pairs, interventions, batch_size=config.batch_size, progress=inputs.progress
    )
    metrics.update(
        {
            "preference_margin": overall.margin,
            "base_gap": overall.base_gap,
            "steered_gap": overall.steered_gap,
            "held_out_pairs": float(overall.pairs),
        }
    )
    if overall.pairs >= 2:
        metrics["preference_margin_stderr"] = overall.margin_stderr
    if len(axes) > 1:
        for axis in axes:
            rows = [row for row, pair in enumerate(held_pairs) if pair.axis == axis.name]
            if rows:
                metrics[f"preference_margin[{axis.name}]"] = overall.subset(rows).margin
    return metrics


def _layer_table(axes: list[Axis], fits_by_axis: list[list[LayerFit]], scores: torch.Tensor, chosen: list[int]) -> ReportTable:
    rows = []
    for index in chosen:
        row: list[object] = [fits_by_axis[0][index].layer]
        for axis_fits in fits_by_axis:
            fit = axis_fits[index]
            row.append(f"{fit.directions.shape[0]} ({fit.pairs_kept} pairs)")
        row.append(float(scores[index]))
        rows.append(row)
    columns = ["layer", *[f"{axis.name} directions" for axis in axes], "projected edit"]
    return ReportTable("alignez: edited layers", columns, rows)
