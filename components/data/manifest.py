"""The dataset manifest: the one file that commits a prepared dataset in the cold tier.

Layout of a dataset directory (``<storage.cold_uri>/<data.name>-<key>/``)::

    tokenizer.json
    train/part-00000-0000.parquet ...     (see components.data.shards)
    val/part-00000-0000.parquet ...
    manifest.json                          (written last: its presence is the commit)

``dataset_digest`` is the sha256 of the canonical JSON of (format, tokenizer hash, seq_len and
every shard's name, rows and sha256), so the same input and config give the same digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from components.config.schema import StorageConfig
from components.data.cold import ColdStorageError, join, read_bytes, write_atomic

FORMAT = "moeops-shards/2"  # /2: flat int32 token column (see components.data.shards)
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # path relative to the dataset directory
    bytes: int
    rows: int
    sha256: str


@dataclass
class Manifest:
    root_uri: str  # the dataset directory
    dataset_digest: str
    tokenizer_hash: str
    tokenizer_uri: str
    vocab_size: int
    seq_len: int
    eos_id: int
    pad_id: int
    splits: dict[str, list[ShardInfo]]
    config: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def uri(self) -> str:
        return join(self.root_uri, MANIFEST_NAME)

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise KeyError(
                f"split {split!r} not in manifest {self.uri}; splits: {', '.join(self.splits)}"
            )
        return self.splits[split]

    def shard_uri(self, shard: ShardInfo) -> str:
        return join(self.root_uri, shard.name)

    def rows(self, split: str) -> int:
        return sum(s.rows for s in self.shards(split))

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("root_uri")
        data["tokenizer_uri"] = (
            "tokenizer.json"
            if self.tokenizer_uri == join(self.root_uri, "tokenizer.json")
            else self.tokenizer_uri
        )
        return json.dumps(data, indent=1, sort_keys=True)


def compute_digest(tokenizer_hash: str, seq_len: int, splits: dict[str, list[ShardInfo]]) -> str:
    canonical = {
        "format": FORMAT,
        "tokenizer_hash": tokenizer_hash,
        "seq_len": seq_len,
        "splits": {k: [[s.name, s.rows, s.sha256] for s in v] for k, v in sorted(splits.items())},
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def manifest_from_json(text: str, root_uri: str) -> Manifest:
    data = json.loads(text)
    if data.get("format") != FORMAT:
        raise ValueError(
            f"{join(root_uri, MANIFEST_NAME)}: format {data.get('format')!r}, expected {FORMAT!r}"
        )
    data["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in data["splits"].items()}
    tok = data["tokenizer_uri"]
    if "://" not in tok and not tok.startswith("/"):
        data["tokenizer_uri"] = join(root_uri, tok)
    manifest = Manifest(root_uri=root_uri, **data)
    expected = compute_digest(manifest.tokenizer_hash, manifest.seq_len, manifest.splits)
    if expected != manifest.dataset_digest:
        raise ValueError(
            f"{manifest.uri}: dataset_digest {manifest.dataset_digest} does not match its "
            f"shard list (expected {expected}); the manifest was modified or is corrupt"
        )
    return manifest


def load_manifest(uri: str, storage: StorageConfig | None = None) -> Manifest:
    """The manifest at ``uri`` (the ``manifest.json`` itself or its dataset directory)."""
    if not uri:
        raise ValueError("manifest URI is empty: pass the prepare stage's manifest_uri output")
    manifest_uri = uri if uri.rstrip("/").endswith(".json") else join(uri, MANIFEST_NAME)
    root_uri = manifest_uri.rsplit("/", 1)[0]
    try:
        text = read_bytes(manifest_uri, storage, what="dataset manifest").decode("utf-8")
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no dataset manifest at {manifest_uri!r} (run the prepare stage, or check "
            "storage.cold_uri)"
        ) from exc
    except ColdStorageError:
        raise
    try:
        return manifest_from_json(text, root_uri)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{manifest_uri}: not a valid dataset manifest ({exc})") from exc


def write_manifest(manifest: Manifest, storage: StorageConfig | None = None) -> str:
    write_atomic(manifest.uri, manifest.to_json().encode("utf-8"), storage)
    return manifest.uri
