"""Colorizing with a trained checkpoint: model loading, memory retrieval, full-resolution output.

Colour is predicted at the model's size and its ab upsampled and joined with the input's own
full-resolution L, so outputs keep the input's resolution and detail. The memory is the checkpoint's
own (served by an embedded server started here) or a named memory on a running server.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from memory_server.client import MemoryClient, MemoryServerError, MemoryUnavailable
from memory_server.launcher import start_server
from pccnet.color import NUM_BINS, denormalize_ab, lab_to_rgb, normalize_light, rgb_to_lab
from trainer.checkpoint import CheckpointError, load_for_inference
from trainer.memory import RESTORE_CHUNK
from trainer.models import build_extractor, build_generator, load_trainable_state
from trainer.step import retrieve_color_feature

log = logging.getLogger(__name__)

# What a user can get wrong (a path, a memory name, a server address): printed, not a traceback.
USER_ERRORS = (CheckpointError, ValueError, FileNotFoundError, MemoryServerError, MemoryUnavailable)

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
                 memory_from: str | Path | None = None, connect_memory: bool = True) -> None:
        self.device = pick_device(device)
        state = load_for_inference(checkpoint, map_location="cpu")
        self.path = state["path"]
        self.cfg = state["config"]
        self.image_size = self.cfg.data.image_size
        self.background = self.cfg.data.background
        self.generator = build_generator(self.cfg.model, loss=None).generator
        gen_state = {k[len("generator."):]: v for k, v in state["models"]["generator"].items()
                     if k.startswith("generator.")}
        self.generator.load_state_dict(gen_state)
        # memory_from: the extractor and memory of another checkpoint (phase 2 never reads the memory, so
        # a generator can be scored with any memory trained for the same data).
        source = state if memory_from is None else load_for_inference(memory_from, map_location="cpu")
        self.memory_source = source["path"]
        self.extractor_dim = source["config"].model.extractor_dim
        self.extractor = build_extractor(source["config"].model)
        load_trainable_state(self.extractor, source["models"]["extractor"], "extractor")
        self.generator.to(self.device).eval()
        self.extractor.to(self.device).eval()
        self.use_memory = self.cfg.model.use_memory
        self.memory_name = memory_name or source["config"].memory.name
        self._server = None
        self._tmp = None
        self.client = None
        self.capacity = None
        saved = source["memory"]
        if memory is not None and is_pack_path(memory):
            # A pack file: checked against this extractor, then served like the checkpoint's own memory.
            from trainer.packs import check_identity, extractor_identity, read_pack

            pack = read_pack(memory)
            check_identity(pack, extractor_identity(self.extractor, source["config"].data.image_size), memory)
            saved, memory, self.memory_name = pack.arrays(), None, memory_name or pack.name
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
            for start in range(0, m, RESTORE_CHUNK):
                stop = min(m, start + RESTORE_CHUNK)
                self.client.put(np.arange(start, stop, dtype=np.int64), saved["keys"][start:stop],
                                saved["values"][start:stop], ages=saved["ages"][start:stop].astype(np.float32),
                                item_ids=saved["item_ids"][start:stop])
        else:
            self.client = MemoryClient(endpoint, timeout_ms=timeout_ms, memory=self.memory_name)
        info = self.client.info(memory=self.memory_name)
        if "capacity" not in info:
            raise ValueError(f"memory {self.memory_name!r} does not exist on {endpoint} "
                             f"(it holds {info.get('memories')})")
        if info["key_dim"] != self.extractor_dim or info["value_dim"] != NUM_BINS:
            raise ValueError(f"memory {self.memory_name!r} has key_dim {info['key_dim']} and value_dim "
                             f"{info['value_dim']}; this checkpoint needs {self.extractor_dim} and {NUM_BINS}")
        self.capacity = int(info["capacity"])

    @torch.no_grad()
    def color_features(self, light: Tensor) -> Tensor:
        """Network-scaled light [B,1,S,S] -> the colour feature the generator is conditioned on."""
        if not self.use_memory:
            return torch.full((light.shape[0], NUM_BINS), 1.0 / NUM_BINS, device=light.device)
        return self.retrieve(light)

    @torch.no_grad()
    def retrieve(self, light: Tensor, return_slots: bool = False):
        """The memory's answer for network-scaled light [B,1,S,S]: the colour distribution [B,313]
        (and the slot ids [B] it came from with return_slots)."""
        if self.client is None:
            raise ValueError(f"checkpoint {self.path}: no memory is open (pass need_memory=True)")
        c, slots = retrieve_color_feature(self.extractor, light.to(self.device), self.client, name=self.memory_name,
                                          capacity=self.capacity)
        return (c, slots) if return_slots else c

    @torch.no_grad()
    def predict_ab(self, light: Tensor, color_feature: Tensor | None = None) -> Tensor:
        """Network-scaled light [B,1,S,S] at the model size -> ab/110 [B,2,S,S].

        `color_feature` [B,313] replaces the memory's answer (evaluate.py --color-feature own).
        """
        light = light.to(self.device)
        c = self.color_features(light) if color_feature is None else color_feature.to(self.device, light.dtype)
        return self.generator(light, c)

    @torch.no_grad()
    def colorize_images(self, images: list[Image.Image]) -> list[np.ndarray]:
        """RGB PIL images of any size (colour or gray) -> colour uint8 arrays [H,W,3] at the input's size."""
        if not images:
            return []
        light, fulls = self.prepare_light(images)
        return self.compose(self.predict_ab(light), fulls)

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
