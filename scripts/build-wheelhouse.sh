#!/usr/bin/env bash
# Build .wheelhouse/: the cp312 manylinux wheels scripts/gpu-check.sh installs on a lent GPU machine
# (Python 3.12, no network, at most 64 MiB carried with the working tree). One command, online host:
#
#   scripts/build-wheelhouse.sh [--out DIR] [--max-mib 60]
#
# Which packages: the `carry` lines of scripts/gpu-wheelhouse.txt. Which versions: the exact pins of
# requirements-speech.txt / requirements-nodeps.txt, else the version this checkout's .venv resolved
# to (printed with its source). Wheels PyPI ships only as source are built here (`pip wheel`), and
# must come out pure Python. Prints each wheel's size and the total, writes DIR/wheelhouse.json, and
# fails when the total is over --max-mib (60: the device carries 64 MiB with the working tree).
# DIR (default .wheelhouse) is git-ignored; name it in the device tool's `carry`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/.wheelhouse
MAX_MIB=60
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --max-mib) MAX_MIB=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${S2S_VENV:-$ROOT/.venv}/bin/python
[ -x "$PY" ] || PY=python3
export S2S_ROOT=$ROOT S2S_WHEELHOUSE=$OUT S2S_MAX_MIB=$MAX_MIB
mkdir -p "$OUT"
exec "$PY" - <<'PY'
import importlib.metadata as md
import json, os, re, subprocess, sys, tempfile, zipfile
from pathlib import Path

root, out, max_mib = Path(os.environ["S2S_ROOT"]), Path(os.environ["S2S_WHEELHOUSE"]), float(os.environ["S2S_MAX_MIB"])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (35, 34, 31, 28, 27, 26, 24, 17, 5)] + ["manylinux2014_x86_64",
                                                                                     "manylinux1_x86_64"]
pins = {}
for req in ("requirements-speech.txt", "requirements-nodeps.txt"):
    for line in (root / req).read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s#;]+)", line)
        if m:
            pins[norm(m.group(1))] = (m.group(3), req)
carry = [l.split()[1] for l in (root / "scripts" / "gpu-wheelhouse.txt").read_text().splitlines()
         if l.split() and l.split()[0] == "carry"]
pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
rows, failed = [], []
for name in carry:
    if norm(name) in pins:
        ver, src = pins[norm(name)]
    else:
        try:
            ver, src = md.version(name), "resolved in .venv"
        except md.PackageNotFoundError:
            failed.append(f"{name}: no pin in the requirements and not installed in the venv to take one from")
            continue
    spec = f"{name}=={ver}"
    have = [p for p in out.glob("*.whl") if norm(p.name.split("-")[0]) == norm(name) and p.name.split("-")[1] == ver]
    if not have:
        cmd = pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                     "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(out), spec]
        for p in PLATFORMS + ["any"]:
            cmd += ["--platform", p]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            # Source only on PyPI: build it here; only a pure-Python wheel runs there.
            with tempfile.TemporaryDirectory() as td:
                r = subprocess.run(pip + ["wheel", "--no-deps", "-w", td, spec], capture_output=True, text=True)
                built = list(Path(td).glob("*.whl"))
                if r.returncode != 0 or not built or not built[0].name.endswith("-py3-none-any.whl") and \
                        not built[0].name.endswith("-py2.py3-none-any.whl"):
                    failed.append(f"{spec}: no cp312 manylinux wheel and no pure-Python build ({r.stderr.strip()[-300:]})")
                    continue
                os.replace(built[0], out / built[0].name)
        have = [p for p in out.glob("*.whl") if norm(p.name.split("-")[0]) == norm(name) and p.name.split("-")[1] == ver]
    if not have:
        failed.append(f"{spec}: downloaded nothing")
        continue
    whl = have[0]
    meta = zipfile.ZipFile(whl).read(next(n for n in zipfile.ZipFile(whl).namelist() if n.endswith(".dist-info/METADATA")))
    needs = [l.split(":", 1)[1].strip() for l in meta.decode("utf-8", "replace").splitlines()
             if l.startswith("Requires-Dist:") and "extra ==" not in l]
    rows.append({"name": name, "version": ver, "pin": src, "wheel": whl.name, "bytes": whl.stat().st_size,
                 "requires": needs})
# Wheels left from an earlier list or pin: two versions of one package stop the install there.
keep = {r["wheel"] for r in rows}
for p in out.glob("*.whl"):
    if p.name not in keep:
        print(f"removing stale {p.name}")
        p.unlink()
total = sum(r["bytes"] for r in rows)
for r in sorted(rows, key=lambda r: -r["bytes"]):
    print(f"{r['bytes'] / 2 ** 20:8.2f} MiB  {r['name']}=={r['version']}  ({r['pin']})")
print(f"{total / 2 ** 20:8.2f} MiB  total, {len(rows)} wheels in {out} (limit {max_mib:g} MiB)")
(out / "wheelhouse.json").write_text(json.dumps({"total_bytes": total, "max_mib": max_mib, "python": "3.12",
                                                "wheels": rows}, indent=1) + "\n")
for f in failed:
    print(f"FAILED: {f}", file=sys.stderr)
if total > max_mib * 2 ** 20:
    print(f"FAILED: {total / 2 ** 20:.2f} MiB is over {max_mib:g} MiB", file=sys.stderr)
sys.exit(1 if failed or total > max_mib * 2 ** 20 else 0)
PY
