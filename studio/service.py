"""The studio's operations on a checkpoint and a memory server, independent of HTTP.

Lists, creates and fills memories (trainer/exemplars.py), frees slots, colorizes stored photos with a
chosen memory (reporting the slot that answered and its similarity), and exports and imports packs
(trainer/packs.py). Not thread-safe by design: the HTTP layer runs every call on one worker thread,
so the model and the memory client (a ZeroMQ socket) are only ever used from that thread.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from memory_server.client import MemoryClient
from memory_server.launcher import start_server
from pccnet.color import AB_BINS, NUM_BINS, lab_to_rgb
from studio.store import ExemplarRegistry, FileStore, png_bytes, thumbnail_png
from studio.uploads import Limits, UploadError, decode_image, display_name
from trainer.exemplars import ensure_memory, free_slots, memorize_images, pixel_item_id, written_slots
from trainer.inference import Colorizer
from trainer.packs import (
    Pack,
    PackError,
    export_pack,
    extractor_description,
    extractor_identity,
    import_pack,
    pack_bytes,
    read_pack,
)
from trainer.retrieval import retrieve_answers

log = logging.getLogger(__name__)

_MEMORY_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")  # the server's rule (PROTOCOL.md), checked early
# Memories up to this many key floats are exported to list their written slots (cached per version);
# larger ones show the server's `filled` count only.
EXPORT_LIMIT_FLOATS = 1 << 25
SHOWN_SLOTS = 512  # slot tiles per memory on the page
MEMORIZE_CHUNK = 32  # exemplars per update request


class StudioError(ValueError):
    """A request the studio cannot carry out; the message is shown on the page."""


def palette(values: np.ndarray, n: int = 4) -> list[dict[str, Any]]:
    """The `n` heaviest ab bins of a colour distribution as sRGB hex colours (at L = 65) and their shares."""
    top = np.argsort(values)[::-1][:n]
    ab = AB_BINS[torch.from_numpy(top.copy())]  # [n, 2]
    lab = torch.cat([torch.full((n, 1), 65.0), ab.float()], dim=1).T.reshape(1, 3, 1, n)
    rgb = (lab_to_rgb(lab)[0, :, 0].T.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    mass = values[top] / max(float(values[top].sum()), 1e-12)
    return [{"color": "#{:02x}{:02x}{:02x}".format(*c), "share": round(float(w), 3)} for c, w in zip(rgb, mass)]


class Studio:
    """A checkpoint's models, a memory server (embedded unless `memory` names one) and the studio's files."""

    def __init__(self, checkpoint: str | Path, memory: str | None = None, data_dir: str | Path | None = None,
                 device: str | None = None, capacity: int = 1024, limits: Limits | None = None,
                 timeout_ms: int = 30000, retrieval_options: tuple[str, ...] | list[str] = ()) -> None:
        self.limits = limits or Limits()
        self.capacity = capacity
        self.work = Path(tempfile.mkdtemp(prefix="pccnet-studio-"))
        self.server = None
        self.client = None
        try:
            self.colorizer = Colorizer(checkpoint, device=device, connect_memory=False,
                                       retrieval_options=retrieval_options)
            col = self.colorizer
            self.image_size = col.image_size
            self.key_dim = col.extractor_dim
            size = col.cfg.data.image_size
            self.identity = extractor_identity(col.extractor, size)
            self.extractor_info = extractor_description(col.extractor, size)
            if memory is None:
                store = Path(data_dir) if data_dir else self.work / "memory"
                store.mkdir(parents=True, exist_ok=True)
                # Its own session: a signal to the studio's group reaches the studio only, which then stops
                # the server once (close()), instead of both racing to shut it down.
                self.server = start_server(store, durability="always" if data_dir else "none",
                                           log_path=self.work / "memory-server.log", own_session=True)
                memory = self.server.endpoint
            self.endpoint = memory
            with MemoryClient(memory, timeout_ms=3000, retries=1) as probe:  # fail fast on a wrong address
                probe.ping()
            self.client = MemoryClient(memory, timeout_ms=timeout_ms)
            self.default_memory = self._serve_checkpoint_memory() if self.server is not None else None
            registry = Path(data_dir) / "studio" if data_dir else self.work / "exemplars"
            self.registry = ExemplarRegistry(registry)
            self.files = FileStore(self.work)
            self._exports: dict[str, tuple[int, np.ndarray, dict[int, list]]] = {}
        except BaseException:
            self.close()
            raise

    def _serve_checkpoint_memory(self) -> str | None:
        """Put the checkpoint's trained memory into the embedded server (unless a kept data dir has it)."""
        saved, name = self.colorizer.saved_memory, self.colorizer.memory_name
        if saved is None or name in self.client.info().get("memories", []):
            return name if saved is not None else None
        pack = Pack(name=name, keys=saved["keys"], values=saved["values"],
                    ages=saved["ages"].astype(np.float32), item_ids=saved["item_ids"].astype(np.int64))
        import_pack(self.client, pack, verify=False)
        self.colorizer.saved_memory = None
        return name

    # --- status and memories -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        col = self.colorizer
        return {"checkpoint": str(col.path), "image_size": self.image_size, "key_dim": self.key_dim,
                "identity": self.identity, "extractor": self.extractor_info, "endpoint": self.endpoint,
                "embedded": self.server is not None, "uses_memory": bool(col.use_memory),
                "default_memory": self.default_memory, "capacity": self.capacity, "device": str(col.device),
                "limits": {"file_mb": self.limits.file_bytes / 2**20, "pixels": self.limits.pixels,
                           "files": self.limits.files_per_request}}

    def check_name(self, name: str) -> str:
        if not isinstance(name, str) or not _MEMORY_NAME.match(name) or name.startswith("."):
            raise StudioError(f"memory name {name!r} is not valid: 1-64 letters, digits, '_', '.', '-', not "
                              "starting with '.'")
        return name

    def _info(self, name: str, need_compatible: bool = True) -> dict[str, Any]:
        info = self.client.info(memory=self.check_name(name))
        if "capacity" not in info:
            raise StudioError(f"memory {name!r} does not exist on {self.endpoint}")
        if need_compatible and (info["key_dim"], info["value_dim"]) != (self.key_dim, NUM_BINS):
            raise StudioError(f"memory {name!r} holds {info['key_dim']}-d keys and {info['value_dim']}-bin values; "
                              f"this checkpoint needs {self.key_dim} and {NUM_BINS}")
        return info

    def _export(self, name: str, info: dict[str, Any]) -> tuple[np.ndarray, dict[int, list]] | None:
        """(item_ids, {slot: palette} of the first SHOWN_SLOTS written slots), cached per memory version."""
        if info["capacity"] * info["key_dim"] > EXPORT_LIMIT_FLOATS:
            return None
        cached = self._exports.get(name)
        if cached is None or cached[0] != info["version"]:
            state = self.client.export(memory=name)
            slots = written_slots(state["item_ids"])[:SHOWN_SLOTS]
            cached = (int(state["version"]), state["item_ids"], {int(s): palette(state["values"][s]) for s in slots})
            self._exports[name] = cached
        return cached[1], cached[2]

    def memories(self) -> list[dict[str, Any]]:
        """Every memory on the server: name, capacity, written slots, and whether this model can use it."""
        out = []
        for name in sorted(self.client.info().get("memories", [])):
            info = self.client.info(memory=name)
            if "capacity" not in info:
                continue  # dropped between the two calls
            ok = (info["key_dim"], info["value_dim"]) == (self.key_dim, NUM_BINS)
            exported = self._export(name, info) if ok else None
            written = int((exported[0] >= 0).sum()) if exported is not None else int(info["filled"])
            out.append({"name": name, "capacity": int(info["capacity"]), "written": written,
                        "version": int(info["version"]), "compatible": ok,
                        "why": "" if ok else f"{info['key_dim']}-d keys; this model makes {self.key_dim}-d keys"})
        return out

    def create(self, name: str) -> dict[str, Any]:
        if self.check_name(name) in self.client.info().get("memories", []):
            raise StudioError(f"memory {name!r} already exists")
        ensure_memory(self.client, name, self.key_dim, self.capacity)
        self.registry.drop_memory(name)  # names left from an earlier memory of that name
        self.registry.commit()
        return {"name": name, "capacity": self.capacity}

    def slots(self, name: str) -> dict[str, Any]:
        """The written slots of a memory with the exemplar each holds (name, thumbnail) where known."""
        info = self._info(name)
        exported = self._export(name, info)
        if exported is None:
            return {"name": name, "slots": [], "written": int(info["filled"]), "listed": False}
        item_ids, palettes = exported
        tiles = []
        for slot, pal in palettes.items():
            entry = self.registry.lookup(name, slot, int(item_ids[slot]))
            tiles.append({"slot": slot, "item_id": int(item_ids[slot]), "palette": pal,
                          "name": entry["name"] if entry else "", "thumb": entry["thumb"] if entry else None})
        return {"name": name, "slots": tiles, "written": int((item_ids >= 0).sum()), "listed": True}

    # --- exemplars -----------------------------------------------------------------------------------
    def memorize(self, name: str, uploads: list[tuple[str, bytes]]) -> dict[str, Any]:
        """Decode each upload and write it into a slot of its own; per-file errors are returned, not raised."""
        info = self._info(name)
        images, errors = [], []
        for filename, data in uploads:
            try:
                images.append((display_name(filename), decode_image(data, filename, self.limits, self._background)))
            except UploadError as e:
                errors.append(str(e))
        exported = self._export(name, info)
        before = int((exported[0] >= 0).sum()) if exported is not None else int(info["filled"])
        written = []
        chunk = max(1, min(MEMORIZE_CHUNK, int(info["capacity"])))
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk]
            ids = [pixel_item_id(img) for _, img in part]
            slots = memorize_images(self.colorizer.extractor, self.client, name, [img for _, img in part],
                                    self.image_size, ids, self.colorizer.device, flip=self.colorizer.retrieval.flip)
            for slot, (shown, img), iid in zip(slots.tolist(), part, ids):
                self.registry.record(name, slot, shown, iid, thumbnail_png(img))
                written.append({"slot": slot, "name": shown})
        self.registry.commit()
        note = ""
        if before + len(images) > info["capacity"]:
            note = f"memory {name!r} has {info['capacity']} slots: the oldest exemplars were replaced"
        return {"written": written, "errors": errors, "note": note}

    @property
    def _background(self) -> str:
        return self.colorizer.background

    def remove(self, name: str, slot: int) -> dict[str, Any]:
        """Free one slot: retrieval no longer sees its exemplar, and the next exemplar reuses it."""
        info = self._info(name)
        if not 0 <= slot < info["capacity"]:
            raise StudioError(f"slot {slot} is outside memory {name!r} (0..{info['capacity'] - 1})")
        current = self.client.get(np.asarray([slot]), memory=name)["item_ids"]
        if int(current[0]) < 0:
            raise StudioError(f"slot {slot} of memory {name!r} holds no exemplar")
        version = free_slots(self.client, name, [slot], int(info["key_dim"]), int(info["value_dim"]))
        self.registry.forget(name, [slot])
        self.registry.commit()
        return {"slot": slot, "version": version}

    # --- photos and colorizing ---------------------------------------------------------------------------
    def add_photos(self, uploads: list[tuple[str, bytes]]) -> dict[str, Any]:
        """Decode and keep photos (gray preview made now); per-file errors are returned."""
        photos, errors = [], []
        for filename, data in uploads:
            try:
                img = decode_image(data, filename, self.limits, self._background)
            except UploadError as e:
                errors.append(str(e))
                continue
            light, fulls = self.colorizer.prepare_light([img])
            gray = self.colorizer.compose(torch.zeros(1, 2, *light.shape[-2:], device=light.device), fulls)[0]
            photo = self.files.add_photo(display_name(filename), np.asarray(img), png_bytes(gray))
            photos.append({"id": photo.id, "name": photo.name, "width": photo.width, "height": photo.height})
        return {"photos": photos, "errors": errors}

    @torch.no_grad()
    def colorize_photo(self, photo_id: str, memory: str | None) -> tuple[bytes, dict[str, Any]]:
        """A stored photo colorized with `memory` at its own resolution: (PNG bytes, what answered)."""
        photo = self.files.photo(photo_id)
        col = self.colorizer
        light, fulls = col.prepare_light([Image.fromarray(self.files.photo_rgb(photo_id))])
        answer: dict[str, Any] = {"slot": None, "similarity": None, "exemplar": None, "thumb": None, "palette": []}
        if col.use_memory:
            if memory is None:
                raise StudioError("choose a memory first")
            c, answer = self._retrieve(light.to(col.device), memory)
            fake_ab = col.predict_ab(light, color_feature=c)
        else:
            fake_ab = col.predict_ab(light)  # the "without M" model: a constant colour feature
        rgb = col.compose(fake_ab, fulls)[0]
        info = {"photo": photo.id, "name": photo.name, "width": photo.width, "height": photo.height,
                "memory": memory, **answer}
        return png_bytes(rgb), info

    def _retrieve(self, light: torch.Tensor, memory: str) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self._info(memory)
        c, slots, sims, written = retrieve_answers(self.colorizer.extractor, light, self.client, name=memory,
                                                   capacity=int(info["capacity"]), options=self.colorizer.retrieval)
        slot = int(slots[0])
        values = self.client.get(np.asarray([slot]), memory=memory)
        item = int(values["item_ids"][0])
        entry = self.registry.lookup(memory, slot, item) if written[0] else None
        answer = {"slot": slot if written[0] else None, "similarity": round(float(sims[0]), 4),
                  "exemplar": (entry["name"] if entry else f"slot {slot}") if written[0] else None,
                  "thumb": entry["thumb"] if entry else None, "palette": palette(values["values"][0])}
        return c, answer

    def zip_results(self, items: list[tuple[str, str]]) -> Path:
        """The results of (job id, photo id) pairs in one zip (PNG entries stored, not recompressed)."""
        paths = [(self.files.result_path(job, photo), self.files.photo(photo).name) for job, photo in items]
        if not paths:
            raise StudioError("no results to download yet")
        out = self.work / "colorized.zip"
        used: dict[str, int] = {}
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
            for path, name in paths:
                stem = Path(name).stem or "photo"
                n = used.get(stem, 0)
                used[stem] = n + 1
                zf.write(path, f"{stem}_colorized{'' if n == 0 else f'_{n}'}.png")
        return out

    # --- packs ---------------------------------------------------------------------------------------------
    def export(self, name: str) -> bytes:
        self._info(name, need_compatible=False)
        state_ids = self.client.export(memory=name)["item_ids"]
        pack = export_pack(self.client, name, self.identity, self.extractor_info, str(self.colorizer.path),
                           self.registry.names(name, state_ids))
        return pack_bytes(pack)

    def import_pack(self, data: bytes, name: str | None, replace: bool) -> dict[str, Any]:
        """An uploaded pack -> a memory, refused when another extractor wrote it; warnings are returned."""
        if len(data) > self.limits.pack_bytes:
            raise StudioError(f"the pack is {len(data) / 2**20:.0f} MiB; the limit is "
                              f"{self.limits.pack_bytes / 2**20:.0f} MiB")
        path = self.work / "upload.pack"
        path.write_bytes(data)
        try:
            pack = read_pack(path)
        except PackError as e:
            raise StudioError(str(e).replace(str(path), "the uploaded file")) from None
        finally:
            path.unlink(missing_ok=True)
        target = self.check_name(name or pack.name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                done = import_pack(self.client, pack, target, replace, self.identity, self.key_dim)
            except PackError as e:
                raise StudioError(str(e)) from None
        self.registry.drop_memory(target)
        for src in pack.sources:
            slot = int(src.get("slot", -1))
            if 0 <= slot < pack.capacity and pack.item_ids[slot] == int(src.get("item_id", -2)):
                self.registry.record(target, slot, display_name(str(src.get("name", ""))), pack.item_ids[slot], None)
        self.registry.commit()
        return {**done, "warnings": [str(w.message) for w in caught]}

    def close(self) -> None:
        """Close the client, stop the embedded server (SIGTERM: it snapshots and exits), remove the work folder.

        Idempotent: a second call (a second signal, a `finally` after an error) does nothing more.
        """
        client, self.client = getattr(self, "client", None), None
        server, self.server = getattr(self, "server", None), None
        if client is not None:
            try:
                client.close()
            except Exception:  # cleanup goes on to the server and the files
                log.exception("closing the memory client")
        if server is not None:
            code = server.stop()
            if code != 0:
                log.warning("embedded memory server exited with code %s; log %s", code, server.log_path)
        shutil.rmtree(self.work, ignore_errors=True)
