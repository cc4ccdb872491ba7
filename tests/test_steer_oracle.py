"""Oracle steering: replayed differences reproduce a fine-tuned model; linear maps are fitted by least squares."""

from __future__ import annotations

import copy

import pytest
import torch
from test_steer_support import char_tokenizer, tiny_loaded

import labhooks
from labhooks.errors import ConfigError
from labhooks.intervention import InterventionContext
from labhooks.methods import MethodInputs
from labhooks.positions import ForwardContext
from labhooks_steer.interventions import LinearMap
from labhooks_steer.oracle import OracleConfig, encode_right_padded, fit_linear_map, next_token_kl, record_states, replay_deltas, run_oracle

from conftest import DECODER_FAMILIES, make_decoder

TEXTS = ["[MAX 3 4]", "[SM 9 9 1]", "ab", "[MED 1 2 3 4 5]"]


def perturbed_copy(model, scale=0.05, seed=7):
    """A stand-in for a fine-tuned model: every block weight moved a little."""
    finetuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in finetuned.named_parameters():
            if ".layers." in name or ".h." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return finetuned


def _batch():
    return encode_right_padded(char_tokenizer(), TEXTS, max_tokens=32)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_chained_replay_every_layer_reproduces_finetuned_logits(family):
    base = make_decoder(family)
    finetuned = perturbed_copy(base)
    batch = _batch()
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        target = finetuned(**batch).logits
        unsteered = base(**batch).logits
    replays = replay_deltas(base, finetuned, batch, "post_block[*]", chained=True)
    assert len(replays) == 3
    with torch.no_grad(), labhooks.attach(base, replays):
        steered = base(**batch).logits
    assert (unsteered - target)[mask].abs().max() > 1e-3
    torch.testing.assert_close(steered[mask], target[mask], rtol=1e-4, atol=1e-5)


def test_single_replay_gives_finetuned_state_at_its_site():
    base = make_decoder("llama")
    finetuned = perturbed_copy(base)
    batch = _batch()
    replays = replay_deltas(base, finetuned, batch, "post_block[*]", chained=False)
    expected = record_states(finetuned, batch, "post_block[1]")["post_block[1]"]
    with labhooks.attach(base, replays[1]):
        steered = record_states(base, batch, "post_block[1]")["post_block[1]"]
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-6)


def test_replay_leaves_tokens_past_recording_unchanged():
    base = make_decoder("llama")
    (replay,) = replay_deltas(base, perturbed_copy(base), _batch(), "post_block[0]")
    longer = {key: torch.cat([value, value[:, :2]], dim=1) for key, value in _batch().items()}
    longer["attention_mask"][:, -2:] = 1
    hidden = torch.randn(4, longer["input_ids"].shape[1], 32)
    mask = longer["attention_mask"].bool()
    positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, -1)
    context = InterventionContext(replay.site, ForwardContext(mask, positions, mask.sum(-1), True, 0))
    edited = replay(hidden, context)
    recorded = replay.tokens
    past = positions >= recorded
    assert past.any()
    assert torch.equal(edited[past], hidden[past])


def test_linear_map_recovers_affine_difference():
    torch.manual_seed(0)
    states = torch.randn(400, 16)
    weight = torch.randn(16, 16) * 0.1
    bias = torch.randn(16)
    fitted = fit_linear_map("post_block[0]", states, states @ weight.T + bias, ridge=0.0)
    torch.testing.assert_close(fitted.weight, weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fitted.bias, bias, rtol=1e-4, atol=1e-4)


def test_next_token_kl_zero_for_same_logits():
    logits = torch.randn(2, 5, 7)
    mask = torch.ones(2, 5)
    assert next_token_kl(logits, logits, mask) == pytest.approx(0.0, abs=1e-6)
    assert next_token_kl(logits, logits + torch.randn(2, 5, 7), mask) > 0


def test_oracle_method_scores_steered_layer(tmp_path):
    loaded = tiny_loaded("llama")
    steering = LinearMap("post_block[1]", 32)
    torch.manual_seed(1)
    with torch.no_grad():
        steering.weight.normal_(0, 0.2)
        steering.bias.normal_(0, 0.5)
    finetuned_path = labhooks.save_bundle(tmp_path / "ft.safetensors", [steering], plugin="steer", method="test", model=loaded.model)
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(TEXTS * 3))
    config = OracleConfig(finetuned=str(finetuned_path), data=str(data), max_examples=12, batch_size=4, ridge=1e-6)
    result = run_oracle(MethodInputs(config=config, loaded=loaded))
    (table,) = result.tables
    by_site = {row[0]: row for row in table.rows}
    assert set(by_site) == {"post_block[0]", "post_block[1]", "post_block[2]"}
    assert by_site["post_block[1]"][2] < 1e-6
    assert by_site["post_block[1]"][3] < 1e-3 * by_site["post_block[1]"][1]
    assert by_site["post_block[0]"][2] > 1e-3
    (saved,) = result.interventions
    assert by_site[str(saved.site)][3] == min(row[3] for row in table.rows)
    assert result.metadata["oracle"]["saved_site"] == str(saved.site)

    chosen = run_oracle(MethodInputs(config=OracleConfig(**{**vars(config), "save_layer": 0}), loaded=loaded))
    assert str(chosen.interventions[0].site) == "post_block[0]"


def test_oracle_save_layer_checked_first(tmp_path):
    # Neither the fine-tuned model nor the data file exists: the save_layer error comes first.
    config = OracleConfig(finetuned=str(tmp_path / "absent"), data=str(tmp_path / "absent.txt"), save_layer=7)
    with pytest.raises(ConfigError, match="save_layer=7 is not among the scored sites post_block"):
        run_oracle(MethodInputs(config=config, loaded=tiny_loaded("llama")))


def test_oracle_config_requires_inputs():
    with pytest.raises(ConfigError, match="missing finetuned="):
        labhooks.build_config(OracleConfig, {"data": "x.txt"})
    with pytest.raises(ConfigError, match="missing data="):
        labhooks.build_config(OracleConfig, {"finetuned": "ft.safetensors"})
