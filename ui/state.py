"""One user's session, kept in gr.State: subject photos, the results so far, and renders indexed by γ."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flexip_core.generation.images import flat_photo_note

from .settings import Settings

logger = logging.getLogger(__name__)

MAX_PHOTOS = 4  # subject photos per session (one slot each in the subject panel)
MAX_HISTORY = 24  # results kept in the history strip
MAX_RENDER_KEYS = 16  # settings combinations whose renders are kept for the slider preview


@dataclass(frozen=True)
class Photo:
    name: str  # the uploaded file's name, for messages
    path: str  # the validated photo, saved as RGB PNG in the app's output folder
    view: str  # square crop of what the encoders see
    digest: str  # content hash of the validated pixels
    weight: float = 1.0  # share of this photo in the subject embedding
    flat: bool = False  # one flat colour (blank or fully transparent): nothing to keep, so the user is warned

    @property
    def flat_warning(self) -> str:
        return flat_photo_note(self.name)


@dataclass(frozen=True)
class Result:
    path: str  # PNG with the parameters chunk
    settings: Settings  # what produced it
    identity: float | None  # identity score (parameters['identity_metric'] says which), None if none was given
    subject: str  # subject fingerprint at render time
    parameters: dict = field(default_factory=dict)  # everything written into the PNG chunk (profile, base, ...)
    warnings: tuple[str, ...] = ()  # what the core noted while rendering it (a prompt cut off, ...)

    @property
    def caption(self) -> str:
        return self._caption(f" · seed {self.settings.seed}")

    @property
    def gate_caption(self) -> str:
        """γ and identity score only: for a row rendered with one seed (a sweep), where the seed says nothing."""
        return self._caption("")

    def _caption(self, seed: str) -> str:
        score = "" if self.identity is None else f" · id {self.identity:.2f}"
        return f"γ {self.settings.gate:.2f}{seed}{score}"


@dataclass
class Session:
    photos: list[Photo] = field(default_factory=list)
    history: list[Result] = field(default_factory=list)  # newest first
    renders: dict[tuple, dict[float, Result]] = field(default_factory=dict)  # Settings.cache_key -> γ -> result
    current: Result | None = None  # the result shown large
    sweep: list[Result] = field(default_factory=list)  # the last sweep (or grid), for the zip download

    def subject(self) -> str:
        """Fingerprint of the photos and their weights: renders are reusable only for the same subject."""
        return fingerprint(self.photos)

    def remember(self, result: Result, history: bool = True) -> None:
        key = result.settings.cache_key(result.subject)
        self.renders.setdefault(key, {})[round(result.settings.gate, 4)] = result
        self.renders[key] = self.renders.pop(key)  # most recently used last
        while len(self.renders) > MAX_RENDER_KEYS:
            self.renders.pop(next(iter(self.renders)))
        if history:
            self.history.insert(0, result)
            del self.history[MAX_HISTORY:]

    def nearest(self, settings: Settings, subject: str | None = None) -> Result | None:
        """The already-rendered result closest in γ for the same subject and all other settings, if any."""
        renders = self.renders.get(settings.cache_key(self.subject() if subject is None else subject))
        if not renders:
            return None
        gate = min(renders, key=lambda g: (abs(g - settings.gate), g))
        return renders[gate]

    def exact(self, settings: Settings) -> Result | None:
        renders = self.renders.get(settings.cache_key(self.subject()), {})
        return renders.get(round(settings.gate, 4))


def fingerprint(photos: list[Photo]) -> str:
    """Identifies a subject: its photos' content and weights."""
    return "|".join(f"{photo.digest}:{photo.weight:g}" for photo in photos)
