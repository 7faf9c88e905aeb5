"""Image / face-identity encoders and the face bank (common/features.py).

Oracles: the encoders' pipelines recomputed by hand from transformers' / facenet-pytorch's own modules and
transformers' published normalisation constants; a functional SFNet-20 written from
docs/method.md#face-identity-backbone with F.conv2d; the
flip symmetry of flip-add; brute-force nearest neighbours; the authors' pickle format written with plain pickle.
"""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from common import features as fe


def _images(n=2, size=48, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _by_hand(images, size, mean, std):
    x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return ((x + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_tiny_clip_pipeline_and_gradient():
    enc = fe.load_image_encoder("tiny-clip")
    x = _images().requires_grad_(True)
    out = enc(x)
    ref = F.normalize(enc.model(pixel_values=_by_hand(x.detach(), 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)).image_embeds, dim=-1)
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)
    assert out.shape == (2, enc.dim) and torch.allclose(out.norm(dim=1), torch.ones(2))
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert not any(p.requires_grad for p in enc.parameters())


def test_tiny_dino_uses_the_normed_cls_token():
    """torch.hub's dinov2 returns the final-LayerNorm'd CLS token: recompute it from the last hidden state."""
    enc = fe.load_image_encoder("tiny-dino")
    x = _images()
    out = enc(x)
    px = _by_hand(x, 32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    hidden = enc.model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
    ref = F.normalize(enc.model.layernorm(hidden)[:, 0], dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.shape == (2, 32)


def test_dino_position_embeddings_follow_torch_hub():
    """torch.hub dinov2 resizes its position grid with bicubic scale factor (new + 0.1) / old; tiny-dino has a 5 x 5
    grid and sees 32 px (4 x 4 patches of 8), like the real model's 37 x 37 grid at 224 px (16 x 16)."""
    emb = fe.load_image_encoder("tiny-dino").model.embeddings
    pos = emb.position_embeddings
    grid = pos[:, 1:].reshape(1, 5, 5, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(4.1 / 5, 4.1 / 5), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 16, -1)
    out = emb.interpolate_pos_encoding(torch.zeros(1, 17, 32), 32, 32)
    torch.testing.assert_close(out, torch.cat([pos[:, :1], ref], 1))
    exact = F.interpolate(grid, size=(4, 4), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 16, -1)
    assert (out[:, 1:] - exact).abs().max() > 1e-3  # differs from resizing to the exact grid (transformers' way)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_encoders(dtype):
    x = _images().requires_grad_(True)
    for name in ("tiny-clip", "tiny-dino"):
        full = fe.load_image_encoder(name)(x)
        half_enc = fe.load_image_encoder(name, dtype=dtype)
        half = half_enc(x)
        assert half.dtype == torch.float32 and next(half_enc.parameters()).dtype == dtype
        # bf16 keeps 8 mantissa bits (fp16 11): embeddings of these 2-layer nets agree to ~1e-2 in cosine
        assert (half * full).sum(1).min() > 0.98
        half.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_hub_model_missing_offline_is_one_clear_error():
    with pytest.raises(OSError, match="Could not load the CLIP vision weights 'no-such-org/no-such-model'"):
        fe.load_image_encoder("clip", path="no-such-org/no-such-model")
    with pytest.raises(KeyError, match="unknown image encoder"):
        fe.load_image_encoder("nope")


def _tiny_clip_folder(path):
    from transformers import CLIPConfig, CLIPModel

    # projection_dim repeated in each tower's config, as the hub's CLIP repositories do
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1, projection_dim=8),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=28, patch_size=14, projection_dim=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    return CLIPModel.from_pretrained(path)


def test_whole_clip_checkpoint_loads_its_vision_tower_quietly_and_strictly(tmp_path, capfd):
    """The hub's CLIP repositories hold both towers: the vision encoder takes its own weights (equal to the whole
    model's vision path), says nothing about the text tower it leaves, and refuses a folder missing its weights."""
    full = _tiny_clip_folder(tmp_path / "clip")
    capfd.readouterr()
    enc = fe.load_image_encoder("clip", path=tmp_path / "clip")
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "UNEXPECTED" not in out + err
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    feats = full.get_image_features(pixel_values=_by_hand(x, 28, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    want = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)  # transformers 5 returns an output object
    torch.testing.assert_close(enc(x), want, rtol=1e-5, atol=1e-6)
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "dino")
    with pytest.raises(ValueError, match="does not hold the CLIP vision weights that CLIPVisionModelWithProjection "
                                         r"expects: missing \['vision_model"):
        fe.load_image_encoder("clip", path=tmp_path / "dino")


@pytest.fixture(scope="module")
def facenet_random():
    return fe.load_face_encoder("facenet-random")


def test_facenet_flip_add_rule(facenet_random):
    enc = facenet_random
    a = _images(2, 112)
    out = enc(a)
    assert out.shape == (2, 512) and torch.allclose(out.norm(dim=1), torch.ones(2))
    # by hand: 160 px, (p - 127.5) / 128 for p = 127.5 (x + 1), net(x) + net(flip x), normalised
    x = F.interpolate(a, size=(160, 160), mode="bilinear", align_corners=False) * 127.5 / 128
    with torch.no_grad():
        ref = F.normalize(enc.net(x) + enc.net(x.flip(-1)), dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc(a.flip(-1)), out, atol=1e-5, rtol=1e-5)  # flip-add is mirror-invariant


def test_facenet_loads_a_weights_file_strictly(tmp_path, facenet_random):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(3)
    net = InceptionResnetV1(pretrained=None, classify=True, num_classes=7).eval()  # the released file has logits
    path = tmp_path / "vggface2.pt"
    torch.save(net.state_dict(), path)
    enc = fe.load_face_encoder("facenet", path=path)
    a = _images(1, 112)
    x = F.interpolate(a, size=(160, 160), mode="bilinear", align_corners=False) * 127.5 / 128
    net.classify = False
    with torch.no_grad():
        ref = F.normalize(net(x) + net(x.flip(-1)), dim=-1)
    torch.testing.assert_close(enc(a), ref, atol=1e-5, rtol=1e-5)


def _sfnet_by_hand(sd, x):
    """docs/method.md#face-identity-backbone, functionally: 4 stages (stride-2 conv + ReLU, then x +
    relu(conv2(relu(conv1 x)))), flatten, fc."""
    for s, k in zip(range(1, 5), (1, 2, 4, 1)):
        x = F.relu(F.conv2d(x, sd[f"layer{s}.0.conv1.weight"], sd[f"layer{s}.0.conv1.bias"], stride=2, padding=1))
        for j in range(1, k + 1):
            h = F.relu(F.conv2d(x, sd[f"layer{s}.{j}.conv1.weight"], sd[f"layer{s}.{j}.conv1.bias"], padding=1))
            x = x + F.relu(F.conv2d(h, sd[f"layer{s}.{j}.conv2.weight"], sd[f"layer{s}.{j}.conv2.bias"], padding=1))
    return F.linear(x.reshape(x.shape[0], -1), sd["fc.weight"], sd["fc.bias"])


def test_sfnet20_layout_load_and_output(tmp_path, monkeypatch):
    net = fe.SFNet20()
    sd = net.state_dict()
    # keys and shapes from docs/method.md#face-identity-backbone: 4 stride-2 convs (2 keys each), 8 residual blocks
    # (4 keys each), fc
    assert len(sd) == 4 * 2 + 8 * 4 + 2
    assert sd["layer1.0.conv1.weight"].shape == (64, 3, 3, 3) and sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["layer3.4.conv1.bias"].shape == (256,) and sd["fc.weight"].shape == (512, 512 * 7 * 7)
    monkeypatch.setenv("FAIR_DIFFUSION_DATA", str(tmp_path))
    path = tmp_path / fe.SFNET20_FILE
    path.parent.mkdir(parents=True)
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    enc = fe.load_face_encoder("sfnet20")
    a = _images(2, 112)
    out = enc(a)
    assert out.shape == (2, 512) and torch.allclose(out.norm(dim=1), torch.ones(2))
    ref = F.normalize(_sfnet_by_hand(sd, a) + _sfnet_by_hand(sd, a.flip(-1)), dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # bf16 weights (8 mantissa bits): same direction to ~1e-2
    assert (fe.load_face_encoder("sfnet20", dtype=torch.bfloat16)(a) * out).sum(1).min() > 0.98
    # grads reach the aligned face
    a.requires_grad_(True)
    enc(a)[:, 0].sum().backward()
    assert a.grad.abs().sum() > 0
    # an unprefixed file and a wrong architecture in config.yml are clear errors
    torch.save(sd, path)
    with pytest.raises(ValueError, match="prefixed 'module.'"):
        fe.load_face_encoder("sfnet20")
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    (path.parent.parent / "config.yml").write_text("model:\n  backbone:\n    net:\n      type: iresnet100\n")
    with pytest.raises(ValueError, match="iresnet100"):
        fe.load_face_encoder("sfnet20")


def test_sfnet20_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIR_DIFFUSION_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.zip"):
        fe.load_face_encoder("sfnet20")


def test_face_bank_nearest_is_brute_force(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 64, generator=g)
    bank = fe.FaceBank(feats)
    q = torch.randn(17, 64, generator=g)
    normed = [row / row.norm() for row in feats]
    best = [max(range(300), key=lambda j: float(torch.dot(qi, normed[j]))) for qi in q]
    assert bank.nearest_index(q, chunk=5).tolist() == best
    torch.testing.assert_close(bank.nearest(q), torch.stack([normed[j] for j in best]))
    # file formats: tensor .pt, {"feats"} .pt, the authors' pickled tuple (torch tensor first, other labels after)
    torch.save(feats, tmp_path / "a.pt")
    torch.save({"feats": feats, "files": ["x"] * 300}, tmp_path / "b.pt")
    with open(tmp_path / "face_feats.pkl", "wb") as fh:
        pickle.dump((feats, torch.zeros(300, dtype=torch.long), np.zeros((300, 2), np.float32)), fh)
    for name in ("a.pt", "b.pt", "face_feats.pkl"):
        torch.testing.assert_close(fe.FaceBank.load(tmp_path / name).feats, bank.feats)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch evil-was-here",))


def test_face_bank_pickle_is_read_safely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("face_feats.pkl", "wb") as fh:
        pickle.dump((torch.randn(3, 4), _Evil()), fh)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        fe.FaceBank.load("face_feats.pkl")
    assert not os.path.exists("evil-was-here")


def test_build_bank_command(tmp_path, facenet_random):
    from PIL import Image
    from skimage.data import astronaut

    from common.faces import detect

    photo = astronaut()[::2, ::2]  # 256 px: the face is ~45 px, enough for MTCNN and 4x cheaper
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.fromarray(photo).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(np.ascontiguousarray(photo[:, ::-1])).save(tmp_path / "imgs" / "sub" / "b.png")
    Image.fromarray(np.zeros((100, 80, 3), np.uint8)).save(tmp_path / "imgs" / "blank.png")
    out = tmp_path / "bank.pt"
    fe.main(["build-bank", "--images", str(tmp_path / "imgs"), "--out", str(out), "--encoder", "facenet-random",
             "--device", "cpu"])
    saved = torch.load(out, weights_only=True)
    assert saved["files"] == ["a.png", "sub/b.png"] and saved["encoder"] == "facenet-random"
    assert (tmp_path / "bank.pt.noface.txt").read_text().split() == ["blank.png"]
    x = torch.tensor(np.stack([photo, photo[:, ::-1]])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = facenet_random(detect(x).aligned)
    torch.testing.assert_close(saved["feats"], ref, atol=1e-4, rtol=1e-4)
    assert len(fe.FaceBank.load(out)) == 2
