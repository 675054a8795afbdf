"""Command line: `python -m flexip_core generate ...` (and the other subcommands)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_FLAGS = ("base", "base_config", "clip_encoder", "dino_encoder", "preservation", "personalization", "adapter",
               "lora")


def comma_numbers(text: str) -> tuple[float, ...]:
    """argparse type: '0,0.5,1' -> (0.0, 0.5, 1.0); one clear error for anything else."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return values


def comma_ints(text: str) -> tuple[int, ...]:
    """argparse type: '0,1,2' -> (0, 1, 2), as comma_numbers for whole numbers."""
    values = comma_numbers(text)
    if any(v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}")
    return tuple(int(v) for v in values)


def whole_number(minimum: int):
    """argparse type: a whole number of at least `minimum`."""
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return check


def output_file(suffix: str):
    """argparse type for a file a command writes: the name must end in `suffix` (so that a slip such as
    `--out notes.txt` or a system file cannot be overwritten with image bytes) and must not be a folder."""
    def check(text: str) -> Path:
        path = Path(text).expanduser()
        if path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"{text!r}: the file written is {suffix}; give a name ending in {suffix}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file in it, e.g. {path / ('out' + suffix)}")
        return path
    return check


def output_folder(text: str) -> Path:
    """argparse type for a folder a command writes into (made if missing); refused at once when a file is in the
    way, not after the run."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder")
    return path


def gate_values(text: str) -> tuple[float, ...]:
    """argparse type: one γ or several, comma-separated ('0,0.5,1'), each in [0, 1]."""
    values = comma_numbers(text)
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"gate (gamma) values must lie in [0, 1], got {text!r}")
    return values


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--profile plus one flag per profile part; shared by every command that loads a pipeline."""
    parser.add_argument("--profile", default=None, help="profile name or .json path (default: best available)")
    for name in MODEL_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                            help=f"override the profile's {name.replace('_', ' ')} (Hub id[:path], folder or file)")
    parser.add_argument("--device", default=None,
                        help="cuda, mps or cpu (default: the profile's: the best available; cpu for mini)")
    parser.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: fp16 on GPU)")
    parser.add_argument("--attention", default=None, choices=["auto", "sdpa", "xformers"], help="attention backend")
    parser.add_argument("--low-vram", action="store_true",
                        help="for small GPUs: model CPU offload plus VAE tiling and slicing (slower)")


def check_before_loading(args, width: int | None, height: int | None) -> str:
    """The profile name, once the settings in `args` (strength, steps, guidance, size, seed, scheduler) are
    known to be usable with it: checked from the profile file, before any weights load."""
    from flexip_core.generation.pipeline import check_settings
    from flexip_core.generation.schedulers import SCHEDULER_NAMES
    from flexip_core.loading.profiles import default_profile, load_profile

    name = args.profile or default_profile()
    d = load_profile(name).defaults
    check_settings(args.strength, d.num_inference_steps if args.steps is None else args.steps,
                   d.guidance_scale if args.guidance is None else args.guidance, height or d.height, width or d.width,
                   getattr(args, "seed", 0), d.max_side)  # evaluate has --seeds, checked there
    if args.scheduler not in ("profile", *SCHEDULER_NAMES):
        raise ValueError(f"scheduler {args.scheduler!r} unknown; choose one of {', '.join(SCHEDULER_NAMES)}")
    return name


def pipeline_from_args(args):
    from flexip_core.generation.pipeline import FlexIPPipeline
    from flexip_core.loading.profiles import default_profile

    overrides = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name, None)}
    return FlexIPPipeline.from_profile(args.profile or default_profile(), device=args.device, dtype=args.dtype,
                                       attention=args.attention, low_vram=getattr(args, "low_vram", False) or None,
                                       **overrides)


def _generate(args) -> int:
    from flexip_core.generation.images import flat_photo_note, is_flat, load_reference_image
    from flexip_core.generation.metadata import save_png

    images = [load_reference_image(path) for path in args.image]
    for path, image in zip(args.image, images):
        if is_flat(image):
            logger.warning(flat_photo_note(Path(path).name))
    weights = args.weight or None
    args.profile = check_before_loading(args, args.size or args.width, args.size or args.height)
    pipe = pipeline_from_args(args)
    subject = pipe.encode_subject(images, weights)
    for note in pipe.reference_notes(images):
        logger.warning(note)
    gates = [g for values in args.gate or [(0.5,)] for g in values]
    out = pipe(args.prompt, subject=subject, gate=gates, strength=args.strength,
               negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
               height=args.size or args.height, width=args.size or args.width, seed=args.seed,
               scheduler=args.scheduler, gate_schedule=args.identity_until)
    target = args.out
    for i, (image, params) in enumerate(zip(out.images, out.parameters)):
        path = target if len(out.images) == 1 else target.with_name(f"{target.stem}_{i:02d}{target.suffix}")
        save_png(image, path, params)
        print(path)
    return 0


def _convert_ip_adapter(args) -> int:
    from flexip_core.loading.ip_adapter import convert_ip_adapter_files
    from flexip_core.loading.sources import unet_layout

    base, base_config = args.base, args.base_config
    preservation, personalization = args.preservation, args.personalization
    if args.profile:
        from flexip_core.loading.assembly import resolve_placeholders
        from flexip_core.loading.profiles import load_profile

        profile = resolve_placeholders(load_profile(args.profile))
        base, base_config = base or profile.base, base_config or profile.base_config
        preservation, personalization = preservation or profile.preservation, personalization or profile.personalization
    if not preservation or not personalization:
        raise ValueError("give --preservation and --personalization (IP-Adapter files: paths or 'repo/id:path')")
    layers, width = unet_layout(base, base_config)
    path = convert_ip_adapter_files(preservation, personalization, args.out, layers, cross_attention_dim=width)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexip_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images of a subject at one or more gate values")
    add_model_flags(gen)
    gen.add_argument("--image", action="append", required=True, help="subject photo (repeat for several)")
    gen.add_argument("--weight", action="append", type=float, help="weight of each --image, in order")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--gate", action="append", type=gate_values,
                     help="gamma in [0, 1]; several (comma-separated or repeated) for a same-seed sweep")
    gen.add_argument("--strength", type=float, default=1.0)
    gen.add_argument("--identity-until", type=float, default=None,
                     help="identity branch only for this fraction of the steps (0-1]")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--size", type=int, default=None, help="square size in pixels (multiple of 8)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--scheduler", default="profile", help="dpmpp_2m, euler, euler_a, ddim, pndm, unipc, lcm")
    gen.add_argument("--out", type=output_file(".png"), default="out.png",
                     help="PNG to write (default out.png); a sweep writes NAME_00.png, NAME_01.png, ...")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert-ip-adapter", help="convert a pair of IP-Adapter files into one native FlexIP file",
                          description="Map two IP-Adapter files (plain or Plus, .safetensors or .bin) into the "
                                      "preservation and personalization branches and write one native adapter file "
                                      "(use it with --adapter).")
    conv.add_argument("--preservation", help="IP-Adapter file for the identity branch (path or 'repo/id:path')")
    conv.add_argument("--personalization", help="IP-Adapter file for the prompt branch (path or 'repo/id:path')")
    conv.add_argument("--out", type=output_file(".safetensors"), required=True,
                      help="native FlexIP adapter file to write (.safetensors)")
    conv.add_argument("--profile", default=None, help="take the base and any missing file from this profile")
    conv.add_argument("--base", default=None,
                      help="base model whose UNet layout to use (default: the SD1.5 architecture, no download)")
    conv.add_argument("--base-config", dest="base_config", default=None,
                      help="for a single-file --base: diffusers folder or Hub id holding its config")
    conv.set_defaults(func=_convert_ip_adapter)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
