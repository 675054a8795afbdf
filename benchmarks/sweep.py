"""Item 3: a sweep of 5 γ values as one batched call vs 5 sequential calls (same seed, same settings)."""
from __future__ import annotations

import logging

from .common import (
    PROMPT,
    Bench,
    Mode,
    Section,
    Target,
    interleaved,
    median,
    paired_ratio,
    ratio_spread,
    seconds,
    synthetic_photo,
)

logger = logging.getLogger(__name__)

BATCHED_VS_SEQUENTIAL = 0.9  # target on CPU


def run(bench: Bench, mode: Mode) -> Section:
    gates = list(mode.sweep_gates)
    section = Section(3, f"Sweep of {len(gates)} γ values: one batched call vs {len(gates)} sequential calls")
    pipe = bench.pipe
    subject = pipe.encode_subject([synthetic_photo(0)])
    settings = dict(subject=subject, num_inference_steps=mode.sweep_steps, height=mode.size, width=mode.size, seed=0)

    def batched() -> None:
        assert len(pipe(PROMPT, gate=gates, **settings).images) == len(gates)

    def sequential() -> None:
        for gate in gates:
            pipe(PROMPT, gate=gate, **settings)

    pipe(PROMPT, gate=gates, **{**settings, "num_inference_steps": 1})  # warm-up of the batch-10 shapes
    times = interleaved({"batched": batched, "sequential": sequential}, mode.sweep_rounds, warmup=0)
    ratio = paired_ratio(times.wall["batched"], times.wall["sequential"])
    section.add(f"one call, batch {len(gates)} ({2 * len(gates)} with CFG), {mode.sweep_steps} steps: median",
                seconds(median(times.wall["batched"])))
    section.add(f"{len(gates)} sequential calls: median", seconds(median(times.wall["sequential"])))
    section.add("batched / sequential: wall (per-round spread) | CPU",
                f"{ratio:.3f} ({ratio_spread(times.wall['batched'], times.wall['sequential'])}) | "
                f"{paired_ratio(times.cpu['batched'], times.cpu['sequential']):.3f}")
    section.targets.append(Target("sweep_batched_vs_sequential", ratio, BATCHED_VS_SEQUENTIAL))
    section.data = dict(wall_seconds=times.wall, cpu_seconds=times.cpu, batched_vs_sequential=ratio, gates=gates,
                        steps=mode.sweep_steps)
    return section
