"""The byte-level BPE tokenizer every gptforge model is trained with, and the facts other code relies on."""
from __future__ import annotations

import hashlib
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from components import storage
from components.documents import DataError

EOT = "<|endoftext|>"  # ends every document and every completion; generation stops on it
EOT_ID = 0  # EOT's id in every tokenizer `train_tokenizer` returns: it is the first special token
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer's name in the data folder and in every model folder
# The trainer's floor: the 256 byte tokens plus EOT. At 257 the tokenizer has no merges but still
# encodes any text and decodes it back exactly; a smaller vocab_size is not refused by the trainer,
# it silently yields 257 tokens, so the vocabulary would not be the one the setting asked for.
MIN_VOCAB_SIZE = 257


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`.

    Every byte is in the initial alphabet, so any text encodes without unknown
    tokens and decodes back exactly.

    Args:
        texts: training texts; the same texts give the same tokenizer.
        vocab_size: target vocabulary size including the 256 bytes and EOT
            (at least MIN_VOCAB_SIZE).

    Returns:
        A tokenizer with `EOT` at `EOT_ID`.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # the first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    assert tokenizer.token_to_id(EOT) == EOT_ID, f"{EOT} must be id {EOT_ID}"
    return tokenizer


def load_tokenizer(location: str, key: str = "tokenizer.file", required_eot_id: int | None = EOT_ID) -> Tokenizer:
    """A `tokenizer.json` (path or storage URI) that the rows can be made with: `EOT` must be `required_eot_id`,
    or any id when it is None (a starting model's tokenizer: GPT-2's is 50256; see `eot_id`).

    Raises:
        DataError: the file cannot be read, is not a tokenizer, has no EOT, or has another id for it.
    """
    try:
        tokenizer = Tokenizer.from_str(storage.read_text(location))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{key}={location!r}: cannot be read ({error})") from None
    except Exception as error:  # tokenizers raises a plain Exception for JSON it cannot parse
        raise DataError(f"{key}={location!r}: not a tokenizers tokenizer.json ({error})") from None
    found = tokenizer.token_to_id(EOT)
    if found is None or (required_eot_id is not None and found != required_eot_id):
        wanted = f"token id {required_eot_id} (it is {found})" if required_eot_id is not None else "a token"
        raise DataError(f"{key}={location!r}: {EOT} must be {wanted}; documents are separated and "
                        f"generation stops on it")
    return tokenizer


def eot_id(tokenizer: Tokenizer) -> int:
    """The id of `EOT` in `tokenizer`: `EOT_ID` in every tokenizer gptforge trains, the tokenizer's own
    in a starting model's (50256 in GPT-2's). Rows are made with this id, never with a constant."""
    found = tokenizer.token_to_id(EOT)
    assert found is not None, f"a tokenizer without {EOT} reached the data stage"  # load_tokenizer refuses it
    return found


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON: the manifest's record of which vocabulary made the rows."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
