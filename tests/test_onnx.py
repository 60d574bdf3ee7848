"""ONNX export (launch/export.py --onnx): onnxruntime colorizes the demo's photos as torch does.

The model is studiohelpers' tiny untrained checkpoint with the demo's extractor backbone (the frozen
ImageNet AlexNet); the photos are the demo's held-out ones and one of its training photos, from the
scikit-image wheel (launch/demo.py). Compared: each graph against the same computation in torch (within
1e-3 on RGB in [0, 1] and on the keys), the whole onnxruntime colorization (launch/onnx_colorize.py,
numpy retrieval over the bundle's pack) against Colorizer (its memory served by a real embedded server):
the same slot answers and the 8-bit images differ by at most one level. The torch-free runner is also
run in a process where importing torch fails.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from studiohelpers import env, make_checkpoint

from launch.demo import HELD_OUT, skimage_photos
from launch.export import main as export_main
from launch.onnx_colorize import OnnxColorizer
from trainer.inference import Colorizer
from trainer.onnx_export import ExtractorGraph, GeneratorGraph

pytestmark = pytest.mark.integration
PHOTOS = (*HELD_OUT, "astronaut.png")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    run = make_checkpoint(root / "run", overrides=("model.extractor.backbone=alexnet-imagenet",))
    assert export_main(["--checkpoint", str(run), "--output", str(root / "model"), "--onnx"]) == 0
    return root / "model"


@pytest.fixture(scope="module")
def photos():
    found = skimage_photos()
    return {name: Image.open(found[name]).convert("RGB") for name in PHOTOS}


def test_the_graphs_match_torch_within_1e_3(model, photos):
    ort = OnnxColorizer(model)
    with Colorizer(model, device="cpu", connect_memory=False) as col:
        ext, gen = ExtractorGraph(col.extractor, col.image_size), GeneratorGraph(col.generator, col.image_size)
        rng = np.random.default_rng(0)
        for name, img in photos.items():
            rgb = np.asarray(img, np.float32)[None].transpose(0, 3, 1, 2) / 255.0
            color = rng.dirichlet(np.full(313, 0.1), 1).astype(np.float32)
            with torch.no_grad():
                key = ext(torch.from_numpy(rgb)).numpy()
                out = gen(torch.from_numpy(rgb), torch.from_numpy(color)).numpy()
            got_key = ort.extractor.run(None, {"rgb": rgb})[0]
            got = ort.generator.run(None, {"rgb": rgb, "color": color})[0]
            assert got.shape == out.shape == (1, 3, img.height, img.width), name
            assert np.abs(got_key - key).max() < 1e-3, name
            assert np.abs(got - out).max() < 1e-3, name
            # The colour feature visibly changes the output: the comparison covers the path it takes.
            other = ort.generator.run(None, {"rgb": rgb, "color": np.roll(color, 100, axis=1)})[0]
            assert np.abs(other - got).max() > 0.01, name  # 10x the tolerance


def test_onnxruntime_colorizes_the_demo_photos_as_torch_does(model, photos):
    ort = OnnxColorizer(model)
    with Colorizer.from_pretrained(model, device="cpu") as col:
        for name, img in photos.items():
            [want], [answer] = col.colorize_images([img], with_answers=True)
            got, slot, similarity = ort.colorize_array(np.asarray(img, np.float32) / 255.0)
            assert slot == answer["slot"] and abs(similarity - answer["similarity"]) < 1e-3, name
            got8 = (got * 255.0).round().astype(np.uint8)
            assert got8.shape == want.shape == (img.height, img.width, 3), name
            assert np.abs(got8.astype(int) - want.astype(int)).max() <= 1, name


def test_the_runner_needs_no_torch(model, photos, tmp_path):
    src = tmp_path / "in.png"
    photos[HELD_OUT[0]].convert("L").save(src)  # a gray photo, as users bring them
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            "from launch.onnx_colorize import main\n"
            f"sys.exit(main(['--model', {str(model)!r}, '--input', {str(src)!r}, 'missing.png', "
            f"'--output', {str(tmp_path / 'out')!r}]))")
    res = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "skipped missing.png" in res.stderr
    got = np.asarray(Image.open(tmp_path / "out" / "in.png"))
    with Image.open(src) as gray:
        want = np.asarray(OnnxColorizer(model).colorize(gray))
    np.testing.assert_array_equal(got, want)
    assert got.shape == (photos[HELD_OUT[0]].height, photos[HELD_OUT[0]].width, 3)
