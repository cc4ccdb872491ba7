"""Tiny random-weight models of every supported family, built from configs."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*generation flags.*")

VOCAB = 96


def _decoder_config(family: str) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    if family == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2)
    if family == "mistral":
        return transformers.MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    if family == "gemma":  # head_dim 16 with 4 heads: 64 != hidden size 32
        return transformers.GemmaConfig(**common, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    if family == "gemma2":
        return transformers.Gemma2Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if family == "gemma3_text":
        return transformers.Gemma3TextConfig(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8)
    if family == "phi3":
        return transformers.Phi3Config(**common, num_attention_heads=4, num_key_value_heads=2)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, num_attention_heads=4)
    raise ValueError(family)


DECODER_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"]
# Families whose last hidden state in output_hidden_states is the final-norm output, so
# post_block[-1] is compared only for the earlier layers.
ENCODER_FAMILIES = ["bert"]


def make_decoder(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = _decoder_config(family)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init leaves some norms at exactly 1 and biases at 0; perturb so that sites differ.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


def make_bert(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
    return transformers.BertModel(config).eval()


def make_clip(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    text = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    )
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    return transformers.CLIPModel(config).eval()


def make_open_clip(seed: int = 0) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=32, head_width=8, image_size=16, patch_size=8),
        text_cfg=open_clip.CLIPTextCfg(context_length=12, vocab_size=VOCAB, width=32, heads=4, layers=2),
    )
    return model.eval()


@pytest.fixture(params=DECODER_FAMILIES)
def decoder(request: pytest.FixtureRequest) -> transformers.PreTrainedModel:
    return make_decoder(request.param)


@pytest.fixture
def llama() -> transformers.PreTrainedModel:
    return make_decoder("llama")


def prompt_ids(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=generator) for length in lengths]


def pad_batch(sequences: list[torch.Tensor], side: str = "left", pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if side == "left":
            ids[row, width - len(sequence) :] = sequence
            mask[row, width - len(sequence) :] = 1
        else:
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
    return ids, mask
