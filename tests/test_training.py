"""The trainer: data files, completion-only loss, positions in training, counts, resume, checkpointing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers
from test_steer_support import char_tokenizer, tiny_loaded

import labhooks
from labhooks.errors import ConfigError
from labhooks.intervention import Intervention
from labhooks.training import (
    IGNORE_INDEX,
    PARSERS,
    Example,
    TrainingConfig,
    TrainInputs,
    collate,
    completion_loss,
    count_base_parameters,
    count_trainable_parameters,
    encode_example,
    fit,
    load_checkpoint,
    load_examples,
    split_examples,
    write_examples,
)
from labhooks_steer.interventions import LowRankAdapter
from labhooks_steer.listops import generate_listops
from labhooks_steer.trainers import (
    TRAINERS,
    JointConfig,
    JoLAConfig,
    LoFITConfig,
    LoRAConfig,
    PostBlockConfig,
    ReFTConfig,
    SFTConfig,
    VectorConfig,
    build_post_block,
    wrap_lora,
)


def short_examples(count=12, seed=0):
    return generate_listops(count, seed=seed, max_depth=1, max_arguments=3, instruction="")


# Data files --------------------------------------------------------------------------


def test_load_jsonl_and_csv(tmp_path):
    examples = [Example("[MAX 1 2]", "2"), Example('a, "quoted"\nprompt', "x")]
    jsonl = write_examples(tmp_path / "data.jsonl", examples)
    assert load_examples(jsonl) == examples
    csv_path = tmp_path / "data.csv"
    import csv

    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "completion"])
        writer.writeheader()
        for example in examples:
            writer.writerow({"prompt": example.prompt, "completion": example.completion})
    assert load_examples(csv_path) == examples


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ('{"prompt": "a"}\n', ".jsonl", "line 1 has no completion"),
        ("not json\n", ".jsonl", "line 1: not valid JSON"),
        ('{"prompt": "a", "completion": " "}\n', ".jsonl", "the completion is empty"),
        ("", ".jsonl", "contains no examples"),
        ("prompt,answer\na,b\n", ".csv", "line 2 has no completion"),
        ("a\tb", ".parquet", "must end in .jsonl or .csv"),
    ],
)
def test_load_examples_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_examples(path)


def test_load_examples_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_examples(tmp_path / "absent.jsonl")


def test_split_holds_out_eval_examples():
    examples = short_examples(10)
    train, evaluation = split_examples(TrainingConfig(eval_size=3, seed=1), examples)
    assert len(train) == 7
    assert len(evaluation) == 3
    assert sorted(map(str, train + evaluation)) == sorted(map(str, examples))
    with pytest.raises(ConfigError, match="eval_size=10 leaves no training examples"):
        split_examples(TrainingConfig(eval_size=10), examples)


def test_config_validation():
    with pytest.raises(ConfigError, match="steps: must be >= 1"):
        labhooks.build_config(PostBlockConfig, {"steps": "0"})
    with pytest.raises(ConfigError, match="choose one of"):
        labhooks.build_config(PostBlockConfig, {"activation": "softplus"})
    with pytest.raises(ConfigError, match="unknown option 'rnak'"):
        labhooks.build_config(PostBlockConfig, {"rnak": "4"})
    config = labhooks.build_config(ReFTConfig, {"rank": "2", "positions": "last_prompt", "warmup_ratio": "0"})
    assert config.rank == 2
    assert config.warmup_ratio == 0.0


def test_parsers():
    assert PARSERS["first_word"]("  Sport. The article") == "sport"
    assert PARSERS["first_digit"]("The answer is 7.") == "7"
    assert PARSERS["first_line"]("Great\nmore") == "great"
    assert PARSERS["exact"](" 42 ") == "42"


# Batches and the loss ----------------------------------------------------------------


def test_collate_masks_prompt_and_padding():
    tokenizer = char_tokenizer()
    config = TrainingConfig()
    encoded = [encode_example(tokenizer, Example("ab", "xyz"), config), encode_example(tokenizer, Example("abcd", "q"), config)]
    assert encoded[0].completion_ids[-1] == tokenizer.eos_token_id
    batch = collate(encoded, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 4 + 4)
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 5, 5]]
    labels = batch["labels"].tolist()
    assert labels[0] == [*tokenizer("xyz")["input_ids"], tokenizer.eos_token_id]
    assert labels[1][2:] == [IGNORE_INDEX, IGNORE_INDEX]
    assert int(batch["prompt_length"]) == 4


def test_completion_loss_counts_only_completion_tokens():
    loaded = tiny_loaded("llama")
    tokenizer = loaded.tokenizer
    config = TrainingConfig()
    encoded = [encode_example(tokenizer, Example(prompt, completion), config) for prompt, completion in [("ab", "xyz"), ("abcd", "q")]]
    batch = collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        loss = completion_loss(loaded.model, batch, supports_logits_to_keep=True)
        logits = loaded.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
    prompt_length = int(batch["prompt_length"])
    terms = []
    for row, example in enumerate(encoded):
        for offset, token in enumerate(example.completion_ids):
            log_probs = torch.log_softmax(logits[row, prompt_length - 1 + offset], dim=-1)
            terms.append(-log_probs[token])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_completion_loss_same_without_logits_to_keep():
    loaded = tiny_loaded("gpt2")
    config = TrainingConfig()
    encoded = [encode_example(loaded.tokenizer, example, config) for example in short_examples(3)]
    batch = collate(encoded, 0)
    with torch.no_grad():
        kept = completion_loss(loaded.model, batch, True)
        full = completion_loss(loaded.model, batch, False)
    assert kept.item() == pytest.approx(full.item(), rel=1e-5)


class PositionProbe(Intervention):
    """A trainable no-op that records the absolute positions it is given."""

    name = "test.position_probe"

    def __init__(self, site, positions):
        super().__init__(site, positions)
        self.offset = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, hidden, context):
        selected = context.forward.positions[:, -context.selection.shape[1] :][context.selection]
        self.seen.append(selected.clone())
        return hidden + self.offset


def test_training_edits_last_prompt_token():
    loaded = tiny_loaded("llama")
    examples = [Example("abc", "x"), Example("abcdefg", "yy")]
    probe = PositionProbe("post_block[0]", "last_prompt")
    config = TrainingConfig(steps=1, batch_size=2, eval_size=0, warmup_ratio=0.0)
    fit(loaded, config, examples, interventions=[probe])
    (selected,) = probe.seen
    assert sorted(selected.tolist()) == [2, 6]


def test_training_generated_positions_are_completion():
    loaded = tiny_loaded("llama")
    examples = [Example("abc", "x")]
    probe = PositionProbe("post_block[1]", "generated")
    fit(loaded, TrainingConfig(steps=1, batch_size=1, eval_size=0), examples, interventions=[probe])
    (selected,) = probe.seen
    assert selected.tolist() == [3, 4]


# Parameter counts --------------------------------------------------------------------


def llama_1b_config():
    return transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    )


def test_parameter_counts_llama_1b_shape():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_1b_config())
    base = count_base_parameters(model)
    assert base == 1_235_814_400
    assert model.lm_head.weight is model.model.embed_tokens.weight

    loaded = labhooks.LoadedModel(model, None, "llama-1b-shape")
    with torch.device("meta"):
        adapters = build_post_block(loaded, PostBlockConfig(rank=8))
    adapter_count = count_trainable_parameters(adapters, base)
    assert adapter_count.trainable == 524_288
    assert adapter_count.percent == pytest.approx(0.0424, abs=5e-4)

    lora = wrap_lora(model, LoRAConfig(rank=8, target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"))
    lora_count = count_trainable_parameters([lora], base)
    assert lora_count.trainable == 5_636_096
    assert lora_count.percent == pytest.approx(0.456, abs=1e-3)
    assert lora_count.trainable / adapter_count.trainable > 10


def test_all_linear_lora_targets_seven_projections():
    loaded = tiny_loaded("llama")
    base = count_base_parameters(loaded.model)
    lora = wrap_lora(loaded.model, LoRAConfig(rank=2))
    adapted = {name.split(".")[-1] for name, module in lora.named_modules() if hasattr(module, "lora_A") and name.endswith("proj")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert count_trainable_parameters([lora], base).trainable > 0
    lora.unload()
    assert count_base_parameters(loaded.model) == base


# Training runs -----------------------------------------------------------------------

METHOD_CONFIGS = {
    "post_block": PostBlockConfig(learning_rate=1e-2, rank=4),
    "vector": VectorConfig(learning_rate=3e-2),
    "reft": ReFTConfig(learning_rate=1e-2, rank=4, positions="last_prompt:3"),
    "lofit": LoFITConfig(learning_rate=3e-2, top_k=4),
    "jola": JoLAConfig(learning_rate=3e-2),
    "lora": LoRAConfig(learning_rate=1e-2, rank=4),
    "sft": SFTConfig(learning_rate=3e-3),
    "joint": JointConfig(learning_rate=1e-2, rank=2, adapter_rank=2, adapter_learning_rate=1e-2),
}


def _train(method, loaded, examples, **changes):
    trainer = next(trainer for trainer in TRAINERS if trainer.name == method)
    base = dict(steps=24, batch_size=len(examples), eval_size=0, warmup_ratio=0.0, lr_scheduler="constant_with_warmup", seed=0)
    config = replace(METHOD_CONFIGS[method], **(base | changes))
    return trainer.train(TrainInputs(config, loaded, "steer", examples=examples))


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_training_lowers_loss(method):
    loaded = tiny_loaded("llama")
    before = [parameter.detach().clone() for parameter in loaded.model.parameters()]
    examples = short_examples(8)
    result = _train(method, loaded, examples)
    losses = [entry["loss"] for entry in result.history]
    assert len(losses) == 24
    assert losses[-1] < 0.95 * losses[0], losses
    assert result.parameters is not None
    assert result.parameters.trainable > 0
    if method not in ("sft",):
        after = list(loaded.model.parameters())
        assert all(torch.equal(old, new) for old, new in zip(before, after, strict=True)), "the base model must stay frozen and unchanged"
        assert len(before) == len(after)
    else:
        assert result.parameters.percent == 100.0
    if method in ("lora", "joint", "sft"):
        assert any(key.startswith("weights.") for key in result.tensors)
    if method == "lofit":
        assert len(result.metadata["selected_heads"]) >= 1
        heads = sum(intervention.heads for intervention in result.interventions)
        assert heads == 4


def test_evaluation_accuracy_reported():
    loaded = tiny_loaded("llama")
    examples = [Example("abc", "7")] * 4
    result = _train("post_block", loaded, examples, eval_data=None, eval_size=2, steps=2, max_new_tokens=2)
    assert result.evaluation is not None
    assert result.evaluation.num_examples == 2
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert result.tables[0].columns[:2] == ["method", "accuracy"]


@pytest.mark.parametrize("method", ["post_block", "jola", "lora"])
def test_checkpoint_resume_matches_uninterrupted(method, tmp_path):
    examples = short_examples(6)
    changes = dict(steps=6, batch_size=3, lr_scheduler="linear", warmup_ratio=0.2)

    straight = _train(method, tiny_loaded("llama"), examples, **changes)
    _train(method, tiny_loaded("llama"), examples, save_every=3, checkpoint_dir=str(tmp_path), **changes)
    checkpoint = tmp_path / "train-step000003.safetensors"
    assert checkpoint.is_file()

    loaded = tiny_loaded("llama")
    bundle = load_checkpoint(checkpoint, loaded.model)
    assert bundle.manifest["metadata"]["training"]["step"] == 3
    assert bundle.plugin == "steer"
    assert bundle.method == method
    resumed = _train(method, loaded, examples, resume_from=str(checkpoint), **changes)

    assert [entry["step"] for entry in resumed.history] == [1, 2, 3, 4, 5, 6]
    for expected, actual in zip(straight.history, resumed.history, strict=True):
        assert actual["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    for expected, actual in zip(straight.interventions, resumed.interventions, strict=True):
        for (name, tensor), other in zip(expected.state_dict().items(), actual.state_dict().values(), strict=True):
            torch.testing.assert_close(other, tensor, rtol=1e-4, atol=1e-6, msg=name)
    for key, tensor in straight.tensors.items():
        torch.testing.assert_close(resumed.tensors[key], tensor, rtol=1e-4, atol=1e-6)


def test_checkpoint_bundle_attaches_like_any_bundle(tmp_path):
    examples = short_examples(4)
    _train("post_block", tiny_loaded("llama"), examples, steps=2, save_every=2, checkpoint_dir=str(tmp_path))
    loaded = tiny_loaded("llama")
    bundle = labhooks.load_bundle(tmp_path / "train-step000002.safetensors", loaded.model)
    assert all(isinstance(intervention, LowRankAdapter) for intervention in bundle.interventions)
    assert any(name.startswith("optimizer.") for name in bundle.tensors)
    with labhooks.attach(loaded.model, bundle.interventions):
        loaded.model(input_ids=torch.tensor([[5, 6, 7]]))


def test_resume_rejects_plain_bundle(tmp_path):
    loaded = tiny_loaded("llama")
    path = labhooks.save_bundle(tmp_path / "plain.safetensors", build_post_block(loaded, PostBlockConfig(rank=2)), model=loaded.model)
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        _train("post_block", loaded, short_examples(4), resume_from=str(path))


def test_gradient_checkpointing_same_gradients():
    loaded = tiny_loaded("llama")
    config = TrainingConfig()
    batch = collate([encode_example(loaded.tokenizer, example, config) for example in short_examples(3)], 0)
    adapters = build_post_block(loaded, PostBlockConfig(rank=4, site="post_block[*]"))
    # A hook inside a block runs again when the block is recomputed; one on the block does not.
    inside_block = [LowRankAdapter("pre_mlp[1]", 32, rank=2)]
    interventions = adapters + inside_block
    with torch.no_grad():
        for intervention in interventions:
            intervention.up.normal_(0, 0.1)
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(False)

    def gradients():
        for intervention in interventions:
            intervention.zero_grad()
        loaded.model.train()
        with labhooks.attach(loaded.model, interventions):
            completion_loss(loaded.model, batch, True).backward()
        loaded.model.eval()
        return [parameter.grad.clone() for intervention in interventions for parameter in intervention.parameters()]

    plain = gradients()
    loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert loaded.model.model.layers[0].gradient_checkpointing
    checkpointed = gradients()
    for expected, actual in zip(plain, checkpointed, strict=True):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def test_training_with_gradient_checkpointing_lowers_loss():
    loaded = tiny_loaded("llama")
    result = _train("reft", loaded, short_examples(6), gradient_checkpointing=True, steps=12)
    losses = [entry["loss"] for entry in result.history]
    assert losses[-1] < losses[0]
    assert not loaded.model.model.layers[0].gradient_checkpointing, "fit turns gradient checkpointing off again"


def test_fit_rejects_nothing_to_train():
    loaded = tiny_loaded("llama")
    with pytest.raises(ConfigError, match="nothing to train"):
        fit(loaded, TrainingConfig(steps=1, eval_size=0), short_examples(2))


def test_history_written_to_bundle_metadata(tmp_path):
    loaded = tiny_loaded("llama")
    result = _train("vector", loaded, short_examples(4), steps=3)
    path = labhooks.save_bundle(tmp_path / "v.safetensors", result.interventions, plugin="steer", method="vector", metadata=result.metadata)
    manifest = labhooks.read_manifest(path)
    history = manifest["metadata"]["training"]["history"]
    assert [entry["step"] for entry in history] == [1, 2, 3]
    json.dumps(manifest)


@pytest.mark.parametrize("method", ["lora", "sft"])
def test_weight_bundle_applies_to_fresh_model(method, tmp_path):
    from labhooks_steer.trainers import apply_trained_weights

    examples = short_examples(6)
    result = _train(method, tiny_loaded("llama"), examples, steps=12)
    path = labhooks.save_bundle(
        tmp_path / "weights.safetensors",
        result.interventions,
        plugin="steer",
        method=method,
        config=vars(METHOD_CONFIGS[method]),
        tensors=result.tensors,
    )
    bundle = labhooks.load_bundle(path)

    fresh = tiny_loaded("llama")
    batch = collate([encode_example(fresh.tokenizer, example, TrainingConfig()) for example in examples], 0)
    with torch.no_grad():
        base_loss = completion_loss(fresh.model, batch, True).item()
        model = apply_trained_weights(fresh, bundle)
        trained_loss = completion_loss(model, batch, True).item()
    assert trained_loss < 0.95 * base_loss
    assert trained_loss == pytest.approx(result.history[-1]["loss"], rel=0.2)


def test_weight_bundle_rejects_intervention_bundle(tmp_path):
    from labhooks_steer.trainers import apply_trained_weights

    loaded = tiny_loaded("llama")
    path = labhooks.save_bundle(
        tmp_path / "plain.safetensors", build_post_block(loaded, PostBlockConfig(rank=2)), plugin="steer", method="post_block"
    )
    with pytest.raises(ConfigError, match="contains no trained weights"):
        apply_trained_weights(loaded, labhooks.load_bundle(path))


@pytest.mark.integration
@pytest.mark.slow
def test_post_block_trains_on_default_model():
    loaded = labhooks.load_model()
    examples = generate_listops(6, seed=0, max_depth=1, max_arguments=3)
    config = PostBlockConfig(
        steps=2, batch_size=2, eval_size=2, max_prompt_tokens=16, max_new_tokens=2, parser="first_digit", warmup_ratio=0.0
    )
    result = next(trainer for trainer in TRAINERS if trainer.name == "post_block").train(
        TrainInputs(config, loaded, "steer", examples=examples)
    )
    assert len(result.interventions) == 30
    assert result.parameters is not None
    assert result.parameters.trainable == 30 * 2 * 8 * 576
    assert result.parameters.base == 134_515_008
    assert result.evaluation is not None
    assert result.evaluation.num_examples == 2
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in result.history)
