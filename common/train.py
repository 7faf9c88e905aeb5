"""The one training loop for every experiment.

    python -m common.train --config exp-1-debias-gender/configs/debias-text-encoder.yaml [--set key=value ...]
    accelerate launch --config_file exp-1-debias-gender/configs/accelerate-multi-gpu.yaml -m common.train --config ...

One step (docs/method.md#one-training-step), top to bottom; the loop orchestrates, each hop's mathematics lives where
the map says:

    fit -> step: denoising steps drawn once, then for each of `train.prompts_per_step` prompts, _accumulate:
      1. rollouts     sampling.sample          no grad; finetuned and original model from the same noise
      2. judges       judges.Judges.judge      largest face (faces.detect), crop, classifier probabilities
      3. targets      alignment (targets_for)  optimal-transport targets on the batch gathered over processes
      4. loss         losses.FairnessLoss      alignment CE, CLIP/DINO preservation, face realism, per image
      5. DFT          sampling.dft_backward    the loss back-propagated through the chain, rescaled per step
    -> before_reduce hooks -> _all_reduce_grads (one flat all-reduce; non-finite anywhere skips the step everywhere)
    -> AdamW at lr_at(step) -> EMA (adapters.EMA) -> log, validate (Judges.measure), checkpoint

All randomness of a step derives from (seed, step, rank), so a resumed run reproduces the uninterrupted one exactly;
the RNG states are saved and restored as well.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import adapters as ad
from common.alignment import assign, expected_targets
from common.config import Config, add_config_args, load_config, save_config
from common.judges import Judges
from common.losses import FairnessLoss, LossWeights, kept_classes, kept_share
from common.models import load_components, resolve_dtype
from common.prompts import load_prompt_sets
from common.sampling import Conditioning, dft_backward, encode_prompts, sample


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (sha256; never Python's randomised hash())."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def lr_at(cfg_train, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): a pure function of the step, so a resumed run needs no
    scheduler state. cosine: lr (1 + cos(pi step / max_steps)) / 2; linear: lr (1 - step / max_steps)."""
    lr, t = cfg_train.lr, min(step / cfg_train.max_steps, 1.0)
    if cfg_train.lr_schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg_train.lr_schedule == "linear":
        return lr * (1.0 - t)
    return lr


def prompt_for_step(prompts: list[str], seed: int, step: int) -> str:
    """The training prompt of a step: prompts reshuffled every epoch by a seed of (seed, epoch); same on every rank."""
    epoch, k = divmod(step, len(prompts))
    order = list(range(len(prompts)))
    random.Random(derive_seed(seed, "epoch", epoch)).shuffle(order)
    return prompts[order[k]]


# ----------------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------------


class RunLogger:
    """Every scalar goes to RUN_DIR/metrics.csv (long format: step, key, value) and to the configured tracker."""

    def __init__(self, accelerator, cfg: Config, run_dir: Path):
        self.acc, self.main = accelerator, accelerator.is_main_process
        self.path = run_dir / "metrics.csv"
        if self.main and not self.path.exists():
            self.path.write_text("step,key,value\n")
        self.tracking = _tracker(cfg) is not None
        if self.tracking:
            if cfg.logging.backend == "wandb" and "WANDB_MODE" not in os.environ and not wandb_credentials():
                os.environ["WANDB_MODE"] = "offline"  # no credentials: log locally, sync later with `wandb sync`
                if self.main:
                    print(f"[train] wandb: no WANDB_API_KEY and no `wandb login` entry found: logging offline to "
                          f"{run_dir / 'wandb'} (upload later with `wandb sync`)")
            accelerator.init_trackers(cfg.logging.project, config=_flat(cfg.to_dict()),
                                      init_kwargs={"wandb": {"name": cfg.logging.run_name or run_dir.name,
                                                             "dir": str(run_dir)}} if cfg.logging.backend == "wandb" else {})

    def log(self, values: dict[str, float], step: int) -> None:
        if not self.main or not values:
            return
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            for k, v in values.items():
                w.writerow([step, k, f"{float(v):.6g}"])
        if self.tracking:
            self.acc.log({k: float(v) for k, v in values.items()}, step=step)

    def close(self):
        if self.tracking:
            self.acc.end_training()


def wandb_credentials() -> bool:
    """True when wandb can authenticate: WANDB_API_KEY, or the netrc entry `wandb login` writes ($NETRC, ~/.netrc or
    ~/_netrc) for the wandb host ($WANDB_BASE_URL, default api.wandb.ai)."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    env = os.environ.get("NETRC")
    files = [Path(env).expanduser()] if env else [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    for f in files:
        if f.is_file():
            try:
                entry = netrc.netrc(str(f)).authenticators(host)
            except (netrc.NetrcParseError, OSError):
                continue
            if entry and entry[2]:
                return True
    return False


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, int | float | str | bool) or v is None else str(v)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything from a config and runs the loop. Public for tests: `step()`, `validate()`, `save()`."""

    def __init__(self, cfg: Config, accelerator=None, resume: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        from common.runtime import enable_tf32, quiet_libraries, require_device

        self.cfg = cfg
        self.run_dir = Path(cfg.paths.output_dir)
        quiet_libraries()
        enable_tf32()
        if accelerator is None:
            device = require_device(cfg.model.name, cfg.train.allow_cpu,
                                    "set train.allow_cpu: true in the config (or --set train.allow_cpu=true)")
            project = ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs"))
            accelerator = Accelerator(cpu=device == "cpu", log_with=_tracker(cfg), project_config=project)
        self.acc = accelerator
        self.device = self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        gipp = cfg.train.images_per_prompt
        if gipp % self.world:
            raise ValueError(f"train.images_per_prompt = {gipp} must be divisible by the number of processes ({self.world})")
        self.n_local = gipp // self.world
        dtype = resolve_dtype(cfg.model.dtype, self.device)
        te_dtype = resolve_dtype(cfg.model.text_encoder_dtype, self.device) if cfg.model.text_encoder_dtype else dtype
        self.dtype = dtype
        ls = cfg.train.loss_scale
        self.loss_scale = float(ls) if ls is not None else (1024.0 if dtype == torch.float16 else 1.0)
        torch.manual_seed(cfg.train.seed)  # identical adapter initialisation on every process

        # models and adapters
        self.comps = load_components(cfg.model.name, dtype=dtype, device=self.device, text_encoder_dtype=te_dtype)
        ft = cfg.finetune
        if ft.prefix_tokens:
            ad.add_prefix_tokens(self.comps, ft.prefix_tokens, cfg.train.seed)
            self.conditioning = "reference_unmasked"  # the authors' prefix path encoded "" without a mask
        else:
            ad.add_lora(self.comps, ft.text_encoder_lora, ft.unet_lora, ft.rank, text_encoders=ft.text_encoders)
            self.conditioning = "reference"
        # finetuned and original model share the U-Net (and their prompts have one token length): one rollout for both
        self.unet_shared = not ft.unet_lora and not ft.prefix_tokens
        self.params = ad.trainable_parameters(self.comps)
        self.opt = torch.optim.AdamW(self.params.values(), lr=cfg.train.lr, betas=(0.9, 0.999),
                                     weight_decay=cfg.train.weight_decay, eps=1e-8)
        self.ema = ad.EMA(self.params, decay=cfg.train.ema_decay)

        # judges: face detector, attribute classifier, image and face encoders, face bank (common/judges.py)
        self.judges = Judges.from_config(cfg, self.device, dtype)
        self.attrs = self.judges.attributes  # the debiased attributes; the judges also read the kept ones
        self.heads = {a.name: self.judges.heads[a.name] for a in self.attrs}
        self.keep_heads = {a: h for a, h in self.judges.heads.items() if a not in self.heads}  # kept, not debiased
        lw = cfg.loss
        self.weights = LossWeights(
            w_img=lw.w_img, w_face=lw.w_face,
            factor1={a.name: cfg.attributes[a.name].factor1 for a in self.attrs},
            factor2={a.name: cfg.attributes[a.name].factor2 for a in self.attrs},
            face_confidence=lw.face_confidence, no_face_weight=lw.no_face_weight,
        )

        # prompts
        self.train_prompts = load_prompt_sets(cfg.prompts.train, cfg.paths.data_dir)
        self.val_prompts = load_prompt_sets(cfg.prompts.val, cfg.paths.data_dir, cfg.prompts.val_limit)

        self.step_count = 0
        self.before_reduce: list = []
        """callables `hook(trainer)` run each step after this process's gradients are accumulated, before the
        all-reduce"""
        self._val_orig: dict | None = None
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.acc.wait_for_everyone()
        if resume:
            self.load(resume)
        self.logger = RunLogger(self.acc, cfg, self.run_dir)

    # ------------------------------------------------------------------------------------------------ helpers
    def noise(self, tag, n: int, offset: int = 0) -> torch.Tensor:
        """[n, C, h, w] fp32 noise from a seed of (seed, tag, rank): reproducible, different per process."""
        shape = self.comps.latent_shape(self.cfg.sampling.image_size)
        g = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, tag, self.rank, offset))
        return torch.randn((n, *shape), generator=g).to(self.device)

    def _rollouts(self, prompts: list[str], noise: torch.Tensor, steps: int, trajectory: bool):
        """No-grad rollouts of the finetuned and the original model from the same noise -> (finetuned, original)."""
        kw = dict(guidance=self.cfg.sampling.guidance, conditioning=self.conditioning,
                  decode_chunk=self.cfg.sampling.decode_chunk)
        n = noise.shape[0]
        if self.unet_shared:
            size = self.cfg.sampling.image_size  # SDXL conditions on it; SD 1.x ignores it
            cond_ft = encode_prompts(self.comps, prompts, self.conditioning, image_size=size)
            with ad.adapters_disabled(self.comps):
                cond_orig = encode_prompts(self.comps, prompts, self.conditioning, image_size=size)
            both = sample(self.comps, Conditioning.cat([cond_ft, cond_orig]), torch.cat([noise, noise]), steps,
                          return_trajectory=trajectory, **kw)
            return both.slice(torch.arange(n)), both.slice(torch.arange(n, 2 * n))
        ft = sample(self.comps, prompts, noise, steps, return_trajectory=trajectory, **kw)
        with ad.adapters_disabled(self.comps):
            orig = sample(self.comps, prompts, noise, steps, **kw)
        return ft, orig

    def _gather_probs(self, probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {a: self.acc.gather(p.contiguous()) for a, p in probs.items()} if self.world > 1 else probs

    def targets_for(self, probs: dict[str, torch.Tensor], step: int, prompt_index: int = 0):
        """Alignment targets and confidences for this process's images: computed on the gathered batch (of the step's
        `prompt_index`-th prompt)."""
        glob = self._gather_probs(probs)
        group = torch.distributed.group.WORLD if self.world > 1 else None
        lc = self.cfg.loss
        problems = [self.attrs] if lc.joint_alignment else [[a] for a in self.attrs]
        q = {}
        for k, attrs in enumerate(problems):
            parts = [*([k] if k else []), *([f"p{prompt_index}"] if prompt_index else [])]
            ot_seed = derive_seed(self.cfg.train.seed, "ot", step, *parts)
            q.update(expected_targets(
                {a.name: glob[a.name].double() for a in attrs}, {a.name: a.target for a in attrs},
                method=lc.alignment_method, samples=lc.mc_samples,
                seed=ot_seed % (2**31), mass=lc.exact_mass,
                age_asymmetric=lc.age_asymmetric_cost, group=group,
            ))
        mine = slice(self.rank * self.n_local, (self.rank + 1) * self.n_local)
        targets, confidence = {}, {}
        for a, qa in q.items():
            t, c = assign(qa, self.cfg.loss.confidence_threshold)
            targets[a], confidence[a] = t[mine].to(self.device), c[mine].to(self.device)
        return targets, confidence, glob

    # ------------------------------------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        """One optimizer step over `train.prompts_per_step` prompts: each prompt gets `images_per_prompt` images and its
        own alignment problem (the target distribution is per prompt); the gradient is the mean over all images."""
        cfg, step = self.cfg, self.step_count
        n_prompts = cfg.train.prompts_per_step
        lo, hi = cfg.sampling.train_steps
        steps = random.Random(derive_seed(cfg.train.seed, "steps", step)).randint(lo, hi)  # same on every rank
        self.opt.zero_grad(set_to_none=False)
        for p in self.params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        total, term_logs, stats = 0.0, {}, []
        for j in range(n_prompts):
            prompt = prompt_for_step(self.train_prompts, cfg.train.seed, step * n_prompts + j)
            loss, logs, glob, targets = self._accumulate(prompt, j, steps, denominator=self.n_local * n_prompts)
            total += loss
            for k, v in logs.items():
                term_logs[k] = term_logs.get(k, 0.0) + v
            stats.append((glob, targets))
        for hook in self.before_reduce:  # e.g. gradient surgery, or a fault injected by a test
            hook(self)
        finite = self._all_reduce_grads()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg.train, step)
        if finite:
            self.opt.step()
            self.ema.step()
        self.step_count += 1

        # logging (batch statistics on the gathered probabilities of the finetuned images, averaged over the prompts)
        from common.metrics import distance_to_target, predictions

        out = {"loss": total, "skipped": float(not finite), "steps": float(steps), "faces": 0.0,
               "lr": lr_at(cfg.train, step)}
        for glob, targets in stats:
            out["faces"] += float((glob[self.attrs[0].name][:, 0] >= 0).float().mean()) / n_prompts
            for a in self.attrs:
                p = glob[a.name]
                pred = predictions(p, p[:, 0] >= 0)
                kind, value = distance_to_target(pred.cpu(), a)  # bias_{a}, or gap_{a} for a non-uniform target
                for key, v in ((f"{kind}_{a.name}", value),
                               (f"targets_{a.name}", float((targets[a.name] >= 0).float().mean()))):
                    out[key] = out.get(key, 0.0) + v / n_prompts
        out.update({k: v / (self.n_local * n_prompts) for k, v in term_logs.items()})
        self._mean_over_ranks(out, ["loss", *term_logs])
        out["lora_norm"] = float(torch.stack([p.detach().norm() for p in self.params.values()]).mean())
        if self.device.type == "cuda":  # this process's peak since start, for `make dryrun DEVICE=cuda`'s table
            out["gpu_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def _accumulate(self, prompt: str, j: int, steps: int, denominator: int):
        """Roll out, judge and align this process's images of `prompt` (the step's j-th prompt), then ADD the
        adjusted-DFT gradient of their loss (summed over images, divided by `denominator`) to the parameters' grads.
        Returns (loss, summed term logs, gathered probabilities, this process's targets)."""
        cfg, step, judges = self.cfg, self.step_count, self.judges
        noise = self.noise("train" if j == 0 else f"train/{j}", self.n_local, step)
        prompts = [prompt] * self.n_local
        mode = cfg.sampling.dft
        # 1. no-grad rollouts of the finetuned and the original model from the same noise (common/sampling.py)
        ft, orig = self._rollouts(prompts, noise, steps, trajectory=(mode == "fast"))
        # 2. the judges: detect the largest face, crop, classify (common/judges.py, common/faces.py)
        gen_j, orig_j = judges.judge(ft.images), judges.judge(orig.images)
        # 3. distributional alignment: OT targets on the batch gathered over processes (common/alignment.py)
        targets, _, glob = self.targets_for({a.name: gen_j.probs[a.name] for a in self.attrs}, step, j)
        keep_targets = kept_classes(orig_j, self.keep_heads, cfg.loss.confidence_threshold)
        # 4. the per-image loss: alignment CE, semantics preservation, face realism (common/losses.py)
        with torch.no_grad():
            orig_feats = [enc(orig.images) for enc in judges.encoders.values()]
            orig_face = None
            if judges.face_encoder is not None and cfg.loss.w_face > 0:
                orig_face = judges.face_encoder(orig_j.faces.aligned)
        loss_fn = FairnessLoss(
            classifier=judges.classifier, heads=self.heads, gen=gen_j, orig=orig_j, targets=targets,
            weights=self.weights, encoders=list(judges.encoders.values()), orig_features=orig_feats,
            face_encoder=judges.face_encoder, orig_face_features=orig_face, face_bank=judges.face_bank,
            denominator=denominator, keep_heads=self.keep_heads, keep_targets=keep_targets, w_keep=cfg.loss.w_keep,
        )
        # share of the images whose kept attribute reads as the original's (times n_local: term logs are per-image sums)
        total, term_logs = 0.0, {f"kept_{a}": kept_share(gen_j.pred[a], orig_j.pred[a]) * self.n_local
                                 for a in self.keep_heads}
        for start in range(0, self.n_local, cfg.train.micro_batch):
            idx = torch.arange(start, min(start + cfg.train.micro_batch, self.n_local))
            logs_mb: dict[str, float] = {}

            def fn(images, idx=idx, logs_mb=logs_mb):
                loss, logs = loss_fn(images, idx)
                logs_mb.update(logs)
                return loss * self.loss_scale  # static loss scale; the gradients are unscaled before the all-reduce

            # 5. adjusted DFT: the loss back-propagated through the sampling chain, rescaled per step (sampling.py)
            loss = dft_backward(
                self.comps, prompts[: len(idx)], noise[idx], steps, fn, mode=mode,
                rollout=ft.slice(idx) if mode == "fast" else None, guidance=cfg.sampling.guidance,
                conditioning=self.conditioning, last_k=cfg.sampling.dft_last_k, chunk=cfg.sampling.dft_chunk,
                decode_chunk=cfg.sampling.decode_chunk, checkpointing=cfg.sampling.unet_checkpointing,
            )
            total += float(loss) / self.loss_scale
            for k, v in logs_mb.items():
                term_logs[k] = term_logs.get(k, 0.0) + v
        return total, term_logs, glob, targets

    def _mean_over_ranks(self, logs: dict[str, float], keys: list[str]) -> None:
        """Replace the per-process values of `keys` (the loss and its terms) by their mean over the processes, in
        place, with one all-reduce; the other logs are already computed on the gathered batch."""
        if self.world <= 1:
            return
        v = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(v)
        for k, x in zip(keys, (v / self.world).tolist()):
            logs[k] = x

    def _all_reduce_grads(self) -> bool:
        """Average the gradients over processes as ONE flat buffer; True when every entry is finite on every rank
        (checked after the reduction, so all processes agree: the authors' rank-local check is not repeated)."""
        grads = [p.grad for p in self.params.values()]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        if self.loss_scale != 1.0:
            flat /= self.loss_scale  # an overflow stays inf and skips the step below
        if self.world > 1:
            torch.distributed.all_reduce(flat)
            flat /= self.world
        finite = bool(torch.isfinite(flat).all())
        off = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[off : off + n].view_as(g))
            off += n
        return finite

    # ------------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, on_batch=None) -> dict[str, float]:
        """Per-prompt and mean bias (`Judges.measure`, as `common.evaluate` measures) of the original, the current and
        the EMA weights on validation noise fixed for the whole run; annotated grids of the first prompts in
        RUN_DIR/val/. `on_batch(tag, prompt index, images, judgement)` (optional; tag orig / main / ema) sees every
        validation batch of this process, e.g. to keep its images."""
        from common.metrics import target_kind
        from common.plots import annotated_grid

        cfg = self.cfg
        per = max(1, cfg.train.val_images_per_prompt // self.world)
        kw = dict(guidance=cfg.sampling.guidance, conditioning=self.conditioning, decode_chunk=cfg.sampling.decode_chunk)
        val_dir = self.run_dir / "val"

        def sampler(i, prompt, idx):  # the validation noise of prompt i, images idx
            noise = self.noise("val", per, i)[list(idx)]
            return sample(self.comps, [prompt] * len(idx), noise, cfg.sampling.val_steps, **kw).images

        def summary(tag: str) -> dict:
            def seen(i, idx, images, j, last):
                if on_batch is not None:
                    on_batch(tag, i, images, j)
                if self.acc.is_main_process and i < 4 and (tag != "orig" or self.step_count == 0):
                    val_dir.mkdir(parents=True, exist_ok=True)
                    grid = annotated_grid(images.cpu(), j.faces.boxes.cpu(), {k: v.cpu() for k, v in j.probs.items()},
                                          j.found.cpu(), self.attrs)
                    grid.save(val_dir / f"step{self.step_count:06d}_p{i}_{tag}.png")

            m = self.judges.measure(sampler, self.val_prompts, per, batch_size=per, on_batch=seen)
            return (m.gathered(self.acc.gather) if self.world > 1 else m).summarize(n_boot=0)

        if self._val_orig is None:  # the original model never changes: sample and judge it once
            with ad.adapters_disabled(self.comps):
                self._val_orig = summary("orig")
        summaries = {"orig": self._val_orig, "main": summary("main")}
        with self.ema.swapped():
            summaries["ema"] = summary("ema")
        out: dict[str, float] = {}
        for tag, s in summaries.items():
            for a in self.attrs:
                metric = f"{a.name}_{target_kind(a)}"  # bias, or gap for a non-uniform target
                key = f"val_{tag}_{target_kind(a)}_{a.name}"
                out.update({f"{key}_p{i}": v for i, v in s["per_prompt"][metric].items()})
                out[key] = s["mean"][metric]
        return out

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save(self, permanent: bool) -> Path:
        """Write a checkpoint atomically (temporary folder, then rename); rolling ones beyond `keep_checkpoints` go."""
        cfg, step = self.cfg, self.step_count
        ckpts = self.run_dir / "ckpts"
        name = f"checkpoint-{step}" if permanent else f"checkpoint_tmp-{step}"
        final, tmp = ckpts / name, ckpts / f".{name}.partial"
        from safetensors.torch import save_file

        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in ad.trainable_state_dict(self.comps).items()},
                      str(tmp / "trainable.safetensors"))
            save_file({k: v.detach().cpu().contiguous() for k, v in self.ema.shadow.items()}, str(tmp / "ema.safetensors"))
            torch.save({"optimizer": self.opt.state_dict(), "ema": {k: v for k, v in self.ema.state_dict().items()
                                                                     if k != "shadow"}}, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": self.world, "seed": cfg.train.seed}))
        self.acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            if not permanent:
                rolling = sorted(ckpts.glob("checkpoint_tmp-*"), key=lambda p: int(p.name.split("-")[-1]))
                for old in rolling[: max(0, len(rolling) - cfg.train.keep_checkpoints)]:
                    shutil.rmtree(old)
        self.acc.wait_for_everyone()
        return final

    def load(self, which: str) -> None:
        """Restore adapters, optimizer, EMA, step and this process's RNG state from `latest` or a folder."""
        from safetensors.torch import load_file

        path = latest_checkpoint(self.run_dir) if which == "latest" else Path(which)
        if path is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {self.run_dir / 'ckpts'}")
        for f in ("trainable.safetensors", "ema.safetensors", "optimizer.pt", "state.json"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path} is not a complete checkpoint: {f} is missing")
        ad.load_trainable_state_dict(self.comps, load_file(str(path / "trainable.safetensors")))
        extra = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
        self.opt.load_state_dict(extra["optimizer"])
        self.ema.load_state_dict({**extra["ema"], "shadow": load_file(str(path / "ema.safetensors"))})
        state = json.loads((path / "state.json").read_text())
        self.step_count = int(state["step"])
        rng = path / f"rng_rank{self.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        elif state.get("world_size") == self.world:
            raise FileNotFoundError(f"{rng} is missing: every process's RNG state is saved with the checkpoint")
        self.acc.print(f"[train] resumed from {path} at step {self.step_count}")

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self, on_step=None) -> None:
        """Train to `train.max_steps` with logging, validation and checkpoints; `on_step(step)` (optional) is called
        after each step's bookkeeping (e.g. a measurement every K steps)."""
        cfg = self.cfg
        tr = cfg.train
        bar = tqdm(total=tr.max_steps, initial=self.step_count, desc="train", disable=not self.acc.is_main_process,
                   dynamic_ncols=True)
        if self.step_count == 0 and tr.validate_every > 0:
            self.logger.log(self.validate(), 0)
        while self.step_count < tr.max_steps:
            t0 = time.time()
            logs = self.step()
            logs["seconds"] = time.time() - t0
            s = self.step_count
            self.logger.log(logs, s)
            bar.update(1)
            shown = {k: f"{v:.2f}" for k, v in logs.items() if k.startswith(("bias_", "gap_"))}
            bar.set_postfix({"loss": f"{logs['loss']:.3f}", **shown})
            if tr.validate_every and (s % tr.validate_every == 0 or s == tr.max_steps):
                self.logger.log(self.validate(), s)
            if s == tr.max_steps or (tr.permanent_every and s % tr.permanent_every == 0):
                self.save(permanent=True)  # the last step is always kept
            elif tr.checkpoint_every and s % tr.checkpoint_every == 0:
                self.save(permanent=False)
            if on_step is not None:
                on_step(s)
        bar.close()
        self.logger.close()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder (permanent or rolling) with the highest step, or None."""
    ckpts = [p for p in (Path(run_dir) / "ckpts").glob("checkpoint*-*") if p.is_dir() and not p.name.startswith(".")]
    return max(ckpts, key=lambda p: int(p.name.rsplit("-", 1)[-1]), default=None)


def _tracker(cfg: Config):
    return None if cfg.logging.backend in ("none", "csv") else cfg.logging.backend


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Finetune a diffusion model for fairness (one training loop for every experiment).")
    add_config_args(ap)
    ap.add_argument("--resume", default=None, help="`latest` or a checkpoint folder")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    Trainer(cfg, resume=args.resume).fit()


if __name__ == "__main__":
    from common.runtime import cli

    cli(main)
