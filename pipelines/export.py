"""Export a registered version to the Hugging Face layout (transformers, vLLM, SGLang load it).

    python -m pipelines.export models:/moeops-moe@champion out/        # alias
    python -m pipelines.export models:/moeops-moe/3 out/               # version
    python -m pipelines.export models:/moeops-moe@champion out/ --tracking-uri http://mlflow:5000

The output directory holds config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json (with the chat template) and special_tokens_map.json:
``transformers.AutoModelForCausalLM.from_pretrained("out/")`` loads it without moeops, and
``vllm serve out/`` serves it. A model option with no exact Hugging Face architecture is refused
with its name (exit status 2). Not a pipeline stage: no MLflow run, no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

from components.config.compose import default_tracking_uri
from components.model.hf_export import HFExportError
from components.tracking.hf_artifact import export_registered_hf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.export",
        description="Write a registered moeops model as a Hugging Face model directory.",
    )
    parser.add_argument(
        "model_uri", help="models:/<name>@<alias> or models:/<name>/<version> in the registry"
    )
    parser.add_argument("out_dir", help="the directory to write (must not exist or be empty)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        out, info = export_registered_hf(args.model_uri, tracking_uri, args.out_dir)
    except (HFExportError, LookupError, ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"[export] {args.model_uri} = {info.model_uri} -> {out} ({architecture})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
