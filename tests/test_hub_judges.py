"""Hub judges (`hf:`, `clip:`) on tiny random transformers models saved in tmp folders, against transformers' own
pipelines fed the same pixels as PIL images. No network: unknown hub ids must fail offline with one sentence.

Parity tolerance: 5e-5 on probabilities. Both sides compute in fp32 from the same uint8 pixels; the only differences
are the order of the normalisation arithmetic ((u / 255 - mean) / std here, the processor's fused (u - 255 mean) /
(255 std) there) and the uint8 -> [-1, 1] -> pixel round trip, each ~1e-7 relative, which the tiny models turn into
probability differences of at most 2e-6 here; the margin covers other BLAS builds. A wrong mean / std, label order
or group sum moves probabilities by 1e-2 or more.
"""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.classifiers import load_classifier
from common.config import ConfigError

ATOL = 5e-5
FAIRFACE_RACES = ["Black", "East Asian", "Indian", "Latino_Hispanic", "Middle Eastern", "Southeast Asian", "White"]
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]  # not CLIP's or ImageNet's: the test sees the processor's own values


def _vit(folder, labels, seed=0, image_size=224):
    """A tiny ViTForImageClassification (hidden 32, 2 layers, 7 x 7 patches) + its ViT image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=image_size, patch_size=image_size // 7, initializer_range=0.5,
                    id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(seed)
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=MEAN,
                      image_std=STD).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        "gender": _vit(root / "gender", ["Male", "Female"], seed=0),
        "race": _vit(root / "race", FAIRFACE_RACES, seed=1),
        "age": _vit(root / "age", ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69",
                                   "more than 70"], seed=2),
        "pets": _vit(root / "pets", ["cat", "dog"], seed=3),
    }


@pytest.fixture(scope="module")
def pixels():
    """Four 224 px RGB images as uint8 [4, 224, 224, 3] (smooth random fields plus noise: not constant)."""
    g = np.random.default_rng(0)
    base = g.normal(size=(4, 7, 7, 3))
    up = np.kron(base, np.ones((1, 32, 32, 1)))
    return np.clip(128 + 60 * up + 20 * g.normal(size=up.shape), 0, 255).astype(np.uint8)


def _crops(pixels) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def _pipeline_scores(task, model, images, **kw) -> list[dict[str, float]]:
    from transformers import pipeline

    pipe = pipeline(task, model=str(model), device="cpu")
    out = pipe([Image.fromarray(p) for p in images], **kw)  # top_k=20: every label (the pipeline caps it)
    return [{d["label"]: d["score"] for d in row} for row in out]


def test_hf_gender_equals_the_pipeline_in_the_projects_class_order(folders, pixels):
    judge = load_classifier(f"hf:{folders['gender']}")
    assert judge.attributes == {"gender": ("female", "male")} and judge.input_size == 224
    got = judge.predict(_crops(pixels))["gender"]
    ref = _pipeline_scores("image-classification", folders["gender"], pixels, top_k=20)
    want = torch.tensor([[r["Female"], r["Male"]] for r in ref])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (want.max(1).values - want.min(1).values).max() > 0.05  # the model is not trivially uniform


def test_hf_race_sums_fairface_seven_into_four_groups_and_age_uses_the_old_cut(folders, pixels):
    judge = load_classifier(f"hf:{folders['race']}")
    got = judge.predict(_crops(pixels))["race"]
    ref = _pipeline_scores("image-classification", folders["race"], pixels, top_k=20)
    want = torch.tensor([[r["White"] + r["Middle Eastern"] + r["Latino_Hispanic"], r["Black"], r["Indian"],
                          r["East Asian"] + r["Southeast Asian"]] for r in ref])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    age = load_classifier(f"hf:{folders['age']}").predict(_crops(pixels))["age"]
    ref = _pipeline_scores("image-classification", folders["age"], pixels, top_k=20)
    old = [sum(v for k, v in r.items() if k in ("50-59", "60-69", "more than 70")) for r in ref]  # DEFAULT_OLD_FROM 50
    torch.testing.assert_close(age[:, 1], torch.tensor(old), atol=ATOL, rtol=0)


def test_hf_models_combine_one_per_attribute_and_clash_on_a_shared_one(folders, pixels):
    judge = load_classifier(f"hf:{folders['gender']}+hf:{folders['race']}")
    assert list(judge.attributes) == ["gender", "race"]
    got = judge.predict(_crops(pixels))
    for attr in ("gender", "race"):
        alone = load_classifier(f"hf:{folders[attr]}").predict(_crops(pixels))[attr]
        torch.testing.assert_close(got[attr], alone, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=r"attribute 'gender' is given by both hf:.*gender and hf:.*pets"):
        load_classifier(f"hf:{folders['gender']}+hf:{folders['pets']}",
                        label_map={"cat": "gender:female", "dog": "gender:male"})


def test_clip_equals_the_zero_shot_pipeline_with_the_same_prompts(tmp_path, pixels):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from common.models import CLIP_TOKENS, clip_tokenizer

    cfg = CLIPConfig(
        text_config=dict(**CLIP_TOKENS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=proc, tokenizer=clip_tokenizer()).save_pretrained(tmp_path / "clip")

    prompts = ["a portrait of a woman", "a close-up photograph of a man"]  # different token lengths: padding matters
    judge = load_classifier(f"clip:{tmp_path / 'clip'}", clip_prompts={"gender": prompts})
    assert judge.attributes == {"gender": ("female", "male")}
    got = judge.predict(_crops(pixels))["gender"]
    ref = _pipeline_scores("zero-shot-image-classification", tmp_path / "clip", pixels, candidate_labels=prompts,
                           hypothesis_template="{}")
    want = torch.tensor([[r[p] for p in prompts] for r in ref])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (want[:, 0] - want[:, 1]).abs().max() > 0.01
    # without prompts: the three default attributes; a CLIP folder named as hf: says to use clip:
    assert list(load_classifier(f"clip:{tmp_path / 'clip'}").attributes) == ["gender", "race", "age"]
    with pytest.raises(ConfigError, match="not an image classifier.*write clip:"):
        load_classifier(f"hf:{tmp_path / 'clip'}")


def test_label_map_maps_unknown_labels_and_their_absence_is_one_sentence(folders, pixels):
    name = f"hf:{folders['pets']}"
    with pytest.raises(ConfigError) as e:
        load_classifier(name)
    msg = str(e.value)
    assert "'cat', 'dog'" in msg and "judges.label_map" in msg and "--label-map" in msg and "\n" not in msg
    judge = load_classifier(name, label_map={"Cat": "gender:male", "DOG": "gender:female"})  # case ignored
    ref = _pipeline_scores("image-classification", folders["pets"], pixels[:2], top_k=20)
    want = torch.tensor([[r["dog"], r["cat"]] for r in ref])
    torch.testing.assert_close(judge.predict(_crops(pixels[:2]))["gender"], want, atol=ATOL, rtol=0)
    with pytest.raises(ConfigError, match=r"label map entries \['horse'\] name no label"):
        load_classifier(name, label_map={"cat": "gender:male", "dog": "gender:female", "horse": "gender:male"})
    with pytest.raises(ConfigError, match="label_map applies to hf: / clip: classifiers, not to 'eval'"):
        load_classifier("eval", label_map={"cat": "gender:male"})
    from common.config import JudgesConfig

    with pytest.raises(ValueError, match=r"label_map.cat = 'gender:cat'.*'attribute:class'"):
        JudgesConfig(label_map={"cat": "gender:cat"})
    with pytest.raises(ValueError, match=r"clip_prompts.race.*4 non-empty prompts"):
        JudgesConfig(clip_prompts={"race": ["a", "b"]})


def test_missing_folder_non_classifier_and_offline_hub_id_each_give_one_sentence(tmp_path):
    from transformers import BertConfig, BertModel

    with pytest.raises(FileNotFoundError, match="folder .*nope not found"):
        load_classifier(f"hf:{tmp_path / 'nope'}")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"holds a 'bert' model \(BertModel\), not an image classifier"):
        load_classifier(f"hf:{tmp_path / 'bert'}")
    with pytest.raises(OSError, match="no folder .* and the model config of the hub id could not be loaded") as e:
        load_classifier("hf:no-such-owner/no-such-model")  # HF_HUB_OFFLINE=1 (conftest)
    assert "\n" not in str(e.value)


def test_gradient_reaches_the_crops_through_hf(folders, pixels):
    judge = load_classifier(f"hf:{folders['race']}", dtype=torch.float64)  # fp64: a precise finite difference
    x = _crops(pixels[:2])[:, :, ::2, ::2].double()  # 112 px: the judge resizes to 224 (antialiased bilinear)
    x.requires_grad_(True)
    f = lambda z: judge(z)["race"].log_softmax(-1)[:, 1].sum()  # noqa: E731
    f(x).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # oracle: central finite difference along a random direction (the fp32 logits limit it to ~1e-5 relative)
    d = torch.randn_like(x)
    with torch.no_grad():
        fd = (f(x + 1e-4 * d) - f(x - 1e-4 * d)) / 2e-4
    assert float((x.grad * d).sum()) == pytest.approx(float(fd), rel=1e-3)


def test_evaluate_cli_runs_an_hf_judge_with_a_label_map(folders, pixels, tmp_path, capsys):
    from common import evaluate as E
    from common.runtime import cli

    images = tmp_path / "images"
    for j, p in enumerate(pixels):
        (images / f"prompt_{j // 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(p).save(images / f"prompt_{j // 2}" / f"img_{j % 2}.png")
    (images / "manifest.json").write_text(json.dumps({"prompts": ["a person", "another person"]}))
    (tmp_path / "map.yaml").write_text("cat: gender:male\ndog: gender:female\n")
    argv = ["--images", str(images), "--out", str(tmp_path / "eval"), "--classifiers", f"hf:{folders['pets']}",
            "--label-map", str(tmp_path / "map.yaml"), "--detector", "whole-image", "--no-grids", "--n-boot", "20"]
    if not torch.cuda.is_available():  # a hub judge is a real judge: the CPU needs --cpu
        with pytest.raises(SystemExit) as e:
            cli(E.main, argv)
        assert e.value.code == 2 and "--cpu" in capsys.readouterr().err
    E.main([*argv, "--cpu"])
    with (tmp_path / "eval" / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    got = torch.tensor([[float(r["gender_p_female"]), float(r["gender_p_male"])] for r in rows])
    ref = _pipeline_scores("image-classification", folders["pets"], pixels, top_k=20)  # files in prompt/index order
    want = torch.tensor([[r["dog"], r["cat"]] for r in ref])
    torch.testing.assert_close(got, want, atol=ATOL + 1e-6, rtol=0)  # results.csv rounds to 6 decimals
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["settings"]["classifier"] == f"hf:{folders['pets']}" and "gender_bias" in summary["summaries"][
        "debiased"]["mean"]


def test_hub_options_go_to_the_hub_judges_only():
    from common.judges import judge_kwargs
    from common.runtime import UsageError

    lm = {"cat": "gender:male"}
    assert judge_kwargs("hf:a", None, {"label_map": lm, "input_size": 112}) == ({"label_map": lm, "input_size": 112}, {})
    assert judge_kwargs("eval", "hf:b", {"label_map": lm, "input_size": 112}) == ({"input_size": 112}, {"label_map": lm})
    assert judge_kwargs("hf:a", "clip:b", {"label_map": lm}) == ({"label_map": lm}, {"label_map": lm})
    assert judge_kwargs("eval", None, {"label_map": {}, "clip_prompts": {}}) == ({}, {})  # empty: nothing to route
    with pytest.raises(UsageError, match="label_map apply to hf: / clip: judges, not to 'eval'"):
        judge_kwargs("eval", None, {"label_map": lm})
    with pytest.raises(UsageError, match="neither 'eval' nor 'toy' is one"):
        judge_kwargs("eval", "toy", {"label_map": lm})


def test_trainer_reads_the_configs_label_map_for_an_hf_judge(folders, tmp_path, repo_root):
    """judges.label_map reaches the training judge: a cat/dog model read as gender trains a step (and without the map
    the same config stops with the unmappable-labels sentence)."""
    from train_helpers import tiny_overrides

    from common.config import load_config
    from common.train import Trainer

    cfg_file = repo_root / "exp-1-debias-gender" / "configs" / "debias-text-encoder.yaml"
    over = tiny_overrides(tmp_path / "run", f"judges.classifier=hf:{folders['pets']}", "judges.face_bank=null",
                          "train.max_steps=1", "loss.confidence_threshold=0.0")
    with pytest.raises(ConfigError, match="label"):
        Trainer(load_config(cfg_file, over))
    tr = Trainer(load_config(cfg_file, [*over, "judges.label_map={cat: 'gender:male', dog: 'gender:female'}"]))
    assert tr.judges.classifier.attributes == {"gender": ("female", "male")}
    logs = tr.step()
    assert logs["skipped"] == 0.0 and logs["targets_gender"] > 0 and np.isfinite(logs["loss"])


def test_experiment_script_passes_the_configs_label_map_to_evaluate(folders, tmp_path, repo_root):
    """evaluate.sh hands its config to common.evaluate (--judges-config): judges.label_map reaches an hf: judge."""
    import os
    import shutil
    import subprocess

    from common.toy.world import ToyWorld

    exp, out = tmp_path / "exp", tmp_path / "run"
    (exp / "configs").mkdir(parents=True)
    (exp / "configs" / "toy.yaml").write_text(
        f"extends: [{repo_root / 'exp-1-debias-gender' / 'configs' / 'toy.yaml'}]\n"
        f"judges: {{eval_classifier: 'hf:{folders['pets']}', label_map: {{cat: 'gender:male', dog: 'gender:female'}}}}\n"
        f"paths: {{output_dir: {out}}}\n")
    world, rng = ToyWorld(), np.random.default_rng(0)
    for label in ("debiased", "original"):
        (out / "images" / label / "prompt_0").mkdir(parents=True)
        for j, im in enumerate(world.render(world.sample_balanced(rng, 4))):
            Image.fromarray(im).save(out / "images" / label / "prompt_0" / f"img_{j}.png")
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    r = subprocess.run(["bash", str(repo_root / "scripts" / "experiment.sh"), "evaluate", str(exp), "toy", "--cpu",
                        "--n-boot", "0", "--no-grids"], env=env, capture_output=True, text=True, cwd=repo_root)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "eval" / "summary.json").read_text())
    assert report["settings"]["classifier"] == f"hf:{folders['pets']}"
    assert [a["name"] for a in report["attributes"]] == ["gender"]
    shutil.rmtree(out / "eval")
