"""Command line: `python -m flexip_core generate ...` (and the other subcommands)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flexip_core.loading.profiles import COMPILE_MODES

logger = logging.getLogger(__name__)

MODEL_FLAGS = ("base", "base_config", "clip_encoder", "dino_encoder", "preservation", "personalization", "adapter",
               "lora", "inpaint_base", "motion", "preview_vae")


def compile_mode(text: str) -> str:
    """argparse type of --compile MODE: one of torch.compile's modes."""
    if text not in COMPILE_MODES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch.compile mode; one of {', '.join(COMPILE_MODES)}")
    return text


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
    """argparse type: one γ or several, comma-separated ('0,0.5,1'), each in [0, 1] (the one γ-list parser)."""
    from flexip_core.generation.settings import parse_gates

    try:
        return tuple(parse_gates(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    parser.add_argument("--compile", nargs="?", const=True, default=None, type=compile_mode, metavar="MODE",
                        help="torch.compile the UNet for a fixed size (CUDA graphs on CUDA; the first render of each "
                             "size compiles for minutes); MODE: " + ", ".join(COMPILE_MODES))
    parser.add_argument("--channels-last", action="store_true", help="the UNet in channels-last memory (NHWC)")


def add_generation_flags(parser: argparse.ArgumentParser, per_image: bool = True) -> None:
    """The Generation fields as flags, under the fields' own names (flexip_core.generation.settings); without
    `per_image`, no --prompt, --gate and --seed (the evaluator has its own prompts, γ list and seeds)."""
    if per_image:
        parser.add_argument("--prompt", required=True)
        parser.add_argument("--gate", action="append", type=gate_values,
                            help="gamma in [0, 1]; several (comma-separated or repeated) for a same-seed sweep")
        parser.add_argument("--seed", type=int, default=0, help="0 to 2**32-1")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--strength", type=float, default=1.0, help="overall adapter strength in [0, 2]")
    windows = (("pres-from", 0.0, "identity branch from"), ("pres-until", 1.0, "identity branch until"),
               ("pers-from", 0.0, "prompt branch from"), ("pers-until", 1.0, "prompt branch until"))
    for name, default, what in windows:
        parser.add_argument(f"--{name}", type=float, default=default, help=f"{what} this fraction of the steps")
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=None)
    parser.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float, default=None)
    parser.add_argument("--size", type=int, default=None, help="square size in pixels (multiple of 8)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--scheduler", default=None, help="dpmpp_2m, dpmpp_2m_karras, euler, euler_a, ddim, pndm, "
                                                          "unipc, lcm (default: the profile's)")


def generation_from_args(args):
    """(profile name, Generation, γ list) from the flags, checked against the profile file before any weights
    load (a bad --size must not wait for gigabytes to load)."""
    from flexip_core.generation.gate import GateSchedule
    from flexip_core.generation.settings import Generation
    from flexip_core.loading.profiles import default_profile, load_profile

    name = args.profile or default_profile()
    d = load_profile(name).defaults
    gates = [g for values in getattr(args, "gate", None) or [(0.5,)] for g in values]
    steps, guidance = args.num_inference_steps, args.guidance_scale
    generation = Generation(
        prompt=getattr(args, "prompt", ""), negative_prompt=args.negative_prompt or "", gate=gates[0],
        strength=args.strength, seed=getattr(args, "seed", 0),
        num_inference_steps=d.num_inference_steps if steps is None else steps,
        guidance_scale=d.guidance_scale if guidance is None else guidance,
        height=args.size or args.height or d.height, width=args.size or args.width or d.width,
        scheduler=args.scheduler or d.scheduler,
        windows=GateSchedule(args.pres_from, args.pres_until, args.pers_from, args.pers_until))
    return name, generation.check(d.max_side), gates


def model_options(args) -> dict:
    """Keyword arguments of FlexIPPipeline.from_profile from the model flags given (shared by the CLI and app.py)."""
    options = {name: getattr(args, name) for name in (*MODEL_FLAGS, "device", "dtype", "attention")
               if getattr(args, name, None)}
    if getattr(args, "low_vram", False):
        options["low_vram"] = True  # diffusers' model CPU offload plus VAE slicing and tiling
    if getattr(args, "compile", None) is not None:
        options["compile"] = args.compile  # True, or a torch.compile mode
    if getattr(args, "channels_last", False):
        options["channels_last"] = True
    return options


def pipeline_from_args(args):
    from flexip_core.generation.pipeline import FlexIPPipeline
    from flexip_core.loading.profiles import default_profile

    return FlexIPPipeline.from_profile(args.profile or default_profile(), **model_options(args))


def _generate(args) -> int:
    from flexip_core.generation.images import flat_photo_note, is_flat, load_reference_image
    from flexip_core.generation.metadata import save_png

    images = [load_reference_image(path) for path in args.image]
    for path, image in zip(args.image, images):
        if is_flat(image):
            logger.warning(flat_photo_note(Path(path).name))
    args.profile, generation, gates = generation_from_args(args)
    pipe = pipeline_from_args(args)
    subject = pipe.encode_subject(images, args.weight or None)
    for note in pipe.reference_notes(images):
        logger.warning(note)
    out = pipe(subject=subject, gate=gates, generation=generation)
    for note in out.warnings:
        logger.warning(note)
    target = args.out
    clips = out.frames or [None] * len(out.images)  # an animate profile: a clip per γ, written beside its first frame
    for i, (image, params, frames) in enumerate(zip(out.images, out.parameters, clips)):
        path = target if len(out.images) == 1 else target.with_name(f"{target.stem}_{i:02d}{target.suffix}")
        save_png(image, path, params)
        print(path)
        if frames is not None:
            from flexip_core.generation.video import write_video

            print(write_video(frames, path.with_suffix(".mp4"), params, fps=params.get("fps")))
    return 0


def _convert_ip_adapter(args) -> int:
    from flexip_core.loading.ip_adapter import convert_ip_adapter_files
    from flexip_core.loading.sources import pipeline_family, unet_layout

    base, base_config, family = args.base, args.base_config, args.family
    preservation, personalization = args.preservation, args.personalization
    if args.profile:
        from flexip_core.loading.assembly import resolve_placeholders
        from flexip_core.loading.profiles import load_profile

        profile = resolve_placeholders(load_profile(args.profile))
        base, base_config = base or profile.base, base_config or profile.base_config
        preservation, personalization = preservation or profile.preservation, personalization or profile.personalization
        profile_family = pipeline_family(profile.pipeline)
        if family and family != profile_family:
            raise ValueError(f"--family {family} contradicts profile {profile.name!r}, whose base is {profile_family}")
        family = profile_family
    if not preservation or not personalization:
        raise ValueError("give --preservation and --personalization (IP-Adapter files: paths or 'repo/id:path')")
    layers, width = unet_layout(base, base_config, family or "sd15")
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
    add_generation_flags(gen)
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
                      help="base model whose UNet layout to use (default: the --family architecture, no download)")
    conv.add_argument("--base-config", dest="base_config", default=None,
                      help="for a single-file --base: diffusers folder or Hub id holding its config")
    conv.add_argument("--family", choices=["sd15", "sdxl"], default=None,
                      help="model family of the files and the base: sd15 (default) or sdxl (for the SDXL IP-Adapter "
                           "files); a --profile sets it")
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
