"""The toy world as a profile's world plugin (profile field `world: "toyworld.plugin"`): its identity and prompt
metrics, its prompt filter and its note on reference photos. The core imports this module only by that name."""
from __future__ import annotations

from PIL import Image

from toyworld.oracle import NOT_A_TOY, identity_kept, prompt_fraction, read_attributes, read_toy
from toyworld.world import known_words, parse_prompt, unknown_words_note

IDENTITY_METRIC = "toyworld"  # the oracle's share of the reference toy's shape, colour and pattern found
PROMPT_METRIC = "toyworld_prompt"  # the oracle's share of the scene attributes (and colour) a prompt asks for found


def identity_scores(images: list[Image.Image], references: list[Image.Image]) -> list[float | None]:
    """Per image, the share of the first reference's identity attributes the oracle finds in it (None where the
    reference is not a toy of this world)."""
    return identity_kept(images, references[0])


def prompt_scores(images: list[Image.Image], prompts: list[str]) -> list[float | None]:
    """Per image, the share of what its prompt asks for (background, scale, position, pose, style, a colour) that
    the oracle finds in it (None where the prompt asks for none of them); the slider calibration's prompt score."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
    requested = [parse_prompt(prompt) for prompt in prompts]
    return [prompt_fraction(read_attributes(image), asked) if asked else None
            for image, asked in zip(images, requested)]


def model_text(text: str, what: str) -> tuple[str, str | None]:
    """The text with only the words the world's captions used (any other word, never trained, makes the model draw
    noise), and a note naming those left out (None when all were known)."""
    note = unknown_words_note(text, what)
    return (text, None) if note is None else (known_words(text), note)


def reference_notes(references: list[Image.Image]) -> list[str]:
    """That the first photo is not one of the world's toys (it then has no identity score)."""
    return [NOT_A_TOY] if read_toy(references[0]) is None else []
