"""A checkpoint written before issue 11 (flat `model:` schema, tests/assets/legacy_checkpoint) still loads,
colorizes exactly as the code that wrote it did, and resumes training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from trainhelpers import write_tiny_shards

from pccnet.config import DiscriminatorConfig, ExtractorConfig, GeneratorConfig, SamplerConfig
from trainer.checkpoint import load_checkpoint
from trainer.config import load_config
from trainer.inference import Colorizer
from trainer.loop import run

LEGACY = Path(__file__).resolve().parent / "assets" / "legacy_checkpoint"


def picture(h: int = 20, w: int = 28) -> Image.Image:
    """The gradient picture expected.npz was made from (see the asset's README)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([127 + 120 * np.sin(2 * x / w * np.pi), 127 + 120 * np.cos(3 * y / h * np.pi),
                    127 + 120 * np.sin(4 * (x + y) / (w + h) * np.pi)], axis=-1)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def test_the_asset_is_of_the_flat_schema_and_small():
    saved = yaml.safe_load((LEGACY / "config.yaml").read_text())
    assert saved["model"]["width"] == 2 and saved["model"]["extractor"] == "resnet18-scratch"
    assert "epoch_batches" in saved["data"]
    assert sum(p.stat().st_size for p in LEGACY.iterdir()) < 1 << 20


def test_its_config_and_weights_load_at_the_new_paths():
    state = load_checkpoint(LEGACY)
    model = state["config"].model
    assert model.generator == GeneratorConfig(width=2, n_blocks_encoder=1, n_blocks_decoder=1, mlp_dim=4)
    assert model.sampler == SamplerConfig(num_patches=8, dim=8)
    assert model.discriminator == DiscriminatorConfig(width=2, n_layers=1)
    assert model.extractor == ExtractorConfig(backbone="resnet18-scratch", dim=8, resnet_width=1)
    assert state["meta"]["step"] == 4 and state["memory"]["keys"].shape == (8, 8)


def test_it_colorizes_as_the_code_that_wrote_it():
    expected = np.load(LEGACY / "expected.npz", allow_pickle=False)
    light = torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)
    with Colorizer(LEGACY, device="cpu") as col:
        rgb = col.colorize_images([picture()])[0]
        c, slots = col.retrieve(light, return_slots=True)
        ab = col.predict_ab(light)
    np.testing.assert_array_equal(slots, expected["slots"])
    np.testing.assert_allclose(c.numpy(), expected["color_feature"], atol=1e-6)
    np.testing.assert_allclose(ab.numpy(), expected["ab"], atol=1e-5)
    assert rgb.shape == (20, 28, 3) and np.abs(rgb.astype(int) - expected["rgb"]).max() <= 1


def test_it_resumes_training(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n_shards=1)
    out = tmp_path / "run"
    cfg = load_config(LEGACY / "config.yaml", [f"data.train={shards}", f"run.out_dir={out}", "phase2.steps=3"])
    result = run(cfg, resume=str(LEGACY))
    assert result["step"] == 5
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["start_step"] == 4 and summary["resumed_from"] == str(LEGACY)
    resumed = load_checkpoint(out)
    assert resumed["meta"]["step"] == 5 and resumed["config"].model == cfg.model
    assert "generator" in yaml.safe_load((resumed["path"] / "config.yaml").read_text())["model"]  # the new schema
    # The memory came back from the legacy checkpoint (phase 2 does not write it).
    np.testing.assert_array_equal(resumed["memory"]["item_ids"], load_checkpoint(LEGACY)["memory"]["item_ids"])
