"""The steer plugin's interventions: no-op start, gradients, bundle round trips, on every family."""

from __future__ import annotations

import pytest
import torch

import labhooks
from labhooks import SteeringVector
from labhooks_steer.interventions import ACTIVATIONS, JoLA, LinearMap, LoFIT, LowRankAdapter, OracleReplay, ReFT
from labhooks_steer.listops import OPERATORS, apply_operator, evaluate_expression, generate_listops

from conftest import DECODER_FAMILIES, make_decoder, pad_batch, prompt_ids


def _width(model, site):
    return labhooks.sites(model).resolve(site)[0].width


def _heads(model, site):
    resolved = labhooks.sites(model).resolve(site)[0]
    heads = len(resolved.site.heads) if resolved.site.heads is not None else resolved.num_heads
    return heads, resolved.head_dim


def build(kind, model):
    """Build one intervention of each kind for a model, at a site the kind is made for."""
    if kind == "adapter":
        return LowRankAdapter("post_block[1]", _width(model, "post_block[1]"), rank=4)
    if kind == "adapter_linear":
        return LowRankAdapter("post_block[*]", _width(model, "post_block[0]"), rank=1, activation="none")
    if kind == "vector":
        return SteeringVector("post_block[0]", _width(model, "post_block[0]"), trainable=True)
    if kind == "reft":
        return ReFT("post_mlp[1]", _width(model, "post_mlp[1]"), rank=4, positions="last_prompt:2")
    if kind == "noreft_nonlinear":
        return ReFT("post_mlp[0]", _width(model, "post_mlp[0]"), rank=4, variant="noreft", activation="silu", positions="prompt")
    if kind == "lofit":
        return LoFIT("pre_mlp[1].heads[*]", *_heads(model, "pre_mlp[1].heads[*]"))
    if kind == "lofit_subset":
        return LoFIT("pre_mlp[0].heads[0,2]", *_heads(model, "pre_mlp[0].heads[0,2]"), train_scale=False)
    if kind == "jola":
        return JoLA("pre_mlp[2].heads[*]", *_heads(model, "pre_mlp[2].heads[*]"))
    if kind == "linear_map":
        return LinearMap("post_block[2]", _width(model, "post_block[2]"))
    if kind == "replay":
        return OracleReplay("post_block[1]", rows=3, tokens=7, width=_width(model, "post_block[1]"))
    raise ValueError(kind)


KINDS = ["adapter", "adapter_linear", "vector", "reft", "noreft_nonlinear", "lofit", "lofit_subset", "jola", "linear_map", "replay"]


def _batch(seed=0):
    ids, mask = pad_batch(prompt_ids([5, 7, 3], seed), side="left")
    return {"input_ids": ids, "attention_mask": mask}


def _perturb(intervention, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(intervention.named_parameters()) + list(intervention.named_buffers()):
            if "log_alpha" in name:
                continue
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_is_noop(family, kind):
    model = make_decoder(family)
    intervention = build(kind, model)
    batch = _batch()
    with torch.no_grad():
        expected = model(**batch).logits
        with labhooks.attach(model, intervention):
            steered = model(**batch).logits
    assert torch.equal(steered, expected)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_bundle_round_trip_same_logits(family, kind, tmp_path):
    model = make_decoder(family)
    intervention = build(kind, model)
    _perturb(intervention)
    batch = _batch()
    with torch.no_grad(), labhooks.attach(model, intervention):
        expected = model(**batch).logits
    path = labhooks.save_bundle(tmp_path / "steer.safetensors", [intervention], plugin="steer", method="test", model=model)
    bundle = labhooks.load_bundle(path, model)
    (loaded,) = bundle.interventions
    assert type(loaded) is type(intervention)
    assert loaded.config() == intervention.config()
    with torch.no_grad(), labhooks.attach(model, loaded):
        restored = model(**batch).logits
    assert torch.equal(restored, expected)
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, expected), "the perturbed intervention should change the logits"


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "replay"])
def test_gradients_reach_only_intervention(family, kind):
    model = make_decoder(family)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    intervention = build(kind, model)
    _perturb(intervention)
    # Deterministic JoLA gates (0.78 open) pass gradient; a Hard-Concrete sample clamped at 0 or 1 does not.
    intervention.train(kind != "jola")
    batch = _batch()
    with labhooks.attach(model, intervention):
        loss = model(**batch).logits.float().pow(2).mean()
    loss.backward()
    assert all(parameter.grad is None for parameter in model.parameters())
    for name, parameter in intervention.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name
            assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_adapter_initialisation():
    adapter = LowRankAdapter("post_block[0]", 64, rank=8)
    assert torch.count_nonzero(adapter.up) == 0
    bound = 1e-3 * (1 / 64) ** 0.5 * 1.0001
    assert adapter.down.abs().max() <= bound
    assert adapter.down.abs().max() > 0
    assert adapter.config() == {"width": 64, "rank": 8, "activation": "silu", "init_scale": 1e-3}


def test_adapter_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'softplus'"):
        LowRankAdapter("post_block[0]", 16, activation="softplus")


def test_adapter_activations_all_start_as_noop():
    hidden = torch.randn(2, 3, 16)
    for activation in ACTIVATIONS:
        adapter = LowRankAdapter("post_block[0]", 16, rank=2, activation=activation)
        assert torch.equal(adapter(hidden, None), hidden)


def test_reft_keeps_rotation_orthonormal():
    torch.manual_seed(0)
    reft = ReFT("post_mlp[0]", 32, rank=6)
    optimizer = torch.optim.AdamW(reft.parameters(), lr=0.05)
    for _ in range(25):
        hidden = torch.randn(8, 32)
        loss = (reft(hidden, None) - hidden - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rotation = reft.rotation.weight.detach()
    assert (rotation @ rotation.T - torch.eye(6)).abs().max() < 1e-5
    assert reft.source.bias.abs().sum() > 0, "the optimisation should have moved the parameters"


def test_noreft_has_no_constraint():
    reft = ReFT("post_mlp[0]", 16, rank=4, variant="noreft")
    assert not hasattr(reft.rotation, "parametrizations")
    with pytest.raises(ValueError, match="unknown ReFT variant"):
        ReFT("post_mlp[0]", 16, variant="diagonal")
    with pytest.raises(ValueError, match="rank 20 exceeds"):
        ReFT("post_mlp[0]", 16, rank=20)


def test_jola_gates_clamp_at_evaluation():
    jola = JoLA("pre_mlp[0].heads[*]", heads=4, head_dim=8).eval()
    log_alpha = torch.tensor([-10.0, -3.0, 3.0, 10.0])
    gates = jola.gate(log_alpha)
    assert gates[0] == 0.0
    assert gates[1] == 0.0
    assert gates[2] == 1.0
    assert gates[3] == 1.0
    middle = jola.gate(torch.tensor([0.0]))
    assert torch.allclose(middle, torch.tensor([0.5]))


def test_jola_training_gates_are_samples_in_unit_interval():
    torch.manual_seed(0)
    jola = JoLA("pre_mlp[0].heads[*]", heads=64, head_dim=2).train()
    gates = jola.gate(torch.zeros(64))
    assert gates.min() >= 0.0
    assert gates.max() <= 1.0
    assert len(set(gates.tolist())) > 2


def test_jola_closed_gates_are_noop():
    model = make_decoder("llama")
    jola = build("jola", model)
    _perturb(jola)
    with torch.no_grad():
        jola.scale_log_alpha.fill_(-10.0)
        jola.bias_log_alpha.fill_(-10.0)
    jola.eval()
    batch = _batch()
    with torch.no_grad():
        expected = model(**batch).logits
        with labhooks.attach(model, jola):
            steered = model(**batch).logits
    assert torch.equal(steered, expected)


def test_jola_expected_l0_counts_open_gates():
    jola = JoLA("pre_mlp[0].heads[*]", heads=3, head_dim=4)
    with torch.no_grad():
        jola.scale_log_alpha.fill_(20.0)
        jola.bias_log_alpha.fill_(-20.0)
    assert jola.expected_l0().item() == pytest.approx(3.0, abs=1e-4)


def test_lofit_head_norms_rank_heads():
    lofit = LoFIT("pre_mlp[0].heads[*]", heads=3, head_dim=2)
    with torch.no_grad():
        lofit.scale.copy_(torch.tensor([[0.0, 0.1], [3.0, 4.0], [1.0, 0.0]]))
    assert lofit.head_norms().tolist() == pytest.approx([0.1, 5.0, 1.0])


def test_head_intervention_width_mismatch_names_parameter():
    model = make_decoder("gemma")
    wrong = LoFIT("pre_mlp[0].heads[*]", heads=4, head_dim=8)
    with pytest.raises(labhooks.SiteError, match="'scale'"):
        labhooks.attach(model, wrong)


def test_replay_rejects_other_batch_size():
    model = make_decoder("llama")
    replay = OracleReplay("post_block[0]", rows=2, tokens=4, width=32)
    with pytest.raises(ValueError, match="recorded for 2 rows"), labhooks.attach(model, replay):
        model(**_batch())


def test_plugin_registers_everything():
    registry = labhooks.reload_registry()
    info = registry.plugins["steer"]
    assert info.available
    for name in ("steer.low_rank_adapter", "steer.reft", "steer.lofit", "steer.jola", "steer.linear_map", "steer.oracle_replay"):
        assert name in info.interventions
    assert set(info.trainers) == {"post_block", "vector", "reft", "lofit", "jola", "lora", "sft", "joint"}
    assert info.methods == ["oracle"]


def test_listops_seeded_and_correct():
    first = generate_listops(50, seed=3)
    second = generate_listops(50, seed=3)
    assert first == second
    assert first != generate_listops(50, seed=4)
    for example in first:
        expression = example.prompt.splitlines()[-1]
        assert example.completion == str(evaluate_expression(expression))
        assert len(example.completion) == 1
    used = {operator for example in first for operator in OPERATORS if f"[{operator} " in example.prompt}
    assert used == set(OPERATORS)


@pytest.mark.parametrize(
    ("operator", "values", "expected"),
    [("MAX", [3, 9, 1], 9), ("MIN", [3, 9, 1], 1), ("MED", [3, 9, 1], 3), ("MED", [4, 1, 8, 6], 4), ("SM", [7, 5, 9], 1)],
)
def test_listops_operators(operator, values, expected):
    assert apply_operator(operator, values) == expected


def test_listops_nested_expression():
    assert evaluate_expression("[MAX 3 [SM 4 9] 1]") == 3
    assert evaluate_expression("[MIN [MED 5 2 8] [MAX 7 6]]") == 5
    with pytest.raises(ValueError, match="unbalanced"):
        evaluate_expression("[MAX 3 4")
