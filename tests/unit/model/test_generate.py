"""KV-cache decoding equals recomputation; sampling is seeded; scoring matches the logits."""

import pytest
import torch
import torch.nn.functional as F

from components.model.generate import generate, generate_text, iter_generate, score


def greedy_without_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_batched_cached_greedy_equals_uncached_per_prompt(tiny_model):
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [99]]
    out = generate(tiny_model, prompts, max_new_tokens=8, temperature=0.0)
    assert out == [greedy_without_cache(tiny_model, p, 8) for p in prompts]


def test_iter_generate_yields_per_step_and_stops_at_eos(tiny_model):
    prompts = [[5, 17, 42], [7, 8]]
    free = generate(tiny_model, prompts, max_new_tokens=6, temperature=0.0)
    eos = free[0][2]  # make sequence 0 stop at (the first occurrence of) its third token
    stop = free[0].index(eos)
    steps = list(iter_generate(tiny_model, prompts, 6, temperature=0.0, eos_id=eos))
    assert all(len(s) == 2 for s in steps)
    assert steps[stop][0] == eos and all(s[0] is None for s in steps[stop + 1 :])
    out = generate(tiny_model, prompts, 6, temperature=0.0, eos_id=eos)
    assert out[0] == free[0][:stop]
    if eos not in free[1]:
        assert out[1] == free[1]


def test_sampling_is_deterministic_per_seed(tiny_model):
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(tiny_model, prompts, 10, temperature=1.0, top_p=0.9, seed=123)
    b = generate(tiny_model, prompts, 10, temperature=1.0, top_p=0.9, seed=123)
    c = generate(tiny_model, prompts, 10, temperature=1.0, top_p=0.9, seed=124)
    assert a == b and a != c


def test_tiny_top_p_is_greedy(tiny_model):
    prompts = [[1, 2, 3]]
    assert generate(tiny_model, prompts, 5, temperature=1.0, top_p=1e-6, seed=0) == generate(
        tiny_model, prompts, 5, temperature=0.0
    )


def test_score_matches_log_softmax(tiny_model):
    tokens = torch.randint(0, 300, (2, 10))
    lp = score(tiny_model, tokens)
    with torch.no_grad():
        logits, _ = tiny_model(tokens)
    ref = F.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert lp.shape == (2, 9) and torch.allclose(lp, ref, atol=1e-5)
    ragged = score(tiny_model, [tokens[0].tolist(), tokens[1, :4].tolist()])
    assert [len(r) for r in ragged] == [9, 3]
    assert ragged[1] == pytest.approx(lp[1, :3].tolist(), abs=1e-5)


def test_generate_leaves_training_mode_alone(tiny_model):
    tiny_model.train()
    generate(tiny_model, [[1, 2]], 2, temperature=0.0)
    assert tiny_model.training


def test_bad_generation_inputs(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_model, [[]], 3)
    with pytest.raises(ValueError, match="outside"):
        generate(tiny_model, [[1, 300]], 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(tiny_model, [[1] * 60], 10)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny_model, [[1]], 3, top_p=0)


def test_generate_text_roundtrip(tiny_model, tiny_tokenizer_path):
    from components.data.tokenizer import TextTokenizer

    tok = TextTokenizer.load(tiny_tokenizer_path)
    one = generate_text(tiny_model, tok, "def main(", max_new_tokens=4)
    many = generate_text(tiny_model, tok, ["def main(", "import"], max_new_tokens=4)
    assert isinstance(one, str) and many[0] == one and len(many) == 2
