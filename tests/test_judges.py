"""One judging path: the trainer's validation and `common.evaluate` measure through the same `Judges.measure`, and
`Judges.judge` equals the detector and classifier composed by hand."""

from pathlib import Path

import pytest
import torch

from common.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "exp-3-debias-gender-race/configs/toy.yaml"


def _as_png_levels(x: torch.Tensor) -> torch.Tensor:
    """The image as saved to PNG and read back by `common.evaluate.read_images` (8-bit levels, the same float ops)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).float() / 127.5 - 1


def test_validation_and_evaluate_give_the_same_per_prompt_bias(tmp_path, monkeypatch):
    """On the toy world (its judges read varied classes), after one training step, the trainer's validation images
    (original and finetuned, 16 per prompt) are saved as PNG and measured by `common.evaluate` with the same judges:
    every per-prompt gender and race bias of validation equals evaluate's. The sampler's images are rounded to 8-bit
    levels first, so both paths see bit-identical pixels; tolerance 1e-12 (both are ratios of the same integer counts)."""
    import common.train as T
    from common.evaluate import evaluate
    from common.plots import to_pil

    real_sample = T.sample

    def sample_png_levels(*a, **kw):
        r = real_sample(*a, **kw)
        r.images = _as_png_levels(r.images)
        return r

    monkeypatch.setattr(T, "sample", sample_png_levels)
    per = 16
    cfg = load_config(TOY, [f"paths.output_dir={tmp_path / 'run'}", "train.validate_every=0", "train.checkpoint_every=0",
                            "train.permanent_every=0", "logging.backend=none", f"train.val_images_per_prompt={per}",
                            "prompts.val_limit=3"])
    tr = T.Trainer(cfg)
    tr.step()

    def keep(tag, i, images, judgement):
        for j, img in enumerate(images):
            path = tmp_path / tag / f"prompt_{i}" / f"img_{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            to_pil(img).save(path)

    val = tr.validate(on_batch=keep)
    for tag in ("orig", "main"):
        report = evaluate(tmp_path / tag, tmp_path / f"eval_{tag}", classifier=cfg.judges.classifier,
                          detector=cfg.judges.detector, prompts=tr.val_prompts, image_encoders=(), batch_size=per,
                          device="cpu", grids=False, n_boot=0, progress=False)
        per_prompt = report["summaries"]["debiased"]["per_prompt"]
        for metric, key in (("gender_bias", "bias_gender"), ("race_bias", "bias_race")):
            got = [per_prompt[metric][i] for i in range(len(tr.val_prompts))]
            want = [val[f"val_{tag}_{key}_p{i}"] for i in range(len(tr.val_prompts))]
            assert got == pytest.approx(want, abs=1e-12), (tag, metric)


def test_judge_is_the_detector_then_the_classifier():
    """`Judges.judge` on a real photo: the boxes and crops are `common.faces.detect`'s, the probabilities the
    classifier's softmax on those crops (exact: the same calls in the same order); the second judge reads the same
    boxes cropped at its own input size."""
    from skimage.data import astronaut

    from common.classifiers import load_classifier
    from common.faces import crop_faces, detect
    from common.judges import Judges

    x = torch.from_numpy(astronaut()).permute(2, 0, 1).float()[None] / 127.5 - 1
    x = torch.cat([x, torch.full_like(x, -1.0)])  # the astronaut, and a black image without a face
    clf = load_classifier("random-fairface8")
    clf2 = load_classifier("random-fairface8", input_size=112, seed=1)
    j = Judges(clf, "mtcnn", classifier2=clf2).judge(x)
    faces = detect(x, "mtcnn", crop_size=clf.input_size)
    assert j.found.tolist() == [True, False]
    assert torch.equal(j.faces.boxes, faces.boxes)
    with torch.no_grad():
        want = clf(faces.crops)
        want2 = clf2(crop_faces(x, faces.boxes, 112))
    for a in clf.attributes:
        assert torch.equal(j.probs[a][0], want[a][0].float().softmax(-1))
        assert (j.probs[a][1] == -1).all() and j.pred[a][1] == -1
        assert j.pred[a][0] == want[a][0].argmax()
        assert torch.equal(j.probs2[a][0], want2[a][0].float().softmax(-1))
