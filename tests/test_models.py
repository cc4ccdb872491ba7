"""Model loading: error messages, and the embedded default model end to end."""

from __future__ import annotations

import pytest
import torch

import labhooks
from labhooks.errors import ModelLoadError
from labhooks.models import default_model_path


def test_missing_paths_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file .* not found"):
        labhooks.load_model(str(tmp_path / "nothing.gguf"))
    with pytest.raises(ModelLoadError, match="not found"):
        labhooks.load_model(str(tmp_path / "no-such-folder/"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="not found as a local folder"):
        labhooks.load_model(str(empty))


def test_invalid_kind():
    with pytest.raises(ValueError, match="kind must be"):
        labhooks.load_model(kind="vision")


def test_corrupt_gguf_is_model_load_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LABHOOKS_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot load the GGUF file"):
        labhooks.load_model(str(broken))


@pytest.fixture(scope="module")
def default_model():
    return labhooks.load_model()


@pytest.mark.integration
@pytest.mark.slow
def test_default_model_loads_offline(default_model):
    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_model.name == "SmolLM2-135M-Instruct"
    model_sites = labhooks.sites(default_model.model)
    assert model_sites.num_layers() == 30
    assert model_sites.hidden_size() == 576
    assert model_sites.head_shape() == (9, 64)


@pytest.mark.integration
@pytest.mark.slow
def test_default_model_noop_every_site(default_model):
    model, tokenizer = default_model.model, default_model.tokenizer
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    specs = ["embeddings", "pre_mlp[*]", "pre_mlp[*].heads[*]", "post_mlp[*]", "post_block[*]", "logits"]
    for spec in specs:
        assert labhooks.sites(model).resolve(spec)
    noops = [labhooks.FunctionIntervention(spec, lambda hidden, context: hidden) for spec in specs]
    with torch.no_grad():
        plain = model(**batch).logits
        with labhooks.attach(model, noops):
            hooked = model(**batch).logits
    assert torch.equal(plain, hooked)


@pytest.mark.integration
@pytest.mark.slow
def test_default_model_greedy_answer_and_steering(default_model):
    from labhooks.generation import generate_texts

    model, tokenizer = default_model.model, default_model.tokenizer
    prompts = ["What is the capital of France?"]
    plain = generate_texts(model, tokenizer, prompts, max_new_tokens=12)
    assert "Paris" in plain[0]
    batch = tokenizer(prompts, return_tensors="pt")
    with torch.no_grad(), labhooks.record(model, "post_block[6]", positions="last_prompt") as recorded:
        model(**batch)
    norm = recorded["post_block[6]"].norm()
    direction = model.get_input_embeddings().weight[tokenizer.encode(" London")[0]].detach()
    steering = labhooks.SteeringVector("post_block[6]", direction / direction.norm() * norm, positions="generated")
    with labhooks.attach(model, steering):
        steered = generate_texts(model, tokenizer, prompts, max_new_tokens=12)
    assert steered != plain
