"""What the studio keeps between requests: uploaded photos, batch jobs and their results, exemplar thumbnails.

Everything lives in the studio's own folders under names it makes itself (uuid hex); ids coming back
from a client are looked up in these tables, never joined to a path. Old photos and jobs are dropped
beyond fixed counts, so a long session stays bounded on disk.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_ID = re.compile(r"[0-9a-f]{32}\Z")
THUMB_SIZE = 128


def new_id() -> str:
    return uuid.uuid4().hex


def valid_id(value: str) -> bool:
    return bool(_ID.match(value or ""))


def png_bytes(img: Image.Image | np.ndarray, compress_level: int = 3) -> bytes:
    """PNG of an RGB array or image (level 3: a quarter of level 9's encode time, a few % larger)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def thumbnail_png(img: Image.Image, size: int = THUMB_SIZE) -> bytes:
    small = img.copy()
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    return png_bytes(small, compress_level=6)


@dataclass
class Photo:
    id: str
    name: str
    width: int
    height: int


@dataclass
class Job:
    """One batch: colorize `photo_ids` with `memory`; results fill in as it runs."""

    id: str
    memory: str
    photo_ids: list[str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: str = "running"  # running | done | cancelled
    error: str = ""
    cancelled: bool = False

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "memory": self.memory, "total": len(self.photo_ids), "done": len(self.results),
                "state": self.state, "error": self.error,
                "results": [self.results[p] for p in self.photo_ids if p in self.results]}


class FileStore:
    """Photos (RGB arrays + gray previews) and job results in a work folder, bounded in count."""

    def __init__(self, root: Path, max_photos: int = 1000, max_jobs: int = 200) -> None:
        self.root = root
        self.max_photos, self.max_jobs = max_photos, max_jobs
        for sub in ("photos", "results"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.photos: OrderedDict[str, Photo] = OrderedDict()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()  # jobs are read by the event loop while the worker fills them

    # photos
    def add_photo(self, name: str, rgb: np.ndarray, gray_png: bytes) -> Photo:
        photo = Photo(new_id(), name, int(rgb.shape[1]), int(rgb.shape[0]))
        np.save(self.root / "photos" / f"{photo.id}.npy", rgb, allow_pickle=False)
        (self.root / "photos" / f"{photo.id}.png").write_bytes(gray_png)
        with self._lock:
            self.photos[photo.id] = photo
            while len(self.photos) > self.max_photos:
                old, _ = self.photos.popitem(last=False)
                for ext in ("npy", "png"):
                    (self.root / "photos" / f"{old}.{ext}").unlink(missing_ok=True)
        return photo

    def photo_rgb(self, photo_id: str) -> np.ndarray:
        return np.load(self.root / "photos" / f"{self.photo(photo_id).id}.npy", allow_pickle=False)

    def photo(self, photo_id: str) -> Photo:
        with self._lock:
            photo = self.photos.get(photo_id) if valid_id(photo_id) else None
        if photo is None:
            raise KeyError(f"no photo {photo_id!r} (uploaded photos are kept for this session only)")
        return photo

    def gray_path(self, photo_id: str) -> Path:
        return self.root / "photos" / f"{self.photo(photo_id).id}.png"

    # jobs
    def add_job(self, memory: str, photo_ids: list[str]) -> Job:
        job = Job(new_id(), memory, photo_ids)
        (self.root / "results" / job.id).mkdir()
        with self._lock:
            self.jobs[job.id] = job
            finished = [j for j in self.jobs.values() if j.state != "running"]
            for old in finished[: max(0, len(self.jobs) - self.max_jobs)]:
                del self.jobs[old.id]
                shutil.rmtree(self.root / "results" / old.id, ignore_errors=True)
        return job

    def job(self, job_id: str) -> Job:
        with self._lock:
            job = self.jobs.get(job_id) if valid_id(job_id) else None
        if job is None:
            raise KeyError(f"no job {job_id!r}")
        return job

    def describe_job(self, job_id: str) -> dict[str, Any]:
        job = self.job(job_id)
        with self._lock:
            return job.describe()

    def add_result(self, job: Job, photo_id: str, png: bytes | None, info: dict[str, Any]) -> None:
        if png is not None:
            (self.root / "results" / job.id / f"{photo_id}.png").write_bytes(png)
        with self._lock:
            job.results[photo_id] = info

    def result_path(self, job_id: str, photo_id: str) -> Path:
        job = self.job(job_id)
        path = self.root / "results" / job.id / f"{self.photo(photo_id).id}.png"
        if photo_id not in job.results or not path.is_file():
            raise KeyError(f"job {job_id} has no result for photo {photo_id}")
        return path


class ExemplarRegistry:
    """Per memory and slot, the exemplar the studio wrote there: its name, item id and thumbnail.

    The server stores no images or names; this table does, in a JSON file beside the thumbnails. An
    entry is shown only while the server's slot still holds its item id (another client or a later
    write may have replaced it).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "thumbs").mkdir(parents=True, exist_ok=True)
        self.path = root / "exemplars.json"
        self.table: dict[str, dict[str, dict[str, Any]]] = {}
        if self.path.is_file():
            try:
                self.table = json.loads(self.path.read_text())
            except ValueError:
                self.table = {}  # a damaged table only loses names and thumbnails, never memory data

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.table))
        os.replace(tmp, self.path)

    def record(self, memory: str, slot: int, name: str, item_id: int, thumb: bytes | None) -> None:
        self.forget(memory, [slot])
        thumb_id = None
        if thumb is not None:
            thumb_id = new_id()
            (self.root / "thumbs" / f"{thumb_id}.png").write_bytes(thumb)
        self.table.setdefault(memory, {})[str(slot)] = {"name": name, "item_id": int(item_id), "thumb": thumb_id}

    def commit(self) -> None:
        self._save()

    def forget(self, memory: str, slots: list[int]) -> None:
        entries = self.table.get(memory, {})
        for slot in slots:
            old = entries.pop(str(slot), None)
            if old and old.get("thumb"):
                (self.root / "thumbs" / f"{old['thumb']}.png").unlink(missing_ok=True)

    def drop_memory(self, memory: str) -> None:
        self.forget(memory, [int(s) for s in self.table.get(memory, {})])
        self.table.pop(memory, None)

    def lookup(self, memory: str, slot: int, item_id: int) -> dict[str, Any] | None:
        entry = self.table.get(memory, {}).get(str(slot))
        return entry if entry is not None and entry["item_id"] == int(item_id) else None

    def names(self, memory: str, item_ids: np.ndarray) -> dict[int, str]:
        """{slot: name} of the entries still current on the server."""
        return {int(s): e["name"] for s, e in self.table.get(memory, {}).items()
                if int(s) < item_ids.size and item_ids[int(s)] == e["item_id"]}

    def thumb_path(self, thumb_id: str) -> Path:
        path = self.root / "thumbs" / f"{thumb_id}.png"
        if not valid_id(thumb_id) or not path.is_file():
            raise KeyError(f"no thumbnail {thumb_id!r}")
        return path
