"""Bundles: exact round trips, validation errors that name the site and parameter, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import labhooks
from labhooks import bundles
from labhooks.errors import BundleError

from conftest import make_decoder, prompt_ids

FIXTURE = Path(__file__).parent / "fixtures" / "bundle_schema1.safetensors"


def _vectors():
    generator = torch.Generator().manual_seed(0)
    return [
        labhooks.SteeringVector("post_block[0]", torch.randn(32, generator=generator), scale=1.5, positions="generated"),
        labhooks.SteeringVector("pre_mlp[2].heads[1,3]", torch.randn(8, generator=generator), positions="last_prompt"),
    ]


def test_round_trip_exact(tmp_path):
    model = make_decoder("llama")
    ids = prompt_ids([5])[0][None]
    vectors = _vectors()
    path = labhooks.save_bundle(tmp_path / "b.safetensors", vectors, plugin="core", method="test", config={"alpha": 1}, model=model)
    loaded = labhooks.load_bundle(path, model)
    assert [str(item.site) for item in loaded.interventions] == ["post_block[0]", "pre_mlp[2].heads[1,3]"]
    assert [str(item.positions) for item in loaded.interventions] == ["generated", "last_prompt"]
    for original, restored in zip(vectors, loaded.interventions, strict=True):
        assert torch.equal(original.vector, restored.vector)
        assert original.scale == restored.scale
    with torch.no_grad():
        with labhooks.attach(model, vectors):
            before = model(ids).logits
        with labhooks.attach(model, loaded.interventions):
            after = model(ids).logits
    assert torch.equal(before, after)
    assert loaded.config == {"alpha": 1}
    assert loaded.model_info["hidden_size"] == 32
    assert loaded.model_info["num_layers"] == 3


def test_extra_tensors_round_trip(tmp_path):
    path = labhooks.save_bundle(
        tmp_path / "t.safetensors", tensors={"weights": torch.eye(3, dtype=torch.float64)}, plugin="core", method="m"
    )
    loaded = labhooks.load_bundle(path)
    assert loaded.interventions == []
    assert torch.equal(loaded.tensors["weights"], torch.eye(3, dtype=torch.float64))


def test_committed_fixture_loads():
    model = make_decoder("llama")
    loaded = labhooks.load_bundle(FIXTURE, model)
    (vector,) = loaded.interventions
    assert str(vector.site) == "post_block[1]"
    assert str(vector.positions) == "last_prompt+generated"
    assert vector.scale == 2.0
    assert torch.equal(vector.vector, torch.arange(32, dtype=torch.float32) / 32)
    assert torch.equal(loaded.tensors["extra"], torch.tensor([1.0, 2.0, 3.0]))
    assert loaded.manifest["schema_version"] == 1


def test_hidden_size_mismatch_names_it(tmp_path):
    path = labhooks.save_bundle(tmp_path / "b.safetensors", _vectors(), model=make_decoder("llama"))
    other = make_decoder("gpt2")
    other.config.n_embd = 48
    with pytest.raises(BundleError, match="hidden_size=32"):
        labhooks.load_bundle(path, other)


def test_width_mismatch_names_site_and_parameter(tmp_path):
    path = labhooks.save_bundle(tmp_path / "b.safetensors", [labhooks.SteeringVector("post_block[1]", torch.ones(40))])
    with pytest.raises(BundleError, match=r"post_block\[1\].*'vector'.*site width is 32"):
        labhooks.load_bundle(path, make_decoder("llama"))


def _rewrite_manifest(path: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    manifest = json.loads(metadata[bundles.MANIFEST_KEY])
    edit(manifest, tensors)
    save_file(tensors, str(path), metadata={bundles.MANIFEST_KEY: json.dumps(manifest)})


def test_manifest_shape_mismatch(tmp_path):
    path = labhooks.save_bundle(tmp_path / "b.safetensors", _vectors())

    def edit(manifest, tensors):
        manifest["interventions"][0]["tensors"]["vector"]["shape"] = [16]

    _rewrite_manifest(path, edit)
    with pytest.raises(BundleError, match=r"parameter 'vector' of intervention 0 \(steering_vector at post_block\[0\]\)"):
        labhooks.load_bundle(path)


def test_dtype_mismatch(tmp_path):
    path = labhooks.save_bundle(tmp_path / "b.safetensors", _vectors())

    def edit(manifest, tensors):
        manifest["interventions"][1]["tensors"]["vector"]["dtype"] = "float16"

    _rewrite_manifest(path, edit)
    with pytest.raises(BundleError, match=r"pre_mlp\[2\]\.heads\[1,3\].*dtype"):
        labhooks.load_bundle(path)


def test_newer_schema_rejected(tmp_path):
    path = labhooks.save_bundle(tmp_path / "b.safetensors", _vectors())
    _rewrite_manifest(path, lambda manifest, tensors: manifest.update(schema_version=99))
    with pytest.raises(BundleError, match="upgrade labhooks"):
        labhooks.load_bundle(path)


def test_unknown_intervention_class(tmp_path):
    path = labhooks.save_bundle(tmp_path / "b.safetensors", _vectors())

    def edit(manifest, tensors):
        manifest["interventions"][0]["class"] = "not_installed"

    _rewrite_manifest(path, edit)
    with pytest.raises(BundleError, match="not_installed"):
        labhooks.load_bundle(path)


@pytest.mark.parametrize("keep", [0.2, 0.6, 0.95])
def test_truncated_file_is_labhooks_error(tmp_path, keep):
    path = labhooks.save_bundle(tmp_path / "b.safetensors", _vectors())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BundleError):
        labhooks.load_bundle(path)


def test_corrupted_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        labhooks.load_bundle(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(BundleError, match="not a labhooks bundle"):
        labhooks.load_bundle(foreign)
    with pytest.raises(BundleError, match="not found"):
        labhooks.load_bundle(tmp_path / "missing.safetensors")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "b.safetensors"
    labhooks.save_bundle(target, _vectors()[:1])
    original = target.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundles, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        labhooks.save_bundle(target, _vectors())
    assert target.read_bytes() == original, "the earlier bundle is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"], "no temporary file is left"


def test_function_intervention_cannot_be_saved(tmp_path):
    with pytest.raises(BundleError, match="cannot be saved"):
        labhooks.save_bundle(tmp_path / "f.safetensors", [labhooks.FunctionIntervention("post_block[0]", lambda h, c: h)])
    assert not (tmp_path / "f.safetensors").exists()


def test_bad_bundle_path(tmp_path):
    with pytest.raises(BundleError, match="must end in .safetensors"):
        labhooks.save_bundle(tmp_path / "b.pt", _vectors())
