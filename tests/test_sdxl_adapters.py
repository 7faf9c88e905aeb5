"""SDXL adapters (issue #23, item 4): LoRA on the U-Net and on either or both text encoders, prefix tokens with a row
in each encoder, their export through diffusers' SDXL loaders, and SDXL / SD 1.x mix-ups refused in one sentence.

Oracles: diffusers' own StableDiffusionXLPipeline given only the exported files (`load_lora_weights`; the embeddings
through `load_textual_inversion` once per encoder, as diffusers documents for SDXL) against the project's in-memory
adapted components run through the same code, so 1e-6 holds (identical fp32 ops: any difference is a wrong weight,
alpha, layer or row); autograd for which layers can receive a gradient; the models' own module lists for what gets
adapted; hand-computed EMA values; error sentences written out by hand.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common import adapters as ad
from common.config import ConfigError, load_config, save_config
from common.export import main as export_main
from common.models import diffusers_pipeline, load_components, tiny_components
from common.runtime import cli
from common.sampling import encode_prompts, sample

PROMPT = "A photo of the face of a doctor"
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")



def randomize(comps, seed):
    """Train-like, non-zero values for every trainable tensor; returns them (`trainable_state_dict`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.trainable_parameters(comps).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return ad.trainable_state_dict(comps)


def images(pipe, prompt=PROMPT):
    """[1, 3, 32, 32] in [0, 1] from diffusers' own pipeline: 2 steps, fixed latents."""
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(11))
    return pipe(prompt, num_inference_steps=2, latents=latents, height=32, width=32, output_type="pt").images


def project_images(comps, prompt=PROMPT):
    """The project's sampler (`components.prompt_prefix` in front), 2 steps, the latents of `images`."""
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return sample(comps, [prompt], noise, 2).images


def expected_modules(model, targets, layers=None):
    """Module names of `model` that LoRA should adapt, from its own module list: Linear layers ending in a target,
    in encoder layers `layers` when given."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(tuple(f".{t}" for t in targets)):
            if layers is None or any(f"layers.{i}." in name for i in layers):
                out.add(name)
    return out


def adapted(comps, part):
    """Module names of `part` that carry the project's LoRA, read from the trainable names."""
    keys = [k for k in ad.trainable_parameters(comps) if k.startswith(part + ".")]
    return {k.removeprefix(part + ".").rsplit(".", 2)[0] for k in keys}


# ----------------------------------------------------------------------------------------------------------------
# What is adapted
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", [[1, 2], [1], [2]])
def test_add_lora_selects_encoders_and_skips_the_unused_last_layer(selection):
    """`text_encoders` picks the encoders; text_encoder gets LoRA on every layer but its last (2 layers: layer 0
    only), text_encoder_2 on all, the U-Net on its attention projections. Autograd shows why: SDXL's conditioning
    (penultimate states, pooled output) has no gradient path to text_encoder's last layer, while every LoRA tensor
    added (lora_B made non-zero so lora_A gets gradient too) has one."""
    comps = load_components("tiny-sdxl")
    te, te2 = comps.text_encoder, comps.text_encoder_2
    want = {"text_encoder": expected_modules(te, TE_TARGETS, layers=[0]) if 1 in selection else set(),
            "text_encoder_2": expected_modules(te2, TE_TARGETS) if 2 in selection else set(),
            "unet": expected_modules(comps.unet, UNET_TARGETS)}
    last = te.get_submodule(sorted(expected_modules(te, ["fc2"], layers=[1]))[0]).weight
    ad.add_lora(comps, text_encoder=True, unet=True, rank=2, text_encoders=selection)
    assert {part: adapted(comps, part) for part in want} == want
    assert [len(want[p]) for p in ("text_encoder", "text_encoder_2")] == [6 * (1 in selection), 12 * (2 in selection)]
    randomize(comps, 0)
    params = {k: v for k, v in ad.trainable_parameters(comps).items() if k.startswith("text_encoder")}
    last.requires_grad_(True)
    cond = encode_prompts(comps, [PROMPT, "a cat"])
    loss = (cond.cond**2).sum() + (cond.pooled**3).sum()
    grads = torch.autograd.grad(loss, [last, *params.values()], allow_unused=True)
    last.requires_grad_(False)
    assert grads[0] is None  # text_encoder's last layer reaches nothing SDXL uses
    dead = [k for k, g in zip(params, grads[1:]) if g is None or g.abs().max() == 0]
    assert params and not dead, dead


def test_add_lora_on_sd1_keeps_its_single_encoder():
    """SD 1.x: the default selection [1, 2] adapts the one text encoder on every layer (as before SDXL); [2] alone
    names the model and stops."""
    comps = tiny_components(seed=0)
    want = expected_modules(comps.text_encoder, TE_TARGETS)
    ad.add_lora(comps, text_encoder=True, unet=False, rank=2)
    assert adapted(comps, "text_encoder") == want and len(want) == 12
    with pytest.raises(ValueError, match=r"text_encoders = \[2\] but the SD 1.x model 'tiny' has only text encoder 1"):
        ad.add_lora(tiny_components(seed=0), text_encoder=True, unet=False, rank=2, text_encoders=[2])


def test_state_dict_ema_and_disabled_cover_both_encoders():
    """Trainable names carry their encoder (`text_encoder_2.`, `prefix_2.embeddings`); the state dict round-trips
    strictly; EMA tracks every one (second update by hand: decay 2/11); `adapters_disabled` gives the base model's
    conditioning (oracle: fresh base components) and restores the adapted one on exit."""
    comps = load_components("tiny-sdxl")
    ad.add_lora(comps, text_encoder=True, unet=False, rank=2, text_encoders=[2])
    ad.add_prefix_tokens(comps, 2, seed=0)
    sd = randomize(comps, 1)
    assert sd["prefix.embeddings"].shape == (2, 32) and sd["prefix_2.embeddings"].shape == (2, 48)
    assert {k.split(".")[0] for k in sd} == {"text_encoder_2", "prefix", "prefix_2"}

    other = load_components("tiny-sdxl")
    ad.add_lora(other, text_encoder=True, unet=False, rank=2, text_encoders=[2])
    ad.add_prefix_tokens(other, 2, seed=0)
    ad.load_trainable_state_dict(other, sd)
    assert all(torch.equal(v, sd[k]) for k, v in ad.trainable_state_dict(other).items())
    with pytest.raises(ad.CheckpointError, match="missing key 'prefix_2.embeddings'"):
        ad.load_trainable_state_dict(other, {k: v for k, v in sd.items() if k != "prefix_2.embeddings"})

    params = ad.trainable_parameters(comps)
    ema = ad.EMA(params)
    ema.step()  # the first update copies
    key = next(k for k in params if k.startswith("text_encoder_2."))
    old = {k: params[k].detach().clone() for k in (key, "prefix_2.embeddings")}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    assert ema.step() == pytest.approx(2 / 11)
    for k, v in old.items():
        assert torch.allclose(ema.shadow[k], v + (1 - 2 / 11), atol=1e-6), k  # v - (1 - d)(v - (v + 1))

    base = load_components("tiny-sdxl")
    with torch.no_grad():
        want = encode_prompts(base, [PROMPT])
        adapted_cond = encode_prompts(comps, [PROMPT])
        with ad.adapters_disabled(comps):
            assert comps.prompt_prefix == ""
            off = encode_prompts(comps, [PROMPT])
        again = encode_prompts(comps, [PROMPT])
    assert (off.cond - want.cond).abs().max() < 1e-6 and (off.pooled - want.pooled).abs().max() < 1e-6
    assert adapted_cond.cond.shape[1] == want.cond.shape[1] + 2  # the two prefix tokens are back
    assert torch.equal(again.cond, adapted_cond.cond) and comps.prompt_prefix == "<common-token1><common-token2>"


# ----------------------------------------------------------------------------------------------------------------
# Export round trips through diffusers' SDXL loaders
# ----------------------------------------------------------------------------------------------------------------


def make_run(root, finetune):
    """A training run as common.train writes it, on tiny SDXL: config.yaml + ckpts/checkpoint-3/ema.safetensors.
    Returns (run dir, the in-memory components holding those weights, config)."""
    cfg = load_config(None, ["model.name=tiny-sdxl", "model.dtype=fp32", *finetune])
    run = root / "run"
    (run / "ckpts" / "checkpoint-3").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    comps = load_components("tiny-sdxl")
    ft = cfg.finetune
    if ft.prefix_tokens:
        ad.add_prefix_tokens(comps, ft.prefix_tokens, cfg.train.seed)
    else:
        ad.add_lora(comps, ft.text_encoder_lora, ft.unet_lora, ft.rank, text_encoders=ft.text_encoders)
    save_file(randomize(comps, 2), str(run / "ckpts" / "checkpoint-3" / "ema.safetensors"))
    return run, comps, cfg


LORA_CASES = {
    "te1": (["finetune.text_encoders=[1]"], {"text_encoder"}),
    "te2-unet": (["finetune.text_encoders=[2]", "finetune.unet_lora=true"], {"text_encoder_2", "unet"}),
    "both-unet": (["finetune.unet_lora=true"], {"text_encoder", "text_encoder_2", "unet"}),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_export_round_trips_through_sdxl_pipeline(tmp_path, case):
    """`export --run` of an SDXL run -> a fresh StableDiffusionXLPipeline + `load_lora_weights(DIR)` gives the images
    of the pipeline on the in-memory adapted components, and the project's sampler on the diffusers-loaded modules
    gives the project's own images (both < 1e-6, see the module docstring); so does the project's `load_lora` (what
    `generate --lora` uses). The file holds exactly the adapted parts with r = alpha = 3 in the adapter metadata,
    text_encoder's restricted to layer 0."""
    overrides, parts = LORA_CASES[case]
    run, comps, _ = make_run(tmp_path, ["finetune.rank=3", *overrides])
    out = tmp_path / "export"
    assert export_main(["--run", str(run), "--out", str(out)]) == 0
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert {k.split(".")[0] for k in keys} == parts
    for part in parts:
        assert (meta[f"{part}.r"], meta[f"{part}.lora_alpha"]) == (3, 3)
    if "text_encoder" in parts:
        assert meta["text_encoder.layers_to_transform"] == [0]
    info = json.loads((out / "adapter_info.json").read_text())
    assert info["model_type"] == "SDXL" and info["metadata"]["base_model"] == "tiny-sdxl"

    fresh = load_components("tiny-sdxl")
    pipe = diffusers_pipeline(fresh)
    pipe.load_lora_weights(str(out))
    want = images(diffusers_pipeline(comps))
    assert (images(pipe) - want).abs().max() < 1e-6
    ours = project_images(comps)
    assert (project_images(fresh) - ours).abs().max() < 1e-6
    loaded = load_components("tiny-sdxl")
    counts = ad.load_lora(loaded, out)["lora_tensors"]
    assert counts == {p: sum(k.startswith(p + ".") for k in keys) for p in ("text_encoder", "text_encoder_2", "unet")}
    assert (project_images(loaded) - ours).abs().max() < 1e-6
    assert (images(diffusers_pipeline(load_components("tiny-sdxl"))) - want).abs().max() > 1e-3  # the LoRA matters
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained(\"tiny-sdxl\")" in card
    assert ("LoRA on the text encoder: rank 3, alpha 3" in card) == ("text_encoder" in parts)
    assert ("in layer 0 (SDXL does not use the last layer) (12 tensors)" in card) == ("text_encoder" in parts)


def test_prefix_export_round_trips_through_sdxl_textual_inversion(tmp_path):
    """`export --run` of an SDXL prefix run writes one embeddings file, clip_l [n, 32] and clip_g [n, 48] (768 and
    1280 on the real model) holding the run's rows, tokens in its metadata. Loaded through diffusers as documented
    for SDXL (load_file, then `load_textual_inversion` into text_encoder / tokenizer and into text_encoder_2 /
    tokenizer_2), the fresh pipeline gives the in-memory model's images for the prefixed prompt, and the project's
    sampler on those modules gives the project's prefix'd images (< 1e-6); the project's own loader agrees too."""
    run, comps, _ = make_run(tmp_path, ["finetune.prefix_tokens=2", "finetune.text_encoder_lora=false"])
    out = tmp_path / "export"
    assert export_main(["--run", str(run), "--out", str(out)]) == 0
    f = out / "learned_embeds_sdxl.safetensors"
    emb = load_file(str(f))
    with safe_open(str(f), "pt") as fh:
        tokens = json.loads(fh.metadata()["tokens"])
    assert tokens == ["<common-token1>", "<common-token2>"] and comps.prompt_prefix == "".join(tokens)
    trained = ad.trainable_state_dict(comps)
    assert set(emb) == {"clip_l", "clip_g"}
    assert torch.equal(emb["clip_l"], trained["prefix.embeddings"]) and emb["clip_l"].shape == (2, 32)
    assert torch.equal(emb["clip_g"], trained["prefix_2.embeddings"]) and emb["clip_g"].shape == (2, 48)

    fresh = load_components("tiny-sdxl")
    pipe = diffusers_pipeline(fresh)
    pipe.load_textual_inversion(emb["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt = "".join(tokens) + PROMPT
    want = images(diffusers_pipeline(comps), prompt)
    assert (images(pipe, prompt) - want).abs().max() < 1e-6
    fresh.prompt_prefix = "".join(tokens)
    ours = project_images(comps)
    assert (project_images(fresh) - ours).abs().max() < 1e-6
    loaded = load_components("tiny-sdxl")
    assert ad.load_lora(loaded, out)["prefix_tokens"] == tokens
    assert (project_images(loaded) - ours).abs().max() < 1e-6
    assert (project_images(load_components("tiny-sdxl")) - ours).abs().max() > 1e-3  # the prefix matters
    card = (out / "README.md").read_text()
    assert 'pipe.load_textual_inversion(emb["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2' in card


# ----------------------------------------------------------------------------------------------------------------
# SDXL <-> SD 1.x mix-ups: one sentence naming both models
# ----------------------------------------------------------------------------------------------------------------


def _export(tmp_path, case):
    """(export path, the flag of common.generate that takes it, target model) for each mix-up."""
    d = tmp_path / case
    if case in ("sdxl-lora", "sdxl-lora-no-info"):
        c = load_components("tiny-sdxl")
        ad.add_lora(c, text_encoder=True, unet=True, rank=2)
        ad.save_lora(c, d, {"base_model": "tiny-sdxl"})
        if case == "sdxl-lora-no-info":
            (d / "adapter_info.json").unlink()
        return d, "--lora", "tiny"
    if case == "sdxl-prefix":
        c = load_components("tiny-sdxl")
        ad.add_prefix_tokens(c, 2, seed=0)
        ad.save_lora(c, d, {"base_model": "tiny-sdxl"})
        return d, "--prefix", "tiny"
    if case == "released":
        d.mkdir()
        layout = ad.released_layout(tiny_components(seed=0).text_encoder, 2)
        torch.save({k: torch.zeros(s) for k, s in layout.items()}, d / "text_encoder_lora_EMA.pth")
        return d, "--released", "tiny-sdxl"
    c = tiny_components(seed=0)
    if case == "sd-prefix":
        ad.add_prefix_tokens(c, 2, seed=0)
    else:  # sd-te-lora: SD 1.x's text encoder has the shape of SDXL's first, so only the metadata can tell
        ad.add_lora(c, text_encoder=case == "sd-te-lora", unet=case == "sd-unet-no-info", rank=2)
    ad.save_lora(c, d, {"base_model": "tiny"})
    if case == "sd-unet-no-info":
        (d / "adapter_info.json").unlink()
    return d, "--lora", "tiny-sdxl"


KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight"
MIXUPS = {
    "sdxl-lora": "{d}/pytorch_lora_weights.safetensors: this adapter was exported from the SDXL model 'tiny-sdxl' and "
                 "cannot be loaded into the SD 1.x model 'tiny'",
    "sdxl-prefix": "{d}/learned_embeds_sdxl.safetensors: this adapter was exported from the SDXL model 'tiny-sdxl' and "
                   "cannot be loaded into the SD 1.x model 'tiny'",
    "sd-te-lora": "{d}/pytorch_lora_weights.safetensors: this adapter was exported from the SD 1.x model 'tiny' and "
                  "cannot be loaded into the SDXL model 'tiny-sdxl'",
    "sd-prefix": "{d}/learned_embeds-1.safetensors: this adapter was exported from the SD 1.x model 'tiny' and cannot "
                 "be loaded into the SDXL model 'tiny-sdxl'",
    "released": "{d}: the authors' released checkpoints are SD 1.5 adapters and cannot be loaded into the SDXL model "
                "'tiny-sdxl'",
    "sdxl-lora-no-info": "{d}/pytorch_lora_weights.safetensors: this adapter was exported from an SDXL model and "
                         "cannot be loaded into the SD 1.x model 'tiny'",
    "sd-unet-no-info": "{d}/pytorch_lora_weights.safetensors: key '" + KEY + "' names no linear layer in the unet of "
                       "the SDXL model 'tiny-sdxl'; the file was made for another base model",
}


@pytest.mark.parametrize("case", list(MIXUPS))
def test_generate_refuses_the_other_model_family(tmp_path, capsys, case):
    """`python -m common.generate --model M --lora|--prefix|--released EXPORT` with an export of the other family:
    `error: <one sentence naming both models>`, exit 2, nothing written. Exports without adapter_info.json (not
    ours) are judged by their keys (text_encoder_2) and each key's module and shape in the target."""
    from common import generate as G

    d, flag, model = _export(tmp_path, case)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    out = tmp_path / "images"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(G.main, ["--model", model, flag, str(d), "--prompts", str(prompts), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {MIXUPS[case].format(d=d)}\n", err
    assert not out.exists()


def test_mixup_stops_before_loading_and_as_a_command(tmp_path):
    """The SDXL LoRA leaves SD 1.x components untouched (refused before diffusers' loader, which would fail half-way
    on the U-Net or, for a text-encoder LoRA, load silently); a real `python -m common.generate` prints the sentence."""
    from common.generate import load_adapters

    d, _, _ = _export(tmp_path, "sdxl-lora")
    comps = tiny_components(seed=0)
    with pytest.raises(ad.CheckpointError, match="exported from the SDXL model 'tiny-sdxl'"):
        load_adapters(comps, lora=str(d))
    assert not any("lora" in n for n, _ in comps.unet.named_modules())
    assert not any("lora" in n for n, _ in comps.text_encoder.named_modules())
    sd_te, _, _ = _export(tmp_path, "sd-te-lora")
    xl = load_components("tiny-sdxl")
    diffusers_pipeline(xl).load_lora_weights(str(sd_te))  # diffusers takes it: the shapes fit SDXL's text_encoder
    assert any("lora" in n for n, _ in xl.text_encoder.named_modules())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    r = subprocess.run([sys.executable, "-m", "common.generate", "--model", "tiny", "--lora", str(d), "--prompts",
                        str(prompts), "--out", str(tmp_path / "images"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {MIXUPS['sdxl-lora'].format(d=d)}"


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expect", [
    ("[3]", "finetune.text_encoders = [3]: expected [1], [2] or [1, 2] (SDXL's text_encoder and/or text_encoder_2)"),
    ("[]", "finetune.text_encoders = []: expected [1], [2] or [1, 2]"),
    ("[1, 1]", "finetune.text_encoders = [1, 1]: expected [1], [2] or [1, 2]"),
])
def test_config_text_encoders_is_validated(value, expect):
    assert load_config(None, ["finetune.text_encoders=[2]"]).finetune.text_encoders == [2]
    assert load_config(None).finetune.text_encoders == [1, 2]
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"finetune.text_encoders={value}"])
    assert expect in str(e.value)
    with pytest.raises(ConfigError, match=r"text_encoders = \[2\]: selects text encoders for LoRA but "
                                          "text_encoder_lora is false"):
        load_config(None, ["finetune.text_encoders=[2]", "finetune.text_encoder_lora=false", "finetune.unet_lora=true"])
