"""`phase1.threshold: auto` (the default), `memory.capacity: auto` and the start-up data checks, on real
tiny shards in this process.

The auto threshold must be the calibration's 15 % value, and the auto capacity 1.2 x the training images,
each logged, written as a number into the run's config and every checkpoint, and kept on resume even
when the training data changed; a data pattern that matches nothing must stop the run before any step,
naming the key and the pattern.
"""

from __future__ import annotations

import logging
import re

import pytest
import yaml
from trainhelpers import write_config, write_tiny_shards

from launch.train import main as train_main
from trainer.calibrate import AUTO_IMAGES, MAX_SHARDS, POSITIVE_RATE, calibrate_threshold, resolve_capacity
from trainer.config import ConfigError, load_config


def _saved_threshold(folder) -> float | str:
    return yaml.safe_load((folder / "config.yaml").read_text())["phase1"]["threshold"]


def test_auto_is_the_default_and_only_auto_is_accepted_as_a_word():
    assert load_config(None).phase1.threshold == "auto"
    assert load_config(None, ["phase1.threshold=0.7"]).phase1.threshold == 0.7
    with pytest.raises(ConfigError, match=r"phase1\.threshold must be a number of nats or 'auto', got 'automatic'"):
        load_config(None, ["phase1.threshold=automatic"])


def test_auto_threshold_is_calibrated_logged_saved_and_kept_on_resume(tmp_path, caplog):
    shards = write_tiny_shards(tmp_path / "shards")
    out = tmp_path / "run"
    cfg_path = write_config(tmp_path / "c.yaml", shards, out, phase1__steps=2, phase1__threshold="auto",
                            phase2__steps=0, run__checkpoint_every=2, data__workers=0)
    expected = round(calibrate_threshold(load_config(cfg_path), AUTO_IMAGES, POSITIVE_RATE)["threshold"], 4)
    assert expected > 0
    with caplog.at_level(logging.INFO, logger="trainer.calibrate"):
        assert train_main(["--config", str(cfg_path)]) == 0
    assert any(f"phase1.threshold auto: {expected:.4f} nats" in r.getMessage() for r in caplog.records)
    ckpt = out / "checkpoints" / "step-0000002"
    assert _saved_threshold(out) == expected == _saved_threshold(ckpt)

    # Other training data (resumable) would calibrate to another value: the resumed run keeps its own.
    other = write_tiny_shards(tmp_path / "other", n_shards=1, per_shard=6, seed=5)
    other_value = round(calibrate_threshold(load_config(cfg_path, [f"data.train={other}"]))["threshold"], 4)
    assert other_value != expected
    caplog.clear()
    with caplog.at_level(logging.INFO):
        # Into a new folder, as launch/results.py does: its embedded server starts empty and is restored.
        assert train_main(["--config", str(cfg_path), "--resume", str(ckpt), f"run.out_dir={tmp_path / 'run2'}",
                           f"data.train={other}", "phase1.steps=3"]) == 0
    assert any(f"phase1.threshold auto: {expected:g} nats, as in" in r.getMessage() for r in caplog.records)
    # The start-up line reports the restored memory, not the empty one the embedded server began with.
    filled = [int(m.group(1)) for r in caplog.records
              if (m := re.search(r"memory 'default' at \S+: capacity \d+, filled (\d+)", r.getMessage()))]
    assert len(filled) == 1 and filled[0] > 0
    assert _saved_threshold(tmp_path / "run2" / "checkpoints" / "step-0000003") == expected


def test_auto_capacity_is_one_point_two_slots_per_training_image_and_kept_on_resume(tmp_path, caplog):
    assert load_config(None, ["memory.capacity=auto"]).memory.capacity == "auto"
    for bad in ("big", 0):
        with pytest.raises(ConfigError, match=r"memory\.capacity"):
            load_config(None, [f"memory.capacity={bad}"])
    shards = write_tiny_shards(tmp_path / "shards", n_shards=2, per_shard=7)  # 14 images: ceil(16.8) = 17 slots
    out = tmp_path / "run"
    cfg_path = write_config(tmp_path / "c.yaml", shards, out, phase1__steps=2, memory__capacity="auto",
                            phase2__steps=0, run__checkpoint_every=2, data__workers=0)
    assert resolve_capacity(load_config(cfg_path)).memory.capacity == 17
    with caplog.at_level(logging.INFO):
        assert train_main(["--config", str(cfg_path)]) == 0
    assert any("memory.capacity auto: 17 slots (1.2 x 14 training images)" in r.getMessage() for r in caplog.records)
    assert any(re.search(r"memory 'default' at \S+: capacity 17,", r.getMessage()) for r in caplog.records)
    ckpt = out / "checkpoints" / "step-0000002"
    for folder in (out, ckpt):
        assert yaml.safe_load((folder / "config.yaml").read_text())["memory"]["capacity"] == 17

    # More training data on resume would size the memory otherwise: the resumed run keeps its 17 slots.
    more = write_tiny_shards(tmp_path / "more", n_shards=3, per_shard=8, seed=3)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train_main(["--config", str(cfg_path), "--resume", str(ckpt), f"run.out_dir={tmp_path / 'run2'}",
                           f"data.train={more}", "phase1.steps=3"]) == 0
    assert any("memory.capacity auto: 17 slots, as in" in r.getMessage() for r in caplog.records)
    saved = yaml.safe_load((tmp_path / "run2" / "checkpoints" / "step-0000003" / "config.yaml").read_text())
    assert saved["memory"]["capacity"] == 17


def test_calibration_reads_at_most_max_shards_spread_over_the_list(tmp_path):
    # 2 images a shard in 2 * MAX_SHARDS shards: every other shard is read, first and last halves both.
    shards = write_tiny_shards(tmp_path / "many", n_shards=2 * MAX_SHARDS, per_shard=2, size=16)
    r = calibrate_threshold(load_config(None, [f"data.train={shards}", "data.workers=0", "data.image_size=32"]))
    assert r["images_all"] == 2 * MAX_SHARDS


@pytest.mark.parametrize("key", ["data.train", "data.val"])
def test_a_pattern_that_matches_nothing_stops_the_run_before_any_step(tmp_path, capsys, key):
    shards = write_tiny_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    out = tmp_path / "run"
    cfg_path = write_config(tmp_path / "c.yaml", shards, out, phase1__steps=2, phase2__steps=2, data__workers=0,
                            data__val=shards)
    missing = str(tmp_path / "nowhere" / "val-{000000..000001}.tar")
    assert train_main(["--config", str(cfg_path), f"{key}={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"error: {key} {missing!r} matches no usable shard" in err
    assert not (out / "checkpoints").exists() and not (out / "stats.jsonl").exists()
