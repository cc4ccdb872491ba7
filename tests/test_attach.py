"""Invariants of attach(): no-op identity, KV-cache and padding consistency, hook hygiene."""

from __future__ import annotations

import pytest
import torch

import labhooks
from labhooks import FunctionIntervention, SteeringVector
from labhooks.errors import PositionError, SiteError

from conftest import DECODER_FAMILIES, make_bert, make_clip, make_decoder, make_open_clip, pad_batch, prompt_ids

EVERY_SITE = ["embeddings", "pre_mlp[*]", "pre_mlp[*].heads[*]", "post_mlp[*]", "post_block[*]", "logits"]


def identity(hidden, context):
    return hidden


def _all_site_noops(model, prefix=""):
    model_sites = labhooks.sites(model)
    interventions = []
    for spec in EVERY_SITE:
        try:
            model_sites.resolve(prefix + spec)
        except SiteError:
            continue
        interventions.append(FunctionIntervention(prefix + spec, identity))
    return interventions


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_noop_every_site_bit_identical(family):
    model = make_decoder(family)
    ids, mask = pad_batch(prompt_ids([5, 3]), "left")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        noops = _all_site_noops(model)
        assert len(noops) == len(EVERY_SITE)
        with labhooks.attach(model, noops):
            hooked = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, hooked)


def test_noop_every_site_encoders():
    bert = make_bert()
    ids, mask = pad_batch(prompt_ids([5, 3]), "right")
    with torch.no_grad():
        plain = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        with labhooks.attach(bert, _all_site_noops(bert)):
            hooked = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(plain, hooked)


def test_noop_every_site_clip_towers():
    clip = make_clip()
    ids, mask = pad_batch(prompt_ids([5, 3]), "right")
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = clip(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image
        noops = _all_site_noops(clip, "text.") + _all_site_noops(clip, "vision.")
        assert len(noops) == 10
        with labhooks.attach(clip, noops):
            hooked = clip(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image
    assert torch.equal(plain, hooked)


def test_noop_every_site_open_clip():
    model = make_open_clip()
    text = torch.randint(3, 90, (2, 12))
    image = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain_image, plain_text, _ = model(image, text)
        noops = _all_site_noops(model, "text.") + _all_site_noops(model, "vision.")
        assert len(noops) == 7
        with labhooks.attach(model, noops):
            hooked_image, hooked_text, _ = model(image, text)
    assert torch.equal(plain_image, hooked_image)
    assert torch.equal(plain_text, hooked_text)


def test_open_clip_vision_embedding_edit():
    model = make_open_clip()
    image = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = model.encode_image(image)
        with labhooks.attach(model, SteeringVector("vision.embeddings", torch.ones(16))):
            edited = model.encode_image(image)
    assert torch.allclose(edited, plain + 1)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_post_block_equals_hidden_states(family):
    model = make_decoder(family)
    ids, mask = pad_batch(prompt_ids([6]), "left")
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with labhooks.record(model, "post_block[*]") as recorded:
            model(input_ids=ids, attention_mask=mask)
    # The last entry of hidden_states has the final norm applied, so it is not a block output.
    for layer in range(len(reference) - 2):
        assert torch.equal(recorded[f"post_block[{layer}]"], reference[layer + 1][0]), f"layer {layer}"


def _greedy(model, ids, mask, use_cache, new_tokens=6):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        eos_token_id=None,
    )


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("positions", ["all", "generated", "prompt", "last_prompt", "last_prompt+generated", "at:1,-1"])
def test_generation_cache_on_equals_off(family, positions):
    model = make_decoder(family)
    ids, mask = pad_batch(prompt_ids([5, 3]), "left")
    vector = SteeringVector("post_block[1]", torch.randn(32, generator=torch.Generator().manual_seed(3)) * 4, positions=positions)
    with torch.no_grad():
        plain = _greedy(model, ids, mask, use_cache=True)
        with labhooks.attach(model, vector):
            cached = _greedy(model, ids, mask, use_cache=True)
            uncached = _greedy(model, ids, mask, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain), "the steering vector should change the generation"


@pytest.mark.parametrize("positions", ["all", "generated", "prompt", "last_prompt+generated"])
def test_left_padded_batch_equals_single_runs(positions):
    model = make_decoder("llama")
    prompts = prompt_ids([6, 2, 4], seed=5)
    vector = SteeringVector("post_block[0]", torch.randn(32, generator=torch.Generator().manual_seed(4)) * 3, positions=positions)
    ids, mask = pad_batch(prompts, "left")
    with torch.no_grad(), labhooks.attach(model, vector):
        batched = _greedy(model, ids, mask, use_cache=True)
        for row, prompt in enumerate(prompts):
            single_ids, single_mask = pad_batch([prompt], "left")
            single = _greedy(model, single_ids, single_mask, use_cache=True)
            assert torch.equal(batched[row, -6:], single[0, -6:]), f"row {row}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_positions_never_edited(side):
    model = make_decoder("llama")
    ids, mask = pad_batch(prompt_ids([6, 2, 4]), side)
    seen = []

    def watch(hidden, context):
        rows = context.row_index
        columns = context.selection.nonzero(as_tuple=True)[1]
        seen.append((rows.clone(), columns.clone()))
        return hidden

    with torch.no_grad(), labhooks.attach(model, FunctionIntervention("post_block[0]", watch, positions="prompt")):
        model(input_ids=ids, attention_mask=mask)
    rows, columns = seen[0]
    assert len(rows) == int(mask.sum())
    assert bool(mask[rows, columns].all())


def test_right_padded_forward_equals_single_runs():
    model = make_decoder("qwen2")
    prompts = prompt_ids([6, 2, 4], seed=2)
    vector = SteeringVector("post_mlp[1]", torch.randn(32) * 2, positions="last_prompt")
    ids, mask = pad_batch(prompts, "right")
    with torch.no_grad(), labhooks.attach(model, vector):
        batched = model(input_ids=ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            single = model(input_ids=prompt[None]).logits[0]
            assert torch.allclose(batched[row, : len(prompt)], single, atol=1e-5), f"row {row}"


def _count_calls(model, positions, ids, mask, new_tokens, eos=None):
    calls = []

    def count(hidden, context):
        calls.append((context.forward.is_prefill, hidden.shape[0]))
        return hidden

    with torch.no_grad(), labhooks.attach(model, FunctionIntervention("post_block[0]", count, positions=positions)):
        output = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=eos
        )
    return calls, output


def test_last_prompt_fires_on_prefill_only():
    model = make_decoder("llama")
    ids, mask = pad_batch(prompt_ids([5]), "left")
    calls, _ = _count_calls(model, "last_prompt", ids, mask, new_tokens=5)
    assert calls == [(True, 1)]


def test_generated_fires_once_per_token():
    model = make_decoder("llama")
    ids, mask = pad_batch(prompt_ids([5]), "left")
    calls, output = _count_calls(model, "generated", ids, mask, new_tokens=5)
    # The last generated token is never fed back, so 5 new tokens mean 4 decode calls.
    assert calls == [(False, 1)] * 4
    assert output.shape[1] == 10


def test_generated_stops_with_early_eos():
    model = make_decoder("llama")
    ids, mask = pad_batch(prompt_ids([5]), "left")
    _, free_run = _count_calls(model, "generated", ids, mask, new_tokens=6)
    eos = int(free_run[0, 7])  # the third generated token
    calls, output = _count_calls(model, "generated", ids, mask, new_tokens=6, eos=eos)
    assert output.shape[1] == 8
    assert calls == [(False, 1)] * 2


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3", "gpt2", "gpt_neox"])
def test_head_identity_leaves_logits(family):
    model = make_decoder(family)
    ids, mask = pad_batch(prompt_ids([5, 3]), "left")
    shapes = []

    def head_identity(hidden, context):
        shapes.append(tuple(hidden.shape[-2:]))
        return hidden.clone()

    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with labhooks.attach(model, FunctionIntervention("pre_mlp[*].heads[0,2]", head_identity, positions="prompt")):
            hooked = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, hooked)
    heads, head_dim = labhooks.sites(model).head_shape()
    assert shapes[0] == (2, head_dim)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_head_edit_changes_only_its_slice(family):
    model = make_decoder(family)
    heads, head_dim = labhooks.sites(model).head_shape()
    ids, mask = pad_batch(prompt_ids([5]), "left")
    projection = model.model.layers[1].self_attn.o_proj
    inputs = []
    handle = projection.register_forward_hook(lambda module, args, output: inputs.append(args[0].clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            with labhooks.attach(model, SteeringVector("pre_mlp[1].heads[2]", torch.ones(head_dim))):
                model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    before = inputs[0].reshape(1, 5, heads, head_dim)
    after = inputs[1].reshape(1, 5, heads, head_dim)
    changed = (after - before).abs().amax(dim=(0, 1, 3))
    assert changed[2] > 0.5
    assert torch.equal(torch.cat([changed[:2], changed[3:]]), torch.zeros(heads - 1))


def _labhooks_hook_count(model):
    count = 0
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            count += sum(1 for hook in hooks.values() if "labhooks" in getattr(hook, "__module__", "") or "labhooks" in repr(hook))
    return count


def _all_hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_exception_inside_context_removes_hooks():
    model = make_decoder("llama")
    ids = prompt_ids([4])[0][None]
    fired = []
    user_handle = model.model.layers[0].register_forward_hook(lambda module, args, output: fired.append(1))
    keys = list(model.state_dict())
    modules = [name for name, _ in model.named_modules()]
    hooks_before = _all_hook_count(model)

    def explode(hidden, context):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with labhooks.attach(model, [SteeringVector("post_block[*]", 32), FunctionIntervention("post_mlp[2]", explode)]):
            model(ids)
    assert _all_hook_count(model) == hooks_before
    assert _labhooks_hook_count(model) == 0
    model(ids)
    assert len(fired) == 2, "the user's hook fires before and after the exception"
    assert list(model.state_dict()) == keys
    assert [name for name, _ in model.named_modules()] == modules
    user_handle.remove()


def test_nested_contexts_and_remove():
    model = make_decoder("llama")
    ids = prompt_ids([4])[0][None]
    fired = []
    user_handle = model.model.layers[1].register_forward_hook(lambda module, args, output: fired.append(1))
    hooks_before = _all_hook_count(model)
    with labhooks.attach(model, SteeringVector("post_block[1]", torch.ones(32))) as outer:
        with labhooks.attach(model, SteeringVector("post_block[1]", torch.ones(32))) as inner:
            assert inner.active
            model(ids)
        assert not inner.active
        assert outer.active
        model(ids)
    assert _all_hook_count(model) == hooks_before
    handle = labhooks.attach(model, SteeringVector("post_block[1]", torch.ones(32)))
    handle.remove()
    handle.remove()
    assert _all_hook_count(model) == hooks_before
    model(ids)
    assert len(fired) == 3
    user_handle.remove()


def test_order_at_one_site():
    model = make_decoder("llama")
    ids = prompt_ids([3])[0][None]
    order = []

    def first(hidden, context):
        order.append("first")
        return hidden * 2

    def second(hidden, context):
        order.append("second")
        return hidden + 1

    captured = {}
    with labhooks.record(model, "post_block[0]") as plain:
        model(ids)
    with labhooks.attach(model, [FunctionIntervention("post_block[0]", first), FunctionIntervention("post_block[0]", second)]):
        with labhooks.record(model, "post_block[0]") as edited:
            model(ids)
    captured["plain"], captured["edited"] = plain["post_block[0]"], edited["post_block[0]"]
    assert order == ["first", "second"]
    assert torch.allclose(captured["edited"], captured["plain"] * 2 + 1)


def test_invalid_site_registers_nothing():
    model = make_decoder("llama")
    hooks_before = _all_hook_count(model)
    with pytest.raises(SiteError) as error:
        labhooks.attach(model, [SteeringVector("post_block[0]", 32), SteeringVector("post_block[9]", 32)])
    message = str(error.value)
    assert "3 layers" in message
    assert "post_block[l]" in message
    assert "pre_mlp[l].heads[h]" in message
    assert _all_hook_count(model) == hooks_before
    with pytest.raises(SiteError, match="valid sites"):
        labhooks.attach(model, SteeringVector("resid_mid[0]", 32))
    with pytest.raises(SiteError, match="site width is 32"):
        labhooks.attach(model, SteeringVector("post_block[0]", 40))
    assert _all_hook_count(model) == hooks_before


def test_position_selector_on_pooled_site_raises():
    clip = make_clip()
    ids, mask = pad_batch(prompt_ids([4]), "right")
    with labhooks.attach(clip, SteeringVector("text.embeddings", 16, positions="last_prompt")):
        with pytest.raises(PositionError, match="only the position selector 'all'"):
            clip.get_text_features(input_ids=ids, attention_mask=mask)


def test_dtype_follows_hidden_state():
    model = make_decoder("llama").to(torch.bfloat16)
    ids = prompt_ids([4])[0][None]
    with torch.no_grad(), labhooks.attach(model, SteeringVector("post_block[0]", torch.ones(32))):
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = make_decoder("llama")
    ids = prompt_ids([4])[0][None]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        plain = wrapped(input_ids=ids).logits
        with labhooks.attach(wrapped, SteeringVector("post_block[1]", torch.ones(32) * 3, positions="last_prompt")):
            steered = wrapped(input_ids=ids).logits
        again = wrapped(input_ids=ids).logits
    assert not torch.equal(plain, steered)
    assert torch.equal(plain[:, :-1], steered[:, :-1])
    assert torch.equal(plain, again)


def test_gradient_checkpointing_same_gradients():
    ids, mask = pad_batch(prompt_ids([5, 3]), "left")
    gradients = []
    for checkpointing in (False, True):
        model = make_decoder("llama")
        model.train()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        vector = SteeringVector("post_block[*]", torch.zeros(32), positions="prompt", trainable=True)
        with labhooks.attach(model, vector):
            output = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
            output.loss.backward()
        gradients.append(vector.vector.grad.clone())
    assert gradients[0].abs().sum() > 0
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)
