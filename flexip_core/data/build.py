"""Write FlexIP training shards from public datasets' own formats (the modality recipe, flexip_core.data).

    python -m flexip_core.data.build --out data/shards \\
        --sam /data/sa1b --multiview /data/mvimgnet --videos /data/openvid \\
        --captioner Salesforce/blip-image-captioning-large --caption-table /data/openvid/OpenVid-1M.csv

Pairs from every source are interleaved and written to OUT/pairs-000000.tar, ... (`--samples-per-shard` each);
the printed summary (also OUT/summary.json) says what was kept and skipped, and why, and gives the `shards`
pattern for the training config. `--part K/N` builds the K-th of N disjoint parts (run N of them side by side;
their shards are PREFIX-pK-*.tar, their summaries summary-pK.json; a `shards = "OUT/pairs-*.tar"` glob reads all).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flexip_core.data.captions import Captioner, CaptionFiles
from flexip_core.data.multiview import multiview_pairs
from flexip_core.data.pairs import Pair, ShardSink, sample_key, sample_of
from flexip_core.data.sam import SubjectRules, sam_pairs
from flexip_core.data.video import FrameRules, video_pairs
from flexip_core.training.data import MODALITIES

logger = logging.getLogger(__name__)

EXAMPLES_KEPT = 5  # example items kept per skip reason in the summary


@dataclass(frozen=True)
class BuildSettings:
    """One build: where the data is, how pairs are chosen and captioned, how shards are written."""

    out: str  # folder the shards and the summary are written to
    sam: tuple[str, ...] = ()  # SAM-layout folders (sa_N.jpg + sa_N.json): invariant pairs
    multiview: tuple[str, ...] = ()  # folders of object folders holding views: variant pairs
    videos: tuple[str, ...] = ()  # folders of videos: variant pairs
    captioner: str | None = None  # image-to-text model (Hub id or folder) captioning pairs without a caption file
    caption_prompt: str | None = None  # text the model's captions start from (optional)
    caption_batch_size: int = 16  # images per captioning batch
    caption_table: str | None = None  # CSV of captions by file name (OpenVid-1M's layout), besides NAME.txt files
    subjects: SubjectRules = field(default_factory=SubjectRules)  # which SAM instances are subjects
    pairs_per_object: int = 2  # multi-view pairs drawn per object
    min_view_gap: int = 1  # the target view at least this many views (in name order) from the reference
    frames: FrameRules = field(default_factory=FrameRules)  # which video frames make a pair
    prefix: str = "pairs"  # shard file names: PREFIX-000000.tar, ...
    samples_per_shard: int = 1000  # samples per shard (WebDataset's usual shard is a few hundred MB)
    max_side: int = 1024  # images larger than this many px on their long side are downscaled (0: kept as they are)
    jpeg_quality: int = 95  # quality of the JPEGs written
    seed: int = 0  # seeds the multi-view draws
    part: tuple[int, int] = (0, 1)  # (k, n): build the k-th of n disjoint parts of every source

    def __post_init__(self):
        if not (self.sam or self.multiview or self.videos):
            raise ValueError("nothing to build from: give --sam, --multiview or --videos (one or more folders)")
        for folder in (*self.sam, *self.multiview, *self.videos):
            if not Path(folder).is_dir():
                raise ValueError(f"folder not found: {folder}")
        k, n = self.part
        if not 0 <= k < n:
            raise ValueError(f"part must be K/N with 0 <= K < N, got {k}/{n}")
        if self.samples_per_shard < 1 or self.caption_batch_size < 1 or self.pairs_per_object < 1:
            raise ValueError("samples_per_shard, caption_batch_size and pairs_per_object must be at least 1")
        if self.max_side < 0 or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"max_side must be 0 or more and jpeg_quality in [1, 100], got {self.max_side}, "
                             f"{self.jpeg_quality}")

    @property
    def file_prefix(self) -> str:
        """Shard names' prefix: PREFIX, or PREFIX-pK for part K of several."""
        k, n = self.part
        return f"{self.prefix}-p{k}" if n > 1 else self.prefix

    @property
    def summary_file(self) -> Path:
        k, n = self.part
        return Path(self.out) / (f"summary-p{k}.json" if n > 1 else "summary.json")


class Summary:
    """What a build kept and skipped, and why, per source."""

    def __init__(self):
        self.items = Counter()  # source -> images, objects or videos looked at
        self.kept = Counter()  # (source, modality) -> pairs written
        self.skipped: dict[str, Counter] = {}  # source -> reason -> count
        self.examples: dict[tuple[str, str], list[str]] = {}  # (source, reason) -> a few items skipped for it
        self.instances: dict[str, Counter] = {}  # source -> why instances were not chosen as subjects
        self.shards: list[str] = []

    def seen(self, source: str) -> None:
        self.items[source] += 1

    def skip(self, source: str, reason: str, item: str, detail=None) -> None:
        """One item or pair skipped. With a `detail` (an error) it is logged as a warning, else at debug level."""
        self.skipped.setdefault(source, Counter())[reason] += 1
        examples = self.examples.setdefault((source, reason), [])
        if len(examples) < EXAMPLES_KEPT:
            examples.append(f"{item} ({detail})" if detail else item)
        (logger.warning if detail else logger.debug)("%s %s skipped: %s%s", source, item, reason,
                                                     f" ({detail})" if detail else "")

    def keep(self, source: str, modality: str) -> None:
        self.kept[source, modality] += 1

    def count_instances(self, source: str, rejected: Counter) -> None:
        self.instances.setdefault(source, Counter()).update(rejected)

    def to_dict(self) -> dict:
        sources = sorted(set(self.items) | {s for s, _ in self.kept} | set(self.skipped))
        return {
            "pairs": sum(self.kept.values()),
            "by_modality": {m: sum(n for (_, mod), n in self.kept.items() if mod == m) for m in MODALITIES},
            "sources": {s: {"items": self.items[s],
                            "pairs": {m: self.kept[s, m] for m in MODALITIES if self.kept[s, m]},
                            "skipped": dict(self.skipped.get(s, {})),
                            "skipped_examples": {r: self.examples[s, r] for r in self.skipped.get(s, {})},
                            **({"instances_not_chosen": dict(self.instances[s])} if s in self.instances else {})}
                        for s in sources},
            "shards": self.shards,
        }

    def format(self) -> str:
        data = self.to_dict()
        modalities = ", ".join(f"{n} {m}" for m, n in data["by_modality"].items())
        lines = [f"kept {data['pairs']} pairs ({modalities}) in {len(self.shards)} shard(s)"]
        for source, info in data["sources"].items():
            pairs = sum(info["pairs"].values())
            skipped = sum(info["skipped"].values())
            reasons = ", ".join(f"{reason} {n}" for reason, n in Counter(info["skipped"]).most_common())
            lines.append(f"  {source}: {info['items']} looked at, {pairs} pairs kept, {skipped} skipped"
                         + (f" ({reasons})" if reasons else ""))
            if info.get("instances_not_chosen"):
                why = ", ".join(f"{r} {n}" for r, n in Counter(info["instances_not_chosen"]).most_common())
                lines.append(f"    instances not chosen as subjects: {why}")
        return "\n".join(lines)


def shard_pattern(paths: list[Path]) -> str | None:
    """The brace pattern naming `paths` (PREFIX-000000.tar .. PREFIX-000011.tar -> PREFIX-{000000..000011}.tar)."""
    if not paths:
        return None
    if len(paths) == 1:
        return str(paths[0])
    first, last = paths[0].name, paths[-1].name
    stem = first[:-len("000000.tar")]
    return str(paths[0].parent / f"{stem}{{{first[len(stem):-4]}..{last[len(stem):-4]}}}.tar")


def _interleave(generators):
    """One pair from each source in turn, until all are done (sources mix within shards)."""
    active = list(generators)
    while active:
        for generator in list(active):
            try:
                yield next(generator)
            except StopIteration:
                active.remove(generator)


def build(settings: BuildSettings) -> Summary:
    """Write the shards of `settings`; returns the summary (also written as JSON beside the shards)."""
    out = Path(settings.out)
    summary = Summary()
    files = CaptionFiles(settings.caption_table)
    part = settings.part
    sources = [sam_pairs(Path(f), settings.subjects, summary, part, files) for f in settings.sam]
    sources += [multiview_pairs(Path(f), summary, pairs_per_object=settings.pairs_per_object,
                                min_gap=settings.min_view_gap, seed=settings.seed, part=part, caption_file=files)
                for f in settings.multiview]
    sources += [video_pairs(Path(f), settings.frames, summary, part, files) for f in settings.videos]
    sink = ShardSink(out, settings.file_prefix, settings.samples_per_shard)
    captioner = None
    pending: list[Pair] = []

    def flush():
        nonlocal captioner
        uncaptioned = [p for p in pending if p.caption is None]
        if uncaptioned:
            if captioner is None:  # loaded once a pair needs it
                captioner = Captioner(settings.captioner, prompt=settings.caption_prompt,
                                      batch_size=settings.caption_batch_size)
            for pair, caption in zip(uncaptioned, captioner([p.target for p in uncaptioned]), strict=True):
                pair.caption = caption
        for pair in pending:
            if not pair.caption:
                summary.skip(pair.source, "the captioner wrote an empty caption", pair.name)
                continue
            sink.write(sample_of(pair, sample_key(sum(summary.kept.values()), pair), settings.max_side,
                                 settings.jpeg_quality))
            summary.keep(pair.source, pair.modality)
            if sum(summary.kept.values()) % 1000 == 0:
                logger.info("%d pairs written", sum(summary.kept.values()))
        pending.clear()

    try:
        for pair in _interleave(sources):
            if pair.caption is None and settings.captioner is None:
                summary.skip(pair.source, "no caption (no caption file; give --captioner MODEL)", pair.name)
                continue
            pending.append(pair)
            if sum(p.caption is None for p in pending) >= settings.caption_batch_size or len(pending) >= 256:
                flush()
        flush()
    finally:
        summary.shards = [str(p) for p in sink.close()]
    out.mkdir(parents=True, exist_ok=True)
    settings.summary_file.write_text(json.dumps({**summary.to_dict(), "shard_pattern": shard_pattern(sink.written),
                                "settings": asdict(settings)}, indent=2))
    return summary


def _part(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 0/8, got {text!r}") from None
    return k, n


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    defaults, rules, frames = BuildSettings.__dataclass_fields__, SubjectRules(), FrameRules()
    parser = argparse.ArgumentParser(prog="python -m flexip_core.data.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder the shards and summary.json are written to")
    data = parser.add_argument_group("data (each repeatable)")
    data.add_argument("--sam", action="append", default=[], help="SAM-layout folder (sa_N.jpg + sa_N.json): invariant")
    data.add_argument("--multiview", action="append", default=[], help="folder of object folders of views: variant")
    data.add_argument("--videos", action="append", default=[], help="folder of videos: variant")
    captions = parser.add_argument_group("captions (a NAME.txt beside a file is used first)")
    captions.add_argument("--captioner", help="image-to-text model (Hub id or folder), e.g. "
                          "Salesforce/blip-image-captioning-large; on the GPU when there is one")
    captions.add_argument("--caption-prompt", help="text the captions start from (BLIP: 'a photograph of')")
    captions.add_argument("--caption-batch-size", type=int, default=defaults["caption_batch_size"].default)
    captions.add_argument("--caption-table", help="CSV with a caption column and a video/image/file column")
    choice = parser.add_argument_group("pairs")
    choice.add_argument("--min-area", type=float, default=rules.min_area, help="SAM: smallest subject (image share)")
    choice.add_argument("--max-area", type=float, default=rules.max_area, help="SAM: largest subject (image share)")
    choice.add_argument("--border", type=float, default=rules.border, help="SAM: margin kept from each edge (share)")
    choice.add_argument("--min-fill", type=float, default=rules.min_fill, help="SAM: least share of its box filled")
    choice.add_argument("--max-subjects", type=int, default=rules.max_subjects, help="SAM: subjects per image")
    choice.add_argument("--pairs-per-object", type=int, default=defaults["pairs_per_object"].default,
                        help="multi-view pairs per object")
    choice.add_argument("--min-view-gap", type=int, default=defaults["min_view_gap"].default,
                        help="multi-view: views between reference and target, at least")
    choice.add_argument("--frame-gap", type=float, default=frames.gap, help="video: seconds from reference to target")
    choice.add_argument("--pairs-per-video", type=int, default=frames.pairs_per_video)
    choice.add_argument("--seed", type=int, default=0)
    output = parser.add_argument_group("shards")
    output.add_argument("--prefix", default=defaults["prefix"].default)
    output.add_argument("--samples-per-shard", type=int, default=defaults["samples_per_shard"].default)
    output.add_argument("--max-side", type=int, default=defaults["max_side"].default,
                        help="downscale larger images to this many px on the long side (0: keep)")
    output.add_argument("--jpeg-quality", type=int, default=defaults["jpeg_quality"].default)
    output.add_argument("--part", type=_part, default=(0, 1), help="K/N: build the K-th of N disjoint parts")
    args = parser.parse_args(argv)
    try:
        settings = BuildSettings(
            out=args.out, sam=tuple(args.sam), multiview=tuple(args.multiview), videos=tuple(args.videos),
            captioner=args.captioner, caption_prompt=args.caption_prompt, caption_batch_size=args.caption_batch_size,
            caption_table=args.caption_table,
            subjects=SubjectRules(min_area=args.min_area, max_area=args.max_area, border=args.border,
                                  min_fill=args.min_fill, max_subjects=args.max_subjects),
            pairs_per_object=args.pairs_per_object, min_view_gap=args.min_view_gap,
            frames=FrameRules(gap=args.frame_gap, pairs_per_video=args.pairs_per_video), prefix=args.prefix,
            samples_per_shard=args.samples_per_shard, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
            seed=args.seed, part=args.part)
        summary = build(settings)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.format())
    pattern = shard_pattern([Path(p) for p in summary.shards])
    if pattern:
        print(f'train with: shards = "{pattern}"')
    print(f"summary: {settings.summary_file}")
    return 0 if summary.shards else 1


if __name__ == "__main__":
    # Run the imported module's main, so that its logger is flexip_core.data.build rather than __main__.
    from flexip_core.data.build import main as _main

    sys.exit(_main())
