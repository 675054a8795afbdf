"""The trainer's settings: TrainConfig, one run's fields with a comment each, read from a JSON or TOML file."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SIZE_KEYS = ("num_tokens", "num_queries", "resampler_dim", "depth", "heads", "dim_head")  # adapter_sizes keys
INIT_CHOICES = ("scratch", "profile", "ip_adapter")  # or the path of a native FlexIP .safetensors
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run; read from a JSON or TOML file (`--set key=value` overrides single fields)."""

    manifest: str | None = None  # JSONL manifest of training pairs (flexip_core.training.data); its paths are
    #   relative to it. Give it or shards
    shards: str | list | None = None  # WebDataset tar shards streamed instead of a manifest
    #   (flexip_core.training.shards): a brace pattern "data/pairs-{000000..000511}.tar", a glob, or a list of them;
    #   local paths or fsspec URLs (s3://, gs://, https://, ...)
    output_dir: str  # checkpoints/, logs/, train_config.json and the final flexip_adapter.safetensors go here
    profile: str = "sd15"  # base profile (name or .json path): base model, image encoders, gate curve
    profile_overrides: dict = field(default_factory=dict)  # profile fields replaced: base, clip_encoder, ...
    init: str = "scratch"  # "scratch", "profile" (its adapter), "ip_adapter", or a native FlexIP .safetensors path
    init_preservation: str | None = None  # IP-Adapter file (ip-adapter-plus_sd15) for init="ip_adapter"
    init_personalization: str | None = None  # IP-Adapter file (ip-adapter_sd15) for init="ip_adapter"
    preservation_kind: str = "flexip_preservation"  # token provider of a scratch preservation branch
    personalization_kind: str = "flexip_personalization"  # token provider of a scratch personalization branch
    adapter_sizes: dict = field(default_factory=dict)  # scratch adapter sizes (num_queries, depth, heads, ...);
    #   widths (token, CLIP, DINO) always come from the loaded models
    resolution: int = 512  # training images: short side resized to this, centre-cropped square (multiple of 8)
    train_batch_size: int = 4  # samples per process per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    max_steps: int = 10_000  # optimizer steps of the whole run (a resumed run counts from its checkpoint); 0 writes
    #   the starting adapter without a step (an untrained one from scratch leaves the base model unchanged)
    learning_rate: float = 1e-4  # AdamW learning rate (IP-Adapter trained at 1e-4)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW beta1, beta2
    adam_weight_decay: float = 1e-2  # AdamW decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # gradient clipping norm; 0 turns clipping off
    lr_scheduler: str = "constant"  # diffusers.optimization name: constant, constant_with_warmup, linear, cosine
    lr_warmup_steps: int = 0  # warm-up optimizer steps of the learning-rate schedule
    mixed_precision: str | None = None  # "no", "fp16", "bf16"; None: what `accelerate launch` was told
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (less memory, ~30% slower)
    attention: str = "auto"  # "auto", "sdpa" or "xformers" (CUDA only)
    seed: int = 0  # seeds data order, noise, timesteps, gammas and dropout
    invariant_gamma: tuple[float, float] = (0.7, 1.0)  # gamma range of invariant samples (identity locking)
    variant_gamma: tuple[float, float] = (0.0, 0.4)  # gamma range of variant samples (deformation)
    timestep_power: float = 1.0  # timesteps drawn with density ~ t^(power-1): 1 uniform, 2 a linear ramp towards
    #   pure noise, where layout and identity are decided and the image condition matters most
    drop_text: float = 0.05  # share of samples trained with the empty caption only
    drop_image: float = 0.05  # share trained with the encoder's unconditional image features only
    drop_both: float = 0.05  # share trained with both dropped
    precompute_limit: int = 5_000  # encode every record once up front when there are at most this many
    #   (features kept in memory on each process; SD1.5 sizes ~3 MB a record); 0: encode each batch instead
    encode_batch_size: int = 16  # batch size of that up-front encoding pass
    verify_images: bool = True  # decode every image while reading the manifest; bad records are skipped
    sample_latents: bool = True  # VAE posterior samples (SD's practice); False: posterior means, for a base
    #   trained on means whose VAE has a wide posterior (FlexIP-mini)
    num_workers: int = 0  # DataLoader workers decoding images when records are encoded per batch (with shards:
    #   each worker reads its own shards)
    shuffle_buffer: int = 1000  # samples each shard stream holds and draws from at random (shards only)
    checkpoint_every: int = 500  # optimizer steps between accelerate checkpoints (0: none)
    checkpoints_total_limit: int | None = 3  # checkpoints kept; older ones are deleted (None: keep all)
    resume_from: str | None = None  # checkpoint folder, or "latest" (starts fresh when there is none)
    report_to: str = "auto"  # "auto" (TensorBoard when installed), "tensorboard", "none"; JSONL log always

    def __post_init__(self):
        self._check_number_types()
        self._check_data()
        for name in ("learning_rate", "adam_epsilon"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)!r}")
        for name in ("adam_weight_decay", "max_grad_norm", "lr_warmup_steps", "checkpoint_every", "num_workers",
                     "precompute_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler {self.lr_scheduler!r} unknown; choose one of {', '.join(LR_SCHEDULERS)}")
        for name in ("invariant_gamma", "variant_gamma", "adam_betas"):
            value = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, value)
            if len(value) != 2:
                raise ValueError(f"{name} must be two numbers, got {value!r}")
        for name in ("invariant_gamma", "variant_gamma"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high <= 1, got {[low, high]}")
        if not 0.25 <= self.timestep_power <= 8.0:
            raise ValueError(f"timestep_power must be in [0.25, 8] (1 = uniform), got {self.timestep_power!r}")
        drops = (self.drop_text, self.drop_image, self.drop_both)
        if any(not 0.0 <= p <= 1.0 for p in drops) or sum(drops) > 1.0:
            raise ValueError(f"drop_text, drop_image and drop_both must be in [0, 1] and sum to at most 1, got {drops}")
        if self.resolution % 8 or self.resolution < 64:
            raise ValueError(f"resolution must be a multiple of 8 of at least 64, got {self.resolution}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "encode_batch_size", "shuffle_buffer"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise ValueError(f"max_steps must be a whole number >= 0 (0 writes the untrained adapter), "
                             f"got {self.max_steps!r}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16', 'bf16' or absent, got {self.mixed_precision!r}")
        if self.report_to not in ("auto", "tensorboard", "none"):
            raise ValueError(f"report_to must be 'auto', 'tensorboard' or 'none', got {self.report_to!r}")
        unknown = set(self.adapter_sizes) - set(SIZE_KEYS)
        if unknown:
            raise ValueError(f"adapter_sizes keys {sorted(unknown)} unknown; accepted: {', '.join(SIZE_KEYS)}")
        if not (isinstance(self.init, str) and (self.init in INIT_CHOICES or self.init.endswith(".safetensors"))):
            raise ValueError(f"init {self.init!r} unknown; choose one of {', '.join(INIT_CHOICES)} or the path of a "
                             "FlexIP .safetensors file")
        if self.init == "ip_adapter" and not (self.init_preservation and self.init_personalization):
            raise ValueError("init='ip_adapter' needs init_preservation and init_personalization (IP-Adapter files)")

    def _check_data(self) -> None:
        """One source of training pairs: a manifest or shards."""
        if (self.manifest is None) == (self.shards is None):
            raise ValueError("give manifest (a JSONL file of pairs) or shards (WebDataset tar shards), "
                             f"{'not both' if self.manifest is not None else 'one of them'}")
        if self.manifest is not None and (not isinstance(self.manifest, str) or not self.manifest.strip()):
            raise ValueError(f"manifest must be a path, got {self.manifest!r}")
        if isinstance(self.shards, tuple):
            object.__setattr__(self, "shards", list(self.shards))
        if self.shards is not None:
            entries = [self.shards] if isinstance(self.shards, str) else self.shards
            if not isinstance(entries, list) or not entries or not all(isinstance(e, str) and e.strip()
                                                                        for e in entries):
                raise ValueError("shards must be a path pattern or a non-empty list of them, got "
                                 f"{self.shards!r}")

    def _check_number_types(self) -> None:
        """Each float, int and bool field holds one (a whole number is taken for a float): a typo in a config
        or a --set fails here, not deep inside a run."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and kind.endswith("| None"):
                continue
            kind = kind.removesuffix(" | None")
            if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise ValueError(f"{f.name} must be a finite number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif kind == "float":
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{f.name} must be a whole number, got {value!r}")
            elif kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig from a .json or .toml file; unknown keys are refused by name."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError("TOML configs need Python 3.11+; use a .json config") from None
        data = tomllib.loads(path.read_text())
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
    else:
        raise ValueError(f"config {path.name}: use a .json or .toml file")
    # manifest, shards and output_dir written in the file are relative to the file; overrides to the working
    # directory.
    for name in ("manifest", "output_dir"):
        if isinstance(data.get(name), str) and not Path(data[name]).is_absolute():
            data[name] = str((path.parent / data[name]).resolve())
    if isinstance(data.get("shards"), (str, list)):
        from flexip_core.training.shards import relative_to

        data["shards"] = relative_to(path.parent, data["shards"])
    data.update(overrides or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config {path.name}: unknown field(s) {', '.join(unknown)}; "
                         "see flexip_core.training.config.TrainConfig")
    missing = [name for name in ("output_dir",) if name not in data]
    if "manifest" not in data and "shards" not in data:
        missing.insert(0, "manifest (or shards)")
    if missing:
        raise ValueError(f"config {path.name}: missing {', '.join(missing)} (in the file or with --set)")
    return TrainConfig(**data)


def parse_overrides(items: list[str]) -> dict:
    """['max_steps=10', 'profile=tiny'] -> {'max_steps': 10, 'profile': 'tiny'} (values parsed as JSON if they are)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
