"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) by tests/test_train.py.

Checks, written to the JSON file named by argv[1] (rank 0): the alignment targets computed on the gathered batch equal
the one-process computation on the same probabilities; the parameters are identical on both processes after each step;
a NaN injected on rank 1 at step 1 (through the trainer's public `before_reduce` hook) skips that step on both;
validation measures the images of both processes: its per-prompt bias equals `metrics.bias` of the two processes'
predictions gathered by hand, and both processes log the same figures.
"""

import json
import sys
from pathlib import Path

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from train_helpers import tiny_overrides  # noqa: E402

from common.alignment import assign, expected_targets  # noqa: E402
from common.config import load_config  # noqa: E402
from common.train import Trainer  # noqa: E402


def flat_params(tr):
    return torch.cat([p.detach().reshape(-1) for p in tr.params.values()])


class _ColourJudge(torch.nn.Module):
    """gender and race logits from an image's mean red value, through sines of high frequency: a judge whose verdict
    differs between images of the same prompt (tiny random models draw near-identical colour means)."""

    attributes = {"gender": ("female", "male"), "race": ("WMELH", "Black", "Indian", "Asian")}
    input_size = 64

    def forward(self, x):
        r = x.float()[:, 0].mean((1, 2))  # [N]
        return {"gender": torch.stack([torch.sin(1e4 * r), torch.zeros_like(r)], 1),
                "race": torch.stack([torch.sin(1e4 * (k + 2) * r + k) for k in range(4)], 1)}


def main():
    out_file, run_dir, config = sys.argv[1], sys.argv[2], sys.argv[3]
    acc = Accelerator(cpu=True)
    # confidence threshold 0: every image gets an alignment target, so each process's loss is far from zero (with the
    # random judge's near-uniform probabilities none would pass 0.8, and the losses would be rounding noise)
    cfg = load_config(config, tiny_overrides(run_dir, "train.max_steps=3", "finetune.rank=4",
                                             "loss.confidence_threshold=0.0", "train.val_images_per_prompt=8"))
    tr = Trainer(cfg, accelerator=acc)
    res = {"world": acc.num_processes}

    # 1. targets on the gathered batch == one-process computation on the same probabilities
    g = torch.Generator().manual_seed(10 + acc.process_index)
    probs = {a.name: torch.softmax(torch.randn(tr.n_local, a.num_classes, generator=g), -1) for a in tr.attrs}
    targets, conf, glob = tr.targets_for(probs, step=0)
    all_t = {a: acc.gather(t) for a, t in targets.items()}
    q1 = expected_targets({a: p.double() for a, p in glob.items()}, {a.name: a.target for a in tr.attrs}, method="exact")
    res["targets_equal"] = all(torch.equal(all_t[a], assign(q1[a], cfg.loss.confidence_threshold)[0]) for a in q1)

    # 2. identical parameters after each step; 3. NaN on rank 1 at step 1 skips the step on both processes
    res["identical"], res["skipped"], res["changed"], res["loss_logged"], res["loss_local"] = [], [], [], [], []
    local = {}
    reduce = tr._mean_over_ranks

    def spy(logs, keys):  # this process's own loss, before the reduction over processes
        local["loss"] = logs["loss"]
        reduce(logs, keys)

    tr._mean_over_ranks = spy

    def nan_on_rank1_step1(trainer):
        if trainer.rank == 1 and trainer.step_count == 1:
            next(iter(trainer.params.values())).grad.view(-1)[0] = float("nan")

    tr.before_reduce.append(nan_on_rank1_step1)
    for _ in range(3):
        before = flat_params(tr).clone()
        logs = tr.step()
        p = flat_params(tr)
        both = acc.gather(p[None])
        res["identical"].append(bool(torch.equal(both[0], both[1])))
        res["skipped"].append(logs["skipped"])
        res["loss_logged"].append(acc.gather(torch.tensor([logs["loss"]], dtype=torch.float64)).tolist())
        res["loss_local"].append(acc.gather(torch.tensor([local["loss"]], dtype=torch.float64)).tolist())
        res["changed"].append(acc.gather(torch.tensor([float(not torch.equal(p, before))])).tolist())

    # 4. validation on the gathered images, with a judge whose verdict varies from image to image (colour means)
    tr.judges.classifier = _ColourJudge()
    preds: dict[int, dict[str, torch.Tensor]] = {}
    val = tr.validate(on_batch=lambda tag, i, images, j: preds.setdefault(i, j.pred) if tag == "main" else None)
    from common.metrics import bias

    want = {f"val_main_bias_{a}_p{i}": bias(acc.gather(p[a].contiguous()), k) for i, p in preds.items()
            for a, k in (("gender", 2), ("race", 4))}
    res["val_matches_gathered"] = all(val[k] == v for k, v in want.items())
    res["val_n_images"] = int(acc.gather(preds[0]["gender"]).numel())
    res["val_same_on_both"] = acc.gather(torch.tensor([list(want.values())], dtype=torch.float64)).tolist()
    res["val_gender"] = sorted({v for k, v in want.items() if "gender" in k})
    if acc.is_main_process:
        Path(out_file).write_text(json.dumps(res))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
