"""BPE tokenizer trained with Hugging Face ``tokenizers``; identified by the sha256 of its JSON.

``byte_fallback=True`` (default) is byte-level BPE as in GPT-2: every byte has a symbol, so any
text encodes without unknowns and ``decode(encode(s)) == s``.  ``byte_fallback=False`` learns
merges over Unicode characters (split on whitespace, Metaspace-style) and maps unseen
characters to ``<unk>``.

    tok = TextTokenizer.train(texts, vocab_size=4096)
    tok.save("tokenizer.json"); tok = TextTokenizer.load("tokenizer.json")   # or an fsspec URI
    ids = tok.encode("def main():"); tok.decode(ids); tok.digest
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    from components.config.schema import StorageConfig

PAD = "<|pad|>"
EOS = "<|endoftext|>"
UNK = "<unk>"
DEFAULT_SPECIAL_TOKENS = (PAD, EOS)


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._json = tokenizer.to_str()
        for token in (PAD, EOS):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(
                    f"tokenizer has no {token!r} special token; train it with TextTokenizer.train"
                )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts_iter: Iterable[str],
        vocab_size: int,
        byte_fallback: bool = True,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    ) -> TextTokenizer:
        specials = list(dict.fromkeys([*special_tokens, PAD, EOS]))
        if byte_fallback:
            if vocab_size < 256 + len(specials):
                raise ValueError(
                    f"vocab_size={vocab_size}: byte-level BPE needs at least 256 + {len(specials)}"
                )
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                min_frequency=2,
                show_progress=False,
                special_tokens=specials,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            )
        else:
            specials.append(UNK)
            tok = Tokenizer(models.BPE(unk_token=UNK))
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            tok.decoder = decoders.Metaspace()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=specials
            )
        tok.train_from_iterator(texts_iter, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, text: str) -> TextTokenizer:
        return cls(Tokenizer.from_str(text))

    @classmethod
    def load(
        cls, path: str, storage: StorageConfig | None = None, expected_hash: str | None = None
    ) -> TextTokenizer:
        """From a local ``tokenizer.json`` or any fsspec URI; optionally check its hash."""
        if "://" in str(path):
            from components.data.cold import read_bytes  # local import: fsspec only when needed

            text = read_bytes(str(path), storage, what="tokenizer.json").decode("utf-8")
        else:
            if not os.path.exists(path):
                raise FileNotFoundError(f"tokenizer file not found: {path}")
            with open(path, encoding="utf-8") as f:
                text = f.read()
        tok = cls.from_str(text)
        if expected_hash and tok.digest != expected_hash:
            raise ValueError(f"tokenizer {path}: hash {tok.digest} != expected {expected_hash}")
        return tok

    def to_str(self) -> str:
        return self._json

    def save(self, path: str) -> str:
        """Write ``tokenizer.json`` (atomically) and return its path."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self._json)
        os.replace(tmp, path)
        return path

    # ---- use ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21): the same ids without computing character offsets,
        # which cost byte-level BPE about two thirds of its time
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._tok.token_to_id(EOS)

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(PAD)

    @property
    def digest(self) -> str:
        """sha256 of the serialized tokenizer: the identity datasets and models are checked
        against."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()
