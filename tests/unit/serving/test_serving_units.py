"""Serving pieces that need no Ray: Serve config file, schemas, error shape, text streaming, batched decoding."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from components.config import config_from_dict, load_config
from serving.deploy_config import IMPORT_PATH, serve_config
from serving.schemas import CompletionRequest, ScoreRequest
from serving.text_stream import TextStream


@pytest.fixture
def config(tmp_path):
    return load_config([f"paths.root={tmp_path}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                        "experiment=tiny"])


# --------------------------------------------------------------------------- Serve config file

def test_serve_config_is_a_valid_deterministic_serve_deploy_file(config):
    from ray.serve.schema import ServeDeploySchema

    first, second = serve_config(config), serve_config(config)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    ServeDeploySchema.model_validate(first)  # what `serve deploy` and a RayService accept
    app = first["applications"][0]
    assert app["import_path"] == IMPORT_PATH and app["name"] == config.serve.app_name
    assert first["http_options"] == {"host": "127.0.0.1", "port": config.serve.port}
    [deployment] = app["deployments"]
    assert deployment["num_replicas"] == 1 and "autoscaling_config" not in deployment
    assert deployment["ray_actor_options"] == {"num_cpus": config.serve.num_cpus, "num_gpus": 0.0}
    assert deployment["user_config"]["model_uri"] == "models:/moeops-moe@champion"
    assert deployment["user_config"]["max_batch_size"] == config.serve.max_batch_size
    # args are the plain config container: a replica rebuilds the typed config from them
    rebuilt = config_from_dict(app["args"])
    assert rebuilt.serve.model_uri == "models:/moeops-moe@champion"
    assert rebuilt.tracking.uri == config.tracking.uri


def test_serve_config_autoscaling_and_pinned_version(config, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    scaled = load_config([f"paths.root={tmp_path}", "experiment=tiny", "serve.autoscaling.enabled=true",
                          "serve.autoscaling.max_replicas=4", "serve.num_gpus=1", "serve.host=0.0.0.0"])
    file = serve_config(scaled, "models:/moeops-moe/3", revision="3")
    ServeDeploySchema.model_validate(file)
    [deployment] = file["applications"][0]["deployments"]
    assert "num_replicas" not in deployment
    assert deployment["autoscaling_config"]["max_replicas"] == 4
    assert deployment["ray_actor_options"]["num_gpus"] == 1.0
    assert deployment["user_config"]["model_uri"] == "models:/moeops-moe/3"
    assert deployment["user_config"]["revision"] == "3"
    with pytest.raises(ValueError, match="models:/"):
        serve_config(config, "s3://bucket/model")


def test_serve_config_rules_name_the_key(tmp_path):
    from components.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config([f"paths.root={tmp_path}", "experiment=tiny", "serve.max_ongoing_requests=2",
                     "serve.route_prefix=api", "serve.model_uri=runs:/x"])
    message = str(err.value)
    for key in ("serve.max_ongoing_requests", "serve.route_prefix", "serve.model_uri"):
        assert key in message


# --------------------------------------------------------------------------- request schemas

def test_completion_request_is_strict_and_forbids_unknown_fields():
    ok = CompletionRequest.model_validate({"prompt": ["a", "b"], "max_tokens": 3, "stop": "x", "seed": 1})
    assert ok.prompts == ["a", "b"] and ok.stop == ["x"]
    assert CompletionRequest.model_validate({"prompt": "a", "temperature": 1}).temperature == 1.0
    for bad, field in [({"prompt": "a", "max_tokens": "3"}, "max_tokens"), ({"prompt": "a", "bogus": 1}, "bogus"),
                       ({"prompt": ""}, "prompt"), ({"prompt": "a", "top_p": 1.5}, "top_p"),
                       ({"prompt": "\ud800"}, "prompt"), ({"prompt": "a", "stop": [""]}, "stop")]:
        with pytest.raises(ValidationError) as err:
            CompletionRequest.model_validate(bad)
        assert err.value.errors()[0]["loc"][0] == field
    with pytest.raises(ValidationError):
        ScoreRequest.model_validate({"text": "  "})


def test_validation_errors_become_openai_errors_naming_the_field():
    from fastapi.exceptions import RequestValidationError

    from serving.errors import validation_error

    def convert(body: dict):
        try:
            CompletionRequest.model_validate(body)
        except ValidationError as err:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in err.errors()]
            return validation_error(RequestValidationError(errors))
        raise AssertionError("expected a validation error")

    typo = convert({"promt": "x"})  # unknown field reported before the missing one
    assert (typo.status, typo.param, typo.code) == (400, "promt", "unknown_field")
    nested = convert({"prompt": ["ok", ""]})
    assert nested.param == "prompt" and "item 1" in nested.message
    wrong = convert({"prompt": "x", "max_tokens": 0})
    assert wrong.param == "max_tokens" and "max_tokens" in wrong.message


# --------------------------------------------------------------------------- text streaming

class CharTokenizer:
    """One token per character: makes stop-sequence boundaries easy to place."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def feed(stream: TextStream, text: str) -> list[str]:
    deltas = [stream.push(ord(ch)) for ch in text]
    if not stream.stopped:
        deltas.append(stream.flush())
    return deltas


def test_stop_sequence_spanning_tokens_is_never_emitted():
    stream = TextStream(CharTokenizer(), stop=["END"])
    deltas = feed(stream, "abcENxENDzz")
    assert "".join(deltas) == "abcENx" and stream.stopped
    assert all("END" not in d for d in deltas)


def test_text_is_released_as_soon_as_it_cannot_start_a_stop():
    stream = TextStream(CharTokenizer(), stop=["\n\n"])
    assert stream.push(ord("a")) == ""  # held: it might be followed by the rest of a stop sequence
    assert stream.push(ord("b")) == "a"
    assert "".join(feed(stream, "c")) == "bc"
    plain = TextStream(CharTokenizer())
    assert [plain.push(ord(c)) for c in "hi"] == ["h", "i"]


# --------------------------------------------------------------------------- batched decoding

@pytest.fixture(scope="module")
def engine():
    from components.data.tokenizer import TextTokenizer
    from components.model.transformer import Transformer
    from serving.generation import Engine

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:10]]
    tokenizer = TextTokenizer.train(texts, vocab_size=400)
    cfg = load_config(["experiment=tiny", "model.dim=32", "model.n_layers=1"]).model
    torch.manual_seed(0)
    return Engine(SimpleNamespace(model=Transformer(cfg, tokenizer.vocab_size), tokenizer=tokenizer))


def run_all(decoding) -> list[tuple[str, str, int]]:
    texts = [""] * len(decoding.seqs)
    last = [None] * len(decoding.seqs)
    while not decoding.done:
        for i, out in enumerate(decoding.step()):
            if out is not None:
                texts[i] += out.text
                last[i] = out
    return [(t, o.finish_reason, o.completion_tokens) for t, o in zip(texts, last)]


def test_seeded_sequence_decodes_the_same_alone_and_in_a_mixed_batch(engine):
    from serving.generation import SamplingParams

    target = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=42)
    alone = engine.generate("def handler(event):", target)
    mixed = engine.start(
        [engine.encode("x"), engine.encode("def handler(event):"), engine.encode("import os, sys\nclass A:")],
        [SamplingParams(max_tokens=3, temperature=0.0), target, SamplingParams(max_tokens=20, seed=1)])
    results = run_all(mixed)
    assert results[1] == alone
    assert results[0][1] == "length" and results[0][2] == 3
    assert engine.generate("def handler(event):", SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9,
                                                                 seed=43)) != alone


def test_context_overflow_and_int8_engine(engine):
    from serving.generation import Engine, SamplingParams

    with pytest.raises(ValueError, match="context"):
        engine.start([[1] * 120], [SamplingParams(max_tokens=20)])
    quantized = Engine(SimpleNamespace(model=engine.model, tokenizer=engine.tokenizer), quantize="int8")
    text, reason, tokens = quantized.generate("import ", SamplingParams(max_tokens=5, temperature=0.0))
    assert reason in ("stop", "length") and 1 <= tokens <= 5
    fp32 = engine.score(engine.encode("def main():\n    return 0\n"))
    int8 = quantized.score(engine.encode("def main():\n    return 0\n"))
    assert abs(int8.perplexity - fp32.perplexity) / fp32.perplexity < 0.2


def test_build_app_takes_a_config_container_or_cli_overrides(config, tmp_path):
    from ray.serve import Application

    from serving.app import build_app, code_version
    from serving.deploy_config import app_args

    assert isinstance(build_app(app_args(config)), Application)
    from_cli = build_app({"experiment": "tiny", "tracking.uri": f"sqlite:///{tmp_path / 'x.db'}",
                          "serve.model_uri": "models:/m/2"})
    assert isinstance(from_cli, Application)
    assert len(code_version()) == 16 and code_version() == code_version()
