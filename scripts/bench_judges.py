"""Benchmark: `Judges.judge` (face detection + attribute classification) of 32 images of 512 px, batched vs one image
at a time.

Images: skimage's astronaut photo, shifted and mirrored copies (one face each). Classifier: the fairface8
MobileNetV3-Large layout with random weights (speed only). Both paths run side by side in one process on the same
device after a warm-up, REPEATS times each, in alternating order (batched first on even repeats, the loop first on
odd ones, so neither always runs on a warmer cache or a quieter machine); `judges_batched_speedup` = median loop time
/ median batched time. On the CPU the batched path feeds the judges `common.runtime.CPU_CHUNK` images per call.
"""

from __future__ import annotations

import statistics
import time

import torch

N_IMAGES = 32
REPEATS = 5


def _images(device) -> torch.Tensor:
    """[32, 3, 512, 512] in [-1, 1]: astronaut rolled by up to +-45 px, every other copy mirrored."""
    from skimage.data import astronaut

    base = torch.tensor(astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    out = []
    for i in range(N_IMAGES):
        x = torch.roll(base, ((i * 7) % 91 - 45, (i * 13) % 91 - 45), (1, 2))
        out.append(x.flip(-1) if i % 2 else x)
    return torch.stack(out).to(device)


def _judge(images, judges):
    """The product's path: `Judges.judge` (detect, crop, classify)."""
    j = judges.judge(images)
    return j.found, j.probs


def run() -> dict[str, float]:
    from common.classifiers import load_classifier
    from common.judges import Judges

    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = _images(device)
    judges = Judges(load_classifier("random-fairface8", device=device), "mtcnn", device=device)
    _judge(images[:2], judges)  # warm-up: MTCNN weights, kernels

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    batch_times, loop_times = [], []
    for r in range(REPEATS):
        order = ("batch", "loop") if r % 2 == 0 else ("loop", "batch")
        for path in order:
            if path == "batch":
                t, (found_b, probs_b) = timed(lambda: _judge(images, judges))
                batch_times.append(t)
            else:
                t, outs = timed(lambda: [_judge(images[i : i + 1], judges) for i in range(N_IMAGES)])
                loop_times.append(t)
    t_batch, t_loop = statistics.median(batch_times), statistics.median(loop_times)
    found_l = torch.cat([f for f, _ in outs])
    if not torch.equal(found_b, found_l) or not bool(found_b.all()):
        raise RuntimeError(f"batched and per-image detection disagree: {found_b.tolist()} vs {found_l.tolist()}")
    gender_l = torch.cat([p["gender"] for _, p in outs])
    if not torch.allclose(probs_b["gender"], gender_l, atol=1e-3):
        raise RuntimeError("batched and per-image classification disagree")
    return {
        "judges_batched_speedup": t_loop / t_batch,
        "judges_batched_s_per_image": t_batch / N_IMAGES,
        "judges_loop_s_per_image": t_loop / N_IMAGES,
        "judges_repeats": REPEATS,
    }


if __name__ == "__main__":
    print(run())
