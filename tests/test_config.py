"""trainer.config: strict keys and types, dotted overrides, resume compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config import (
    ConfigError,
    TrainConfig,
    config_to_dict,
    load_config,
    resume_differences,
    save_config,
)


def test_defaults_are_the_papers_and_validate():
    cfg = load_config(None)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.width == 64 and cfg.data.image_size == 256
    assert cfg.memory.address is None and cfg.loss.tau == 0.07


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"image_size": 64, "train": "x-{000000..000001}.tar"},
                                    "model": {"width": 16}}))
    cfg = load_config(path, ["model.width=8", "memory.address=tcp://127.0.0.1:5555", "data.val=null",
                             "phase2.betas=[0.0, 0.99]", "loss.pc=0"])
    assert cfg.data.image_size == 64 and cfg.model.width == 8
    assert cfg.memory.address == "tcp://127.0.0.1:5555" and cfg.data.val is None
    assert cfg.phase2.betas == [0.0, 0.99] and cfg.loss.pc == 0.0 and isinstance(cfg.loss.pc, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.widht=8", r"unknown key model\.widht"),
        ("nonsense.key=1", r"unknown key nonsense"),
        ("data.image_size=abc", r"data\.image_size: expected an int, got 'abc'"),
        ("data.image_size=6.5", r"data\.image_size: expected an int"),
        ("data.image_size=62", r"data\.image_size must be a multiple of 4, got 62"),
        ("data.flip=3", r"data\.flip: expected a bool"),
        ("model.width=0", r"model\.width must be > 0, got 0"),
        ("model.extractor=resnet50", r"model\.extractor must be one of .*'resnet50'"),
        ("memory.durability=sometimes", r"memory\.durability must be one of"),
        ("phase2.betas=[0.5]", r"phase2\.betas must be two numbers"),
        ("phase2.betas=0.5", r"phase2\.betas: expected a list"),
        ("data=3", r"data: expected a mapping"),
        ("run.seed", r"must look like key\.path=value"),
        ("model.width.x=1", r"model\.width: expected an int, got \{'x': 1\}"),
    ],
)
def test_bad_values_name_their_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_floats_written_like_1e_3_are_numbers(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string; the config still takes it as the number it means.
    path = tmp_path / "c.yaml"
    path.write_text("phase2: {lr: 1e-3, lr_final: 2E-6}\n")
    cfg = load_config(path, ["phase1.lr=5e-4"])
    assert cfg.phase2.lr == 1e-3 and cfg.phase2.lr_final == 2e-6 and cfg.phase1.lr == 5e-4
    with pytest.raises(ConfigError, match=r"phase2\.lr: expected a number, got '1e-3x'"):
        load_config(None, ["phase2.lr=1e-3x"])
    with pytest.raises(ConfigError, match=r"data\.image_size: expected an int, got '6e1'"):
        load_config(None, ["data.image_size=6e1"])


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"model\.width is not a section"):
        load_config(None, ["model.width=8", "model.width.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: {out_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["model.width=12", "data.val=v.tar"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_resume_differences_classify_keys():
    saved = load_config(None)
    current = load_config(None, ["phase2.steps=99", "run.checkpoint_every=7", "model.width=32",
                                 "loss.smooth=10"])
    diff = resume_differences(saved, current)
    assert diff["bookkeeping"] == ["phase2.steps", "run.checkpoint_every"]
    assert diff["shape"] == ["model.width"]
    assert diff["other"] == ["loss.smooth"]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "accelerate_ddp.yaml"))
def test_every_shipped_config_loads(path):
    """Every config in configs/ (except accelerate's own) is a valid training config."""
    cfg = load_config(CONFIGS / path)
    assert cfg.data.image_size in (32, 64, 128, 256) and cfg.phase1.threshold > 0
    if path.endswith("_gpu.yaml"):
        assert cfg.data.image_size == 256 and cfg.model.width == 64  # the paper's scale
