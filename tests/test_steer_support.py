"""Helpers shared by the steer and training tests: a character tokenizer and tiny loaded models.

The tokenizer maps each printable character to one id below the tiny models' vocabulary
size (96), with ids 0, 1 and 2 for padding, BOS and EOS as in ``conftest``.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from labhooks.models import LoadedModel

from conftest import VOCAB, make_decoder

_SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
# 95 printable ASCII characters and the newline, less four rare ones, fill the 92 free ids.
_CHARACTERS = [character for character in string.printable if character not in "`~^|\t\r\x0b\x0c"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(_SPECIAL + _CHARACTERS)}
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def tiny_loaded(family: str = "llama", seed: int = 0) -> LoadedModel:
    model = make_decoder(family, seed)
    model.config._name_or_path = f"tiny-{family}"
    return LoadedModel(model, char_tokenizer(), f"tiny-{family}")
