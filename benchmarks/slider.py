"""Item 2: a slider move vs the first generation for the same subject (the move must not re-run the encoders)."""
from __future__ import annotations

import itertools
import logging

from .common import PROMPT, Bench, Mode, Section, Target, interleaved, median, paired_ratio, seconds, synthetic_photo

logger = logging.getLogger(__name__)


def run(bench: Bench, mode: Mode) -> Section:
    section = Section(2, "Slider move vs first generation of the same subject (first = both encoders + loop)")
    pipe = bench.pipe
    photos = (synthetic_photo(100 + i) for i in itertools.count())  # a new photo per round: a fresh encoding
    gates = itertools.cycle((0.2, 0.8, 0.4, 0.6))
    settings = dict(num_inference_steps=mode.steps, height=mode.size, width=mode.size, seed=0)
    state: dict = {"first_calls": [], "move_calls": []}

    def first() -> None:
        before = pipe.encoder.calls
        state["subject"] = pipe.encode_subject([next(photos)])
        state["images"] = pipe(PROMPT, subject=state["subject"], gate=0.5, **settings).images
        state["first_calls"].append(pipe.encoder.calls - before)

    def move() -> None:
        before = pipe.encoder.calls
        pipe(PROMPT, subject=state["subject"], gate=next(gates), **settings)
        state["move_calls"].append(pipe.encoder.calls - before)

    def score() -> None:  # what the studio adds after every render: one CLIP pass over the result
        pipe.identity_score(state["images"], state["subject"])

    cases = {"first generation": first, "slider move": move, "identity score": score}
    # warm-up
    pipe(PROMPT, subject=pipe.encode_subject([synthetic_photo(99)]), **{**settings, "num_inference_steps": 1})
    times = interleaved(cases, mode.slider_rounds, warmup=0, rotate=False)  # a move follows its first generation
    first_t, move_t, score_t = (times.wall[name] for name in cases)
    move_calls = max(state["move_calls"])
    ratio = paired_ratio(move_t, first_t)
    section.add(f"first generation ({mode.steps} steps, {mode.size} px; encode + loop + decode): median",
                seconds(median(first_t)))
    section.add("slider move (same subject, new γ): median", seconds(median(move_t)))
    section.add("slider move / first generation: wall | CPU",
                f"{ratio:.3f} | {paired_ratio(times.cpu['slider move'], times.cpu['first generation']):.3f}")
    section.add("encoder passes: first generation / slider move",
                f"{state['first_calls'][-1]} / {move_calls}")
    section.add("identity score of a result (one CLIP pass, added by the studio per render): median",
                seconds(median(score_t)))
    section.targets.append(Target("slider_move_encoder_calls", move_calls, 0, kind="count"))
    section.notes.append(f"the ratio depends on the step count: the move pays only the {mode.steps}-step loop and "
                         "decode, the first generation also CLIP ViT-H/14 + DINOv2-L on the photo")
    section.data = dict(wall_seconds=times.wall, cpu_seconds=times.cpu, move_vs_first=ratio,
                        encoder_calls_first=state["first_calls"], encoder_calls_move=state["move_calls"],
                        steps=mode.steps, size=mode.size)
    return section
