"""Continuous batching without Ray: the slot KV cache, the engine's iteration, the engine loop's
queue."""

from __future__ import annotations

import asyncio
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from components.config import load_config
from components.model.layers import SeqPositions
from components.model.sampling import SamplingParams
from components.model.transformer import Transformer
from serving.engine import Engine, EngineSettings, GenerationParams


@pytest.fixture(scope="module")
def tokenizer():
    from components.data.tokenizer import TextTokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return TextTokenizer.train(
        [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:10]], vocab_size=400
    )


@pytest.fixture(scope="module")
def config():
    return load_config(
        [
            "experiment=tiny",
            "model.dim=32",
            "model.n_layers=2",
            "model.max_seq_len=64",
            "serve.max_num_seqs=4",
            "serve.max_prompt_tokens=32",
            "serve.max_tokens=24",
            "serve.max_num_batched_tokens=32",
        ]
    )


@pytest.fixture(scope="module")
def model(config, tokenizer):
    torch.manual_seed(0)
    return Transformer(config.model, tokenizer.vocab_size).eval()


@pytest.fixture
def engine(model, tokenizer, config):
    return Engine(model, tokenizer, EngineSettings.from_serve(config.serve), label="m/1")


def text_of(outputs) -> tuple[str, str, int]:
    return (
        "".join(o.text for o in outputs),
        outputs[-1].finish_reason,
        outputs[-1].completion_tokens,
    )


def generate(engine: Engine, prompt: str, params: GenerationParams) -> tuple[str, str, int]:
    """One prompt alone on the engine: (text, finish reason, completion tokens)."""
    [outputs] = engine.run_to_completion([engine.sequence(engine.encode(prompt), params)])
    return text_of(outputs)


def test_slot_cache_decodes_ragged_rows_like_full_forwards(model):
    """Rows at different lengths in one forward, a prompt joining decoding rows, a slot moved into a
    hole."""
    torch.manual_seed(1)
    seqs = [torch.randint(0, 300, (n,)).tolist() for n in (5, 9, 3)]
    with torch.inference_mode():
        full = [model(torch.tensor([s]))[0][0] for s in seqs]  # [T, V] each
        cache = model.new_cache(4, max_len=64)
        prompt = torch.zeros(2, 6, dtype=torch.long)
        prompt[0, :3], prompt[1, :6] = torch.tensor(seqs[0][:3]), torch.tensor(seqs[1][:6])
        logits, _ = model(prompt, cache, SeqPositions.build([0, 0], [3, 6]), last_only=True)
        assert torch.allclose(logits[0, 0], full[0][2], atol=1e-5) and torch.allclose(
            logits[1, 0], full[1][5], atol=1e-5
        )
        joined = torch.zeros(3, 3, dtype=torch.long)
        joined[0, 0], joined[1, 0], joined[2, :3] = seqs[0][3], seqs[1][6], torch.tensor(seqs[2])
        logits, _ = model(joined, cache, SeqPositions.build([3, 6, 0], [1, 1, 3]), last_only=True)
        for row, (seq, pos) in enumerate([(0, 3), (1, 6), (2, 2)]):
            assert torch.allclose(logits[row, 0], full[seq][pos], atol=1e-5)
        cache.copy_slot(2, 0, 3)  # sequence 0 finished: sequence 2 moves into its slot
        step, _ = model(
            torch.tensor([[7], [seqs[1][7]]]),
            cache,
            SeqPositions.build([3, 7], [1, 1]),
            last_only=True,
        )
        alone = model(torch.tensor([seqs[2] + [7]]))[0][0, -1]
        assert torch.allclose(step[0, 0], alone, atol=1e-5) and torch.allclose(
            step[1, 0], full[1][7], atol=1e-5
        )


def test_seeded_sequences_decode_the_same_alone_and_batched_with_others(engine):
    target = GenerationParams(
        max_tokens=12, sampling=SamplingParams(temperature=0.9, top_p=0.9), seed=42
    )
    alone = generate(engine, "def handler(event):", target)
    # different prompt lengths, max_tokens and sampling settings, and more sequences than slots:
    # the target joins while others decode, and others join after it
    greedy3 = GenerationParams(max_tokens=3, sampling=SamplingParams(0.0))
    greedy_alone = generate(engine, "x", greedy3)
    others = [
        engine.sequence(engine.encode("x"), greedy3),
        engine.sequence(
            engine.encode("import os, sys\nclass A:"), GenerationParams(max_tokens=20, seed=1)
        ),
        engine.sequence(engine.encode("for i in"), GenerationParams(max_tokens=7, seed=2)),
        engine.sequence(engine.encode("while"), GenerationParams(max_tokens=5, seed=3)),
    ]
    first = engine.sequence(engine.encode("y ="), GenerationParams(max_tokens=2, seed=4))
    seq = engine.sequence(engine.encode("def handler(event):"), target)
    results = engine.run_to_completion([first, *others, seq])
    assert text_of(results[-1]) == alone
    # the greedy sequence that ran beside the others decodes as it does alone, and its finish
    # reason matches its length: "length" at exactly max_tokens, "stop" (EOS) before it
    assert text_of(results[1]) == greedy_alone
    _, reason, tokens = greedy_alone
    assert (reason, tokens) == ("length", 3) or (reason == "stop" and tokens < 3)
    assert (
        generate(
            engine,
            "def handler(event):",
            GenerationParams(
                max_tokens=12, seed=43, sampling=SamplingParams(temperature=0.9, top_p=0.9)
            ),
        )
        != alone
    )
    assert not engine.running and not engine.waiting


def test_greedy_output_is_independent_of_batch_company(engine):
    greedy = GenerationParams(
        max_tokens=10, sampling=SamplingParams(temperature=0.0), ignore_eos=True
    )
    alone = generate(engine, "class Foo(", greedy)
    crowd = [
        engine.sequence(engine.encode(p), greedy)
        for p in ("a", "import sys", "def f(x, y):\n  return")
    ]
    mine = engine.sequence(engine.encode("class Foo("), greedy)
    results = engine.run_to_completion([*crowd, mine])
    assert text_of(results[-1]) == alone


def test_abort_frees_the_slot_at_the_next_step(engine):
    long = [
        engine.sequence(
            engine.encode(f"def f{i}("), GenerationParams(max_tokens=20, ignore_eos=True)
        )
        for i in range(4)
    ]
    waiting = engine.sequence(engine.encode("x"), GenerationParams(max_tokens=2, ignore_eos=True))
    for seq in [*long, waiting]:
        engine.add(seq)
    engine.step()
    assert len(engine.running) == 4 and list(engine.waiting) == [waiting]
    engine.abort(long[1])
    outputs = dict((id(s), o) for s, o in engine.step())
    assert outputs[id(long[1])].finish_reason == "abort"
    assert (
        long[1] not in engine.running and waiting in engine.running
    )  # its slot went to the waiting one
    while engine.has_work:
        engine.step()
    assert all(s.finished for s in [*long, waiting])


def test_stop_token_ids_min_tokens_and_logprobs(engine):
    params = GenerationParams(
        max_tokens=8, sampling=SamplingParams(temperature=0.0), logprobs=3, ignore_eos=True
    )
    [outs] = engine.run_to_completion([engine.sequence(engine.encode("def f("), params)])
    tokens = [t for o in outs for t in o.token_ids]
    entries = [e for o in outs for e in o.logprobs]
    assert len(entries) == len(tokens) == 8
    for entry, token in zip(entries, tokens):
        assert entry.token_id == token and len(entry.top) == 3 and entry.logprob <= 0
        assert entry.top[0][1] >= entry.top[-1][1]
        assert entry.top[0][0] == token  # greedy: the chosen token is the most likely
    stop_at = tokens[3]
    first = tokens.index(stop_at)
    [stopped] = engine.run_to_completion(
        [
            engine.sequence(
                engine.encode("def f("),
                GenerationParams(
                    max_tokens=8,
                    sampling=SamplingParams(temperature=0.0),
                    stop_token_ids=(stop_at,),
                    ignore_eos=True,
                ),
            )
        ]
    )
    assert stopped[-1].finish_reason == "stop" and stopped[-1].stop_reason == stop_at
    assert [t for o in stopped for t in o.token_ids] == tokens[:first]
    [held] = engine.run_to_completion(
        [
            engine.sequence(
                engine.encode("def f("),
                GenerationParams(
                    max_tokens=8,
                    sampling=SamplingParams(temperature=0.0),
                    stop_token_ids=(stop_at,),
                    min_tokens=8,
                    ignore_eos=True,
                ),
            )
        ]
    )
    assert held[-1].finish_reason == "length" and stop_at not in [
        t for o in held for t in o.token_ids
    ]


def test_penalties_and_logit_bias_change_the_output(engine):
    greedy = SamplingParams(temperature=0.0)
    base = engine.run_to_completion(
        [
            engine.sequence(
                engine.encode("aaaa"),
                GenerationParams(max_tokens=16, sampling=greedy, ignore_eos=True),
            )
        ]
    )[0]
    tokens = [t for o in base for t in o.token_ids]
    forced = engine.run_to_completion(
        [
            engine.sequence(
                engine.encode("aaaa"),
                GenerationParams(
                    max_tokens=6,
                    sampling=SamplingParams(temperature=0.0, logit_bias=((123, 100.0),)),
                    ignore_eos=True,
                ),
            )
        ]
    )[0]
    assert [t for o in forced for t in o.token_ids] == [123] * 6
    banned = engine.run_to_completion(
        [
            engine.sequence(
                engine.encode("aaaa"),
                GenerationParams(
                    max_tokens=16,
                    sampling=SamplingParams(temperature=0.0, logit_bias=((tokens[0], -100.0),)),
                    ignore_eos=True,
                ),
            )
        ]
    )[0]
    assert tokens[0] not in [t for o in banned for t in o.token_ids]
    penalised = engine.run_to_completion(
        [
            engine.sequence(
                engine.encode("aaaa"),
                GenerationParams(
                    max_tokens=16,
                    sampling=SamplingParams(
                        temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0
                    ),
                    ignore_eos=True,
                ),
            )
        ]
    )[0]
    penalised_tokens = [t for o in penalised for t in o.token_ids]
    # penalties only push down tokens already generated: more distinct tokens than the repetitive
    # greedy text
    assert len(set(penalised_tokens)) > len(set(tokens))


def test_context_overflow_is_refused(engine):
    with pytest.raises(ValueError, match="context"):
        engine.add(engine.sequence([1] * 60, GenerationParams(max_tokens=10)))


def test_int8_engine_decodes_and_scores_close_to_fp32(model, tokenizer, config):
    from serving.replica import inference_model

    settings = EngineSettings.from_serve(config.serve)
    fp32 = Engine(model, tokenizer, settings)
    int8 = Engine(inference_model(model, "int8", "cpu"), tokenizer, settings)
    text, reason, tokens = generate(
        int8, "import ", GenerationParams(max_tokens=5, sampling=SamplingParams(0.0))
    )
    assert reason in ("stop", "length") and tokens <= 5
    ids = tokenizer.encode("def main():\n    return 0\n")
    a, b = sum(fp32.score(ids)), sum(int8.score(ids))
    assert abs(a - b) / abs(a) < 0.2


def test_engine_loop_bounds_its_queue_and_delivers_outputs(model, tokenizer, config):
    from serving.engine_loop import EngineLoop, QueueFull

    async def main():
        loop = EngineLoop(asyncio.get_running_loop(), max_queued=2)
        engine = Engine(model, tokenizer, EngineSettings.from_serve(config.serve))
        try:
            slow = GenerationParams(max_tokens=20, ignore_eos=True)
            first = [engine.sequence([5, 6], slow, sink=asyncio.Queue()) for _ in range(6)]
            loop.submit(engine, first)  # an empty queue takes any request: 4 run, 2 wait
            with pytest.raises(QueueFull):
                loop.submit(engine, [engine.sequence([5], slow, sink=asyncio.Queue())])
            outs = []
            while True:
                out = await first[0].sink.get()
                outs.append(out)
                if out.finished:
                    break
            assert outs[-1].completion_tokens == 20 and sum(len(o.token_ids) for o in outs) == 20
            loop.abort(engine, first)
            for _ in range(100):
                if not engine.has_work:
                    break
                await asyncio.sleep(0.02)
            assert not engine.has_work and loop.queued == 0
            two = GenerationParams(max_tokens=2, ignore_eos=True)
            later = engine.sequence([7], two, sink=asyncio.Queue())
            loop.submit(engine, [later])  # room again
            delivered = [await later.sink.get()]
            while not delivered[-1].finished:
                delivered.append(await later.sink.get())
            assert [len(o.token_ids) for o in delivered] == [1, 1]
            assert delivered[-1].finish_reason == "length"
            assert delivered[-1].completion_tokens == 2
            score = await loop.call(engine, lambda e: e.score([5, 6, 7]))
            assert len(score) == 2
        finally:
            loop.close()

    asyncio.run(main())


def test_make_engine_warms_up(model, tokenizer, config):
    from serving.replica import make_engine

    settings = EngineSettings.from_serve(config.serve)
    engine = make_engine(SimpleNamespace(model=model, tokenizer=tokenizer), "none", "m/1", settings)
    assert engine.steps > 0 and not engine.has_work and engine.label == "m/1"
