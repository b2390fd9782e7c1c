"""Checks of a composed config, run once on the driver before any Ray or MLflow work.

Choices are enums and each section checks its own rules (``schema.<Section>.problems()``); what
is here spans sections.
"""

from __future__ import annotations

from typing import Any

from components.config.schema import ClusterMode, Config, ModelKind, Stage


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending key, its value and what is
    allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _has_key(cfg: Config, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def cross_section_problems(cfg: Config) -> list[str]:
    """Rules between sections: parallelism vs. experts, context lengths, sweep keys, resources."""
    p: list[str] = []
    m, t, d, s, tu, c = cfg.model, cfg.train, cfg.data, cfg.serve, cfg.tune, cfg.cluster
    ep = t.expert_parallel_size
    if m.kind == ModelKind.moe and ep >= 1 and m.num_experts % ep:
        p.append(
            f"model.num_experts={m.num_experts}: must be divisible by "
            f"train.expert_parallel_size ({ep})"
        )
    if d.seq_len > m.max_seq_len:
        p.append(f"data.seq_len={d.seq_len}: must be <= model.max_seq_len ({m.max_seq_len})")
    if s.max_prompt_tokens + s.max_tokens > m.max_seq_len:
        p.append(
            f"serve.max_tokens={s.max_tokens}: serve.max_prompt_tokens ({s.max_prompt_tokens}) "
            f"+ serve.max_tokens must fit in the context, model.max_seq_len ({m.max_seq_len})"
        )
    if tu.enabled:
        if ep >= 1 and tu.trial_num_workers % ep:
            p.append(
                f"tune.trial_num_workers={tu.trial_num_workers}: must be a multiple of "
                f"train.expert_parallel_size ({ep})"
            )
        p += [
            f"tune.search_space.{key}: no such config key"
            for key in tu.search_space
            if not _has_key(cfg, key)
        ]
        p += [
            f"tune.points_to_evaluate[{i}].{key}: no such config key"
            for i, point in enumerate(tu.points_to_evaluate)
            for key in point
            if not _has_key(cfg, key)
        ]
    if c.mode == ClusterMode.local:
        need = t.num_workers * t.cpus_per_worker
        if need > c.num_cpus:
            # Ray Train places all workers at once or none: this would wait forever.
            p.append(
                f"train.num_workers={t.num_workers}: {t.num_workers} workers x "
                f"{t.cpus_per_worker} CPUs = {need} exceeds cluster.num_cpus ({c.num_cpus}); "
                "Ray Train would wait forever"
            )
        if t.use_gpu and t.num_workers * t.gpus_per_worker > c.num_gpus:
            p.append(
                f"train.use_gpu=true: {t.num_workers} workers x {t.gpus_per_worker} GPUs exceeds "
                f"cluster.num_gpus ({c.num_gpus})"
            )
    if len(set(cfg.stages)) != len(cfg.stages):
        p.append(f"stages={[str(x) for x in cfg.stages]}: a stage may appear once")
    stages = [str(stage) for stage in Stage]
    p += [
        f"inputs.{name}: not a stage; one of {', '.join(map(repr, stages))}"
        for name in cfg.inputs
        if name not in stages
    ]
    return p


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` listing every broken rule (not just the first)."""
    problems = [p for section in cfg.sections() for p in section.problems()]
    problems += cross_section_problems(cfg)
    if problems:
        raise ConfigError(problems)
