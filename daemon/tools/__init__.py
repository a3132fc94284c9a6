"""Command-line tools around the daemon: s2s-ctl, s2s-bench (and its stand-in agent), metrics."""
