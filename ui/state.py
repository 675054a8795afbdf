"""What the studio holds: the app-wide Studio (engine, output folder, decoded subject photos), each user's Session
(kept in gr.State: subject photos, results, renders indexed by γ, the render in flight, the warnings already shown),
and the uploaded files those are made from: subject photos validated by the core before any pixel is decoded, and
the Generation read back from a dropped FlexIP PNG."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from flexip_core.generation.images import DEFAULT_LIMITS, flat_photo_note, is_flat, load_reference_image, square_view
from flexip_core.generation.metadata import read_generation
from flexip_core.generation.settings import Generation

from .engine import Engine
from .gallery import Entry, Gallery
from .scrub import Scrubber

logger = logging.getLogger(__name__)

MAX_PHOTOS = 4  # subject photos per session (one slot each in the subject panel)
MAX_HISTORY = 24  # results kept in the history strip
MAX_RENDER_KEYS = 16  # generations (all but γ) whose renders are kept for the slider preview
ENCODER_VIEW = 224  # side of the square crop shown as "what the encoders see"
DECODED_KEPT = 8  # subject photos kept decoded in memory (a render reads them without decoding the file again)


@dataclass(frozen=True)
class Studio:
    """What every handler shares."""

    engine: Engine  # shared by all users; never mutated per request
    folder: Path  # where the app writes validated photos, zips and previews for this run (served as they are)
    max_photos: int = MAX_PHOTOS  # subject photos per session
    decoded: OrderedDict = field(default_factory=OrderedDict, repr=False)  # photo digest -> RGB image, newest last
    gallery: Gallery | None = None  # every render and subject, on disk and indexed (--outputs); default: in `folder`
    scrubber: Scrubber = field(default_factory=lambda: Scrubber(enabled=False, live_drag="off"))  # the slider's
    #   background ticks and renders while dragging (app.py turns them on: --no-scrub, --live-drag)

    def __post_init__(self):
        if self.gallery is None:
            object.__setattr__(self, "gallery", Gallery.open(Path(self.folder) / "outputs"))

    @property
    def photos_folder(self) -> Path:
        return self.folder / "photos"

    @property
    def results_folder(self) -> Path:
        return self.folder / "results"


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
    generation: Generation  # what produced it, as the core reports it
    identity: float | None  # identity score (parameters['identity_metric'] says which), None if none was given
    subject: str  # subject fingerprint at render time
    parameters: dict = field(default_factory=dict)  # everything written into the PNG chunk (profile, base, ...)
    warnings: tuple[str, ...] = ()  # what the core noted while rendering it (a prompt cut off, ...)
    kept: bool = True  # in the gallery; False: a slider tick or a render made while dragging, kept when released on
    clip: str | None = None  # an animate render's clip (MP4 or WebP; `path` is its first frame), None for a still

    @property
    def caption(self) -> str:
        return self._caption(f" · seed {self.generation.seed}")

    @property
    def gate_caption(self) -> str:
        """γ and identity score only: for a row rendered with one seed (a sweep), where the seed says nothing."""
        return self._caption("")

    @classmethod
    def from_entry(cls, entry: Entry) -> Result:
        """A render the gallery kept (this run's or an earlier one's)."""
        return cls(path=entry.path, generation=entry.generation, identity=entry.identity, subject=entry.subject,
                   parameters=entry.parameters, warnings=entry.warnings, clip=entry.clip)

    def _caption(self, seed: str) -> str:
        score = "" if self.identity is None else f" · id {self.identity:.2f}"
        return f"γ {self.generation.gate:.2f}{seed}{score}"


@dataclass
class Run:
    """A render in flight in one session: what the line calls it and how far it got, so that Stop can say where it
    stopped and put back what it replaced."""

    kind: str  # "image" (Generate, a slider release), "sweep", "grid" or "ticks" (the slider's, in the background)
    label: str  # how the status line names it, e.g. "**seed 7** · γ 0.50"
    stage: str = ""  # which part of a run of several renders is rendering, e.g. "prompt 2 of 3 · "
    progress: str = "its first step"  # how far it got, e.g. "prompt 2 of 3 · step 9 of 30"
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # set when its handler has ended, however
    halted: threading.Event = field(default_factory=threading.Event)  # set by Stop: the render ends at its next step
    gate: float | None = None  # the γ an image render renders (a slider move to another γ supersedes it)
    superseded: bool = False  # halted by a slider move, not Stop: it ends without a word (what the move shows stays)


@dataclass
class Session:
    photos: list[Photo] = field(default_factory=list)
    history: list[Result] = field(default_factory=list)  # newest first
    renders: dict[tuple, dict[float, Result]] = field(default_factory=dict)  # (subject, all but γ) -> γ -> result
    current: Result | None = None  # the result shown large
    sweep_tiles: list[tuple[str, str]] = field(default_factory=list)  # the last finished γ sweep: (path, caption)
    sweep_zip: str | None = None  # its zip
    sweep_clips: list[tuple[str, str]] = field(default_factory=list)  # its clips (Animate mode): (path, caption)
    grid_rows: list[tuple[str, list[Result]]] = field(default_factory=list)  # the last grid's rows: (prompt, row)
    grid_zip: str | None = None  # their zip (made at the end, or when the grid is stopped)
    run: Run | None = None  # the render in flight, if any
    cancelled: Run | None = None  # the last render cancelled before it finished, until Stop reports it
    told: set[tuple[str, str]] = field(default_factory=set)  # (subject, warning) toasts shown: each once per subject
    uploads: int = 0  # uploads answered (add_photos calls), for the page's script
    gallery_shown: list[int] = field(default_factory=list)  # the Gallery tab's entry ids, in the order shown
    gallery_selected: int | None = None  # the entry last clicked there
    mode_tasks: dict = field(default_factory=dict)  # mode -> (its last TaskInputs, the Generation fields they set:
    #   task, pictures' digests, size, frames): the slider's events send no pictures, and find and render in these

    def subject(self) -> str:
        """Fingerprint of the photos and their weights: renders are reusable only for the same subject."""
        return fingerprint(self.photos)

    def remember(self, result: Result, history: bool = True) -> None:
        key = (result.subject, result.generation.without_gate())
        self.renders.setdefault(key, {})[round(result.generation.gate, 4)] = result
        self.renders[key] = self.renders.pop(key)  # most recently used last
        while len(self.renders) > MAX_RENDER_KEYS:
            self.renders.pop(next(iter(self.renders)))
        if history:
            self.history.insert(0, result)
            del self.history[MAX_HISTORY:]

    def nearest(self, generation: Generation, subject: str | None = None) -> Result | None:
        """The already-rendered result closest in γ for the same subject and all other settings, if any."""
        renders = self.renders.get((self.subject() if subject is None else subject, generation.without_gate()))
        if not renders:
            return None
        gate = min(renders, key=lambda g: (abs(g - generation.gate), g))
        return renders[gate]

    def exact(self, generation: Generation, subject: str | None = None) -> Result | None:
        renders = self.renders.get((self.subject() if subject is None else subject, generation.without_gate()), {})
        return renders.get(round(generation.gate, 4))


def fingerprint(photos: list[Photo]) -> str:
    """Identifies a subject: its photos' content and weights."""
    return "|".join(f"{photo.digest}:{photo.weight:g}" for photo in photos)


# --- uploaded files -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rejected:
    name: str  # file name as uploaded
    reason: str  # the validator's message (already names the file)


def file_name(path: str | Path) -> str:
    return Path(path).name


def accept_photos(paths: list[str], folder: Path) -> tuple[list[Photo], list[Rejected]]:
    """Validate each uploaded file; save the accepted ones (RGB PNG plus encoder view) under `folder`."""
    accepted, rejected = [], []
    for path in paths or []:
        name = file_name(path)
        try:
            image = load_reference_image(path, name=name)
        except ValueError as error:
            logger.info("rejected upload %s: %s", name, error)
            rejected.append(Rejected(name, str(error)))
            continue
        accepted.append(store_photo(image, name, folder))
    return accepted, rejected


def pixel_digest(image: Image.Image, length: int = 16) -> str:
    """A short hash of an image's pixels and size: the same picture gives the same digest, wherever it came from."""
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()[:length]


def store_photo(image: Image.Image, name: str, folder: Path) -> Photo:
    """Save a validated RGB photo and its encoder view under content-addressed names."""
    digest = pixel_digest(image)
    folder.mkdir(parents=True, exist_ok=True)
    path, view = folder / f"photo-{digest}.png", folder / f"photo-{digest}-view.png"
    if path.exists() and view.exists():
        path.touch()  # in use again: not old enough to prune
        view.touch()
    else:
        image.save(path)
        square_view(image, ENCODER_VIEW).save(view)
    return Photo(name=name, path=str(path), view=str(view), digest=digest, flat=is_flat(image))


def open_photo(studio: Studio, photo: Photo) -> Image.Image:
    """A stored photo as RGB (validated and converted when it was accepted), decoded once and kept while in use;
    ValueError when its file has expired from the server (its view is gone with it)."""
    if not Path(photo.path).is_file():
        studio.decoded.pop(photo.digest, None)
        raise ValueError(f"{photo.name}: this photo has expired from the server; remove it and add it again")
    image = studio.decoded.pop(photo.digest, None)
    if image is None:
        with Image.open(photo.path) as stored:
            image = stored.convert("RGB")
    studio.decoded[photo.digest] = image  # most recently used last
    while len(studio.decoded) > DECODED_KEPT:
        studio.decoded.popitem(last=False)
    return image


def read_png_generation(path: str) -> tuple[Generation, dict]:
    """The Generation a dropped PNG was made with, and its whole parameters chunk (profile, ...), read from the
    header without decoding pixels; ValueError naming the file when it has none or it cannot be read."""
    name = file_name(path)
    size = Path(path).stat().st_size
    if size == 0:
        raise ValueError(f"{name}: file is empty")
    if size > DEFAULT_LIMITS.max_bytes:
        raise ValueError(f"{name}: file is {size / 2**20:.1f} MiB; the largest accepted is "
                         f"{DEFAULT_LIMITS.max_bytes / 2**20:.0f} MiB")
    try:
        with Image.open(path) as image:  # reads the header and the text chunks before IDAT; no pixel decoding
            if image.format != "PNG":
                raise ValueError(f"{name}: settings can only be restored from a PNG saved by FlexIP Studio")
            found = read_generation(image)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name}: not a readable PNG ({error})") from None
    except ValueError as error:  # not a PNG (said above with the name), or settings that cannot be read
        message = str(error)
        raise ValueError(message if message.startswith(f"{name}: ") else f"{name}: {message}") from None
    if found is None:
        raise ValueError(f"{name}: this PNG carries no FlexIP settings (no 'parameters' text chunk)")
    return found
