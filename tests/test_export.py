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


# ----------------------------------------------------------------------------------------------------------------
# --from-released from the .pth files alone (no base model)
# ----------------------------------------------------------------------------------------------------------------


def write_released_files(folder, base, ranks, prefix=0, seed=4):
    """The authors' files fabricated from a tiny base: LoRA tensors laid out by `released_layout` (whose keys and
    shapes test_adapters checks against hand-written tables), one rank per file; a prefix file with `prefix`
    tokens (row 0 zeros, the base's own position table)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part, rank in ranks.items():
        layout = released_layout(getattr(base, part), rank)
        torch.save({k: torch.randn(s, generator=g) * 0.2 for k, s in layout.items()}, folder / f"{part}_lora_EMA.pth")
    if prefix:
        tok = torch.randn(prefix + 1, 32, generator=g)
        tok[0] = 0
        pos = base.text_encoder.embeddings.position_embedding.weight.detach().clone()
        torch.save({"position_ids": torch.arange(pos.shape[0])[None], "position_embedding.weight": pos,
                    "token_embedding.weight": tok}, folder / "prefix_embedding_EMA.pth")
    return folder


def safetensors_parts(path):
    """(header as a JSON object, tensor bytes) of a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def assert_same_files(a, b, skip=()):
    """Every file of folder `a` is in `b` with the same bytes; for a .safetensors file the tensor bytes are compared
    byte for byte and the header as a JSON object (safetensors writes its two metadata entries in a random order on
    every save, so even one conversion run twice differs in that order)."""
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir())
    for name in names:
        if name in skip:
            continue
        if name.endswith(".safetensors"):
            assert safetensors_parts(a / name) == safetensors_parts(b / name), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("ranks,prefix", [({"text_encoder": 2, "unet": 3}, 3), ({"text_encoder": 2}, 0)],
                         ids=["te2-unet3-prefix3", "te2"])
def test_from_released_without_model_reproduces_the_with_base_conversion(make_tiny, tmp_path, ranks, prefix):
    """Oracle: the conversion through the base model, as `export --from-released` did before: `load_released` into the
    tiny base (module names from the model's own modules, tensors from peft's state dict) + `save_lora` + the model
    card, given the metadata the no-base run recorded. Every file is equal byte for byte (safetensors headers as JSON
    objects, see `assert_same_files`). Recorded when no base is given: base_model = SD 1.5 (the released checkpoints'
    base), shapes_checked_against = null, and in the LoRA file's adapter metadata text_encoder.base_model_name_or_path
    = "" (what transformers records for a model without a checkpoint name, as the config-built tiny base has). A run
    with `--model tiny` writes the same weight files; its adapter_info.json differs only in those two metadata fields."""
    from common.adapters import save_lora
    from common.export import model_card
    from common.models import SD15

    rel = write_released_files(tmp_path / "rel", make_tiny(seed=0), ranks, prefix)
    no_base, oracle, with_base = tmp_path / "no-base", tmp_path / "oracle", tmp_path / "with-base"
    assert main(["--from-released", str(rel), "--out", str(no_base)]) == 0
    info = json.loads((no_base / "adapter_info.json").read_text())
    meta = info["metadata"]
    assert meta["base_model"] == SD15 and meta["shapes_checked_against"] is None
    assert meta["released"]["ranks"] == ranks and meta["released"]["prefix_tokens"] == [
        f"<common-token{i}>" for i in range(1, prefix + 1)]
    assert {p: info[p]["rank"] for p in ranks} == ranks
    comps = make_tiny(seed=0)
    load_released([rel], comps)
    save_lora(comps, oracle, meta)
    model_card(oracle, meta)
    assert_same_files(no_base, oracle)
    assert main(["--from-released", str(rel), "--model", "tiny", "--out", str(with_base)]) == 0
    assert_same_files(no_base, with_base, skip=("adapter_info.json", "README.md"))
    checked = json.loads((with_base / "adapter_info.json").read_text())
    assert checked["metadata"]["base_model"] == checked["metadata"]["shapes_checked_against"] == "tiny"
    checked["metadata"].update(base_model=SD15, shapes_checked_against=None)
    assert checked == info


def test_from_released_without_model_loads_in_diffusers(make_tiny, tmp_path):
    """Oracle: the project's own loader (`load_released`, checked against a hand-written y = W x + up(down(x)) in
    test_adapters) on the tiny base vs a fresh diffusers pipeline given only the no-base export
    (`load_lora_weights` + `load_textual_inversion`); same latents, prefixed prompt. Tolerance 1e-6: the same fp32
    weights and ops, so any difference is a wrong name, rank, alpha or row. Different ranks per file (2 and 3)."""
    rel = write_released_files(tmp_path / "rel", make_tiny(seed=0), {"text_encoder": 2, "unet": 3}, prefix=3)
    out = tmp_path / "export"
    main(["--from-released", str(rel), "--out", str(out)])
    comps = make_tiny(seed=0)
    assert load_released([rel], comps)["ranks"] == {"text_encoder": 2, "unet": 3}
    prompt = comps.prompt_prefix + PROMPT
    want = images(diffusers_pipeline(comps), prompt)
    fresh = diffusers_pipeline(make_tiny(seed=0))
    fresh.load_lora_weights(str(out))
    fresh.load_textual_inversion([str(out / f"learned_embeds-{i}.safetensors") for i in (1, 2, 3)])
    assert (images(fresh, prompt) - want).abs().max() < 1e-6
    assert (images(diffusers_pipeline(make_tiny(seed=0)), PROMPT) - want).abs().max() > 1e-3  # the adapters matter
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["text_encoder.r"], meta["text_encoder.lora_alpha"], meta["unet.r"], meta["unet.lora_alpha"]) == (2, 2, 3, 3)


def run_cli(argv, capsys):
    """`python -m common.export ARGV` through `common.runtime.cli`: (exit code, stderr)."""
    from common.runtime import cli

    capsys.readouterr()  # drop what the test printed before (library notices while building the fixtures)
    with pytest.raises(SystemExit) as e:
        cli(main, argv)
    return e.value.code, capsys.readouterr().err


def test_from_released_model_shape_mismatch_is_one_sentence(make_tiny, tmp_path, capsys):
    """Files of a wider model (text width 48) convert without --model (they agree with each other); `--model tiny`
    (width 32) stops with one sentence naming the file, the key, both shapes and the model, exit 2, nothing written."""
    rel = write_released_files(tmp_path / "rel", make_tiny(seed=0, text_dim=48), {"text_encoder": 2})
    assert main(["--from-released", str(rel), "--out", str(tmp_path / "ok")]) == 0
    code, err = run_cli(["--from-released", str(rel), "--model", "tiny", "--out", str(tmp_path / "x")], capsys)
    key = "text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"
    assert code == 2
    assert err == f"error: {rel / 'text_encoder_lora_EMA.pth'}: key '{key}' has shape [2, 48] but model 'tiny' needs " \
                  "[2, 32] at rank 2\n"
    assert not (tmp_path / "x").exists()


TE0 = "text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"


def _bad_released(case, base):
    """(file name, content) of a bad released file, for `case`."""
    te = {k: torch.ones(s) for k, s in released_layout(base.text_encoder, 2).items()}
    return {
        "model-weights": ("text_encoder_lora_EMA.pth", {"encoder.layers.0.mlp.fc1.weight": torch.ones(64, 32)}),
        "misnamed": ("unet_lora_EMA.pth", te),
        "no-tensors": ("unet_lora_EMA.pth", {}),
        "rank-inside-file": ("text_encoder_lora_EMA.pth", {**te, f"{TE0}.up.weight": torch.ones(32, 3)}),
        "incomplete": ("text_encoder_lora_EMA.pth", {k: v for k, v in te.items() if k != f"{TE0}.up.weight"}),
    }[case]


BAD_INPUT = [
    ("empty-folder", ": none of the released checkpoint files (text_encoder_lora_EMA.pth, text_encoder_lora.pth, "
                     "unet_lora_EMA.pth, unet_lora.pth, prefix_embedding_EMA.pth, prefix_embedding.pth) is here"),
    ("model-weights", "text_encoder_lora_EMA.pth: unknown key 'encoder.layers.0.mlp.fc1.weight'; a released "
                      "text-encoder LoRA file holds only keys 'text_model.encoder.layers.{i}.{self_attn.q_proj|"
                      "self_attn.k_proj|self_attn.v_proj|self_attn.out_proj|mlp.fc1|mlp.fc2}.lora_linear_layer."
                      "{down|up}.weight'"),
    ("misnamed", f"unet_lora_EMA.pth: unknown key '{TE0}.down.weight' (a key of the text-encoder LoRA file: is this "
                 "file misnamed?); a released U-Net LoRA file holds only keys '{down_blocks.N|mid_block|up_blocks.N}."),
    ("no-tensors", "unet_lora_EMA.pth: holds no tensors; expected the released U-Net LoRA keys '{down_blocks.N|"),
    ("rank-inside-file", f"text_encoder_lora_EMA.pth: key '{TE0}.up.weight' has rank 3 (shape [32, 3]) but 23 of the "
                         "file's 24 tensors have rank 2; mixed ranks in one file cannot be converted"),
    ("incomplete", f"text_encoder_lora_EMA.pth: missing key '{TE0}.up.weight' (1 of the 24 keys that the layers in "
                   "this file need are missing)"),
]


@pytest.mark.parametrize("case,expect", BAD_INPUT, ids=[c for c, _ in BAD_INPUT])
def test_from_released_bad_input_is_one_sentence(make_tiny, tmp_path, capsys, case, expect):
    """Without --model, through the CLI: one line `error: <file>: ...` naming the file and what was expected, exit 2,
    nothing written. Expected sentences written out by hand."""
    rel = tmp_path / "rel"
    rel.mkdir()
    if case != "empty-folder":
        name, sd = _bad_released(case, make_tiny(seed=0))
        torch.save(sd, rel / name)
    code, err = run_cli(["--from-released", str(rel), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and err.startswith(f"error: {rel}") and err.count("\n") == 1, err
    assert expect in err, err
    assert not (tmp_path / "x").exists()


def test_from_released_sd15_shapes_name_the_real_modules(tmp_path):
    """At SD 1.5 size (rank 1, models built on the meta device, no weights): every tensor the no-base export writes
    names a Linear of the real CLIP text model / U-Net (`text_encoder.` / `unet.` + module + `.lora_A|B.weight`)
    with shape [1, in] / [out, 1], and every adapted Linear is covered: 144 + 256 tensors
    (docs/method.md#released-checkpoint-format)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = {"text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                               num_hidden_layers=12, num_attention_heads=12,
                                                               max_position_embeddings=77)),
                  "unet": UNet2DConditionModel(cross_attention_dim=768)}
    rel = tmp_path / "rel"
    rel.mkdir()
    for part, model in models.items():
        torch.save({k: torch.zeros(s) for k, s in released_layout(model, 1).items()}, rel / f"{part}_lora_EMA.pth")
    main(["--from-released", str(rel), "--out", str(tmp_path / "out")])
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert sum(k.startswith("text_encoder.") for k in shapes) == 144 and sum(k.startswith("unet.") for k in shapes) == 256
    covered = set()
    for key, shape in shapes.items():
        part, rest = key.split(".", 1)
        module, which = rest.rsplit(".", 2)[:2]
        lin = models[part].get_submodule(module)
        assert isinstance(lin, torch.nn.Linear), key
        assert shape == ((1, lin.in_features) if which == "lora_A" else (lin.out_features, 1)), key
        covered.add((part, module))
    targets = {"text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
               "unet": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                        "attn2.to_v", "attn2.to_out.0")}
    want = {(p, n) for p, m in models.items() for n, x in m.named_modules()
            if isinstance(x, torch.nn.Linear) and n.endswith(targets[p])}
    assert covered == want
