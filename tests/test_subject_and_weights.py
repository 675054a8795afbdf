"""Subject encoding (several photos, weights, cache) and native adapter files (round trip, strict errors)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flexip_core import FlexIPPipeline
from flexip_core.loading.weights import load_adapter, read_adapter_config, save_adapter

FAST = dict(num_inference_steps=3, seed=1, output_type="np")


def test_several_photos_combine_as_a_set(tiny_pipe, photos):
    """[CLS] embeddings by their weighted mean; patch tokens kept per photo, never averaged position by position."""
    dog, cat = tiny_pipe.encode_subject([photos["dog"]]), tiny_pipe.encode_subject([photos["cat"]])
    mostly_cat = tiny_pipe.encode_subject([photos["dog"], photos["cat"]], weights=[1.0, 3.0])
    assert torch.allclose(mostly_cat.features.clip_embeds, 0.25 * dog.features.clip_embeds
                          + 0.75 * cat.features.clip_embeds, atol=1e-6)
    assert sorted(mostly_cat.photo_weights) == [0.25, 0.75]
    tokens = mostly_cat.features.dino  # (2, S, D): each photo's own patch tokens
    assert tokens.shape[0] == 2 and {tuple(t.flatten()[:4].tolist()) for t in tokens} == {
        tuple(dog.features.dino.flatten()[:4].tolist()), tuple(cat.features.dino.flatten()[:4].tolist())}
    keys = {tiny_pipe.encode_subject([photos["dog"], photos["cat"]]).key,
            tiny_pipe.encode_subject([photos["cat"], photos["dog"]]).key}
    assert len(keys) == 1 and len(keys | {dog.key, cat.key, mostly_cat.key}) == 4


def test_photo_weights_act_on_the_image_as_a_set(tiny_pipe, photos):
    """Weight 0 and a duplicate photo change nothing; a second photo at weight 1 does; order does not matter; a
    small weight changes little (the weights act continuously)."""
    dog, cat = photos["dog"], photos["cat"]

    def run(images, weights=None):
        subject = tiny_pipe.encode_subject(images, weights)
        return tiny_pipe("a photo of it", subject=subject, gate=[0.2, 1.0], num_inference_steps=2, seed=1,
                         output_type="np").arrays

    alone = run([dog])
    assert np.abs(run([dog, cat], [1.0, 0.0]) - alone).max() <= 1e-5  # weight 0: the photo is absent
    assert np.abs(run([dog, dog.copy()]) - alone).max() <= 1e-5  # the same photo twice is once
    both = run([dog, cat])
    assert np.abs(both - alone).mean() > 1e-3  # a second photo at weight 1 counts
    assert np.abs(run([cat, dog]) - both).max() <= 1e-5  # order does not matter
    nearly_alone = run([dog, cat], [1.0, 1e-3])
    assert np.abs(nearly_alone - alone).max() < 0.1 * np.abs(both - alone).max()


def test_each_photo_is_encoded_once(tiny_pipe, photos):
    tiny_pipe.encode_subject([photos["backpack"]])
    calls = tiny_pipe.encoder.calls
    tiny_pipe.encode_subject([photos["backpack"], photos["backpack"].copy()], weights=[2, 1])
    assert tiny_pipe.encoder.calls == calls


@pytest.mark.parametrize("weights, message", [([1.0], "one weight per photo"), ([-1.0, 1.0], ">= 0"),
                                              ([0.0, 0.0], "not all be 0"), ([float("nan"), 1], ">= 0")])
def test_bad_photo_weights(tiny_pipe, photos, weights, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe.encode_subject([photos["dog"], photos["cat"]], weights=weights)


def test_adapter_save_load_reproduces_the_image(tiny_pipe, subject, photos, tmp_path):
    path = save_adapter(tiny_pipe.adapter, tmp_path / "adapter.safetensors")
    reloaded = FlexIPPipeline.from_profile("tiny", adapter=str(path))
    assert reloaded.adapter.config == tiny_pipe.adapter.config
    before = tiny_pipe("a dog", subject=subject, gate=[0.3, 0.8], **FAST).arrays
    after = reloaded("a dog", subject=reloaded.encode_subject([photos["dog"]]), gate=[0.3, 0.8], **FAST).arrays
    assert np.array_equal(before, after)


def test_wrong_adapter_files_name_the_keys(tiny_pipe, tmp_path):
    good = save_adapter(tiny_pipe.adapter, tmp_path / "good.safetensors")
    meta = {"format": "flexip-adapter/1", "config": read_adapter_config(good).to_json()}
    state = load_file(str(good))
    dropped = next(k for k in state if k.startswith("kv."))
    save_file({k: v for k, v in state.items() if k != dropped}, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=f"missing keys.*{dropped}"):
        load_adapter(tmp_path / "missing.safetensors")
    resized = dict(state, **{dropped: torch.zeros(3, 3)})
    save_file(resized, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=f"mismatched shapes.*{dropped}: file \\(3, 3\\)"):
        load_adapter(tmp_path / "shape.safetensors")
    save_file(state, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a native FlexIP adapter"):
        load_adapter(tmp_path / "plain.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_adapter(tmp_path / "corrupt.safetensors")
    with pytest.raises(ValueError, match="other cross-attention layers"):
        load_adapter(good, layers=(("down_blocks.9.attn2.processor", 64),))


def test_identity_score_is_highest_for_the_reference_itself(tiny_pipe, photos):
    subject = tiny_pipe.encode_subject([photos["dog"]])
    calls = tiny_pipe.encoder.calls
    same, other = tiny_pipe.identity_score([photos["dog"], photos["backpack"]], subject)
    assert same == pytest.approx(1.0, abs=1e-5) and other < same
    assert tiny_pipe.encoder.calls == calls  # scoring outputs never re-encodes the subject
