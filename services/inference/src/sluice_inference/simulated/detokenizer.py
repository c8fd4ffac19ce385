"""Generated token ids to text, one token at a time, and stop strings: what vLLM's front end does.

As in vLLM's ``FastIncrementalDetokenizer``, the tokenizers library's
``DecodeStream``, primed with the prompt, turns each id into the text it
adds (nothing until a split UTF-8 character is whole; special tokens
skipped). While stop strings are set, the last (longest stop string - 1)
characters are held back so that a stop string is never streamed; a match
cuts the text before it and ends the request.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stop: Sequence[str], min_tokens: int) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=prompt, skip_special_tokens=True)
        self._stop = tuple(stop)
        self._min_tokens = min_tokens
        self._held = max(map(len, self._stop), default=1) - 1
        self._sent = 0
        self.tokens = 0
        self.text = ""

    def add(self, token_id: int, *, end_of_sequence: bool = False) -> str | None:
        """Add the next token; returns the stop string it completed, if any."""
        self.tokens += 1
        if end_of_sequence:
            return None  # the end-of-sequence token adds no text
        piece = self._step(token_id)
        if not piece:
            return None
        self.text += piece
        if self._stop and self.tokens > self._min_tokens:
            return self._find_stop(len(piece))
        return None

    def take(self, finished: bool) -> str:
        """The text not sent yet, less what a stop string might still claim unless finished."""
        end = len(self.text) if finished else len(self.text) - self._held
        if end <= self._sent:
            return ""
        piece = self.text[self._sent : end]
        self._sent = end
        return piece

    def _step(self, token_id: int) -> str | None:
        try:
            piece: str | None = self._stream.step(self._tokenizer, token_id)
        except Exception as exc:
            # A byte-level tokenizer can make text that is not valid UTF-8 so far, which
            # breaks the stream's state; vLLM starts a new stream there too.
            if not str(exc).startswith("Invalid prefix"):
                raise
            self._stream = DecodeStream(skip_special_tokens=True)
            piece = self._stream.step(self._tokenizer, token_id)
        return piece

    def _find_stop(self, new_chars: int) -> str | None:
        for stop in self._stop:
            # Only a match that ends in the new text counts: older text was checked before.
            at = self.text.find(stop, max(0, len(self.text) - new_chars - len(stop) + 1))
            if at != -1:
                self.text = self.text[:at]
                return stop
        return None
