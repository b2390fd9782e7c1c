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
from dataclasses import dataclass
from typing import Any, Callable, Optional

from components.tracking.registry import VersionInfo, get_version, load_registered, parse_model_uri

log = logging.getLogger("moeops.serving")

CHAMPION, CHALLENGER, PINNED = "champion", "challenger", "pinned"


@dataclass(frozen=True)
class ModelSettings:
    """The part of ``user_config`` that decides what is loaded and how traffic is split."""

    model_uri: str
    challenger_uri: str = ""
    canary_fraction: float = 0.0
    quantize: str = "none"

    @classmethod
    def from_user_config(cls, user_config: dict[str, Any]) -> "ModelSettings":
        known = {k: user_config[k] for k in ("model_uri", "challenger_uri", "canary_fraction", "quantize")
                 if k in user_config}
        if "model_uri" not in known:
            raise ValueError("user_config.model_uri is missing (models:/<name>@<alias> or models:/<name>/<version>)")
        settings = cls(**known)
        parse_model_uri(settings.model_uri)
        if settings.challenger_uri:
            parse_model_uri(settings.challenger_uri)
        if not 0.0 <= float(settings.canary_fraction) <= 1.0:
            raise ValueError(f"user_config.canary_fraction={settings.canary_fraction}: must be in [0, 1]")
        if settings.quantize not in ("none", "int8", "auto"):
            raise ValueError(f"user_config.quantize={settings.quantize!r}: must be 'none', 'int8' or 'auto'")
        return settings


@dataclass
class ServedModel:
    """One loaded, warmed-up version and the engine that decodes with it."""

    info: VersionInfo
    engine: Any            # serving.generation.Engine
    role: str              # champion | challenger | pinned
    quantize: str

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def fingerprint(self) -> str:
        suffix = "-int8" if self.quantize == "int8" else ""
        return f"{self.info.name}/{self.info.version}{suffix}"


class ModelStore:
    """Thread-safe holder of the served versions; ``apply`` runs off the event loop."""

    def __init__(self, tracking_uri: str, make_engine: Callable[[Any, str], Any], seed: Optional[int] = None):
        self.tracking_uri = tracking_uri
        self._make_engine = make_engine  # (LoadedModel, quantize) -> warmed-up Engine
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.champion: Optional[ServedModel] = None
        self.challenger: Optional[ServedModel] = None
        self.settings: Optional[ModelSettings] = None
        self.last_error: str = ""

    @property
    def ready(self) -> bool:
        return self.champion is not None

    def apply(self, settings: ModelSettings) -> bool:
        """Resolve aliases; load and warm up what changed; swap. Returns True if anything changed.

        Raises (and keeps serving the current versions) when the champion cannot be resolved or loaded.
        """
        champion_info = get_version(settings.model_uri, self.tracking_uri)
        challenger_info = None
        if settings.canary_fraction > 0 and settings.challenger_uri:
            try:
                challenger_info = get_version(settings.challenger_uri, self.tracking_uri)
            except LookupError as err:
                log.warning("canary disabled: %s", err)
        champion = self._load_or_reuse(champion_info, settings.quantize,
                                       CHAMPION if "@" in settings.model_uri else PINNED)
        challenger = None
        if challenger_info is not None and challenger_info.version != champion_info.version:
            challenger = self._load_or_reuse(challenger_info, settings.quantize, CHALLENGER)
        with self._lock:
            changed = (self.settings != settings or _version(self.champion) != _version(champion)
                       or _version(self.challenger) != _version(challenger))
            self.champion, self.challenger, self.settings = champion, challenger, settings
            self.last_error = ""
        if changed:
            log.info("serving %s%s", champion.fingerprint,
                     f" + canary {challenger.fingerprint} at {settings.canary_fraction:.0%}" if challenger else "")
        return changed

    def _load_or_reuse(self, info: VersionInfo, quantize: str, role: str) -> ServedModel:
        for current in (self.champion, self.challenger):
            if current is not None and current.version == info.version and current.quantize == quantize:
                return ServedModel(info=info, engine=current.engine, role=role, quantize=quantize)
        loaded, loaded_info = load_registered(info.model_uri, self.tracking_uri)
        return ServedModel(info=loaded_info, engine=self._make_engine(loaded, quantize), role=role, quantize=quantize)

    def choose(self, requested: Optional[str]) -> ServedModel:
        """The version for one request: canary split by default, or pinned by ``<name>@<alias>``/``<name>/<v>``."""
        with self._lock:
            champion, challenger, settings = self.champion, self.challenger, self.settings
        if champion is None:
            raise LookupError("no model loaded yet")
        if requested in (None, "", champion.name):
            if challenger is not None and settings is not None and self._rng.random() < settings.canary_fraction:
                return challenger
            return champion
        for served in (champion, challenger):
            if served is None:
                continue
            if requested in (f"{served.name}@{served.role}", f"{served.name}/{served.version}", served.fingerprint):
                return served
        raise KeyError(requested)

    def cards(self) -> list[tuple[str, ServedModel, float]]:
        """(model id, served version, share of default traffic) for ``GET /v1/models``."""
        with self._lock:
            champion, challenger, settings = self.champion, self.challenger, self.settings
        if champion is None:
            return []
        share = settings.canary_fraction if (challenger is not None and settings is not None) else 0.0
        cards = [(champion.name, champion, 1.0 - share), (f"{champion.name}@{champion.role}", champion, 1.0 - share)]
        if challenger is not None:
            cards.append((f"{challenger.name}@{challenger.role}", challenger, share))
        return cards


def _version(served: Optional[ServedModel]) -> Optional[tuple[str, str]]:
    return None if served is None else (served.version, served.quantize)
