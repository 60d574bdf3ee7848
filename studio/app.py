"""The studio's HTTP side: one static page and a small JSON API over studio/service.py (Starlette, ASGI).

Every model or memory call runs on one worker thread (the service is single-threaded by design); a
batch job awaits it photo by photo, so other requests are answered between two photos. Request bodies
are bounded before they are parsed, mutating requests must carry the X-PCCNet-Studio header (a
cross-site form cannot set it, so another web page cannot write to a local studio), and only the
Host names the studio is served under are accepted (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from memory_server.client import MemoryServerError, MemoryUnavailable
from studio.service import Studio, StudioError
from studio.uploads import display_name

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
HEADER = "x-pccnet-studio"


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` (declared or streamed), 403 for an
    unsafe method without the studio's header."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope["method"] not in ("GET", "HEAD") and HEADER.encode() not in headers:
            return await _reply(scope, send, 403, "requests that change something need the X-PCCNet-Studio header")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _reply(scope, send, 413, f"the upload is larger than {self.max_bytes / 2**20:.0f} MiB")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watch)
        except _TooLarge:
            if not started:
                await _reply(scope, send, 413, f"the upload is larger than {self.max_bytes / 2**20:.0f} MiB")


async def _reply(scope, send, status: int, message: str) -> None:
    async def no_body():
        return {"type": "http.request", "body": b"", "more_body": False}

    await JSONResponse({"error": message}, status_code=status)(scope, no_body, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(studio: Studio, hosts: list[str] | None = None) -> Starlette:
    """The ASGI app over a ready Studio (the caller closes the studio after the app has shut down)."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="studio-worker")
    jobs: set[asyncio.Task] = set()
    limits = studio.limits

    async def call(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(worker, fn, *args)

    def guarded(handler):
        """Map the studio's errors to JSON replies the page shows."""
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except ValueError as e:  # StudioError, and the ValueErrors of trainer/ for bad input
                return _error(400, str(e))
            except KeyError as e:
                return _error(404, str(e.args[0]) if e.args else "not found")
            except MemoryServerError as e:
                return _error(400, f"memory server: {e}")
            except MemoryUnavailable as e:
                return _error(503, str(e))
        return wrapped

    async def read_files(request: Request, field: str, max_bytes: int) -> tuple[list[tuple[str, bytes | None]], Any]:
        """(client file name, bytes or None when over max_bytes) per file of the form field, and the form."""
        form = await request.form(max_files=limits.files_per_request, max_fields=20)
        files = []
        for item in form.getlist(field):
            if isinstance(item, str):
                continue
            too_big = item.size is not None and item.size > max_bytes
            files.append((item.filename or "upload", None if too_big else await item.read()))
        return files, form

    def oversize(files) -> list[str]:
        return [f"{display_name(n)} is larger than {limits.file_bytes / 2**20:.0f} MiB" for n, d in files if d is None]

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def status(request: Request) -> Response:
        return JSONResponse(await call(studio.status))

    async def memories(request: Request) -> Response:
        return JSONResponse({"memories": await call(studio.memories)})

    async def create_memory(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise StudioError("the request body must be JSON: {\"name\": ...}") from None
        return JSONResponse(await call(studio.create, str((body or {}).get("name", ""))))

    async def slots(request: Request) -> Response:
        return JSONResponse(await call(studio.slots, request.path_params["name"]))

    async def memorize(request: Request) -> Response:
        files, _ = await read_files(request, "files", limits.file_bytes)
        result = await call(studio.memorize, request.path_params["name"], [(n, d) for n, d in files if d is not None])
        result["errors"] = oversize(files) + result["errors"]
        return JSONResponse(result)

    async def remove_slot(request: Request) -> Response:
        return JSONResponse(await call(studio.remove, request.path_params["name"], request.path_params["slot"]))

    async def thumb(request: Request) -> Response:
        return FileResponse(studio.registry.thumb_path(request.path_params["id"]), media_type="image/png")

    async def add_photos(request: Request) -> Response:
        files, _ = await read_files(request, "files", limits.file_bytes)
        result = await call(studio.add_photos, [(n, d) for n, d in files if d is not None])
        result["errors"] = oversize(files) + result["errors"]
        return JSONResponse(result)

    async def gray(request: Request) -> Response:
        return FileResponse(studio.files.gray_path(request.path_params["id"]), media_type="image/png")

    async def run_job(job) -> None:
        for pid in job.photo_ids:
            if job.cancelled:
                break
            try:
                png, info = await call(studio.colorize_photo, pid, job.memory)
            except (ValueError, KeyError, MemoryServerError, MemoryUnavailable) as e:
                png, info = None, {"photo": pid, "error": str(e.args[0]) if isinstance(e, KeyError) else str(e)}
            except Exception as e:  # noqa: BLE001 - one bad photo must not end the batch; logged in full
                log.exception("colorizing photo %s failed", pid)
                png, info = None, {"photo": pid, "error": f"{type(e).__name__}: {e}"}
            studio.files.add_result(job, pid, png, info)
        job.state = "cancelled" if job.cancelled else "done"

    async def start_job(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise StudioError("the request body must be JSON: {\"memory\": ..., \"photos\": [...]}") from None
        photo_ids = [str(p) for p in (body or {}).get("photos", [])]
        if not photo_ids:
            raise StudioError("no photos to colorize")
        for pid in photo_ids:
            studio.files.photo(pid)  # KeyError -> 404 before any work starts
        memory = body.get("memory") or None
        if memory is not None:
            studio.check_name(str(memory))
        job = studio.files.add_job(memory, photo_ids)
        task = asyncio.create_task(run_job(job))
        jobs.add(task)
        task.add_done_callback(jobs.discard)
        return JSONResponse(studio.files.describe_job(job.id))

    async def job_status(request: Request) -> Response:
        return JSONResponse(studio.files.describe_job(request.path_params["id"]))

    async def result(request: Request) -> Response:
        job_id, photo_id = request.path_params["id"], request.path_params["photo"]
        path = studio.files.result_path(job_id, photo_id)
        name = f"{Path(studio.files.photo(photo_id).name).stem}_colorized.png"
        return FileResponse(path, media_type="image/png", filename=name)

    async def cancel_job(request: Request) -> Response:
        job = studio.files.job(request.path_params["id"])
        job.cancelled = True
        return JSONResponse({"id": job.id, "cancelled": True})

    async def zip_results(request: Request) -> Response:
        try:
            items = [(str(i["job"]), str(i["photo"])) for i in (await request.json())["items"]]
        except (ValueError, KeyError, TypeError):
            raise StudioError("the request body must be JSON: {\"items\": [{\"job\": ..., \"photo\": ...}]}") from None
        path = await call(studio.zip_results, items)
        return FileResponse(path, media_type="application/zip", filename="colorized.zip")

    async def export_pack(request: Request) -> Response:
        name = request.path_params["name"]
        data = await call(studio.export, name)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}.pack"'})

    async def import_pack(request: Request) -> Response:
        files, form = await read_files(request, "pack", limits.pack_bytes)
        if not files:
            raise StudioError("no pack file in the upload")
        if files[0][1] is None:
            raise StudioError(f"the pack is larger than {limits.pack_bytes / 2**20:.0f} MiB")
        name = str(form.get("name") or "") or None
        replace = str(form.get("replace") or "") in ("1", "true", "on")
        return JSONResponse(await call(studio.import_pack, files[0][1], name, replace))

    routes = [
        Route("/", index),
        Route("/api/status", guarded(status)),
        Route("/api/memories", guarded(memories)),
        Route("/api/memories", guarded(create_memory), methods=["POST"]),
        Route("/api/memories/{name}/slots", guarded(slots)),
        Route("/api/memories/{name}/exemplars", guarded(memorize), methods=["POST"]),
        Route("/api/memories/{name}/slots/{slot:int}", guarded(remove_slot), methods=["DELETE"]),
        Route("/api/memories/{name}/pack", guarded(export_pack)),
        Route("/api/packs", guarded(import_pack), methods=["POST"]),
        Route("/api/thumbs/{id}", guarded(thumb)),
        Route("/api/photos", guarded(add_photos), methods=["POST"]),
        Route("/api/photos/{id}/gray", guarded(gray)),
        Route("/api/jobs", guarded(start_job), methods=["POST"]),
        Route("/api/jobs/{id}", guarded(job_status)),
        Route("/api/jobs/{id}/results/{photo}", guarded(result)),
        Route("/api/jobs/{id}", guarded(cancel_job), methods=["DELETE"]),
        Route("/api/zip", guarded(zip_results), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for task in list(jobs):
            task.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        worker.shutdown(wait=True, cancel_futures=True)

    middleware = [Middleware(BodyLimit, max_bytes=limits.request_bytes)]
    if hosts:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=hosts))
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
