"""Train the toy world's models on CPU and write `data/toy/`: `python -m common.toy build [--seed 0] [--out DIR]`.

Stages (each seeded from the build seed; same seed, same machine and thread count -> same weights):
1. VAE (diffusers AutoencoderKL, factor 4: 32x32 images -> [4, 8, 8] latents), L1 + small KL, on attribute-balanced
   renders; `scaling_factor` = 1 / std of the training latents.
2. Attribute classifier with a validity head, on renders, their VAE reconstructions (mildly varied and lightly
   adversarially perturbed: valid) and degraded copies (invalid; attribute labels kept at low weight so artifacts
   do not move the reading).
3. Image-feature encoder, contrastive: same scene with other protected attributes, the person moved by up to
   `encoder_move` pixels = positive; other people (same occupation included) and damaged copies = negatives.
4. Text encoder (CLIPTextModel, 64-d, 2 layers, the real CLIP tokenizer) + U-Net, jointly, epsilon prediction with
   the SD noise schedule, min-SNR weighting, 10% caption dropout; captions encoded by `common.sampling.encode_prompts`
   (the code that conditions at sampling time).
5. Evaluation: classifier accuracy on fresh renders and reconstructions, encoder similarities, and the base model's
   bias per split (16 images per occupation, 15 DPM-Solver++ steps, guidance 7.5) -> manifest.json.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.config import ConfigError
from common.models import CLIP_TOKENS, TINY_UNET
from common.toy.degrade import KINDS, degrade, mild, random_degrade
from common.toy.nets import VALID_LOGIT, ToyClassifier, ToyImageEncoder
from common.toy.world import ATTRIBUTES, WORLD_VERSION, People, ToyWorld, to_tensor

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "data" / "toy"
FILES = {
    "vae": "vae.safetensors",
    "text_encoder": "text_encoder.safetensors",
    "unet": "unet.safetensors",
    "classifier": "classifier.safetensors",
    "image_encoder": "image_encoder.safetensors",
}

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=1.0,
)
TEXT_CONFIG = dict(**CLIP_TOKENS, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   projection_dim=64)
UNET_CONFIG = dict(**TINY_UNET, sample_size=8, cross_attention_dim=64)


@dataclass
class BuildConfig:
    """Sizes and schedules of every stage (defaults: ~12-15 minutes on 2 CPU cores)."""

    seed: int = 0
    threads: int = 2
    vae_images: int = 16000
    vae_steps: int = 2400
    vae_batch: int = 16
    vae_lr: float = 3e-3
    kl_weight: float = 1e-6
    judge_images: int = 12000
    classifier_steps: int = 400
    classifier_batch: int = 128
    encoder_images: int = 6000
    encoder_steps: int = 300
    encoder_batch: int = 96
    encoder_move: float = 1.0
    """positives of the image encoder are also moved by up to this many pixels in x and y (uniform): CLIP and DINO
    features, which it stands in for, barely change when a picture is shifted by 3% of its width (their training
    crops the picture at random); without it a 1 px move (3% here) read as 0.74 cosine"""
    diffusion_images: int = 40000
    diffusion_steps: int = 1500
    diffusion_batch: int = 128
    diffusion_lr: float = 1e-3
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.995
    eval_images: int = 16
    eval_steps: int = 15
    eval_guidance: float = 7.5
    eval_train_occupations: int = 32
    eval_heldout_occupations: int = 32
    eval_judge_images: int = 2000

    @classmethod
    def quick(cls, seed: int = 0) -> BuildConfig:
        """A seconds-long build for smoke tests (models untrained: numbers meaningless)."""
        return cls(seed=seed, vae_images=64, vae_steps=2, vae_batch=8, judge_images=64, classifier_steps=2,
                   classifier_batch=16, encoder_images=64, encoder_steps=2, encoder_batch=8, diffusion_images=64,
                   diffusion_steps=2, diffusion_batch=8, eval_images=2, eval_steps=2, eval_train_occupations=2,
                   eval_heldout_occupations=2, eval_judge_images=16)


def _rng(cfg: BuildConfig, stage: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, stage])


def _gen(cfg: BuildConfig, stage: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1000 + stage)


def _lr_lambda(total: int, warmup: int, decay: bool = True):
    """Linear warm-up, then cosine decay to 0 (`decay`) or constant."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not decay:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def _optim(params, lr: float, total: int, warmup: int, decay: bool = True):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, min(warmup, total // 5)), decay))


def _fit(opt, sched, steps: int, desc: str, step, clip: list | None = None, after=None) -> dict[str, float]:
    """`steps` times: `step() -> (loss, shown)`, an optimizer step on the loss (gradients clipped to norm 1 over the
    tensors `clip` when given), a schedule step and `after()` (an EMA update); `shown` (name -> scalar tensor) goes to
    the progress bar. Returns the last step's `shown` as floats."""
    shown: dict[str, torch.Tensor] = {}
    bar = tqdm(range(steps), desc=desc, leave=False)
    for _ in bar:
        loss, shown = step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        opt.step()
        sched.step()
        if after is not None:
            after()
        bar.set_postfix({k: f"{float(v):.4f}" for k, v in shown.items()})
    return {k: float(v) for k, v in shown.items()}


@torch.no_grad()
def _chunks(fn, x: torch.Tensor, size: int = 512) -> torch.Tensor:
    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: VAE
# ----------------------------------------------------------------------------------------------------------------


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def train_vae(world: ToyWorld, cfg: BuildConfig) -> tuple[torch.nn.Module, dict]:
    """AutoencoderKL on attribute-balanced renders of the training occupations (L1 + kl_weight * KL, random flips)."""
    t0 = time.time()
    x = to_tensor(world.render(world.sample_balanced(_rng(cfg, 1), cfg.vae_images, world.train_pairs)))
    torch.manual_seed(cfg.seed * 1000 + 1)
    vae = make_vae().train()
    g = _gen(cfg, 1)
    opt, sched = _optim(vae.parameters(), cfg.vae_lr, cfg.vae_steps, 50)

    def step():
        xb = x[torch.randint(0, len(x), (cfg.vae_batch,), generator=g)]
        flip = torch.rand(len(xb), generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        l1 = (rec - xb).abs().mean()
        return l1 + cfg.kl_weight * post.kl().mean(), {"l1": l1.detach()}

    last = _fit(opt, sched, cfg.vae_steps, "toy 1/4 VAE", step, clip=list(vae.parameters()))
    vae.eval().requires_grad_(False)
    return vae, {"vae_seconds": time.time() - t0, "vae_final_l1": last["l1"]}


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """VAE round trip [N, 3, 32, 32] -> [N, 3, 32, 32] in [-1, 1] (posterior sample when `g` is given, else mean)."""
    def one(xb):
        post = vae.encode(xb).latent_dist
        return vae.decode(post.sample(generator=g) if g is not None else post.mode()).sample.clamp(-1, 1)

    return _chunks(one, x)


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: attribute classifier with validity head
# ----------------------------------------------------------------------------------------------------------------


def _labels(people) -> dict[str, torch.Tensor]:
    return {a: torch.from_numpy(np.asarray(getattr(people, a))).long() for a in ATTRIBUTES}


def train_classifier(world: ToyWorld, vae, cfg: BuildConfig) -> tuple[ToyClassifier, dict]:
    """Train the toy classifier: attributes on valid images (renders and reconstructions with mild variation and a
    small adversarial perturbation) and, at weight 0.3, on degraded copies; validity = valid vs degraded."""
    t0 = time.time()
    people = world.sample_balanced(_rng(cfg, 2), cfg.judge_images)
    real = to_tensor(world.render(people))
    g = _gen(cfg, 2)
    rec = reconstruct(vae, real, g)
    y = _labels(people)
    torch.manual_seed(cfg.seed * 1000 + 2)
    clf = ToyClassifier().train()
    net = clf.nets[0]
    opt, sched = _optim(net.parameters(), 3e-3, cfg.classifier_steps, 50)
    slices = {"gender": slice(0, 2), "race": slice(2, 6), "age": slice(6, 8)}

    def attr_loss(out, idx, weight):
        return sum(F.cross_entropy(out[:, s], y[a][idx], reduction="none") for a, s in slices.items()) * weight

    b = cfg.classifier_batch

    def step():
        idx = torch.randint(0, len(real), (b,), generator=g)
        use_rec = (torch.rand(b, generator=g) < 0.5)[:, None, None, None]
        xb = torch.where(use_rec, rec[idx], real[idx])
        flip = (torch.rand(b, generator=g) < 0.5)[:, None, None, None]
        xb = mild(torch.where(flip, xb.flip(-1), xb), g)
        # light adversarial training (FGSM, eps up to 0.06): gradients of a robust classifier point at what a
        # person would change (hair, skin), which is what the finetuning follows through the generator
        xa = xb[: b // 2].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(attr_loss(net(xa), idx[: b // 2], 1.0).sum(), xa)
        eps = torch.rand(b // 2, 1, 1, 1, generator=g) * 0.06
        xb = torch.cat([(xa + eps * grad.sign()).clamp(-1, 1).detach(), xb[b // 2 :]])
        didx = torch.randint(0, len(real), (b // 2,), generator=g)
        src = torch.where((torch.rand(b // 2, generator=g) < 0.5)[:, None, None, None], rec[didx], real[didx])
        xd = random_degrade(src, g)
        out = net(torch.cat([xb, xd]))
        la = torch.cat([attr_loss(out[:b], idx, 1.0), attr_loss(out[b:], didx, 0.3)]).mean()
        valid = torch.cat([torch.ones(b), torch.zeros(b // 2)])
        lv = F.binary_cross_entropy_with_logits(out[:, VALID_LOGIT], valid)
        return la + lv, {"attr": la.detach(), "valid": lv.detach()}

    _fit(opt, sched, cfg.classifier_steps, "toy 2/4 classifier", step)
    clf.eval().requires_grad_(False)
    return clf, {"classifier_seconds": time.time() - t0}


@torch.no_grad()
def evaluate_classifier(world: ToyWorld, vae, clf: ToyClassifier, cfg: BuildConfig) -> dict:
    """Accuracy per attribute on fresh renders and on their reconstructions; validity on both and rejection rate of
    each degradation kind (fresh seed stream, never used in training)."""
    n = cfg.eval_judge_images
    people = world.sample_balanced(_rng(cfg, 90), n)
    real = to_tensor(world.render(people))
    rec = reconstruct(vae, real, _gen(cfg, 90))
    y = _labels(people)
    out = {}
    for name, x in (("real", real), ("recon", rec)):
        logits = {a: torch.cat([clf(x[i : i + 1024])[a] for i in range(0, n, 1024)]) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            out[f"accuracy_{a}_{name}"] = float((logits[a].argmax(-1) == y[a]).float().mean())
        out[f"valid_rate_{name}"] = float((_chunks(clf.validity, x) >= 0.5).float().mean())
    g = _gen(cfg, 91)
    for k, kind in enumerate(KINDS):
        xd = degrade(real[:500], torch.full((len(real[:500]),), k), g)
        out[f"rejected_{kind}"] = float((clf.validity(xd) < 0.5).float().mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: image-feature encoder
# ----------------------------------------------------------------------------------------------------------------


def _scene_pairs(world: ToyWorld, rng: np.random.Generator, n: int, move: float = 0.0):
    """n scenes in sibling pairs (2k, 2k+1 share the occupation, not the person), each rendered twice: as drawn and
    with every protected attribute redrawn and the person (face, hair, body) moved by uniform(-move, move) pixels in
    x and y (the positive). Returns (anchor, positive) uint8 [n, 32, 32, 3]."""
    people, other = _scene_people(world, rng, n, move)
    return world.render(people), world.render(other)


def _scene_people(world: ToyWorld, rng: np.random.Generator, n: int, move: float = 0.0) -> tuple[People, People]:
    """The people of `_scene_pairs`: (anchors, positives)."""
    people = world.sample_balanced(rng, n)
    people.field[1::2] = people.field[0::2]
    people.role[1::2] = people.role[0::2]
    other = people.with_attributes(rng.integers(0, 2, n), rng.integers(0, 4, n), rng.integers(0, 2, n))
    if move > 0:
        dx, dy = (rng.uniform(-move, move, n).astype(np.float32) for _ in range(2))
        other = replace(other, cx=other.cx + dx, cy=other.cy + dy)
    return people, other


def train_encoder(world: ToyWorld, vae, cfg: BuildConfig, tau: float = 0.1) -> tuple[ToyImageEncoder, dict]:
    """InfoNCE over [positives; degraded anchors]: the positive of anchor i is the same scene with redrawn protected
    attributes and the person moved by up to `cfg.encoder_move` pixels (render or reconstruction); every other person
    in the batch (the sibling with the same occupation included) and every degraded anchor (its own included) is a
    negative. Plus 1 - cos(anchor, positive)."""
    t0 = time.time()
    rng = _rng(cfg, 3)
    n = cfg.encoder_images // 2 * 2
    a_img, p_img = (to_tensor(v) for v in _scene_pairs(world, rng, n, cfg.encoder_move))
    g = _gen(cfg, 3)
    a_rec, p_rec = reconstruct(vae, a_img, g), reconstruct(vae, p_img, g)
    torch.manual_seed(cfg.seed * 1000 + 3)
    enc = ToyImageEncoder().train()
    opt, sched = _optim(enc.parameters(), 2e-3, cfg.encoder_steps, 50)
    b = cfg.encoder_batch // 2 * 2

    def pick(real, rec, idx):
        r = (torch.rand(len(idx), generator=g) < 0.5)[:, None, None, None]
        return mild(torch.where(r, rec[idx], real[idx]), g)

    def step():
        pairs = torch.randint(0, n // 2, (b // 2,), generator=g)
        idx = torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()
        flip = (torch.rand(b, generator=g) < 0.5)[:, None, None, None]
        xa = pick(a_img, a_rec, idx)
        xp = pick(p_img, p_rec, idx)
        xa, xp = torch.where(flip, xa.flip(-1), xa), torch.where(flip, xp.flip(-1), xp)
        xd = random_degrade(xa, g)
        fa, fp, fd = enc(torch.cat([xa, xp, xd])).split(b)
        logits = fa @ torch.cat([fp, fd]).T / tau
        target = torch.arange(b)
        align = (1 - (fa * fp).sum(-1)).mean()
        loss = F.cross_entropy(logits, target) + F.cross_entropy(fp @ fa.T / tau, target) + align
        return loss, {"loss": loss.detach(), "pos": 1 - align.detach()}

    _fit(opt, sched, cfg.encoder_steps, "toy 3/4 image encoder", step)
    enc.eval().requires_grad_(False)
    return enc, {"encoder_seconds": time.time() - t0}


@torch.no_grad()
def evaluate_encoder(world: ToyWorld, vae, enc: ToyImageEncoder, cfg: BuildConfig) -> dict:
    """Mean cosine similarity of the encoder for: the same scene with other protected attributes, the same person
    moved by 0.5 and 1 pixel (random direction), a reconstruction, each degradation kind, another person of the same
    occupation, and a random other image (fresh seed stream)."""
    n = cfg.eval_judge_images // 2 * 2
    a, p = (to_tensor(v) for v in _scene_pairs(world, _rng(cfg, 92), n))
    g = _gen(cfg, 92)
    fa = enc(a)
    cos = lambda x: float((fa * enc(x)).sum(-1).mean())  # noqa: E731
    out = {
        "cos_attributes_changed": cos(p),
        "cos_reconstruction": cos(reconstruct(vae, a)),
        "cos_same_occupation_other_person": float((fa[0::2] * fa[1::2]).sum(-1).mean()),
        "cos_random_other": float((fa * fa.roll(7, 0)).sum(-1).mean()),
    }
    people = world.sample_balanced(_rng(cfg, 93), n)
    angle = _rng(cfg, 94).uniform(0, 2 * np.pi, n).astype(np.float32)
    f0 = enc(to_tensor(world.render(people)))
    for d, name in ((0.5, "cos_moved_half_px"), (1.0, "cos_moved_1px")):
        moved = replace(people, cx=people.cx + d * np.cos(angle), cy=people.cy + d * np.sin(angle))
        out[name] = float((f0 * enc(to_tensor(world.render(moved)))).sum(-1).mean())
    for k, kind in enumerate(KINDS):
        out[f"cos_{kind}"] = cos(degrade(a, torch.full((n,), k), g))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Stage 4: text encoder + U-Net
# ----------------------------------------------------------------------------------------------------------------


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N, 4, 8, 8] of images [N, 3, 32, 32] (unscaled)."""
    means, stds = [], []
    for i in range(0, len(x), 512):
        post = vae.encode(x[i : i + 512]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_diffusion(world: ToyWorld, vae, cfg: BuildConfig):
    """Jointly train CLIPTextModel + UNet2DConditionModel on (biased) renders of the training occupations.

    Returns (Components with the trained parts, stats). Epsilon prediction, SD schedule (`DDPMScheduler.add_noise`
    with `common.models.SD_SCHEDULE` betas), min-SNR-gamma loss weights, caption dropout to "" (encoded padded and
    masked, as the negative prompt is at sampling time); the shipped weights are the EMA (`common.adapters.EMA`).
    """
    from diffusers import DDPMScheduler

    from common.adapters import EMA
    from common.models import SD_SCHEDULE, Components, clip_tokenizer, make_scheduler
    from common.sampling import encode_prompts

    t0 = time.time()
    rng = _rng(cfg, 4)
    people = world.sample_people(rng, cfg.diffusion_images, world.train_pairs)
    x = to_tensor(world.render(people))
    mean, std = encode_latents(vae, x)
    g = _gen(cfg, 4)
    scale = 1.0 / float((mean + std * torch.randn(mean.shape, generator=g)).std())
    vae.register_to_config(scaling_factor=scale)
    data_stats = {"latent_scaling_factor": scale, "diffusion_data_seconds": time.time() - t0}

    torch.manual_seed(cfg.seed * 1000 + 4)
    te, unet = make_text_encoder().train(), make_unet().train()
    comps = Components(clip_tokenizer(), te, unet, vae, make_scheduler(), name="toy")
    noise_sched = DDPMScheduler(**SD_SCHEDULE)
    abar = noise_sched.alphas_cumprod
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
    named = {f"text_encoder.{k}": p for k, p in te.named_parameters()}
    named.update({f"unet.{k}": p for k, p in unet.named_parameters()})
    params = list(named.values())
    ema = EMA(named, cfg.ema_decay) if cfg.ema_decay > 0 else None
    # constant learning rate + EMA: annealing the rate to 0 gave sharper models whose guided (7.5) samples drifted
    # off the latent manifold (latent std 1.2 -> 2, blotchy colours); the EMA of a constant-rate run did not
    opt, sched = _optim(params, cfg.diffusion_lr, cfg.diffusion_steps, 60, decay=False)
    b = cfg.diffusion_batch
    order = torch.randperm(len(x), generator=g)
    pos = 0
    t1 = time.time()

    def step():
        nonlocal order, pos
        if pos + b > len(order):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos : pos + b]
        pos += b
        caps = world.captions(rng, people.take(idx.numpy()))
        drop = rng.random(b) < cfg.caption_dropout
        caps = ["" if d else c for c, d in zip(caps, drop)]
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=g)
        zt = noise_sched.add_noise(z, noise, t)
        hidden = encode_prompts(comps, caps).cond
        pred = unet(zt, t, encoder_hidden_states=hidden).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(weight[t]).mean()
        return loss, {"loss": loss.detach()}

    last = _fit(opt, sched, cfg.diffusion_steps, "toy 4/4 text encoder + U-Net", step, clip=params,
                after=ema.step if ema is not None else None)
    if ema is not None:  # ship the averaged weights
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(ema.shadow[k])
    te.eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
    data_stats.update(diffusion_seconds=time.time() - t1, diffusion_final_loss=last["loss"])
    return comps, data_stats


# ----------------------------------------------------------------------------------------------------------------
# Stage 5: base-model bias
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def measure_bias(world: ToyWorld, comps, clf: ToyClassifier, occupations: list[str], images: int, steps: int,
                 guidance: float) -> dict:
    """Generate `images` per occupation (noise from `common.generate.noise_for`), classify the valid ones and return
    mean gender / race / age bias, the valid rate and per-occupation figures."""
    from common.generate import noise_for
    from common.metrics import bias, predictions
    from common.sampling import sample

    per = {}
    for occ in tqdm(occupations, desc="base-model bias", leave=False):
        prompt = world.prompt(occ)
        noise = noise_for(prompt, range(images), comps.latent_shape())
        imgs = sample(comps, [prompt] * images, noise, steps, guidance=guidance).images
        valid = clf.validity(imgs) >= 0.5
        probs = clf.predict(imgs)
        row = {"valid_rate": float(valid.float().mean())}
        for a, classes in ATTRIBUTES.items():
            pred = predictions(probs[a], valid)
            row[f"{a}_bias"] = bias(pred, len(classes))
        per[occ] = row
    mean = {k: float(np.nanmean([r[k] for r in per.values()])) for k in next(iter(per.values()))}
    return {"mean": mean, "per_occupation": per}


def data_bias(world: ToyWorld, occupations: list[str]) -> dict:
    """The designed (data) bias of the occupations, from the world's distributions (pairwise mean gaps)."""
    out = {}
    for a in ATTRIBUTES:
        vals = []
        for occ in occupations:
            p = world.distributions(*world.parse(occ))[a]
            vals.append(float(np.mean([abs(p[i] - p[j]) for i in range(len(p)) for j in range(i + 1, len(p))])))
        out[f"{a}_bias"] = float(np.mean(vals))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------


def _save(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(path))


REUSABLE_SETTINGS = ("seed", "vae_images", "vae_steps", "vae_batch", "vae_lr", "kl_weight", "judge_images",
                     "classifier_steps", "classifier_batch", "encoder_images", "encoder_steps", "encoder_batch",
                     "encoder_move")
"""the settings the VAE, classifier and image-encoder stages depend on (captions and diffusion settings do not)"""


def build(out: str | Path = DEFAULT_OUT, cfg: BuildConfig | None = None, reuse: str | Path | None = None) -> dict:
    """Run every stage and write the weights (fp16 safetensors) and manifest.json to `out`; returns the manifest.
    Uses `cfg.threads` torch threads and restores the caller's thread count afterwards.

    `reuse`: a previous build's folder whose VAE, classifier and image encoder are taken instead of retrained (only
    the text encoder + U-Net are trained; for changes to captions or diffusion settings). Its world version and every
    setting in `REUSABLE_SETTINGS` must equal this build's; the manifest records the folder and the reused stages'
    original timings."""
    threads = torch.get_num_threads()
    try:
        return _build(out, cfg, reuse)
    finally:
        torch.set_num_threads(threads)


def _reused_stages(reuse: Path, cfg: BuildConfig) -> tuple[torch.nn.Module, ToyClassifier, ToyImageEncoder, dict]:
    from common.toy.judges import load_classifier, load_image_encoder
    from common.toy.models import load_toy_components, read_manifest

    old = read_manifest(reuse)
    if old.get("world_version") != WORLD_VERSION:
        raise ValueError(f"--reuse {reuse}: built for world version {old.get('world_version')}, this is {WORLD_VERSION}")
    mine = asdict(cfg)
    diff = [k for k in REUSABLE_SETTINGS if old["build"].get(k) != mine[k]]
    if diff:
        what = ", ".join(f"{k}={old['build'].get(k)!r} (here {mine[k]!r})" for k in diff)
        raise ValueError(f"--reuse {reuse}: its build differs in {what}; the reused stages would not be this build's")
    vae = load_toy_components(path=reuse).vae
    keep = ("vae_seconds", "vae_final_l1", "classifier_seconds", "encoder_seconds")
    return vae, load_classifier(path=reuse), load_image_encoder(path=reuse), {k: old["timings"][k] for k in keep}


def _build(out: str | Path, cfg: BuildConfig | None, reuse: str | Path | None = None) -> dict:
    cfg = cfg or BuildConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    world = ToyWorld()
    timings: dict[str, float] = {}
    stages = tqdm(total=5, desc="toy build", unit="stage")
    if reuse is not None:
        vae, clf, enc, st = _reused_stages(Path(reuse), cfg)
        timings.update(st, reused_from=str(reuse))
        stages.update(3)
    else:
        vae, st = train_vae(world, cfg)
        timings.update(st)
        stages.update()
        clf, st = train_classifier(world, vae, cfg)
        timings.update(st)
        stages.update()
        enc, st = train_encoder(world, vae, cfg)
        timings.update(st)
        stages.update()
    comps, st = train_diffusion(world, vae, cfg)
    timings.update(st)
    stages.update()

    t_eval = time.time()
    clf_eval = evaluate_classifier(world, vae, clf, cfg)
    enc_eval = evaluate_encoder(world, vae, enc, cfg)
    for name, m in (("vae", comps.vae), ("text_encoder", comps.text_encoder), ("unet", comps.unet),
                    ("classifier", clf), ("image_encoder", enc)):
        _save(m, out / FILES[name])
        m.to(torch.float16).to(torch.float32)  # measure the base model as it is shipped (fp16 weights, fp32 compute)
    occ_train = world.train_subset(max(1, cfg.eval_train_occupations // len(world.fields)))
    occ_train = occ_train[: cfg.eval_train_occupations]
    occ_held = world.heldout_occupations[: cfg.eval_heldout_occupations]
    kw = dict(images=cfg.eval_images, steps=cfg.eval_steps, guidance=cfg.eval_guidance)
    bias_train = measure_bias(world, comps, clf, occ_train, **kw)
    bias_held = measure_bias(world, comps, clf, occ_held, **kw)
    timings["evaluation_seconds"] = time.time() - t_eval
    stages.update()
    stages.close()
    timings["total_seconds"] = time.time() - t0
    metrics = {
        "timings": timings,
        "classifier": clf_eval,
        "image_encoder": enc_eval,
        "base_bias": {
            "train": bias_train["mean"],
            "heldout": bias_held["mean"],
            "data_train": data_bias(world, occ_train),
            "data_heldout": data_bias(world, occ_held),
            "eval": {**kw, "train_occupations": occ_train, "heldout_occupations": occ_held},
            "per_occupation": {**bias_train["per_occupation"], **bias_held["per_occupation"]},
        },
    }
    return _write_manifest(out, cfg, comps.vae_scale, metrics)


def _write_manifest(out: Path, cfg: BuildConfig, cfg_scale: float, metrics: dict) -> dict:
    manifest = {
        "world_version": WORLD_VERSION,
        "build": asdict(cfg),
        "files": FILES,
        "configs": {"vae": {**VAE_CONFIG, "scaling_factor": cfg_scale}, "text_encoder": TEXT_CONFIG, "unet": UNET_CONFIG},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        **metrics,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=list))
    return manifest


def config_from_args(seed: int, quick: bool, overrides: dict) -> BuildConfig:
    """BuildConfig from the CLI: `quick` for smoke tests, `overrides` {field: value} for experiments."""
    cfg = BuildConfig.quick(seed) if quick else BuildConfig(seed=seed)
    names = {f.name: f.type for f in fields(cfg)}
    for k, v in overrides.items():
        if k not in names:
            raise KeyError(f"unknown build setting '{k}'; valid: {sorted(names)}")
        kind = type(getattr(cfg, k))
        try:
            setattr(cfg, k, kind(v))
        except ValueError:
            raise ConfigError(f"build setting '{k}': '{v}' is not a valid {kind.__name__}") from None
    if cfg.encoder_move < 0:
        raise ConfigError(f"build setting 'encoder_move': {cfg.encoder_move} is negative; expected a distance in pixels "
                         f">= 0 (0 = positives not moved)")
    return cfg
