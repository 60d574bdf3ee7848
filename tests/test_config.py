"""trainer.config: the nested frozen schema, strict keys and types, dotted overrides, the flat-schema shim,
resume compatibility."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pccnet.config import DiscriminatorConfig, ExtractorConfig, GeneratorConfig, SamplerConfig
from trainer.config import (
    SHAPE_KEYS,
    ConfigError,
    TrainConfig,
    config_to_dict,
    flatten,
    load_config,
    resume_differences,
    save_config,
)


def test_defaults_are_the_papers_and_validate():
    cfg = load_config(None)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.generator == GeneratorConfig() and cfg.model.generator.width == 64
    assert cfg.model.sampler == SamplerConfig() and cfg.model.discriminator == DiscriminatorConfig()
    assert cfg.model.extractor == ExtractorConfig() and cfg.data.image_size == 256
    assert cfg.memory.address is None and cfg.loss.tau == 0.07


def test_the_model_section_nests_the_librarys_own_dataclasses(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"generator": {"width": 16, "antialias": False},
                                              "sampler": {"dim": 32}, "discriminator": {"n_layers": 2},
                                              "extractor": {"backbone": "resnet18-scratch", "resnet_width": 8}}}))
    model = load_config(path).model
    assert model.generator == GeneratorConfig(width=16, antialias=False)
    assert model.sampler == SamplerConfig(dim=32) and model.discriminator == DiscriminatorConfig(n_layers=2)
    assert model.extractor == ExtractorConfig(backbone="resnet18-scratch", resnet_width=8)


def test_every_config_is_frozen_and_replace_checks_again():
    cfg = load_config(None)
    for section in (cfg, cfg.run, cfg.data, cfg.model, cfg.model.generator, cfg.model.extractor, cfg.phase2):
        with pytest.raises(dataclasses.FrozenInstanceError):
            section.seed = 1  # any attribute: frozen dataclasses refuse every assignment
    smaller = dataclasses.replace(cfg.data, batch_size=64)
    assert smaller.batch_size == 64 and cfg.data.batch_size == 4  # the original is untouched
    with pytest.raises(ConfigError, match=r"data\.batch_size must be > 0, got 0"):
        dataclasses.replace(cfg.data, batch_size=0)
    with pytest.raises(ValueError, match=r"GeneratorConfig\.width must be an int >= 1, got 0"):
        dataclasses.replace(cfg.model.generator, width=0)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"image_size": 64, "train": "x-{000000..000001}.tar"},
                                    "model": {"generator": {"width": 16}}}))
    cfg = load_config(path, ["model.generator.width=8", "memory.address=tcp://127.0.0.1:5555", "data.val=null",
                             "phase2.betas=[0.0, 0.99]", "loss.pc=0"])
    assert cfg.data.image_size == 64 and cfg.model.generator.width == 8
    assert cfg.memory.address == "tcp://127.0.0.1:5555" and cfg.data.val is None
    assert cfg.phase2.betas == (0.0, 0.99) and cfg.loss.pc == 0.0 and isinstance(cfg.loss.pc, float)


FLAT = {"width": 4, "n_blocks_encoder": 1, "n_blocks_decoder": 2, "antialias": False, "mlp_dim": 16, "d_width": 8,
        "d_layers": 2, "num_patches": 16, "patch_dim": 12, "extractor": "resnet18-scratch", "extractor_dim": 32,
        "extractor_width": 4, "use_memory": False}


def test_a_flat_schema_file_loads_at_the_new_paths(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"model": FLAT, "data": {"epoch_batches": None, "image_size": 32}}))
    cfg = load_config(path)
    assert cfg.model.generator == GeneratorConfig(width=4, n_blocks_encoder=1, n_blocks_decoder=2, antialias=False,
                                                  mlp_dim=16)
    assert cfg.model.discriminator == DiscriminatorConfig(width=8, n_layers=2)
    assert cfg.model.sampler == SamplerConfig(num_patches=16, dim=12)
    assert cfg.model.extractor == ExtractorConfig(backbone="resnet18-scratch", dim=32, resnet_width=4)
    assert cfg.model.use_memory is False and cfg.data.image_size == 32
    # Saved again, it is of the new schema and loads to the same config.
    save_config(cfg, tmp_path / "new.yaml")
    assert "generator" in yaml.safe_load((tmp_path / "new.yaml").read_text())["model"]
    assert load_config(tmp_path / "new.yaml") == cfg


def test_flat_overrides_apply_at_the_new_paths_and_keep_the_rest(tmp_path):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "debug_cpu.yaml",
                      ["model.width=3", "model.extractor=vgg16-imagenet", "model.extractor_dim=16"])
    assert cfg.model.generator.width == 3 and cfg.model.generator.mlp_dim == 16
    assert cfg.model.extractor == ExtractorConfig(backbone="vgg16-imagenet", dim=16, resnet_width=4)


def test_old_and_new_spellings_of_one_key_are_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump({"model": {"width": 4, "generator": {"width": 8}}}))
    with pytest.raises(ConfigError, match=r"model\.width .* and model\.generator\.width are both given"):
        load_config(path)


def test_shape_keys_follow_the_nested_paths():
    assert {"model.generator.width", "model.sampler.dim", "model.discriminator.n_layers",
            "model.extractor.backbone", "data.image_size", "memory.capacity"} <= set(SHAPE_KEYS)
    assert "model.use_memory" not in SHAPE_KEYS
    every_key = set(flatten(config_to_dict(load_config(None))))
    assert set(SHAPE_KEYS) <= every_key  # no stale path


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.widht=8", r"unknown key model\.widht"),
        ("model.generator.widht=8", r"unknown key model\.generator\.widht"),
        ("nonsense.key=1", r"unknown key nonsense"),
        ("data.image_size=abc", r"data\.image_size: expected an int, got 'abc'"),
        ("data.image_size=6.5", r"data\.image_size: expected an int"),
        ("data.image_size=62", r"data\.image_size must be a multiple of 4, got 62"),
        ("data.flip=3", r"data\.flip: expected a bool"),
        ("model.generator.width=0", r"model\.generator\.width must be an int >= 1, got 0"),
        ("model.width=0", r"model\.generator\.width must be an int >= 1, got 0"),
        ("model.generator.color_dim=312", r"model\.generator\.color_dim must be 313"),
        ("model.extractor.backbone=resnet50", r"model\.extractor\.backbone must be one of .*'resnet50'"),
        ("model.extractor=resnet50", r"model\.extractor\.backbone must be one of .*'resnet50'"),
        ("memory.durability=sometimes", r"memory\.durability must be one of"),
        ("phase2.betas=[0.5]", r"phase2\.betas must be two numbers"),
        ("phase2.betas=0.5", r"phase2\.betas: expected a list"),
        ("phase2.feature_blend=1.5", r"phase2\.feature_blend must be in \[0, 1\], got 1\.5"),
        ("phase2.feature_blend_towards=nearest", r"phase2\.feature_blend_towards must be one of .*'nearest'"),
        ("data=3", r"data: expected a mapping"),
        ("run.seed", r"must look like key\.path=value"),
        ("model.generator.width.x=1", r"model\.generator\.width: expected an int, got \{'x': 1\}"),
        ("run.check_ddp_every_log=2", r"run\.check_ddp_every_log: expected a bool"),
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
    with pytest.raises(ConfigError, match=r"model\.generator\.width is not a section"):
        load_config(None, ["model.generator.width=8", "model.generator.width.x=1"])


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
    cfg = load_config(None, ["model.generator.width=12", "data.val=v.tar", "phase2.betas=[0.1, 0.9]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg) and again == cfg


def test_resume_differences_classify_keys():
    saved = load_config(None)
    current = load_config(None, ["phase2.steps=99", "run.checkpoint_every=7", "model.generator.width=32",
                                 "model.extractor.dim=64", "loss.smooth=10", "model.use_memory=false"])
    diff = resume_differences(saved, current)
    assert diff["bookkeeping"] == ["phase2.steps", "run.checkpoint_every"]
    assert diff["shape"] == ["model.extractor.dim", "model.generator.width"]
    assert diff["other"] == ["loss.smooth", "model.use_memory"]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "accelerate_ddp.yaml"))
def test_every_shipped_config_loads(path):
    """Every config in configs/ (except accelerate's own) is a valid training config."""
    raw = yaml.safe_load((CONFIGS / path).read_text())
    assert set(raw.get("model", {})) <= {"generator", "sampler", "discriminator", "extractor", "use_memory"}
    cfg = load_config(CONFIGS / path)
    assert cfg.data.image_size in (32, 64, 128, 256)
    assert cfg.phase1.threshold == "auto" or cfg.phase1.threshold > 0
    assert cfg.memory.capacity == "auto" or cfg.memory.capacity > 0
    if path.endswith("_gpu.yaml"):
        assert cfg.data.image_size == 256 and cfg.model.generator.width == 64  # the paper's scale


def test_saved_configs_without_retrieval_keep_the_papers_top1(tmp_path):
    """A user's config without `retrieval` gets the default (16 values, flip); a checkpoint's config from
    before the section existed keeps the top-1 it was evaluated with."""
    from trainer.config import load_saved_config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"image_size": 64}}))
    assert (load_config(path).retrieval.k, load_config(path).retrieval.flip) == (16, True)
    old = load_saved_config(path).retrieval
    assert (old.k, old.flip) == (1, False)
    path.write_text(yaml.safe_dump({"retrieval": {"k": 4}}))
    assert load_saved_config(path).retrieval.k == 4 and load_saved_config(path).retrieval.flip is True


def test_saved_configs_without_feature_blend_keep_the_own_feature(tmp_path):
    """phase2.feature_blend defaults to 0.5 for new runs; a run saved before the key existed was trained
    on each image's own feature, and resuming or describing it must say so."""
    from trainer.config import load_saved_config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"phase2": {"steps": 10}}))
    assert load_config(path).phase2.feature_blend == 0.5 and load_saved_config(path).phase2.feature_blend == 0.0
    path.write_text(yaml.safe_dump({"phase2": {"feature_blend": 0.25}}))
    assert load_saved_config(path).phase2.feature_blend == 0.25
