"""Operations: systemd units verify and pin nothing; the P100 install script's dry run."""

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
VENV_BIN = Path(sys.executable).parent


def unit(name):
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str
    # systemd allows repeated keys (DeviceAllow=); keep the last, we only read single keys
    text = (UNITS / name).read_text()
    p.read_string(text)
    return p, text


@pytest.mark.parametrize("name,runtime", [("s2s-speechd.service", "s2s"), ("s2s-speechd@.service", "s2s-%i")])
def test_daemon_unit_essentials(name, runtime):
    u, text = unit(name)
    s = u["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert int(s["WatchdogSec"]) > 0 and s["Restart"] == "on-failure"
    assert s["RuntimeDirectory"] == runtime and s["RuntimeDirectoryMode"] == "0750"
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in text
    for k in ("ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges", "ReadWritePaths", "User"):
        assert k in s, k
    assert "DeviceAllow=/dev/nvidiactl" in text
    assert "StartLimitBurst" in u["Unit"]


def test_units_pin_no_gpu():
    for p in UNITS.glob("*.service"):
        body = "\n".join(l for l in p.read_text().splitlines() if not l.lstrip().startswith("#"))
        assert "cuda:" not in body and "CUDA_VISIBLE_DEVICES" not in body, p.name


def test_daemon_instance_unit_reads_its_own_config():
    """s2s-speechd@NAME: /etc/s2s/speechd-NAME.yaml, sockets in /run/s2s-NAME, its own env file."""
    u, text = unit("s2s-speechd@.service")
    s = u["Service"]
    assert "S2S_CONFIG=/etc/s2s/speechd-%i.yaml" in text and s["ExecStart"].endswith("--config ${S2S_CONFIG}")
    assert "EnvironmentFile=-/etc/default/s2s-speechd-%i" in text
    assert "%i" in u["Unit"]["Description"] and u["Install"]["WantedBy"] == "s2s.target"


def test_bridge_unit_requires_daemon():
    u, _ = unit("s2s-bridge.service")
    assert "s2s-speechd.service" in u["Unit"]["Requires"] and "s2s-speechd.service" in u["Unit"]["After"]
    assert u["Service"]["SupplementaryGroups"] == "s2s"


def test_systemd_analyze_verify(tmp_path):
    analyze = _tool("systemd-analyze")
    for p in UNITS.iterdir():
        if p.suffix in (".service", ".target"):
            (tmp_path / p.name).write_text(p.read_text().replace("/opt/s2s/.venv/bin", str(VENV_BIN)))
    r = subprocess.run([analyze, "verify", "--man=no",
                        *[str(p) for p in sorted(tmp_path.iterdir())]],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # verify exits 0 on unknown keys: any line naming our units is a problem
    problems = [l for l in (r.stdout + r.stderr).splitlines() if "s2s" in l]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_p100_install_dry_run(tmp_path):
    prefix = tmp_path / "opt"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install-speech-p100.sh"), "--dry-run",
                        "--prefix", str(prefix), "--models", str(tmp_path / "models")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "https://download.pytorch.org/whl/cu126" in out and "torch==2.9.1" in out and "torchaudio==2.9.1" in out
    assert "'sm_60' not in arch" in out
    assert "s2s-models fetch" in out and "s2s-models verify" in out and "systemctl daemon-reload" in out
    # a dry run does nothing
    assert not prefix.exists() and not (tmp_path / "models").exists()
    # the order matters: the cu126 torch before the generic requirements
    assert out.index("cu126") < out.index("requirements-speech.txt")


def test_p100_install_rejects_unknown_option():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install-speech-p100.sh"), "--bogus"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown option" in r.stderr


def _pins(name):
    return [line.split("#", 1)[0].strip() for line in (ROOT / name).read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def test_requirements_pins_are_exact():
    for name in ("requirements-speech.txt", "requirements-test.txt"):
        for line in _pins(name):
            assert "==" in line, f"{name}: unpinned requirement: {line}"


def test_runtime_requirements_carry_no_test_tools():
    """A host (start-s2s.sh, the P100 script, a systemd install) gets the runtime only: no browser
    automation, test runner or type checker."""
    runtime = {p.split("==")[0].split("[")[0].lower() for p in _pins("requirements-speech.txt")}
    tests = {p.split("==")[0].lower() for p in _pins("requirements-test.txt")}
    assert {"pytest", "hypothesis", "mypy", "playwright", "axe-playwright-python", "jiwer"} <= tests
    assert not runtime & {"pytest", "pytest-timeout", "hypothesis", "mypy", "playwright", "axe-playwright-python",
                          "jiwer"}
    assert not runtime & tests, runtime & tests
    # Only the test command installs the test pins.
    assert "scripts/install.sh --test" in (ROOT / "scripts" / "test.sh").read_text()
    for script in ("start-s2s.sh", "install-speech-p100.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "--test" not in text and "requirements-test" not in text, script


def _tool(name):
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: .ci/run installs it")
        pytest.skip(f"{name} not installed (CI installs it)")
    return path


def test_shellcheck_clean():
    sc = _tool("shellcheck")
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.sh")) + [str(ROOT / ".ci" / "run")]
    r = subprocess.run([sc, "-x", *scripts], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
