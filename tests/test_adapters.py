"""Adapters: peft LoRA (targets, init, dtypes), prefix tokens, strict trainable state dicts, EMA against hand-computed
values, and the strict import of the authors' released .pth files against a hand-written y = W x + up(down(x))."""

import random
import re
from fractions import Fraction

import pytest
import torch

from common.adapters import (
    EMA,
    CheckpointError,
    adapters_disabled,
    add_lora,
    add_prefix_tokens,
    load_released,
    load_trainable_state_dict,
    released_layout,
    trainable_parameters,
    trainable_state_dict,
)

IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407], [49406, 1929, 49407, 49407, 49407, 49407, 49407]])


def randomize(params, seed=1, std=0.1):
    """Train-like, non-zero values for every trainable tensor (B = 0 at init would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def te_out(comps, ids=IDS):
    with torch.no_grad():
        return comps.text_encoder(ids.to(comps.device)).last_hidden_state.float()


def unet_out(comps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, comps.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        return comps.unet(x.to(comps.dtype), 500, encoder_hidden_states=ctx.to(comps.dtype)).sample.float()


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------


def test_add_lora_targets_init_and_dtypes(make_tiny):
    """Brute-force oracle: every nn.Linear whose name ends in a target gets exactly one A/B pair; on an fp16 base the
    LoRA tensors are fp32, trainable, A ~ N(0, 1/r^2), B = 0 (so the model still equals the base), base frozen."""
    comps = make_tiny(seed=0, dtype=torch.float16)
    base = make_tiny(seed=0, dtype=torch.float16)
    ref_te, ref_unet = te_out(base), unet_out(base)
    r = 4
    add_lora(comps, text_encoder=True, unet=True, rank=r)
    params = trainable_parameters(comps)
    expect = set()
    for part, targets in (("text_encoder", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
                          ("unet", ("to_q", "to_k", "to_v", "to_out.0"))):
        for name, m in getattr(base, part).named_modules():
            if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in targets):
                expect |= {f"{part}.{name}.lora_A.weight", f"{part}.{name}.lora_B.weight"}
    assert set(params) == expect and list(params) == sorted(params)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    trainable = {id(p) for p in params.values()}
    for part in ("text_encoder", "unet", "vae"):
        for p in getattr(comps, part).parameters():
            assert p.requires_grad == (id(p) in trainable)
            if id(p) not in trainable:
                assert p.dtype == torch.float16
    a = torch.cat([p.flatten() for k, p in params.items() if ".lora_A." in k])
    assert abs(a.std().item() - 1 / r) < 0.05 * (1 / r)  # ~40k samples: std error of the std ~0.4 %
    assert all(p.abs().max() == 0 for k, p in params.items() if ".lora_B." in k)
    assert torch.equal(te_out(comps), ref_te) and torch.equal(unet_out(comps), ref_unet)
    # gradients reach the fp32 LoRA tensors through the fp16 base
    randomize(params)
    out = comps.text_encoder(IDS).last_hidden_state
    out.float().square().mean().backward()
    assert all(params[k].grad is not None and params[k].grad.abs().sum() > 0 for k in params if "text_encoder" in k)


def test_adapters_disabled_is_the_original_model(make_tiny):
    comps, base = make_tiny(seed=0), make_tiny(seed=0)
    add_lora(comps, True, True, 3)
    add_prefix_tokens(comps, 2, seed=0)
    randomize(trainable_parameters(comps))
    ids = comps.tokenizer([comps.prompt_prefix + "a photo"], return_tensors="pt").input_ids
    adapted = (te_out(comps), unet_out(comps), te_out(comps, ids))
    assert not torch.allclose(adapted[0], te_out(base)) and not torch.allclose(adapted[1], unet_out(base))
    with adapters_disabled(comps):
        assert comps.prompt_prefix == ""
        assert torch.equal(te_out(comps), te_out(base)) and torch.equal(unet_out(comps), unet_out(base))
        with adapters_disabled(comps):  # nesting keeps them off
            assert torch.equal(unet_out(comps), unet_out(base))
        assert torch.equal(unet_out(comps), unet_out(base))
    assert comps.prompt_prefix == "<common-token1><common-token2>"
    assert torch.equal(te_out(comps), adapted[0]) and torch.equal(unet_out(comps), adapted[1])
    assert torch.equal(te_out(comps, ids), adapted[2])


def test_trainable_state_dict_round_trip_and_strict_errors(make_tiny):
    a, b = make_tiny(seed=0), make_tiny(seed=0)
    for c in (a, b):
        add_lora(c, True, True, 2)
    randomize(trainable_parameters(a))
    sd = trainable_state_dict(a)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in sd.values())
    load_trainable_state_dict(b, sd)
    assert torch.equal(te_out(a), te_out(b)) and torch.equal(unet_out(a), unet_out(b))
    key = next(iter(sd))
    with pytest.raises(CheckpointError, match=re.escape(f"missing key '{key}'")):
        load_trainable_state_dict(b, {k: v for k, v in sd.items() if k != key}, source="ckpt.safetensors")
    with pytest.raises(CheckpointError, match="ckpt.safetensors: unexpected key 'unet.extra'"):
        load_trainable_state_dict(b, {**sd, "unet.extra": sd[key]}, source="ckpt.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"key '{key}' has shape")):
        load_trainable_state_dict(b, {**sd, key: torch.zeros(3, 3)})


# ----------------------------------------------------------------------------------------------------------------
# Prefix tokens
# ----------------------------------------------------------------------------------------------------------------


def test_prefix_tokens_init_splice_and_gradient(make_tiny):
    """Oracle: the same tokens written as rows of a resized embedding table of a fresh model (textual inversion);
    the initial rows are copies of rows drawn with Python's random.Random(seed)."""
    comps, ref = make_tiny(seed=0), make_tiny(seed=0)
    table = ref.text_encoder.get_input_embeddings().weight.detach().clone()
    tokens = add_prefix_tokens(comps, 3, seed=7)
    assert tokens == ["<common-token1>", "<common-token2>", "<common-token3>"]
    assert comps.prompt_prefix == "<common-token1><common-token2><common-token3>"
    ids = comps.tokenizer.convert_tokens_to_ids(tokens)
    assert ids == [49408, 49409, 49410]
    rng = random.Random(7)
    src = [rng.randrange(49408) for _ in range(3)]
    params = trainable_parameters(comps)
    assert list(params) == ["prefix.embeddings"]
    emb = params["prefix.embeddings"]
    assert emb.shape == (3, 32) and emb.dtype == torch.float32 and emb.requires_grad
    assert torch.equal(emb.detach(), table[src])
    assert not any(p.requires_grad for p in comps.text_encoder.parameters())

    randomize(params, seed=3, std=0.5)
    prompt = comps.tokenizer([comps.prompt_prefix + "A photo of a cat"], return_tensors="pt").input_ids
    assert prompt[0, 1:4].tolist() == ids and prompt[0, 4:].tolist() == [320, 1125, 539, 320, 2368, 49407]
    ref.tokenizer.add_tokens(tokens)
    ref.text_encoder.resize_token_embeddings(len(ref.tokenizer), mean_resizing=False)
    with torch.no_grad():
        ref.text_encoder.get_input_embeddings().weight[ids] = emb.detach()
    assert torch.equal(te_out(comps, prompt), te_out(ref, prompt))

    out = comps.text_encoder(prompt).last_hidden_state
    out.square().mean().backward()
    assert emb.grad is not None and (emb.grad.abs().sum(1) > 0).all()
    with pytest.raises(ValueError, match="already have prefix tokens"):
        add_prefix_tokens(comps, 3, seed=7)


# ----------------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------------


def test_ema_matches_hand_computed_values():
    """Hand derivation (s = update index - 1, d = 0 for s = 0, else min((1+s)/(10+s), 0.996)), params 1, 2, 4, 8, 16:
    u1 copy -> 1; u2 d=2/11: 1 + 9/11 (2-1) = 20/11; u3 d=1/4: 20/11 + 3/4 (4 - 20/11) = 38/11;
    u4 d=4/13: 38/11 + 9/13 (8 - 38/11) = 944/143; u5 d=5/14: 944/143 + 9/14 (16 - 944/143) = 1808/143."""
    p = torch.nn.Parameter(torch.tensor([0.0, -3.0]))
    ema = EMA({"w": p}, decay=0.996)
    expected = [Fraction(1), Fraction(20, 11), Fraction(38, 11), Fraction(944, 143), Fraction(1808, 143)]
    decays = [0, Fraction(2, 11), Fraction(1, 4), Fraction(4, 13), Fraction(5, 14)]
    for k, (v, d) in enumerate(zip(expected, decays)):
        with torch.no_grad():
            p.fill_(2.0**k)
        assert ema.step() == pytest.approx(float(d), abs=1e-15)
        assert torch.allclose(ema.shadow["w"], torch.full((2,), float(v)), rtol=1e-6, atol=0)  # fp32 arithmetic

    # Closed form: with the parameter at 0 the shadow decays to 0 exactly... (0 - (1-d)(0 - 0) = 0); a jump to 1 at
    # update n then gives shadow = 1 - d_n. d_2001 = (1+2000)/(10+2000); d_3000 = min(3000/3009, 0.996) = 0.996.
    ema = EMA({"w": p})
    with torch.no_grad():
        p.fill_(0.0)
    for n in range(1, 3001):
        if n in (2001, 3000):
            with torch.no_grad():
                p.fill_(1.0)
        d = ema.step()
        if n == 2001:
            assert d == pytest.approx(2001 / 2010) and ema.shadow["w"][0].item() == pytest.approx(9 / 2010, rel=1e-5)
            with torch.no_grad():
                p.fill_(0.0)
                ema.shadow["w"].zero_()
    assert d == 0.996 and ema.optimization_step == 3000
    assert ema.shadow["w"][0].item() == pytest.approx(0.004, rel=1e-5)


def test_ema_swap_and_state_dict():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA({"w": p})
    ema.step()
    with torch.no_grad():
        p.fill_(5.0)
    ema.step()  # d = 2/11: shadow = [1, 2] + 9/11 ([5, 5] - [1, 2])
    want = torch.tensor([1 + 9 / 11 * 4, 2 + 9 / 11 * 3])
    with ema.swapped():
        assert torch.allclose(p.detach(), want)
    assert torch.equal(p.detach(), torch.tensor([5.0, 5.0]))
    other = EMA({"w": torch.nn.Parameter(torch.zeros(2))})
    other.load_state_dict(ema.state_dict())
    assert other.optimization_step == 2 and torch.allclose(other.shadow["w"], want)
    with pytest.raises(CheckpointError, match="unexpected key 'v'"):
        other.load_state_dict({"decay": 0.996, "optimization_step": 1, "shadow": {"w": want, "v": want}})


# ----------------------------------------------------------------------------------------------------------------
# The authors' released files
# ----------------------------------------------------------------------------------------------------------------



def released_te_keys(hidden=32, mlp=64, layers=2):
    """Keys and shapes written out by hand from docs/method.md#released-checkpoint-format, for the tiny CLIP
    (rank r -> callable)."""
    out = {}
    for i in range(layers):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            stem = f"text_model.encoder.layers.{i}.self_attn.{p}.lora_linear_layer"
            out[f"{stem}.down.weight"] = lambda r: (r, hidden)
            out[f"{stem}.up.weight"] = lambda r: (hidden, r)
    for i in range(layers):
        for p, (fin, fout) in (("fc1", (hidden, mlp)), ("fc2", (mlp, hidden))):
            stem = f"text_model.encoder.layers.{i}.mlp.{p}.lora_linear_layer"
            out[f"{stem}.down.weight"] = lambda r, fin=fin: (r, fin)
            out[f"{stem}.up.weight"] = lambda r, fout=fout: (fout, r)
    return out


def released_unet_keys(unet):
    """Keys as the authors' AttnProcsLayers wrote them: one entry per diffusers attention processor."""
    out = {}
    for proc in unet.attn_processors:  # "....attn1.processor"
        attn = unet.get_submodule(proc.removesuffix(".processor"))
        for rel, lin in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            out[f"{proc}.{rel}_lora.down.weight"] = lambda r, i=lin.in_features: (r, i)
            out[f"{proc}.{rel}_lora.up.weight"] = lambda r, o=lin.out_features: (o, r)
    return out


def random_released(keys, rank, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape(rank), generator=g) * std for k, shape in keys.items()}


def reference_module(key):
    """Released key -> (module path in our transformers-5 / diffusers model, "down" | "up"), per
    docs/method.md#released-checkpoint-format."""
    m = re.fullmatch(r"text_model\.(.+)\.lora_linear_layer\.(down|up)\.weight", key)
    if m:
        return m.group(1), m.group(2)
    m = re.fullmatch(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight", key)
    proj = m.group(2) if m.group(2) != "to_out" else "to_out.0"
    return f"{m.group(1)}.{proj}", m.group(3)


def patch_reference(model, sd):
    """Hand-written LoRA semantics on a plain copy: every target Linear computes x W^T + b + (x D^T) U^T."""
    pairs = {}
    for k, v in sd.items():
        path, which = reference_module(k)
        pairs.setdefault(path, {})[which] = v
    for path, du in pairs.items():
        lin = model.get_submodule(path)

        def forward(x, W=lin.weight, b=lin.bias, D=du["down"], U=du["up"]):
            y = x @ W.T + (x @ D.T) @ U.T
            return y + b if b is not None else y

        lin.forward = forward
    return len(pairs)


def save_released(folder, name, sd):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / name)
    return folder / name


def test_released_lora_equals_hand_written_reference(make_tiny, tmp_path):
    """Tolerance 1e-5: peft's LoRA branch and the explicit matmuls differ only in fp32 summation order."""
    comps, ref = make_tiny(seed=0), make_tiny(seed=0)
    rank = 3
    te_sd = random_released(released_te_keys(), rank, seed=1)
    unet_sd = random_released(released_unet_keys(ref.unet), rank, seed=2)
    assert set(te_sd) == set(released_layout(ref.text_encoder, rank))
    assert {k: tuple(v.shape) for k, v in unet_sd.items()} == released_layout(ref.unet, rank)
    save_released(tmp_path / "rel", "text_encoder_lora_EMA.pth", te_sd)
    save_released(tmp_path / "rel", "unet_lora_EMA.pth", unet_sd)
    save_released(tmp_path / "rel", "unet_lora.pth", {})  # the non-EMA file is ignored when the EMA one exists
    info = load_released([tmp_path / "rel"], comps)
    assert info["rank"] == rank and info["tensors"] == {"text_encoder": 24, "unet": 64}
    assert info["files"]["unet"].endswith("unet_lora_EMA.pth")
    assert patch_reference(ref.text_encoder, te_sd) == 12 and patch_reference(ref.unet, unet_sd) == 32
    ours, want = te_out(comps), te_out(ref)
    assert (ours - want).abs().max() < 1e-5 and (want - te_out(make_tiny(seed=0))).abs().max() > 1e-2
    ours, want = unet_out(comps), unet_out(ref)
    assert (ours - want).abs().max() < 1e-5 and (want - unet_out(make_tiny(seed=0))).abs().max() > 1e-2
    cfg = comps.unet.peft_config["default"]
    assert cfg.r == rank and cfg.lora_alpha == rank


def test_released_prefix_equals_hand_written_reference(make_tiny, tmp_path):
    comps, ref = make_tiny(seed=0), make_tiny(seed=0)
    pos = ref.text_encoder.embeddings.position_embedding.weight.detach().clone()
    tok = torch.randn(6, 32)
    tok[0] = 0
    sd = {"position_ids": torch.arange(77)[None], "position_embedding.weight": pos, "token_embedding.weight": tok}
    f = save_released(tmp_path, "prefix_embedding_EMA.pth", sd)
    info = load_released([f], comps)
    assert info["prefix_tokens"] == [f"<common-token{i}>" for i in range(1, 6)] and info["rank"] is None
    ids = comps.tokenizer([comps.prompt_prefix + "a photo of a nurse"], return_tensors="pt").input_ids
    table = ref.text_encoder.get_input_embeddings().weight.detach().clone()

    def token_embedding(x):  # row id - 49408 + 1 of the file for the 5 new ids, the base table otherwise
        return torch.stack([torch.stack([tok[i - 49407] if i >= 49408 else table[i] for i in row.tolist()])
                            for row in x])

    ref.text_encoder.get_input_embeddings().forward = token_embedding
    assert (te_out(comps, ids) - te_out(ref, ids)).abs().max() < 1e-6


def test_sd15_released_layout_counts_on_meta_device():
    """The released format (docs/method.md): 144 text-encoder and 256 U-Net tensors for SD 1.5, with the documented
    order and shapes; the models are built on the meta device (no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77))
        unet = UNet2DConditionModel(cross_attention_dim=768)  # the other defaults are SD 1.5's
    lt, lu = released_layout(te, 50), released_layout(unet, 50)
    assert len(lt) == 144 and len(lu) == 256
    assert lt == {k: s(50) for k, s in released_te_keys(768, 3072, 12).items()}
    keys = list(lt)
    assert [k.split(".")[5] + "." + k.split(".")[-2] for k in keys[:8]] == [
        "q_proj.down", "q_proj.up", "k_proj.down", "k_proj.up", "v_proj.down", "v_proj.up", "out_proj.down", "out_proj.up"]
    assert keys[96] == "text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight"
    assert lt["text_model.encoder.layers.3.mlp.fc2.lora_linear_layer.down.weight"] == (50, 3072)
    assert lt["text_model.encoder.layers.3.mlp.fc1.lora_linear_layer.up.weight"] == (3072, 50)
    procs = list(dict.fromkeys(k.split(".processor")[0] for k in lu))
    assert len(procs) == 32
    blocks = list(dict.fromkeys(p.split(".attentions")[0] for p in procs))
    assert blocks == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2", "up_blocks.3",
                      "mid_block"]
    h = {"down_blocks.0": 320, "down_blocks.1": 640, "down_blocks.2": 1280, "mid_block": 1280, "up_blocks.1": 1280,
         "up_blocks.2": 640, "up_blocks.3": 320}
    for p in procs:
        hs = h[p.split(".attentions")[0]]
        c = hs if p.endswith("attn1") else 768
        assert lu[f"{p}.processor.to_q_lora.down.weight"] == (50, hs)
        assert lu[f"{p}.processor.to_k_lora.down.weight"] == (50, c)
        assert lu[f"{p}.processor.to_v_lora.down.weight"] == (50, c)
        assert lu[f"{p}.processor.to_out_lora.up.weight"] == (hs, 50)


def _mutations():
    k0 = "text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"
    k1 = "text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.up.weight"

    def rename(sd, old, new):
        return {new if k == old else k: v for k, v in sd.items()}

    return {
        "module-prefix": (lambda sd: {f"module.{k}": v for k, v in sd.items()}, f"key 'module.{k0}'.*'module.' prefix"),
        "layers-index": (lambda sd: rename(sd, k0, "layers.0.to_q_lora.down.weight"),
                         "key 'layers.0.to_q_lora.down.weight' is an unrenamed AttnProcsLayers index"),
        "unknown-key": (lambda sd: {**sd, "text_model.encoder.layers.0.self_attn.q_proj.lora.alpha": torch.ones(1)},
                        "unknown key 'text_model.encoder.layers.0.self_attn.q_proj.lora.alpha'"),
        "missing-key": (lambda sd: {k: v for k, v in sd.items() if k != k1}, f"missing key '{k1}'"),
        "mixed-ranks": (lambda sd: {**sd, k1: torch.zeros(32, 5)}, f"key '{k1}' has rank 5.*mixed ranks"),
        "wrong-shape": (lambda sd: {**sd, k0: torch.zeros(3, 48)}, re.escape(f"key '{k0}' has shape [3, 48], "
                                                                             "expected [3, 32]")),
        "not-a-tensor": (lambda sd: {**sd, k0: [1, 2]}, "cannot be read|holds a list"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_released_malformed_inputs_fail_naming_file_and_key(make_tiny, tmp_path, case):
    mutate, pattern = _mutations()[case]
    sd = mutate(random_released(released_te_keys(), 3))
    f = save_released(tmp_path, "text_encoder_lora_EMA.pth", sd)
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + ".*" + f"({pattern})"):
        load_released([tmp_path], make_tiny(seed=0))


def test_released_truncated_and_wrong_files(make_tiny, tmp_path):
    comps = make_tiny(seed=0)
    f = save_released(tmp_path / "a", "unet_lora_EMA.pth", random_released(released_unet_keys(comps.unet), 2))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + ": cannot be read.*truncated"):
        load_released([f], comps)
    bad = save_released(tmp_path / "b", "weights.pth", {})
    with pytest.raises(CheckpointError, match="weights.pth: not a released checkpoint file name"):
        load_released([bad], comps)
    with pytest.raises(FileNotFoundError, match="none of the released checkpoint files"):
        load_released([tmp_path / "b"], comps)
    te = save_released(tmp_path / "c", "text_encoder_lora.pth", random_released(released_te_keys(), 2))
    with pytest.raises(CheckpointError, match="two text_encoder files"):
        load_released([te, tmp_path / "c"], comps)
    pos = comps.text_encoder.embeddings.position_embedding.weight.detach()
    sd = {"position_ids": torch.arange(77)[None], "position_embedding.weight": pos + 1, "token_embedding.weight":
          torch.zeros(3, 32)}
    p = save_released(tmp_path / "d", "prefix_embedding.pth", sd)
    with pytest.raises(CheckpointError, match="prefix_embedding.pth: key 'position_embedding.weight' differs"):
        load_released([p], comps)
    # unmodified components after failures: a valid load still works and reports the rank
    assert load_released([tmp_path / "c"], comps, ema=False)["rank"] == 2
