"""`s2s-bench scaleout` (issue 29): one daemon's sweep and two daemons' sweep with each stream placed
by daemon/wire/placement.py, in one run, against two real tiny-FunASR daemons (short points: this
checks the tool, BENCHMARKS.md has the measured sweep)."""

from __future__ import annotations

import json

import pytest

from daemon.tools.bench.cli import main
from daemon.tools.bench.scaleout import parse_args


def test_options():
    a = parse_args(["--one", "8,4", "--all", "16"])
    assert a.one == [4, 8] and a.all == [16] and a.daemons == 2
    with pytest.raises(SystemExit):
        parse_args(["--daemons", "1"])


def test_scaleout_real_run(models_dir, tmp_path):
    rc = main(["scaleout", "--one", "2", "--all", "4", "--seconds", "3", "--settle", "0", "--warmup", "1",
               "--bench-args", f"--models {models_dir} --drain-timeout 30", "--out", str(tmp_path)])
    assert rc == 0
    r = json.loads((tmp_path / "scaleout.json").read_text(encoding="utf-8"))["result"]
    assert [p["streams"] for p in r["one"]["points"]] == [2] and r["one"]["daemons"] == 1
    assert [p["streams"] for p in r["all"]["points"]] == [4] and r["all"]["daemons"] == 2
    # every stream placed on one of the two (by room: the first daemon's admission has learned its cost
    # from the one-daemon sweep, the second still has its prior, so small points may all go to one)
    assert [sum(p["per_daemon"]) for p in r["all"]["points"]] == [4]
    assert all(len(p["per_daemon"]) == 2 for p in r["all"]["points"])
    for p in r["one"]["points"] + r["all"]["points"]:
        assert p["admitted"] == p["streams"] and p["undrained"] == 0 and p["finals"] >= p["streams"]
        assert p["daemon_cpu_percent"] > 0
    if r["one"]["holds_up_to"] and r["all"]["holds_up_to"]:
        assert r["ratio"] == round(r["all"]["holds_up_to"] / r["one"]["holds_up_to"], 2)
