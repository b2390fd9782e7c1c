from __future__ import annotations

import pytest

from components.data.corpus import iter_texts, list_stdlib
from components.data.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(iter_texts(list_stdlib(max_files=10, max_bytes=80_000, seed=1)))


def test_byte_level_round_trip_and_specials(texts):
    tok = TextTokenizer.train(texts, vocab_size=400)
    assert tok.vocab_size == 400
    assert tok.pad_id != tok.eos_id and {tok.pad_id, tok.eos_id} <= set(range(tok.vocab_size))
    sample = "def main(argv):\n\treturn 'héllo wörld ✓ 日本'  # unseen characters\n"
    ids = tok.encode(sample)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == sample
    # merges were learned: code compresses well below one token per byte
    assert len(tok.encode(texts[0])) < 0.6 * len(texts[0].encode())


def test_training_is_deterministic_and_hash_identifies_it(texts, tmp_path):
    a = TextTokenizer.train(texts, vocab_size=400)
    b = TextTokenizer.train(texts, vocab_size=400)
    assert a.digest == b.digest and len(a.digest) == 64
    assert TextTokenizer.train(texts, vocab_size=420).digest != a.digest
    path = a.save(str(tmp_path / "tok" / "tokenizer.json"))
    loaded = TextTokenizer.load(path, expected_hash=a.digest)
    assert loaded.digest == a.digest and loaded.encode("import os") == a.encode("import os")
    with pytest.raises(ValueError, match="hash"):
        TextTokenizer.load(path, expected_hash="0" * 64)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        TextTokenizer.load(str(tmp_path / "missing.json"))


def test_without_byte_fallback_unknowns_map_to_unk(texts):
    tok = TextTokenizer.train(texts, vocab_size=400, byte_fallback=False)
    ids = tok.encode("def f(): pass ✓")
    assert ids and tok.decode(tok.encode("def f(): pass")) == "def f(): pass"
