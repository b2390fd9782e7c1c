"""GPU check of the Hugging Face export: moeops' model vs transformers (and vLLM) on one device.

    from infra.gpu_check_hf import run_hf_checks
    report = run_hf_checks("cuda")     # bf16 on CUDA; run_hf_checks("cpu") rehearses it in fp32

A moeops model is built in-process from a config (random weights with a non-trivial router
bias, so the bias path is exercised), exported with ``components.model.hf_export`` and loaded by
``transformers.AutoModelForCausalLM`` on the device (bf16 on CUDA, fp32 on CPU); greedy tokens
for fixed prompts are compared with moeops' own model as it serves (fp32, same device). In bf16
the two round differently, so a near-tie in the router can pick another expert and the
continuations part ways: every prompt's first differing step is reported and counted, with the
number of router decisions that differ on the shared prefix ("routing flips"); identical prompts
and flips are figures, not failures.
Where vLLM is installed the same prompts run through ``vllm.LLM`` on the export.

At import this module needs only torch and ``components`` (the GPU check runs on a bare machine
with torch alone); transformers and vllm are imported inside :func:`run_hf_checks`, and a missing
one makes its part ``{"status": "skipped: transformers not installed"}`` (or vllm).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from components.config.schema import ModelConfig  # noqa: E402
from components.model import Transformer  # noqa: E402
from components.model.generate import generate  # noqa: E402
from components.model.hf_export import write_hf  # noqa: E402

PROMPTS = ("def main(", "import os\n", "class Config:", "# Licensed")
MAX_NEW_TOKENS = 32
# the checked models: the MoE target (shared expert + selection bias) and the top-1 target
MODELS: dict[str, dict[str, Any]] = {
    "ernie4_5_moe": dict(
        dim=256,
        n_layers=4,
        n_heads=4,
        ffn_dim=512,
        max_seq_len=256,
        num_experts=8,
        top_k=2,
        shared_expert=True,
        bias_balancing=True,
        moe_layer_interval=1,
        init_std=0.1,
    ),
    "qwen2_moe_top1": dict(
        dim=256,
        n_layers=4,
        n_heads=4,
        ffn_dim=512,
        max_seq_len=256,
        num_experts=8,
        top_k=1,
        shared_expert=True,
        moe_layer_interval=2,
        init_std=0.1,
    ),
}
CORPUS = [
    "def main():\n    return 0\n",
    "import os\nimport sys\n",
    "class Config:\n    name: str = 'x'\n",
    "# Licensed under the Apache License\n",
] * 30


def import_transformers():
    """``transformers``, or None where it is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None
    return importlib.import_module("transformers")


def _tokenizer():
    from components.data.tokenizer import TextTokenizer

    return TextTokenizer.train(iter(CORPUS), vocab_size=512)


def build_model(overrides: dict[str, Any], vocab_size: int, seed: int = 0) -> Transformer:
    """A random moeops model (eval mode) with a non-trivial router bias where it has one."""
    cfg = ModelConfig(**overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg, vocab_size).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.expert_bias.copy_(0.05 * torch.randn(cfg.num_experts))
    return model


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _routing_flips(model: Transformer, hf_model, tokens: list[int], device: str) -> int:
    """Router top-k choices (as sets) that differ between moeops and transformers on one
    sequence, summed over MoE layers and positions."""
    chosen: dict[str, list[torch.Tensor]] = {"moeops": [], "hf": []}
    handles = []
    for layer in model.moe_layers():
        handles.append(
            layer.router.register_forward_hook(
                lambda _m, _i, out: chosen["moeops"].append(out.expert_ids.sort(-1).values)
            )
        )
    k = model.cfg.top_k
    for module in hf_model.modules():
        gate = getattr(module, "gate", None)
        if isinstance(gate, torch.nn.Linear) and hasattr(module, "experts"):
            bias_mod = getattr(module, "moe_statics", None)

            def hook(_m, inputs, _out, bias_mod=bias_mod, gate=gate):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                probs = (x @ gate.weight.float().t()).softmax(-1)
                if bias_mod is not None:
                    probs = probs + bias_mod.e_score_correction_bias.float().squeeze()
                chosen["hf"].append(probs.topk(k, -1).indices.sort(-1).values)

            handles.append(module.register_forward_hook(hook))
    try:
        ids = torch.tensor([tokens], device=device)
        with torch.no_grad():
            model(ids)
            hf_model(ids)
    finally:
        for h in handles:
            h.remove()
    return int(sum((a != b).any(-1).sum().item() for a, b in zip(chosen["moeops"], chosen["hf"])))


def _compare_transformers(
    transformers, model, hf_dir: Path, tokenizer, device: str, dtype, max_new_tokens: int
) -> dict[str, Any]:
    hf_model = (
        transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
        .to(device)
        .eval()
    )
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    tokenizer_ok = all(hf_tokenizer.encode(p) == ids for p, ids in zip(PROMPTS, prompts))
    started = time.perf_counter()
    ours = generate(model, prompts, max_new_tokens, temperature=0.0, eos_id=tokenizer.eos_id)
    ours_s = time.perf_counter() - started
    theirs = []
    started = time.perf_counter()
    for ids in prompts:
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_id,
            )
        new = out[0, len(ids) :].tolist()
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        theirs.append(new)
    hf_s = time.perf_counter() - started
    per_prompt = []
    for prompt, ids, a, b in zip(PROMPTS, prompts, ours, theirs):
        diff = _first_difference(a, b)
        shared = ids + a[: diff if diff is not None else len(a)]
        per_prompt.append(
            {
                "prompt": prompt,
                "identical": diff is None,
                "first_difference": diff,
                "routing_flips": _routing_flips(model, hf_model, shared, device),
                "moeops": a,
                "transformers": b,
            }
        )
    with torch.no_grad():
        batch = torch.tensor([prompts[0]], device=device)
        logits_diff = (model(batch)[0].float() - hf_model(batch).logits.float()).abs().max().item()
    return {
        "status": "ok",
        "architecture": type(hf_model).__name__,
        "tokenizer_same_ids": tokenizer_ok,
        "identical_prompts": sum(p["identical"] for p in per_prompt),
        "prompts": len(per_prompt),
        "routing_flips": sum(p["routing_flips"] for p in per_prompt),
        "max_abs_logit_diff_prompt0": logits_diff,
        "generate_s": {"moeops": ours_s, "transformers": hf_s},
        "per_prompt": per_prompt,
    }


def _compare_vllm(
    model, hf_dir: Path, tokenizer, dtype_name: str, max_new_tokens: int
) -> dict[str, Any]:
    if importlib.util.find_spec("vllm") is None:
        return {"status": "skipped: vllm not installed"}
    import vllm

    prompts = [tokenizer.encode(p) for p in PROMPTS]
    ours = generate(model, prompts, max_new_tokens, temperature=0.0, eos_id=tokenizer.eos_id)
    llm = vllm.LLM(model=str(hf_dir), dtype=dtype_name, gpu_memory_utilization=0.3, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    theirs = []
    for out in outputs:
        new = list(out.outputs[0].token_ids)
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        theirs.append(new)
    del llm  # its GPU memory goes back before the next model's engine starts
    torch.cuda.empty_cache()
    diffs = [_first_difference(a, b) for a, b in zip(ours, theirs)]
    return {
        "status": "ok",
        "identical_prompts": sum(d is None for d in diffs),
        "prompts": len(diffs),
        "first_differences": diffs,
    }


def run_hf_checks(
    device: str,
    models: dict[str, dict[str, Any]] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Export, load and compare on ``device`` ("cuda" runs bf16, "cpu" fp32); returns the
    figures as a JSON-able dict, one entry per checked model and engine.

    ``models``: name -> ModelConfig fields (default :data:`MODELS`; the CPU test passes smaller
    ones); ``max_new_tokens``: greedy tokens per prompt."""
    transformers = import_transformers()
    if transformers is None:
        return {"status": "skipped: transformers not installed"}
    if device.startswith("cuda") and not torch.cuda.is_available():
        return {"status": "skipped: no CUDA device visible"}
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    dtype_name = "float32" if dtype == torch.float32 else "bfloat16"
    tokenizer = _tokenizer()
    report: dict[str, Any] = {
        "status": "ok",
        "device": device,
        "dtype": dtype_name,
        "transformers_version": transformers.__version__,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="moeops-hf-check-") as tmp:
        for name, overrides in (models or MODELS).items():
            model = build_model(overrides, tokenizer.vocab_size)
            hf_dir = write_hf(model.state_dict(), model.cfg, tokenizer, Path(tmp) / name)
            # moeops serves fp32 on every device (serving/app.py); transformers runs bf16 on GPUs
            model = model.to(device)
            report["models"][name] = {
                "transformers": _compare_transformers(
                    transformers, model, hf_dir, tokenizer, device, dtype, max_new_tokens
                ),
                "vllm": (
                    _compare_vllm(model, hf_dir, tokenizer, dtype_name, max_new_tokens)
                    if device != "cpu"
                    else {"status": "skipped: vLLM runs on GPUs only"}
                ),
            }
    return report


if __name__ == "__main__":
    import json

    print(json.dumps(run_hf_checks(sys.argv[1] if len(sys.argv) > 1 else "cuda"), indent=2))
