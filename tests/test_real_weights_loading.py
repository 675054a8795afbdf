"""Every way real weights arrive (Hub ids, the cache offline, folders, single files, LoRA), on tiny models
saved to disk in the real layouts; the low-VRAM and fp16 safeguards; and each failure with its message."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flexip_core import FlexIPPipeline
from flexip_core.generation.devices import NotEnoughMemory, SafeVaeDecoder, offload_chain, pick_device, pick_dtype
from flexip_core.loading.profiles import load_profile
from flexip_core.loading.sources import LDM_CROSS_ATTENTION_KEY, LDM_SDXL_KEY, WeightsNotFound
from flexip_core.loading.tiny import (
    CLIP_VISION,
    synthetic_ip_adapter_state,
    write_ip_adapter_file,
    write_lora,
    write_single_file_checkpoint,
    write_synthetic_ip_adapter_files,
)
from tests.conftest import REPO

PROMPT = "a photo of sks dog"
RUN = dict(num_inference_steps=3, height=64, width=64, seed=2, output_type="np")
CLIP_SIZES = dict(clip_embed_dim=CLIP_VISION["projection_dim"], clip_hidden_dim=CLIP_VISION["hidden_size"])
NOT_CACHED = "flexip-test/not-cached"


@pytest.fixture(scope="module")
def tiny_root(tiny_pipe) -> Path:
    return Path(tiny_pipe.profile.base).parent


@pytest.fixture(scope="module")
def ip_files(tiny_pipe, tmp_path_factory):
    return write_synthetic_ip_adapter_files(tiny_pipe.unet, tmp_path_factory.mktemp("ip"), **CLIP_SIZES)


@pytest.fixture(scope="module")
def lora_file(tiny_pipe, tmp_path_factory):
    return write_lora(tiny_pipe.unet, tmp_path_factory.mktemp("lora") / "pytorch_lora_weights.safetensors")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ip_parts(root: Path, ip_files) -> dict:
    """Overrides that turn the sd15 profile into tiny local models with IP-Adapter branches."""
    return dict(base=str(root / "base"), clip_encoder=str(root / "image_encoder"),
                preservation=str(ip_files[("plus", "safetensors")]),
                personalization=str(ip_files[("plain", "safetensors")]))


def fake_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """A Hugging Face cache entry (refs/main -> snapshots/<commit>/...) holding `files` (repo path -> local)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(commit)
    for target, source in files.items():
        destination = entry / "snapshots" / commit / target
        destination.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, destination)


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), **extra)
    return env


# --- loading paths -----------------------------------------------------------------------------------------
def test_hub_ids_load_from_the_cache_offline_through_the_cli(tiny_root, ip_files, photos, dreambench, tmp_path):
    """Every sd15 part replaced by a Hub id ('repo' or 'repo:path') that exists only in an offline cache."""
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "flexip-test/tiny-sd15", {".": tiny_root / "base"})
    fake_hub_cache(cache, "flexip-test/tiny-ip-adapter", {
        "models/image_encoder": tiny_root / "image_encoder",
        "models/ip-adapter-plus_sd15.safetensors": ip_files[("plus", "safetensors")],
        "models/ip-adapter_sd15.bin": ip_files[("plain", "bin")]})
    out = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, "-m", "flexip_core", "generate", "--profile", "sd15", "--base", "flexip-test/tiny-sd15",
         "--clip-encoder", "flexip-test/tiny-ip-adapter:models/image_encoder",
         "--preservation", "flexip-test/tiny-ip-adapter:models/ip-adapter-plus_sd15.safetensors",
         "--personalization", "flexip-test/tiny-ip-adapter:models/ip-adapter_sd15.bin",
         "--image", str(dreambench / "dog" / "00.jpg"), "--prompt", PROMPT, "--gate", "0.6", "--steps", "2",
         "--size", "64", "--seed", "5", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=subprocess_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    local = FlexIPPipeline.from_profile("sd15", **dict(ip_parts(tiny_root, ip_files),
                                                       personalization=str(ip_files[("plain", "bin")])))
    want = local(PROMPT, subject=local.encode_subject([photos["dog"]]), gate=0.6, num_inference_steps=2, height=64,
                 width=64, seed=5).images[0]
    # the same weights give the same image; another CPU thread count in this process may move a pixel by one level
    assert np.abs(np.asarray(Image.open(out).convert("RGB"), int) - np.asarray(want, int)).max() <= 1


def test_every_profile_part_can_be_overridden(tiny_root, ip_files, tmp_path):
    pipe = FlexIPPipeline.from_profile("sd15", **ip_parts(tiny_root, ip_files))
    assert pipe.profile.gate_curve == load_profile("sd15").gate_curve  # the profile's own curve is kept
    assert (pipe.adapter.config.preservation.kind, pipe.adapter.config.personalization.kind) == \
        ("ip_adapter_plus", "ip_adapter")
    native = pipe.adapter
    from flexip_core.loading.weights import save_adapter

    path = save_adapter(native, tmp_path / "native.safetensors")
    again = FlexIPPipeline.from_profile("sd15", adapter=str(path), **ip_parts(tiny_root, ip_files))
    assert again.profile.adapter == str(path)  # a native adapter given explicitly wins over the IP-Adapter files
    tiny_with_ip = FlexIPPipeline.from_profile("tiny", preservation=str(ip_files[("plain", "bin")]),
                                               personalization=str(ip_files[("plain", "bin")]))
    assert tiny_with_ip.profile.adapter is None  # ...and IP-Adapter files given explicitly win over the profile's


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint_loads_offline_with_a_local_config(tiny_pipe, subject, tiny_root, tmp_path, offline,
                                                                  suffix):
    checkpoint = write_single_file_checkpoint(tiny_root / "base", tmp_path / f"community-model{suffix}")
    pipe = FlexIPPipeline.from_profile("tiny", base=str(checkpoint), base_config=str(tiny_root / "base"))
    want = tiny_pipe(PROMPT, subject=subject, gate=[0.3, 0.9], **RUN).arrays
    got = pipe(PROMPT, subject=subject, gate=[0.3, 0.9], **RUN).arrays  # same encoder and adapter: same subject
    assert np.abs(got - want).max() <= 1e-6


def test_single_file_without_its_config_offline_says_what_to_download(tiny_root, tmp_path, offline):
    checkpoint = write_single_file_checkpoint(tiny_root / "base", tmp_path / "model.safetensors")
    expected = r"hf download flexip-test/no-such-config --include '\*\.json' --include '\*\.txt'.*--base-config PATH"
    with pytest.raises(WeightsNotFound, match=expected):
        FlexIPPipeline.from_profile("tiny", base=str(checkpoint), base_config="flexip-test/no-such-config")


def test_sdxl_sd2_and_corrupt_single_files_are_refused(tiny_root, tmp_path):
    save_file({LDM_SDXL_KEY: torch.zeros(3, 2)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ValueError, match="xl.safetensors is an SDXL checkpoint"):
        FlexIPPipeline.from_profile("tiny", base=str(tmp_path / "xl.safetensors"))
    save_file({LDM_CROSS_ATTENTION_KEY: torch.zeros(320, 1024)}, str(tmp_path / "v2.safetensors"))
    with pytest.raises(ValueError, match="1024-wide cross-attention"):
        FlexIPPipeline.from_profile("tiny", base=str(tmp_path / "v2.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    with pytest.raises(ValueError, match="cut.safetensors is not a readable .safetensors file.*download it again"):
        FlexIPPipeline.from_profile("tiny", base=str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="file not found: .*nowhere.ckpt"):
        FlexIPPipeline.from_profile("tiny", base=str(tmp_path / "nowhere.ckpt"))
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "callback": NotATensor()},
               tmp_path / "lightning.ckpt")
    with pytest.raises(ValueError, match="lightning.ckpt holds objects other than tensors, which are never unpickled"):
        FlexIPPipeline.from_profile("tiny", base=str(tmp_path / "lightning.ckpt"), base_config=str(tiny_root / "base"))


def test_lora_is_fused_and_equals_diffusers(tiny_pipe, subject, lora_file):
    from diffusers import StableDiffusionPipeline

    pipe = FlexIPPipeline.from_profile("tiny", lora=str(lora_file))
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())  # fused: no LoRA layers left
    got = pipe(PROMPT, subject=subject, branch_weights=(0.0, 0.0), scheduler="pndm", **RUN).arrays
    reference = StableDiffusionPipeline.from_pretrained(tiny_pipe.profile.base, safety_checker=None,
                                                        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(lora_file))
    want = reference(PROMPT, num_inference_steps=3, height=64, width=64, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(RUN["seed"])).images
    assert np.abs(got - want).max() <= 1e-4
    without = tiny_pipe(PROMPT, subject=subject, branch_weights=(0.0, 0.0), scheduler="pndm", **RUN).arrays
    assert np.abs(got - without).mean() > 1e-3


def test_fast_profile_composes_lcm_lora_with_both_branches(tiny_root, ip_files, lora_file, photos):
    profile = load_profile("sd15-fast")
    assert profile.lora.startswith("latent-consistency/lcm-lora-sdv1-5")
    d = profile.defaults
    assert d.scheduler == "lcm" and 4 <= d.num_inference_steps <= 8 and d.guidance_scale <= 2.0
    assert (profile.preservation, profile.personalization) == (load_profile("sd15").preservation,
                                                               load_profile("sd15").personalization)
    pipe = FlexIPPipeline.from_profile("sd15-fast", lora=str(lora_file), **ip_parts(tiny_root, ip_files))
    out = pipe(PROMPT, subject=pipe.encode_subject([photos["dog"]]), gate=[0.0, 1.0], height=64, width=64,
               output_type="np")
    assert out.parameters[0]["scheduler"] == "lcm" and out.parameters[0]["num_inference_steps"] == d.num_inference_steps
    assert np.isfinite(out.arrays).all() and np.abs(out.arrays[0] - out.arrays[1]).mean() > 1e-3


# --- failures: what was wrong and what to do ---------------------------------------------------------------
@pytest.mark.parametrize("part, source, command, flag", [
    ("base", NOT_CACHED,
     f"hf download {NOT_CACHED} --include '\\*.json' .*--include '\\*/diffusion_pytorch_model.safetensors'",
     "--base PATH"),
    ("clip_encoder", f"{NOT_CACHED}:models/image_encoder",
     f"hf download {NOT_CACHED} --include 'models/image_encoder/\\*.json' "
     ".*--include 'models/image_encoder/\\*.safetensors'",
     "--clip-encoder PATH"),
    ("preservation", f"{NOT_CACHED}:models/ip-adapter-plus_sd15.safetensors",
     f"hf download {NOT_CACHED} models/ip-adapter-plus_sd15.safetensors", "--preservation PATH"),
    ("adapter", f"{NOT_CACHED}:flexip.safetensors", f"hf download {NOT_CACHED} flexip.safetensors", "--adapter PATH"),
    ("lora", f"{NOT_CACHED}:pytorch_lora_weights.safetensors",
     f"hf download {NOT_CACHED} pytorch_lora_weights.safetensors", "--lora PATH"),
])
def test_missing_weights_offline_name_the_repo_the_command_and_the_flag(offline, ip_files, part, source, command, flag):
    extra = {"personalization": str(ip_files[("plain", "safetensors")])} if part == "preservation" else {}
    with pytest.raises(WeightsNotFound) as caught:
        FlexIPPipeline.from_profile("tiny", **{part: source}, **extra)
    message = str(caught.value)
    assert f"'{NOT_CACHED}'" in message and "HF_HUB_OFFLINE=1" in message
    assert re.search(command, message), message
    assert flag in message


def test_sd15_offline_with_an_empty_cache_fails_clearly(tmp_path, dreambench):
    result = subprocess.run(
        [sys.executable, "-m", "flexip_core", "generate", "--profile", "sd15", "--image",
         str(dreambench / "dog" / "00.jpg"), "--prompt", "x", "--out", str(tmp_path / "o.png")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=subprocess_env(HF_HUB_CACHE=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in result.stderr
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include" in result.stderr
    assert "--base PATH" in result.stderr


def test_default_profile_on_cuda_is_sd15_only_when_its_weights_are_cached(monkeypatch, tmp_path):
    """A GPU user without the real weights starts on the offline profile, not on a 6 GB download; once the
    weights are cached (online or not), sd15 is the default."""
    import huggingface_hub

    from flexip_core.loading.profiles import default_profile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    offline_default = default_profile()
    assert offline_default in ("mini", "tiny")
    stub = tmp_path / "stub.bin"
    stub.write_bytes(b"0")
    base = ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors")
    ip = ("models/image_encoder/config.json", "models/image_encoder/model.safetensors",
          "models/ip-adapter-plus_sd15.safetensors")
    fake_hub_cache(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5", dict.fromkeys(base, stub))
    fake_hub_cache(tmp_path, "h94/IP-Adapter", dict.fromkeys(ip, stub))
    assert default_profile() == offline_default  # the personalization branch's file is still missing
    fake_hub_cache(tmp_path, "h94/IP-Adapter", {"models/ip-adapter_sd15.safetensors": stub})
    assert default_profile() == "sd15"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert default_profile() == "sd15"  # offline with the cache filled
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_profile() == offline_default


def test_sdxl_shaped_adapter_names_keys_and_shapes(tiny_pipe, tmp_path):
    image_proj, ip_adapter = synthetic_ip_adapter_state(tiny_pipe.unet, "plain", **CLIP_SIZES)
    image_proj["proj.weight"], image_proj["norm.weight"] = torch.zeros(4 * 2048, 32), torch.ones(2048)
    image_proj["proj.bias"], image_proj["norm.bias"] = torch.zeros(4 * 2048), torch.zeros(2048)
    xl = {k: torch.zeros(v.shape[0], 2048) for k, v in ip_adapter.items()}
    xl["9.to_k_ip.weight"], xl["9.to_v_ip.weight"] = torch.zeros(640, 2048), torch.zeros(640, 2048)  # an extra layer
    path = write_ip_adapter_file(tmp_path / "ip-adapter_sdxl.safetensors", image_proj, xl)
    first_width = tiny_pipe.adapter.config.layers[0][1]
    with pytest.raises(ValueError) as caught:
        FlexIPPipeline.from_profile("tiny", preservation=str(path), personalization=str(path))
    message = str(caught.value)
    assert "ip-adapter_sdxl.safetensors does not fit this UNet" in message
    assert "image_proj makes 2048-wide tokens; this UNet's cross-attention takes 32" in message
    assert f"ip_adapter.1.to_k_ip.weight: file ({first_width}, 2048) vs model ({first_width}, 32)" in message
    assert "unexpected keys (2): ip_adapter.9.to_k_ip.weight" in message and "SDXL" in message
    del ip_adapter["3.to_v_ip.weight"]
    path = write_ip_adapter_file(tmp_path / "partial.bin", synthetic_ip_adapter_state(
        tiny_pipe.unet, "plus", **CLIP_SIZES)[0], ip_adapter)
    with pytest.raises(ValueError, match=r"partial.bin does not fit .*missing keys \(1\): ip_adapter.3.to_v_ip.weight"):
        FlexIPPipeline.from_profile("tiny", preservation=str(path), personalization=str(path))


class NotATensor:
    """Any object other than tensors and containers: weights_only loading must refuse it."""


def test_corrupt_and_foreign_files_are_named(ip_files, tiny_root, tmp_path):
    good = ip_files[("plain", "safetensors")]
    plain = str(ip_files[("plain", "bin")])

    def load(path):
        return FlexIPPipeline.from_profile("tiny", preservation=str(path), personalization=plain)

    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable .safetensors file.*corrupt or truncated"):
        load(tmp_path / "cut.safetensors")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.bin is empty \(0 bytes\).*download it again"):
        load(tmp_path / "empty.bin")
    (tmp_path / "junk.bin").write_bytes(b"PK\x03\x04 this is no zip archive")
    with pytest.raises(ValueError, match="junk.bin is not a readable PyTorch file.*corrupt or truncated"):
        load(tmp_path / "junk.bin")
    torch.save({"image_proj": {"proj.weight": torch.zeros(1)}, "ip_adapter": NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="evil.bin holds objects other than tensors, which are never unpickled"):
        load(tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="flexip_adapter.safetensors is not an IP-Adapter file"):
        load(tiny_root / "flexip_adapter.safetensors")
    faceid = {"proj.0.weight": torch.zeros(8, 4), "proj.2.weight": torch.zeros(8, 8), "norm.weight": torch.ones(2)}
    write_ip_adapter_file(tmp_path / "ip-adapter-faceid.bin", faceid, {"1.to_k_ip.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="IP-Adapter FaceID file.*takes the plain and the Plus"):
        load(tmp_path / "ip-adapter-faceid.bin")
    with pytest.raises(ValueError, match="one file per branch"):
        FlexIPPipeline.from_profile("tiny", preservation=plain)


def test_folders_and_files_of_the_wrong_kind_are_named_with_what_to_give(tiny_root, tmp_path):
    """A folder without a model, a file that is no LoRA: what is wrong with which part, not a traceback or a
    download hint for a file that is right here."""
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"^base: the folder .* does not hold a StableDiffusionPipeline "
                                         r"\(.*model_index.json.*\); give the model's own folder"):
        FlexIPPipeline.from_profile("tiny", base=str(tmp_path))
    with pytest.raises(ValueError, match=r"^clip encoder: the folder .* does not hold a CLIPVisionModelWithProjection"):
        FlexIPPipeline.from_profile("tiny", clip_encoder=str(tmp_path))
    with pytest.raises(ValueError, match=r"^lora: notes.txt is not a readable LoRA weights file"):
        FlexIPPipeline.from_profile("tiny", lora=str(tmp_path / "notes.txt"))


def test_clip_encoder_must_fit_the_adapter(tiny_pipe, tmp_path):
    files = write_synthetic_ip_adapter_files(tiny_pipe.unet, tmp_path, clip_embed_dim=48, clip_hidden_dim=32)
    with pytest.raises(ValueError, match="personalization branch \\(ip_adapter\\) expects 48-wide CLIP image "
                                         "embeddings, but the encoder .* gives 32"):
        FlexIPPipeline.from_profile("tiny", preservation=str(files[("plus", "bin")]),
                                    personalization=str(files[("plain", "bin")]))


def test_convert_command_reports_missing_files(tmp_path, capsys):
    from flexip_core.cli import main

    assert main(["convert-ip-adapter", "--preservation", str(tmp_path / "nope.bin"), "--personalization",
                 str(tmp_path / "nope.bin"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "preservation: file not found" in capsys.readouterr().err


def test_out_of_memory_says_what_to_do_and_the_pipeline_keeps_working(photos, monkeypatch):
    pipe = FlexIPPipeline.from_profile("tiny")
    subject = pipe.encode_subject([photos["dog"]])
    real_forward = pipe.unet.forward

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(pipe.unet, "forward", exhausted)
    with pytest.raises(NotEnoughMemory, match=r"not enough CPU memory to generate these images \(CUDA out of memory"
                                              r"\. Tried to allocate 20\.00 GiB\).*--low-vram"):
        pipe(PROMPT, subject=subject, gate=[0.1] * 8, **RUN)
    monkeypatch.setattr(pipe.unet, "forward", real_forward)
    assert np.isfinite(pipe(PROMPT, subject=subject, **RUN).arrays).all()  # the same pipeline still works

    def load_fails(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr("flexip_core.loading.assembly.load_base", load_fails)
    with pytest.raises(NotEnoughMemory, match="to load this profile.*--low-vram"):
        FlexIPPipeline.from_profile("tiny")
    with pytest.raises(NotEnoughMemory, match="low-VRAM option is already on"):
        FlexIPPipeline.from_profile("tiny", low_vram=True)


# --- devices ---------------------------------------------------------------------------------------------
def test_device_and_dtype_are_chosen_and_overridable():
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype(None, torch.device("cuda")) == torch.float16
    assert pick_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'float8' unknown"):
        pick_dtype("float8", torch.device("cpu"))
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device(None) in (torch.device("cpu"), torch.device("mps"))
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


def test_low_vram_options_keep_the_image(tiny_pipe, subject):
    pipe = FlexIPPipeline.from_profile("tiny", low_vram=True)
    assert pipe.vae.use_tiling and pipe.vae.use_slicing and pipe.low_vram.cpu_offload
    want = tiny_pipe(PROMPT, subject=subject, gate=[0.2, 0.8], **RUN).arrays
    assert np.abs(pipe(PROMPT, subject=subject, gate=[0.2, 0.8], **RUN).arrays - want).max() <= 1e-5
    # the offload hooks themselves (CUDA only in real use) leave the computation unchanged
    hooks = offload_chain([pipe.encoder.clip, pipe.text_encoder, pipe.unet, pipe.vae], torch.device("cpu"))
    assert len(hooks) == 4
    assert np.abs(pipe(PROMPT, subject=subject, gate=[0.2, 0.8], **RUN).arrays - want).max() <= 1e-5


def test_half_precision_vae_never_returns_nan(tiny_pipe, caplog):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_pipe.profile.base, subfolder="vae", dtype=torch.bfloat16)

    def overflow(module, inputs, output):  # what an fp16 VAE does on some latents
        return output + float("inf") if output.dtype == torch.bfloat16 else output

    vae.decoder.conv_out.register_forward_hook(overflow)
    decoder = SafeVaeDecoder(vae, torch.device("cpu"))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = decoder(latents)
    assert torch.isfinite(image).all() and image.dtype == torch.float32
    assert "decoding in float32 from now on" in caplog.text
    reference = AutoencoderKL.from_pretrained(tiny_pipe.profile.base, subfolder="vae")
    want = reference.decode(latents.bfloat16().float() / reference.config.scaling_factor).sample
    assert torch.allclose(image, want, atol=2e-2)  # the bf16 weights, upcast
    assert torch.equal(decoder(latents), image)  # the fp32 copy is kept


@pytest.mark.server
def test_gpu_check_smoke_runs_end_to_end(tmp_path):
    """benchmarks/gpu_check.py --smoke: the whole script on CPU with the tiny configs."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--json", str(report)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(report.read_text())
    for key in ("device", "backend_agreement", "plain_sd_it_s", "diffusers_ip_adapter_it_s", "flexip_it_s",
                "fast_image_s", "total_s"):
        assert key in data, key
    assert data["plain_sd_it_s"] > 0 and data["flexip_it_s"] > 0 and data["fast_image_s"] > 0
    assert "it/s" in result.stdout and "FlexIP" in result.stdout
    # issue 35: fused and unfused side by side, the real server's figures, the targets printed last
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", data["date"]) and data["smoke"] is True
    assert data["flexip_fused_it_s"] > 0 and data["flexip_unfused_it_s"] > 0 and data["flexip_channels_last_it_s"] > 0
    assert data["ops_per_step"]["fused"] < data["ops_per_step"]["unfused"]
    for key in ("server_release_to_final_s", "fast_release_to_final_s", "sweep_batched_s", "sweep_sequential_s"):
        assert data[key] > 0, key
    assert data["first_preview_ms"] is None or data["first_preview_ms"] > 0
    assert data["drag_renders_per_s"] >= 0 and data["server"]["sd15"]["steps"] == 20  # the scripted drag ran
    assert data["server"]["sd15-fast"]["steps"] == 4 and data["server"]["sd15-fast"]["scheduler"] == "lcm"
    assert [t["name"] for t in data["targets"]] == ["flexip_vs_plain_sd", "flexip_vs_ip_adapter_plus",
                                                    "release_to_final_sd15", "release_to_final_fast",
                                                    "first_preview", "drag_renders"]
    last = result.stdout.strip().splitlines()[-7:]
    assert last[0].startswith("issue 35 targets") and all(line.rstrip().endswith(("PASS", "FAIL", "PENDING"))
                                                            for line in last[1:]), last


def test_profile_paths_under_assets_resolve_from_any_working_folder(tmp_path, monkeypatch):
    """Shipped weights ("{assets}/mini/base") are found wherever the app is started from."""
    from flexip_core.loading.profiles import PROFILE_DIR

    profile_file = tmp_path / "shipped.json"
    profile_file.write_text(json.dumps({"name": "shipped", "base": "{assets}/mini/base",
                                        "clip_encoder": "{assets}/mini/image_encoder",
                                        "adapter": "{assets}/mini/flexip_adapter.safetensors"}))
    monkeypatch.chdir(tmp_path)
    profile = load_profile(str(profile_file))
    assert profile.base == str(PROFILE_DIR.parent / "mini" / "base")
    assert Path(profile.adapter).parent == PROFILE_DIR.parent / "mini"
    profile_file.write_text(json.dumps({"name": "incomplete", "base": "x", "colour": "red"}))
    with pytest.raises(ValueError, match="shipped.json.*clip_encoder"):
        load_profile(str(profile_file))
    for text, message in (("{bad", "shipped.json: not valid JSON"), ("[1]", "shipped.json: expected a JSON object")):
        profile_file.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_profile(str(profile_file))
    (tmp_path / "notes.txt").write_text("{}")
    with pytest.raises(ValueError, match="a profile file is .json .* or give one of the names .*mini"):
        load_profile(str(tmp_path / "notes.txt"))


def test_an_sdxl_base_is_cached_only_with_its_second_text_encoder(monkeypatch, tmp_path):
    import huggingface_hub

    from flexip_core.loading.profiles import load_profile
    from flexip_core.loading.sources import profile_cached

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    stub = tmp_path / "stub.bin"
    stub.write_bytes(b"0")
    base = ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors")
    ip = ("models/image_encoder/config.json", "models/image_encoder/model.safetensors",
          "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "sdxl_models/ip-adapter_sdxl_vit-h.safetensors")
    profile = load_profile("sdxl")
    fake_hub_cache(tmp_path, profile.base, dict.fromkeys(base, stub))
    fake_hub_cache(tmp_path, "h94/IP-Adapter", dict.fromkeys(ip, stub))
    assert not profile_cached(profile)
    fake_hub_cache(tmp_path, profile.base, {"text_encoder_2/model.safetensors": stub})
    assert profile_cached(profile)


def test_gpu_check_sdxl_smoke_runs_end_to_end(tmp_path):
    """benchmarks/gpu_check.py --family sdxl --smoke: the SDXL check on CPU with the tiny SDXL, every figure filled."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--family", "sdxl", "--smoke", "--json",
                             str(report)], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["family"] == "sdxl" and data["size"] == 64 and data["flexip_backend"] == "sdpa"
    for key in ("plain_sdxl_it_s", "diffusers_ip_adapter_it_s", "flexip_it_s", "flexip_image_s", "low_vram_image_s",
                "controlnet_image_s", "inpainting_image_s"):
        assert data[key] > 0, key
    assert data["flexip_peak_gb"] is None and data["low_vram_peak_gb"] is None  # peak memory is read on CUDA only
    assert set(data["ratios_to_plain"]) == {"diffusers_ip_adapter", "flexip"}
    assert "plain SDXL" in result.stdout and "ControlNet" in result.stdout and "inpainting" in result.stdout
