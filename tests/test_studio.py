"""The studio's API and upload handling: bounds, bad input, ids that are never paths, packs, zip, SIGTERM.

Unit tests decode uploads directly; the rest talk HTTP to a real `python -m studio` process that uses
an external memory server (a real process on loopback) and must leave it running when it stops. The
embedded-server mode is exercised by the browser test (test_studio_browser.py).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import struct
import time
import urllib.error
import urllib.request
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from studiohelpers import make_checkpoint, tint_image

from memory_server.client import MemoryClient
from memory_server.launcher import start_server
from studio.launcher import StudioProcess
from studio.uploads import Limits, UploadError, decode_image, display_name
from trainer.packs import checkpoint_identity, export_pack, pack_bytes, read_pack


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _forged_png(width: int, height: int) -> bytes:
    """A PNG header declaring width x height with no pixel data at all (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --- uploads, no process -------------------------------------------------------------------------------
def test_decode_accepts_images_and_composites_alpha():
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:3, :, 3] = 255  # top half opaque red, bottom half transparent
    img = decode_image(_png(Image.fromarray(rgba, "RGBA")), "a.png", Limits())
    arr = np.asarray(img)
    assert img.mode == "RGB" and img.size == (5, 6)
    assert arr[0, 0].tolist() == [255, 0, 0] and arr[5, 0].tolist() == [255, 255, 255]


def test_decode_refuses_bad_uploads_with_the_file_name():
    limits = Limits(file_bytes=10_000, pixels=10_000)
    with pytest.raises(UploadError, match="notes.txt is not an image"):
        decode_image(b"hello, not an image", "notes.txt", limits)
    with pytest.raises(UploadError, match="empty.png is empty"):
        decode_image(b"", "empty.png", limits)
    with pytest.raises(UploadError, match="big.bmp is .* MiB; the limit"):
        decode_image(b"\0" * 10_001, "big.bmp", limits)
    # The pixel count is checked from the header, before any decoding: this file has no pixel data, so
    # a decoder would fail differently.
    with pytest.raises(UploadError, match="bomb.png is 5000x5000 = 25,000,000 pixels; the limit is 10,000"):
        decode_image(_forged_png(5000, 5000), "bomb.png", limits)
    with pytest.raises(UploadError, match="huge.png is too large: more than 10,000 pixels"):
        decode_image(_forged_png(1 << 20, 1 << 20), "huge.png", limits)  # beyond Pillow's own limit too
    with pytest.raises(UploadError, match="wide.png is 200x200 = 40,000 pixels"):
        decode_image(_png(Image.new("L", (200, 200))), "wide.png", limits)
    whole = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)))
    with pytest.raises(UploadError, match="cut.png cannot be decoded"):
        decode_image(whole[: len(whole) // 2], "cut.png", limits)


def _asgi(limit: int, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
    """Run BodyLimit over an app that reads the whole body: (status sent, body bytes the app saw)."""
    import asyncio

    from studio.app import BodyLimit

    seen, sent = [0], []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return queue.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/photos", "headers": headers}
    asyncio.run(BodyLimit(app, limit)(scope, receive, send))
    return sent[0]["status"], seen[0]


def test_body_limit_counts_streamed_bytes_and_wants_the_header():
    studio_header = [(b"x-pccnet-studio", b"1")]
    assert _asgi(2500, [b"x" * 1000] * 2, studio_header) == (200, 2000)
    # No Content-Length (chunked): the chunk that passes the limit never reaches the app.
    assert _asgi(2500, [b"x" * 1000] * 5, studio_header) == (413, 2000)
    # A declared length over the limit is refused before anything is read.
    assert _asgi(2500, [b"x" * 10], [*studio_header, (b"content-length", b"9999")]) == (413, 0)
    assert _asgi(2500, [b"x" * 10], []) == (403, 0)


@given(st.text(max_size=300))
def test_display_names_are_never_paths(name):
    shown = display_name(name)
    assert shown and len(shown) <= 120
    assert "/" not in shown and "\\" not in shown and shown.isprintable()
    assert not any(c in shown for c in "\"'<>;")


def test_cli_errors_are_clear(tmp_path, capsys):
    from studio.cli import main

    assert main(["--checkpoint", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--max-pixels", "0"]) == 2
    # --retrieval-option is validated as a config is, before any server starts.
    ckpt = make_checkpoint(tmp_path / "run")
    capsys.readouterr()
    assert main(["--checkpoint", str(ckpt), "--port", "0", "--retrieval-option", "mix=median"]) == 2
    assert "retrieval.mix must be one of" in capsys.readouterr().err


def test_retrieval_options_reach_the_colorizer(tmp_path):
    from trainer.inference import Colorizer
    from trainer.retrieval import RetrievalOptions

    ckpt = make_checkpoint(tmp_path / "run")
    col = Colorizer(ckpt, connect_memory=False, retrieval_options=["k=1", "retrieval.flip=false"])
    assert col.retrieval == RetrievalOptions(k=1, temperature=0.1, mix="mean", flip=False, anneal=1.0)
    assert Colorizer(ckpt, connect_memory=False).retrieval == RetrievalOptions.of(col.cfg.retrieval)


# --- a studio process on an external memory server ------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio-api")
    ckpt = make_checkpoint(root / "run")
    other = make_checkpoint(root / "other", seed=1)
    server = start_server(root / "memory", durability="none")
    studio = None
    try:
        studio = StudioProcess("--checkpoint", str(ckpt), "--memory", server.endpoint, "--capacity", "16",
                               "--max-file-mb", "1", "--max-request-mb", "2", "--max-pixels", "1000000",
                               log=root / "studio.log")
        yield {"url": studio.url, "studio": studio, "server": server, "ckpt": ckpt, "other": other, "root": root}
    finally:
        if studio is not None:
            studio.stop()
        server.stop()


def _call(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
          studio_header: bool = True) -> tuple[int, bytes, dict]:
    h = dict(headers or {})
    if studio_header and method != "GET":
        h["X-PCCNet-Studio"] = "1"
    req = urllib.request.Request(url, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as reply:
            return reply.status, reply.read(), dict(reply.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _json(url: str, method: str = "GET", data=None, **kw):
    body = json.dumps(data).encode() if data is not None else None
    status, raw, _ = _call(url, method, body, {"Content-Type": "application/json"} if body else None, **kw)
    return status, json.loads(raw)


def _multipart(fields: list[tuple[str, str, bytes]], extra: dict[str, str] | None = None) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for key, value in (extra or {}).items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n".encode())
    for field, filename, data in fields:
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _upload(url: str, files: list[tuple[str, bytes]], field: str = "files", extra=None, **kw):
    body, headers = _multipart([(field, n, d) for n, d in files], extra)
    status, raw, _ = _call(url, "POST", body, headers, **kw)
    return status, json.loads(raw)


@pytest.mark.integration
def test_status_and_memories_on_an_external_server(setup):
    status, s = _json(setup["url"] + "api/status")
    assert status == 200 and s["embedded"] is False and s["endpoint"] == setup["server"].endpoint
    assert s["identity"] == checkpoint_identity(setup["ckpt"])[0]
    with MemoryClient(setup["server"].endpoint) as c:
        c.create(capacity=4, key_dim=7, value_dim=313, memory="foreign")
    status, body = _json(setup["url"] + "api/memories")
    listed = {m["name"]: m for m in body["memories"]}
    assert listed["foreign"]["compatible"] is False and "7-d keys" in listed["foreign"]["why"]
    status, body = _upload(setup["url"] + "api/memories/foreign/exemplars", [("a.png", _png(Image.new("RGB", (8, 8))))])
    assert status == 400 and "7-d keys" in body["error"]


@pytest.mark.integration
def test_requests_are_bounded_and_guarded(setup):
    url = setup["url"]
    # Without the studio's header a change is refused (a cross-site form cannot set it) and nothing happens.
    status, body = _json(url + "api/memories", "POST", {"name": "sneaky"}, studio_header=False)
    assert status == 403 and "X-PCCNet-Studio" in body["error"]
    assert "sneaky" not in [m["name"] for m in _json(url + "api/memories")[1]["memories"]]
    # Another Host name (DNS rebinding) is refused.
    status, _, _ = _call(url + "api/status", headers={"Host": "evil.example"})
    assert status == 400
    # A body declared over --max-request-mb: 413 before any of it is read (streamed ones: the ASGI test above).
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest("POST", "/api/photos")
        for key, value in (("X-PCCNet-Studio", "1"), ("Content-Length", str(3 << 20)),
                           ("Content-Type", "multipart/form-data; boundary=x")):
            conn.putheader(key, value)
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == 413 and "larger than 2 MiB" in json.loads(reply.read())["error"]
    finally:
        conn.close()
    # One file over --max-file-mb in a request under the limit: that file is named, the others go on.
    ok = _png(tint_image((200, 40, 40), np.random.default_rng(0)))
    status, body = _upload(url + "api/photos", [("huge.png", b"\0" * (1 << 20) + b"\0"), ("ok.png", ok)])
    assert status == 200 and [p["name"] for p in body["photos"]] == ["ok.png"]
    assert body["errors"] == ["huge.png is larger than 1 MiB"]
    status, body = _upload(url + "api/photos", [("bomb.png", _forged_png(3000, 3000)), ("x.txt", b"text")])
    assert status == 200 and body["photos"] == []
    assert "bomb.png is 3000x3000" in body["errors"][0] and "x.txt is not an image" in body["errors"][1]


@pytest.mark.integration
@pytest.mark.parametrize("path", ["api/thumbs/..%2F..%2Fetc%2Fpasswd", "api/thumbs/../../etc/passwd",
                                  "api/photos/%2Fetc%2Fpasswd/gray", "api/jobs/" + "0" * 32,
                                  "api/jobs/x/results/..%2Fphotos", "static/..%2F..%2Fpyproject.toml"])
def test_ids_from_clients_are_never_paths(setup, path):
    status, raw, _ = _call(setup["url"] + path)
    assert status == 404 and b"[project]" not in raw and b"root:" not in raw


@pytest.mark.integration
def test_memory_names_are_checked(setup):
    for bad in ("../x", "", ".hidden", "a" * 65, "sp ace"):
        status, body = _json(setup["url"] + "api/memories", "POST", {"name": bad})
        assert status == 400 and "not valid" in body["error"], bad
    assert _json(setup["url"] + "api/memories", "POST", {"name": "twice"})[0] == 200
    status, body = _json(setup["url"] + "api/memories", "POST", {"name": "twice"})
    assert status == 400 and "already exists" in body["error"]


@pytest.mark.integration
def test_batch_progress_zip_and_packs(setup):
    url, rng = setup["url"], np.random.default_rng(3)
    assert _json(url + "api/memories", "POST", {"name": "warm"})[0] == 200
    status, body = _upload(url + "api/memories/warm/exemplars", [
        ("red.png", _png(tint_image((220, 40, 40), rng))), ("blue.png", _png(tint_image((40, 60, 220), rng)))])
    assert status == 200 and [w["name"] for w in body["written"]] == ["red.png", "blue.png"] and not body["errors"]
    slots = _json(url + "api/memories/warm/slots")[1]["slots"]
    assert [s["name"] for s in slots] == ["red.png", "blue.png"] and all(s["thumb"] for s in slots)
    # A batch of 6 photos (two share a name): progress only grows, every result at its input's size.
    files = [(f"p{i % 5}.png", _png(tint_image((90, 90, 90), rng, size=(30 + i, 20 + 2 * i)))) for i in range(6)]
    photos = _upload(url + "api/photos", files)[1]["photos"]
    status, job = _json(url + "api/jobs", "POST", {"memory": "warm", "photos": [p["id"] for p in photos]})
    assert status == 200 and job["total"] == 6
    seen = []
    while job["state"] == "running":
        time.sleep(0.05)  # a poll interval, as the page's (not a wait for readiness: the loop reads the state)
        job = _json(url + f"api/jobs/{job['id']}")[1]
        seen.append(job["done"])
    assert seen == sorted(seen) and job["state"] == "done" and job["done"] == 6
    for r, p in zip(job["results"], photos):
        assert r["slot"] in (0, 1) and r["exemplar"] in ("red.png", "blue.png") and -1 <= r["similarity"] <= 1
        status, raw, headers = _call(url + f"api/jobs/{job['id']}/results/{p['id']}")
        assert status == 200 and Image.open(io.BytesIO(raw)).size == (p["width"], p["height"])
        assert headers["content-disposition"].startswith("attachment")
    status, raw, _ = _call(url + "api/zip", "POST", json.dumps({"items": [
        {"job": job["id"], "photo": p["id"]} for p in photos]}).encode(), {"Content-Type": "application/json"})
    names = zipfile.ZipFile(io.BytesIO(raw)).namelist()
    assert status == 200 and len(names) == 6 and "p0_colorized.png" in names and "p0_colorized_1.png" in names

    # Packs: download one, import it under another name, refuse one from another extractor.
    status, raw, headers = _call(url + "api/memories/warm/pack")
    assert status == 200 and 'filename="warm.pack"' in headers["content-disposition"]
    path = setup["root"] / "warm.pack"
    path.write_bytes(raw)
    pack = read_pack(path)
    assert pack.identity == checkpoint_identity(setup["ckpt"])[0] and pack.written == 2
    assert [s["name"] for s in pack.sources] == ["red.png", "blue.png"]
    status, body = _upload(url + "api/packs", [("warm.pack", raw)], field="pack", extra={"name": "warm2"})
    assert status == 200 and body["name"] == "warm2" and body["written"] == 2 and body["warnings"] == []
    names = [s["name"] for s in _json(url + "api/memories/warm2/slots")[1]["slots"]]
    assert names == ["red.png", "blue.png"]
    status, body = _upload(url + "api/packs", [("warm.pack", raw)], field="pack", extra={"name": "warm2"})
    assert status == 400 and "already exists" in body["error"]
    with MemoryClient(setup["server"].endpoint) as c:
        foreign = pack_bytes(export_pack(c, "warm", identity=checkpoint_identity(setup["other"])[0]))
        anonymous = pack_bytes(export_pack(c, "warm"))
    status, body = _upload(url + "api/packs", [("f.pack", foreign)], field="pack", extra={"name": "warm3"})
    assert status == 400 and "another extractor" in body["error"]
    status, body = _upload(url + "api/packs", [("a.pack", anonymous)], field="pack",
                           extra={"name": "warm2", "replace": "1"})
    assert status == 200 and "does not say which extractor" in body["warnings"][0]
    status, body = _upload(url + "api/packs", [("n.pack", b"nonsense")], field="pack")
    assert status == 400 and "the uploaded file is not a readable pack" in body["error"]

    # Removing an exemplar frees the slot on the server: unwritten, and the next exemplar reuses it.
    status, body = _call(url + "api/memories/warm/slots/0", "DELETE")[:2]
    assert status == 200
    with MemoryClient(setup["server"].endpoint) as c:
        got = c.get(np.array([0]), memory="warm")
    assert int(got["item_ids"][0]) == -1 and np.allclose(got["values"][0], 1 / 313)
    status, body = _upload(url + "api/memories/warm/exemplars", [("green.png", _png(tint_image((40, 200, 60), rng)))])
    assert body["written"] == [{"slot": 0, "name": "green.png"}]
    assert _call(url + "api/memories/warm/slots/5", "DELETE")[0] == 400


@pytest.mark.integration
def test_sigterm_stops_the_studio_and_leaves_an_external_server_running(setup):
    studio, server = setup["studio"], setup["server"]
    assert studio.stop() == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(setup["url"] + "api/status", timeout=10)
    assert server.poll() is None
    with MemoryClient(server.endpoint, timeout_ms=10000) as c:
        assert "warm" in c.info()["memories"]


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.update(int(c) for c in (task / "children").read_text().split())
    return out


@pytest.mark.integration
def test_repeated_signals_during_shutdown_stop_the_studio_and_its_server_once(tmp_path):
    """On an exported bundle (launch/export.py): its trained memory is served, then SIGTERM twice and SIGINT
    to the studio's process group: exit 0, its embedded server stopped cleanly (the group's signals never
    reach it: the studio stops it, once), its memories kept in --data-dir."""
    from launch.export import main as export_main

    ckpt = make_checkpoint(tmp_path / "run")
    assert export_main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "model")]) == 0
    studio = StudioProcess("--checkpoint", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"),
                           log=tmp_path / "s.log")
    try:
        status = _json(studio.url + "api/status")[1]
        assert status["checkpoint"] == str(tmp_path / "model")
        assert status["identity"] == checkpoint_identity(ckpt)[0]
        memories = _json(studio.url + "api/memories")[1]["memories"]
        assert {m["name"]: m["written"] for m in memories} == {"default": 8}  # the bundle's memory.pack
        assert _json(studio.url + "api/memories", "POST", {"name": "kept"})[0] == 200
        [server_pid] = _children(studio.proc.pid)
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            os.killpg(studio.proc.pid, sig)
        assert studio.proc.wait(120) == 0, studio.stderr()[-3000:]
    finally:
        studio.stop()
    assert "exited with code" not in studio.stderr() and "Traceback" not in studio.stderr()
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)  # stopped and reaped by the studio
    with start_server(tmp_path / "data") as server, MemoryClient(server.endpoint) as c:
        assert sorted(c.info()["memories"]) == ["default", "kept"]
