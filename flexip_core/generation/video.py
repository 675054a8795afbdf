"""Clips of the animate task: video files that carry their settings, read back; and whether a clip fits in memory.

MP4 (H.264, yuv420p, which every browser plays) is written through imageio with imageio-ffmpeg, which ships its own
ffmpeg; the settings go in the file's `comment` tag, in the text format of the PNG `parameters` chunk (metadata.py).
Without that encoder, clips are written as animated WebP (settings in its XMP packet) or GIF (in its comment), both
through Pillow. Importing this module loads no encoder and no torch.
"""
from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from flexip_core.generation.metadata import format_parameters, parse_parameters

logger = logging.getLogger(__name__)

VIDEO_FORMATS = ("mp4", "webp", "gif")  # best first: MP4 when the encoder is installed, else Pillow's two
DEFAULT_FPS = 8  # AnimateDiff's usual rate: 16 frames make 2 s
DECODE_FRAMES = 4  # clip frames the VAE decodes at a time: at 512 px 1.5 GB, less than the UNet's 16 frames need
MP4_QUALITY = 8  # imageio's 0-10 scale; libx264 CRF 10: frames look as rendered, a 2 s 512 px clip stays under 1 MB
XMP_NAMESPACE = "https://github.com/flexip-studio/ns/1.0/"  # the XMP element holding the settings of a WebP clip
ENCODER_HINT = "pip install imageio imageio-ffmpeg (it ships its own ffmpeg)"


@dataclass(frozen=True)
class VideoInfo:
    """What a clip file says about itself."""

    path: Path  # the file read
    format: str  # "mp4", "webp" or "gif"
    frames: int  # number of frames
    fps: float  # frames per second as stored (GIF keeps frame times in 1/100 s, so 8 fps reads back as 8.33)
    size: tuple[int, int]  # (width, height) in pixels
    parameters: dict | None  # the settings written with it (Generation.to_parameters() plus model names), or None

    @property
    def generation(self):
        """The `Generation` that made the clip, or None when the file carries no FlexIP settings."""
        from flexip_core.generation.settings import Generation

        return None if self.parameters is None else Generation.from_parameters(self.parameters)


# --- writing ------------------------------------------------------------------------------------------------
def mp4_available() -> bool:
    """Whether imageio and imageio-ffmpeg (with its ffmpeg binary) are installed."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):  # not installed, or no ffmpeg binary for this platform
        return False
    return True


def video_formats() -> tuple[str, ...]:
    """The clip formats this machine writes, best first."""
    return VIDEO_FORMATS if mp4_available() else VIDEO_FORMATS[1:]


def write_video(frames, path: str | Path, parameters: dict | None = None, fps: float | None = None,
                format: str | None = None) -> Path:
    """Write a clip with its settings; returns the path written (its suffix is the format's).

    Args:
        frames: the clip's frames: PIL images, or a (F, H, W, 3) array (uint8, or floats in [0, 1]).
        path: where to write it; its suffix picks the format when it is .mp4, .webp or .gif.
        parameters: the clip's settings (`out.parameters[i]`), stored in the file; None stores none.
        fps: frames per second (default: parameters' "fps", else 8).
        format: "mp4", "webp" or "gif" instead of the suffix's. MP4 asked for without imageio-ffmpeg falls back to
            WebP, with a warning naming the install command.
    """
    pictures = _as_images(frames)
    fps = float(fps if fps is not None else (parameters or {}).get("fps") or DEFAULT_FPS)
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    format = format or (suffix if suffix in VIDEO_FORMATS else video_formats()[0])
    if format not in VIDEO_FORMATS:
        raise ValueError(f"unknown clip format {format!r}; one of {', '.join(VIDEO_FORMATS)}")
    if format == "mp4" and not mp4_available():
        logger.warning("no MP4 encoder (%s); writing an animated WebP instead", ENCODER_HINT)
        format = "webp"
    path = path.with_suffix(f".{format}")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = format_parameters(parameters) if parameters else None
    if format == "mp4":
        _write_mp4(pictures, path, fps, text)
    else:
        extra = {}
        if text and format == "webp":
            extra["xmp"] = _xmp(text)
        elif text:
            extra["comment"] = text.encode("utf-8")
        webp = {"quality": 90, "method": 4} if format == "webp" else {}
        pictures[0].save(path, format=format.upper(), save_all=True, append_images=pictures[1:],
                         duration=round(1000 / fps), loop=0, **webp, **extra)
    return path


def _as_images(frames) -> list[Image.Image]:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be a (F, H, W, 3) array, got shape {frames.shape}")
        if frames.dtype != np.uint8:
            frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
        frames = [Image.fromarray(frame) for frame in frames]
    pictures = [frame.convert("RGB") for frame in frames]
    if not pictures:
        raise ValueError("a clip needs at least one frame")
    if len({picture.size for picture in pictures}) > 1:
        raise ValueError(f"the frames differ in size: {sorted({p.size for p in pictures})}")
    return pictures


def _write_mp4(pictures: list[Image.Image], path: Path, fps: float, text: str | None) -> None:
    import imageio.v2 as imageio

    output = ["-movflags", "+faststart"]  # the index first: a browser plays it while it loads
    if text:
        output = ["-metadata", f"comment={text}", *output]
    # yuv420p needs even sides (FlexIP's are multiples of 8); other sizes are padded up by imageio
    with imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                            quality=MP4_QUALITY, macro_block_size=2, ffmpeg_log_level="error",
                            output_params=output) as writer:
        for picture in pictures:
            writer.append_data(np.asarray(picture))


def _xmp(text: str) -> bytes:
    """An XMP packet whose one element holds the settings text."""
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description xmlns:flexip="{XMP_NAMESPACE}"><flexip:parameters>{escape(text)}</flexip:parameters>'
            '</rdf:Description></rdf:RDF></x:xmpmeta>').encode("utf-8")


# --- reading ------------------------------------------------------------------------------------------------
def read_video(path: str | Path) -> VideoInfo:
    """A clip's frame count, frame rate, size and settings, from an MP4, WebP or GIF file (an MP4's header read by
    PyAV, a requirement already for the training-pair builder; WebP and GIF frames walked by Pillow)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"clip not found: {path}")
    format = path.suffix.lower().lstrip(".")
    if format == "mp4":
        return _read_mp4(path)
    if format not in VIDEO_FORMATS:
        raise ValueError(f"{path.name}: not a clip file; one of {', '.join('.' + f for f in VIDEO_FORMATS)}")
    try:
        with Image.open(path) as image:
            text = _xmp_text(image.info.get("xmp")) if format == "webp" else _decoded(image.info.get("comment"))
            durations = []  # ms per stored frame
            for index in range(getattr(image, "n_frames", 1)):
                image.seek(index)
                image.load()  # WebP sets a frame's duration when it is decoded
                durations.append(image.info.get("duration") or 0)
            size = image.size
    except (OSError, SyntaxError, EOFError) as error:
        raise ValueError(f"{path.name} is not a readable {format.upper()} file ({error})") from None
    # Pillow's writers store a run of identical frames as one frame lasting as long as the run: counted back here
    shortest = min(durations)
    frames = round(sum(durations) / shortest) if shortest else len(durations)
    return VideoInfo(path, format, frames, 1000 / shortest if shortest else 0.0, size,
                     parse_parameters(text) if text else None)


def read_frames(path: str | Path) -> np.ndarray:
    """A clip's frames as a (F, H, W, 3) uint8 array (MP4 through imageio-ffmpeg, WebP and GIF through Pillow, whose
    runs of identical frames come back as one)."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        import imageio.v2 as imageio

        with imageio.get_reader(path, format="FFMPEG") as reader:
            return np.stack([np.asarray(frame) for frame in reader])
    with Image.open(path) as image:
        frames = []
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
    return np.stack(frames)


def _read_mp4(path: Path) -> VideoInfo:
    """An MP4's frame count, rate, size and settings (its `comment` tag), read by PyAV without decoding a frame."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            text = container.metadata.get("comment")
            info = (stream.frames, float(stream.average_rate or 0), (stream.codec_context.width,
                                                                     stream.codec_context.height))
    except (av.FFmpegError, IndexError) as error:
        raise ValueError(f"{path.name} is not a readable MP4 file ({error})") from None
    return VideoInfo(path, "mp4", *info, parse_parameters(text) if text else None)


def _xmp_text(packet) -> str | None:
    if not packet:
        return None
    try:
        root = ElementTree.fromstring(packet)
    except ElementTree.ParseError:
        return None
    element = root.find(f".//{{{XMP_NAMESPACE}}}parameters")
    return element.text if element is not None else None


def _decoded(comment) -> str | None:
    if isinstance(comment, bytes):
        return comment.decode("utf-8", "replace")
    return comment or None


# --- memory -------------------------------------------------------------------------------------------------
# Peak activations of SD1.5 + AnimateDiff (the real architectures, random weights), traced with PyTorch's
# MemTracker under FakeTensorMode with flash-style attention (no score matrix), fp16: the UNetMotionModel holds
# 2.04 GiB for 16 frames x 2 (CFG) at 512 px, linear in frames, clips and pixels; the VAE decoder 0.375 GiB per
# 512 px frame. In elements, so other dtypes scale by their size.
UNET_ELEMENTS = 8_400  # per sample (one frame of one clip, CFG counting twice) and per latent pixel
VAE_ELEMENTS = 770  # per decoded frame and per output pixel
# FlexIP's keys and values, computed once per generation and kept: text (77), preservation (20) and
# personalization (77) tokens x 2 (keys, values) x the 16 layers' widths (12,480 together), and the fused attention's
# stacked copy of them; per sample
KV_ELEMENTS = 10_500_000
MARGIN = 1.25  # allocator fragmentation, cuDNN and cuBLAS workspaces, what the trace does not see
RESERVE = 512 * 2**20  # bytes left free besides


def estimate_clip_memory(num_frames: int, height: int, width: int, clips: int = 1, cfg: bool = True,
                         dtype="float16", decode_frames: int = DECODE_FRAMES) -> int:
    """Bytes a clip needs while it is made, beyond the loaded weights: the UNet's activations or the VAE's, whichever
    is larger, plus FlexIP's cached keys and values, with a margin. An estimate for SD1.5-sized models.

    Args:
        num_frames, height, width: the clip's frames and size in pixels.
        clips: clips made together (one per γ of a sweep).
        cfg: classifier-free guidance on (the UNet runs every frame twice).
        dtype: the models' dtype (a torch dtype, or its name: "float16", "bfloat16", "float32").
        decode_frames: frames the VAE decodes at a time.
    """
    size = _itemsize(dtype)
    samples = clips * num_frames * (2 if cfg else 1)
    unet = samples * (height // 8) * (width // 8) * UNET_ELEMENTS
    decode = min(decode_frames, clips * num_frames) * height * width * VAE_ELEMENTS
    return int((samples * KV_ELEMENTS + max(unet, decode)) * size * MARGIN) + RESERVE


def check_clip_memory(num_frames: int, height: int, width: int, clips: int = 1, cfg: bool = True,
                      dtype="float16", device="cuda", available: int | None = None,
                      decode_frames: int = DECODE_FRAMES) -> int | None:
    """Refuse a clip that will not fit, before it runs out of memory: a NotEnoughMemory (a ValueError) naming the
    frames and the size; returns the estimate in bytes, or None when there is nothing to check against.

    Args:
        num_frames, height, width, clips, cfg, dtype, decode_frames: as for `estimate_clip_memory`.
        device: where the clip is made; on CUDA the card's free memory (plus what PyTorch holds cached and unused)
            is what it must fit in. On the CPU and Apple's GPU nothing is checked unless `available` is given (the
            operating system swaps or stops the process instead, and its free memory says little).
        available: bytes the clip may use, instead of asking the device (tests, or a budget of one's own).
    """
    from flexip_core.generation.devices import NotEnoughMemory

    if available is None:
        available = _free_bytes(device)
        if available is None:
            return None
    needed = estimate_clip_memory(num_frames, height, width, clips, cfg, dtype, decode_frames)
    if needed > available:
        many = f" x {clips} clips (one per γ)" if clips > 1 else ""
        raise NotEnoughMemory(
            f"a clip of {num_frames} frames at {width}x{height}{many}{' with guidance' if cfg else ''} needs about "
            f"{needed / 2**30:.1f} GB of {_where(device)} memory while it is made, and {available / 2**30:.1f} GB is "
            "free: use fewer frames, a smaller size or fewer γ values per run")
    return needed


def _itemsize(dtype) -> int:
    if isinstance(dtype, str):
        sizes = {"float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4}
        if dtype not in sizes:
            raise ValueError(f"dtype {dtype!r} unknown; one of {', '.join(sizes)}")
        return sizes[dtype]
    return dtype.itemsize  # a torch.dtype


def _free_bytes(device) -> int | None:
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _where(device) -> str:
    return str(device).split(":")[0].upper() if device is not None else "device"
