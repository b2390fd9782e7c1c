"""Register small randomly initialised models for serving smoke tests, demos and the benchmark.

    python -m serving.tiny_model experiment=tiny   # registers v1 (champion) and v2 (challenger)

Real artifacts through the real path: a BPE tokenizer trained on a few KB of Python
source, ``save_export``, and ``log_and_register`` into the configured MLflow registry.
The weights are random (seeded), so the text is gibberish but deterministic.
"""

from __future__ import annotations

import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
from mlflow import MlflowClient

from components.config import Config
from components.data.tokenizer import TextTokenizer
from components.model.export import save_export
from components.model.transformer import Transformer
from components.tracking import mlflow_utils
from components.tracking.registry import Registration, log_and_register

CORPUS_BYTES = 48_000


def _corpus() -> list[str]:
    """A few KB of the running interpreter's standard library: present on every machine."""
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        size += len(text)
        if size >= CORPUS_BYTES:
            break
    return texts


def register_tiny_models(
    config: Config, versions: int = 2, work_dir: str | Path | None = None, vocab_size: int = 512
) -> list[Registration]:
    """Register ``versions`` seeded random models; v1 becomes champion, later ones challengers.

    Later versions get a worse ``val_loss`` so the gate refuses them: the champion stays v1
    and the challenger alias points at the newest, which is what canary tests want.
    """
    work = Path(work_dir or tempfile.mkdtemp(prefix="moeops-tiny-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_path = TextTokenizer.train(_corpus(), vocab_size=vocab_size).save(
        str(work / "tokenizer.json")
    )
    vocab = TextTokenizer.load(tokenizer_path).vocab_size
    client = MlflowClient(config.tracking.uri)
    experiment_id = mlflow_utils.ensure_experiment(
        client, config.tracking.experiment, config.tracking.artifact_location
    )
    registrations = []
    for i in range(versions):
        torch.manual_seed(1000 + i)
        model = Transformer(config.model, vocab).eval()
        export_dir = save_export(
            model.state_dict(), config.model, vocab, tokenizer_path, work / f"export-{i}"
        )
        run_id = client.create_run(experiment_id, run_name=f"tiny-model-{i}").info.run_id
        registrations.append(
            log_and_register(
                export_dir,
                run_id=run_id,
                tracking_uri=config.tracking.uri,
                registry=config.registry,
                metrics={config.registry.metric: 5.0 + i},
                tags={"moeops.source": "serving.tiny_model"},
            )
        )
        client.set_terminated(run_id)
    return registrations


def main(argv: list[str]) -> None:
    from components.config import load_config

    config = load_config(argv)
    for reg in register_tiny_models(config):
        print(f"registered {reg.model_uri} aliases={reg.aliases}")


if __name__ == "__main__":
    main(sys.argv[1:])
