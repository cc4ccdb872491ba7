"""AlignEZ on tiny random models: the edit rule, the filters, the subspace and the method end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

import labhooks
from labhooks.errors import ConfigError
from labhooks.intervention import InterventionContext
from labhooks.methods import MethodInputs
from labhooks.sites import Site
from labhooks_alignez.config import AlignEZConfig, parse_axis
from labhooks_alignez.evaluation import MarginResult
from labhooks_alignez.intervention import AlignEZIntervention, edit_coefficients, kept_directions
from labhooks_alignez.method import run
from labhooks_alignez.queries import draw_and_split, load_queries, parse_queries
from labhooks_alignez.representations import last_token_states
from labhooks_alignez.subspace import choose_layers, explained_variance_count, fit_layers, keep_pairs, preference_directions
from labhooks_cli.main import app

from conftest import VOCAB, make_decoder, prompt_ids

WIDTH = 16


def orthonormal(count: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, count, generator=generator))
    return q.T.contiguous()


def edit(
    directions: torch.Tensor, x: torch.Tensor, modes: list[str] | None = None, counts: list[int] | None = None, **options
) -> torch.Tensor:
    modes = modes or ["boost"]
    counts = counts or [directions.shape[0]]
    weights = options.pop("weights", [1.0] * len(modes))
    intervention = AlignEZIntervention("post_mlp[0]", directions, counts=counts, modes=modes, weights=weights, **options)
    return intervention(x, InterventionContext(Site("post_mlp", 0), None))


# The edit rule ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["boost", "suppress"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_edit_raises_kept_components(mode, alpha):
    directions = orthonormal(4)
    x = torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(1)) * 2
    before = x @ directions.T
    after = edit(directions, x, [mode], alpha=alpha) @ directions.T

    kept = before >= 0 if mode == "boost" else before < 0
    assert kept.any()
    assert (~kept).any()
    # Orthonormal directions and the simultaneous form: each component moves by its own step only.
    assert torch.allclose(after[kept], before[kept] + alpha * torch.tanh(before[kept].abs()), atol=1e-5)
    assert torch.all(after[kept] >= before[kept])
    assert torch.allclose(after[~kept], before[~kept], atol=1e-5)


@pytest.mark.parametrize("mode", ["boost", "suppress"])
def test_edit_matches_method_notation(mode):
    # With theta = -p: boost keeps cos(x, theta) <= 0 and adds alpha * tanh(<x, theta>) * theta;
    # suppress keeps cos(x, theta) > 0 and subtracts the same term.
    directions = torch.nn.functional.normalize(torch.randn(5, WIDTH, generator=torch.Generator().manual_seed(4)), dim=-1)
    x = torch.randn(32, WIDTH, generator=torch.Generator().manual_seed(5)) * 3
    theta = -directions
    inner = x @ theta.T
    kept = inner <= 0 if mode == "boost" else inner > 0
    sign = 1.0 if mode == "boost" else -1.0
    expected = x + sign * 2.0 * (torch.tanh(inner) * kept) @ theta
    assert torch.allclose(edit(directions, x, [mode], alpha=2.0), expected, atol=1e-5)


def test_edit_filtered_directions_leave_state_unchanged():
    directions = orthonormal(3)
    x = -directions.sum(0, keepdim=True) * 2.0  # every score is -2: a boost axis keeps none
    assert torch.equal(edit(directions, x, ["boost"]), x)
    y = directions.sum(0, keepdim=True) * 2.0  # every score is +2: a suppress axis keeps none
    assert torch.equal(edit(directions, y, ["suppress"]), y)


@pytest.mark.parametrize("form", ["simultaneous", "sequential"])
def test_edit_step_bounded_by_alpha_times_directions(form):
    directions = torch.nn.functional.normalize(torch.randn(5, WIDTH, generator=torch.Generator().manual_seed(2)), dim=-1)
    x = torch.randn(200, WIDTH, generator=torch.Generator().manual_seed(3)) * 5
    for alpha in (0.3, 1.0, 2.5):
        step = (edit(directions, x, alpha=alpha, form=form) - x).norm(dim=-1)
        assert torch.all(step <= alpha * directions.shape[0] + 1e-5)


def test_edit_weights_scale_each_axis():
    directions = orthonormal(2)
    x = (directions[0] + directions[1]).unsqueeze(0) * 3.0
    before = x @ directions.T
    after = edit(directions, x, ["boost", "boost"], counts=[1, 1], weights=[0.25, 0.75]) @ directions.T
    steps = after - before
    assert torch.allclose(steps[0], torch.tanh(before[0]) * torch.tensor([0.25, 0.75]), atol=1e-6)


def test_edit_sequential_recomputes_scores():
    # Two non-orthogonal directions: the sequential form scores the second on the edited state.
    first = torch.zeros(WIDTH)
    first[0] = 1.0
    second = torch.zeros(WIDTH)
    second[0], second[1] = 0.6, 0.8
    directions = torch.stack([first, second])
    x = torch.zeros(1, WIDTH)
    x[0, 0], x[0, 1] = 0.5, -0.5

    simultaneous = edit(directions, x, form="simultaneous")
    sequential = edit(directions, x, form="sequential")

    scores = x @ directions.T
    expected_simultaneous = x + (edit_coefficients(scores, torch.ones(2), torch.ones(2), 1.0) @ directions)
    assert torch.allclose(simultaneous, expected_simultaneous, atol=1e-6)
    state = x.clone()
    for direction in directions:
        score = state @ direction
        state = state + edit_coefficients(score, torch.ones(()), torch.ones(()), 1.0).unsqueeze(-1) * direction
    assert torch.allclose(sequential, state, atol=1e-6)
    assert not torch.allclose(sequential, simultaneous, atol=1e-4)


# The direction filter -----------------------------------------------------------------


def test_direction_filter_by_mode():
    scores = torch.tensor([[-1.0, 0.0, 2.0]])
    assert kept_directions(scores, torch.ones(3)).tolist() == [[False, True, True]]
    assert kept_directions(scores, -torch.ones(3)).tolist() == [[True, False, False]]


def test_direction_filter_is_per_token():
    directions = orthonormal(1)
    tokens = torch.stack([directions[0] * 2.0, -directions[0] * 2.0])
    edited = edit(directions, tokens, ["boost"])
    assert not torch.equal(edited[0], tokens[0])
    assert torch.equal(edited[1], tokens[1])


def test_edit_positions_on_model():
    model = make_decoder("llama")
    ids = prompt_ids([7])[0].unsqueeze(0)
    with labhooks.record(model, "post_mlp[1]") as plain:
        base_logits = model(ids).logits
    directions = torch.nn.functional.normalize(plain["post_mlp[1]"][-1:], dim=-1)  # the last token leans along it
    intervention = AlignEZIntervention("post_mlp[1]", directions, counts=[1], modes=["boost"], weights=[1.0], alpha=5.0)

    with labhooks.attach(model, intervention):
        steered_logits = model(ids).logits
    # The default positions select the last prompt token only in a prompt-only call.
    assert torch.allclose(steered_logits[0, :-1], base_logits[0, :-1], atol=1e-6)
    assert not torch.allclose(steered_logits[0, -1], base_logits[0, -1], atol=1e-4)


# The explained-variance cut and the subspace -----------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "cap", "expected"),
    [(0.5, 8, 1), (9 / 14, 8, 1), (0.643, 8, 2), (0.9, 8, 2), (0.95, 8, 3), (1.0, 8, 3), (0.95, 2, 2), (0.99, 1, 1)],
)
def test_explained_variance_cut(fraction, cap, expected):
    # Variance shares 9/14, 4/14 and 1/14: cumulative 0.643, 0.929, 1.0.
    assert explained_variance_count(torch.tensor([3.0, 2.0, 1.0]), fraction, cap) == expected


def test_explained_variance_cut_ignores_zero_singular_values():
    assert explained_variance_count(torch.tensor([2.0, 0.0, 0.0]), 1.0, 8) == 1
    assert explained_variance_count(torch.zeros(3), 0.9, 8) == 0


def test_preference_directions_span_and_orientation():
    basis = orthonormal(2, seed=5)
    coefficients = torch.randn(20, 2, generator=torch.Generator().manual_seed(6)) + torch.tensor([3.0, -2.0])
    differences = coefficients @ basis
    directions, shares = preference_directions(differences, 0.999, 8)

    assert directions.shape == (2, WIDTH)
    assert torch.allclose(directions @ directions.T, torch.eye(2), atol=1e-5)
    # The recovered directions span the planted plane.
    assert torch.allclose((directions @ basis.T).abs().pow(2).sum(1), torch.ones(2), atol=1e-5)
    assert torch.all(differences.mean(0) @ directions.T >= 0)
    assert abs(float(shares.sum()) - 1.0) < 1e-5


# Pair filtering -------------------------------------------------------------------------


def test_keep_pairs_by_cosine():
    base = torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(7))
    other = orthonormal(1, seed=8)
    other = other - (other @ base.T) / (base @ base.T) * base  # orthogonal to base
    near = base + 0.01 * other
    preferred = torch.cat([base, base, base, base])
    dispreferred = torch.cat([base, near, other, -base])
    assert keep_pairs(preferred, dispreferred, 0.8).tolist() == [False, False, True, True]
    assert keep_pairs(preferred, dispreferred, 1.0).tolist() == [True, True, True, True]


def test_fit_layers_skips_layers_with_too_few_pairs():
    generator = torch.Generator().manual_seed(9)
    preferred = torch.randn(5, 2, WIDTH, generator=generator)
    dispreferred = torch.randn(5, 2, WIDTH, generator=generator)
    dispreferred[:, 1] = preferred[:, 1] * 2.0  # layer 1: every pair has cosine 1
    fits = fit_layers(preferred, dispreferred, [3, 4], threshold=0.8, explained_variance=0.9, max_directions=3)
    assert [fit.layer for fit in fits] == [3, 4]
    assert fits[0].pairs_kept == 5
    assert 1 <= fits[0].directions.shape[0] <= 3
    assert fits[1].pairs_kept == 0
    assert fits[1].directions.shape[0] == 0


def test_choose_layers_top_n():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.8])
    assert choose_layers(scores, [True, True, True, True, False], 2) == [1, 3]
    assert choose_layers(scores, [True, False, True, True, True], 0) == [0, 2, 3, 4]


# Representation extraction --------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gemma"])
@pytest.mark.parametrize("site", ["post_mlp[*]", "post_block[*]"])
def test_last_token_states_invariant_to_batching(family, site):
    model = make_decoder(family)
    sequences = [ids.tolist() for ids in prompt_ids([5, 9, 3, 7, 6])]
    reference = last_token_states(model, sequences, site, pad_id=0, batch_size=1)
    assert reference.shape == (5, 3, 32)
    for batch_size in (2, 5):
        for side in ("left", "right"):
            states = last_token_states(model, sequences, site, pad_id=0, batch_size=batch_size, padding_side=side)
            similarity = torch.nn.functional.cosine_similarity(states, reference, dim=-1)
            assert similarity.min() > 0.999, (batch_size, side, similarity.min())


def test_last_token_states_match_hidden_states():
    model = make_decoder("llama")
    sequences = [ids.tolist() for ids in prompt_ids([4, 8])]
    states = last_token_states(model, sequences, "post_block[0:2]", pad_id=0, batch_size=2, padding_side="left")
    for row, sequence in enumerate(sequences):
        hidden = model(torch.tensor([sequence]), output_hidden_states=True).hidden_states
        for layer in range(2):
            assert torch.allclose(states[row, layer], hidden[layer + 1][0, -1], atol=1e-4)


def test_margin_result_statistics():
    result = MarginResult(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.2, 0.6]))
    assert result.base_gap == pytest.approx(0.2)
    assert result.steered_gap == pytest.approx(1.0 / 3)
    assert result.margin == pytest.approx(1.0 / 3 - 0.2)
    assert result.margin_stderr == pytest.approx(float(torch.tensor([0.1, 0.0, 0.3]).std()) / 3**0.5)
    assert result.subset([0, 2]).margin == pytest.approx(0.2)
    assert math.isnan(result.subset([1]).margin_stderr)


# Config and query set -------------------------------------------------------------------


def test_config_from_strings():
    config = labhooks.build_config(
        AlignEZConfig, {"axes": "helpful,concise/rambling:suppress", "weights": "0.7,0.3", "edit_form": "sequential"}
    )
    axes = config.parsed_axes()
    assert [(axis.preferred, axis.dispreferred, axis.mode) for axis in axes] == [
        ("helpful", "useless", "boost"),
        ("concise", "rambling", "suppress"),
    ]
    assert config.axis_weights() == [0.7, 0.3]
    assert parse_axis("harmless").mode == "suppress"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"axes": "nope"}, "unknown axis 'nope'"),
        ({"axes": "helpful:loud"}, "boost or suppress"),
        ({"axes": "helpful,helpful"}, "listed twice"),
        ({"weights": "0.5,0.5"}, "one weight per axis"),
        ({"held_out": "1.5"}, "held_out"),
        ({"threshold": "2"}, "threshold"),
        ({"site": "logits"}, "per-layer"),
        ({"positions": "sometimes"}, "sometimes"),
        ({"num_queries": "2"}, "num_queries"),
        ({"edit_form": "diagonal"}, "diagonal"),
    ],
)
def test_config_errors_name_the_value(values, message):
    with pytest.raises(labhooks.LabhooksError, match=message):
        labhooks.build_config(AlignEZConfig, values)


def test_shipped_query_set():
    queries = load_queries()
    assert 45 <= len(queries) <= 60
    assert len(set(queries)) == len(queries)
    fit, held = draw_and_split(queries, 12, 0.25, seed=0)
    assert (len(fit), len(held)) == (9, 3)
    assert draw_and_split(queries, 12, 0.25, seed=0) == (fit, held)
    assert not set(fit) & set(held)


def test_query_file_formats(tmp_path):
    assert parse_queries('{"query": "a"}\n\n"b"\n', ".jsonl", "x") == ["a", "b"]
    assert parse_queries(json.dumps(["a", {"query": "b"}]), ".json", "x") == ["a", "b"]
    assert parse_queries("a\n\n b \n", ".txt", "x") == ["a", "b"]
    with pytest.raises(ConfigError, match="line 2"):
        parse_queries('"a"\n{oops\n', ".jsonl", "x")
    with pytest.raises(ConfigError, match="not found"):
        load_queries(str(tmp_path / "missing.jsonl"))


# The method end to end on a tiny model -----------------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[PAD]", "<s>", "</s>", "[UNK]", "user", "assistant", "system", ":"]
    words += [f"w{index}" for index in range(VOCAB - len(words))]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    wrapped.chat_template = "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant : {% endif %}"
    return wrapped


def test_method_runs_and_bundle_round_trips(tmp_path):
    model = make_decoder("llama")
    tokenizer = tiny_tokenizer()
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(f"w{index} w{index + 1} w{index + 2}" for index in range(10, 16)))
    config = labhooks.build_config(
        AlignEZConfig,
        {
            "queries": str(queries),
            "num_queries": "6",
            "held_out": "0.34",
            "characteristics_tokens": "4",
            "response_tokens": "6",
            "compare_tokens": "5",
            "compare_prompts": "2",
            "batch_size": "4",
            "threshold": "1.0",
            "top_layers": "2",
            "alpha": "4",
        },
    )
    result = run(MethodInputs(config=config, loaded=labhooks.LoadedModel(model, tokenizer, "tiny-llama")))

    assert 1 <= len(result.interventions) <= 2
    assert all(str(intervention.site).startswith("post_mlp[") for intervention in result.interventions)
    assert "preference_margin" in result.metrics
    comparison = result.metadata["comparison"]
    assert len(comparison["prompts"]) == 2
    assert result.tables[0].rows == [
        list(row) for row in zip(comparison["prompts"], comparison["base"], comparison["steered"], strict=True)
    ]

    path = labhooks.save_bundle(tmp_path / "alignez.safetensors", result.interventions, plugin="alignez", method="alignez", model=model)
    bundle = labhooks.load_bundle(path, model)
    for original, loaded in zip(result.interventions, bundle.interventions, strict=True):
        assert isinstance(loaded, AlignEZIntervention)
        assert torch.equal(original.directions, loaded.directions)
        assert loaded.config() == original.config()
        assert str(loaded.positions) == "last_prompt+generated"

    from labhooks.generation import generate_texts

    with labhooks.attach(model, bundle.interventions):
        again = generate_texts(model, tokenizer, comparison["prompts"], max_new_tokens=5, batch_size=4)
    assert again == comparison["steered"]


def test_cli_rejects_bad_axis_before_loading():
    result = CliRunner().invoke(app, ["apply", "plugin=alignez", "axes=nope"])
    assert result.exit_code == 2
    assert "unknown axis 'nope'" in result.output
    assert "Traceback" not in result.output


def test_cli_help_lists_options(monkeypatch):
    from labhooks_cli import console

    monkeypatch.setattr(console.console, "width", 240)
    result = CliRunner().invoke(app, ["apply", "plugin=alignez", "--help"])
    assert result.exit_code == 0
    for text in ("explained_variance", "max_directions", "top_layers", "last_prompt+generated", "post_mlp[*]"):
        assert text in result.output
