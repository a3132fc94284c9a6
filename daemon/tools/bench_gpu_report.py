"""The GPU check's report (`s2s-bench-gpu`, scripts/gpu-check.sh): the machine and what it lacks,
what transfers to the P100, and the one JSON + Markdown table every figure lands in.

Every figure is a row: a value, or `null` with the reason it was not measured. Pure functions
except `environment()` (imports torch) and `read_junit()` (reads a file).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import platform
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from daemon.tools.bench.common import ROOT, TARGET_E2E_MS, TARGET_TTS_MS, TARGET_VRAM_BYTES

WHEEL_LIST = ROOT / "scripts" / "gpu-wheelhouse.txt"
WHISPER_TARGET_RATIO = 2.5
# The reference host (README): a 16 GB Tesla P100, compute 6.0: fp16 arithmetic, no bf16, no tensor cores.
P100_CAPABILITY = (6, 0)

# What each kind of figure says about the P100 when it was measured on another card.
TRANSFER = {
    "correctness": "yes: the same code path and dtype decision (fp16 autocast, compute >= 6.0)",
    "memory": "mostly: the same weights and activations; the CUDA context and cuBLAS/cuDNN workspaces "
              "differ by card and CUDA version (a few hundred MiB)",
    "speed": "no: a newer card (tensor cores, HBM) is many times faster than the P100; rerun there",
    "p100": "measured on the P100 itself",
}


# --- the wheel list: what the check carries, stands in for, leaves out ------------------------------


def wheel_list(path: Path = WHEEL_LIST) -> Dict[str, List[Tuple[str, str]]]:
    """{"carry"|"stub"|"omit": [(name, why), ...]} from scripts/gpu-wheelhouse.txt."""
    out: Dict[str, List[Tuple[str, str]]] = {"carry": [], "stub": [], "omit": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] in out:
            why = parts[2].lstrip("#").strip() if len(parts) > 2 else ""
            out[parts[0]].append((parts[1], why))
    return out


def omitted(name: str, path: Path = WHEEL_LIST) -> str:
    """The wheel list's reason for leaving `name` out ("" when it is not left out)."""
    return next((why for n, why in wheel_list(path)["omit"] if n == name), "")


# --- the machine ---------------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def pinned_versions() -> Dict[str, str]:
    pins = {}
    for req in ("requirements-speech.txt", "requirements-nodeps.txt"):
        for line in (ROOT / req).read_text(encoding="utf-8").splitlines():
            m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s#;]+)", line)
            if m:
                pins[m.group(1).lower()] = m.group(3)
    return pins


def stubs_in_use(path: Path = WHEEL_LIST) -> List[Dict[str, str]]:
    """The stand-ins (tests/gpu_stubs/) this process would import instead of the real module."""
    out = []
    for name, why in wheel_list(path)["stub"]:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - neither real nor stand-in: reported as such
            out.append({"module": name, "state": "missing", "why": why})
            continue
        if getattr(mod, "__s2s_stub__", False):
            out.append({"module": name, "state": "stand-in (tests/gpu_stubs)", "why": why})
    return out


def environment(device: str) -> Dict[str, Any]:
    """Python, torch and CUDA facts, the P100 decision, and the key packages against the pins."""
    from daemon import devices

    env: Dict[str, Any] = {"python": platform.python_version(), "requested_device": device}
    facts = devices.probe_cuda()
    env["cuda"] = {"available": facts.available, "devices": list(facts.names),
                   "capabilities": [f"{a}.{b}" for a, b in facts.capabilities], "arch_list": list(facts.arch_list),
                   "error": facts.error}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        if facts.available:
            env["cuda"]["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    except ImportError as e:
        env["torch"] = f"not importable: {e}"
    here = devices.choose_device(device, "auto", facts) if device != "cpu" else None
    p100 = devices.choose_device("cuda:1", "auto", devices.CudaFacts(
        True, 2, (P100_CAPABILITY, P100_CAPABILITY), ("sm_60", "sm_70", "sm_80"), ("Tesla P100-PCIE-16GB",) * 2))
    env["dtype_here"] = here.dtype if here else "float32 (cpu)"
    env["dtype_on_p100"] = p100.dtype
    sm60 = "sm_60" in facts.arch_list
    env["p100_kernels_in_this_torch"] = sm60
    env["p100_notes"] = [
        f"On the P100 (compute 6.0) the daemon chooses {p100.dtype} for 'auto' (no bf16 below compute 8.0); "
        f"here it chose {env['dtype_here']}.",
        "This torch build " + ("has" if sm60 else "has no") + " sm_60 kernels"
        + ("" if sm60 else ": the P100 needs torch 2.9.1 from PyTorch's CUDA 12.6 index "
           "(scripts/install-speech-p100.sh)") + ".",
        "fp16 on the P100 runs without tensor cores (about 2x its fp32 rate); a newer card's fp16 runs on "
        "tensor cores: speed figures from here do not transfer, memory and correctness do.",
    ]
    pins = pinned_versions()
    pkgs = {}
    for dist in ("torch", "torchaudio", "numpy", "scipy", "transformers", "huggingface_hub", "funasr",
                 "melotts-krqnf", "pyzmq", "websockets", "onnxruntime", "ctranslate2", "faster-whisper"):
        have, want = _version(dist), pins.get(dist.lower())
        pkgs[dist] = {"installed": have, "pinned": want,
                      "matches_pin": None if want is None or have is None else have.split("+")[0] == want}
    env["packages"] = pkgs
    env["stand_ins"] = stubs_in_use()
    wh = ROOT / ".wheelhouse" / "wheelhouse.json"
    if wh.is_file():
        data = json.loads(wh.read_text(encoding="utf-8"))
        env["wheelhouse"] = {"wheels": len(data.get("wheels", [])), "mib": round(data.get("total_bytes", 0) / 2 ** 20, 2)}
    else:
        env["wheelhouse"] = {"wheels": 0, "mib": 0.0, "note": "no .wheelhouse/ here (scripts/build-wheelhouse.sh)"}
    env["not_carried"] = [{"package": n, "why": w} for n, w in wheel_list()["omit"]]
    return env


# --- GPU tests (pytest's junit XML) -------------------------------------------------------------------


def read_junit(path: Optional[Path]) -> Dict[str, Any]:
    """Outcome per test of tests/test_gpu_*.py from pytest's --junitxml file."""
    if path is None or not Path(path).is_file():
        return {"ran": False, "why": f"no pytest report at {path}" if path else "tests not run", "tests": []}
    tests: List[Dict[str, Any]] = []
    for case in ET.parse(str(path)).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (el.get("message") or el.text or "").strip().splitlines()[0][:300] if (
                    el.get("message") or el.text) else ""
                break
        props = {pr.get("name"): pr.get("value") for pr in case.iter("property")}
        if props and outcome == "passed":
            detail = "; ".join(f"{k}: {v}" for k, v in props.items())
        tests.append({"name": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}", "outcome": outcome,
                      "detail": detail, "seconds": round(float(case.get("time", 0) or 0), 2), "properties": props})
    counts: Dict[str, int] = {}
    for t in tests:
        counts[str(t["outcome"])] = counts.get(str(t["outcome"]), 0) + 1
    return {"ran": True, "counts": counts, "tests": tests}


# --- figures -----------------------------------------------------------------------------------------


def figure(key: str, label: str, value: Any, unit: str = "", *, why: str = "", target: str = "",
           ok: Optional[bool] = None, kind: str = "speed", detail: Any = None) -> Dict[str, Any]:
    """One row: value (None = not measured, with `why`), the seed's target and PASS/FAIL where it has one."""
    row: Dict[str, Any] = {"key": key, "label": label, "value": value, "unit": unit, "target": target,
                           "transfers_to_p100": TRANSFER[kind], "transfer_kind": kind}
    if value is None:
        row["not_measured"] = why or "not measured"
        row["result"] = "not measured"
    else:
        row["result"] = "" if ok is None else ("PASS" if ok else "FAIL")
    if detail is not None:
        row["detail"] = detail
    return row


def vram_ok(mib: Optional[float]) -> Optional[bool]:
    return None if mib is None else mib * 2 ** 20 < TARGET_VRAM_BYTES


def tts_ok(p95_ms: Optional[float]) -> Optional[bool]:
    return None if p95_ms is None else p95_ms < TARGET_TTS_MS


def e2e_ok(p95_ms: Optional[float]) -> Optional[bool]:
    return None if p95_ms is None else p95_ms < TARGET_E2E_MS


def whisper_ok(ratio: Optional[float]) -> Optional[bool]:
    return None if ratio is None else ratio < WHISPER_TARGET_RATIO


def _cell(v: Any, unit: str) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g} {unit}".strip() if abs(v) < 100 else f"{v:.0f} {unit}".strip()
    if isinstance(v, dict):
        return ", ".join(f"{k} {_cell(x, '')}" for k, x in v.items()) + (f" {unit}" if unit else "")
    return f"{v} {unit}".strip()


def markdown(report: Dict[str, Any]) -> str:
    env = report["environment"]
    cuda = env.get("cuda", {})
    lines = [f"# s2s GPU check ({report['mode']}, device {report['device']}, models {report['engines']})", "",
             f"Machine: {', '.join(cuda.get('devices') or ['no CUDA device'])} (compute "
             f"{', '.join(cuda.get('capabilities') or ['-'])}); Python {env.get('python')}, torch {env.get('torch')}; "
             f"{report['elapsed_s']:.0f} s.", ""]
    lines += ["| figure | measured | target | result | transfers to the P100 |", "|---|---|---|---|---|"]
    for f in report["figures"]:
        val = _cell(f["value"], f["unit"]) if f["value"] is not None else f"not measured: {f['not_measured']}"
        lines.append(f"| {f['label']} | {val} | {f['target'] or '-'} | {f['result'] or '-'} | "
                     f"{f['transfer_kind']} |")
    lines += ["", "Transfer: " + "; ".join(f"**{k}**: {v}" for k, v in TRANSFER.items() if k != "p100") + ".", ""]
    lines += [f"- {n}" for n in env.get("p100_notes", [])]
    t = report.get("gpu_tests", {})
    lines += ["", "## Tests that need a GPU (tests/test_gpu_*.py)", ""]
    if not t.get("ran"):
        lines.append(f"not run: {t.get('why')}")
    else:
        lines.append(", ".join(f"{v} {k}" for k, v in sorted(t["counts"].items())))
        lines += ["", "| test | outcome | detail |", "|---|---|---|"]
        lines += [f"| {x['name']} | {x['outcome']} | {x['detail'].replace('|', '/')} |" for x in t["tests"]]
    lines += ["", "## Not carried, stood in", ""]
    lines += [f"- not carried: {x['package']}: {x['why']}" for x in env.get("not_carried", [])]
    lines += [f"- {x['module']}: {x['state']}: {x['why']}" for x in env.get("stand_ins", [])]
    wh = env.get("wheelhouse", {})
    lines.append(f"- wheelhouse: {wh.get('wheels')} wheels, {wh.get('mib')} MiB {wh.get('note', '')}".rstrip())
    off = [f"{k} {v['installed']} (pinned {v['pinned']})" for k, v in env.get("packages", {}).items()
           if v.get("matches_pin") is False]
    if off:
        lines.append("- versions here differ from the pins: " + ", ".join(off))
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def missing_figures(figures: Sequence[Dict[str, Any]], keys: Sequence[str]) -> List[str]:
    """Keys neither measured nor named as not measured (the dry run test checks this is empty)."""
    have = {f["key"] for f in figures if f["value"] is not None or f.get("not_measured")}
    return [k for k in keys if k not in have]
