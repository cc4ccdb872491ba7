"""The site grammar, aliases, and resolution against every supported family."""

from __future__ import annotations

import pytest

import labhooks
from labhooks.errors import SiteError
from labhooks.positions import Positions
from labhooks.sites import Site, parse_site

from conftest import DECODER_FAMILIES, make_bert, make_clip, make_decoder


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("post_block[3]", "post_block[3]"),
        ("post_block[-1]", "post_block[-1]"),
        ("post_block[4:8]", "post_block[4:8]"),
        ("post_block[*]", "post_block[*]"),
        ("post_block[0, 2]", "post_block[0,2]"),
        ("pre_mlp[2].heads[0,5]", "pre_mlp[2].heads[0,5]"),
        ("vision.post_mlp[1]", "vision.post_mlp[1]"),
        ("embeddings", "embeddings"),
        ("logits", "logits"),
        ("resid_post[3]", "post_block[3]"),
        ("mlp_out[3]", "post_mlp[3]"),
        ("attn_out[3]", "pre_mlp[3]"),
        ("block_output[3]", "post_block[3]"),
        ("mlp_output[3]", "post_mlp[3]"),
        ("attention_output[3]", "pre_mlp[3]"),
        ("blocks.3.hook_resid_post", "post_block[3]"),
        ("blocks.3.hook_mlp_out", "post_mlp[3]"),
        ("blocks.3.attn.hook_z", "pre_mlp[3].heads[*]"),
        ("hook_embed", "embeddings"),
    ],
)
def test_parse_site_canonical(text, canonical):
    assert str(parse_site(text)) == canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("post_block", "needs a layer"),
        ("post_block[x]", "invalid layer selector"),
        ("post_block[1:2:0]", "step must not be zero"),
        ("embeddings[2]", "takes no layer"),
        ("post_block[1].heads[0]", "heads can only be addressed"),
        ("resid_mid[2]", "unknown site kind"),
        ("post block[2]", "invalid site"),
    ],
)
def test_parse_site_errors(text, message):
    with pytest.raises(SiteError, match=message):
        parse_site(text)


def test_expand_selectors():
    assert [site.layer for site in parse_site("post_block[-1]").expand(5)] == [4]
    assert [site.layer for site in parse_site("post_block[1:4]").expand(5)] == [1, 2, 3]
    assert [site.layer for site in parse_site("post_block[::2]").expand(5)] == [0, 2, 4]
    assert [site.layer for site in parse_site("post_block[*]").expand(3)] == [0, 1, 2]
    assert parse_site("pre_mlp[0].heads[-1]").expand(2, 4) == [Site("pre_mlp", 0, (3,))]
    with pytest.raises(SiteError, match="out of range"):
        parse_site("post_block[5]").expand(5)
    with pytest.raises(SiteError, match="selects nothing"):
        parse_site("post_block[7:9]").expand(5)
    with pytest.raises(SiteError, match="no addressable attention heads"):
        parse_site("pre_mlp[0].heads[0]").expand(2, None)


def test_site_round_trip_through_parse():
    site = Site("pre_mlp", 2, (1, 3), "text")
    assert str(site) == "text.pre_mlp[2].heads[1,3]"
    assert parse_site(site).expand(4, 4) == [site]


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_site_resolves(family):
    model = make_decoder(family)
    model_sites = labhooks.sites(model)
    names = [row["site"] for row in model_sites.table()]
    assert names == ["embeddings", "pre_mlp[l]", "pre_mlp[l].heads[h]", "post_mlp[l]", "post_block[l]", "logits"]
    assert model_sites.num_layers() == 3
    heads, head_dim = model_sites.head_shape()
    assert heads == 4
    expected_head_dim = 16 if family.startswith("gemma") else 8
    assert head_dim == expected_head_dim


def test_parallel_block_family_is_marked():
    assert labhooks.sites(make_decoder("gpt_neox")).is_parallel()
    assert not labhooks.sites(make_decoder("llama")).is_parallel()


def test_gemma2_pre_mlp_is_post_attention_norm():
    resolved = labhooks.sites(make_decoder("gemma2")).resolve("pre_mlp[0]")[0]
    assert resolved.module_path == "model.layers.0.post_attention_layernorm"


def test_encoder_and_clip_sites():
    bert_sites = labhooks.sites(make_bert())
    assert bert_sites.resolve("post_mlp[1]")[0].module_path == "encoder.layer.1.output.dense"
    clip_sites = labhooks.sites(make_clip())
    assert clip_sites.towers == ["text", "vision"]
    assert clip_sites.resolve("vision.embeddings")[0].module_path == "visual_projection"
    assert clip_sites.resolve("post_block[0]")[0].module_path == "text_model.encoder.layers.0"
    with pytest.raises(SiteError, match="unknown tower"):
        clip_sites.resolve("audio.post_block[0]")


def test_structural_fallback_finds_blocks():
    model = make_decoder("llama")
    model.config.model_type = "my_new_llama"
    model_sites = labhooks.sites(model)
    assert model_sites.adapter.name.startswith("structural fallback")
    assert model_sites.resolve("post_block[-1]")[0].module_path == "model.layers.2"
    assert model_sites.resolve("pre_mlp[0].heads[1]")[0].module_path == "model.layers.0.self_attn.o_proj"
    assert model_sites.resolve("logits")[0].module_path == "lm_head"


def test_plugin_adapter_takes_precedence():
    from labhooks.architectures import ArchitectureAdapter, TowerLayout
    from labhooks.resolve import ModelSites

    model = make_decoder("llama")
    custom = ArchitectureAdapter(
        name="custom llama",
        model_types=("llama",),
        towers={"text": TowerLayout(layers=("model.layers",), attention="self_attn", mlp=None)},
    )
    model_sites = ModelSites(model, adapters=(custom, *labhooks.get_registry().adapters))
    assert model_sites.adapter is custom
    with pytest.raises(SiteError, match="does not exist"):
        model_sites.resolve("post_mlp[0]")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("all", "all"), ("last_prompt+generated", "last_prompt+generated"), ("first_prompt:3", "first_prompt:3"), ("at:1, -1", "at:1,-1")],
)
def test_positions_parse(text, canonical):
    assert str(Positions.parse(text)) == canonical


@pytest.mark.parametrize("text", ["", "some", "first_prompt:0", "last_prompt:x", "at:a"])
def test_positions_parse_errors(text):
    with pytest.raises(labhooks.PositionError):
        Positions.parse(text)
