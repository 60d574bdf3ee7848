"""Using a trained checkpoint: colorizing images (Colorizer; folders: trainer/folders.py) and memorizing new ones.

Colour is predicted at the model's size and its ab upsampled and joined with the input's own
full-resolution L, so outputs keep the input's resolution and detail. The memory is the checkpoint's
own (served by an embedded server started here) or a named memory on a running server. `memorize`
writes colour images into a named memory of a running server, one slot each (few-shot memories).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from memory_server.client import MemoryClient, MemoryServerError, MemoryUnavailable
from memory_server.launcher import start_server
from pccnet.color import NUM_BINS, denormalize_ab, lab_to_rgb, normalize_light, rgb_to_lab
from pccnet.extractor import MemoryExtractor
from pccnet.generator import Generator
from trainer.checkpoint import (
    CheckpointError,
    generator_state,
    load_for_inference,
    load_trainable_state,
    restore_memory,
)
from trainer.config import ConfigError, retrieval_with
from trainer.data import DataError
from trainer.exemplars import memorize_images
from trainer.images import center_crop_resize, load_rgb, to_rgb
from trainer.retrieval import (
    RetrievalOptions,
    retrieve_answers,
    retrieve_color_feature,
    uniform_color_feature,
)
from trainer.shards import item_id

log = logging.getLogger(__name__)

# What a user can get wrong (a path, a memory name, a server address, a config value, a data pattern):
# printed as one line by the entry points, not a traceback.
USER_ERRORS = (CheckpointError, ConfigError, DataError, ValueError, FileNotFoundError, MemoryServerError,
               MemoryUnavailable)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (recursive) and globs -> sorted unique image paths; an input matching nothing is an error."""
    import glob

    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            matches = [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif p.is_file():
            matches = [p]
        else:
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if Path(m).is_file()]
        if not matches:
            raise FileNotFoundError(f"input {item!r} matches no image file")
        found.extend(matches)
    seen, unique = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def is_pack_path(memory: str) -> bool:
    """True when a --memory value names a pack file rather than a server endpoint."""
    if memory.startswith(("tcp://", "ipc://", "inproc://")):
        return False
    if not Path(memory).is_file():
        raise FileNotFoundError(f"--memory {memory!r} is neither a server endpoint (tcp://..., ipc://...) nor a "
                                "pack file")
    return True


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Colorizer:
    """A checkpoint's generator and extractor plus a memory to retrieve colour features from."""

    def __init__(self, checkpoint: str | Path, device: str | None = None, memory: str | None = None,
                 memory_name: str | None = None, timeout_ms: int = 30000, need_memory: bool = False,
                 memory_from: str | Path | None = None, connect_memory: bool = True,
                 retrieval: RetrievalOptions | None = None, retrieval_options: tuple[str, ...] | list[str] = ()
                 ) -> None:
        self.device = pick_device(device)
        state = load_for_inference(checkpoint, map_location="cpu")
        self.path = state["path"]
        self.cfg = state["config"]
        # How retrieval forms its answer: the checkpoint's `retrieval:` section ("key=value" overrides applied)
        # unless given here.
        self.retrieval = (retrieval if retrieval is not None
                          else RetrievalOptions.of(retrieval_with(self.cfg, retrieval_options)))
        self.image_size = self.cfg.data.image_size
        self.background = self.cfg.data.background
        self.generator = Generator(self.cfg.model.generator)
        self.generator.load_state_dict(generator_state(state["models"]))
        # memory_from: the extractor and memory of another checkpoint (phase 2 does not read the memory unless
        # phase2.feature_blend_towards is 'retrieved', so a generator can be scored with any memory trained
        # for the same data).
        source = state if memory_from is None else load_for_inference(memory_from, map_location="cpu")
        self.memory_source = source["path"]
        self.extractor_dim = source["config"].model.extractor.dim
        self.extractor = load_extractor(source, self.device)
        self.generator.to(self.device).eval()
        self.use_memory = self.cfg.model.use_memory
        self.memory_name = memory_name or source["config"].memory.name
        self._server = None
        self._tmp = None
        self.client = None
        self.capacity = None
        saved = source["memory"]
        # What the manifest of a folder run names as the memory.
        self.memory_label = f"{memory} {self.memory_name}" if memory else f"checkpoint {self.memory_name}"
        if memory is not None and is_pack_path(memory):
            # A pack file: checked against this extractor, then served like the checkpoint's own memory.
            from trainer.packs import check_identity, extractor_identity, read_pack

            pack = read_pack(memory)
            check_identity(pack, extractor_identity(self.extractor, source["config"].data.image_size), memory)
            self.memory_label = f"pack {Path(memory).name}"
            saved, memory, self.memory_name = pack.arrays(), None, memory_name or pack.name
        if not self.use_memory:
            self.memory_label = "none (the model does not use a memory)"
        # connect_memory False: the caller manages memories itself (the studio); the saved one is kept for it.
        self.saved_memory = None if connect_memory else saved
        if connect_memory and (self.use_memory or need_memory):
            self._open_memory(saved, memory, timeout_ms)

    def _open_memory(self, saved: dict | None, endpoint: str | None, timeout_ms: int) -> None:
        if endpoint is None:
            if saved is None:
                raise ValueError(f"checkpoint {self.memory_source} holds no memory; pass --memory to use a running "
                                 "server")
            # The checkpoint's own memory, served by a throwaway embedded server.
            self._tmp = tempfile.mkdtemp(prefix="pccnet-colorize-")
            self._server = start_server(self._tmp, bind="tcp://127.0.0.1:0", durability="none")
            endpoint = self._server.endpoint
            self.client = MemoryClient(endpoint, timeout_ms=timeout_ms, memory=self.memory_name)
            m, dk = saved["keys"].shape
            self.client.create(capacity=m, key_dim=dk, value_dim=saved["values"].shape[1])
            restore_memory(self.client, saved)
        else:
            self.client = MemoryClient(endpoint, timeout_ms=timeout_ms, memory=self.memory_name)
        info = self.client.info(memory=self.memory_name)
        if "capacity" not in info:
            raise ValueError(f"memory {self.memory_name!r} does not exist on {endpoint} "
                             f"(it holds {info.get('memories')})")
        _check_memory_shape(info, self.memory_name, self.extractor_dim)
        self.capacity = int(info["capacity"])

    @torch.no_grad()
    def color_features(self, light: Tensor) -> Tensor:
        """Network-scaled light [B,1,S,S] -> the colour feature the generator is conditioned on."""
        if not self.use_memory:
            return uniform_color_feature(light.shape[0], light.device)
        return self.retrieve(light)

    @torch.no_grad()
    def retrieve(self, light: Tensor, return_slots: bool = False):
        """The memory's answer for network-scaled light [B,1,S,S]: the colour distribution [B,313]
        (and the slot ids [B] it came from with return_slots)."""
        if self.client is None:
            raise ValueError(f"checkpoint {self.path}: no memory is open (pass need_memory=True)")
        c, slots = retrieve_color_feature(self.extractor, light.to(self.device), self.client, name=self.memory_name,
                                          capacity=self.capacity, options=self.retrieval)
        return (c, slots) if return_slots else c

    @torch.no_grad()
    def predict_ab(self, light: Tensor, color_feature: Tensor | None = None) -> Tensor:
        """Network-scaled light [B,1,S,S] at the model size -> ab/110 [B,2,S,S].

        `color_feature` [B,313] replaces the memory's answer (evaluate.py --color-feature own).
        """
        light = light.to(self.device)
        c = self.color_features(light) if color_feature is None else color_feature.to(self.device, light.dtype)
        return self.generator(light, c)

    @classmethod
    def from_pretrained(cls, path: str | Path, memory: str | None = None, memory_name: str | None = None,
                        device: str | None = None) -> Colorizer:
        """A checkpoint, a run's folder (its latest) or an exported bundle, ready to colorize; close() it, or
        use it in a `with`.

        memory: None for the checkpoint's own memory (served by an embedded server), "tcp://HOST:PORT"
        (or ipc://) for a running server (memory_name picks the memory there), or a pack file's path
        (served by an embedded server after its extractor identity is checked). device: "cuda" when
        present, else "cpu".
        """
        return cls(path, device=device, memory=memory, memory_name=memory_name)

    @torch.no_grad()
    def colorize(self, images, batch_size: int | None = None):
        """PIL image, ndarray or a list of them -> colour PIL image(s) at each input's own resolution.

        Arrays: [H,W] gray, [H,W,3] RGB or [H,W,4] RGBA, as uint8, uint16 or floats in [0,1]; colour
        inputs are made gray first, transparency is composited onto the training background. Batches
        of `batch_size` images share one memory query and one generator pass (default 16 on a CPU, 64
        on a GPU; the full-resolution steps run one image at a time, so large photos stay cheap).
        """
        single = not isinstance(images, (list, tuple))
        items = [as_rgb_image(x, self.background) for x in ([images] if single else images)]
        step = batch_size or (64 if self.device.type == "cuda" else 16)
        if step < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = []
        for start in range(0, len(items), step):
            out.extend(Image.fromarray(a) for a in self.colorize_images(items[start:start + step]))
        return out[0] if single else out

    @torch.no_grad()
    def colorize_images(self, images: list[Image.Image], with_answers: bool = False):
        """RGB PIL images of any size (colour or gray) -> colour uint8 arrays [H,W,3] at the input's size.

        with_answers: also, per image, {'slot', 'similarity'} of the memory slot that answered (None for
        both without a memory, or when no written slot answered).
        """
        if not images:
            return ([], []) if with_answers else []
        light, fulls = self.prepare_light(images)
        if not with_answers:
            return self.compose(self.predict_ab(light), fulls)
        answers = [{"slot": None, "similarity": None} for _ in images]
        if self.use_memory:
            c, slots, sims, written = retrieve_answers(self.extractor, light.to(self.device), self.client,
                                                       name=self.memory_name, capacity=self.capacity,
                                                       options=self.retrieval)
            answers = [{"slot": int(s), "similarity": round(float(x), 4)} if w else dict(answers[0])
                       for s, x, w in zip(slots, sims, written)]
            fake_ab = self.predict_ab(light, color_feature=c)
        else:
            fake_ab = self.predict_ab(light)
        return self.compose(fake_ab, fulls), answers

    @torch.no_grad()
    def prepare_light(self, images: list[Image.Image]) -> tuple[Tensor, list[Tensor]]:
        """RGB PIL images -> (network-scaled light at the model size [B,1,S,S], full-size L [1,1,H,W] each)."""
        smalls, fulls = [], []
        for img in images:
            rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            light_full = rgb_to_lab(rgb[None].to(self.device))[:, :1]  # [1,1,H,W], L in [0,100]
            fulls.append(light_full)
            small = F.interpolate(light_full, size=(self.image_size, self.image_size), mode="bilinear",
                                  antialias=True, align_corners=False)
            smalls.append(normalize_light(small))
        return torch.cat(smalls), fulls

    @torch.no_grad()
    def compose(self, fake_ab: Tensor, fulls: list[Tensor]) -> list[np.ndarray]:
        """Predicted ab/110 [B,2,S,S] + each image's full-size L -> colour uint8 arrays [H,W,3]."""
        out = []
        for i, light_full in enumerate(fulls):
            h, w = light_full.shape[-2:]
            ab = F.interpolate(fake_ab[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)
            rgb = lab_to_rgb(torch.cat((light_full, denormalize_ab(ab)), dim=1))
            out.append((rgb[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
        return out

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Colorizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_rgb_image(x, background: str = "white") -> Image.Image:
    """A PIL image or an array ([H,W], [H,W,3], [H,W,4]; uint8, uint16 or floats in [0,1]) -> RGB PIL image."""
    if isinstance(x, Image.Image):
        return to_rgb(x, background)
    arr = np.asarray(x)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape[:2]:
        raise ValueError(f"an image array must be [H,W], [H,W,3] or [H,W,4], got shape {arr.shape}")
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError("a float image array must hold values in [0, 1]")
        arr = (arr * 255.0).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8, uint16 or float, got {arr.dtype}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)), background)  # L, RGB or RGBA by shape


def load_extractor(state: dict, device: torch.device | str = "cpu") -> MemoryExtractor:
    """The memory feature extractor of a load_for_inference() dict, in eval mode on `device`."""
    extractor = MemoryExtractor(state["config"].model.extractor)
    load_trainable_state(extractor, state["models"]["extractor"], "extractor")
    return extractor.to(device).eval()


def _check_memory_shape(info: dict, name: str, key_dim: int) -> None:
    if (info["key_dim"], info["value_dim"]) != (key_dim, NUM_BINS):
        raise ValueError(f"memory {name!r} has key_dim {info['key_dim']} and value_dim {info['value_dim']}; "
                         f"this checkpoint needs {key_dim} and {NUM_BINS}")


def _open_named_memory(client: MemoryClient, name: str, capacity: int, key_dim: int) -> tuple[int, bool]:
    """Create memory `name` if absent: (its capacity, whether it was created). Another shape is a ValueError."""
    info = client.info(memory=name)
    if "capacity" not in info:
        client.create(capacity=capacity, key_dim=key_dim, value_dim=NUM_BINS, memory=name)
        return capacity, True
    _check_memory_shape(info, name, key_dim)
    return int(info["capacity"]), False


def memorize(checkpoint: str | Path, endpoint: str, name: str, paths: list[Path], capacity: int = 1024,
             batch_size: int = 16, device: str | None = None, progress: bool = True) -> dict:
    """Write each colour image into memory `name` on a running server, a slot of its own.

    Written by trainer.exemplars.memorize_images: its key the checkpoint extractor's query of its gray
    version, its value its 313-bin colour distribution; an update with threshold 0 is a miss for every
    row. The memory is created (with `capacity` slots) if absent. Returns {'written': [(path, slot)],
    'failed': [(path, reason)], 'capacity', 'created'}.
    """
    state = load_for_inference(checkpoint)
    cfg = state["config"]
    dev = pick_device(device)
    extractor = load_extractor(state, dev)
    flip = RetrievalOptions.of(cfg.retrieval).flip
    size = cfg.data.image_size
    written, failed = [], []
    with MemoryClient(endpoint, memory=name) as client:
        capacity, created = _open_named_memory(client, name, capacity, cfg.model.extractor.dim)
        if len(paths) > capacity:
            log.warning("%d images into %d slots: the oldest writes are replaced", len(paths), capacity)
        step = min(batch_size, capacity)
        for start in tqdm(range(0, len(paths), step), desc="memorize", unit="batch", disable=not progress):
            images, names = [], []
            for p in paths[start:start + step]:
                try:
                    images.append(center_crop_resize(load_rgb(p, cfg.data.background), size))
                    names.append(p)
                except Exception as e:  # report unreadable files by name, keep going
                    failed.append((p, str(e)))
            if not images:
                continue
            # The studio's and the scoreboard's writer too: keys formed as the checkpoint's queries (retrieval.flip).
            slots = memorize_images(extractor, client, name, images, size, [item_id(str(p)) for p in names], dev, flip)
            written.extend(zip(names, slots.tolist()))
    return {"written": written, "failed": failed, "capacity": capacity, "created": created}


def colorize_command(checkpoint: str | Path, inputs: list[str], output: str | Path, memory: str | None = None,
                     memory_name: str | None = None, batch_size: int = 8, device: str | None = None,
                     overwrite: bool = False, retrieval_options: tuple[str, ...] | list[str] = ()) -> int:
    """launch/colorize.py: colour PNGs of every input (trainer/folders.py); prints unreadable ones and a summary.

    Exit code 1 when no input could be read (and none was done before), else 0.
    """
    from trainer.folders import colorize_files

    paths = expand_inputs(inputs)
    with Colorizer(checkpoint, device=device, memory=memory, memory_name=memory_name,
                   retrieval_options=retrieval_options) as col:
        report = colorize_files(col, paths, output, batch_size, overwrite=overwrite)
    for path, why in report["failed"]:
        print(f"skipped {path}: {why}", file=sys.stderr)
    skipped = f"; {report['skipped']} already there (--overwrite redoes them)" if report["skipped"] else ""
    print(f"colorized {report['written']} of {len(paths)} images into {output}{skipped}; "
          f"manifest {report['manifest']}")
    return 1 if report["failed"] and report["written"] + report["skipped"] == 0 else 0


def memorize_command(checkpoint: str | Path, endpoint: str, name: str, inputs: list[str], capacity: int = 1024,
                     batch_size: int = 16, device: str | None = None) -> int:
    """launch/memorize.py: memorize every input image and print its slot; exit code 1 when none was written."""
    paths = expand_inputs(inputs)
    report = memorize(checkpoint, endpoint, name, paths, capacity, batch_size, device)
    if report["created"]:
        print(f"created memory {name!r} on {endpoint}: {report['capacity']} slots")
    for p, why in report["failed"]:
        print(f"skipped {p}: {why}", file=sys.stderr)
    for p, slot in report["written"]:
        print(f"slot {slot:6d}  {p}")
    print(f"memorized {len(report['written'])} of {len(paths)} images into memory {name!r} on {endpoint}")
    return 0 if report["written"] else 1

