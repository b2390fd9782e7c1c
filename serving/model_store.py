"""Which model versions a replica serves, and which one answers a given request.

A replica holds the champion and, when ``canary_fraction > 0``, the challenger. Applying
a new ``user_config`` loads whatever version an alias now points to *next to* the
serving ones, warms it up, and only then swaps the reference; requests already running
keep the object they started with, so a version switch drops nothing.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components.config import Config
from components.tracking.registry import VersionInfo, get_version, load_registered, parse_model_uri
from serving.engine import Engine, EngineSettings

log = logging.getLogger("moeops.serving")

CHAMPION, CHALLENGER, PINNED = "champion", "challenger", "pinned"


def champion_uri(config: Config) -> str:
    return f"models:/{config.registry.model_name}@{config.registry.champion_alias}"


def challenger_uri(config: Config) -> str:
    return f"models:/{config.registry.model_name}@{config.registry.challenger_alias}"


def resolved_model_uri(config: Config, model_uri: str | None = None) -> str:
    """The champion's URI unless ``model_uri`` (or ``serve.model_uri``) names another."""
    uri = model_uri or config.serve.model_uri or champion_uri(config)
    if not uri.startswith("models:/"):
        raise ValueError(
            f"model_uri={uri!r}: must be models:/<name>@<alias> or models:/<name>/<version>"
        )
    return uri


@dataclass(frozen=True)
class ModelSettings:
    """What is loaded and how default traffic is split: read from the typed config, nothing
    re-declared."""

    model_uri: str
    challenger_uri: str
    canary_fraction: float
    quantize: str

    @classmethod
    def from_config(cls, config: Config) -> ModelSettings:
        s = config.serve
        settings = cls(
            model_uri=resolved_model_uri(config),
            challenger_uri=challenger_uri(config),
            canary_fraction=float(s.canary_fraction),
            quantize=s.quantize,
        )
        parse_model_uri(settings.model_uri)
        parse_model_uri(settings.challenger_uri)
        return settings


@dataclass
class ServedModel:
    """One loaded, warmed-up version and the engine that decodes with it."""

    info: VersionInfo
    engine: Engine
    role: str  # champion | challenger | pinned
    quantize: str

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.info, self.quantize)


def fingerprint(info: VersionInfo, quantize: str) -> str:
    """``<name>/<version>``, ``-int8`` appended when quantised: names a served version in responses
    and metrics."""
    # "auto" serves float until app.inference_model applies quantize_for_inference (its label then
    # names it)
    return f"{info.name}/{info.version}" + ("" if quantize in ("none", "auto") else f"-{quantize}")


class ModelStore:
    """Thread-safe holder of the served versions; ``apply`` runs off the event loop."""

    def __init__(
        self,
        tracking_uri: str,
        make_engine: Callable[[Any, str, str, EngineSettings], Engine],
        seed: int | None = None,
        device: str = "cpu",
    ):
        self.tracking_uri = tracking_uri
        self.device = device
        # (LoadedModel, quantize, fingerprint, engine settings) -> warmed-up Engine
        self._make_engine = make_engine
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.champion: ServedModel | None = None
        self.challenger: ServedModel | None = None
        self.settings: ModelSettings | None = None
        self.engine_settings: EngineSettings | None = None
        self.last_error: str = ""

    @property
    def ready(self) -> bool:
        return self.champion is not None

    def apply(self, settings: ModelSettings, engine_settings: EngineSettings) -> bool:
        """Resolve aliases; load and warm up what changed; swap. Returns True if anything changed.

        New ``engine_settings`` (slot count, token budget) rebuild the engines.

        Raises (and keeps serving the current versions) when the champion cannot be resolved or
        loaded.
        """
        champion_info = get_version(settings.model_uri, self.tracking_uri)
        challenger_info = None
        if settings.canary_fraction > 0 and settings.challenger_uri:
            try:
                challenger_info = get_version(settings.challenger_uri, self.tracking_uri)
            except LookupError as err:
                log.warning("canary disabled: %s", err)
        champion = self._load_or_reuse(
            champion_info,
            settings.quantize,
            CHAMPION if "@" in settings.model_uri else PINNED,
            engine_settings,
        )
        challenger = None
        if challenger_info is not None and challenger_info.version != champion_info.version:
            challenger = self._load_or_reuse(
                challenger_info, settings.quantize, CHALLENGER, engine_settings
            )
        with self._lock:
            changed = (
                self.settings != settings
                or self.engine_settings != engine_settings
                or _version(self.champion) != _version(champion)
                or _version(self.challenger) != _version(challenger)
            )
            self.champion, self.challenger = champion, challenger
            self.settings, self.engine_settings = settings, engine_settings
            self.last_error = ""
        if changed:
            log.info(
                "serving %s%s",
                champion.fingerprint,
                f" + canary {challenger.fingerprint} at {settings.canary_fraction:.0%}"
                if challenger
                else "",
            )
        return changed

    def _load_or_reuse(
        self, info: VersionInfo, quantize: str, role: str, engine_settings: EngineSettings
    ) -> ServedModel:
        for current in (self.champion, self.challenger):
            if (
                current is not None
                and current.version == info.version
                and current.quantize == quantize
                and self.engine_settings == engine_settings
            ):
                return ServedModel(info=info, engine=current.engine, role=role, quantize=quantize)
        loaded, loaded_info = load_registered(info.model_uri, self.tracking_uri, device=self.device)
        label = fingerprint(loaded_info, quantize)
        engine = self._make_engine(loaded, quantize, label, engine_settings)
        return ServedModel(info=loaded_info, engine=engine, role=role, quantize=quantize)

    def choose(self, requested: str | None) -> ServedModel:
        """The version for one request: canary split by default, or pinned by
        ``<name>@<alias>``/``<name>/<v>``."""
        with self._lock:
            champion, challenger, settings = self.champion, self.challenger, self.settings
        if champion is None:
            raise LookupError("no model loaded yet")
        if requested in (None, "", champion.name):
            if (
                challenger is not None
                and settings is not None
                and self._rng.random() < settings.canary_fraction
            ):
                return challenger
            return champion
        for served in (champion, challenger):
            if served is None:
                continue
            if requested in (
                f"{served.name}@{served.role}",
                f"{served.name}/{served.version}",
                served.fingerprint,
            ):
                return served
        raise KeyError(requested)

    def cards(self) -> list[tuple[str, ServedModel, float]]:
        """(model id, served version, share of default traffic) for ``GET /v1/models``."""
        with self._lock:
            champion, challenger, settings = self.champion, self.challenger, self.settings
        if champion is None:
            return []
        share = (
            settings.canary_fraction if (challenger is not None and settings is not None) else 0.0
        )
        cards = [
            (champion.name, champion, 1.0 - share),
            (f"{champion.name}@{champion.role}", champion, 1.0 - share),
        ]
        if challenger is not None:
            cards.append((f"{challenger.name}@{challenger.role}", challenger, share))
        return cards


def _version(served: ServedModel | None) -> tuple[str, str] | None:
    return None if served is None else (served.version, served.quantize)
