"""The studio's lasting gallery (issue 33): each render a PNG under `images/YYYY-MM-DD/` that carries its `parameters`
chunk, indexed in `gallery.sqlite` (WAL) in the same folder, and each subject's photos copied under `subjects/`, so
that results and subjects survive restarts. Standard library, PIL and the core's torch-free metadata and settings:
importing it loads no torch and no gradio.

Writes are atomic: a temporary file in the target folder, flushed and fsync'ed, renamed into place, and only then
the row. Opening a gallery repairs what an interruption (kill -9, a power cut) can leave behind: temporary files of
writers that are gone are removed, complete PNGs renamed into place just before their row was written are indexed
again from their chunk, and rows whose file was deleted by hand are dropped."""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from pathlib import Path

from PIL import Image

from flexip_core.generation.metadata import read_png_parameters, save_png
from flexip_core.generation.settings import Generation

logger = logging.getLogger(__name__)

DATABASE = "gallery.sqlite"  # the index, in the gallery folder
IMAGES = "images"  # renders: images/YYYY-MM-DD/flexip-g0.50-s42-<8 hex>.png (UTC dates)
SUBJECTS = "subjects"  # remembered subjects: subjects/<16 hex of the key's SHA-1>/photo-<i>.<ext>
SCHEMA_VERSION = 1  # PRAGMA user_version of the database this module writes
MAX_LIMIT = 1000  # most entries one entries() call returns
TEMP_PREFIX = ".gallery-tmp-"  # temporary files and folders: .gallery-tmp-<pid>-<process token>-<8 hex><suffix>
PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})  # image modes PIL writes as PNG
SORTS = {  # sort name -> ORDER BY; ties go to the newest
    "newest": "created DESC, id DESC",
    "oldest": "created ASC, id ASC",
    "gate": "gate IS NULL, gate ASC, created DESC, id DESC",  # γ from 0 (prompt) to 1 (identity), unknown last
    "identity": "identity IS NULL, identity DESC, created DESC, id DESC",  # best identity score first, unscored last
}

_TOKEN = secrets.token_hex(4)  # tells this process's temporary files from those of an earlier process with its pid
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-([0-9a-f]+)-")
CLIP_KEY = "clip"  # parameters' key naming an animate render's clip file, beside its PNG
_RENDER_NAME = re.compile(r"^flexip-.*[0-9a-f]{8}\.png$")
_COLUMNS = "id, file, created, prompt, gate, seed, subject, identity, parameters, warnings"
_SCHEMA = f"""
BEGIN;
CREATE TABLE IF NOT EXISTS renders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: an id a page still shows never names another render
    file TEXT NOT NULL UNIQUE,             -- relative to the gallery folder, '/' separated
    created TEXT NOT NULL,                 -- UTC ISO 8601 with microseconds: sorts as text
    prompt TEXT NOT NULL,
    prompt_folded TEXT NOT NULL,           -- prompt.casefold(): what a search matches (SQLite folds ASCII only)
    negative_prompt TEXT NOT NULL,
    gate REAL,
    seed INTEGER,
    task TEXT,
    subject TEXT NOT NULL,                 -- subject key ('' when unknown)
    identity REAL,
    parameters TEXT NOT NULL,              -- JSON object: the whole parameters dict
    warnings TEXT NOT NULL                 -- JSON list of text
);
CREATE INDEX IF NOT EXISTS renders_created ON renders (created);
CREATE INDEX IF NOT EXISTS renders_subject ON renders (subject);
CREATE TABLE IF NOT EXISTS subjects (
    key TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    photos TEXT NOT NULL,                  -- JSON list of paths relative to the gallery folder
    weights TEXT NOT NULL,                 -- JSON list of numbers
    names TEXT NOT NULL                    -- JSON list of the photos' uploaded names
);
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""


class GalleryWriteError(OSError):
    """The gallery folder could not take a file or a row (disk full, no permission, read-only); nothing was left
    behind. `errno` is the cause's (errno.ENOSPC, ...) where there was one."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # OSError would rebuild it from (errno, strerror), the other way round
        return type(self), (self.message, self.errno)


@dataclass(frozen=True)
class Entry:
    """One render in the gallery."""

    id: int  # row id, stable across restarts and never reused
    path: str  # the PNG, absolute; it carries the parameters chunk
    created: str  # when it was added, UTC ISO 8601 with microseconds
    prompt: str  # parameters['prompt']
    gate: float | None  # γ (parameters['gate']), None when the parameters had none
    seed: int | None  # parameters['seed'], None when they had none
    subject: str  # key of the subject it was rendered from ('' when unknown: re-indexed after an interruption)
    identity: float | None  # identity score, None when none was computed
    parameters: dict = field(default_factory=dict)  # the whole parameters dict, as stored (JSON)
    warnings: tuple[str, ...] = ()  # what the core noted while rendering it

    @property
    def generation(self) -> Generation:
        """The settings it was made with; ValueError when its parameters cannot be read."""
        return Generation.from_parameters(self.parameters)

    @property
    def clip(self) -> str | None:
        """The clip beside the PNG (an animate render, whose PNG is its first frame), absolute; None for a still."""
        name = self.parameters.get(CLIP_KEY)
        return str(Path(self.path).with_name(name)) if isinstance(name, str) and name else None


@dataclass(frozen=True)
class Subject:
    """A remembered subject: copies of its validated photos, which can be picked again after a restart."""

    key: str  # the subject key renders are filed under (the session's fingerprint)
    photos: tuple[str, ...]  # the copied photos, absolute paths, in the order given
    weights: tuple[float, ...]  # each photo's share of the subject embedding
    names: tuple[str, ...]  # each photo's uploaded name, for messages
    created: str  # when it was first remembered, UTC ISO 8601
    renders: int  # renders in the gallery made from it


class Gallery:
    """Renders and subjects kept in one outputs folder. Safe to share between threads: one SQLite connection behind
    a lock (files are written outside it)."""

    def __init__(self, folder: Path, connection: sqlite3.Connection):
        """Use Gallery.open."""
        self.folder = folder  # absolute and resolved
        self._db: sqlite3.Connection | None = connection
        self._lock = threading.RLock()  # guards the connection
        self._subjects_lock = threading.Lock()  # one remember_subject at a time copies photos

    @classmethod
    def open(cls, folder: str | Path) -> Gallery:
        """The gallery in `folder` (created if missing), repaired after any interruption.

        Args:
            folder: the outputs folder; it holds gallery.sqlite, images/ and subjects/.

        Raises ValueError naming the folder when it cannot be created or written, or when its database cannot be
        read."""
        folder = Path(folder).expanduser().resolve()
        _check_writable(folder)
        gallery = cls(folder, _connect(folder / DATABASE))
        try:
            gallery._repair()
        except BaseException:
            gallery.close()
            raise
        return gallery

    @property
    def images_folder(self) -> Path:
        return self.folder / IMAGES

    @property
    def subjects_folder(self) -> Path:
        return self.folder / SUBJECTS

    def __repr__(self) -> str:
        return f"Gallery({str(self.folder)!r})"

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- renders -------------------------------------------------------------------------------------------
    def add(self, image: Image.Image, parameters: dict, *, subject: str, identity: float | None = None,
            warnings=(), clip: str | Path | None = None) -> Entry:
        """Keep one render: its PNG (with the parameters chunk) written atomically, then its row.

        Args:
            image: the render.
            parameters: what produced it (Generation.to_parameters() plus profile, base, identity_metric, ...):
                written into the PNG chunk and kept whole, as JSON, in the row.
            subject: key of the subject it was rendered from (Session.subject()); "" when none.
            identity: its identity score, None when none was computed.
            warnings: what the core noted while rendering it.
            clip: an animate render's video file (MP4, WebP or GIF), whose first frame is `image`: copied beside the
                PNG under the PNG's name (before the PNG, so a listed render always has its clip), and named in
                the parameters (`clip`).

        Returns the new Entry. Raises ValueError for a value that cannot be stored, and GalleryWriteError when the
        folder cannot take the file or the row (disk full, no permission); then neither is left behind."""
        self._connection()
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
        if image.mode not in PNG_MODES:
            raise ValueError(f"a {image.mode} image cannot be stored as PNG; convert it to RGB first")
        if not isinstance(parameters, dict):
            raise ValueError(f"parameters must be a dict, got {type(parameters).__name__}")
        if not isinstance(subject, str):
            raise ValueError(f"subject must be a subject key (text), got {type(subject).__name__}")
        identity = _number(identity, "identity")
        warnings = tuple(str(warning) for warning in warnings)
        stored = json.loads(_to_json(parameters, "parameters"))  # what get() will return: a JSON-shaped copy
        if clip is not None and not Path(clip).is_file():
            raise ValueError(f"clip {clip} is not a file")

        now = datetime.now(timezone.utc)
        path, parameters = self._write_png(image, parameters, self.images_folder / now.strftime("%Y-%m-%d"), clip)
        if clip is not None:
            stored[CLIP_KEY] = parameters[CLIP_KEY]
        file = path.relative_to(self.folder).as_posix()
        prompt = str(parameters.get("prompt") or "")
        gate, seed = _lenient_number(parameters.get("gate")), _lenient_whole(parameters.get("seed"))
        row = {"file": file, "created": _iso(now), "prompt": prompt, "prompt_folded": prompt.casefold(),
               "negative_prompt": str(parameters.get("negative_prompt") or ""), "gate": gate, "seed": seed,
               "task": parameters.get("task") if isinstance(parameters.get("task"), str) else None,
               "subject": subject, "identity": identity, "parameters": _to_json(stored, "parameters"),
               "warnings": _to_json(list(warnings), "warnings")}
        try:
            entry_id = self._insert(row)
        except BaseException as error:
            _remove(path)
            if clip is not None:
                _remove(path.with_name(parameters[CLIP_KEY]))
            if isinstance(error, sqlite3.Error):
                code = errno.ENOSPC if "full" in str(error) else None
                raise GalleryWriteError(f"could not index the render in the gallery folder {self.folder} ({error}); "
                                        f"{_hint(code)}", code) from error
            raise
        return Entry(id=entry_id, path=str(path), created=row["created"], prompt=prompt, gate=gate, seed=seed,
                     subject=subject, identity=identity, parameters=stored, warnings=warnings)

    def entries(self, query: str = "", *, subject: str | None = None, gate_min: float | None = None,
                gate_max: float | None = None, since=None, until=None, sort: str = "newest", limit: int = 100,
                offset: int = 0) -> list[Entry]:
        """One page of renders whose file exists, newest first by default.

        Args:
            query: text the prompt contains, any case ("" matches all); % and _ are plain characters.
            subject: only renders of this subject key.
            gate_min, gate_max: only renders with gate_min <= γ <= gate_max.
            since, until: only renders added at or after `since` and before `until` (datetime, date, ISO text or
                POSIX seconds; naive times are UTC).
            sort: "newest", "oldest", "gate" (γ ascending) or "identity" (best score first, unscored last).
            limit: page size, 1 to 1000.
            offset: renders to skip, 0 or more."""
        if sort not in SORTS:
            raise ValueError(f"unknown sort {sort!r}; choose one of {', '.join(SORTS)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a whole number from 0, got {offset!r}")
        where, args = _filters(query, subject, gate_min, gate_max, since, until)
        sql = f"SELECT {_COLUMNS} FROM renders {where} ORDER BY {SORTS[sort]} LIMIT ? OFFSET ?"
        while True:  # each round forgets at least one row whose file has gone, so this ends
            rows = self._query(sql, [*args, limit, offset])
            missing = [row for row in rows if not (self.folder / row["file"]).is_file()]
            if not missing:
                return [self._entry(row) for row in rows]
            self._forget(missing)

    def count(self, query: str = "", *, subject: str | None = None, gate_min: float | None = None,
              gate_max: float | None = None, since=None, until=None) -> int:
        """How many renders entries() finds with these filters (their files were checked at open)."""
        where, args = _filters(query, subject, gate_min, gate_max, since, until)
        return self._query(f"SELECT COUNT(*) FROM renders {where}", args)[0][0]

    def get(self, id: int) -> Entry | None:
        """The render with this id, or None when there is none or its file has gone."""
        rows = self._query(f"SELECT {_COLUMNS} FROM renders WHERE id = ?", [id])
        if not rows:
            return None
        if not (self.folder / rows[0]["file"]).is_file():
            self._forget(rows)
            return None
        return self._entry(rows[0])

    def delete(self, id: int) -> bool:
        """Remove a render: its row, then its file. False when there was none; GalleryWriteError when the file
        cannot be removed (its row is gone already, so it is no longer listed)."""
        with self._lock:
            db = self._connection()
            with db:
                row = db.execute("SELECT file FROM renders WHERE id = ?", (id,)).fetchone()
                if row is None:
                    return False
                db.execute("DELETE FROM renders WHERE id = ?", (id,))
        path = self.folder / row["file"]
        try:
            path.unlink(missing_ok=True)
            for clip in path.parent.glob(f"{glob.escape(path.stem)}.*"):  # an animate render's clip
                clip.unlink(missing_ok=True)
        except OSError as error:
            raise _write_error(error, f"remove {path.name}", self.folder) from error
        return True

    def integrity(self) -> str:
        """SQLite's answer to PRAGMA integrity_check: "ok", or the problems it found, one a line."""
        return "\n".join(str(row[0]) for row in self._query("PRAGMA integrity_check", []))

    def contains(self, path: str | Path) -> bool:
        """Whether `path`, resolved (symlinks and ..), lies inside the gallery folder: serve only such files."""
        try:
            resolved = Path(path).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            return False
        return resolved != self.folder and resolved.is_relative_to(self.folder)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # --- subjects ------------------------------------------------------------------------------------------
    def remember_subject(self, key: str, photo_paths: list[str], weights: list[float], names: list[str]) -> None:
        """Copy a subject's validated photos into subjects/ and record them, once per key, so that it can be picked
        again after a restart. A key already remembered is left as it is.

        Args:
            key: the subject key its renders are filed under (Session.subject()).
            photo_paths: its validated photos (the studio's RGB PNGs), in order.
            weights: each photo's share of the subject embedding.
            names: each photo's uploaded name.

        Raises ValueError for a missing photo or lists of different lengths, GalleryWriteError when the folder
        cannot take the copies or the row (then neither is left behind)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"the subject key must be non-empty text, got {key!r}")
        photo_paths, weights, names = list(photo_paths), list(weights), list(names)
        if not photo_paths or not len(photo_paths) == len(weights) == len(names):
            raise ValueError(f"a subject needs one weight and one name per photo and at least one photo; got "
                             f"{len(photo_paths)} photos, {len(weights)} weights, {len(names)} names")
        weights = [_number(weight, "a photo weight") for weight in weights]
        if None in weights:
            raise ValueError("a photo weight must be a number, got None")
        for source, name in zip(photo_paths, names):
            if not Path(source).is_file():
                raise ValueError(f"{name}: the subject's photo {source} is not a file; it may have expired")
        with self._subjects_lock:
            if self._query("SELECT 1 FROM subjects WHERE key = ?", [key]):
                return
            target = self.subjects_folder / _subject_folder(key)
            temp = self.subjects_folder / _temp_name("")
            try:
                temp.mkdir(parents=True)
                copies = []
                for index, source in enumerate(photo_paths):
                    copy = temp / f"photo-{index}{Path(source).suffix.lower() or '.png'}"
                    shutil.copyfile(source, copy)
                    _fsync_file(copy)
                    copies.append((target / copy.name).relative_to(self.folder).as_posix())
                _fsync_folder(temp)
                if target.exists():  # copied by a remember that was interrupted before its row
                    shutil.rmtree(target)
                os.replace(temp, target)
                _fsync_folder(self.subjects_folder)
            except BaseException as error:
                shutil.rmtree(temp, ignore_errors=True)
                if isinstance(error, OSError):
                    raise _write_error(error, "keep the subject's photos", self.folder) from error
                raise
            try:
                with self._lock:
                    db = self._connection()
                    with db:
                        db.execute("INSERT OR IGNORE INTO subjects (key, created, photos, weights, names) "
                                   "VALUES (?, ?, ?, ?, ?)",
                                   (key, _iso(datetime.now(timezone.utc)), json.dumps(copies), json.dumps(weights),
                                    _to_json([str(name) for name in names], "names")))
            except sqlite3.Error as error:
                shutil.rmtree(target, ignore_errors=True)
                raise GalleryWriteError(f"could not record the subject in the gallery folder {self.folder} "
                                        f"({error})") from error
        logger.info("remembered subject %s (%d photos) in %s", _subject_folder(key), len(copies), target)

    def subjects(self) -> list[Subject]:
        """The remembered subjects whose photos are all still there, newest first."""
        return self._subjects("", [])

    def subject(self, key: str) -> Subject | None:
        """The remembered subject with this key, or None."""
        found = self._subjects("WHERE s.key = ?", [key])
        return found[0] if found else None

    # --- helpers -------------------------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"the gallery in {self.folder} is closed")
        return self._db

    def _query(self, sql: str, args: list) -> list[sqlite3.Row]:
        with self._lock:
            return self._connection().execute(sql, args).fetchall()

    def _insert(self, row: dict) -> int:
        """Write a render's row; its id. A row re-indexed from the same file meanwhile (by a gallery opened in
        another process) is replaced by this fuller one."""
        names = ", ".join(row)
        updates = ", ".join(f"{name} = excluded.{name}" for name in row if name != "file")
        with self._lock:
            db = self._connection()
            with db:
                db.execute(f"INSERT INTO renders ({names}) VALUES ({', '.join('?' * len(row))}) "
                           f"ON CONFLICT (file) DO UPDATE SET {updates}", list(row.values()))
                return db.execute("SELECT id FROM renders WHERE file = ?", (row["file"],)).fetchone()[0]

    def _write_png(self, image: Image.Image, parameters: dict, folder: Path, clip: str | Path | None = None
                   ) -> tuple[Path, dict]:
        """Write the PNG under a temporary name in `folder`, fsync it and rename it into place (a clip first, the
        same way, under the PNG's name); its final path, and the parameters as written (naming the clip)."""
        label = ""
        gate, seed = parameters.get("gate"), parameters.get("seed")
        if isinstance(gate, (int, float)) and not isinstance(gate, bool):
            label += f"-g{float(gate):.2f}"
        if seed is not None:
            label += f"-s{seed}"
        label = re.sub(r"[^\w.-]", "_", label)  # a seed is a number; anything else must not make a path
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"flexip{label}-{secrets.token_hex(4)}.png"
            while path.exists():  # 32 random bits: a clash is rare, and os.replace would overwrite it
                path = folder / f"flexip{label}-{secrets.token_hex(4)}.png"
            temp, moved = folder / _temp_name(".part"), None
            try:
                if clip is not None:
                    moved = path.with_suffix(Path(clip).suffix.lower())
                    shutil.copyfile(clip, temp)
                    _fsync_file(temp)
                    os.replace(temp, moved)
                    parameters = {**parameters, CLIP_KEY: moved.name}
                save_png(image, temp, parameters)
                _fsync_file(temp)
                os.replace(temp, path)
            except BaseException:
                _remove(temp)
                if moved is not None:
                    _remove(moved)
                raise
            _fsync_folder(folder)
        except OSError as error:
            raise _write_error(error, "save the render", self.folder) from error
        return path, parameters

    def _entry(self, row: sqlite3.Row) -> Entry:
        return Entry(id=row["id"], path=str(self.folder / row["file"]), created=row["created"], prompt=row["prompt"],
                     gate=row["gate"], seed=row["seed"], subject=row["subject"], identity=row["identity"],
                     parameters=json.loads(row["parameters"]), warnings=tuple(json.loads(row["warnings"])))

    def _forget(self, rows: list[sqlite3.Row]) -> None:
        """Drop the rows of renders whose file has gone (deleted by hand)."""
        with self._lock:
            db = self._connection()
            with db:
                db.executemany("DELETE FROM renders WHERE id = ?", [(row["id"],) for row in rows])
        logger.info("dropped %d gallery rows whose file is missing from %s: %s", len(rows), self.folder,
                    ", ".join(row["file"] for row in rows[:5]) + (", ..." if len(rows) > 5 else ""))

    def _subjects(self, where: str, args: list) -> list[Subject]:
        rows = self._query(f"SELECT s.key, s.created, s.photos, s.weights, s.names, (SELECT COUNT(*) FROM renders r "
                           f"WHERE r.subject = s.key) AS renders FROM subjects s {where} "
                           f"ORDER BY s.created DESC, s.rowid DESC", args)
        found, gone = [], []
        for row in rows:
            photos = tuple(str(self.folder / file) for file in json.loads(row["photos"]))
            if not all(Path(photo).is_file() for photo in photos):
                gone.append(row["key"])
                continue
            found.append(Subject(key=row["key"], photos=photos, weights=tuple(json.loads(row["weights"])),
                                 names=tuple(json.loads(row["names"])), created=row["created"],
                                 renders=row["renders"]))
        if gone:
            with self._lock:
                db = self._connection()
                with db:
                    db.executemany("DELETE FROM subjects WHERE key = ?", [(key,) for key in gone])
            logger.info("forgot %d subjects whose photos are missing from %s", len(gone), self.subjects_folder)
        return found

    def _repair(self) -> None:
        """Undo what an interrupted write left: temporary files of writers that are gone, renders renamed into place
        without their row (indexed again from their chunk), rows whose file is missing."""
        removed = _remove_stale_temps(self.folder)
        if removed:
            logger.info("removed %d temporary files left by interrupted writes in %s", removed, self.folder)
        rows = self._query("SELECT id, file FROM renders", [])
        missing = [row for row in rows if not (self.folder / row["file"]).is_file()]
        if missing:
            self._forget(missing)
        known = {row["file"] for row in rows}
        adopted = 0
        for day in _children(self.images_folder):
            for path in sorted(_children(day)):
                file = path.relative_to(self.folder).as_posix()
                if file not in known and _RENDER_NAME.match(path.name) and path.is_file():
                    adopted += self._adopt(path, file)
        if adopted:
            logger.info("indexed %d renders again that were saved just before an interruption in %s", adopted,
                        self.images_folder)
        self.subjects()  # forgets subjects whose photos are gone

    def _adopt(self, path: Path, file: str) -> int:
        """Index a complete PNG that has no row (1), from its parameters chunk; 0 when it is not readable."""
        try:
            with Image.open(path) as image:
                parameters = read_png_parameters(image)
                image.verify()  # reads to the end and checks every chunk's CRC: a cut-off file fails
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            logger.warning("left %s out of the gallery: not a readable PNG (%s)", path, error)
            return 0
        if parameters is None:
            logger.warning("left %s out of the gallery: it carries no parameters chunk", path)
            return 0
        prompt = str(parameters.get("prompt") or "")
        created = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        self._insert({"file": file, "created": _iso(created), "prompt": prompt, "prompt_folded": prompt.casefold(),
                      "negative_prompt": str(parameters.get("negative_prompt") or ""),
                      "gate": _lenient_number(parameters.get("gate")), "seed": _lenient_whole(parameters.get("seed")),
                      "task": str(parameters.get("task", "text-to-image")), "subject": "", "identity": None,
                      "parameters": _to_json(parameters, "parameters"), "warnings": "[]"})
        return 1


# --- files ---------------------------------------------------------------------------------------------------
def _temp_name(suffix: str) -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{_TOKEN}-{secrets.token_hex(4)}{suffix}"


def _writer_alive(name: str) -> bool:
    """Whether the process that named this temporary file may still be writing it."""
    match = _TEMP_NAME.match(name)
    if match is None:
        return False
    pid, token = int(match.group(1)), match.group(2)
    if pid == os.getpid():
        return token == _TOKEN  # the same pid with another token: an earlier process (a container restarted)
    if os.name != "posix":  # Windows' os.kill(pid, 0) would send CTRL_C_EVENT; count other processes as gone
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _remove_stale_temps(folder: Path) -> int:
    """Remove temporary files and folders of writers that are gone: in the folder, images/, images/<day>/ and
    subjects/ (where this module writes them)."""
    places = [folder, folder / IMAGES, folder / SUBJECTS, *_children(folder / IMAGES)]
    removed = 0
    for place in places:
        for path in _children(place):
            if not path.name.startswith(TEMP_PREFIX) or _writer_alive(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            logger.info("removed %s, left by an interrupted write", path)
            removed += 1
    return removed


def _children(folder: Path) -> list[Path]:
    """The entries of `folder`; none when it is not a folder."""
    try:
        return [Path(entry.path) for entry in os.scandir(folder)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable. Best effort: some file systems refuse to fsync a folder, and the file it
    names is complete either way."""
    if os.name != "posix":
        return
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError as error:
        logger.debug("could not fsync %s: %s", folder, error)
    finally:
        os.close(handle)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        logger.warning("could not remove %s: %s", path, error)


def _subject_folder(key: str) -> str:
    """A subject key (digest:weight|... : not a safe file name) as a folder name."""
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _check_writable(folder: Path) -> None:
    """Create `folder` if missing and prove it writable with a probe file; ValueError naming it otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / _temp_name("-probe")
        handle = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(handle, b"probe")
        finally:
            os.close(handle)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot use {folder} as the gallery folder: a file is in the way; choose another "
                         f"outputs folder") from None
    except OSError as error:
        raise ValueError(f"cannot use {folder} as the gallery folder: {error.strerror or error}; choose a folder "
                         f"the studio can create and write to") from None


def _write_error(error: OSError, action: str, folder: Path) -> GalleryWriteError:
    cause = error.strerror or str(error)
    return GalleryWriteError(f"could not {action} in the gallery folder {folder}: {cause}; {_hint(error.errno)}",
                             error.errno)


def _hint(code: int | None) -> str:
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "free some disk space or choose another outputs folder"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "let the studio write there or choose another outputs folder"
    return "check the folder and try again"


# --- database ------------------------------------------------------------------------------------------------
def _connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the index in WAL mode at SCHEMA_VERSION; ValueError naming it when it cannot be read."""
    db = sqlite3.connect(path, timeout=10, check_same_thread=False)  # shared by threads behind Gallery._lock
    db.row_factory = sqlite3.Row
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            logger.warning("%s: the file system refused WAL mode (%s); concurrent readers will wait", path, mode)
        db.execute("PRAGMA synchronous=NORMAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ValueError(f"{path} was written by a newer FlexIP Studio (gallery schema {version}; this one reads "
                             f"up to {SCHEMA_VERSION}); update the studio or choose another outputs folder")
        if version < SCHEMA_VERSION:
            db.executescript(_SCHEMA)
            logger.info("created the gallery index %s (schema %d)", path, SCHEMA_VERSION)
    except sqlite3.DatabaseError as error:
        db.close()
        raise ValueError(f"{path} is not a readable gallery database ({error}); move it aside and the studio starts "
                         f"a new one") from None
    except BaseException:
        db.close()
        raise
    return db


def _filters(query, subject, gate_min, gate_max, since, until) -> tuple[str, list]:
    """The WHERE clause and its arguments for entries() and count()."""
    clauses, args = [], []
    if not isinstance(query, str):
        raise ValueError(f"query must be text, got {type(query).__name__}")
    if query:
        escaped = query.casefold().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        clauses.append("prompt_folded LIKE ? ESCAPE '\\'")
        args.append(f"%{escaped}%")
    if subject is not None:
        clauses.append("subject = ?")
        args.append(subject)
    for name, value, test in (("gate_min", gate_min, "gate >= ?"), ("gate_max", gate_max, "gate <= ?")):
        if value is not None:
            clauses.append(test)
            args.append(_number(value, name))
    for name, value, test in (("since", since, "created >= ?"), ("until", until, "created < ?")):
        if value is not None:
            clauses.append(test)
            args.append(_bound(value, name))
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args


def _bound(value, name: str) -> str:
    """A time bound as the stored text (UTC ISO 8601); ValueError naming it when it is not a time."""
    try:
        if isinstance(value, str):
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = datetime.fromtimestamp(value, timezone.utc)
        elif isinstance(value, date) and not isinstance(value, datetime):
            value = datetime.combine(value, time.min)
    except (ValueError, OverflowError, OSError):
        pass
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, a date, ISO 8601 text or POSIX seconds, got {value!r}")
    return _iso(value if value.tzinfo else value.replace(tzinfo=timezone.utc))


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _number(value, name: str) -> float | None:
    """None, or a finite number as float; ValueError naming it otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _lenient_number(value) -> float | None:
    try:
        return _number(value, "")
    except (TypeError, ValueError):
        return None


def _lenient_whole(value) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) < 2**63 else None  # what SQLite's INTEGER holds
    number = _lenient_number(value)
    return int(number) if number is not None and number.is_integer() and abs(number) < 2**63 else None


def _to_json(value, name: str) -> str:
    def plain(item):
        if hasattr(item, "item"):  # numpy scalars
            return item.item()
        if isinstance(item, (set, frozenset)):
            return sorted(item)
        raise TypeError(f"{type(item).__name__} is not JSON-serialisable")

    try:
        return json.dumps(value, ensure_ascii=False, default=plain)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} cannot be stored: {error}") from None
