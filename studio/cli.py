"""pccnet-studio: serve the studio page for a checkpoint on 127.0.0.1.

    pccnet-studio --checkpoint runs/x [--memory tcp://HOST:PORT] [--host 127.0.0.1] [--port 0]

Without --memory it starts an embedded memory server holding the checkpoint's trained memory (in a
temporary folder unless --data-dir keeps it) and stops it on exit. When it serves, it prints one line
`READY http://HOST:PORT/` on stdout (flushed); SIGTERM or Ctrl-C stops it cleanly, however often they come
(open requests get GRACEFUL_S seconds; the embedded server, in its own session, is stopped once).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import socket
import sys
import threading
import time

import uvicorn

from studio.uploads import Limits

log = logging.getLogger("studio")
GRACEFUL_S = 15  # open requests get this long after SIGTERM/SIGINT; then they are cut


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pccnet-studio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, a run's out_dir (latest) or an exported model")
    parser.add_argument("--memory", help="endpoint of a running memory server (default: an embedded one)")
    parser.add_argument("--data-dir", help="keep the embedded server's memories (and exemplar thumbnails) here")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1; anything else is reachable by others "
                             "and has no authentication)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: a free one; default 8765)")
    parser.add_argument("--capacity", type=int, default=1024, help="slots of a memory created in the page")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--max-file-mb", type=float, default=64, help="largest uploaded image (default 64 MiB)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels (default 40 M)")
    parser.add_argument("--max-request-mb", type=float, default=512, help="largest request body (default 512 MiB)")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning (default)")
    parser.add_argument("--retrieval-option", action="append", default=[], metavar="KEY=VALUE",
                        help="override the checkpoint's retrieval settings (k=1 for small per-domain memories, "
                        "flip=false ...); repeatable")
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Stop:
    """SIGTERM/SIGINT from the very start: recorded, never fatal, so every path goes through the clean-up.

    While uvicorn serves, its own handlers take over (and call ours again after, which only records);
    a signal during loading makes main() close what it started and exit 0 instead of serving.
    """

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self)

    def __call__(self, signum: int, _frame: object) -> None:
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"error: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.capacity < 1 or args.max_file_mb <= 0 or args.max_pixels < 1 or args.max_request_mb <= 0:
        print("error: --capacity, --max-file-mb, --max-pixels and --max-request-mb must be positive", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _is_loopback(args.host):
        print(f"warning: serving on {args.host}: anyone who can reach it can read and change your memories",
              file=sys.stderr)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    stop = _Stop() if threading.current_thread() is threading.main_thread() else None
    from PIL import Image

    from memory_server.client import MemoryServerError, MemoryUnavailable
    from memory_server.launcher import ServerStartError
    from studio.app import create_app
    from studio.service import Studio
    from trainer.checkpoint import CheckpointError

    # Pillow refuses images over MAX_IMAGE_PIXELS even before our own check; keep it at least --max-pixels.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, args.max_pixels)
    limits = Limits(request_bytes=int(args.max_request_mb * 2**20), file_bytes=int(args.max_file_mb * 2**20),
                    pixels=args.max_pixels, pack_bytes=int(args.max_request_mb * 2**20))
    try:
        studio = Studio(args.checkpoint, memory=args.memory, data_dir=args.data_dir, device=args.device,
                        capacity=args.capacity, limits=limits, retrieval_options=args.retrieval_option)
    except (CheckpointError, ValueError, FileNotFoundError, MemoryServerError, MemoryUnavailable,
            ServerStartError) as e:
        sock.close()
        if stop is not None and stop.requested:
            return 0  # stopped while loading (a group signal may have reached the memory server too)
        print(f"error: {e}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{port}/"
    hosts = ["127.0.0.1", "localhost", "[::1]", "::1", args.host] if _is_loopback(args.host) else None
    # uvicorn catches SIGTERM/SIGINT while it serves and raises them again to the handlers found at
    # start: _Stop's, which only record, so the process goes on to the clean-up below and exits 0.
    try:
        if stop is None or not stop.requested:
            app = create_app(studio, hosts=hosts)
            config = uvicorn.Config(app, log_level=args.log_level.lower(), lifespan="on", access_log=False,
                                    timeout_graceful_shutdown=GRACEFUL_S)
            server = _Server(config, url, time.perf_counter() - t0, stop)
            server.run(sockets=[sock])
    finally:
        studio.close()  # stops the embedded memory server (it snapshots and exits) and removes temporary files
        sock.close()
    return 0


class _Server(uvicorn.Server):
    """uvicorn.Server that prints READY once it accepts connections (uvicorn handles SIGTERM and SIGINT)."""

    def __init__(self, config: uvicorn.Config, url: str, load_s: float, stop: _Stop | None = None) -> None:
        super().__init__(config)
        self.url, self.load_s, self.stop = url, load_s, stop

    def handle_exit(self, sig: int, frame: object) -> None:
        # Once stopping, a repeated signal changes nothing (uvicorn would force the exit on a second SIGINT,
        # cancelling the shutdown halfway); timeout_graceful_shutdown bounds how long stopping takes.
        if not self.should_exit:
            super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.stop is not None and self.stop.requested:  # signalled before uvicorn's handlers were in place
            self.should_exit = True
            return
        if self.started:
            log.info("studio loaded in %.1f s", self.load_s)
            print(f"READY {self.url}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
