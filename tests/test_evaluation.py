"""trainer.evaluation as a library: retrieval scores on the legacy checkpoint (tests/assets), the bootstrap,
the tables, and the threshold calibration on tiny real shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from trainhelpers import write_tiny_shards

from pccnet import metrics
from trainer.config import load_config
from trainer.evaluation import (
    SMALL_SET,
    bootstrap_fid,
    calibrate_threshold,
    calibration_report,
    evaluate_images,
    evaluate_retrieval,
    markdown_table,
    paired_fid_delta,
    retrieval_table,
)
from trainer.inference import Colorizer

LEGACY = Path(__file__).resolve().parent / "assets" / "legacy_checkpoint"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_tiny_shards(tmp_path_factory.mktemp("eval-shards"))


def test_retrieval_scores_of_a_checkpoint(shards):
    with Colorizer(LEGACY, device="cpu") as col:
        r = evaluate_retrieval(col, shards, batch_size=5)  # batches of 5, 5, 5, 1
        written = int((col.client.export()["item_ids"] >= 0).sum())
    assert r["n_images"] == 16 and r["written_slots"] == written and 1 <= r["distinct_answers"] <= written
    assert r["oracle_kl"] <= r["retrieval_kl"] + 1e-9 and r["oracle_kl"] <= r["chance_kl"]
    assert list(k for k in r if k.startswith("acc@")) == ["acc@0.5", "acc@1", "acc@1.5"]  # 1.5 is configured too
    assert r["acc@0.5"] <= r["acc@1"] <= r["acc@1.5"] and r["extractor"] == "resnet18-scratch"
    table = retrieval_table(r)
    assert "| images | 16 |" in table and f"| written slots | {written} |" in table


def test_a_shared_real_feature_cache_changes_no_score(tmp_path):
    """Scoring rows with one real_cache computes the real images' FID features once and gives the same
    figures as without it."""
    from studiohelpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "run", image_size=32)
    pattern = write_tiny_shards(tmp_path / "shards", per_shard=3, size=40)
    with Colorizer(ckpt, device="cpu", connect_memory=False) as col:
        plain = evaluate_images(col, pattern, batch_size=5, bootstrap=3, color_feature="own")
        cache: dict = {}
        first = evaluate_images(col, pattern, batch_size=5, bootstrap=3, color_feature="own", real_cache=cache)
        assert len(cache) == 2  # batches of 5 and 1
        second = evaluate_images(col, pattern, batch_size=5, bootstrap=3, color_feature="own", real_cache=cache)
        assert len(cache) == 2 and {k[1:] for k in cache} == {(col.image_size, col.background)}
    for r in (first, second):
        assert r["fid"] == plain["fid"] and r["fid_bootstrap"] == plain["fid_bootstrap"]
        assert r["image_order"] == plain["image_order"] and r["lpips"] == plain["lpips"]


def test_the_bootstrap_resamples_image_pairs():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((12, 2048))
    same = bootstrap_fid(feats, feats, 3)
    assert len(same) == 3 and max(abs(f) for f in same) < 1e-6  # pairs stay together: identical sets
    assert bootstrap_fid(feats, feats + 1.0, 4) == bootstrap_fid(feats, feats + 1.0, 4)  # seeded
    assert bootstrap_fid(feats, feats, 0) == []


def test_the_paired_fid_delta_uses_the_shared_resamplings():
    rng = np.random.default_rng(1)
    reals = rng.standard_normal((40, 8))
    a_feats = reals + 0.5 * rng.standard_normal((40, 8))
    b_feats = a_feats + 0.05 * rng.standard_normal((40, 8))  # a row close to a, on the same images
    a = {"fid": metrics.fid_from_features(a_feats, reals), "fid_bootstrap": bootstrap_fid(a_feats, reals, 20),
         "image_order": "x"}
    b = {"fid": metrics.fid_from_features(b_feats, reals), "fid_bootstrap": bootstrap_fid(b_feats, reals, 20),
         "image_order": "x"}
    delta, spread = paired_fid_delta(b, a)
    assert delta == b["fid"] - a["fid"]
    assert spread == float(np.std(np.subtract(b["fid_bootstrap"], a["fid_bootstrap"])))
    # Both rows move together with the resampled images, so their difference varies far less than either.
    assert spread < 0.5 * min(np.std(a["fid_bootstrap"]), np.std(b["fid_bootstrap"]))
    # Not comparable: other images or order, other resamplings, no resamplings.
    assert paired_fid_delta(dict(b, image_order="y"), a) is None
    assert paired_fid_delta(dict(b, fid_bootstrap=b["fid_bootstrap"][:5]), a) is None
    assert paired_fid_delta(dict(b, fid_bootstrap=[]), a) is None
    assert paired_fid_delta({k: v for k, v in b.items() if k != "image_order"}, a) is None


def test_the_markdown_table_flags_small_sets():
    result = {"n_images": 10, "fid": 12.3456, "fid_bootstrap_std": 1.5, "lpips": 0.2, "psnr": 20.0,
              "colorfulness": 30.0, "colorfulness_real": 40.0, "small_set": True}
    table = markdown_table(result)
    assert "| FID | 12.346 ± 1.500 (bootstrap std) |" in table
    assert f"FID on 10 images (< {SMALL_SET}) is biased" in table
    assert "biased" not in markdown_table(dict(result, small_set=False, fid_bootstrap_std=None))


def test_calibration_finds_the_threshold_for_the_rate(shards, tmp_path):
    cfg = load_config("configs/debug_cpu.yaml", [f"data.train={shards}", "data.workers=0"])
    r = calibrate_threshold(cfg, n_images=512, positive_rate=0.25)
    assert r["images"] == r["images_all"] == 16 and r["pairs"] == 16 * 15
    qs = list(r["quantiles"].values())
    assert qs == sorted(qs) and qs[0] > 0
    # Configured at the threshold it found, the share of positive pairs is the rate asked for.
    again = calibrate_threshold(load_config("configs/debug_cpu.yaml", [f"data.train={shards}", "data.workers=0",
                                                                      f"phase1.threshold={r['threshold']}"]),
                                positive_rate=0.25)
    assert again["configured_positive"] == pytest.approx(0.25, abs=1.5 / r["pairs"])
    fewer = calibrate_threshold(cfg, n_images=5)
    assert fewer["images"] == 5 and fewer["images_all"] == 16 and fewer["pairs"] == 20
    report = calibration_report(r).splitlines()
    assert report[0] == "16 of 16 training images, 240 ordered pairs, KL in nats"
    assert report[-1] == f"phase1.threshold for 25% positive pairs: {r['threshold']:.3f}"
    one = write_tiny_shards(tmp_path / "one", n_shards=1, per_shard=1)
    with pytest.raises(ValueError, match="holds 1 image"):
        calibrate_threshold(load_config("configs/debug_cpu.yaml", [f"data.train={one}", "data.workers=0"]))
