"""The text of a growing completion, one token at a time, at a cost that does not grow with its length.

A byte-level BPE token can hold half of a UTF-8 character, so the text of a completion is the decode
of all its tokens together, not the decodes of each joined. Decoding everything again at every token
costs O(n) a token and O(n^2) a completion: at 256 tokens that was the largest per-row cost of a
decode step on a CPU (~30 us a row). `IncrementalDecoder` decodes a short window instead, the tokens
since the last point where the text ended on a whole character, plus the token before that point,
and keeps the rest as settled text. This is the prefix/read offset scheme of Hugging Face TGI and
vLLM. The token before is there for decoders that treat a sequence's first token differently
(Metaspace drops its leading space): the window's first token is decoded the same way in the window
and in the part of it that is already settled, so their difference is the new text.

That difference is right for decoders whose text of a window is the text of its settled part followed
by the text of the rest: ByteLevel (this project's tokenizer and GPT-2's), Metaspace and WordPiece
(tests/test_detokenize.py checks each against whole decodes). Where a window's text does not even
start with its settled part's, the decoder is not one of those, and the whole sequence is decoded
again: right, only slower.
"""
from __future__ import annotations

from typing import Callable


class IncrementalDecoder:
    """`append(token)` one token at a time; `text` is the decode of all of them."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""
        self._settled = ""  # decode(ids[:read]): it ends on a whole character
        self._start = 0  # the window is ids[start:]
        self._read = 0  # ids[start:read] are part of the settled text already
        self._start_text = ""  # decode(ids[start:read])

    def append(self, token: int) -> str:
        """Add `token`; returns the whole text so far."""
        self.ids.append(token)
        window = self._decode(self.ids[self._start:])
        if window.startswith(self._start_text):
            self.text = self._settled + window[len(self._start_text):]
        else:
            self.text = self._decode(self.ids)
        if not self.text.endswith("\ufffd"):  # whole characters (U+FFFD: an incomplete UTF-8 sequence)
            self._settled = self.text
            self._start, self._read = self._read, len(self.ids)
            self._start_text = self._decode(self.ids[self._start: self._read])
        return self.text
