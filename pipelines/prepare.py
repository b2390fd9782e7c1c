"""The ``prepare`` stage: corpus -> tokenizer -> packed zstd Parquet shards + manifest (cold tier).

    python -m pipelines.prepare                              # data=stdlib, storage=local
    python -m pipelines.prepare experiment=tiny storage=s3   # cold tier in S3

The work itself is :func:`components.data.build.prepare_dataset`; this module fans its chunks out
as Ray tasks and records the result in MLflow: the tokenizer and manifest as artifacts and the
dataset as a run input carrying its digest (lineage data -> model -> deployment).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from components.config import Config
from components.data.build import PrepareResult, prepare_dataset
from components.data.cold import credential_env, read_bytes
from components.tracking.datasets import log_dataset_input
from components.tracking.stages import StageContext, StageSpec
from pipelines._cli import stage_main
from pipelines.outputs import PrepareOutputs

_SECTIONS = ("data", "storage")  # typed config sections in a job's kwargs


def ray_map(
    parallelism: int, on_done: Callable[[], None], env: dict[str, str] | None = None
) -> Callable[[Callable[..., Any], Sequence[dict]], list]:
    """A ``map_fn`` for prepare_dataset: at most ``parallelism`` Ray tasks in flight, results in
    order.

    ``env``: variables the tasks need (the cold tier's credentials), passed in their runtime env
    rather than in arguments or config.
    """
    import ray

    def map_fn(fn: Callable[..., Any], kwargs_list: Sequence[dict]) -> list:
        options: dict[str, Any] = {"num_cpus": 1, "max_retries": 2}
        if env:
            options["runtime_env"] = {"env_vars": dict(env)}
        remote_fn = ray.remote(**options)(fn)
        # the tokenizer and the typed config sections are shared by every task: ship them through
        # the object store once (dataclasses pickle as they are)
        shared = {}
        if kwargs_list:
            first = kwargs_list[0]
            shared = {
                key: ray.put(first[key]) for key in ("tokenizer_json", *_SECTIONS) if key in first
            }
        refs: list = [None] * len(kwargs_list)
        pending: dict = {}
        results: list = [None] * len(kwargs_list)
        next_job = 0
        while next_job < len(kwargs_list) or pending:
            while next_job < len(kwargs_list) and len(pending) < max(1, parallelism):
                refs[next_job] = remote_fn.remote(**{**kwargs_list[next_job], **shared})
                pending[refs[next_job]] = next_job
                next_job += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
                on_done()
        return results

    return map_fn


def outputs_of(result: PrepareResult) -> PrepareOutputs:
    m = result.manifest
    return PrepareOutputs(
        manifest_uri=m.uri,
        dataset_digest=m.dataset_digest,
        tokenizer_uri=m.tokenizer_uri,
        tokenizer_hash=m.tokenizer_hash,
        vocab_size=m.vocab_size,
        seq_len=m.seq_len,
        train_rows=m.rows("train"),
        val_rows=m.rows("val"),
    )


def run(ctx: StageContext) -> PrepareOutputs:
    from pipelines.runtime import ensure_ray

    config = ctx.config
    ensure_ray(config)
    started = time.perf_counter()
    progress = ctx.progress(1, unit="chunk")

    def chunk_done() -> None:
        progress.update(1)

    def map_fn(fn, kwargs_list):
        progress.total = max(len(kwargs_list), 1)
        return ray_map(config.data.prepare_parallelism, chunk_done, credential_env(storage))(
            fn, kwargs_list
        )

    storage = config.storage
    result = prepare_dataset(config.data, storage, map_fn=map_fn)
    m = result.manifest
    if result.reused:
        progress.set(progress.total)
        print(
            f"[prepare] reusing committed dataset {m.root_uri} (digest {m.dataset_digest[:12]})",
            flush=True,
        )

    tokenizer_file = ctx.work_dir / "tokenizer.json"
    tokenizer_file.write_bytes(read_bytes(m.tokenizer_uri, storage, what="tokenizer.json"))
    manifest_file = ctx.work_dir / "manifest.json"
    manifest_file.write_text(m.to_json())
    ctx.log_artifact(tokenizer_file, "tokenizer")
    ctx.log_artifact(manifest_file, "dataset")
    outputs = outputs_of(result)
    log_dataset_input(
        ctx.client, ctx.run_id, outputs.dataset(config.data.name), m.dataset_digest, "training"
    )
    ctx.set_tags(
        {"moeops.dataset_digest": m.dataset_digest, "moeops.tokenizer_hash": m.tokenizer_hash}
    )
    ctx.log_metrics(
        {
            "prepare_s": time.perf_counter() - started,
            "documents": float(result.documents),
            "train_rows": float(m.rows("train")),
            "val_rows": float(m.rows("val")),
            "train_shards": float(len(m.shards("train"))),
            "val_shards": float(len(m.shards("val"))),
            "dataset_bytes": float(sum(s.bytes for split in m.splits.values() for s in split)),
            "reused": float(result.reused),
        }
    )
    print(
        f"[prepare] {m.rows('train')} train / {m.rows('val')} val rows of {m.seq_len + 1} tokens, "
        f"vocab {m.vocab_size}, digest {m.dataset_digest[:12]} -> {m.uri}",
        flush=True,
    )
    print(json.dumps({"corpus": m.corpus}), flush=True)
    return outputs


def manifest_still_there(config: Config, outputs: PrepareOutputs) -> bool:
    """A cached prepare run is reusable only while its manifest is still in the cold tier."""
    from components.data.cold import exists

    try:
        return exists(outputs.manifest_uri, config.storage)
    except Exception:
        return False


SPEC = StageSpec(
    name="prepare",
    config_keys=("data", "storage.cold_uri"),
    upstream=(),
    fn=run,
    outputs=PrepareOutputs,
    still_valid=manifest_still_there,
)
main = stage_main(SPEC)

if __name__ == "__main__":
    main()
