"""Export: a training run's checkpoint -> diffusers LoRA / textual-inversion files that diffusers' own pipeline loads
and that generate the same images as the in-memory adapted model; the released-file conversion; checkpoint choice."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.adapters import (
    CheckpointError,
    adapters_disabled,
    add_lora,
    add_prefix_tokens,
    load_lora,
    load_released,
    load_trainable_state_dict,
    released_layout,
    trainable_parameters,
    trainable_state_dict,
)
from common.config import load_config, save_config
from common.export import PART_NAMES, find_checkpoint, main
from common.models import diffusers_pipeline

PROMPT = "A photo of the face of a doctor"


def randomize(comps, seed):
    """Train-like, non-zero values for every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(comps).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return trainable_state_dict(comps)


def images(pipe, prompt=PROMPT):
    """Images [1, 3, 64, 64] in [0, 1] from diffusers' own pipeline, 2 steps, fixed latents."""
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    return pipe(prompt, num_inference_steps=2, latents=latents, height=64, width=64, output_type="pt").images


def te_out(comps, prompt):
    ids = comps.tokenizer([prompt], return_tensors="pt").input_ids
    with torch.no_grad():
        return comps.text_encoder(ids).last_hidden_state


def unet_out(comps):
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return comps.unet(x, 300, encoder_hidden_states=ctx).sample


def make_run(root, make_tiny, finetune: list[str]):
    """A run folder as common.train writes it: config.yaml, ckpts/checkpoint-2 and checkpoint_tmp-4 (the latest),
    each with trainable.safetensors and ema.safetensors, and a metrics.csv. Returns (run dir, comps, {name: sd})."""
    cfg = load_config(None, ["model.name=tiny", "model.dtype=fp32", *finetune])
    run = root / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    comps = make_tiny(seed=0)
    if cfg.finetune.prefix_tokens:
        add_prefix_tokens(comps, cfg.finetune.prefix_tokens, cfg.train.seed)
    else:
        add_lora(comps, cfg.finetune.text_encoder_lora, cfg.finetune.unet_lora, cfg.finetune.rank)
    sds = {}
    for i, (folder, kind) in enumerate([(f, k) for f in ("checkpoint-2", "checkpoint_tmp-4")
                                        for k in ("trainable", "ema")]):
        sds[f"{folder}/{kind}"] = sd = randomize(comps, seed=i)
        (run / "ckpts" / folder).mkdir(parents=True, exist_ok=True)
        save_file(sd, str(run / "ckpts" / folder / f"{kind}.safetensors"))
    (run / "metrics.csv").write_text("step,loss,bias_gender\n2,0.9,0.61\n4,0.7,0.43\n6,0.5,0.2\n")
    return run, comps, sds


@pytest.mark.parametrize("targets", [("text_encoder",), ("unet",), ("text_encoder", "unet")])
def test_lora_round_trip_through_diffusers(make_tiny, tmp_path, targets):
    """Oracle: diffusers' own StableDiffusionPipeline, once on our in-memory adapted components, once fresh from the
    same tiny base + `load_lora_weights(export dir)`; same latents. Tolerance 1e-6: the same fp32 ops in the same
    order, so any difference is a wrong weight, alpha or target."""
    finetune = [f"finetune.text_encoder_lora={'text_encoder' in targets}".lower(),
                f"finetune.unet_lora={'unet' in targets}".lower(), "finetune.rank=3"]
    run, comps, sds = make_run(tmp_path, make_tiny, finetune)
    out = tmp_path / "export"
    assert main(["--run", str(run), "--out", str(out)]) == 0
    load_trainable_state_dict(comps, sds["checkpoint_tmp-4/ema"])  # default: latest checkpoint, EMA weights
    want = images(diffusers_pipeline(comps))
    fresh = diffusers_pipeline(make_tiny(seed=0))
    fresh.load_lora_weights(str(out))
    got = images(fresh)
    assert (got - want).abs().max() < 1e-6
    base = make_tiny(seed=0)  # the adapter matters (cheap check on the parts it adapts)
    assert (te_out(comps, PROMPT) - te_out(base, PROMPT)).abs().max() > 1e-3 or "text_encoder" not in targets
    assert (unet_out(comps) - unet_out(base)).abs().max() > 1e-3 or "unet" not in targets
    card = (out / "README.md").read_text()
    assert "`tiny`" in card and "Training steps: 4" in card and "EMA" in card
    assert "| bias_gender | 0.43 |" in card and "| gender | female, male | 0.5, 0.5 |" in card
    for part in targets:
        assert f"LoRA on the {PART_NAMES[part]}: rank 3, alpha 3" in card


def test_export_step_no_ema_and_load_lora_into_components(make_tiny, tmp_path):
    """--step 2 --no-ema exports checkpoint-2's current weights; our load_lora (what generate uses) puts them into
    fresh Components: outputs equal the in-memory model loaded with the same state dict (1e-6, same fp32 ops)."""
    run, comps, sds = make_run(tmp_path, make_tiny, ["finetune.text_encoder_lora=true", "finetune.unet_lora=true",
                                                     "finetune.rank=2"])
    out = tmp_path / "export"
    main(["--run", str(run), "--step", "2", "--no-ema", "--out", str(out)])
    load_trainable_state_dict(comps, sds["checkpoint-2/trainable"])
    fresh = make_tiny(seed=0)
    info = load_lora(fresh, out)
    assert info["lora_tensors"] == {"text_encoder": 24, "unet": 64}
    assert (te_out(fresh, PROMPT) - te_out(comps, PROMPT)).abs().max() < 1e-6
    assert (unet_out(fresh) - unet_out(comps)).abs().max() < 1e-6
    lora = [p for n, p in fresh.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    base = make_tiny(seed=0)
    with adapters_disabled(fresh):
        assert torch.equal(unet_out(fresh), unet_out(base)) and torch.equal(te_out(fresh, PROMPT), te_out(base, PROMPT))
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:  # alpha travels as adapter metadata
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 2 and meta["text_encoder.r"] == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 3; available steps: \\[2, 4\\]"):
        main(["--run", str(run), "--step", "3", "--out", str(tmp_path / "x")])
    (run / "ckpts" / "checkpoint_tmp-4" / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema.safetensors: not found.*--no-ema"):
        main(["--run", str(run), "--out", str(tmp_path / "y")])


def test_prefix_round_trip_through_textual_inversion(make_tiny, tmp_path):
    """Oracle: diffusers' pipeline with `load_textual_inversion(exported files)` on a fresh base vs our in-memory
    prefix model; the prompt is the joined tokens followed by the prompt. Tolerance 1e-6 (identical fp32 rows)."""
    run, comps, sds = make_run(tmp_path, make_tiny, ["finetune.text_encoder_lora=false", "finetune.prefix_tokens=3"])
    out = tmp_path / "export"
    main(["--run", str(run), "--out", str(out)])
    load_trainable_state_dict(comps, sds["checkpoint_tmp-4/ema"])
    prompt = comps.prompt_prefix + PROMPT
    assert prompt.startswith("<common-token1><common-token2><common-token3>A photo")
    want = images(diffusers_pipeline(comps), prompt)
    fresh = diffusers_pipeline(make_tiny(seed=0))
    fresh.load_textual_inversion([str(out / f"learned_embeds-{i}.safetensors") for i in (1, 2, 3)])
    got = images(fresh, prompt)
    assert (got - want).abs().max() < 1e-6
    assert (te_out(comps, prompt)[:, 4:] - te_out(comps, PROMPT)[:, 1:]).abs().max() > 1e-3  # the prefix matters
    ours = make_tiny(seed=0)
    assert load_lora(ours, out)["prefix_tokens"] == ["<common-token1>", "<common-token2>", "<common-token3>"]
    assert ours.prompt_prefix == comps.prompt_prefix
    assert (te_out(ours, prompt) - te_out(comps, prompt)).abs().max() < 1e-6
    assert "load_textual_inversion" in (out / "README.md").read_text()


def test_from_released_cli_round_trip(make_tiny, tmp_path):
    """The converted files load into a fresh diffusers pipeline and give the images of the components that
    `load_released` patched in memory (whose semantics test_adapters checks against a hand-written reference)."""
    base = make_tiny(seed=0)
    g = torch.Generator().manual_seed(4)
    rel = tmp_path / "released"
    rel.mkdir()
    for name, model in (("text_encoder_lora_EMA.pth", base.text_encoder), ("unet_lora_EMA.pth", base.unet)):
        torch.save({k: torch.randn(s, generator=g) * 0.2 for k, s in released_layout(model, 2).items()}, rel / name)
    out = tmp_path / "export"
    main(["--from-released", str(rel), "--model", "tiny", "--out", str(out)])
    comps = make_tiny(seed=0)
    assert load_released([rel], comps)["rank"] == 2
    fresh = diffusers_pipeline(make_tiny(seed=0))
    fresh.load_lora_weights(str(out))
    assert (images(fresh) - images(diffusers_pipeline(comps))).abs().max() < 1e-6
    card = (out / "README.md").read_text()
    assert "released checkpoint" in card and "unet_lora_EMA.pth" in card
    torch.save({"module.x": torch.zeros(1)}, rel / "unet_lora_EMA.pth")
    with pytest.raises(CheckpointError, match="unet_lora_EMA.pth: key 'module.x'"):
        main(["--from-released", str(rel), "--model", "tiny", "--out", str(tmp_path / "z")])


def test_find_checkpoint_prefers_latest_then_permanent(tmp_path):
    for name in ("checkpoint-200", "checkpoint_tmp-200", "checkpoint_tmp-220", "checkpoint-200_exported"):
        (tmp_path / "ckpts" / name).mkdir(parents=True)
    assert find_checkpoint(tmp_path) == (tmp_path / "ckpts" / "checkpoint_tmp-220", 220)
    assert find_checkpoint(tmp_path, 200) == (tmp_path / "ckpts" / "checkpoint-200", 200)
    with pytest.raises(FileNotFoundError, match="no checkpoint-N or checkpoint_tmp-N"):
        find_checkpoint(tmp_path / "nothing")
