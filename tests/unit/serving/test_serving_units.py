"""Serving pieces that need no Ray: Serve config file, request schemas, error shape, text
streaming."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from pydantic import ValidationError

from components.config import config_from_dict, load_config
from serving.deploy.config import IMPORT_PATH, serve_config
from serving.schemas import CompletionRequest, ScoreRequest
from serving.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    from components.data.tokenizer import TextTokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return TextTokenizer.train(
        [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:10]], vocab_size=400
    )


@pytest.fixture
def config(tmp_path):
    return load_config(
        [
            f"paths.root={tmp_path}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment=tiny",
        ]
    )


def config_dict_section(config, section: str) -> dict:
    from components.config import to_container

    return to_container(config)[section]


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
    assert deployment["user_config"]["serve"]["model_uri"] == "models:/moeops-moe@champion"
    assert deployment["user_config"]["serve"]["max_num_seqs"] == config.serve.max_num_seqs
    assert deployment["user_config"]["registry"] == config_dict_section(config, "registry")
    assert deployment["max_surge_percent"] == config.serve.max_surge_percent
    # args are the plain config container: a replica rebuilds the typed config from them
    rebuilt = config_from_dict(app["args"])
    assert rebuilt.serve.model_uri == "models:/moeops-moe@champion"
    assert rebuilt.tracking.uri == config.tracking.uri


def test_serve_config_autoscaling_and_pinned_version(config, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from components.config import ConfigError, with_overrides

    scaled = load_config(
        [
            f"paths.root={tmp_path}",
            "experiment=tiny",
            "serve.autoscaling.enabled=true",
            "serve.autoscaling.max_replicas=4",
            "serve.num_gpus=1",
            "serve.host=0.0.0.0",
        ]
    )
    file = serve_config(scaled, "models:/moeops-moe/3", revision="3")
    ServeDeploySchema.model_validate(file)
    [deployment] = file["applications"][0]["deployments"]
    assert "num_replicas" not in deployment
    assert deployment["autoscaling_config"]["max_replicas"] == 4
    assert (
        deployment["autoscaling_config"]["upscale_delay_s"]
        == scaled.serve.autoscaling.upscale_delay_s
    )
    assert deployment["ray_actor_options"]["num_gpus"] == 1.0
    # Ray's default push interval is not sent (the field is deprecated in Ray 2.60); a changed one
    # is
    assert "metrics_interval_s" not in deployment["autoscaling_config"]
    fast = with_overrides(
        scaled,
        {"serve.autoscaling.metrics_interval_s": 0.5, "serve.autoscaling.look_back_period_s": 2.0},
    )
    assert (
        serve_config(fast)["applications"][0]["deployments"][0]["autoscaling_config"][
            "metrics_interval_s"
        ]
        == 0.5
    )
    with pytest.raises(ConfigError, match="serve.autoscaling.look_back_period_s"):
        with_overrides(scaled, {"serve.autoscaling.metrics_interval_s": 40.0})
    assert deployment["user_config"]["serve"]["model_uri"] == "models:/moeops-moe/3"
    assert deployment["user_config"]["revision"] == "3"
    with pytest.raises(ValueError, match="models:/"):
        serve_config(config, "s3://bucket/model")


def test_serve_config_rules_name_the_key(tmp_path):
    from components.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(
            [
                f"paths.root={tmp_path}",
                "experiment=tiny",
                "serve.max_ongoing_requests=2",
                "serve.route_prefix=api",
                "serve.model_uri=runs:/x",
                "serve.max_n=0",
                "serve.max_num_batched_tokens=8",
                "serve.max_surge_percent=150",
            ]
        )
    message = str(err.value)
    for key in (
        "serve.max_ongoing_requests",
        "serve.route_prefix",
        "serve.model_uri",
        "serve.max_n",
        "serve.max_num_batched_tokens",
        "serve.max_surge_percent",
    ):
        assert key in message


# --------------------------------------------------------------------------- request schemas


def test_completion_request_is_strict_and_forbids_unknown_fields():
    ok = CompletionRequest.model_validate(
        {"prompt": ["a", "b"], "max_tokens": 3, "stop": "x", "seed": 1}
    )
    assert ok.prompts == ["a", "b"] and ok.stop == ["x"]
    assert CompletionRequest.model_validate({"prompt": "a", "temperature": 1}).temperature == 1.0
    for bad, field in [
        ({"prompt": "a", "max_tokens": "3"}, "max_tokens"),
        ({"prompt": "a", "bogus": 1}, "bogus"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": "a", "stop": [""]}, "stop"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": "a", "suffix": "b"}, "suffix"),
        ({"prompt": "a", "n": 2, "best_of": 1}, "best_of"),
        ({"prompt": "a", "stream": True, "n": 1, "best_of": 2}, "best_of"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "a", "frequency_penalty": 2.5}, "frequency_penalty"),
    ]:
        with pytest.raises(ValidationError) as err:
            CompletionRequest.model_validate(bad)
        assert err.value.errors()[0]["loc"][0] == field, (bad, err.value.errors())
    with pytest.raises(ValidationError):
        ScoreRequest.model_validate({"text": "  "})


def test_null_means_default_and_every_prompt_shape_parses():
    """What LangChain and other clients send: explicit nulls and neutral values."""
    nulls = {
        key: None
        for key in (
            "model",
            "max_tokens",
            "temperature",
            "top_p",
            "n",
            "stream",
            "logprobs",
            "echo",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "best_of",
            "logit_bias",
            "user",
            "seed",
            "suffix",
            "stream_options",
            "top_k",
            "min_p",
        )
    }
    parsed = CompletionRequest.model_validate({"prompt": "a", **nulls})
    assert parsed.prompts == ["a"] and parsed.stops == []
    neutral = CompletionRequest.model_validate(
        {
            "prompt": "a",
            "frequency_penalty": 0,
            "presence_penalty": 0,
            "n": 1,
            "logit_bias": {},
            "best_of": 1,
            "echo": False,
            "logprobs": 0,
        }
    )
    assert neutral.logit_bias == {} and neutral.n == 1
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompts == [[1, 2, 3]]
    assert CompletionRequest.model_validate({"prompt": [[1, 2], [3]]}).prompts == [[1, 2], [3]]
    assert (
        CompletionRequest.model_validate({"prompt": "a", "max_tokens": 0, "echo": True}).max_tokens
        == 0
    )


def test_chat_request_fields():
    from serving.schemas import ChatCompletionRequest

    ok = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": "be terse"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
                },
                {"role": "assistant", "content": None},
            ],
            "model": None,
            "max_completion_tokens": 5,
            "logprobs": True,
            "top_logprobs": 2,
            "tools": None,
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "metadata": {"k": "v"},
            "store": False,
        }
    )
    assert ok.requested_max_tokens == 5 and ok.messages[1].text == "hi there"
    for bad, field in [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ]:
        with pytest.raises(ValidationError) as err:
            ChatCompletionRequest.model_validate(bad)
        assert err.value.errors()[0]["loc"][0] == field, (bad, err.value.errors())


def test_chat_template_renders_turns_and_ends_with_the_assistant_header():
    from serving import chat_template
    from serving.schemas import ChatMessage

    messages = [
        ChatMessage(role="developer", content="terse"),
        ChatMessage(role="user", content="add(1, 2)?"),
    ]
    assert (
        chat_template.render(messages)
        == "### System:\nterse\n\n### User:\nadd(1, 2)?\n\n### Assistant:\n"
    )
    continued = [*messages, ChatMessage(role="assistant", content="It is")]
    assert chat_template.render(continued).endswith("### Assistant:\nIt is")


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
    wrong = convert({"prompt": "x", "max_tokens": -1})
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


def test_stop_sequence_kept_with_include_stop_and_reported():
    stream = TextStream(CharTokenizer(), stop=["END", "\n"], include_stop=True)
    assert "".join(feed(stream, "abENDx")) == "abEND" and stream.stop_hit == "END"


def test_byte_table_detokenizer_matches_full_decode(tokenizer):
    import random

    from serving.text_stream import token_bytes_table

    table = token_bytes_table(tokenizer)
    rng = random.Random(0)
    for _ in range(200):  # random ids: broken UTF-8, special tokens, multi-byte characters
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 30))]
        stream = TextStream(tokenizer, table=table)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == tokenizer.decode(ids)
    text = "héllo ✓ 日本 \U0001f600 def main():"
    stream = TextStream(tokenizer, stop=["main"], table=table)
    assert (
        "".join(stream.push(i) for i in tokenizer.encode(text)) + stream.flush()
        == "héllo ✓ 日本 \U0001f600 def "
    )


def test_text_is_released_as_soon_as_it_cannot_start_a_stop():
    stream = TextStream(CharTokenizer(), stop=["\n\n"])
    assert stream.push(ord("a")) == ""  # held: it might be followed by the rest of a stop sequence
    assert stream.push(ord("b")) == "a"
    assert "".join(feed(stream, "c")) == "bc"
    plain = TextStream(CharTokenizer())
    assert [plain.push(ord(c)) for c in "hi"] == ["h", "i"]


def test_build_app_takes_a_config_container_or_cli_overrides(config, tmp_path):
    from ray.serve import Application

    from serving.app import build_app
    from serving.deploy.config import app_args

    assert isinstance(build_app(app_args(config)), Application)
    from_cli = build_app(
        {
            "experiment": "tiny",
            "tracking.uri": f"sqlite:///{tmp_path / 'x.db'}",
            "serve.model_uri": "models:/m/2",
        }
    )
    assert isinstance(from_cli, Application)


def test_benchmark_and_deployment_drive_the_same_replica_class():
    """bench_serve.py times the request path of serving.replica.Replica, the class the Serve
    deployment wraps: neither re-implements the replica."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]

    def constructs_replica(path: Path) -> bool:
        tree = ast.parse(path.read_text())
        imported = any(
            isinstance(node, ast.ImportFrom)
            and node.module == "serving.replica"
            and any(alias.name == "Replica" for alias in node.names)
            for node in ast.walk(tree)
        )
        called = any(
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "Replica"
            for node in ast.walk(tree)
        )
        return imported and called

    assert constructs_replica(root / "serving" / "app.py")
    assert constructs_replica(root / "tests" / "benchmarks" / "bench_serve.py")


def test_user_config_round_trips_to_the_typed_config_and_its_digest(config):
    """What a replica rebuilds from Serve's user_config equals the config it came from, and the
    digest /readyz reports is the deployer's, also after a JSON round trip (Serve's REST path)."""
    import json

    from components.config import with_overrides
    from serving.deploy.config import user_config
    from serving.engine import EngineSettings
    from serving.replica import settings_digest, with_user_config

    changed = with_overrides(config, {"serve.max_num_seqs": 3, "serve.canary_fraction": 0.25})
    sent = user_config(changed, "models:/m/2", revision="7")
    rebuilt = with_user_config(config, json.loads(json.dumps(sent)))
    assert rebuilt.serve.max_num_seqs == 3 and rebuilt.serve.canary_fraction == 0.25
    assert rebuilt.serve.model_uri == "models:/m/2"
    assert EngineSettings.from_serve(rebuilt.serve) == EngineSettings(
        3, changed.serve.max_num_batched_tokens
    )
    assert settings_digest(json.loads(json.dumps(sent))) == settings_digest(sent)
    assert settings_digest(user_config(config)) != settings_digest(sent)
