"""components/detokenize.py: the text of a growing completion is what decoding all of it at once gives."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models

from components.detokenize import IncrementalDecoder
from components.tokenizer import train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "naïve café, 東京 🙂 ünïcödé", "x = '→' * 3  # ∑ λ"] * 20


def _decode(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def _check_every_prefix(tokenizer, ids):
    decoder, decode = IncrementalDecoder(_decode(tokenizer)), _decode(tokenizer)
    for n, token in enumerate(ids, start=1):
        assert decoder.append(token) == decode(ids[:n]), (ids[:n], n)
        assert decoder.text == decode(ids[:n])


def test_byte_level_text_matches_a_whole_decode_token_by_token():
    tokenizer = train_tokenizer(TEXTS, 300)  # small: many characters come in several byte tokens
    size = tokenizer.get_vocab_size()
    for text in TEXTS[:3]:
        _check_every_prefix(tokenizer, tokenizer.encode(text).ids)
    rng = random.Random(0)
    for _ in range(50):  # random ids: lone and misordered UTF-8 bytes, end-of-text in the middle
        _check_every_prefix(tokenizer, [rng.randrange(size) for _ in range(rng.randrange(1, 40))])


def test_a_split_character_is_held_as_u_fffd_until_it_is_whole():
    tokenizer = train_tokenizer(TEXTS, 300)
    ids = tokenizer.encode("🙂").ids
    assert len(ids) > 1  # the emoji's four bytes are not one token in so small a vocabulary
    decoder = IncrementalDecoder(_decode(tokenizer))
    texts = [decoder.append(t) for t in ids]
    assert texts[0].endswith("\ufffd") and texts[-1] == "🙂"


@pytest.mark.parametrize("decoder", [decoders.Metaspace(), decoders.WordPiece()], ids=["metaspace", "wordpiece"])
def test_decoders_that_treat_the_first_token_apart_stay_right(decoder):
    vocab = {t: i for i, t in enumerate(["[UNK]", "▁the", "▁cat", "s", "##s", "▁", "a", "##b", "▁sat", "."])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.decoder = decoder
    rng = random.Random(1)
    for _ in range(50):
        _check_every_prefix(tokenizer, [rng.randrange(len(vocab)) for _ in range(rng.randrange(1, 20))])


def test_a_decoder_whose_window_does_not_continue_the_text_is_decoded_whole():
    words = ["a", "bc", "d", "\ufffd", "ef"]

    def counted(ids):  # a decode whose text starts with something that depends on every token
        return f"{len(ids)}:" + "".join(words[i] for i in ids)
    decoder, rng = IncrementalDecoder(counted), random.Random(2)
    ids = [rng.randrange(len(words)) for _ in range(30)]
    for n, token in enumerate(ids, start=1):
        assert decoder.append(token) == counted(ids[:n])
