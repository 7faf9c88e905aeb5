"""Config loading: every shipped YAML loads; each error case names the file, the key path, the value and what is valid."""

from pathlib import Path

import pytest

from common.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in ROOT.glob("exp-*/configs/*.yaml") if not p.name.startswith("accelerate"))


def test_there_are_configs_for_every_experiment():
    exps = {p.parts[-3] for p in SHIPPED}
    assert exps == {f"exp-{i}-{n}" for i, n in [(1, "debias-gender"), (2, "debias-gender-token"),
                                               (3, "debias-gender-race"), (4, "debias-gender-race-age"),
                                               (5, "debias-gender-race-multi-concepts"), (6, "debias-race")]}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    specs = cfg.attribute_specs()
    assert all(abs(sum(a.target) - 1) < 1e-9 for a in specs)


def test_paper_values_of_exp4():
    cfg = load_config(ROOT / "exp-4-debias-gender-race-age/configs/debias-text-encoder.yaml")
    assert [a.name for a in cfg.attribute_specs()] == ["gender", "race", "age"]
    assert cfg.attribute_specs()[2].target == (0.75, 0.25)
    assert cfg.attributes["race"].factor1 == 0.6 and cfg.attributes["race"].factor2 == 0.3
    assert cfg.train.images_per_prompt == 40 and cfg.train.micro_batch == 4 and cfg.train.max_steps == 15000
    assert cfg.train.lr == 5e-5 and cfg.train.seed == 5991 and cfg.loss.w_face == 0.1
    assert cfg.finetune.text_encoder_lora and not cfg.finetune.unet_lora and cfg.finetune.rank == 50


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_extends_and_overrides(tmp_path):
    write(tmp_path, "train: {lr: 1.0e-4, max_steps: 7}\nmodel: {name: tiny}\n", "base.yaml")
    p = write(tmp_path, "extends: base.yaml\ntrain: {max_steps: 9}\n")
    cfg = load_config(p, ["train.micro_batch=2", "loss.w_img=3"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.micro_batch, cfg.loss.w_img) == (1e-4, 9, 2, 3.0)
    assert cfg.model.name == "tiny" and cfg.train.seed == 5991
    # round trip through the resolved file
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    assert load_config(write(tmp_path, "train: {lr: 5e-5}\n")).train.lr == 5e-5


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("train: {lrr: 1}\n", ["c.yaml", "train.lrr", "did you mean 'lr'", "valid keys"]),
        ("trian: {lr: 1}\n", ["c.yaml", "'trian'", "did you mean 'train'"]),
        ("train: {max_steps: ten}\n", ["c.yaml", "train.max_steps", "'ten'", "expected int"]),
        ("finetune: {text_encoder_lora: 3}\n", ["finetune.text_encoder_lora", "expected bool"]),
        ("sampling: {dft: fsat}\n", ["sampling.dft", "'fsat'", "did you mean 'fast'"]),
        ("attributes: {gender: {target: [0.6, 0.6]}}\n", ["c.yaml", "attributes.gender.target", "sum to 1"]),
        ("attributes: {race: {target: [0.5, 0.5]}}\n", ["attributes.race.target", "2 entries, expected 4"]),
        ("attributes: {hair: {}}\n", ["attributes.hair", "unknown attribute", "presets"]),
        ("attributes: {gender: {factor1: 2}}\n", ["c.yaml", "attributes.gender.factor1 = 2", "[0, 1]"]),
        ("finetune: {rank: 0}\n", ["finetune", "rank must be >= 1"]),
        ("attributes: {gender: {}}\nloss: {keep: [gender]}\n", ["loss.keep", "'gender'", "attributes.gender"]),
        ("attributes: {gender: {}}\nloss: {keep: [age, age]}\n", ["loss.keep", "['age', 'age']", "once"]),
        ("loss: {w_keep: -1}\n", ["c.yaml", "loss.w_keep = -1", ">= 0"]),
        ("sampling: {train_steps: [3, 5], dft_last_k: 4}\n", ["sampling", "dft_last_k", "train_steps[0] = 3", "got 4"]),
    ],
)
def test_errors_name_file_key_value(tmp_path, text, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_sections_built_in_code_are_checked_too():
    """The checks live in the dataclasses, so a config built in Python is held to the same rules as a YAML file."""
    from common.config import AttributeConfig, Config, LossConfig

    with pytest.raises(ValueError, match=r"w_keep = -1: expected a number >= 0"):
        LossConfig(w_keep=-1)
    with pytest.raises(ValueError, match=r"keep = \['age', 'age'\]"):
        LossConfig(keep=["age", "age"])
    with pytest.raises(ValueError, match=r"factor2 = 1.5: expected a number in \[0, 1\]"):
        AttributeConfig(factor2=1.5)
    with pytest.raises(ConfigError, match="loss.keep lists 'gender', which is also debiased"):
        Config(loss=LossConfig(keep=["gender"]))
    with pytest.raises(ConfigError, match="attributes.gender.target"):
        Config(attributes={"gender": AttributeConfig(target=[0.7, 0.7])})


def test_override_errors(tmp_path):
    p = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(p, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(p, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
