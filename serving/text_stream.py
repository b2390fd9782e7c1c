"""Incremental detokenisation with stop sequences, for one generated sequence.

Byte-level BPE can split a character over several tokens, and a stop sequence can
span tokens, so text is released only when it can no longer change: characters that
could still become the start of a stop sequence, and a trailing partial character
(decoded as U+FFFD), are held back until the next token decides.
"""
from __future__ import annotations

from typing import Optional, Sequence

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: Optional[Sequence[str]] = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or ()) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""          # decoded text so far (truncated at a stop sequence once hit)
        self.emitted = 0        # characters of self.text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that became final (may be "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if self.stop:
            # a stop sequence can only start in the not-yet-emitted tail (plus the held-back overlap)
            search_from = max(0, self.emitted - self.hold)
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = text[: min(hits)]
                return self._release(len(self.text))
        self.text = text
        safe = len(text) - self.hold
        if text.endswith(REPLACEMENT_CHAR):
            safe = min(safe, len(text) - 1)
        return self._release(safe)

    def flush(self) -> str:
        """The held-back remainder, when the sequence ends for another reason (length, EOS)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
