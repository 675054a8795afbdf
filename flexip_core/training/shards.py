"""Training pairs streamed from WebDataset tar shards (the `webdataset` package), split across processes and workers.

Layout, per sample KEY (the WebDataset convention: a sample is the files of a tar that share the part of their
name before the first dot; flexip_core.data.build writes it):

    KEY.jpg        the target (the image the model learns to draw)
    KEY.ref.jpg    the reference the adapters see (optional: the target itself when absent)
    KEY.mask.png   the subject's mask over the reference (optional: the reference is cut out by it)
    KEY.json       {"caption": "...", "modality": "invariant" | "variant"} (other keys are kept for the record)

Data order. Each process runs one stream per DataLoader worker (at least one); the stream numbered
`rank * workers + worker` reads, in epoch e, every (processes x workers)-th shard of a permutation of the shard
list seeded by (seed, e), shuffles their samples through a buffer seeded by (seed, e, stream), and decodes them
in its worker. So the processes read different shards, and the order depends only on the seed and the layout
(shards, processes, workers, batch size). A batch comes from one worker, and the DataLoader takes batches from
its workers in turn. Each item carries its stream's position (epoch, raw samples drawn in that epoch), and a
checkpoint keeps each stream's position: a resumed stream skips the epochs before it without reading them and
the samples of its epoch without decoding them, and the resumed DataLoader starts with the worker whose turn it
is, so a resumed run sees the same batches as an uninterrupted one. Bad samples (an undecodable image, a missing
caption, an unknown modality, a truncated shard) are logged and skipped, and counted in the training log.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from flexip_core.generation.images import load_reference_image, open_image
from flexip_core.training.data import MODALITIES, PairPixels, cut_out, mask_array

logger = logging.getLogger(__name__)

TARGET = "jpg"  # sample entries, by the part of the file name after the key's dot
REFERENCE = "ref.jpg"
MASK = "mask.png"
META = "json"
GLOB_CHARS = ("*", "?", "[")
ITEM_KEYS = ("key", "stream", "epoch", "position", "skipped")  # what ShardStream adds to a PairPixels item


def _is_url(entry: str) -> bool:
    return "://" in entry or entry.startswith("pipe:")


def relative_to(folder: str | Path, shards: str | list[str]) -> str | list[str]:
    """Shard patterns written in a config file, local relative ones made relative to the file's folder."""
    def one(entry):
        if not isinstance(entry, str) or _is_url(entry) or Path(entry).is_absolute():
            return entry
        return os.path.abspath(Path(folder) / entry)

    return one(shards) if isinstance(shards, str) else [one(entry) for entry in shards]


def expand_shards(shards: str | list[str]) -> list[str]:
    """Shard URLs from a pattern or a list of them: braces expanded ({000000..000511}), globs matched (local or
    fsspec); local files checked to exist. A ValueError names the entry that matched nothing."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    from webdataset.shardlists import expand_urls

    urls = []
    for entry in [shards] if isinstance(shards, str) else list(shards):
        for url in expand_urls(entry):
            if url.startswith("pipe:"):
                urls.append(url)
            elif any(c in url for c in GLOB_CHARS):
                fs, path = fsspec.core.url_to_fs(url)
                found = sorted(fs.glob(path))
                if not found:
                    raise ValueError(f"shards: {url} matches no file")
                local = isinstance(fs, LocalFileSystem)
                urls += [p if local else fs.unstrip_protocol(p) for p in found]
            else:
                if "://" not in url and not Path(url).is_file():
                    raise ValueError(f"shard not found: {url} (from shards entry {entry!r})")
                urls.append(url)
    duplicates = sorted(url for url, n in Counter(urls).items() if n > 1)
    if duplicates:
        raise ValueError(f"shards: {duplicates[0]} is listed more than once; each shard may appear once")
    if not urls:
        raise ValueError(f"shards: {shards!r} names no shard")
    return urls


def open_shard(url: str):
    """A readable binary stream: `pipe:COMMAND` through webdataset's gopen, anything else through fsspec."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url)
    import fsspec

    return fsspec.open(url, "rb").open()


def stream_shards(urls: list[str], seed: int, epoch: int, stream: int, num_streams: int) -> list[str]:
    """The shards data stream `stream` of `num_streams` reads in `epoch`: its share of a seeded permutation."""
    order = np.random.default_rng((seed, epoch)).permutation(len(urls))
    return [urls[i] for i in order[stream::num_streams]]


def raw_samples(urls: list[str], on_error: Callable[[object], bool]) -> Iterator[dict]:
    """Samples ({"__key__", "__url__", suffix: bytes}) of `urls` in order, undecoded; `on_error` is told of each
    shard that cannot be opened or read and of each broken entry (webdataset's handler: True goes on)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def opened():
        for url in urls:
            try:
                stream = open_shard(url)
            except (OSError, ValueError) as error:
                on_error(f"{url} cannot be opened ({error})")
                continue
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    return group_by_keys(tar_file_expander(opened(), handler=on_error), handler=on_error)


def check_streams(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every data stream (process x DataLoader worker) needs a shard of its own; a ValueError says what to change."""
    streams = world_size * max(1, num_workers)
    if num_shards < streams:
        raise ValueError(f"{num_shards} shard(s) for {world_size} process(es) x {max(1, num_workers)} data worker(s): "
                         f"each of the {streams} data streams reads its own shards; write more, smaller shards "
                         "(python -m flexip_core.data.build --samples-per-shard) or lower num_workers")


def decode_sample(sample: dict, pixels: PairPixels) -> dict:
    """A PairPixels item from one sample's raw files; a ValueError says what is wrong with it."""
    key = sample.get("__key__", "?")
    missing = [f"{key}.{part}" for part in (TARGET, META) if part not in sample]
    if missing:
        raise ValueError(f"no {' and no '.join(missing)} (a sample needs KEY.{TARGET} and KEY.{META}); "
                         f"it has {', '.join(sorted(k for k in sample if not k.startswith('__'))) or 'nothing'}")
    try:
        meta = json.loads(sample[META])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{key}.{META} is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key}.{META} must hold a JSON object, got {type(meta).__name__}")
    caption = meta.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{key}.{META} has no caption; every pair needs text describing its target")
    if meta.get("modality") not in MODALITIES:
        raise ValueError(f"{key}.{META}: modality {meta.get('modality')!r} unknown; use one of {', '.join(MODALITIES)}")
    target = _image(load_reference_image, sample[TARGET], f"{key}.{TARGET}")
    reference = _image(load_reference_image, sample[REFERENCE], f"{key}.{REFERENCE}") if REFERENCE in sample else target
    if MASK in sample:
        mask = mask_array(_image(open_image, sample[MASK], f"{key}.{MASK}"), reference.size, f"{key}.{MASK}")
        reference = cut_out(reference, mask)
    return pixels(target, reference, " ".join(caption.split()), MODALITIES.index(meta["modality"]))


def _image(read, data: bytes, name: str):
    """`read` (load_reference_image or open_image) of a sample's file; every decoding failure a ValueError (PIL
    raises OSError for a header cut short)."""
    try:
        return read(data, name=name)
    except OSError as error:
        raise ValueError(f"{name}: image data is truncated or corrupt ({error})") from None


class ShardStream(torch.utils.data.IterableDataset):
    """This process's training items from the shards, endless: one data stream per DataLoader worker.

    `start` maps a worker's stream (0 .. workers-1) to its position [epoch, samples drawn in that epoch]; a stream
    not in it starts at `first_epoch`; `rotation` is the worker whose batch comes first (micro-steps done so far,
    modulo the workers).
    """

    def __init__(self, urls: list[str], pixels: PairPixels, *, seed: int, rank: int, world_size: int,
                 num_workers: int, shuffle_buffer: int, start: dict[int, list[int]] | None = None,
                 first_epoch: int = 0, rotation: int = 0):
        self.workers = max(1, num_workers)
        check_streams(len(urls), world_size, num_workers)
        self.urls, self.pixels = urls, pixels
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.start, self.first_epoch = dict(start or {}), first_epoch
        self.rotation = rotation % self.workers
        self._bad = 0  # bad samples and unreadable shards met since the last item yielded (per worker)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        local = (worker + self.rotation) % self.workers  # the stream whose turn matches this worker's batches
        epoch, position = self.start.get(local, (self.first_epoch, 0))
        yield from self._stream(local, int(epoch), int(position))

    def _skip(self, error: Exception) -> bool:
        """webdataset's error handler: log, count, go on with the next file or shard."""
        logger.warning("shards: %s; skipped", error)
        self._bad += 1
        return True

    def _stream(self, local: int, epoch: int, skip: int) -> Iterator[dict]:
        import webdataset as wds

        number = self.rank * self.workers + local  # this stream among every process's
        count = self.world_size * self.workers
        while True:
            urls = stream_shards(self.urls, self.seed, epoch, number, count)
            state = np.random.SeedSequence([self.seed, epoch, number]).generate_state(1)[0]
            rng = random.Random(int(state))
            shuffle = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
            shuffled = shuffle(raw_samples(urls, self._skip))
            good = 0
            for position, sample in enumerate(shuffled, start=1):
                if position <= skip:  # consumed before the checkpoint: not decoded again
                    continue
                try:
                    item = decode_sample(sample, self.pixels)
                except ValueError as error:
                    self._skip(f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}: {error}")
                    continue
                good += 1
                item.update(key=sample["__key__"], stream=local, epoch=epoch, position=position, skipped=self._bad)
                self._bad = 0
                yield item
            if good == 0 and skip == 0:
                raise ValueError(f"data stream {number} (process {self.rank}): its shards of epoch {epoch} "
                                 f"({', '.join(urls)}) hold no usable sample")
            epoch, skip = epoch + 1, 0


class ShardBatches:
    """This process's micro-batches from the shards, and where each of its data streams stands (for checkpoints).

    `micro_step`: micro-steps already done (a resumed run's); `saved`: this process's stream positions from the
    checkpoint ({stream: [epoch, position]}), and `first_epoch` where the others start (resume_positions).
    """

    def __init__(self, urls: list[str], pixels: PairPixels, *, seed: int, rank: int, world_size: int,
                 batch_size: int, num_workers: int, shuffle_buffer: int, micro_step: int = 0,
                 saved: dict[int, list[int]] | None = None, first_epoch: int = 0):
        self.positions = {int(k): list(v) for k, v in (saved or {}).items()}
        self.dataset = ShardStream(urls, pixels, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                                   shuffle_buffer=shuffle_buffer, start=self.positions, first_epoch=first_epoch,
                                   rotation=micro_step)
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, num_workers=num_workers)
        self.skipped = 0  # bad samples met by this process's streams since the last take_skipped()

    def __iter__(self) -> Iterator[dict]:
        for raw in self.loader:
            self.positions[int(raw["stream"][-1])] = [int(raw["epoch"][-1]), int(raw["position"][-1])]
            self.skipped += int(raw["skipped"].sum())
            yield {k: v for k, v in raw.items() if k not in ITEM_KEYS}

    def take_skipped(self) -> int:
        count, self.skipped = self.skipped, 0
        return count

    def state(self) -> dict[int, list[int]]:
        """Each stream's position after the batches taken so far (what a checkpoint keeps)."""
        return {k: list(v) for k, v in self.positions.items()}


def resume_positions(saved: list[dict], rank: int, same_layout: bool) -> tuple[dict[int, list[int]], int]:
    """(this process's stream positions, the epoch other streams start at) from a checkpoint's list of every
    process's positions. With another layout (processes, workers, shards) the streams cannot continue where they
    were: all restart at the start of the earliest epoch any stream was in (some samples are seen again; logged)."""
    if not saved:
        return {}, 0
    if same_layout:
        return saved[rank], 0
    earliest = min((epoch for streams in saved for epoch, _ in streams.values()), default=0)
    logger.warning("the data layout changed since the checkpoint: every data stream restarts at epoch %d", earliest)
    return {}, earliest
