"""python -m daemon.tools.bench == s2s-bench."""

import sys

from daemon.tools.bench.cli import main

sys.exit(main())
