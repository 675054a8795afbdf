"""`python -m toyworld.mini.build`: train FlexIP-mini end to end on CPU with fixed seeds and ship it.

Stages: `base` (VAE on renders, then text encoder + UNet on captioned renders), `encoders` (a mini DINOv2, 32 px,
pretrained on renders, and a random CLIP, 8 px, both frozen afterwards), `adapters` (both adapters with the
project's trainer, flexip_core.training.train, on invariant and variant pairs), `calibration` (a gate curve
calibrated on
training subjects). The weights go to assets/mini and the `mini` profile to assets/profiles/mini.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from flexip_core.cli import whole_number
from flexip_core.loading.tiny import save_base

from . import base, encoders, models, slider, world

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets" / "mini"
PROFILE_PATH = REPO / "assets" / "profiles" / "mini.json"
DEFAULTS = {"height": world.NATIVE_SIZE, "width": world.NATIVE_SIZE, "num_inference_steps": 30, "guidance_scale": 5.0,
            "scheduler": "dpmpp_2m", "max_side": 256}


@dataclasses.dataclass(frozen=True)
class AdapterStage:
    """Adapter training (flexip_core.training.train) and calibration sizes."""

    pairs: int = 4000  # training pairs in the manifest
    steps: int = 5000  # optimizer steps
    batch: int = 16  # samples per step
    lr: float = 1e-3  # AdamW learning rate
    invariant_keep_p: float = 0.5  # how often an invariant caption names each scene attribute
    invariant_conflict_p: float = 0.25  # how often an invariant caption describes another scene instead
    conflict_colour_p: float = 0.5  # how often such a caption also asks for another body colour
    calibration_cases: int = 16  # training-split cases measured to calibrate the gate curve
    calibration_seeds: tuple[int, ...] = (0, 1)


PRESETS = {
    "full": (base.BaseConfig(), encoders.EncoderConfig(), AdapterStage()),
    "quick": (base.BaseConfig(vae_images=128, vae_steps=20, decoder_steps=20, base_images=256, base_steps=20, warmup=5),
              encoders.EncoderConfig(images=64, steps=10), AdapterStage(pairs=64, steps=10, calibration_cases=2)),
}
STAGES = ("base", "encoders", "adapters", "calibration")
OUT_MARKERS = ("build.json",)  # a built folder, which a new build may replace
WORK_MARKERS = (".flexip-mini-work", "stages.json", "tokenizer")  # a work folder of an earlier build
# what the stages before it staged: the weights a build resumed at this stage needs and keeps
REUSED = {"encoders": ("base",), "adapters": ("base", "dino", "image_encoder"),
          "calibration": ("base", "dino", "image_encoder", "flexip_adapter.safetensors")}


def profile_dict(root: str, curve=None) -> dict:
    data = {
        "name": "mini",
        "description": ("FlexIP-mini, a miniature model trained on the project's toy world (CPU, 64 px): it draws toy "
                        "shapes, not photos; for your own subjects use real weights (docs/real-weights.md)."),
        "base": f"{root}/base", "clip_encoder": f"{root}/image_encoder", "dino_encoder": f"{root}/dino",
        "adapter": f"{root}/flexip_adapter.safetensors", "dtype": "float32", "device": "cpu", "defaults": DEFAULTS,
        "world": "toyworld.plugin",
    }
    if curve is not None:
        data["gate_curve"] = {"gammas": list(curve.gammas), "pres": list(curve.pres), "pers": list(curve.pers)}
    return data


def train_adapters(stage: AdapterStage, profile: Path, work: Path, seed: int) -> Path:
    from flexip_core.training.train import TrainConfig, train

    manifest = world.write_adapter_manifest(work / "adapter_data", stage.pairs, seed,
                                            invariant_keep_p=stage.invariant_keep_p,
                                            invariant_conflict_p=stage.invariant_conflict_p,
                                            conflict_colour_p=stage.conflict_colour_p)
    config = TrainConfig(
        manifest=str(manifest), output_dir=str(work / "adapter_run"), profile=str(profile), init="scratch",
        adapter_sizes=models.ADAPTER_SIZES, resolution=world.NATIVE_SIZE, train_batch_size=stage.batch,
        max_steps=stage.steps, learning_rate=stage.lr, lr_scheduler="cosine",
        lr_warmup_steps=min(50, stage.steps // 10),
        mixed_precision="no", seed=seed, checkpoint_every=0, report_to="none", verify_images=False,
        sample_latents=False,  # the base trained on posterior means; the mini VAE's posterior is wide
    )
    return train(config).adapter_path


def calibrate(stage: AdapterStage, profile_path: Path, seed: int):
    from flexip_core.generation.pipeline import FlexIPPipeline

    pipe = FlexIPPipeline.from_profile(str(profile_path), device="cpu")
    cases = world.sample_cases(stage.calibration_cases, seed + 100, split="train")
    measured = slider.measure(pipe, cases, seeds=stage.calibration_seeds, gammas=slider.CALIBRATION_GAMMAS)
    logger.info("linear gate, training cases: %s", measured.rows())
    return slider.calibrated_curve(measured), measured


def _files(path: Path) -> dict[str, bytes]:
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path).as_posix() if p != path else "": p.read_bytes() for p in paths}


def _missing(folder: Path, from_stage: str) -> list[str]:
    return [n for n in REUSED[from_stage] if not (folder / n).exists()]


def check_replaceable(folder: Path, markers: tuple[str, ...], flag: str) -> None:
    """A build deletes its work folder and the folder it writes; refuse, before any training, one that holds
    anything but an earlier build's files (none of `markers` in it), so that a slip cannot delete a user's files."""
    if folder.is_file():
        raise SystemExit(f"{flag} {folder} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not any((folder / m).exists() for m in markers):
        raise SystemExit(f"{flag} {folder} holds files that are not from an earlier build (none of "
                         f"{', '.join(markers)}); the build would delete them: give a new or empty folder")


def differing(staging: Path, built: Path, names: tuple[str, ...]) -> list[str]:
    """Which of `names` (staged weights) are not byte for byte those in the built folder."""
    return [n for n in names if not (built / n).exists() or _files(staging / n) != _files(built / n)]


def stage_from_built(built: Path, work: Path, from_stage: str) -> None:
    """Stage a built folder's weights (assets/mini, say) in the work folder, so that a build resumed at
    `from_stage` starts from them; its build.json gives the earlier stages' seconds and scores."""
    record = built / "build.json"
    missing = _missing(built, from_stage) + ([] if record.is_file() else ["build.json"])
    if missing:
        raise SystemExit(f"--reuse {built}: it lacks {', '.join(missing)}; it must be the output of a whole build")
    earlier = json.loads(record.read_text())
    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in REUSED[from_stage]:
        (shutil.copytree if (built / name).is_dir() else shutil.copy)(built / name, staging / name)
    scores = {k: earlier[k] for k in ("vae_reconstruction", "dino_readout") if k in earlier}
    (work / "stages.json").write_text(json.dumps({"seconds": earlier["seconds"], "scores": scores}))


def build(preset: str = "full", out: Path = ASSETS, work: Path | None = None, seed: int = 0,
          write_profile: bool = True, from_stage: str = "base", reuse: Path | None = None) -> dict:
    base_config, encoder_config, stage = PRESETS[preset]
    base_config = dataclasses.replace(base_config, seed=seed)
    encoder_config = dataclasses.replace(encoder_config, seed=seed)
    work = Path(work or REPO / ".cache" / f"mini-{preset}")
    staging = work / "staging"
    times, scores = {}, {}
    record = work / "stages.json"  # seconds and scores of the stages run so far (a resumed build reports them all)
    start = STAGES.index(from_stage)
    check_replaceable(out, OUT_MARKERS, "--out")
    check_replaceable(work, WORK_MARKERS, "--work")
    if reuse is not None:
        if from_stage == "base":
            raise SystemExit("--reuse needs --from-stage: the stages before it are the ones taken from the folder")
        stage_from_built(Path(reuse), work, from_stage)
    if from_stage == "base":
        shutil.rmtree(work, ignore_errors=True)
        staging.mkdir(parents=True)
        (work / WORK_MARKERS[0]).write_text("scratch folder of python -m toyworld.mini.build; safe to delete\n")
        tokenizer = models.save_mini_tokenizer(work / "tokenizer")
        t = time.time()
        vae = base.train_decoder(base_config, base.train_vae(base_config))
        times["vae"] = time.time() - t
        scores["vae_reconstruction"] = base.reconstruction_scores(vae, seed=seed)
        logger.info("VAE round trips of held-out subjects, oracle scores: %s", scores["vae_reconstruction"])
        t = time.time()
        unet, text_encoder = base.train_base(base_config, vae, tokenizer)
        times["base"] = time.time() - t
        # float16 files (the profile loads them as float32): the shipped folder stays under 20 MB
        save_base(staging / "base", unet=unet.half(), vae=vae.half(), text_encoder=text_encoder.half(),
                  tokenizer=tokenizer, scheduler=DDIMScheduler.from_config(models.SCHEDULER))
        record.write_text(json.dumps({"seconds": times, "scores": scores}))  # a later stage can resume from here
    else:
        missing = _missing(staging, from_stage) + ([] if record.is_file() else ["stages.json"])
        if missing:
            raise SystemExit(f"--from-stage {from_stage} needs {', '.join(missing)} from an earlier run in {work}; "
                             "run the whole build first")
        earlier = json.loads(record.read_text())
        logger.info("resuming at %s with the weights staged in %s", from_stage, staging)
        changed = differing(staging, out, REUSED[from_stage]) if out.exists() else []
        if changed:
            logger.warning("the staged %s differ from those in %s, which this build replaces; to start from %s's "
                           "weights instead, pass --reuse %s", ", ".join(changed), out, out, out)
        times, scores = earlier["seconds"], earlier["scores"]
    if start <= STAGES.index("encoders"):
        t = time.time()
        dino, scores["dino_readout"] = encoders.pretrain_dino(encoder_config)
        dino.save_pretrained(staging / "dino")
        encoders.random_clip(seed).save_pretrained(staging / "image_encoder")
        times["encoders"] = time.time() - t
    record.write_text(json.dumps({"seconds": times, "scores": scores}))
    staging_profile = work / "staging_profile.json"  # the staged weights as a profile (trainer and calibration)
    staging_profile.write_text(json.dumps(profile_dict(str(staging))))
    if start <= STAGES.index("adapters"):
        shutil.rmtree(work / "adapter_data", ignore_errors=True)
        shutil.rmtree(work / "adapter_run", ignore_errors=True)
        t = time.time()
        adapter = train_adapters(stage, staging_profile, work, seed)
        times["adapters"] = time.time() - t
        shutil.copy(adapter, staging / "flexip_adapter.safetensors")
        record.write_text(json.dumps({"seconds": times, "scores": scores}))
    t = time.time()
    curve, measured = calibrate(stage, staging_profile, seed)
    times["calibration"] = time.time() - t

    times["total"] = sum(v for k, v in times.items() if k != "total")  # the stages, also across a resumed build
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(staging, out)
    (out / "build.json").write_text(json.dumps({
        "command": "python -m toyworld.mini.build" + (f" --preset {preset}" if preset != "full" else ""),
        "seed": seed, "base": dataclasses.asdict(base_config), "encoders": dataclasses.asdict(encoder_config),
        "adapters": dataclasses.asdict(stage),
        "seconds": {k: round(v, 1) for k, v in times.items()}, **scores, "calibration_linear_gate": measured.rows(),
    }, indent=2))
    if write_profile:
        inside = out.resolve().is_relative_to(ASSETS.parent)  # shipped weights: found from any working folder
        root = "{assets}/" + out.resolve().relative_to(ASSETS.parent).as_posix() if inside else str(out.resolve())
        PROFILE_PATH.write_text(json.dumps(profile_dict(root, curve), indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    logger.info("built FlexIP-mini: %s; %s holds %.1f MB", ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
                out, size / 1e6)
    return times


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m toyworld.mini.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full", help="'quick' is a smoke run (noise)")
    parser.add_argument("--out", type=Path, default=ASSETS, help="where the weights go (default assets/mini)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default .cache/mini-PRESET)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=whole_number(1), default=None,
                        help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--from-stage", choices=STAGES, default="base",
                        help="resume at this stage, reusing what the stages before it staged in the work folder")
    parser.add_argument("--reuse", type=Path, default=None, metavar="DIR",
                        help="with --from-stage: take the earlier stages' weights from this built folder (assets/mini, "
                             "say) instead of those the last run staged in the work folder")
    parser.add_argument("--no-profile", action="store_true", help="do not write assets/profiles/mini.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    build(args.preset, args.out, args.work, args.seed, write_profile=not args.no_profile, from_stage=args.from_stage,
          reuse=args.reuse)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
