"""Where the text comes from: the interpreter's standard library, or files at an fsspec URI/glob.

A corpus is a deterministic list of :class:`DocFile` (sorted, then a seeded shuffle, then the
``max_files`` / ``max_bytes`` caps) so the same config always selects the same bytes.  Each file
yields one or more documents: a text file is one document, a JSONL file one per line
(``text_field``), a Parquet file one per row of the ``text_field`` column.
"""

from __future__ import annotations

import io
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

from components.config.schema import DataConfig, StorageConfig
from components.data.cold import ColdStorageError, filesystem_for, split_protocol, with_retries

# Stdlib subtrees that are not representative prose/code (test fixtures with odd encodings,
# vendored packages) or not part of the stdlib at all.
_STDLIB_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "lib2to3",
    "ensurepip",
    "config-3",
}


@dataclass(frozen=True)
class DocFile:
    uri: str  # local path or fsspec URI
    size: int  # bytes on storage


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_stdlib(max_files: int, max_bytes: int, seed: int) -> list[DocFile]:
    root = stdlib_dir()
    found: list[DocFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")
        )
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                found.append(DocFile(path, os.path.getsize(path)))
    if not found:
        raise FileNotFoundError(f"no .py files under the standard library directory {root}")
    return _select(sorted(found, key=lambda d: d.uri), max_files, max_bytes, seed)


def list_files(
    uri: str, storage: StorageConfig | None, max_files: int, max_bytes: int, seed: int
) -> list[DocFile]:
    """Files matching ``uri`` (a file, a directory or a glob) at any fsspec location."""
    if not uri:
        raise ValueError(
            "data.uri is empty: data.source='files' needs a file, directory or glob URI"
        )
    fs, path = filesystem_for(uri, storage)
    protocol, _ = split_protocol(uri)

    def listing() -> dict[str, dict]:
        if any(ch in path for ch in "*?["):
            return fs.glob(path, detail=True)
        if fs.isdir(path):
            return fs.find(path, detail=True)
        return {path: fs.info(path)}

    try:
        entries = with_retries(listing, what="corpus listing", uri=uri, storage=storage)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"data.uri={uri!r}: nothing found there") from exc
    files = []
    for p, info in sorted(entries.items()):
        if info.get("type", "file") != "file":
            continue
        full = p if protocol == "file" else f"{protocol}://{p}"
        files.append(DocFile(full, int(info.get("size") or 0)))
    if not files:
        raise FileNotFoundError(f"data.uri={uri!r}: matched no files")
    return _select(files, max_files, max_bytes, seed)


def _select(files: list[DocFile], max_files: int, max_bytes: int, seed: int) -> list[DocFile]:
    """Seeded shuffle of the sorted list, then take files while both caps hold."""
    order = list(files)
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for doc in order:
        if len(chosen) >= max_files:
            break
        if chosen and total + doc.size > max_bytes:
            continue
        chosen.append(doc)
        total += doc.size
    return chosen


def list_corpus(data: DataConfig, storage: StorageConfig | None) -> list[DocFile]:
    """The corpus of the ``data`` config section."""
    if data.source == "stdlib":
        return list_stdlib(data.max_files, data.max_bytes, data.seed)
    if data.source == "files":
        return list_files(data.uri, storage, data.max_files, data.max_bytes, data.seed)
    raise ValueError(f"data.source={data.source!r}: must be 'stdlib' or 'files'")


def read_documents(
    doc: DocFile, storage: StorageConfig | None = None, text_field: str = "text"
) -> Iterator[str]:
    """The documents in one file (see the module doc for the formats)."""
    name = doc.uri.lower()
    if "://" in doc.uri:
        from components.data.cold import read_bytes

        raw = read_bytes(doc.uri, storage, what=f"corpus file {doc.uri}")
    else:
        with open(doc.uri, "rb") as f:
            raw = f.read()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(raw), columns=[text_field])
        for value in table.column(text_field).to_pylist():
            if value:
                yield str(value)
    elif name.endswith((".jsonl", ".ndjson")):
        for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{doc.uri}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(
                    f"{doc.uri}:{lineno}: expected an object with a {text_field!r} field"
                )
            if record[text_field]:
                yield str(record[text_field])
    else:
        text = raw.decode("utf-8", errors="replace")
        if text:
            yield text


def iter_texts(
    docs: list[DocFile],
    storage: StorageConfig | None = None,
    text_field: str = "text",
    max_bytes: int | None = None,
) -> Iterator[str]:
    """All documents of ``docs`` in order, stopping after ``max_bytes`` of text (tokenizer
    sample)."""
    seen = 0
    for doc in docs:
        for text in read_documents(doc, storage, text_field):
            yield text
            seen += len(text)
            if max_bytes is not None and seen >= max_bytes:
                return


__all__ = [
    "ColdStorageError",
    "DocFile",
    "iter_texts",
    "list_corpus",
    "read_documents",
    "stdlib_dir",
]
