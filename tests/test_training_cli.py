"""``labhooks train`` and ``labhooks apply plugin=steer method=oracle`` end to end on a tiny model folder."""

from __future__ import annotations

import pytest
from test_steer_support import tiny_loaded
from typer.testing import CliRunner

import labhooks
from labhooks.training import write_examples
from labhooks_cli.main import app
from labhooks_steer.listops import generate_listops

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    from labhooks_cli import console

    monkeypatch.setattr(console.console, "width", 200)
    monkeypatch.setattr(console.error_console, "width", 200)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    loaded = tiny_loaded("llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_examples(
        tmp_path_factory.mktemp("data") / "listops.jsonl", generate_listops(12, seed=0, max_depth=1, max_arguments=3, instruction="")
    )


def test_train_writes_bundle_and_prints_table(model_folder, data_file, tmp_path):
    out = tmp_path / "adapter.safetensors"
    words = [
        "train",
        "plugin=steer",
        "method=post_block",
        f"model={model_folder}",
        f"data={data_file}",
        "rank=2",
        "steps=3",
        "eval_size=4",
        "max_new_tokens=2",
        f"out={out}",
    ]
    result = runner.invoke(app, words)
    assert result.exit_code == 0, result.output
    assert "evaluation of post_block" in result.output
    assert "bundle written" in result.output
    bundle = labhooks.load_bundle(out)
    assert bundle.plugin == "steer"
    assert bundle.method == "post_block"
    assert bundle.config["rank"] == 2
    assert len(bundle.interventions) == 3
    assert [entry["step"] for entry in bundle.manifest["metadata"]["training"]["history"]] == [1, 2, 3]


def test_train_lora_bundle_holds_weights(model_folder, data_file, tmp_path):
    out = tmp_path / "lora.safetensors"
    words = [
        "train",
        "plugin=steer",
        "method=lora",
        f"model={model_folder}",
        f"data={data_file}",
        "rank=2",
        "steps=2",
        "eval_size=0",
        f"out={out}",
    ]
    result = runner.invoke(app, words)
    assert result.exit_code == 0, result.output
    bundle = labhooks.load_bundle(out)
    assert bundle.interventions == []
    assert any("lora_A" in name for name in bundle.tensors)


def test_train_checkpoints_next_to_output(model_folder, data_file, tmp_path):
    out = tmp_path / "vector.safetensors"
    words = [
        "train",
        "plugin=steer",
        "method=vector",
        f"model={model_folder}",
        f"data={data_file}",
        "steps=2",
        "save_every=1",
        "eval_size=0",
        f"out={out}",
    ]
    result = runner.invoke(app, words)
    assert result.exit_code == 0, result.output
    checkpoints = sorted(path.name for path in (tmp_path / "vector-checkpoints").iterdir())
    assert checkpoints == ["train-step000001.safetensors", "train-step000002.safetensors"]


def test_train_help_lists_options():
    result = runner.invoke(app, ["train", "plugin=steer", "method=post_block", "--help"])
    assert result.exit_code == 0
    for option in ("rank", "activation", "learning_rate", "gradient_accumulation", "resume_from", "gradient_checkpointing"):
        assert option in result.output
    listing = runner.invoke(app, ["train", "--help"])
    assert "steer (post_block" in listing.output


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["plugin=steer", "method=post_block", "rnak=4", "data=x.jsonl"], "unknown option 'rnak'; did you mean 'rank'?"),
        (["plugin=steer", "method=post_block"], "missing data=FILE"),
        (["plugin=steer", "method=bogus", "data=x.jsonl"], "no trainable method 'bogus'"),
        (["plugin=steer", "method=post_block", "rank=two", "data=x.jsonl"], "invalid value 'two' for rank"),
        (["method=post_block"], "missing plugin="),
        (["plugin=steer", "data=x.jsonl", "out=bundle.bin"], "must end in .safetensors"),
        (["plugin=steer", "method=post_block", "rank=0", "data=x.jsonl"], "invalid value 0 for rank: must be >= 1"),
        (["plugin=steer", "data=x.jsonl", "--steps"], "--steps without a value reads as true, so write steps=VALUE"),
        (["plugin=steer", "method=reft", "rank=-1", "data=x.jsonl"], "invalid value -1 for rank: must be >= 1"),
        (["plugin=steer", "method=joint", "adapter_rank=0", "data=x.jsonl"], "invalid value 0 for adapter_rank"),
        (["plugin=steer", "method=lofit", "top_k=0", "data=x.jsonl"], "invalid value 0 for top_k"),
        (["plugin=steer", "method=lofit", "steps=1", "data=x.jsonl"], "invalid selection_steps=0"),
    ],
)
def test_train_user_errors_exit_2(words, message):
    result = runner.invoke(app, ["train", *words])
    assert result.exit_code == 2
    assert message in result.output


def test_train_missing_data_file_exit_2(model_folder, tmp_path):
    result = runner.invoke(app, ["train", "plugin=steer", f"model={model_folder}", f"data={tmp_path / 'absent.jsonl'}"])
    assert result.exit_code == 2
    assert "not found" in result.output


def test_train_data_error_before_model_load(data_file, tmp_path):
    # The model folder does not exist, so reaching the model load would give another error.
    words = ["train", "plugin=steer", f"model={tmp_path / 'no-model'}", f"data={data_file}", "eval_size=64"]
    result = runner.invoke(app, words)
    assert result.exit_code == 2
    assert "eval_size=64 leaves no training examples out of 12" in result.output


def test_apply_oracle(model_folder, data_file, tmp_path):
    finetuned = tmp_path / "ft.safetensors"
    train = [
        "train",
        "plugin=steer",
        "method=post_block",
        f"model={model_folder}",
        f"data={data_file}",
        "steps=2",
        "eval_size=0",
        "learning_rate=0.5",
        f"out={finetuned}",
    ]
    assert runner.invoke(app, train).exit_code == 0
    out = tmp_path / "oracle.safetensors"
    words = [
        "apply",
        "plugin=steer",
        "method=oracle",
        f"model={model_folder}",
        f"finetuned={finetuned}",
        f"data={data_file}",
        "max_examples=4",
        f"out={out}",
    ]
    result = runner.invoke(app, words)
    assert result.exit_code == 0, result.output
    assert "replay KL" in result.output
    bundle = labhooks.load_bundle(out)
    assert bundle.interventions[0].name == "steer.linear_map"


@pytest.mark.parametrize("method", ["lora", "joint", "sft"])
def test_generate_applies_bundle_weights(model_folder, data_file, tmp_path, monkeypatch, method):
    from labhooks.generation import generate_texts
    from labhooks_cli import commands_apply
    from labhooks_steer.trainers import apply_trained_weights

    out = tmp_path / f"{method}.safetensors"
    train = ["train", "plugin=steer", f"method={method}", f"model={model_folder}", f"data={data_file}"]
    train += ["steps=2", "eval_size=0", "learning_rate=0.05", f"out={out}"]
    assert runner.invoke(app, [*train, "rank=2"] if method != "sft" else train).exit_code == 0

    outputs = []

    def keep(*args, **kwargs):
        texts = generate_texts(*args, **kwargs)
        outputs.append(texts)
        return texts

    monkeypatch.setattr(commands_apply, "generate_texts", keep)
    result = runner.invoke(app, ["generate", f"bundle={out}", f"model={model_folder}", "prompt=3 1 4", "max_new_tokens=4"])
    assert result.exit_code == 0, result.output

    loaded = labhooks.load_model(str(model_folder))
    bundle = labhooks.load_bundle(out, loaded.model)
    model = apply_trained_weights(loaded, bundle)
    with labhooks.attach(model, bundle.interventions):
        expected = generate_texts(model, loaded.tokenizer, ["3 1 4"], max_new_tokens=4)
    assert outputs[1] == expected
