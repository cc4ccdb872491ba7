"""Tests of labhooks.zeroshot: the zero-shot classifier, its sites, evaluation and data files.

The builders of tiny random-weight encoders here are shared with test_roboshot.py and
test_otter.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import labhooks
from labhooks.errors import ConfigError, SiteError
from labhooks.zeroshot import (
    ZeroShotClassifier,
    accuracy,
    classifier_from_metadata,
    group_accuracy,
    read_labeled_texts,
)

TINY_OPEN_CLIP = "labhooks-test-tiny-clip"
_TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


class CharTokenizer:
    """A tokenizer for tiny CLIP text towers: one id per character, BOS 62, EOS 63, pad 0."""

    def __call__(self, texts, padding=True, truncation=True, max_length=16, return_tensors="pt"):
        rows = [[62] + [3 + ord(char) % 50 for char in text][: max_length - 2] + [63] for text in texts]
        length = max(len(row) for row in rows)
        ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
        mask = (torch.arange(length)[None] < torch.tensor([len(row) for row in rows])[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask}


def make_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
            "eos_token_id": 63,
            "bos_token_id": 62,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 40,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    return CLIPModel(config).eval()


def make_open_clip(tmp_dir: Path, seed: int = 0):
    import open_clip

    config_path = tmp_dir / f"{TINY_OPEN_CLIP}.json"
    config_path.write_text(json.dumps(_TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPEN_CLIP).eval()
    return model, open_clip.get_tokenizer(TINY_OPEN_CLIP)


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from labhooks.models import default_encoder_path

    return AutoTokenizer.from_pretrained(default_encoder_path())


def make_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128
    )
    return BertModel(config).eval()


def save_tiny_bert(folder: Path) -> Path:
    """Save a tiny random BERT with the real MiniLM tokenizer, loadable with model=FOLDER."""
    make_bert().save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_model():
    return make_clip()


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    return make_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(5, 3, 32, 32)


PROMPTS = ["a photo of a dog", "a photo of a cat", "a photo of a car"]


def test_clip_image_logits_match_clipmodel(clip_model, images):
    classifier = ZeroShotClassifier.from_model(clip_model, CharTokenizer(), PROMPTS)
    tokens = CharTokenizer()(PROMPTS)
    with torch.no_grad():
        expected = clip_model(**tokens, pixel_values=images).logits_per_image
        logits = classifier(pixel_values=images)
    assert logits.shape == (5, 3)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_clip_text_modality_uses_text_tower(clip_model):
    classifier = ZeroShotClassifier.from_model(clip_model, CharTokenizer(), PROMPTS, modality="text")
    texts = ["a dog runs", "a red car"]
    with torch.no_grad():
        tokens = CharTokenizer()(texts)
        embeddings = clip_model.get_text_features(**tokens).pooler_output
        class_embeddings = clip_model.get_text_features(**CharTokenizer()(PROMPTS)).pooler_output
        expected = clip_model.logit_scale.exp() * F.normalize(embeddings, dim=-1) @ F.normalize(class_embeddings, dim=-1).T
    torch.testing.assert_close(classifier.predict_logits(texts), expected, rtol=1e-5, atol=1e-5)


def test_open_clip_logits_match_formula(open_clip_model, images):
    model, tokenizer = open_clip_model
    classifier = ZeroShotClassifier.from_model(model, tokenizer, PROMPTS)
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokenizer(PROMPTS), normalize=True)
        expected = model.logit_scale.exp() * image_features @ text_features.T
        logits = classifier.predict_logits(images, batch_size=2)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_sites_of_clip_classifier(clip_model):
    classifier = ZeroShotClassifier.from_model(clip_model, CharTokenizer(), PROMPTS)
    rows = {row["site"]: row for row in labhooks.sites(classifier).table()}
    assert rows["embeddings"]["module"] == "embedder.visual_projection"
    assert rows["embeddings"]["width"] == "24"
    assert rows["logits"]["module"] == "head"
    assert rows["logits"]["width"] == "3"
    assert rows["post_block[l]"]["width"] == "40"
    assert rows["post_block[l]"]["layers"] == 2


def test_embeddings_site_edit_changes_logits(clip_model, images):
    classifier = ZeroShotClassifier.from_model(clip_model, CharTokenizer(), PROMPTS)
    direction = torch.randn(24)
    with torch.no_grad():
        embeddings = classifier.predict_embeddings(images)
        expected = classifier.head(embeddings + 3.0 * direction)
        with labhooks.attach(classifier, labhooks.SteeringVector("embeddings", direction, scale=3.0)):
            steered = classifier(pixel_values=images)
        restored = classifier(pixel_values=images)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored, classifier.head(embeddings), rtol=1e-5, atol=1e-5)


def test_logits_site_sees_whole_batch(open_clip_model, images):
    model, tokenizer = open_clip_model
    classifier = ZeroShotClassifier.from_model(model, tokenizer, PROMPTS)
    seen = []

    def keep(hidden, context):
        seen.append(tuple(hidden.shape))

    with torch.no_grad(), labhooks.attach(classifier, labhooks.FunctionIntervention("logits", keep)):
        classifier(pixel_values=images)
    assert seen == [(5, 3)]


def test_wrong_width_is_rejected_at_attach(clip_model):
    classifier = ZeroShotClassifier.from_model(clip_model, CharTokenizer(), PROMPTS)
    with pytest.raises(SiteError, match="site width is 24"):
        labhooks.attach(classifier, labhooks.SteeringVector("embeddings", torch.zeros(40)))


@pytest.mark.parametrize(("modality", "tower_width"), [("image", 48), ("text", 32)])
def test_open_clip_site_widths(open_clip_model, modality, tower_width):
    # embed_dim is 24; the vision tower is 48 wide and the text tower 32.
    model, tokenizer = open_clip_model
    classifier = ZeroShotClassifier.from_model(model, tokenizer, PROMPTS, modality=modality)
    widths = {row["site"]: row["width"] for row in labhooks.sites(classifier).table()}
    assert widths["embeddings"] == "24"
    assert widths["post_block[l]"] == str(tower_width)
    labhooks.attach(classifier, labhooks.SteeringVector("post_block[-1]", torch.zeros(tower_width))).remove()
    with pytest.raises(SiteError, match=f"site width is {tower_width}"):
        labhooks.attach(classifier, labhooks.SteeringVector("post_block[-1]", torch.zeros(24)))


def test_prompt_ensemble_averages_normalised_embeddings(clip_model):
    groups = [["a dog", "a puppy"], ["a cat"]]
    classifier = ZeroShotClassifier.from_model(clip_model, CharTokenizer(), groups, class_names=["dog", "cat"])
    embedded = F.normalize(classifier.embed_texts(["a dog", "a puppy", "a cat"]), dim=-1)
    expected = F.normalize(torch.stack([embedded[:2].mean(0), embedded[2]]), dim=-1)
    torch.testing.assert_close(classifier.head.class_embeddings, expected, rtol=1e-5, atol=1e-6)
    assert classifier.class_names == ["dog", "cat"]


def test_invalid_prompts_are_rejected(clip_model):
    with pytest.raises(ConfigError, match="at least two classes"):
        ZeroShotClassifier.from_model(clip_model, CharTokenizer(), ["only one"])
    with pytest.raises(ConfigError, match="is empty"):
        ZeroShotClassifier.from_model(clip_model, CharTokenizer(), ["a dog", "  "])
    with pytest.raises(ConfigError, match="2 class names but 3"):
        ZeroShotClassifier.from_model(clip_model, CharTokenizer(), PROMPTS, class_names=["a", "b"])


def test_unknown_encoder_is_rejected():
    with pytest.raises(ConfigError, match="cannot build a zero-shot classifier"):
        ZeroShotClassifier.from_model(torch.nn.Linear(2, 2), None, ["a", "b"])


def test_sentence_encoder_mean_pools_over_mask():
    from labhooks.zeroshot import MeanPoolingEmbedder

    bert = make_bert()
    embedder = MeanPoolingEmbedder(bert, minilm_tokenizer())
    short, long = embedder.tokenize(["good food"]), embedder.tokenize(["good food", "a much longer review of the food"])
    with torch.no_grad():
        alone = embedder(**short)
        padded = embedder(**long)
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-4, atol=1e-5)


def test_bert_classifier_sites_and_metadata():
    bert = make_bert()
    classifier = ZeroShotClassifier.from_model(
        bert, minilm_tokenizer(), ["a great review", "a bad review"], class_names=["great", "other"], name="tiny"
    )
    rows = {row["site"]: row for row in labhooks.sites(classifier).table()}
    assert rows["embeddings"]["module"] == "embedder"
    assert rows["embeddings"]["width"] == "32"
    assert rows["post_block[l]"]["module"] == "embedder.model.encoder.layer.{l}"
    metadata = classifier.metadata()
    assert metadata["class_names"] == ["great", "other"]
    assert metadata["logit_scale"] == 20.0
    rebuilt = classifier_from_metadata(labhooks.LoadedModel(bert, minilm_tokenizer(), "tiny"), metadata)
    torch.testing.assert_close(rebuilt.head.class_embeddings, classifier.head.class_embeddings)


def test_accuracy_and_group_accuracy():
    predictions = torch.tensor([0, 1, 1, 0, 1, 1])
    labels = torch.tensor([0, 1, 0, 0, 1, 0])
    groups = ["a", "a", "b", "b", "c", "c"]
    assert accuracy(predictions, labels) == pytest.approx(4 / 6)
    report = group_accuracy(predictions, labels, groups)
    assert report.per_group == {"a": 1.0, "b": 0.5, "c": 0.5}
    assert report.counts == {"a": 2, "b": 2, "c": 2}
    assert report.average == pytest.approx(4 / 6)
    assert report.worst_group == 0.5
    assert report.gap == pytest.approx(4 / 6 - 0.5)
    assert report.as_row() == [66.67, 50.0, 16.67]


def test_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([0, 1, 1], [0, 1])


def test_read_labeled_texts_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "tasty", "label": "great", "group": "short"}\n{"text": "stale", "label": 1, "group": "long"}\n')
    data = read_labeled_texts(jsonl, ["great", "other"])
    assert data.texts == ["tasty", "stale"]
    assert data.labels.tolist() == [0, 1]
    assert data.groups == ["short", "long"]

    table = tmp_path / "data.csv"
    table.write_text("review,score\nyum,great\nmeh,other\n")
    data = read_labeled_texts(table, ["great", "other"], text_field="review", label_field="score")
    assert data.labels.tolist() == [0, 1]
    assert data.groups is None
    assert data.subset([1]).texts == ["meh"]


def test_read_labeled_texts_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "tasty", "label": "excellent"}\n')
    with pytest.raises(ConfigError, match="label 'excellent' is not one of the classes great, other"):
        read_labeled_texts(path, ["great", "other"])
    path.write_text('{"text": "tasty", "label": "great"}\n{"text": "stale"}\n')
    with pytest.raises(ConfigError, match="record 2 has no 'label'"):
        read_labeled_texts(path, ["great", "other"])
    path.write_text('{"review": "tasty"}\n')
    with pytest.raises(ConfigError, match="no text in field 'text'"):
        read_labeled_texts(path, ["great", "other"])
    with pytest.raises(ConfigError, match="not found"):
        read_labeled_texts(tmp_path / "missing.jsonl", ["great", "other"])


@pytest.mark.integration
@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from labhooks.models import default_encoder_path

    loaded = labhooks.load_model(kind="encoder")
    classifier = ZeroShotClassifier.from_loaded(loaded, ["a great product", "a disappointing product"])
    texts = ["These cookies are delicious and fresh.", "The coffee arrived stale and the box was broken."]
    reference = SentenceTransformer(str(default_encoder_path()), device="cpu").encode(texts, convert_to_tensor=True)
    ours = F.normalize(classifier.embed_texts(texts), dim=-1)
    torch.testing.assert_close(ours, reference.cpu(), rtol=1e-4, atol=1e-5)
    assert classifier.predict_logits(texts).argmax(-1).tolist() == [0, 1]
