"""trainer.seeds: the --seeds list, where each seed's runs live, and the rows summarised over seeds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer import seeds


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=8, unique=True), st.sampled_from([",", ", ", " ,"]))
def test_parse_seeds_round_trip(values, sep):
    assert seeds.parse_seeds(sep.join(map(str, values))) == values


@pytest.mark.parametrize("text", ["", ",", "a", "1,x", "-1", "0,0", "1.5"])
def test_parse_seeds_names_the_bad_text(text):
    with pytest.raises(ValueError, match="--seeds must be") as err:
        seeds.parse_seeds(text)
    assert repr(text) in str(err.value)


def test_run_names_keep_the_config_seed_where_it_was():
    assert seeds.run_name("full", 0, 0) == "full" and seeds.seed_overrides(0, 0) == []
    assert seeds.run_name("full", 2, 0) == "full-seed2" and seeds.seed_overrides(2, 0) == ["run.seed=2"]
    assert seeds.run_name("no_memory", 0, 3) == "no_memory-seed0"


def _score(fid: float, boot: list[float], lpips: float = 0.2, order: str = "same") -> dict:
    return {"fid": fid, "fid_bootstrap": boot, "image_order": order, "lpips": lpips, "psnr": 20.0,
            "colorfulness": 30.0}


def test_summary_over_seeds_pairs_each_row_with_the_reference_of_its_own_seed():
    per_seed = {
        0: {"base": _score(50.0, [50.0, 52.0, 48.0]), "shot": _score(45.0, [45.0, 47.0, 43.0], 0.18)},
        1: {"base": _score(40.0, [40.0, 41.0, 39.0]), "shot": _score(39.0, [39.0, 41.0, 37.0], 0.16),
            "only1": _score(70.0, [70.0, 70.0, 70.0])},
        2: {"base": _score(44.0, [44.0, 44.0, 44.0]), "shot": _score(41.0, [41.0, 41.5, 40.5], 0.17, order="other")},
    }
    out = seeds.summarize(per_seed, "base")
    assert list(out) == ["base", "shot", "only1"]
    assert out["base"]["seeds"] == [0, 1, 2] and out["base"]["fid_per_seed"] == [50.0, 40.0, 44.0]
    assert out["base"]["fid"] == pytest.approx(np.mean([50, 40, 44]))
    assert out["base"]["fid_sd"] == pytest.approx(np.std([50, 40, 44], ddof=1))
    assert "delta_fid" not in out["base"]
    shot = out["shot"]
    # Seed 2 was scored on other images (image_order): no paired difference for it.
    assert [d["seed"] for d in shot["delta_per_seed"]] == [0, 1]
    assert shot["delta_fid"] == pytest.approx(np.mean([-5.0, -1.0]))
    assert shot["delta_fid_sd"] == pytest.approx(np.std([-5.0, -1.0], ddof=1))
    assert shot["delta_per_seed"][1]["paired_std"] == pytest.approx(np.std([-1.0, 0.0, -2.0]))
    # -5 with a paired spread of 0 beats two spreads; -1 with spread 0.82 does not.
    assert shot["lower_by_two_spreads"] == 1
    assert shot["lpips"] == pytest.approx(np.mean([0.18, 0.16, 0.17]))
    only = out["only1"]
    assert only["seeds"] == [1] and only["fid_sd"] is None and only["delta_fid"] == pytest.approx(30.0)
    text = seeds.table(out, {"base": "Base", "shot": "K = 5"}, "base")
    lines = text.splitlines()
    assert "ΔFID vs Base" in lines[0] and len(lines) == 2 + 3
    assert lines[3].startswith("| K = 5 | 0,1,2 | 41.67 ± 3.06 | 45.00 / 39.00 / 41.00 | -3.00 ± 2.83 | 1 of 2 |")
    # One seed: no sd printed (and null, not NaN, in the JSON).
    assert lines[4].startswith("| only1 | 1 | 70.00 | 70.00 | +30.00 | 0 of 1 |")
