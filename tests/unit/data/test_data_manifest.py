from __future__ import annotations

import json
import os

import pytest

from components.data.build import pack_rows, split_rows
from components.data.cold import ColdStorageError
from components.data.manifest import load_manifest
from components.data.reader import TieredReader
from components.data.shards import decode_shard, sha256_bytes
from components.data.tokenizer import TextTokenizer
from fixtures.s3 import local_storage, prepare_small_dataset


def test_same_input_and_config_give_the_same_digest(small_dataset, tmp_path):
    first, _ = small_dataset
    again = prepare_small_dataset(local_storage(tmp_path / "elsewhere"))
    assert not again.reused
    assert again.manifest.dataset_digest == first.manifest.dataset_digest
    assert again.manifest.tokenizer_hash == first.manifest.tokenizer_hash
    # in the same cold tier the committed dataset is reused, not rewritten
    assert prepare_small_dataset(local_storage(tmp_path / "elsewhere")).reused
    changed = prepare_small_dataset(local_storage(tmp_path / "elsewhere"), seq_len=24)
    assert changed.manifest.dataset_digest != first.manifest.dataset_digest


def test_manifest_describes_every_shard_exactly(small_dataset):
    result, storage = small_dataset
    m = load_manifest(result.manifest.uri, storage)
    assert m.dataset_digest == result.manifest.dataset_digest and m.seq_len == 16
    assert len(m.shards("train")) > 10 and m.rows("val") > 0
    tok = TextTokenizer.load(m.tokenizer_uri, expected_hash=m.tokenizer_hash)
    assert tok.vocab_size == m.vocab_size == 400 and tok.eos_id == m.eos_id
    for split in ("train", "val"):
        for shard in m.shards(split):
            blob = open(m.shard_uri(shard), "rb").read()
            assert len(blob) == shard.bytes and sha256_bytes(blob) == shard.sha256
            rows = decode_shard(blob, m.row_len)
            assert rows.shape == (shard.rows, 17) and rows.max() < m.vocab_size
    # nothing half-written left behind, manifest present
    leftovers = [f for _, _, files in os.walk(m.root_uri) for f in files if ".tmp-" in f]
    assert leftovers == [] and os.path.exists(m.uri)
    outputs = result.outputs()
    assert outputs["digest"] == outputs["dataset_digest"] == m.dataset_digest
    assert all(isinstance(v, str) for v in outputs.values())


def test_packing_and_split_are_deterministic():
    rows = pack_rows([[5, 6, 7], [8, 9]], eos_id=1, row_len=3)
    assert rows.tolist() == [[5, 6, 7], [1, 8, 9]]  # the trailing EOS is the dropped remainder
    many = pack_rows([list(range(2, 300))], eos_id=1, row_len=4)
    a, b = (
        split_rows(many, 0.1, seed=3, chunk_index=0),
        split_rows(many, 0.1, seed=3, chunk_index=0),
    )
    assert (a["val"] == b["val"]).all() and len(a["val"]) == round(len(many) * 0.1)
    assert len(a["train"]) + len(a["val"]) == len(many)


def test_missing_manifest_bad_uri_tampering_and_tokenizer_mismatch(small_dataset, tmp_path):
    result, storage = small_dataset
    with pytest.raises(
        FileNotFoundError, match="no dataset manifest at .*nowhere.*run the prepare stage"
    ):
        load_manifest(str(tmp_path / "nowhere"), storage)
    with pytest.raises(ColdStorageError, match="bogus"):
        load_manifest("bogus://bucket/ds/manifest.json", storage)
    with pytest.raises(ValueError, match="manifest URI is empty"):
        load_manifest("", storage)
    data = json.loads(open(result.manifest.uri).read())
    data["splits"]["train"][0]["rows"] += 1
    bad = tmp_path / "tampered"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match its shard list"):
        load_manifest(str(bad), storage)
    with pytest.raises(
        ValueError, match="tokenizer hash mismatch.*" + result.manifest.tokenizer_hash[:12]
    ):
        TieredReader(
            result.manifest.uri,
            "train",
            storage,
            cache_dir=str(tmp_path / "w"),
            expected_tokenizer_hash="f" * 64,
        )


def test_files_source_reads_jsonl_text_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = " ".join(f"token{i % 50} value{i % 7}" for i in range(3000))
    (corpus / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": words[i : i + 900]}) for i in range(0, 9000, 900))
    )
    (corpus / "b.txt").write_text(words)
    pq.write_table(pa.table({"text": [words[:5000], words[5000:]]}), corpus / "c.parquet")
    result = prepare_small_dataset(
        local_storage(tmp_path),
        name="files",
        source="files",
        uri=str(corpus / "*"),
        val_fraction=0.2,
    )
    assert result.documents == 3 and result.manifest.rows("train") > 0
    with pytest.raises(FileNotFoundError, match="matched no files|nothing found"):
        prepare_small_dataset(local_storage(tmp_path), source="files", uri=str(corpus / "*.nope"))
    (corpus / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: expected an object with a 'text' field"):
        prepare_small_dataset(local_storage(tmp_path), source="files", uri=str(corpus / "d.jsonl"))
