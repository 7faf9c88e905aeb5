"""Attribute classifiers (common/classifiers.py).

Oracles: checkpoints written in each data.zip layout from torchvision's own mobilenet_v3_large (built here, not with
our helper) whose final layer is zeroed and whose bias makes a hand-chosen class win; the class orders of
docs/method.md#classifiers; the FairFace race / age tables by hand; a confusion matrix recounted by brute force.
"""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import mobilenet_v3_large

from common import classifiers as cl


def _write_ckpt(path, num_logits, bias, seed=0):
    """torchvision mobilenet_v3_large, random weights, head Linear(1280, num_logits) with weight 0 and `bias`, saved
    as a plain state dict (the data.zip format)."""
    torch.manual_seed(seed)
    net = mobilenet_v3_large(weights=None)
    net.classifier[3] = torch.nn.Linear(1280, num_logits)
    with torch.no_grad():
        net.classifier[3].weight.zero_()
        net.classifier[3].bias.copy_(torch.tensor(bias, dtype=torch.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIR_DIFFUSION_DATA", str(tmp_path))
    return tmp_path


def _crops(n=2, size=224):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_celeba80_reads_attribute_20_as_gender(data_dir):
    bias = [0.0] * 80
    bias[0] = 50.0  # attribute 0 ("5_o_Clock_Shadow") must not leak into gender
    bias[41] = 3.0  # attribute 20 = Male, logit 1 = male
    _write_ckpt(data_dir / cl.LAYOUTS["celeba80"].default_file, 80, bias)
    clf = cl.load_classifier("celeba80")
    assert clf.attributes == {"gender": ("female", "male")} and clf.input_size == 224
    p = clf.predict(_crops())["gender"]
    assert p.shape == (2, 2) and (p.argmax(1) == 1).all()
    torch.testing.assert_close(p[0], torch.tensor([0.0, 3.0]).softmax(0))


@pytest.mark.parametrize(
    "layout, bias, expected",
    [
        ("fairface6", [2, 0, 0, 0, 0, 5], {"gender": "female", "race": "Asian"}),
        ("fairface8", [0, 3, 0, 0, 4, 0, 0, 1], {"gender": "male", "race": "Indian", "age": "old"}),
        ("eval-gender", [0, 1], {"gender": "male"}),
        ("eval-race", [0, 6, 0, 0], {"race": "Black"}),
        ("eval-age", [1, 0], {"age": "young"}),
    ],
)
def test_layout_class_orders(data_dir, layout, bias, expected):
    _write_ckpt(data_dir / cl.LAYOUTS[layout].default_file, len(bias), bias)
    clf = cl.load_classifier(layout)
    probs = clf.predict(_crops())
    assert set(probs) == set(expected)
    for attr, cls in expected.items():
        assert clf.attributes[attr][int(probs[attr][0].argmax())] == cls
    # class orders of the reference: gender (female, male); race (WMELH, Black, Indian, Asian); age (young, old)
    ref = {"gender": ("female", "male"), "race": ("WMELH", "Black", "Indian", "Asian"), "age": ("young", "old")}
    assert clf.attributes == {a: ref[a] for a in expected}


def test_eval_combines_the_three_and_loads_real_weights(data_dir):
    nets = {
        "eval-gender": _write_ckpt(data_dir / cl.LAYOUTS["eval-gender"].default_file, 2, [0, 0], seed=1),
        "eval-race": _write_ckpt(data_dir / cl.LAYOUTS["eval-race"].default_file, 4, [0, 0, 0, 0], seed=2),
        "eval-age": _write_ckpt(data_dir / cl.LAYOUTS["eval-age"].default_file, 2, [0, 0], seed=3),
    }
    for net in nets.values():  # non-trivial heads so the outputs depend on every backbone weight
        torch.nn.init.normal_(net.classifier[3].weight, std=0.5)
        net.eval()
    paths = {}
    for (layout, net), attr in zip(nets.items(), ("gender", "race", "age")):
        paths[attr] = data_dir / f"{layout}.pt"
        torch.save(net.state_dict(), paths[attr])
    clf = cl.load_classifier("eval", path=paths)
    x = _crops()
    out = clf(x)
    assert list(out) == ["gender", "race", "age"]
    for net, attr in zip(nets.values(), ("gender", "race", "age")):
        with torch.no_grad():
            torch.testing.assert_close(out[attr], net(x), atol=1e-5, rtol=1e-5)
    # a data folder in the data.zip layout works too (here: the zero-weight files written above)
    by_root = cl.load_classifier("eval", path=data_dir)(x)
    torch.testing.assert_close(by_root["race"], torch.zeros(2, 4))


def test_wrong_head_size_is_a_clear_error(data_dir, tmp_path):
    path = tmp_path / "six.pt"
    _write_ckpt(path, 6, [0] * 6)
    with pytest.raises(ValueError, match=r"shape \[6, 1280\].*'fairface8' expects \[8, 1280\]"):
        cl.load_classifier("fairface8", path=path)


def test_missing_file_and_strictness(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.zip"):
        cl.load_classifier("eval-age")
    path = tmp_path / "extra.pt"
    sd = _write_ckpt(path, 2, [0, 0]).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="strict"):
        cl.load_classifier("eval-age", path=path)
    with pytest.raises(KeyError, match="unknown classifier"):
        cl.load_classifier("nope")


def test_random_fairface8_and_resize():
    a, b = cl.load_classifier("random-fairface8"), cl.load_classifier("random-fairface8")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    small = _crops(2, 112)
    big = F.interpolate(small, size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
    for k, v in a(small).items():
        torch.testing.assert_close(v, a(big)[k])


def test_race_mapping_and_age_cutoff_tables():
    # FairFace 7 -> 4 (docs/method.md#classifiers): WMELH = White, Middle Eastern, Latino_Hispanic; Asian = East + Southeast Asian
    expected = {"White": "WMELH", "Middle Eastern": "WMELH", "Latino_Hispanic": "WMELH", "Black": "Black",
                "Indian": "Indian", "East Asian": "Asian", "Southeast Asian": "Asian"}
    assert {k: cl.RACE[v] for k, v in cl.RACE7_TO_4.items()} == expected
    old_at_50 = [cl.age_label(b) for b in cl.FAIRFACE_AGE_BINS]
    assert old_at_50 == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert [cl.age_label(b, 40) for b in cl.FAIRFACE_AGE_BINS] == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="splits a FairFace bin"):
        cl.age_label("20-29", 55)


def test_list_command(capsys):
    cl.main(["list"])
    out = capsys.readouterr().out
    for name in ("celeba80", "fairface6", "fairface8", "eval-gender", "eval-race", "eval-age", "eval"):
        assert name in out


def _image(path, color):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)


def test_train_fairface_end_to_end(tmp_path):
    """A tiny FairFace-layout folder -> 1 epoch at 32 px -> a checkpoint that load_classifier reads; the reported
    confusion matrices equal a brute-force recount of the loaded model's predictions on the validation images."""
    root = tmp_path / "fairface"
    races = ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]
    ages = ["0-2", "20-29", "50-59", "more than 70", "30-39", "60-69", "10-19"]
    rows = {"train": [], "val": []}
    for split, n in (("train", 10), ("val", 7)):
        for i in range(n):
            f = f"{split}/{i}.jpg"
            _image(root / f, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
            rows[split].append({"file": f, "age": ages[i % 7], "gender": ("Male", "Female")[i % 2],
                                "race": races[i % 7], "service_test": "True"})
    for split in rows:
        with (root / f"fairface_label_{split}.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["file", "age", "gender", "race", "service_test"])
            w.writeheader()
            w.writerows(rows[split])
    out = tmp_path / "run"
    cl.main(["train", "--dataset", "fairface", "--root", str(root), "--out", str(out), "--epochs", "1",
             "--batch-size", "4", "--image-size", "32", "--init", "random", "--workers", "0", "--device", "cpu"])
    clf = cl.load_classifier("fairface8", path=out / "fairface8.pt", input_size=32)
    from PIL import Image

    x = torch.stack([
        torch.tensor(list(Image.open(root / r["file"]).convert("RGB").getdata()), dtype=torch.float32)
        .reshape(32, 32, 3).permute(2, 0, 1) / 127.5 - 1
        for r in rows["val"]
    ])
    pred = {k: v.argmax(1).tolist() for k, v in clf(x).items()}
    true = {
        "gender": [{"Female": 0, "Male": 1}[r["gender"]] for r in rows["val"]],
        "race": [{"White": 0, "Middle Eastern": 0, "Latino_Hispanic": 0, "Black": 1, "Indian": 2, "East Asian": 3,
                  "Southeast Asian": 3}[r["race"]] for r in rows["val"]],
        "age": [int(r["age"] in ("50-59", "60-69", "more than 70")) for r in rows["val"]],
    }
    report = json.loads((out / "metrics.json").read_text())["history"][-1]["val"]
    for attr, k in (("gender", 2), ("race", 4), ("age", 2)):
        cm = [[0] * k for _ in range(k)]
        for t, p in zip(true[attr], pred[attr]):
            cm[t][p] += 1
        assert report[attr]["confusion"] == cm
        for c, name in enumerate(clf.attributes[attr]):
            n = sum(cm[c])
            acc = report[attr]["per_class_accuracy"][name]
            assert (acc is None) if n == 0 else acc == pytest.approx(cm[c][c] / n)


def test_train_celeba_end_to_end(tmp_path):
    """CelebA files (attribute list, partition list, img_align_celeba/) -> 1 epoch of the 80-logit layout."""
    root = tmp_path / "celeba"
    names = [f"Attr{k}" for k in range(40)]
    names[20] = "Male"
    lines = ["9", " ".join(names)]
    parts = []
    for i in range(9):
        f = f"{i:06d}.jpg"
        _image(root / "img_align_celeba" / f, ((i * 40) % 256, 90, (i * 70) % 256))
        vals = [("1" if (i + k) % 3 == 0 else "-1") for k in range(40)]
        lines.append(f + "  " + " ".join(vals))
        parts.append(f"{f} {0 if i < 6 else 1}")
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    out = tmp_path / "run"
    cl.main(["train", "--dataset", "celeba", "--root", str(root), "--out", str(out), "--epochs", "1",
             "--batch-size", "3", "--image-size", "32", "--init", "random", "--workers", "0", "--device", "cpu"])
    clf = cl.load_classifier("celeba80", path=out / "celeba80.pt", input_size=32)
    assert clf.attributes == {"gender": ("female", "male")}
    val = json.loads((out / "metrics.json").read_text())["history"][-1]["val"]
    assert len(val) == 40
    # images 6, 7, 8 are validation; Male (k = 20) is 1 when (i + 20) % 3 == 0 -> image 7 only
    assert [sum(row) for row in val["gender"]["confusion"]] == [2, 1]
