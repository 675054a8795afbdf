"""The lasting gallery (ui.gallery, issue 33): renders and subjects kept across restarts, refusals, a full disk,
kill -9 in the middle of a write, threads. Fast: tiny images, no models."""
from __future__ import annotations

import errno
import os
import queue
import re
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from flexip_core.generation.metadata import read_generation
from flexip_core.generation.settings import Generation
from tests.conftest import REPO
from ui import gallery as gallery_module
from ui.gallery import TEMP_PREFIX, Entry, Gallery, GalleryWriteError


def picture(shade: int = 0, side: int = 32) -> Image.Image:
    return Image.new("RGB", (side, side), (shade % 256, 40, 200))


def params(prompt: str = "a dog on the beach", gate: float = 0.5, seed: int = 42, **extra) -> dict:
    return Generation(prompt=prompt, gate=gate, seed=seed, negative_prompt="blurry").to_parameters() | extra


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def temps_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.startswith(TEMP_PREFIX)]


@pytest.fixture
def gallery(tmp_path):
    with Gallery.open(tmp_path / "outputs") as opened:
        yield opened


# --- round trip ------------------------------------------------------------------------------------------------
def test_add_get_delete_round_trip(gallery):
    parameters = params(profile="tiny", identity_metric="dino")
    entry = gallery.add(picture(), parameters, subject="abc:1", identity=0.71, warnings=["prompt cut off"])

    relative = Path(entry.path).relative_to(gallery.folder).as_posix()
    assert re.fullmatch(r"images/\d{4}-\d{2}-\d{2}/flexip-g0\.50-s42-[0-9a-f]{8}\.png", relative)
    assert relative.split("/")[1] == datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert (entry.prompt, entry.gate, entry.seed, entry.subject, entry.identity) == (
        "a dog on the beach", 0.5, 42, "abc:1", 0.71)
    assert entry.warnings == ("prompt cut off",) and entry.parameters == parameters
    assert datetime.fromisoformat(entry.created).utcoffset() == timedelta(0)
    assert entry.generation == Generation(prompt="a dog on the beach", gate=0.5, seed=42, negative_prompt="blurry")

    with Image.open(entry.path) as image:  # the PNG carries the A1111-style chunk the studio reads back
        generation, chunk = read_generation(image)
        assert image.size == (32, 32)
    assert generation == entry.generation and chunk["profile"] == "tiny"

    assert gallery.get(entry.id) == entry and gallery.entries() == [entry] and gallery.count() == 1
    assert gallery.delete(entry.id) is True
    assert not Path(entry.path).exists() and gallery.get(entry.id) is None and gallery.entries() == []
    assert gallery.delete(entry.id) is False and gallery.count() == 0
    assert temps_under(gallery.folder) == []


def test_a_restart_lists_the_same_entries_and_subjects(tmp_path):
    folder = tmp_path / "outputs"
    photo = tmp_path / "photo.png"
    picture(9).save(photo)
    with Gallery.open(folder) as first:
        added = [first.add(picture(i), params(f"scene {i}", seed=i), subject="s", identity=i / 10) for i in range(3)]
        first.remember_subject("s", [str(photo)], [1.0], ["photo.png"])
        before = first.entries()
    with Gallery.open(folder) as again:
        assert again.entries() == before == added[::-1]
        assert [again.get(entry.id) for entry in added] == added
        assert again.subject("s").renders == 3 and again.integrity() == "ok"
        assert again.add(picture(), params("after"), subject="s").id > max(entry.id for entry in added)


def test_a_file_deleted_by_hand_is_dropped(tmp_path, caplog):
    folder = tmp_path / "outputs"
    with Gallery.open(folder) as gallery:
        kept, gone, later = (gallery.add(picture(i), params(f"p{i}"), subject="") for i in range(3))
        Path(later.path).unlink()
        assert gallery.entries() == [gone, kept] and gallery.count() == 2  # checked when listed, without a restart
        assert gallery.get(later.id) is None
        Path(gone.path).unlink()
    with caplog.at_level("INFO", logger="ui.gallery"):
        with Gallery.open(folder) as reopened:
            assert reopened.count() == 1 and reopened.entries() == [kept]
    assert "dropped 1 gallery rows whose file is missing" in caplog.text


# --- search, filters, order, pages ---------------------------------------------------------------------------
def test_search_filter_sort_and_pages(gallery):
    made = {}
    for prompt, gate, identity, subject in [
        ("A RED car", 0.0, 0.2, "one"),
        ("a red_house", 0.25, None, "one"),
        ("100% blue sky", 0.5, 0.9, "two"),
        ("blue house", 0.75, 0.5, "two"),
        ("Café scene", 1.0, 0.7, "one"),
    ]:
        made[prompt] = gallery.add(picture(), params(prompt, gate=gate), subject=subject, identity=identity)
        time.sleep(0.002)  # distinct creation times
    order = list(made.values())

    def prompts(entries):
        return [entry.prompt for entry in entries]

    assert gallery.entries() == order[::-1] and gallery.entries(sort="oldest") == order
    assert prompts(gallery.entries("red")) == ["a red_house", "A RED car"]  # any case
    assert prompts(gallery.entries("_")) == ["a red_house"]  # _ and % are plain characters, not wildcards
    assert prompts(gallery.entries("%")) == ["100% blue sky"]
    assert prompts(gallery.entries("red_h")) == ["a red_house"] and gallery.entries("redxh") == []
    assert prompts(gallery.entries("CAFÉ")) == ["Café scene"]  # folded beyond ASCII
    assert prompts(gallery.entries("house", subject="two")) == ["blue house"]
    assert gallery.count("house") == 2 and gallery.count(subject="one") == 3
    assert prompts(gallery.entries(gate_min=0.25, gate_max=0.75, sort="gate")) == [
        "a red_house", "100% blue sky", "blue house"]
    assert [entry.gate for entry in gallery.entries(sort="gate")] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [entry.identity for entry in gallery.entries(sort="identity")] == [0.9, 0.7, 0.5, 0.2, None]

    middle = datetime.fromisoformat(made["100% blue sky"].created)
    assert prompts(gallery.entries(since=middle, sort="oldest")) == ["100% blue sky", "blue house", "Café scene"]
    assert prompts(gallery.entries(until=middle, sort="oldest")) == ["A RED car", "a red_house"]
    assert gallery.entries(since=middle.isoformat(), until=middle + timedelta(microseconds=1)) == [
        made["100% blue sky"]]
    assert gallery.entries(since=datetime.now(timezone.utc) + timedelta(days=1)) == []

    pages = [gallery.entries(limit=2, offset=offset) for offset in (0, 2, 4, 6)]
    assert [len(page) for page in pages] == [2, 2, 1, 0]
    assert [entry for page in pages for entry in page] == order[::-1]


@pytest.mark.parametrize("arguments, named", [
    ({"limit": 0}, "limit"), ({"limit": 5000}, "limit"), ({"limit": True}, "limit"), ({"offset": -1}, "offset"),
    ({"sort": "random"}, "sort"), ({"gate_min": "high"}, "gate_min"), ({"since": "yesterday"}, "since"),
])
def test_bad_listing_arguments_are_refused_by_name(gallery, arguments, named):
    with pytest.raises(ValueError, match=named):
        gallery.entries(**arguments)


# --- refusals ----------------------------------------------------------------------------------------------
def test_a_file_in_the_way_is_refused(tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=re.escape(str(blocker))):
        Gallery.open(blocker)
    with pytest.raises(ValueError, match=re.escape(str(blocker / "inner"))):
        Gallery.open(blocker / "inner")
    assert blocker.read_text() == "not a folder"


def test_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "outputs"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes into a 0o500 folder regardless: refuse its files instead
        real_open = os.open

        def refusing_open(path, *args, **kwargs):
            if Path(path).parent == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    else:
        folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=re.escape(str(folder)) + ".*Permission denied"):
            Gallery.open(folder)
    finally:
        folder.chmod(0o700)
    assert not (folder / "gallery.sqlite").exists()


def test_a_corrupt_index_is_refused_by_name(tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    (folder / "gallery.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=re.escape(str(folder / "gallery.sqlite")) + ".*not a readable"):
        Gallery.open(folder)


def test_values_that_cannot_be_stored_are_refused_before_any_write(gallery):
    with pytest.raises(ValueError, match="CMYK"):
        gallery.add(Image.new("CMYK", (8, 8)), params(), subject="")
    with pytest.raises(ValueError, match="parameters cannot be stored"):
        gallery.add(picture(), params(extra=object()), subject="")
    with pytest.raises(ValueError, match="identity"):
        gallery.add(picture(), params(), subject="", identity=float("nan"))
    assert files_under(gallery.folder / "images") == [] and gallery.count() == 0


# --- a full disk ---------------------------------------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_written_png(image, path, parameters):
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n half")  # what a full disk leaves: the start of the file
    no_space()


@pytest.mark.parametrize("fault", ["png", "fsync", "rename", "row"])
def test_a_full_disk_leaves_no_file_and_no_row(gallery, monkeypatch, fault):
    before = gallery.add(picture(), params("before"), subject="")
    if fault == "png":
        monkeypatch.setattr(gallery_module, "save_png", half_written_png)
    elif fault == "fsync":
        monkeypatch.setattr(gallery_module.os, "fsync", no_space)
    elif fault == "rename":
        monkeypatch.setattr(gallery_module.os, "replace", no_space)
    else:
        def full_database(row):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(gallery, "_insert", full_database)

    with pytest.raises(GalleryWriteError) as raised:
        gallery.add(picture(), params("lost"), subject="")
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, OSError)
    assert str(gallery.folder) in str(raised.value) and "free some disk space" in str(raised.value)
    assert files_under(gallery.folder / "images") == [Path(before.path)]  # no partial file, no temporary
    monkeypatch.undo()
    assert gallery.entries() == [before] and gallery.count() == 1

    after = gallery.add(picture(), params("after"), subject="")  # still usable
    assert [entry.prompt for entry in gallery.entries()] == ["after", "before"] and Path(after.path).is_file()


# --- kill -9 in the middle -----------------------------------------------------------------------------------
CHILD = r"""
import os, sys, time
from PIL import Image
from flexip_core.generation.settings import Generation
from ui.gallery import Gallery

folder, stall_after, stall_at = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print("imports", "torch" in sys.modules, "gradio" in sys.modules, flush=True)
gallery = Gallery.open(folder)

def stall(*args, **kwargs):
    print("stalled", flush=True)
    time.sleep(60)

for i in range(100_000):
    if i == stall_after and stall_at == "rename":
        os.replace = stall  # the PNG is written and fsync'ed under its temporary name
    if i == stall_after and stall_at == "row":
        Gallery._insert = stall  # the PNG has its final name; its row is not written yet
    noise = Image.frombytes("RGB", (96, 96), os.urandom(96 * 96 * 3))
    gallery.add(noise, Generation(prompt=f"render {i}", seed=i).to_parameters(), subject="child")
    print("added", i, flush=True)
"""


def run_child_until(folder: Path, stall_after: int, stall_at: str, enough) -> tuple[list[str], int]:
    """Start a child that adds renders in a loop; SIGKILL it once `enough(lines)`; its lines and pid."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(stall_after), stall_at], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in child.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + 5
    try:
        while not enough(seen):
            try:
                seen.append(lines.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"the child did not get far enough in 5 s: {seen}; {child.stderr.read()[-2000:]}")
    finally:
        child.kill()  # SIGKILL
        child.wait(timeout=5)  # reaped: its pid no longer names a live process
    return seen, child.pid


@pytest.mark.parametrize("stall_at", ["anywhere", "rename", "row"])
def test_kill_9_in_the_middle_of_a_write(tmp_path, stall_at):
    folder = tmp_path / "outputs"
    if stall_at == "anywhere":  # killed wherever the busy loop happens to be
        seen, pid = run_child_until(folder, 10**9, stall_at, lambda seen: sum("added" in x for x in seen) >= 4)
    else:  # killed at a chosen point of the 4th add
        seen, pid = run_child_until(folder, 3, stall_at, lambda seen: "stalled" in seen)
    assert seen[0] == "imports False False"  # torch-free and gradio-free at import
    added = {f"render {line.split()[1]}" for line in seen if line.startswith("added")}
    left = temps_under(folder)
    if stall_at == "rename":
        assert [path.name.startswith(f"{TEMP_PREFIX}{pid}-") for path in left] == [True]

    with Gallery.open(folder) as reopened:
        assert temps_under(folder) == []
        entries = reopened.entries(limit=1000)
        pngs = {str(path) for path in (folder / "images").rglob("*.png")}
        assert {entry.path for entry in entries} == pngs  # exactly the complete PNGs, each once
        for entry in entries:
            with Image.open(entry.path) as image:
                image.load()  # complete: decodes to the end
                assert read_generation(image)[1]["prompt"] == entry.prompt
        prompts = {entry.prompt for entry in entries}
        assert added <= prompts and len(prompts - added) <= 1  # at most the add in flight, when it got its name
        if stall_at == "rename":
            assert prompts == added == {"render 0", "render 1", "render 2"}
        if stall_at == "row":  # renamed into place, then killed before its row: indexed again from its chunk
            assert prompts - added == {"render 3"}
            assert [entry.subject for entry in entries if entry.prompt == "render 3"] == [""]
        assert reopened.integrity() == "ok" and reopened.count() == len(entries)
        assert reopened.add(picture(), params("after the crash"), subject="").prompt == "after the crash"


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    folder = tmp_path / "outputs"
    with Gallery.open(folder) as gallery:
        day = gallery.images_folder / "2025-01-01"
        day.mkdir(parents=True)
        ours = day / gallery_module._temp_name(".part")  # this process's: still being written
        earlier = day / f"{TEMP_PREFIX}{os.getpid()}-00000000-deadbeef.part"  # same pid, an earlier process
        for path in (ours, earlier):
            path.write_bytes(b"partial")
    Gallery.open(folder).close()
    assert ours.exists() and not earlier.exists()


# --- threads -------------------------------------------------------------------------------------------------
def test_concurrent_adds_from_four_threads_all_land(gallery):
    start = threading.Barrier(4)
    made: list[Entry] = []
    errors = []

    def worker(thread: int):
        start.wait()
        try:
            for index in range(6):
                made.append(gallery.add(picture(index), params(f"t{thread}-{index}", gate=0.5, seed=42),
                                        subject=f"thread {thread}"))
        except Exception as error:  # reported below with the others
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert errors == [] and len(made) == 24
    assert len({entry.path for entry in made}) == 24 and len({entry.id for entry in made}) == 24
    listed = gallery.entries(limit=1000)
    assert {entry.id for entry in listed} == {entry.id for entry in made}
    assert all(Path(entry.path).is_file() for entry in listed)
    assert len(files_under(gallery.images_folder)) == 24 and gallery.integrity() == "ok"


# --- subjects ------------------------------------------------------------------------------------------------
def test_subjects_are_remembered_once_and_listed_with_their_renders(tmp_path):
    folder, uploads = tmp_path / "outputs", tmp_path / "uploads"
    uploads.mkdir()
    sources = []
    for index in range(2):
        sources.append(uploads / f"photo-{index}.png")
        picture(index * 50).save(sources[-1])
    first_key, second_key = "d1:1|d2:0.5", "d3:1"  # session fingerprints: not file names
    with Gallery.open(folder) as gallery:
        gallery.remember_subject(first_key, [str(path) for path in sources], [1.0, 0.5], ["dog.png", "dog2.jpg"])
        first = gallery.subject(first_key)
        gallery.remember_subject(first_key, [str(sources[0])], [1.0], ["other.png"])  # once per key: unchanged
        assert gallery.subject(first_key) == first
        time.sleep(0.002)
        gallery.remember_subject(second_key, [str(sources[1])], [1.0], ["cat.png"])
        for index in range(3):
            gallery.add(picture(), params(f"p{index}"), subject=first_key if index else second_key)
    for path in sources:
        path.unlink()  # the upload expired; the copies stay

    with Gallery.open(folder) as gallery:
        listed = gallery.subjects()
        assert [subject.key for subject in listed] == [second_key, first_key]  # newest first
        assert [subject.renders for subject in listed] == [1, 2]
        first = gallery.subject(first_key)
        assert first.weights == (1.0, 0.5) and first.names == ("dog.png", "dog2.jpg")
        assert all(gallery.contains(photo) for photo in first.photos)
        for photo, shade in zip(first.photos, (0, 50)):
            with Image.open(photo) as image:
                assert image.getpixel((0, 0)) == (shade, 40, 200)
        assert gallery.subject("unknown") is None and temps_under(folder) == []


def test_a_subject_that_cannot_be_kept_leaves_nothing(gallery, tmp_path, monkeypatch):
    photo = tmp_path / "photo.png"
    picture().save(photo)
    with pytest.raises(ValueError, match="missing.png"):
        gallery.remember_subject("k", [str(photo), str(tmp_path / "missing.png")], [1, 1], ["a.png", "missing.png"])
    with pytest.raises(ValueError, match="one weight and one name per photo"):
        gallery.remember_subject("k", [str(photo)], [1.0, 1.0], ["a.png"])
    monkeypatch.setattr(gallery_module.shutil, "copyfile", no_space)
    with pytest.raises(GalleryWriteError, match="free some disk space"):
        gallery.remember_subject("k", [str(photo)], [1.0], ["a.png"])
    monkeypatch.undo()
    assert gallery.subjects() == [] and files_under(gallery.folder / "subjects") == []
    gallery.remember_subject("k", [str(photo)], [1.0], ["a.png"])
    assert gallery.subject("k").photos[0].startswith(str(gallery.subjects_folder))


# --- serving only the studio's files -------------------------------------------------------------------------
def test_contains_refuses_paths_outside(gallery, tmp_path):
    entry = gallery.add(picture(), params(), subject="")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    link = gallery.folder / "images" / "link.png"
    link.symlink_to(outside)
    sibling = tmp_path / (gallery.folder.name + "-other") / "x.png"  # shares the folder's name as a prefix

    assert gallery.contains(entry.path) and gallery.contains(Path(entry.path))
    assert gallery.contains(gallery.folder / "images" / "not-yet.png")
    assert not gallery.contains(outside)
    assert not gallery.contains(link)  # a symlink out
    assert not gallery.contains(f"{gallery.folder}/images/../../secret.png")
    assert not gallery.contains(sibling) and not gallery.contains("/etc/passwd")
    assert not gallery.contains(gallery.folder)  # the folder itself is not a file in it
