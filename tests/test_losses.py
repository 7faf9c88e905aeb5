"""Loss pieces against hand-derived values: dynamic weights and face-region factors (the paper's 8 / 1.6 / 0.32 and
the joint table), the box-intersection mask (with the authors' no-face slicing bug NOT repeated), gradient scaling."""

import math

import pytest
import torch

from common.losses import box_intersection_mask, dynamic_weights, flip_factor, scale_gradient

T = lambda *v: torch.tensor(v)  # noqa: E731


def test_single_attribute_weights_match_paper():
    # images: target = original; target flips; dropped target (-1); no face in the generated image
    targets = {"gender": T(1, 0, -1, -1)}
    orig = {"gender": T(1, 1, 0, 1)}
    found = T(True, True, True, False)
    w = dynamic_weights(targets, orig, found, {"gender": 0.2})
    assert w.tolist() == pytest.approx([1, 0.2, 0.2, 1])  # exp-1: no-face images weigh 1
    w_img = 8 * w
    region = 8 * w * flip_factor(targets, orig, {"gender": 0.2})
    # lambda_img,1 = 8 (consistent), lambda_img,2 = 1.6 (flipped, outside the face), lambda_img,3 = 0.32 (face pixels)
    assert w_img[:2].tolist() == pytest.approx([8, 1.6]) and region[1].item() == pytest.approx(0.32)


def test_joint_weights_table():
    """The authors' exp-3 weights (docs/method.md#dynamic-weights-and-face-region-factors):
    both keep 1; only race flips 0.6; only gender flips 0.2; both flip 0.2; no face 0.2."""
    f1 = {"gender": 0.2, "race": 0.6}
    f2 = {"gender": 0.2, "race": 0.3}
    targets = {"gender": T(1, 1, 0, 0, 1), "race": T(2, 3, 2, 3, 0)}
    orig = {"gender": T(1, 1, 1, 1, -1), "race": T(2, 2, 2, 2, -1)}
    found = T(True, True, True, True, False)
    assert dynamic_weights(targets, orig, found, f1).tolist() == pytest.approx([1, 0.6, 0.2, 0.2, 0.2])
    assert flip_factor(targets, orig, f2)[:4].tolist() == pytest.approx([1, 0.3, 0.2, 0.2])


def test_dropped_target_equals_missing_original_face():
    # the original had no face (-1) and the target was dropped (-1): "same", factor 1
    assert flip_factor({"gender": T(-1)}, {"gender": T(-1)}, {"gender": 0.2}).item() == 1


def test_box_intersection_mask_brute_force():
    h, w = 12, 10
    a = T([1, 2, 7, 9], [0, 0, 5, 5], [3, 3, 20, 20]).float()
    b = T([4, 0, 10, 6], [6, 6, 9, 9], [-1, -1, -1, -1]).float()
    valid = T(True, True, False)
    m = box_intersection_mask(a, b, valid, h, w)
    assert m.shape == (3, 1, h, w)
    for n in range(3):
        for y in range(h):
            for x in range(w):
                inside = bool(valid[n]) and all([
                    x >= max(a[n, 0], b[n, 0]), x < min(a[n, 2], b[n, 2]),
                    y >= max(a[n, 1], b[n, 1]), y < min(a[n, 3], b[n, 3])])
                assert bool(m[n, 0, y, x]) == inside
    # the authors' bug: an original box of -1s selected [y1:-1, x1:-1]; here an invalid original gives no region
    assert not m[2].any()


def test_scale_gradient():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    f = torch.rand(2, 1, 4, 4)
    y = scale_gradient(x, f)
    assert torch.equal(y, x)
    (y * 3).sum().backward()
    assert torch.allclose(x.grad, 3 * f.expand_as(x))


def test_keep_term_pulls_each_image_towards_its_original_class():
    """loss.keep on the toy world's real judges: the kept targets are the original renders' true age (the toy
    classifier reads clean renders confidently), an image the judge rejects gets none, and the term equals w_keep x the
    cross-entropy written out by hand (logsumexp - logit, on the classifier's logits of the same images) over the
    images per process. Tolerance 1e-5 relative: the same float32 logits, summed in another order."""
    import numpy as np

    from common.judges import Judges
    from common.losses import FairnessLoss, LossWeights, kept_classes
    from common.toy.judges import ToyDetector, load_classifier
    from common.toy.world import ToyWorld, to_tensor

    world, clf = ToyWorld(), load_classifier()
    det = ToyDetector(classifier=clf)
    people = world.draw(np.random.default_rng(0), [0, 1, 0, 1, 0], [0, 1, 2, 3, 0], [0, 1, 1, 0, 0], [0] * 5, [1] * 5)
    orig_imgs = to_tensor(world.render(people))
    orig_imgs[4] = 0.0  # a flat grey square: no valid face
    gen_imgs = to_tensor(world.render(people.with_attributes(age=1 - people.age)))  # every age flipped
    heads = {"gender": "gender", "age": "age"}
    judges = Judges(clf, det, heads=heads)
    orig, gen = judges.judge(orig_imgs), judges.judge(gen_imgs)
    assert orig.found.tolist() == [True] * 4 + [False] and gen.found.all()
    kept = kept_classes(orig, ["age"], threshold=0.8)
    assert kept["age"].tolist() == [0, 1, 1, 0, -1]
    assert (gen.pred["age"][:4] != kept["age"][:4]).all()  # the flipped renders read as the other age

    weights = LossWeights(w_img=0.0, w_face=0.0, factor1={"gender": 1.0}, factor2={"gender": 1.0}, face_confidence=0.9)
    none = {"gender": torch.full((5,), -1)}  # no alignment target: the keep term alone
    fn = FairnessLoss(classifier=clf, heads={"gender": "gender"}, gen=gen, orig=orig, targets=none, weights=weights,
                      keep_heads={"age": "age"}, keep_targets=kept, w_keep=2.5, denominator=5)
    x = gen_imgs.clone().requires_grad_(True)
    loss, logs = fn(x, torch.arange(5))
    with torch.no_grad():
        logits = clf(gen_imgs)["age"].double()
    ce = [float(torch.logsumexp(logits[i], 0) - logits[i, t]) for i, t in enumerate(kept["age"].tolist()) if t >= 0]
    assert logs["loss_keep_age"] == pytest.approx(sum(ce), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(2.5 * sum(ce) / 5, rel=1e-5)
    assert sum(ce) > 4 * 0.5  # the flips are confidently wrong: a term that could not be zero here
    loss.backward()  # and its gradient reaches the images whose original had a face, not the rejected one
    assert x.grad[:4].abs().sum() > 0 and x.grad[4].abs().sum() == 0

    with pytest.raises(ValueError, match="same attributes"):
        FairnessLoss(classifier=clf, heads={"gender": "gender"}, gen=gen, orig=orig, targets=none, weights=weights,
                     keep_heads={"age": "age"}, keep_targets={}, w_keep=1.0)


def test_kept_share_by_hand():
    """Among the images with a face in both (class >= 0), the share whose class is unchanged: pairs (1,1) (0,1) (1,1)
    count, (-1,0) (1,-1) (-1,-1) do not -> 2/3; no pair with faces -> nan."""
    from common.losses import kept_share

    assert kept_share(T(1, 0, 1, -1, 1, -1), T(1, 1, 1, 0, -1, -1)) == pytest.approx(2 / 3)
    assert math.isnan(kept_share(T(-1, 0), T(1, -1)))
