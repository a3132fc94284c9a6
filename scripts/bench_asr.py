#!/usr/bin/env python3
"""Thin wrapper, kept for old notes: `s2s-bench asr` (daemon/bench_cli.py) is the benchmark; see BENCHMARKS.md.

    python scripts/bench_asr.py [s2s-bench options]  ==  s2s-bench asr [options]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.bench_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["asr", *sys.argv[1:]]))
