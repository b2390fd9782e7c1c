"""Incremental detokenisation with stop sequences, for one generated sequence.

Byte-level BPE can split a character over several tokens, and a stop sequence can span tokens,
so text is released only when it can no longer change: characters that could still become the
start of a stop sequence, and an unfinished UTF-8 character, are held back until the next token
decides.

For byte-level BPE tokenizers (GPT-2's byte-to-symbol mapping, what moeops trains by default)
each token's bytes come from a table built once per tokenizer and an incremental UTF-8 decoder
turns them into text: O(1) per token. Any other tokenizer decodes the whole sequence each step.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"


def _byte_symbols() -> dict[str, int]:
    """Byte-level BPE's symbol for each byte, inverted: printable Latin-1 bytes stand for
    themselves, the other 68 bytes (controls, space, ...) take the code points from 256 upwards."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbol_of = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbol_of:
            symbol_of[b] = chr(256 + extra)
            extra += 1
    return {symbol: b for b, symbol in symbol_of.items()}


def token_bytes_table(tokenizer) -> list[bytes] | None:
    """bytes of every token id (special tokens: b"", as ``decode`` skips them), or None when the
    tokenizer is not byte-level BPE. ``tokenizer``: anything with ``to_str()`` of a tokenizers
    JSON."""
    try:
        spec = json.loads(tokenizer.to_str())
    except (AttributeError, ValueError, TypeError):
        return None
    if (spec.get("decoder") or {}).get("type") != "ByteLevel" or "vocab" not in spec.get(
        "model", {}
    ):
        return None
    byte_of = _byte_symbols()
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    table = [b""] * (max(vocab.values()) + 1)
    for symbols, token_id in vocab.items():
        if token_id in special:
            continue
        try:
            table[token_id] = bytes(byte_of[c] for c in symbols)
        except KeyError:  # an added non-special token written in plain text
            table[token_id] = symbols.encode("utf-8")
    return table


class TextStream:
    def __init__(
        self,
        tokenizer,
        stop: Sequence[str] | None = None,
        include_stop: bool = False,
        table: list[bytes] | None = None,
    ):
        """``table``: :func:`token_bytes_table` of ``tokenizer`` (None: decode the whole sequence
        each step)."""
        self.tokenizer = tokenizer
        self.table = table
        self._utf8 = (
            codecs.getincrementaldecoder("utf-8")(errors="replace") if table is not None else None
        )
        self.stop = [s for s in (stop or ()) if s]
        self.include_stop = include_stop  # vLLM's include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded text so far (truncated at a stop sequence once hit)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False
        self.stop_hit: str | None = None  # the stop sequence that ended the text
        self._pending = False  # the byte decoder holds an unfinished character

    def _decode(self, token_id: int) -> str:
        if self._utf8 is None:
            return self.tokenizer.decode(self.ids)
        piece = self.table[token_id] if token_id < len(self.table) else b""
        text = self.text + self._utf8.decode(piece)
        self._pending = bool(self._utf8.getstate()[0])
        return text

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that became final (may be "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self._decode(token_id)
        if self.stop:
            # a stop sequence can only start in the not-yet-emitted tail (plus the held-back
            # overlap)
            search_from = max(0, self.emitted - self.hold)
            hits = [
                (i, s) for i, s in ((text.find(s, search_from), s) for s in self.stop) if i >= 0
            ]
            if hits:
                at, stop = min(hits)
                self.stopped, self.stop_hit = True, stop
                self.text = text[: at + (len(stop) if self.include_stop else 0)]
                return self._release(len(self.text))
        self.text = text
        safe = len(text) - self.hold
        if self._utf8 is None and text.endswith(REPLACEMENT_CHAR):
            safe = min(
                safe, len(text) - 1
            )  # maybe the first bytes of a character the next token completes
        return self._release(safe)

    def flush(self) -> str:
        """The held-back remainder, when the sequence ends for another reason (length, EOS)."""
        if self._utf8 is not None and self._pending and not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
            self._pending = False
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
