"""pccnet-memory: memory packs, one portable file per memory (trainer/packs.py).

    pccnet-memory pack export --checkpoint runs/x --memory tcp://127.0.0.1:5555 --name flowers \
        --output flowers.pack [--sources memorize.log]
    pccnet-memory pack import --input flowers.pack --memory tcp://127.0.0.1:5555 [--name NAME] [--replace] \
        [--checkpoint runs/x]
    pccnet-memory pack info flowers.pack

Export records the identity of the checkpoint's extractor (without --checkpoint: unknown); import with
--checkpoint refuses a pack written by another extractor and warns when the identity is unknown.
--sources names the exemplars: memorize.py's output ("slot N  path" lines) or "slot<TAB>name" lines.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

_SOURCE_LINE = re.compile(r"^\s*(?:slot\s+)?(\d+)\s+(\S.*?)\s*$")


def parse_sources(text: str) -> dict[int, str]:
    """{slot: name} from "slot N  name" or "N<TAB>name" lines; other lines are ignored (the last name wins)."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        match = _SOURCE_LINE.match(line)
        if match:
            out[int(match.group(1))] = match.group(2)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pccnet-memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="group", required=True)
    pack = sub.add_parser("pack", help="export, import or describe memory packs").add_subparsers(
        dest="action", required=True)
    exp = pack.add_parser("export", help="write a memory on a server to a pack file")
    exp.add_argument("--memory", required=True, help="endpoint of the memory server (tcp://HOST:PORT, ipc://PATH)")
    exp.add_argument("--name", required=True, help="memory to export")
    exp.add_argument("--output", required=True, help="pack file to write")
    exp.add_argument("--checkpoint", help="checkpoint whose extractor wrote the keys (default: identity unknown)")
    exp.add_argument("--sources", help="file naming the exemplars per slot (memorize.py's output)")
    imp = pack.add_parser("import", help="create a memory on a server from a pack file")
    imp.add_argument("--input", required=True, help="pack file")
    imp.add_argument("--memory", required=True, help="endpoint of the memory server")
    imp.add_argument("--name", help="name of the new memory (default: the pack's own)")
    imp.add_argument("--replace", action="store_true", help="replace a memory of that name")
    imp.add_argument("--checkpoint", help="refuse the pack unless this checkpoint's extractor wrote it")
    info = pack.add_parser("info", help="print a pack's metadata")
    info.add_argument("input", help="pack file")
    for p in (exp, imp):
        p.add_argument("--timeout-ms", type=int, default=30000, help="per-request timeout (default 30000)")
    return parser


def _export(args) -> int:
    from memory_server.client import MemoryClient
    from trainer.packs import UNKNOWN, checkpoint_identity, export_pack, write_pack

    identity, extractor, checkpoint = UNKNOWN, {}, ""
    if args.checkpoint:
        identity, extractor, checkpoint = checkpoint_identity(args.checkpoint)
    names = parse_sources(Path(args.sources).read_text()) if args.sources else {}
    with MemoryClient(args.memory, timeout_ms=args.timeout_ms) as client:
        if args.name not in client.info().get("memories", []):
            raise ValueError(f"memory {args.name!r} does not exist on {args.memory}")
        pack = export_pack(client, args.name, identity, extractor, checkpoint, names)
    write_pack(pack, args.output)
    print(f"wrote {args.output}: memory {pack.name!r}, {pack.written} of {pack.capacity} slots written, "
          f"{len(pack.sources)} named, extractor {pack.identity[:23]}")
    return 0


def _import(args) -> int:
    from memory_server.client import MemoryClient
    from trainer.packs import checkpoint_identity, import_pack, read_pack

    pack = read_pack(args.input)
    identity, key_dim = None, None
    if args.checkpoint:
        identity, extractor, _ = checkpoint_identity(args.checkpoint)
        key_dim = extractor.get("dim")
    with MemoryClient(args.memory, timeout_ms=args.timeout_ms) as client:
        done = import_pack(client, pack, args.name, args.replace, identity, key_dim)
    print(f"imported {args.input} as memory {done['name']!r} on {args.memory}: {done['written']} of "
          f"{done['capacity']} slots written")
    return 0


def _info(args) -> int:
    from trainer.packs import read_pack

    pack = read_pack(args.input)
    for key, value in pack.metadata().items():
        print(f"{key:20s} {value if len(value) < 200 else value[:200] + '...'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from memory_server.client import MemoryServerError, MemoryUnavailable
    from trainer.checkpoint import CheckpointError

    run = {"export": _export, "import": _import, "info": _info}[args.action]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning
        try:
            return run(args)
        except (ValueError, FileNotFoundError, CheckpointError, MemoryServerError, MemoryUnavailable) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
