"""Bits per byte: hand computations on real tiny models and tokenizers (no mocks)."""
import math

import pytest
import torch
from torch import nn

from components.bpb import _first_bytes, bits_per_byte
from components.model import GPT, GPTConfig
from components.tokenizer import EOT_ID, MIN_VOCAB_SIZE, train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "naïve café: 1 € — ünïcödé\n", "x = [i * i for i in range(10)]\n"]


class Constant(nn.Module):
    """Logits 0 over the vocabulary but -inf on `never` ids: uniform over the rest."""

    def __init__(self, vocab_size: int, never=()):
        super().__init__()
        self.vocab_size, self.never = vocab_size, list(never)

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        logits[..., self.never] = float("-inf")
        return logits, None


def test_uniform_over_256_bytes_is_exactly_8_bits_per_byte():
    bytes_only = train_tokenizer(TEXTS, MIN_VOCAB_SIZE)  # 256 byte tokens + EOT, no merges
    assert bytes_only.get_vocab_size() == 257
    model = Constant(257, never=[EOT_ID])
    for block_size, batch_size in ((4, 1), (16, 3), (1024, 8)):
        assert bits_per_byte(model, bytes_only, TEXTS, block_size, batch_size, "cpu") == pytest.approx(8.0, rel=1e-7)  # float32 logits


def test_the_bytes_are_the_texts_utf8_length_whatever_the_tokenizer():
    merged = train_tokenizer(TEXTS * 50, 300)
    model = Constant(300)  # every target costs ln 300 nats, EOT excluded from the targets
    tokens = sum(len(merged.encode(t, add_special_tokens=False).ids) for t in TEXTS)
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert tokens < n_bytes  # merges: fewer tokens than bytes, yet the bytes are the text's
    expected = tokens * math.log2(300) / n_bytes
    assert bits_per_byte(model, merged, TEXTS, 8, 2, "cpu") == pytest.approx(expected, rel=1e-7)


def _by_hand(model, tokenizer, text, block_size, context=""):
    """Each window scored alone: EOT + ids, windows of block_size targets, only `text`'s targets count."""
    ctx = tokenizer.encode(context, add_special_tokens=False).ids if context else []
    ids = [EOT_ID, *ctx, *tokenizer.encode(text, add_special_tokens=False).ids]
    nats = 0.0
    for start in range(0, len(ids) - 1, block_size):
        window = ids[start:start + block_size + 1]
        with torch.no_grad():
            logits, _ = model(torch.tensor([window[:-1]]))
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        for i, target in enumerate(window[1:]):
            if start + i + 1 > len(ctx) and target != EOT_ID:
                nats -= float(logp[i, target])
    return nats / (math.log(2) * len(text.encode("utf-8")))


def test_matches_a_hand_computation_on_a_tiny_gpt():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TEXTS * 20, 300)
    model = GPT(GPTConfig(block_size=8, vocab_size=300, n_layer=1, n_head=2, n_embd=16)).eval()
    long = TEXTS[0] * 4  # several windows
    got = bits_per_byte(model, tokenizer, [long], 8, 3, "cpu")
    assert got == pytest.approx(_by_hand(model, tokenizer, long, 8), rel=1e-5)
    both = bits_per_byte(model, tokenizer, [long, TEXTS[1]], 8, 2, "cpu")
    n_long, n_short = len(long.encode()), len(TEXTS[1].encode())
    weighted = (_by_hand(model, tokenizer, long, 8) * n_long + _by_hand(model, tokenizer, TEXTS[1], 8) * n_short)
    assert both == pytest.approx(weighted / (n_long + n_short), rel=1e-5)  # summed nats over summed bytes


def test_a_pair_scores_only_its_completion():
    torch.manual_seed(1)
    tokenizer = train_tokenizer(TEXTS * 20, 300)
    model = GPT(GPTConfig(block_size=16, vocab_size=300, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt, completion = "def add(a, b):\n", "    return a + b\n"
    got = bits_per_byte(model, tokenizer, [(prompt, completion)], 16, 1, "cpu")
    assert got == pytest.approx(_by_hand(model, tokenizer, completion, 16, context=prompt), rel=1e-5)


def test_no_text_is_refused():
    with pytest.raises(ValueError, match="empty"):
        bits_per_byte(Constant(257), train_tokenizer(TEXTS, 257), ["", ""], 8, 1, "cpu")


def test_the_byte_budget_cuts_on_a_character_boundary():
    cut = _first_bytes(["ab", "é€x", "never"], 5)  # 2 bytes, then 2 of "é€x" (é is 2, € is 3)
    assert cut == ["ab", "é"]
    assert _first_bytes(["ab", "cd"], 0) == ["ab", "cd"]


def test_a_gpt2_style_tokenizer_with_end_of_text_last_scores_its_token_0():
    # GPT-2's tokenizer has <|endoftext|> at the end (50256) and "!" at id 0: bits per byte must skip the
    # former and score the latter, or a text with "!" in it would get some of its bytes for free.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from components.tokenizer import EOT

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=256, initial_alphabet=
                                                             pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]))
    tokenizer.add_special_tokens([EOT])
    eot = tokenizer.token_to_id(EOT)
    assert eot == 256 and tokenizer.id_to_token(0) == "!"
    texts = ["print('hi!')\n", "wow!!!\n"]
    model = Constant(257, never=[eot])
    assert bits_per_byte(model, tokenizer, texts, 8, 2, "cpu") == pytest.approx(8.0, rel=1e-7)
