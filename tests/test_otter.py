"""Tests of the otter plugin: transport, target estimation, R-OTTER, interventions, methods and CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_zeroshot import PROMPTS, CharTokenizer, make_clip, minilm_tokenizer, save_tiny_bert
from typer.testing import CliRunner

import labhooks
from labhooks.errors import BundleError, ConfigError, SiteError
from labhooks.methods import MethodInputs
from labhooks.zeroshot import ZeroShotClassifier, accuracy, classifier_from_metadata
from labhooks_otter.interventions import OtterRebalance, RotterReweight
from labhooks_otter.method import McqConfig, parse_target, read_scores, run_mcq
from labhooks_otter.questions import LETTERS, generate_arithmetic_questions, question_prompt, read_questions
from labhooks_otter.transport import (
    estimate_bbse,
    estimate_mlls,
    fit_rotter,
    label_distribution,
    otter_predict,
    prior_matching,
    transport_plan,
)


def gaussian_batch(priors, count, seed, means=(-1.5, 1.5)):
    """Sample 1-D inputs from two unit-variance Gaussian classes with the given label priors.

    The scores are the log-likelihoods, i.e. the posterior logits of a classifier trained
    under a uniform prior, the zero-shot setting OTTER corrects.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.tensor(priors, dtype=torch.float64), count, replacement=True, generator=generator)
    centers = torch.tensor(means, dtype=torch.float64)
    x = centers[labels] + torch.randn(count, generator=generator, dtype=torch.float64)
    logits = -0.5 * (x.unsqueeze(1) - centers.unsqueeze(0)) ** 2
    return x, logits, labels


def bayes_predictions(logits, priors):
    return (logits + torch.tensor(priors, dtype=torch.float64).log()).argmax(-1)


# Transport ------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["emd", "sinkhorn", "sinkhorn_log"])
def test_plan_marginals(solver):
    torch.manual_seed(0)
    logits = torch.randn(60, 4) * 2
    target = [0.1, 0.2, 0.3, 0.4]
    plan = transport_plan(logits, target, solver=solver, reg=0.1, max_iterations=5000)
    np.testing.assert_allclose(plan.sum(axis=1), np.full(60, 1 / 60), atol=1e-6)
    np.testing.assert_allclose(plan.sum(axis=0), target, atol=1e-4)


def test_emd_predictions_match_target_counts():
    torch.manual_seed(0)
    logits = torch.randn(100, 4)
    predictions = otter_predict(logits, [0.1, 0.2, 0.3, 0.4])
    assert torch.bincount(predictions, minlength=4).tolist() == [10, 20, 30, 40]


def test_logits_and_log_probs_give_same_plan():
    torch.manual_seed(0)
    logits = torch.randn(50, 3) * 3
    target = [0.5, 0.3, 0.2]
    from_logits = transport_plan(logits, target, kind="logits")
    from_log_probs = transport_plan(torch.log_softmax(logits, -1), target, kind="log_probs")
    from_probs = transport_plan(torch.softmax(logits, -1), target, kind="probs")
    np.testing.assert_allclose(from_logits, from_log_probs, atol=1e-12)
    np.testing.assert_allclose(from_logits, from_probs, atol=1e-9)


def test_sinkhorn_agrees_with_emd_at_small_reg():
    x, logits, labels = gaussian_batch([0.7, 0.3], 400, seed=3)
    exact = otter_predict(logits, [0.7, 0.3])
    entropic = otter_predict(logits, [0.7, 0.3], solver="sinkhorn_log", reg=0.01, max_iterations=5000)
    assert (exact == entropic).float().mean() > 0.98


def test_otter_matches_bayes_under_label_shift():
    priors = [0.9, 0.1]
    x, logits, labels = gaussian_batch(priors, 2000, seed=0, means=(-1.0, 1.0))
    zero_shot = logits.argmax(-1)
    bayes = bayes_predictions(logits, priors)
    otter = otter_predict(logits, priors)
    assert (otter == bayes).float().mean() > 0.95
    assert accuracy(otter, labels) > accuracy(zero_shot, labels) + 0.05
    assert accuracy(otter, labels) > accuracy(bayes, labels) - 0.015


def test_otter_keeps_accuracy_without_shift():
    x, logits, labels = gaussian_batch([0.5, 0.5], 2000, seed=1)
    otter = otter_predict(logits, label_distribution(labels, 2))
    assert accuracy(otter, labels) >= accuracy(logits.argmax(-1), labels) - 0.005


def test_prior_matching_matches_target_in_expectation():
    torch.manual_seed(0)
    logits = torch.randn(300, 3) * 2
    target = torch.tensor([0.6, 0.3, 0.1])
    predictions, weights = prior_matching(logits, target)
    mean = torch.softmax(torch.log_softmax(logits.double(), -1) + weights.double(), -1).mean(0)
    torch.testing.assert_close(mean.float(), target, atol=1e-6, rtol=0)
    assert predictions.shape == (300,)
    assert float(weights.max()) == 0.0


def test_bbse_and_mlls_recover_label_shift():
    truth = [0.8, 0.2]
    _, source_logits, source_labels = gaussian_batch([0.5, 0.5], 600, seed=4)
    _, target_logits, _ = gaussian_batch(truth, 3000, seed=5)
    bbse = estimate_bbse(source_logits.argmax(-1), source_labels, target_logits.argmax(-1), 2)
    mlls = estimate_mlls(source_logits, source_labels, target_logits)
    torch.testing.assert_close(bbse, torch.tensor(truth), atol=0.05, rtol=0)
    torch.testing.assert_close(mlls, torch.tensor(truth), atol=0.05, rtol=0)
    assert math.isclose(float(bbse.sum()), 1.0, rel_tol=1e-6)


def test_bbse_gives_zero_mass_to_unlabeled_class():
    estimate = estimate_bbse(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2, 2]), 3)
    assert float(estimate[2]) == 0.0


def test_rotter_reproduces_otter_online():
    priors = [0.8, 0.2]
    _, validation_logits, _ = gaussian_batch(priors, 1500, seed=6)
    _, test_logits, test_labels = gaussian_batch(priors, 1500, seed=7)
    pseudo_labels = otter_predict(validation_logits, priors)
    log_weights = fit_rotter(validation_logits, pseudo_labels)
    assert accuracy((torch.log_softmax(validation_logits, -1) + log_weights.double()).argmax(-1), pseudo_labels) > 0.98
    online = (test_logits + log_weights.double()).argmax(-1)
    batch = otter_predict(test_logits, priors)
    assert accuracy(online, batch) > 0.95
    assert accuracy(online, test_labels) > accuracy(test_logits.argmax(-1), test_labels)


def test_target_validation_errors():
    with pytest.raises(ConfigError, match="has 3 entries, but the scores have 2 classes"):
        transport_plan(torch.zeros(4, 2), [0.2, 0.3, 0.5])
    with pytest.raises(ConfigError, match="non-negative"):
        transport_plan(torch.zeros(4, 2), [1.5, -0.5])
    with pytest.raises(ConfigError, match="invalid solver"):
        transport_plan(torch.zeros(4, 2), [0.5, 0.5], solver="hungarian")
    with pytest.raises(ConfigError, match="must be non-negative"):
        transport_plan(-torch.ones(4, 2), [0.5, 0.5], kind="probs")


def test_parse_target():
    torch.testing.assert_close(parse_target("uniform", 4), torch.full((4,), 0.25))
    torch.testing.assert_close(parse_target("1,3", 2), torch.tensor([0.25, 0.75]))
    assert parse_target("bbse", 3) == "bbse"
    with pytest.raises(ConfigError, match="give 3 non-negative weights"):
        parse_target("1,2", 3)
    with pytest.raises(ConfigError, match="invalid target 'skewed'"):
        parse_target("skewed", 3)


# Interventions on a zero-shot classifier --------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    return ZeroShotClassifier.from_model(make_clip(), CharTokenizer(), PROMPTS)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(12, 3, 32, 32)


def test_rebalance_whole_batch_in_one_forward(classifier, images):
    target = torch.tensor([0.5, 0.25, 0.25])
    intervention = OtterRebalance("logits", target)
    with torch.no_grad():
        logits = classifier(pixel_values=images)
        with labhooks.attach(classifier, intervention):
            edited = classifier(pixel_values=images)
    expected = otter_predict(logits, target)
    assert torch.equal(edited.argmax(-1), expected)
    assert torch.bincount(edited.argmax(-1), minlength=3).tolist() == [6, 3, 3]
    torch.testing.assert_close(edited.max(-1).values, logits.max(-1).values)
    rows = torch.from_numpy(intervention.last_plan * len(images)).float()
    torch.testing.assert_close(torch.softmax(edited, -1), rows, atol=1e-6, rtol=0)


def test_rebalance_batches_of_predict_logits(classifier, images):
    intervention = OtterRebalance("logits", 3)
    with labhooks.attach(classifier, intervention):
        edited = classifier.predict_logits(images, batch_size=6)
    counts = [torch.bincount(edited[start : start + 6].argmax(-1), minlength=3).tolist() for start in (0, 6)]
    assert counts == [[2, 2, 2], [2, 2, 2]]


def test_rotter_reweight_adds_log_weights(classifier, images):
    log_weights = torch.tensor([0.0, -1.0, 2.0])
    with torch.no_grad():
        logits = classifier(pixel_values=images)
        with labhooks.attach(classifier, RotterReweight("logits", log_weights)):
            edited = classifier(pixel_values=images)
    torch.testing.assert_close(edited, logits + log_weights)


def test_class_count_mismatch_rejected(classifier):
    with pytest.raises(SiteError, match="it has 2 classes, but the site has 3 columns"):
        labhooks.attach(classifier, RotterReweight("logits", torch.zeros(2)))
    with pytest.raises(SiteError, match="class index 7 is out of range"):
        labhooks.attach(classifier, OtterRebalance("logits", 2, class_indices=[0, 7]))


def test_bundles_round_trip(classifier, images, tmp_path):
    interventions = [
        RotterReweight("logits", torch.tensor([0.0, -0.5, 0.3])),
        OtterRebalance("logits", torch.tensor([0.2, 0.3, 0.5]), solver="sinkhorn", reg=0.2),
    ]
    path = labhooks.save_bundle(tmp_path / "otter.safetensors", interventions, plugin="otter", method="rotter", model=classifier)
    bundle = labhooks.load_bundle(path, classifier)
    assert [item.config() for item in bundle.interventions] == [item.config() for item in interventions]
    torch.testing.assert_close(bundle.interventions[0].log_weights, interventions[0].log_weights)
    torch.testing.assert_close(bundle.interventions[1].target, interventions[1].target)
    with torch.no_grad():
        with labhooks.attach(classifier, interventions):
            expected = classifier(pixel_values=images)
        with labhooks.attach(classifier, bundle.interventions):
            logits = classifier(pixel_values=images)
    torch.testing.assert_close(logits, expected)
    two_classes = ZeroShotClassifier.from_model(make_clip(), CharTokenizer(), PROMPTS[:2])
    with pytest.raises(BundleError, match="site has 2 columns"):
        labhooks.load_bundle(path, two_classes)


# Interventions at a language model's logits site -------------------------------------------


def make_llama(vocab_size=100, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def left_padded_batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (8, 7), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 0, 1, 3, 0, 2, 1]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


CLASS_IDS = [21, 22, 23, 24]


def test_rebalance_language_model_answer_position():
    model = make_llama()
    batch = left_padded_batch()
    intervention = OtterRebalance("logits", 4, class_indices=CLASS_IDS, positions="last_prompt")
    with torch.no_grad():
        logits = model(**batch).logits
        with labhooks.attach(model, intervention):
            edited = model(**batch).logits
    last = logits[:, -1, CLASS_IDS]
    expected = otter_predict(last, [0.25] * 4)
    assert torch.equal(edited[:, -1, CLASS_IDS].argmax(-1), expected)
    assert torch.bincount(expected, minlength=4).tolist() == [2, 2, 2, 2]
    others = [index for index in range(100) if index not in CLASS_IDS]
    torch.testing.assert_close(edited[:, -1, others], logits[:, -1, others])
    torch.testing.assert_close(edited[:, :-1], logits[:, :-1])


def test_rebalance_with_logits_to_keep_and_generate():
    model = make_llama()
    batch = left_padded_batch()
    intervention = OtterRebalance("logits", 4, class_indices=CLASS_IDS, positions="last_prompt")
    with torch.no_grad():
        expected = otter_predict(model(**batch).logits[:, -1, CLASS_IDS], [0.25] * 4)
        with labhooks.attach(model, intervention):
            kept = model(**batch, logits_to_keep=1).logits
            generated = model.generate(
                **batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
            )
    assert kept.shape == (8, 1, 100)
    assert torch.equal(kept[:, 0, CLASS_IDS].argmax(-1), expected)
    assert torch.equal(generated.logits[0][:, CLASS_IDS].argmax(-1), expected)


def test_rebalance_rejects_every_position():
    model = make_llama()
    with (
        labhooks.attach(model, OtterRebalance("logits", 4, class_indices=CLASS_IDS)),
        pytest.raises(SiteError, match="select one position per row"),
    ):
        model(**left_padded_batch())


def test_rotter_reweight_on_language_model_columns():
    model = make_llama()
    batch = left_padded_batch()
    log_weights = torch.tensor([0.5, -0.5, 0.0, 1.0])
    with torch.no_grad():
        logits = model(**batch).logits
        with labhooks.attach(model, RotterReweight("logits", log_weights, class_indices=CLASS_IDS)):
            edited = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(edited[real][:, CLASS_IDS], logits[real][:, CLASS_IDS] + log_weights)
    torch.testing.assert_close(edited[~real], logits[~real])
    torch.testing.assert_close(edited[..., :20], logits[..., :20])


# Questions and the mcq method ---------------------------------------------------------------


def test_arithmetic_questions_are_seeded_and_balanced():
    questions = generate_arithmetic_questions(40, seed=3)
    assert questions == generate_arithmetic_questions(40, seed=3)
    assert questions != generate_arithmetic_questions(40, seed=4)
    assert torch.bincount(torch.tensor([q["answer"] for q in questions]), minlength=4).tolist() == [10, 10, 10, 10]
    for question in questions:
        a, operator, b = question["question"].removeprefix("What is ").removesuffix("?").split()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[operator]
        assert question["options"][question["answer"]] == str(value)
        assert len(set(question["options"])) == 4


def test_packaged_questions_match_generator():
    assert read_questions() == generate_arithmetic_questions(400, seed=0)


def test_question_prompt_letters():
    prompt = question_prompt({"question": "What is 2 + 2?", "options": ["3", "4", "5", "6"]})
    assert prompt.splitlines()[1:5] == ["A. 3", "B. 4", "C. 5", "D. 6"]


def test_read_questions_errors(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text('{"question": "x?", "options": ["1"]}\n')
    with pytest.raises(ConfigError, match="2 to 4 'options'"):
        read_questions(path)
    path.write_text('{"question": "x?", "options": ["1", "2"]}\n{"question": "y?", "options": ["1", "2", "3"]}\n')
    with pytest.raises(ConfigError, match="same number of options"):
        read_questions(path)


def test_run_mcq_balances_positions(tmp_path):
    tokenizer = minilm_tokenizer()
    loaded = labhooks.LoadedModel(make_llama(vocab_size=tokenizer.vocab_size), tokenizer, "tiny-llama")
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in generate_arithmetic_questions(12, seed=1)))
    config = labhooks.build_config(McqConfig, {"questions": str(path), "batch_size": "5"})
    result = run_mcq(MethodInputs(config=config, loaded=loaded))
    positions = result.tables[0]
    assert positions.columns == ["", *LETTERS]
    assert positions.rows[0] == ["correct answers", 25.0, 25.0, 25.0, 25.0]
    assert positions.rows[2] == ["OTTER (uniform target)", 25.0, 25.0, 25.0, 25.0]
    (intervention,) = result.interventions
    assert isinstance(intervention, OtterRebalance)
    assert intervention.class_indices == [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS]
    assert str(intervention.positions) == "last_prompt"

    online = run_mcq(MethodInputs(config=labhooks.build_config(McqConfig, {"questions": str(path), "online": "true"}), loaded=loaded))
    assert isinstance(online.interventions[0], RotterReweight)


# rebalance and rotter from the CLI ---------------------------------------------------------


def write_predictions(path, priors, count, seed):
    _, logits, labels = gaussian_batch(priors, count, seed)
    path.write_text(
        "".join(json.dumps({"scores": row.tolist(), "label": int(label)}) + "\n" for row, label in zip(logits, labels, strict=True))
    )
    return path


def test_read_scores_formats(tmp_path):
    jsonl = write_predictions(tmp_path / "p.jsonl", [0.5, 0.5], 5, 0)
    scores, labels = read_scores(jsonl)
    assert scores.shape == (5, 2)
    assert labels.shape == (5,)
    table = tmp_path / "p.csv"
    table.write_text("scores0,scores1,label\n0.1,0.9,1\n0.8,0.2,0\n")
    scores, labels = read_scores(table)
    assert scores.tolist() == [[0.1, 0.9], [0.8, 0.2]]
    assert labels.tolist() == [1, 0]
    array = tmp_path / "p.npy"
    np.save(array, np.zeros((3, 4)))
    assert read_scores(array)[0].shape == (3, 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"scores": "high"}\n')
    with pytest.raises(ConfigError, match="no list of numbers in 'scores'"):
        read_scores(bad)


def test_cli_rebalance_prediction_file(tmp_path):
    from labhooks_cli.main import app

    data = write_predictions(tmp_path / "target.jsonl", [0.8, 0.2], 400, seed=8)
    labeled = write_predictions(tmp_path / "labeled.jsonl", [0.5, 0.5], 200, seed=9)
    out = tmp_path / "rebalance.safetensors"
    predictions = tmp_path / "rebalanced.jsonl"
    arguments = ["apply", "plugin=otter", f"data={data}", "target=bbse", f"labeled={labeled}", f"output={predictions}", f"out={out}"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "OTTER" in result.output
    bundle = labhooks.load_bundle(out)
    assert bundle.method == "rebalance"
    assert bundle.tensors["predictions"].shape == (400,)
    assert abs(float(bundle.tensors["target"][0]) - 0.8) < 0.08
    lines = predictions.read_text().splitlines()
    assert len(lines) == 400
    assert torch.equal(torch.tensor([json.loads(line)["prediction"] for line in lines]), bundle.tensors["predictions"])


def test_rebalance_config_errors():
    from labhooks_otter.method import RebalanceConfig

    with pytest.raises(ConfigError, match="target=bbse needs labeled=FILE"):
        labhooks.build_config(RebalanceConfig, {"data": "p.jsonl", "target": "bbse"})
    with pytest.raises(ConfigError, match="invalid target 'skewed'"):
        labhooks.build_config(RebalanceConfig, {"data": "p.jsonl", "target": "skewed"})
    with pytest.raises(ConfigError, match="choose one of emd, sinkhorn, sinkhorn_log"):
        labhooks.build_config(RebalanceConfig, {"data": "p.jsonl", "solver": "hungarian"})
    with pytest.raises(ConfigError, match="missing data=FILE"):
        labhooks.build_config(RebalanceConfig, {})


def test_rotter_config_errors():
    from labhooks_otter.method import RotterConfig

    base = {"data": "t.jsonl", "classes": "a,b"}
    with pytest.raises(ConfigError, match="classes= needs at least two class names"):
        labhooks.build_config(RotterConfig, {"data": "t.jsonl", "classes": "a"})
    with pytest.raises(ConfigError, match="limit must be >= 1, got 0"):
        labhooks.build_config(RotterConfig, {**base, "limit": "0"})
    with pytest.raises(ConfigError, match="validation_fraction must be in"):
        labhooks.build_config(RotterConfig, {**base, "validation_fraction": "0"})
    assert labhooks.build_config(RotterConfig, base).batch_size == 32


def test_cli_rebalance_rejects_model(tmp_path):
    from labhooks_cli.main import app

    data = write_predictions(tmp_path / "target.jsonl", [0.8, 0.2], 10, seed=8)
    result = CliRunner().invoke(app, ["apply", "plugin=otter", "method=rebalance", f"data={data}", "model=foo"])
    assert result.exit_code == 2
    assert "uses no model" in result.output


def test_cli_rotter_bundle_attaches_to_classifier(tmp_path):
    from labhooks_cli.main import app

    folder = save_tiny_bert(tmp_path / "tiny-bert")
    texts = ["the match ended in a draw", "shares fell sharply", "the striker scored twice", "profits rose this quarter"] * 5
    data = tmp_path / "news.jsonl"
    data.write_text(
        "".join(json.dumps({"text": text, "label": ["sport", "business"][index % 2]}) + "\n" for index, text in enumerate(texts))
    )
    out = tmp_path / "rotter.safetensors"
    arguments = [
        "apply",
        "plugin=otter",
        "method=rotter",
        f"model={folder}",
        f"data={data}",
        "classes=sport,business",
        "target=0.5,0.5",
        f"out={out}",
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "R-OTTER (online)" in result.output
    loaded = labhooks.load_model(folder, kind="encoder")
    bundle = labhooks.read_manifest(out)
    classifier = classifier_from_metadata(loaded, bundle["metadata"]["zeroshot"])
    (intervention,) = labhooks.load_bundle(out, classifier).interventions
    assert isinstance(intervention, RotterReweight)
    with torch.no_grad():
        plain = classifier.predict_logits(texts[:3])
        with labhooks.attach(classifier, intervention):
            reweighted = classifier.predict_logits(texts[:3])
    torch.testing.assert_close(reweighted, plain + intervention.log_weights)


@pytest.mark.integration
@pytest.mark.slow
def test_default_lm_mcq_positions_balanced():
    loaded = labhooks.load_model()
    config = labhooks.build_config(McqConfig, {"limit": "8", "batch_size": "8"})
    result = run_mcq(MethodInputs(config=config, loaded=loaded))
    rows = {row[0]: row[1:] for row in result.tables[0].rows}
    assert rows["OTTER (uniform target)"] == [25.0, 25.0, 25.0, 25.0]
    assert sum(rows["zero-shot"]) == pytest.approx(100.0)
    assert 0 <= result.metrics["accuracy_before"] <= 100
