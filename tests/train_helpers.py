"""Shared by the trainer tests and their two-process worker: tiny-component overrides for any shipped config."""

TINY = [
    "model.name=tiny", "model.dtype=fp32", "model.text_encoder_dtype=null",
    "judges.classifier=random-fairface8", "judges.detector=whole-image", "judges.features=[tiny-clip, tiny-dino]",
    "judges.face_encoder=null", "judges.face_bank=null",
    "sampling.image_size=64", "sampling.train_steps=[2, 3]", "sampling.dft_last_k=null", "sampling.val_steps=2",
    "train.images_per_prompt=4", "train.micro_batch=2", "train.max_steps=2", "train.validate_every=0",
    "train.checkpoint_every=1", "train.permanent_every=0", "train.val_images_per_prompt=2",
    "logging.backend=none", "prompts.val_limit=2",
]


def tiny_overrides(out_dir, *extra: str) -> list[str]:
    """TINY plus a rank-4 LoRA (when LoRA is trained) and the output folder; `extra` last."""
    return [*TINY, f"paths.output_dir={out_dir}", *extra]
