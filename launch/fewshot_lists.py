"""Write the few-shot scoreboard's two files (a base list, a label<TAB>image novel file) from a data set's split.

    python launch/fewshot_lists.py pokemon-altform --data ../shared/data/pokemon --out runs/fewshot_lists/pokemon

pokemon-altform (pokemon/MANIFEST.md, "split_altform"): each test image is an alternate form
`<id>-<form>.png` whose base form `<id>.png` exists. The novel classes are those ids: each class's
first image (its one exemplar, K = 1) is the base form, then its alternate forms (the test images).
The base list is the split's training list without those base forms, so that no novel character is
seen in training. The files only name images; launch/fewshot.py reads the pixels from --data/images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.common import report_errors


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def pokemon_altform(data: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(base training names, novel (label, name) rows in exemplar order) of the alternate-form split."""
    train, test = _lines(data / "split_altform_train.txt"), _lines(data / "split_altform_test.txt")
    forms: dict[str, list[str]] = {}
    for name in test:
        stem = Path(name).stem
        if "-" not in stem:
            raise ValueError(f"{name!r} in split_altform_test.txt is not an alternate form <id>-<form>.png")
        forms.setdefault(stem.split("-", 1)[0], []).append(name)
    known = set(train)
    missing = sorted(f"{label}.png" for label in forms if f"{label}.png" not in known)
    if missing:
        raise ValueError(f"base forms not in split_altform_train.txt: {', '.join(missing[:5])}")
    exemplars = {f"{label}.png" for label in forms}
    base = [name for name in train if name not in exemplars]
    if not base:
        raise ValueError(f"no training image is left once the {len(exemplars)} exemplar base forms are taken out "
                         "of split_altform_train.txt")
    novel = [(label, name) for label in sorted(forms, key=int) for name in [f"{label}.png", *sorted(forms[label])]]
    return base, novel


SPLITS = {"pokemon-altform": pokemon_altform}


def write(split: str, data: Path, out: Path) -> tuple[Path, Path]:
    base, novel = SPLITS[split](data)
    out.mkdir(parents=True, exist_ok=True)
    base_path, novel_path = out / "base.txt", out / "novel.tsv"
    base_path.write_text("".join(f"{name}\n" for name in base))
    novel_path.write_text("label\timage\n" + "".join(f"{label}\t{name}\n" for label, name in novel))
    print(f"{split}: {len(base)} base images, {len({label for label, _ in novel})} novel classes, "
          f"{len(novel)} novel images -> {base_path}, {novel_path}")
    return base_path, novel_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("split", choices=sorted(SPLITS))
    parser.add_argument("--data", required=True, help="the data set's folder (holds its split files)")
    parser.add_argument("--out", required=True, help="folder for base.txt and novel.tsv")
    args = parser.parse_args(argv)
    return report_errors(lambda: write(args.split, Path(args.data), Path(args.out)), (FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
