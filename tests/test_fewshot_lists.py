"""launch/fewshot_lists.py: a data set's split as the few-shot scoreboard's two files (base list, novel file)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launch.fewshot_lists import main
from trainer.config import FewshotConfig
from trainer.fewshot import load_data, parse_novel, read_base_list


def _pokemon(root, train, test):
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "split_altform_train.txt").write_text("".join(f"{n}\n" for n in train))
    (root / "split_altform_test.txt").write_text("".join(f"{n}\n" for n in test))
    return root


def test_each_test_form_gets_its_base_form_as_the_one_exemplar(tmp_path, capsys):
    data = _pokemon(tmp_path / "pk", ["1.png", "2.png", "6.png", "10.png", "25-belle.png"],
                    ["6-mega-y.png", "10-x.png", "6-mega-x.png"])
    assert main(["pokemon-altform", "--data", str(data), "--out", str(tmp_path / "lists")]) == 0
    assert "3 base images, 2 novel classes, 5 novel images" in capsys.readouterr().out
    # No novel character is seen in training; its other forms there (none here) would stay.
    assert read_base_list(tmp_path / "lists" / "base.txt") == ["1.png", "2.png", "25-belle.png"]
    classes = parse_novel((tmp_path / "lists" / "novel.tsv").read_text())
    assert classes == {"6": ["6.png", "6-mega-x.png", "6-mega-y.png"], "10": ["10.png", "10-x.png"]}
    # The scoreboard reads them: K = 1 leaves each class's alternate forms as its test images.
    fs = FewshotConfig(base=str(tmp_path / "lists" / "base.txt"), novel=str(tmp_path / "lists" / "novel.tsv"),
                       images=str(data / "images"), shots=(1,))
    assert [n for _, n in load_data(fs).test()] == ["6-mega-x.png", "6-mega-y.png", "10-x.png"]


@pytest.mark.parametrize("train, test, needle", [
    (["1.png"], ["6-mega.png"], "base forms not in split_altform_train.txt: 6.png"),
    (["6.png"], ["6.png"], "'6.png' in split_altform_test.txt is not an alternate form"),
    (["6.png"], ["6-mega.png"], "no training image is left once the 1 exemplar base forms are taken out"),
])
def test_a_split_it_cannot_use_is_a_clear_error(tmp_path, capsys, train, test, needle):
    data = _pokemon(tmp_path / "pk", train, test)
    assert main(["pokemon-altform", "--data", str(data), "--out", str(tmp_path / "lists")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "lists" / "base.txt").exists()


def test_a_missing_split_file_is_named(tmp_path, capsys):
    assert main(["pokemon-altform", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "lists")]) == 2
    assert "split_altform_train.txt does not exist" in capsys.readouterr().err


@pytest.mark.shared_data
def test_the_real_pokemon_split(shared_data, tmp_path):
    out = tmp_path / "lists"
    assert main(["pokemon-altform", "--data", str(shared_data / "pokemon"), "--out", str(out)]) == 0
    base, classes = read_base_list(out / "base.txt"), parse_novel((out / "novel.tsv").read_text())
    assert (len(base), len(classes), sum(map(len, classes.values()))) == (693, 56, 126)
    novel = {n for names in classes.values() for n in names}
    assert not novel & set(base) and all((shared_data / "pokemon" / "images" / n).is_file() for n in novel | set(base))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.sets(st.integers(1, 999), min_size=1, max_size=12), data=st.data())
def test_any_altform_split_round_trips_through_the_scoreboard_files(tmp_path_factory, ids, data):
    """Whatever the split: every test form is a test image of its own class exactly once, after its base
    form; no novel character is in the base list; every other training image is."""
    ids = sorted(ids)
    novel_ids = data.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
    forms = {i: data.draw(st.lists(st.sampled_from(["mega", "mega-x", "alola", "f", "b"]), min_size=1, max_size=3,
                                   unique=True)) for i in novel_ids}
    extra = [f"{i}-g.png" for i in ids if i not in forms]  # alternate forms that stay in training
    train = [f"{i}.png" for i in ids] + extra
    test = [f"{i}-{f}.png" for i, fs in forms.items() for f in fs]
    root = tmp_path_factory.mktemp("split")
    data_dir = _pokemon(root / "pk", data.draw(st.permutations(train)), data.draw(st.permutations(test)))
    expected_base = set(train) - {f"{i}.png" for i in forms}
    if not expected_base:  # every training image would be an exemplar: nothing to train on
        assert main(["pokemon-altform", "--data", str(data_dir), "--out", str(root / "lists")]) == 2
        return
    assert main(["pokemon-altform", "--data", str(data_dir), "--out", str(root / "lists")]) == 0
    base, classes = read_base_list(root / "lists" / "base.txt"), parse_novel((root / "lists" / "novel.tsv").read_text())
    assert set(classes) == {str(i) for i in forms}
    for i, fs in forms.items():
        assert classes[str(i)][0] == f"{i}.png"
        assert sorted(classes[str(i)][1:]) == sorted(f"{i}-{f}.png" for f in fs)
    assert set(base) == expected_base and len(base) == len(set(base))
