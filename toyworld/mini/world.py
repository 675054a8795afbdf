"""The toy world as FlexIP-mini sees it: held-out scenes, captions with optional parts, datasets and test cases."""
from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from toyworld import world as tw

logger = logging.getLogger(__name__)

NATIVE_SIZE = 64  # mini renders and generates at 64 px (the pipeline's and trainer's smallest side)
SCENE_NAMES = tuple(tw.EDITABLE_ATTRIBUTES)  # background, scale, position, pose, style


def scene_index(scene: tw.Scene) -> int:
    return sum(values.index(getattr(scene, name)) for name, values in tw.EDITABLE_ATTRIBUTES.items())


def scene_is_heldout(scene: tw.Scene) -> bool:
    """About a fifth of the scenes (prompts) never appear in training; every pair of their values still does."""
    return scene_index(scene) % 5 == 0


def scenes_in(split: str) -> list[tw.Scene]:
    """Every scene of a split ('train', 'heldout' or 'all'), in a fixed order."""
    every = [tw.Scene(*values) for values in itertools.product(*tw.EDITABLE_ATTRIBUTES.values())]
    if split == "all":
        return every
    return [s for s in every if scene_is_heldout(s) == (split == "heldout")]


def noun(subject: tw.Subject | None) -> str:
    """'toy', or the subject's identity in words ('red striped star')."""
    if subject is None:
        return "toy"
    return f"{subject.colour} {tw._PATTERN_WORDS[subject.pattern]} {subject.shape}"


def describe(scene: tw.Scene, keep: set[str] | None = None, subject: tw.Subject | None = None) -> str:
    """A caption naming the scene attributes in `keep` (all by default); with every attribute and no subject it is
    exactly toyworld.prompt_for(scene)."""
    keep = set(SCENE_NAMES) if keep is None else keep
    adjectives = [getattr(scene, name) for name in ("scale", "pose") if name in keep]
    text = f"a {', '.join(adjectives)} {noun(subject)}" if adjectives else f"a {noun(subject)}"
    if "position" in keep:
        text += " " + tw._POSITION_PHRASES[scene.position]
    if "background" in keep:
        text += f", on a {scene.background} background"
    if "style" in keep:
        text += f", {scene.style} style"
    return text


def random_caption(rng: np.random.Generator, subject: tw.Subject, scene: tw.Scene, keep_p: float,
                   identity_p: float) -> str:
    """A caption of a render that names each scene attribute with probability keep_p and the identity with
    identity_p (the base model learns every attribute alone and in combination)."""
    keep = {name for name in SCENE_NAMES if rng.random() < keep_p}
    return describe(scene, keep, subject if rng.random() < identity_p else None)


@dataclass(frozen=True)
class Case:
    """One slider test case: a subject shown in a reference scene, and a prompt asking for another scene and,
    when `colour` is set, for the subject in another colour (an edit that costs identity)."""

    subject: tw.Subject  # identity to keep
    reference: tw.Scene  # scene of the reference image
    target: tw.Scene  # scene the prompt asks for
    colour: str | None = None  # body colour the prompt asks for, never the subject's own

    @property
    def prompt(self) -> str:
        return tw.prompt_for(self.target, self.colour)

    def reference_image(self, size: int = NATIVE_SIZE):
        return tw.render(self.subject, self.reference, size)


def sample_cases(n: int, seed: int, split: str = "heldout", recolour: bool = False) -> list[Case]:
    """n cases: subjects and prompt scenes from `split`, reference scenes from training scenes, each prompt scene
    differing from its reference in every attribute where the world allows it (a clear conflict); with `recolour`
    each prompt also asks for a colour other than the subject's (the same cases otherwise)."""
    rng = np.random.default_rng((seed, 7))
    colours = np.random.default_rng((seed, 8))
    subjects = tw.sample_subjects(n, seed, split)
    targets = scenes_in(split)
    references = scenes_in("train")
    cases = []
    for subject in subjects:
        target = targets[rng.integers(len(targets))]
        candidates = [r for r in references
                      if sum(getattr(r, a) != getattr(target, a) for a in SCENE_NAMES) == len(SCENE_NAMES)]
        colour = None
        if recolour:
            others = [c for c in tw.COLOURS if c != subject.colour]
            colour = others[colours.integers(len(others))]
        cases.append(Case(subject, candidates[rng.integers(len(candidates))], target, colour))
    return cases


def write_adapter_manifest(out_dir: str | Path, n_pairs: int, seed: int, invariant_keep_p: float = 0.5,
                           cutout_fraction: float = 0.3, size: int = NATIVE_SIZE,
                           invariant_conflict_p: float = 0.0, conflict_colour_p: float = 0.0) -> Path:
    """Adapter training pairs of training subjects in training scenes, as a flexip_core.training.data manifest.

    Invariant: reference = target (or its cut-out on white, in place); its caption names each scene attribute
    only with probability invariant_keep_p, so the preservation branch learns to carry what the text leaves out;
    with probability invariant_conflict_p it describes another whole scene instead, so that at a high gate the
    reference holds against a prompt that asks for something else (the identity end of the slider); such a caption
    also asks for another body colour with probability conflict_colour_p, so that the reference's colour holds
    against a colour word too (a base that follows colour words well otherwise recolours the subject at any gate).
    Variant: reference = the subject in another scene; the caption names the whole target scene and never the
    identity, so the personalization branch learns to follow the text and take only what it can from the image.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((seed, 11))
    subjects = tw.sample_subjects(n_pairs, seed, "train")
    scenes = scenes_in("train")
    manifest = out_dir / "manifest.jsonl"
    with manifest.open("w") as handle:
        for i, subject in enumerate(subjects):
            target = scenes[rng.integers(len(scenes))]
            if rng.random() < 0.5:
                modality = "invariant"
                reference = tw.cutout_scene(target) if rng.random() < cutout_fraction else target
                keep = {name for name in SCENE_NAMES if rng.random() < invariant_keep_p}
                text = describe(target, keep)
                if rng.random() < invariant_conflict_p:
                    other, colour = scenes[rng.integers(len(scenes))], None
                    if rng.random() < conflict_colour_p:
                        others = [c for c in tw.COLOURS if c != subject.colour]
                        colour = others[rng.integers(len(others))]
                    text = tw.prompt_for(other, colour)
            else:
                modality = "variant"
                reference = scenes[rng.integers(len(scenes))]
                while reference == target:
                    reference = scenes[rng.integers(len(scenes))]
                text = describe(target)
            target_path = f"images/{i:06d}_target.png"
            tw.render(subject, target, size).save(out_dir / target_path)
            reference_path = target_path
            if reference != target:
                reference_path = f"images/{i:06d}_reference.png"
                tw.render(subject, reference, size).save(out_dir / reference_path)
            record = {"target": target_path, "reference": reference_path, "caption": text, "modality": modality,
                      "subject": asdict(subject), "scene": asdict(target), "reference_scene": asdict(reference)}
            handle.write(json.dumps(record) + "\n")
    logger.info("wrote %d adapter training pairs to %s", n_pairs, manifest)
    return manifest
