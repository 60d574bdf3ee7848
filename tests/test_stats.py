"""trainer.stats and trainer.visual: interval means, stats.jsonl, Prometheus per rank, PNG outputs."""

from __future__ import annotations

import urllib.request

import numpy as np
import torch
from PIL import Image

from trainer.stats import JsonlWriter, Stats, TrainerMetrics, read_jsonl
from trainer.visual import plot_curves, save_sample_grid


def test_stats_means_over_the_interval_and_over_ranks():
    s = Stats()
    for v in (1.0, 2.0, 3.0):
        s.report("loss/a", v)
    s.report("loss/b", torch.tensor(4.0))
    other_rank = {"loss/a": (10.0, 1), "loss/c": (6.0, 2)}
    means = s.collect(lambda parts: parts + [other_rank])  # what gather_object returns on 2 ranks
    assert means == {"loss/a": 16.0 / 4, "loss/b": 4.0, "loss/c": 3.0}
    assert s.collect() == {}  # the interval was reset


def test_jsonl_skips_a_torn_last_line_and_nulls_nan(tmp_path):
    w = JsonlWriter(tmp_path / "stats.jsonl")
    w.write({"step": 1, "loss": 0.5})
    w.write({"step": 2, "loss": float("nan")})
    w.close()
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-line
    rows = read_jsonl(tmp_path / "stats.jsonl")
    assert rows == [{"loss": 0.5, "step": 1}, {"loss": None, "step": 2}]


def test_prometheus_metrics_are_served_and_named():
    m = TrainerMetrics(rank=1, port=0)
    try:
        m.observe_step(8, {"data": 0.01, "forward": 0.2, "step": 0.3}, {"loss/d": 0.5, "loss/g": float("nan")})
        m.observe_step(8, {"data": 0.02, "step": 0.3}, {"loss/d": 0.4})
        m.observe_checkpoint(0.5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10).read().decode()
    finally:
        m.close()
    assert 'trainer_steps_total{rank="1"} 2.0' in text
    assert 'trainer_images_total{rank="1"} 16.0' in text
    assert 'trainer_loss{loss="loss/d",rank="1"} 0.4' in text
    assert 'trainer_data_wait_seconds_total{rank="1"} 0.03' in text
    assert 'trainer_step_duration_seconds_count{phase="forward",rank="1"} 1.0' in text
    assert 'trainer_checkpoint_duration_seconds_count{rank="1"} 1.0' in text


def test_sample_grid_and_loss_curves(tmp_path):
    light = torch.rand(3, 1, 16, 16) * 2 - 1
    fake = torch.zeros(3, 2, 16, 16)
    real = torch.full((3, 2, 16, 16), 0.3)
    path = save_sample_grid(tmp_path / "s" / "grid.png", light, fake, real)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 18 + 2, 3 * 18 + 2, 3)
    # Column 2 (the zero-ab result) is gray, column 3 (ab = 0.3 * 110) is coloured.
    result, truth = grid[2:18, 20:36].astype(int), grid[2:18, 38:54].astype(int)
    assert np.abs(result[..., 0] - result[..., 1]).max() <= 1
    assert np.abs(truth[..., 0] - truth[..., 2]).mean() > 20
    curves = {"loss/d": [(1, 0.5), (2, 0.4), (3, 0.45)], "loss/g": [(1, 3.0), (2, float("nan")), (3, 2.0)],
              "mem/one_point": [(1, 0.1)]}
    out = plot_curves(curves, tmp_path / "curves.png")
    img = Image.open(out)
    assert img.size == (2 * 360, 180)  # two drawable series; the single point is left out
    assert plot_curves({"x": [(1, 1.0)]}, tmp_path / "none.png") is None
