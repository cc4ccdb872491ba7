"""Tests of the roboshot plugin: the embedding edit, insight parsing, the method and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_zeroshot import PROMPTS, CharTokenizer, make_bert, make_clip, make_open_clip, minilm_tokenizer, save_tiny_bert
from typer.testing import CliRunner

import labhooks
from labhooks.errors import ConfigError, SiteError
from labhooks.methods import MethodInputs
from labhooks.zeroshot import ZeroShotClassifier, classifier_from_metadata
from labhooks_roboshot import insights as insights_module
from labhooks_roboshot.insights import (
    InsightError,
    generate_insights,
    insight_prompt,
    parse_insight_line,
    parse_insights,
    read_insights_file,
)
from labhooks_roboshot.method import RoboShotConfig, run_roboshot
from labhooks_roboshot.projection import RoboShotProjection, orthonormal_basis, robustify


def concept_basis(width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return two orthonormal vectors (z_water, z_landbird) in a random orientation of R^width."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    return q[:, 0], q[:, 1]


def worked_example(width: int):
    z_water, z_landbird = concept_basis(width)
    z_land, z_waterbird = -z_water, -z_landbird
    x = 0.7 * z_water + 0.3 * z_landbird
    classes = torch.stack([0.4 * z_water + 0.6 * z_waterbird, 0.4 * z_land + 0.6 * z_landbird])
    harmful = (0.9 * z_water + 0.1 * z_landbird).unsqueeze(0)
    helpful = (0.1 * z_water + 0.9 * z_landbird).unsqueeze(0)
    return z_water, z_landbird, x, classes, harmful, helpful


def test_worked_example_to_four_decimals():
    z_water, z_landbird, x, classes, harmful, helpful = worked_example(8)
    before = classes @ x
    assert [round(float(score), 4) for score in before] == [0.1, -0.1]

    rejected = robustify(x.unsqueeze(0), harmful, helpful, mode="reject")[0]
    scores = classes @ rejected
    assert [round(float(score), 4) for score in scores] == [-0.1415, 0.1415]
    assert int(scores.argmax()) == 1

    both = robustify(x.unsqueeze(0), harmful, helpful, mode="both")[0]
    assert round(float(both @ z_water), 4) == -0.0006
    assert round(float(both @ z_landbird), 4) == 0.4337
    torch.testing.assert_close(both, -0.000595 * z_water + 0.433670 * z_landbird, rtol=0, atol=5e-6)


def test_worked_example_through_classifier_hooks():
    clip = make_clip()
    classifier = ZeroShotClassifier.from_model(clip, CharTokenizer(), PROMPTS)
    z_water, z_landbird, x, classes, harmful, helpful = worked_example(24)
    edited = []

    def set_x(hidden, context):
        return x.to(hidden.dtype).expand_as(hidden)

    def keep(hidden, context):
        edited.append(hidden.double())

    interventions = [
        labhooks.FunctionIntervention("embeddings", set_x),
        RoboShotProjection("embeddings", harmful.float(), helpful.float(), mode="both"),
        labhooks.FunctionIntervention("embeddings", keep),
    ]
    with torch.no_grad(), labhooks.attach(classifier, interventions):
        logits = classifier(pixel_values=torch.randn(3, 3, 32, 32))
    (embedding,) = edited
    assert embedding.shape == (3, 24)
    assert round(float(embedding[0] @ z_water), 4) == -0.0006
    assert round(float(embedding[0] @ z_landbird), 4) == 0.4337
    expected = classifier.head(embedding.float())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_reject_removes_direction():
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    harmful = torch.randn(2, 16)
    edited = robustify(x, harmful, torch.zeros(0, 16), mode="reject")
    # Sequential rejection leaves the last direction exactly orthogonal.
    torch.testing.assert_close(edited @ harmful[1], torch.zeros(6), atol=1e-5, rtol=0)


def test_orthonormalized_rejection_is_projection():
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    harmful = torch.randn(3, 16)
    basis = orthonormal_basis(harmful)
    projected = x - (x @ basis.T) @ basis
    edited = robustify(x, basis, torch.zeros(0, 16), mode="reject")
    torch.testing.assert_close(edited, projected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(edited @ harmful.T, torch.zeros(6, 3), atol=1e-4, rtol=0)
    sequential = robustify(x, harmful, torch.zeros(0, 16), mode="reject")
    assert (sequential @ harmful[0]).abs().max() > 1e-3


def test_orthonormal_basis_drops_dependent_rows():
    rows = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    basis = orthonormal_basis(rows)
    assert basis.shape == (2, 3)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-6, rtol=0)


def test_renormalize_changes_norm_not_cosine_prediction():
    torch.manual_seed(0)
    x, harmful, helpful = torch.randn(8, 12), torch.randn(2, 12), torch.randn(2, 12)
    classes = torch.randn(3, 12)
    plain = robustify(x, harmful, helpful)
    unit = robustify(x, harmful, helpful, renormalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(F.normalize(plain, dim=-1), unit, atol=1e-5, rtol=1e-5)
    assert torch.equal((F.normalize(plain, dim=-1) @ classes.T).argmax(-1), (unit @ classes.T).argmax(-1))


def test_modes_use_their_direction_sets():
    torch.manual_seed(0)
    x, harmful, helpful = torch.randn(4, 10), torch.randn(1, 10), torch.randn(1, 10)
    reject = robustify(x, harmful, helpful, mode="reject")
    amplify = robustify(x, harmful, helpful, mode="amplify")
    both = robustify(x, harmful, helpful, mode="both")
    torch.testing.assert_close(reject, robustify(x, harmful, torch.zeros(0, 10), mode="both"))
    torch.testing.assert_close(amplify, robustify(x, torch.zeros(0, 10), helpful, mode="both"))
    torch.testing.assert_close(both, robustify(reject, torch.zeros(0, 10), helpful, mode="amplify"))
    with pytest.raises(ConfigError, match="invalid mode"):
        robustify(x, harmful, helpful, mode="erase")


def test_intervention_argument_checks():
    with pytest.raises(ConfigError, match="mode=reject needs at least one harmful"):
        RoboShotProjection("embeddings", None, torch.randn(1, 4), mode="reject")
    with pytest.raises(ConfigError, match="mode=amplify needs at least one helpful"):
        RoboShotProjection("embeddings", torch.randn(1, 4), None, mode="amplify")
    with pytest.raises(ConfigError, match="agree on one width"):
        RoboShotProjection("embeddings", torch.randn(1, 4), torch.randn(1, 5))


def test_attach_to_clipmodel_vision_embeddings():
    clip = make_clip()
    tokens = CharTokenizer()(PROMPTS)
    images = torch.randn(4, 3, 32, 32)
    harmful = torch.randn(2, 24)
    intervention = RoboShotProjection("vision.embeddings", harmful, None, mode="reject")
    with torch.no_grad():
        image_embeds = clip.get_image_features(pixel_values=images).pooler_output
        text_embeds = clip.get_text_features(**tokens).pooler_output
        edited = robustify(image_embeds, harmful, torch.zeros(0, 24), mode="reject")
        expected = clip.logit_scale.exp() * F.normalize(edited, dim=-1) @ F.normalize(text_embeds, dim=-1).T
        with labhooks.attach(clip, intervention):
            logits = clip(**tokens, pixel_values=images).logits_per_image
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_attach_to_open_clip_classifier(tmp_path):
    model, tokenizer = make_open_clip(tmp_path)
    classifier = ZeroShotClassifier.from_model(model, tokenizer, PROMPTS)
    images = torch.randn(4, 3, 32, 32)
    helpful = torch.randn(1, 24)
    intervention = RoboShotProjection("embeddings", None, helpful, mode="amplify")
    with torch.no_grad():
        expected = classifier.head(intervention.project(classifier.predict_embeddings(images)))
        with labhooks.attach(classifier, intervention):
            logits = classifier(pixel_values=images)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_token_level_site_is_rejected():
    bert = make_bert()
    tokens = minilm_tokenizer()(["good food"], return_tensors="pt")
    intervention = RoboShotProjection("embeddings", torch.randn(1, 32), None)
    with labhooks.attach(bert, intervention), pytest.raises(SiteError, match="one pooled embedding per input"):
        bert(**tokens)


def test_bundle_round_trip(tmp_path):
    torch.manual_seed(0)
    bert = make_bert()
    classifier = ZeroShotClassifier.from_model(bert, minilm_tokenizer(), ["a great review", "a bad review"])
    intervention = RoboShotProjection("embeddings", torch.randn(3, 32), torch.randn(2, 32), orthonormalize=True, renormalize=True)
    path = labhooks.save_bundle(tmp_path / "roboshot.safetensors", [intervention], plugin="roboshot", method="roboshot", model=classifier)
    bundle = labhooks.load_bundle(path, classifier)
    (loaded,) = bundle.interventions
    assert isinstance(loaded, RoboShotProjection)
    assert loaded.config() == intervention.config()
    torch.testing.assert_close(loaded.harmful, intervention.harmful)
    texts = ["tasty and fresh", "stale and broken"]
    with torch.no_grad():
        with labhooks.attach(classifier, intervention):
            expected = classifier.predict_logits(texts)
        with labhooks.attach(classifier, loaded):
            logits = classifier.predict_logits(texts)
    torch.testing.assert_close(logits, expected)


# Insights ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("length: a short review; a long review", ("length", "a short review", "a long review")),
        ("1. Length: a short review; a long review.", ("Length", "a short review", "a long review")),
        ("- **tone**: \"a calm review\" ; 'an angry review'", ("tone", "a calm review", "an angry review")),
        ("* price: a cheap snack | an expensive snack", ("price", "a cheap snack", "an expensive snack")),
        ("packaging: a box vs a bag", ("packaging", "a box", "a bag")),
        ("food: food that is good; food that is bad; food that is good", ("food", "food that is good", "food that is bad")),
    ],
)
def test_parse_insight_line_formats(line, expected):
    pair = parse_insight_line(line, "harmful")
    assert pair is not None
    assert (pair.concept, pair.first, pair.second) == expected


@pytest.mark.parametrize(
    "line",
    [
        "1. The review is not great;",
        "sentiment: a good review",
        "<feature>: <text for great>; <text for other>",
        "flavor: sweet; sweet",
        "Here are three features:",
    ],
)
def test_parse_insight_line_rejects(line):
    assert parse_insight_line(line, "helpful") is None


def test_parse_insights_drops_example_and_duplicates():
    answer = (
        "background: a photo of a bird on water; a photo of a bird on land\n"
        "length: a short review; a long review\n"
        "2) length: A short review; A long review\n"
        "style: a formal review; a casual review\n"
    )
    pairs = parse_insights(answer, "harmful")
    assert [pair.concept for pair in pairs] == ["length", "style"]
    assert all(pair.kind == "harmful" for pair in pairs)


def test_parse_insights_stops_at_next_task():
    answer = "food: a review about food; a review about a restaurant\n\nTask: classify movies.\nplot: a thriller; a comedy\n"
    assert [pair.concept for pair in parse_insights(answer, "helpful")] == ["food"]


def test_insight_prompt_ends_with_task_heading():
    prompt = insight_prompt("helpful", "Classify news as sport or tech.", "sport", "tech")
    assert prompt.endswith("Task: Classify news as sport or tech.\nDifferences between sport and tech:\n")
    assert prompt.count("Task:") == 3
    assert insight_prompt("harmful", "Classify news.", "sport", "tech").endswith("Features that do not decide the class:\n")


class FakeLanguageModel:
    name = "fake"
    model = None
    tokenizer = None


def test_generate_insights_retries_unparseable_answers(monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompts, **options):
        calls.append((len(prompts), options["do_sample"], options["seed"], options["chat"]))
        if len(calls) == 1:
            return ["length: a short review; a long review", "I cannot answer that."]
        return ["taste: a review that loves the taste; a review that hates the taste"]

    monkeypatch.setattr(insights_module, "generate_texts", fake_generate)
    pairs = generate_insights(FakeLanguageModel(), "Classify reviews.", ["great", "other"], attempts=3, seed=5)
    assert calls == [(2, False, 5, False), (1, True, 6, False)]
    assert [(pair.kind, pair.concept) for pair in pairs] == [("harmful", "length"), ("helpful", "taste")]


def test_generate_insights_gives_up_with_clear_error(monkeypatch):
    monkeypatch.setattr(insights_module, "generate_texts", lambda model, tokenizer, prompts, **options: ["no idea"] * len(prompts))
    with pytest.raises(InsightError, match="no parseable harmful insight after 2 attempts"):
        generate_insights(FakeLanguageModel(), "Classify reviews.", ["great", "other"], attempts=2)


def test_generate_insights_asks_every_class_pair(monkeypatch):
    seen = []

    def fake_generate(model, tokenizer, prompts, **options):
        seen.extend(prompts)
        return ["a: one thing; another thing"] * len(prompts)

    monkeypatch.setattr(insights_module, "generate_texts", fake_generate)
    generate_insights(FakeLanguageModel(), "Classify news.", ["sport", "tech", "politics"], kinds=("helpful",))
    assert len(seen) == 3
    assert seen[1].endswith("Differences between sport and politics:\n")


def test_read_insights_file_txt_and_json(tmp_path):
    text = tmp_path / "insights.txt"
    text.write_text("# Amazon reviews\n[harmful]\nlength: a short review; a long review\n\n[helpful]\nsentiment: I love it; I hate it\n")
    pairs = read_insights_file(text)
    assert [(pair.kind, pair.concept, pair.first) for pair in pairs] == [
        ("harmful", "length", "a short review"),
        ("helpful", "sentiment", "I love it"),
    ]

    data = tmp_path / "insights.json"
    data.write_text(json.dumps({"harmful": ["length: short; long"], "helpful": [{"concept": "sentiment", "texts": ["good", "bad"]}]}))
    pairs = read_insights_file(data)
    assert [(pair.kind, pair.second) for pair in pairs] == [("harmful", "long"), ("helpful", "bad")]


def test_read_insights_file_errors(tmp_path):
    path = tmp_path / "insights.txt"
    path.write_text("length: short; long\n")
    with pytest.raises(ConfigError, match="put a \\[harmful\\] or \\[helpful\\] line"):
        read_insights_file(path)
    path.write_text("[harmful]\njust words\n")
    with pytest.raises(ConfigError, match="is not an insight"):
        read_insights_file(path)
    with pytest.raises(ConfigError, match="not found"):
        read_insights_file(tmp_path / "missing.txt")


def test_packaged_insight_file_parses():
    from importlib import resources

    path = resources.files("labhooks_roboshot").joinpath("data", "amazon_reviews_insights.txt")
    pairs = read_insights_file(str(path))
    assert {pair.kind for pair in pairs} == {"harmful", "helpful"}


# Method and CLI ------------------------------------------------------------------------


def write_reviews(path):
    rows = [
        ("Delicious cookies, fresh and crunchy.", "great", "short"),
        ("The best coffee I have had in years, rich and smooth with no bitterness at all.", "great", "long"),
        ("Stale and tasteless.", "other", "short"),
        ("The box arrived crushed and the chips inside were broken into dust and tasted old.", "other", "long"),
    ]
    path.write_text(
        "".join(json.dumps({"text": text, "label": label, "group": f"{label}/{length}"}) + "\n" for text, label, length in rows)
    )
    return path


def write_insights(path):
    path.write_text(
        "[harmful]\nlength: a short review; a long detailed review\n[helpful]\nsentiment: a review praising the food; a review complaining about the food\n"
    )
    return path


def test_run_roboshot_reports_before_and_after(tmp_path):
    loaded = labhooks.LoadedModel(make_bert(), minilm_tokenizer(), "tiny-bert")
    config = labhooks.build_config(
        RoboShotConfig,
        {
            "data": str(write_reviews(tmp_path / "reviews.jsonl")),
            "classes": "great,other",
            "insights": str(write_insights(tmp_path / "insights.txt")),
        },
    )
    result = run_roboshot(MethodInputs(config=config, loaded=loaded))
    (intervention,) = result.interventions
    assert intervention.harmful.shape == (1, 32)
    assert intervention.helpful.shape == (1, 32)
    titles = [table.title for table in result.tables]
    assert any(title.startswith("zero-shot accuracy on 4 inputs") for title in titles)
    scores = next(table for table in result.tables if table.title.startswith("zero-shot accuracy"))
    assert scores.columns == ["classifier", "AVG %", "WG %", "Gap"]
    assert [row[0] for row in scores.rows] == ["zero-shot", "RoboShot"]
    assert set(result.metrics) >= {"before_avg", "before_wg", "before_gap", "after_avg", "after_wg", "after_gap"}
    assert result.metadata["zeroshot"]["class_names"] == ["great", "other"]


def test_roboshot_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing data=FILE"):
        labhooks.build_config(RoboShotConfig, {"classes": "a,b"})
    with pytest.raises(ConfigError, match="at least two class names"):
        labhooks.build_config(RoboShotConfig, {"data": "x.jsonl", "classes": "a"})
    with pytest.raises(ConfigError, match='insights=lm needs task="..."'):
        labhooks.build_config(RoboShotConfig, {"data": "x.jsonl", "classes": "a,b"})
    with pytest.raises(ConfigError, match="choose one of reject, amplify, both"):
        labhooks.build_config(RoboShotConfig, {"data": "x.jsonl", "classes": "a,b", "task": "t", "mode": "erase"})


def test_cli_apply_writes_bundle(tmp_path):
    from labhooks_cli.main import app

    folder = save_tiny_bert(tmp_path / "tiny-bert")
    out = tmp_path / "roboshot.safetensors"
    arguments = [
        "apply",
        "plugin=roboshot",
        f"model={folder}",
        f"data={write_reviews(tmp_path / 'reviews.jsonl')}",
        "classes=great,other",
        "class_prompts=a great food review,a bad food review",
        f"insights={write_insights(tmp_path / 'insights.txt')}",
        f"out={out}",
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "RoboShot" in result.output
    bundle = labhooks.load_bundle(out)
    assert bundle.plugin == "roboshot"
    assert [type(item) for item in bundle.interventions] == [RoboShotProjection]
    loaded = labhooks.load_model(folder, kind="encoder")
    classifier = classifier_from_metadata(loaded, bundle.manifest["metadata"]["zeroshot"])
    assert classifier.class_prompts == [["a great food review"], ["a bad food review"]]
    with labhooks.attach(classifier, labhooks.load_bundle(out, classifier).interventions):
        assert classifier.predict_logits(["tasty"]).shape == (1, 2)


@pytest.mark.integration
@pytest.mark.slow
def test_minilm_roboshot_with_packaged_insights():
    from importlib import resources

    loaded = labhooks.load_model(kind="encoder")
    classifier = ZeroShotClassifier.from_loaded(loaded, ["a great food product review", "a disappointing food product review"])
    pairs = read_insights_file(str(resources.files("labhooks_roboshot").joinpath("data", "amazon_reviews_insights.txt")))
    harmful = torch.cat(
        [classifier.embed_texts([pair.first]) - classifier.embed_texts([pair.second]) for pair in pairs if pair.kind == "harmful"]
    )
    intervention = RoboShotProjection("embeddings", harmful, None, mode="reject", orthonormalize=True)
    texts = ["Great taste, I buy it every month.", "Arrived stale, never again."]
    with torch.no_grad():
        embeddings = classifier.predict_embeddings(texts)
        with labhooks.attach(classifier, intervention):
            logits = classifier.predict_logits(texts)
    expected = classifier.head(intervention.project(embeddings))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    edited = intervention.project(embeddings)
    torch.testing.assert_close(edited @ intervention.harmful.T, torch.zeros(2, harmful.shape[0]), atol=1e-4, rtol=0)


@pytest.mark.integration
@pytest.mark.slow
def test_default_lm_insights_parse():
    language_model = labhooks.load_model()
    pairs = generate_insights(
        language_model, "Classify Amazon food reviews as great or other.", ["great", "other"], count=2, attempts=3, max_new_tokens=48
    )
    assert {pair.kind for pair in pairs} == {"harmful", "helpful"}
    assert all(pair.first and pair.second and pair.first.lower() != pair.second.lower() for pair in pairs)
