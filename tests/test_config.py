from dataclasses import FrozenInstanceError
import re

import pytest

from cvaa.config import Config, ConfigError, PRESETS, load_config, parse_value


def test_defaults_are_the_paper_setting():
    cfg = load_config("paper")
    assert cfg.preprocess.spacing_mm == 2.0 and cfg.preprocess.size == 128
    assert cfg.preprocess.clip_hu == (-1000.0, 4096.0)
    assert cfg.drr.detector_pixels == 128
    assert (cfg.optim.lr_g, cfg.optim.beta1, cfg.optim.beta2) == (2e-4, 0.5, 0.99)


def test_cpu_preset_is_small_with_the_same_field_of_view():
    cpu, paper = load_config("cpu"), load_config("paper")
    assert cpu.preprocess.size <= 64
    assert cpu.preprocess.size * cpu.preprocess.spacing_mm == pytest.approx(
        paper.preprocess.size * paper.preprocess.spacing_mm)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_round_trip_through_dict(preset):
    cfg = load_config(preset, overrides=["drr.sad_mm=900", "model.dense_layers=[2,2,2]",
                                          "model.generator=3dcnn"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["model"]["dense_layers"] == [2, 2, 2]


def test_frozen():
    cfg = Config()
    with pytest.raises(FrozenInstanceError):
        cfg.drr.sad_mm = 5.0  # type: ignore[misc]


def test_overrides_are_typed():
    cfg = load_config(overrides=["optim.lr_g=1e-4", "preprocess.size=64",
                                 "drr.detector_pixels=64",
                                 "preprocess.crop_center=body", "train.use_gpu=true",
                                 "preprocess.clip_hu=-1024,3071"])
    assert cfg.optim.lr_g == 1e-4 and isinstance(cfg.optim.lr_g, float)
    assert cfg.preprocess.size == 64 and cfg.preprocess.crop_center == "body"
    assert cfg.train.use_gpu is True
    assert cfg.preprocess.clip_hu == (-1024.0, 3071.0)


@pytest.mark.parametrize("override, fragment", [
    ("drr.sad_mn=900", "'drr.sad_mn'"),
    ("nosuch.key=1", "'nosuch'"),
    ("preprocess.size=big", "preprocess.size"),
    ("preprocess.crop_center=middle", "preprocess.crop_center"),
    ("preprocess.clip_hu=1,2,3", "preprocess.clip_hu"),
    ("train.use_gpu=3", "train.use_gpu"),
    ("justtext", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config(overrides=[override])


def test_yaml_file_and_unknown_key(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("drr:\n  sid_mm: 1400\noptim:\n  lr_d: 1e-4\n")
    cfg = load_config("cpu", config_file=good, overrides=["drr.sid_mm=1300"])
    assert cfg.drr.sid_mm == 1300.0  # --set wins over the file
    assert cfg.optim.lr_d == 1e-4    # "1e-4" is a string to plain YAML; we read a float
    assert cfg.preprocess.size == PRESETS["cpu"]["preprocess"]["size"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("drr:\n  sidmm: 1400\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'drr\.sidmm'"):
        load_config(config_file=bad)


def test_unknown_preset():
    with pytest.raises(KeyError, match="paper"):
        load_config("huge")


def test_parse_value():
    assert parse_value("1e-4") == 1e-4
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("cvaa") == "cvaa"


def test_hash_changes_with_the_section_it_covers():
    a = load_config("cpu")
    b = a.override(["drr.sad_mm=900"])
    c = a.override(["optim.lr_g=1e-3"])
    assert a.hash("preprocess", "drr") != b.hash("preprocess", "drr")
    assert a.hash("preprocess", "drr") == c.hash("preprocess", "drr")


def test_generator_names_are_the_registry():
    """The config's choice of generators is exactly what cvaa.models can build."""
    import typing

    from cvaa.config import ModelConfig
    from cvaa.models import GENERATORS

    hint = typing.get_type_hints(ModelConfig)["generator"]
    assert set(typing.get_args(hint)) == set(GENERATORS)


def test_unknown_generator_fails_at_load_naming_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config("cpu", overrides=["model.generator=cvaa-gan"])
    message = str(err.value)
    assert "model.generator='cvaa-gan'" in message
    assert all(name in message for name in ("cvaa", "x2ct", "3dcnn", "psr"))


@pytest.mark.parametrize("overrides, fragment", [
    (["drr.detector_pixels=64"], "drr.detector_pixels=64 must equal preprocess.size=32"),
    (["model.decoder_channels=[32,16,8]"], "model.decoder_channels needs stages + 1 = 4"),
    (["model.encoder_channels=[16,24]"], "model.encoder_channels needs one entry per stage"),
    (["preprocess.size=36", "drr.detector_pixels=36"], "preprocess.size=36 must be a multiple of 2^3"),
])
def test_inconsistent_sizes_fail_at_load(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config("cpu", overrides=overrides)
    # the same sizes are fine for a model that has no such constraint
    if overrides[0].startswith("model."):
        load_config("cpu", overrides=overrides + ["model.generator=3dcnn"])


def test_batch_size_is_the_global_batch_and_must_divide_over_the_workers():
    from cvaa.gan import per_worker_batch

    cfg = load_config("cpu", overrides=["train.batch_size=8", "train.num_workers=4"])
    assert per_worker_batch(cfg) == 2
    with pytest.raises(ConfigError, match=r"train.batch_size=4 is the global batch.*"
                                          r"train.num_workers=8"):
        load_config("cpu", overrides=["train.num_workers=8"])


@pytest.mark.parametrize("rule, batch, expected", [
    ("none", 32, 2e-4), ("linear", 32, 1.6e-3), ("sqrt", 16, 4e-4), ("linear", 4, 2e-4),
    ("sqrt", 1, 1e-4),
])
def test_learning_rate_scaling_from_the_reference_batch(rule, batch, expected):
    from cvaa.gan import scaled_lr

    cfg = load_config("paper", overrides=[f"train.batch_size={batch}",
                                          f"optim.lr_scaling={rule}"])
    assert scaled_lr(cfg.optim.lr_g, cfg) == pytest.approx(expected)


def test_the_trainer_steps_with_the_scaled_learning_rate():
    from cvaa.gan import GANTrainer
    from cvaa.models import build_discriminator, build_generator

    cfg = load_config("cpu", overrides=["train.batch_size=16", "optim.lr_scaling=linear"])
    trainer = GANTrainer(build_generator("cvaa", cfg), build_discriminator(cfg), cfg)
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr_g * 4)
    trainer.set_epoch(cfg.optim.constant_epochs + 1)   # the decay applies to the scaled rate
    assert trainer.opt_g.param_groups[0]["lr"] < cfg.optim.lr_g * 4
