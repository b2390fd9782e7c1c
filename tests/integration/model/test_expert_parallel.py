"""Expert parallelism on Ray Train (2 CPU workers, gloo): EP=2 matches the single-process model.

The test builds one MoE model and two token batches, computes the single-process reference
(forward of each batch, gradients of each batch's loss and of their sum) here in the driver,
then runs the same weights sharded over 2 workers with several overlap settings. Worker r holds
experts [2r, 2r+2) and batch r (each variant: an overlap setting and an expert backend):

* its logits must equal the reference logits of batch r;
* its non-expert gradients must equal the reference gradients of batch r's loss alone
  (DDP would average those later; that is the training engineer's part);
* its expert gradients must equal the reference gradients of the *sum* of both losses for its
  experts, because its experts also processed the other worker's tokens.

The same workers also check: one host sync per MoE layer forward (counted), exposed <= total
all-to-all time, bf16 payloads under autocast, metrics summed over ranks in one read, and the
overlap schedule (which all-to-alls have compute between their launch and their wait).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
import torch.nn.functional as F

from components.config.schema import ModelConfig, OverlapConfig
from components.model import Transformer, is_expert_param

pytestmark = pytest.mark.integration

# capacity_factor 1.0 makes the router drop tokens, so capacity is exercised across ranks too
CFG = dict(
    dim=32,
    n_heads=2,
    n_layers=2,
    ffn_dim=64,
    num_experts=4,
    top_k=2,
    capacity_factor=1.0,
    shared_expert=True,
    max_seq_len=32,
    moe_layer_interval=1,
)
VOCAB = 64
# name -> (train.overlap, model overrides)
VARIANTS = {
    "sync": ({"async_a2a": False, "a2a_chunks": 1}, {}),
    "sync_grouped_mm": ({"async_a2a": False, "a2a_chunks": 1}, {"expert_backend": "grouped_mm"}),
    "async_chunks2": ({"async_a2a": True, "a2a_chunks": 2}, {}),
    "async_chunks2_grouped_mm": (
        {"async_a2a": True, "a2a_chunks": 2},
        {"expert_backend": "grouped_mm"},
    ),
    "async_chunks3": ({"async_a2a": True, "a2a_chunks": 3}, {}),
    # more chunks than tokens: empty chunks and ranks that receive nothing for a chunk must still
    # take part in every forward and backward all-to-all
    "async_chunks40": ({"async_a2a": True, "a2a_chunks": 40}, {}),
}
TOL = 1e-5
SCHEDULE_CFG = dict(
    dim=32, n_heads=2, n_layers=1, ffn_dim=64, num_experts=4, top_k=2, max_seq_len=32
)


def _loss(model, batch):
    logits, aux = model(batch[:, :-1])
    loss = (
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        + aux["aux_loss"]
        + aux["z_loss"]
    )
    return loss, logits, aux


def _schedule(rank: int, shared_expert: bool, chunks: int) -> list[str]:
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(**SCHEDULE_CFG, shared_expert=shared_expert),
        64,
        ep_group=torch.distributed.group.WORLD,
        overlap=OverlapConfig(async_a2a=True, a2a_chunks=chunks),
    ).train()
    layer = model.moe_layers()[0]
    events: list[str] = []
    timer = layer.dispatcher.timer
    launch, wait = timer.launch, timer.wait
    tags: dict[int, int] = {}  # id(handle) -> tag; a handle stays alive until its wait

    def logged_launch(fn, device, keep=()):
        handle = launch(fn, device, keep)
        tags[id(handle)] = tag = sum(e.startswith("launch") for e in events)
        events.append(f"launch{tag}")
        return handle

    def logged_wait(handle, backward=False):
        events.append(f"wait{tags.pop(id(handle))}")
        return wait(handle, backward)

    timer.launch, timer.wait = (
        logged_launch,
        logged_wait,
    )  # the test's hook: record, then do the real thing
    modules = [layer.experts] + ([layer.shared_expert] if shared_expert else [])
    for module in modules:
        module.register_forward_hook(lambda *_: events.append("compute"))
        module.register_full_backward_hook(lambda *_: events.append("compute"))
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(rank))
    logits, _ = model(tokens)
    events.append("backward")
    logits.float().pow(2).mean().backward()
    return events


def _hidden(events: list[str]) -> dict[int, bool]:
    """a2a tag -> whether compute ran between its launch and its wait."""
    launched_at = {}
    hidden = {}
    for i, event in enumerate(events):
        if event.startswith("launch"):
            launched_at[int(event[6:])] = i
        elif event.startswith("wait"):
            tag = int(event[4:])
            hidden[tag] = "compute" in events[launched_at[tag] + 1 : i]
    return hidden


def ep_worker_loop(config: dict) -> None:
    """Runs on each Ray Train worker; the process group (gloo) is already initialised."""
    import torch.distributed as dist
    from ray import train

    from components.model import MoEMetricsAccumulator
    from components.model.export import shard_experts
    from components.model.host_sync import HostSyncCounter

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = config["batches"][rank]
    results = {}
    for name, (overlap, overrides) in config["variants"].items():
        model = Transformer(
            ModelConfig(**config["cfg"], **overrides),
            config["vocab"],
            ep_group=dist.group.WORLD,
            overlap=OverlapConfig(**overlap),
        ).train()
        model.load_state_dict(shard_experts(config["state"], rank, world))
        loss, logits, aux = _loss(model, batch)
        loss.backward()
        comm = model.comm_times(reset=True)
        moe = model.moe_layers()[0]
        with HostSyncCounter() as syncs, torch.no_grad():
            moe(torch.randn(20, config["cfg"]["dim"]))
        results[name] = {
            "logits": logits.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            "expert_range": (moe.expert_offset, moe.num_local_experts),
            "dropped": float(aux["dropped_fraction"][0]),
            "comm": comm,
            "host_syncs": dict(syncs.by_op),
        }

    # bf16 autocast: payloads travel as bf16 through the all-to-all (the experts receive what came
    # out of it), the combine stays fp32; metrics summed over both ranks in one all-reduce
    model = Transformer(
        ModelConfig(**config["cfg"]),
        config["vocab"],
        ep_group=dist.group.WORLD,
        overlap=OverlapConfig(async_a2a=True, a2a_chunks=2),
    ).train()
    model.load_state_dict(shard_experts(config["state"], rank, world))
    received = []
    model.moe_layers()[0].experts.register_forward_pre_hook(
        lambda mod, args: received.append(args[0].dtype)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits, aux = _loss(model, batch)
    loss.backward()
    acc = MoEMetricsAccumulator()
    acc.add(aux)
    results["bf16"] = {
        "logits": logits.detach().float(),
        "received_dtypes": received,
        "grads_finite": all(torch.isfinite(p.grad).all().item() for p in model.parameters()),
        "local_counts": [c.clone() for c in aux["expert_counts"]],
        "metrics": acc.read(group=dist.group.WORLD),
    }
    results["schedules"] = {
        (shared, c): _schedule(rank, shared, c) for shared in (True, False) for c in (2, 3)
    }
    torch.save(results, Path(config["out_dir"]) / f"rank{rank}.pt")
    train.report({"done": 1})


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_expert_parallel_2_matches_single_process(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    torch.manual_seed(0)
    reference = Transformer(ModelConfig(**CFG), VOCAB).train()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, VOCAB, (2, 13), generator=gen) for _ in range(2)]

    ref_logits, ref_own_grads = [], []
    for batch in batches:
        reference.zero_grad()
        loss, logits, _ = _loss(reference, batch)
        loss.backward()
        ref_logits.append(logits.detach())
        ref_own_grads.append({n: p.grad.clone() for n, p in reference.named_parameters()})
    ref_sum_grads = {n: ref_own_grads[0][n] + ref_own_grads[1][n] for n in ref_own_grads[0]}

    trainer = TorchTrainer(
        ep_worker_loop,
        train_loop_config={
            "cfg": CFG,
            "vocab": VOCAB,
            "state": state,
            "batches": batches,
            "variants": VARIANTS,
            "out_dir": str(tmp_path),
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ep-equivalence", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()

    expert_names = {n for n, p in reference.named_parameters() if is_expert_param(p)}
    assert expert_names
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    bf16_runs = [results.pop("bf16") for results in per_rank]
    schedules = [results.pop("schedules") for results in per_rank]
    for rank, (results, bf16) in enumerate(zip(per_rank, bf16_runs)):
        assert set(results) == set(VARIANTS)
        for name, res in results.items():
            assert res["expert_range"] == (2 * rank, 2)
            assert torch.allclose(res["logits"], ref_logits[rank], atol=TOL), (
                f"{name}: logits differ on rank {rank}"
            )
            for param, grad in res["grads"].items():
                if param in expert_names:
                    want = ref_sum_grads[param][2 * rank : 2 * rank + 2]
                else:
                    want = ref_own_grads[rank][param]
                assert grad.shape == want.shape, (
                    f"{name}: {param} shape {grad.shape} vs {want.shape}"
                )
                err = (grad - want).abs().max().item()
                assert err < TOL, f"{name}: gradient of {param} differs by {err} on rank {rank}"
            # the one host sync of a layer: the split sizes, read after the count exchange
            assert res["host_syncs"] == {"Tensor.tolist": 1}, f"{name}: {res['host_syncs']}"
            overlap, _ = VARIANTS[name]
            chunks = overlap["a2a_chunks"] if overlap["async_a2a"] else 1
            comm = res["comm"]
            # per layer: the count exchange + per chunk dispatch and combine, forward and backward
            assert comm.calls == CFG["n_layers"] * (1 + 4 * chunks), f"{name}: {comm}"
            assert 0 < comm.exposed_s <= comm.total_s + 1e-9
            assert comm.forward_exposed_s + comm.backward_exposed_s == pytest.approx(comm.exposed_s)
        # overlap on and off agree with each other exactly enough to be interchangeable
        for name in VARIANTS:
            assert torch.allclose(results[name]["logits"], results["sync"]["logits"], atol=TOL)
        assert any(res["dropped"] > 0 for res in results.values()), (
            "capacity should drop some tokens here"
        )

        assert bf16["received_dtypes"] == [torch.bfloat16] * 2, (
            "bf16 payloads through the all-to-all, per chunk"
        )
        assert bf16["grads_finite"]
        assert (bf16["logits"] - ref_logits[rank]).abs().max() < 0.1 * ref_logits[
            rank
        ].abs().max() + 0.05

    # metrics read once over the group: both ranks see the sum of both ranks' counts
    total = bf16_runs[0]["local_counts"][0] + bf16_runs[1]["local_counts"][0]
    for run in bf16_runs:
        assert [
            run["metrics"][f"moe/layer0/tokens_expert{e}"] for e in range(CFG["num_experts"])
        ] == total.tolist()
        assert run["metrics"]["moe/forwards"] == 2

    # which all-to-alls the compute hides, as an order of events (timings on this shared machine are
    # noise): between launching an all-to-all and waiting for it, expert or shared-expert compute
    # runs
    for rank, rank_schedules in enumerate(schedules):
        for (shared, chunks), events in rank_schedules.items():
            hidden = _hidden(events)
            forward = [t for t in hidden if f"launch{t}" in events[: events.index("backward")]]
            backward = [t for t in hidden if t not in forward]
            # forward: count exchange + a dispatch and a combine per chunk; backward: their
            # gradients
            assert len(forward) == 1 + 2 * chunks and len(backward) == 2 * chunks, events
            exposed_forward = [t for t in forward if not hidden[t]]
            exposed_backward = [t for t in backward if not hidden[t]]
            if shared:
                # everything hidden, the count exchange (tag 0) too: the shared expert's first
                # third runs while the counts are in flight
                assert exposed_forward == [] and exposed_backward == [], (rank, chunks, events)
            else:
                # no shared expert: the first dispatch and the last combine (and their gradients)
                # have no other chunk to hide behind
                assert len(exposed_forward) <= 3 and len(exposed_backward) <= 2, (
                    rank,
                    chunks,
                    events,
                )
