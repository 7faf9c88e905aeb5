"""Foundation: tiny components generate through diffusers' own pipeline; the offline tokenizer equals open_clip's;
the scheduler reproduces the authors' timesteps."""

import open_clip
import pytest
import torch

from common.models import clip_tokenizer, diffusers_pipeline, load_components, make_scheduler

SAMPLES = ["a photo of a cat", "A photo of the face of a gas compressor and gas pumping station operator, a person",
           "Hello, World! électronique 123 don't", "portrait of a flamenco dancer"]


def test_tokenizer_matches_open_clip():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.pad_token_id == 49407
    for s in SAMPLES:
        ours = tok(s).input_ids
        ref = open_clip.tokenize([s])[0]
        assert ours == ref[: len(ours)].tolist(), s
        assert ref[len(ours):].eq(0).all()


def test_tiny_components_generate_through_diffusers(tiny):
    pipe = diffusers_pipeline(tiny)
    g = torch.Generator().manual_seed(3)
    a = pipe("a photo of a cat", num_inference_steps=4, output_type="pt", generator=g).images
    b = pipe("a photo of a cat", num_inference_steps=4, output_type="pt",
             generator=torch.Generator().manual_seed(3)).images
    assert a.shape == (1, 3, 64, 64) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not any(p.requires_grad for p in tiny.unet.parameters())


@pytest.mark.parametrize(
    "steps,head,tail",
    [(19, [999, 946, 894, 841], [158, 105, 53]), (23, [999, 956, 912, 869], [130, 87, 43]),
     (25, [999, 959, 919, 879], [120, 80, 40]), (30, [999, 966, 932, 899], [100, 67, 33])],
)
def test_scheduler_timesteps_match_reference(steps, head, tail):
    """docs/method.md#reference-numbers: diffusers 0.19.3 linspace timesteps."""
    s = make_scheduler()
    s.set_timesteps(steps)
    t = s.timesteps.tolist()
    assert len(t) == steps and t[:4] == head and t[-3:] == tail


def test_scheduler_final_step_goes_to_sigma_min():
    """0.19.3 ended at the sigma of t = 0 (not 0) and used a 2nd-order final step for >= 15 steps."""
    s = make_scheduler()
    s.set_timesteps(19)
    alpha0 = s.alphas_cumprod[0]
    assert s.sigmas[-1].item() == pytest.approx(((1 - alpha0) / alpha0).sqrt().item(), rel=1e-5)


def test_load_components_offline_error(tmp_path):
    with pytest.raises(OSError, match="huggingface-cli download"):
        load_components("nonexistent-user/nonexistent-model")
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="missing sub-folder"):
        load_components(str(tmp_path))
