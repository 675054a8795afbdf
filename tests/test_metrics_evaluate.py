"""DreamBench metrics on tiny random CLIP and DINO models, and the evaluation command end to end."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flexip_core.evaluate import main
from flexip_core.evaluation.metrics import (
    MetricConfig,
    MetricModels,
    clip_i,
    clip_t,
    dino_i,
    dreambench_dino_processor,
)
from flexip_core.evaluation.run import (
    curve_quality,
    neighbour_distances,
    prompt_text,
    rank_correlations,
    read_prompts,
    smoothness,
    spearman,
)

REPO = Path(__file__).resolve().parent.parent

TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
            max_position_embeddings=77, bos_token_id=668, eos_token_id=669, pad_token_id=669)
VISION = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
              patch_size=8)


@pytest.fixture(scope="module")
def metric_folders(tmp_path_factory):
    """Tiny random CLIP (both towers, with the tiny tokenizer and its image processor) and DINO ViT, built from
    config dicts and saved."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, ViTConfig, ViTModel

    from flexip_core.loading.tiny_tokenizer import save_tiny_tokenizer

    root = tmp_path_factory.mktemp("metric-models")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=32)).save_pretrained(root / "clip")
    save_tiny_tokenizer(root / "clip")
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(root / "clip")
    torch.manual_seed(0)
    ViTModel(ViTConfig(**VISION), add_pooling_layer=False).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


@pytest.fixture(scope="module")
def metrics(metric_folders):
    clip, dino = metric_folders
    return MetricModels.load(MetricConfig(clip=str(clip), dino=str(dino)), device="cpu")


def test_identical_images_score_one_and_different_images_less(metrics, photos):
    dog, cat, backpack = photos["dog"], photos["cat"], photos["backpack"]
    same_clip, other_clip = clip_i(metrics, [dog, backpack], [dog])
    same_dino, other_dino = dino_i(metrics, [dog, backpack], [dog.copy()])
    assert same_clip == pytest.approx(1.0, abs=1e-5) and same_dino == pytest.approx(1.0, abs=1e-5)
    assert other_clip < same_clip - 1e-4 and other_dino < same_dino - 1e-4
    # several references: the mean of the pairwise similarities
    both = dino_i(metrics, [dog], [dog, cat])[0]
    assert both == pytest.approx((1.0 + dino_i(metrics, [dog], [cat])[0]) / 2, abs=1e-6)


def test_prompt_score_is_the_cosine_of_image_and_text_embeddings(metrics, photos):
    images, prompts = [photos["dog"], photos["cat"]], ["a dog", "a cat on the beach"]
    scores = clip_t(metrics, images, prompts)
    image, text = metrics.clip_image(images), metrics.clip_text(prompts)
    expected = torch.nn.functional.cosine_similarity(image, text).tolist()
    assert scores == pytest.approx(expected, abs=1e-5)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    references = metrics.references([photos["dog"]])
    scored = metrics.score(images, references, "a dog")
    assert scored["clip_i"][0] == pytest.approx(1.0, abs=1e-5) and len(scored["clip_t"]) == 2
    assert metrics.score_embedded(metrics.embed(images), references, "a dog") == scored


def test_embeddings_equal_transformers_own_path(metrics, metric_folders, photos):
    """CLIP: `get_image_features` / `get_text_features` on the model's own processor; DINO: the [CLS] token of
    `ViTModel` on pixels prepared with DreamBench's transform (Resize(256, bicubic), CenterCrop(224), ImageNet
    statistics), scaled to the tiny model's 32 px input."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, ViTModel

    clip_folder, dino_folder = metric_folders
    wide = photos["backpack"].resize((300, 180))  # not square: exercises the short-side resize and the crop
    images = [photos["dog"], photos["cat"], wide]
    prompts = ["a dog", "a cat on the beach wearing a very long and detailed red hat"]
    clip, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    dino = ViTModel.from_pretrained(dino_folder, add_pooling_layer=False).eval()
    dreambench = CLIPImageProcessorPil(size={"shortest_edge": round(32 * 256 / 224)},
                                       crop_size={"height": 32, "width": 32}, resample=Image.BICUBIC,
                                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    with torch.no_grad():
        image = clip.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        text = clip.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt")).pooler_output
        cls = dino(pixel_values=dreambench(images=images, return_tensors="pt").pixel_values).last_hidden_state[:, 0]
    assert torch.allclose(metrics.clip_image(images), image, atol=1e-5, rtol=0)
    assert torch.allclose(metrics.clip_text(prompts), text, atol=1e-5, rtol=0)
    assert torch.allclose(metrics.dino_image(images), cls, atol=1e-5, rtol=0)
    assert metrics.embed(images).dino.shape == (3, 32)
    full = dreambench_dino_processor(224)  # the real DINO ViT-S/16: DreamBench's 256 -> 224
    assert full.size == {"shortest_edge": 256} and full.crop_size == {"height": 224, "width": 224}


def test_missing_metric_models_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="clip metric: file not found"):
        MetricModels.load(MetricConfig(clip=str(tmp_path / "nothing"), dino=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="clip metric .*--clip-metric"):  # a Hub id that is not in the cache
        MetricModels.load(MetricConfig(clip="flexip-test/no-such-clip", dino="flexip-test/no-such-dino"))


def test_dreambench_prompts_and_classes(dreambench):
    bench = read_prompts(dreambench / "prompts_and_classes.txt")
    assert len(bench.classes) == 30 and len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25
    assert bench.class_of("bear_plushie") == "stuffed animal"
    assert "wearing a red hat" in bench.templates_for("dog2")[10]  # live subject
    assert "wheat field" in bench.templates_for("backpack")[10]  # object
    assert prompt_text(bench.object_prompts[0], "", "backpack") == "a backpack in the jungle"
    assert prompt_text(bench.object_prompts[0], "sks", "backpack") == "a sks backpack in the jungle"


def test_curve_quality_flags_jumps_and_direction():
    smooth = [dict(setting=g, clip_i=0.5 + 0.1 * g, dino_i=0.3 + 0.2 * g, clip_t=0.3 - 0.1 * g) for g in (0, 0.5, 1)]
    quality = curve_quality(smooth)
    assert all(q["monotonic"] for q in quality.values())
    assert quality["clip_i"]["max_step_over_mean"] == pytest.approx(1.0)
    jumpy = [dict(setting=g, clip_i=c, dino_i=c, clip_t=0.3) for g, c in ((0, 0.5), (0.5, 0.51), (1, 0.9))]
    assert curve_quality(jumpy)["clip_i"]["max_step_over_mean"] > 1.9
    falling_identity = [dict(p, clip_i=-p["clip_i"]) for p in jumpy]
    assert not curve_quality(falling_identity)["clip_i"]["monotonic"]


def test_spearman_and_smoothness_figures():
    assert spearman([0, 0.5, 1], [0.1, 0.2, 0.9]) == pytest.approx(1.0)
    assert spearman([0, 0.5, 1], [0.9, 0.2, 0.1]) == pytest.approx(-1.0)
    assert spearman([0, 0, 1, 1], [1, 2, 3, 4]) == pytest.approx(2 / np.sqrt(5))  # ties share their mean rank
    assert spearman([0, 0.5, 1], [0.3, 0.3, 0.3]) is None
    # neighbours by setting, whatever order the sweep was drawn in
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    steps = neighbour_distances([1.0, 0.0, 0.5], features)  # order by setting: 0.0 (row 1), 0.5 (row 2), 1.0 (row 0)
    assert steps[1] == "" and steps[2] == pytest.approx(1 - np.sqrt(0.5))
    assert steps[0] == pytest.approx(1 - np.sqrt(0.5))
    even, uneven = ("", 0.1, 0.1, 0.1), ("", 0.1, 0.3)  # DINO steps of two sweeps: even, and one step 3x the other
    rows = [dict(method="flexip", subject="dog", prompt_index=0, seed=seed, setting=g, dino_step=step, clip_i=g,
                 dino_i=g, clip_t=-g)
            for seed, sweep in enumerate((even, uneven)) for g, step in zip((0, 0.3, 0.6, 1), sweep)]
    figure = smoothness(rows)["flexip"]
    assert figure["sweeps"] == 2 and figure["mean_step"] == pytest.approx(0.14)  # mean of 0.1, 0.1, 0.1, 0.1, 0.3
    assert figure["max_step_over_mean"] == pytest.approx((1.0 + 1.5) / 2)
    assert figure["worst_max_step_over_mean"] == pytest.approx(1.5)
    assert figure["step_cv"] == pytest.approx((0.0 + 0.5) / 2)
    assert rank_correlations(rows)["flexip"] == pytest.approx(dict(clip_i=1.0, dino_i=1.0, clip_t=-1.0))


def test_evaluation_writes_scores_summary_and_plot(dreambench, metric_folders, tmp_path, monkeypatch):
    clip, dino = metric_folders
    out = tmp_path / "eval"
    referenced = []  # how many photos each subject's identity is scored against
    references = MetricModels.references
    monkeypatch.setattr(MetricModels, "references", lambda self, p: referenced.append(len(p)) or references(self, p))
    code = main(["--profile", "tiny", "--subjects", str(dreambench), "--subject", "dog", "--subject", "backpack",
                 "--max-prompts", "2", "--gates", "0,0.5,1", "--seeds", "0", "--steps", "2", "--baseline", "tiny",
                 "--baseline-scales", "0.5,1", "--clip-metric", str(clip), "--dino-metric", str(dino),
                 "--exclude-reference", "--out", str(out)])
    assert code == 0
    photo_counts = [len(list((dreambench / name).glob("*.jpg"))) for name in ("backpack", "dog")]
    assert referenced == [n - 1 for n in photo_counts]  # the conditioning photo left out
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 2 * 2 * (3 + 2)  # subjects x prompts x (gates + baseline scales)
    sweep = [r for r in rows if (r["method"], r["subject"], r["prompt_index"]) == ("flexip", "dog", "0")]
    assert [r["dino_step"] == "" for r in sweep] == [True, False, False]  # the lowest gamma has no lower neighbour
    assert all(0 <= float(r["dino_step"]) <= 2 for r in sweep[1:])
    flexip = [r for r in rows if r["method"] == "flexip"]
    assert {r["gate"] for r in flexip} == {"0.0", "0.5", "1.0"}
    assert {(r["w_pres"], r["w_pers"]) for r in flexip if r["gate"] == "1.0"} == {("1.0", "0.0")}
    assert {r["w_pers"] for r in rows if r["method"] == "ip_adapter"} == {"0.0"}
    assert all(-1.0 <= float(r[m]) <= 1.0 for r in rows for m in ("clip_i", "dino_i", "clip_t"))
    assert {r["prompt"] for r in rows if r["subject"] == "dog"} == {"a dog in the jungle", "a dog in the snow"}
    assert all((out / r["image"]).is_file() for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert {(s["method"], s["setting"]) for s in summary["summary"]} == {
        ("flexip", 0.0), ("flexip", 0.5), ("flexip", 1.0), ("ip_adapter", 0.5), ("ip_adapter", 1.0)}
    assert summary["images"] == 20 and summary["images_per_second"] > 0
    assert set(summary["curves"]) == {"flexip", "ip_adapter"}
    assert set(summary["spearman"]["flexip"]) == {"clip_i", "dino_i", "clip_t"}
    assert all(-1 <= v <= 1 for m in summary["spearman"].values() for v in m.values() if v is not None)
    assert summary["smoothness"]["flexip"]["sweeps"] == 2 * 2 and summary["smoothness"]["ip_adapter"]["sweeps"] == 4
    assert summary["smoothness"]["flexip"]["max_step_over_mean"] >= 1.0
    assert summary["exclude_reference"] is True and summary["processes"] == 1 and summary["seeds"] == [0]
    with Image.open(out / "tradeoff.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 500
    assert (out / "summary.csv").is_file()


def test_evaluation_refuses_bad_arguments(dreambench, metric_folders, tmp_path, capsys):
    clip, dino = metric_folders
    common = ["--profile", "tiny", "--subjects", str(dreambench), "--out", str(tmp_path), "--clip-metric", str(clip),
              "--dino-metric", str(dino)]
    assert main(common + ["--subject", "unicorn"]) == 2
    assert "unicorn" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(common + ["--gates", "0,1.5"])
    assert stop.value.code == 2 and "outside 0…1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse refuses it before anything loads
        main(common + ["--seeds", "0,x"])
    assert stop.value.code == 2 and "expected comma-separated numbers" in capsys.readouterr().err


def test_evaluation_checks_every_setting_before_loading_a_model(dreambench, tmp_path, capsys, monkeypatch):
    from flexip_core.evaluation import metrics
    from flexip_core.generation import pipeline

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline.FlexIPPipeline, "from_profile", never)
    monkeypatch.setattr(metrics.MetricModels, "load", never)
    (tmp_path / "notes.txt").write_text("")
    common = ["--profile", "tiny", "--subjects", str(dreambench), "--out", str(tmp_path / "eval")]
    for extra, message in ((["--max-prompts", "0"], "argument --max-prompts: must be at least 1, got 0"),
                           (["--out", str(tmp_path / "notes.txt")], "is a file; give a folder")):
        with pytest.raises(SystemExit) as stop:  # argparse refuses these
            main(common + extra)
        assert stop.value.code == 2 and message in capsys.readouterr().err, extra
    for extra, message in ((["--size", "70"], "must be a multiple of 8 from 64"),
                           (["--steps", "0"], "num_inference_steps must be a whole number from 1"),
                           (["--strength", "5"], "strength must be a number in \\[0, 2\\]"),
                           (["--seeds", "-1"], "--seeds must be 0 or more"),
                           (["--subject", "dog", "--exclude-reference", "--condition-images", "99"],
                            "subject dog has \\d+ photo\\(s\\) .*--exclude-reference leaves none"),
                           (["--scheduler", "eulr"], "unknown scheduler 'eulr'"),
                           (["--baseline", "sd14"], "unknown profile 'sd14'")):
        assert main(common + extra) == 2, extra
        assert re.search(message, capsys.readouterr().err), extra


def test_two_processes_write_the_same_scores_as_one(dreambench, metric_folders, tmp_path):
    """torchrun starts two CPU processes (gloo); they split the (subject, prompt, seed) jobs, and the main process
    writes the scores.csv of a one-process run: the same rows in the same order with the same scores."""
    clip, dino = metric_folders
    common = ["--profile", "tiny", "--subjects", str(dreambench), "--subject", "dog", "--subject", "backpack",
              "--max-prompts", "1", "--gates", "0,0.5,1", "--steps", "2", "--baseline", "tiny",
              "--baseline-scales", "0.5,1", "--clip-metric", str(clip), "--dino-metric", str(dino)]  # 4 seeds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the arithmetic of the torchrun processes (OMP_NUM_THREADS=1), so the same pixels
    try:
        assert main(common + ["--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "flexip_core.evaluate", *common, "--out", str(tmp_path / "two")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (list(csv.DictReader((tmp_path / run / "scores.csv").open())) for run in ("one", "two"))
    assert len(one) == 2 * 1 * 4 * (3 + 2)  # subjects x prompts x default seeds x (gates + scales)
    assert two == one  # every column, scores included, to the last digit
    assert all((tmp_path / "two" / r["image"]).is_file() for r in two)
    assert not list((tmp_path / "two").glob("scores.part*.csv"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["images"] == len(one)
