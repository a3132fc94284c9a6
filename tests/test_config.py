"""Config validation: types, unknown keys, device strings, env overrides, --check-config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import config as C

ROOT = Path(__file__).resolve().parent.parent


def load(tmp_path, text, env=None):
    p = tmp_path / "s2s.yaml"
    p.write_text(text, encoding="utf-8")
    return C.load_config(str(p), env=env or {})


def test_repo_default_config_is_valid():
    cfg = C.load_config(str(ROOT / "etc" / "s2s.yaml"), env={})
    assert cfg.asr.engine == "funasr" and cfg.asr.device == "cuda:1"
    assert cfg.tts.engine == "melo" and cfg.tts.sample_rate == 24000
    assert cfg.bridge.port == 8765 and cfg.agent.url == "http://127.0.0.1:8000"


def test_repo_config_spells_out_every_key():
    """etc/s2s.yaml is the documented default: it must name every field of every section."""
    import dataclasses
    import yaml

    data = yaml.safe_load((ROOT / "etc" / "s2s.yaml").read_text())

    def walk(cls, d, prefix):
        for f in dataclasses.fields(cls):
            if f.name in ("source", "overrides"):
                continue
            assert f.name in d, f"etc/s2s.yaml lacks {prefix}{f.name}"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), d[f.name], f"{prefix}{f.name}.")

    walk(C.Config, data, "")


def test_empty_file_gives_defaults(tmp_path):
    cfg = load(tmp_path, "")
    assert cfg == C.Config(source=str(tmp_path / "s2s.yaml"))


@pytest.mark.parametrize("text,key", [
    ("asr: {engin: funasr}\n", "asr.engin"),
    ("bogus: 1\n", "bogus"),
    ("asr: {funasr: {paraformr: x}}\n", "asr.funasr.paraformr"),
    ("asr: {device: gpu1}\n", "asr.device"),
    ("tts: {device: 'cuda:x'}\n", "tts.device"),
    ("tts: {fallback_device: cuda1}\n", "tts.fallback_device"),
    ("asr: {engine: kaldi}\n", "asr.engine"),
    ("tts: {speed: fast}\n", "tts.speed"),
    ("tts: {speed: 0}\n", "tts.speed"),
    ("bridge: {port: '8765'}\n", "bridge.port"),
    ("limits: {max_sessions: 2.5}\n", "limits.max_sessions"),
    ("daemon: {strict: 'yes'}\n", "daemon.strict"),
    ("asr: {hotwords: {a: 1}}\n", "asr.hotwords"),
    ("asr: [1, 2]\n", "asr"),
    ("daemon: {socket_mode: '999'}\n", "daemon.socket_mode"),
    ("daemon: {asr_endpoint: 'http://x'}\n", "daemon.asr_endpoint"),
    ("asr: {funasr: {paraformer: ''}}\n", "asr.funasr.paraformer"),
    ("asr: {funasr: {quantize: int4}}\n", "asr.funasr.quantize"),
    ("tts: {engine: piper, piper: {voice: ''}}\n", "tts.piper.voice"),
    ("agent: {kind: gpt}\n", "agent.kind"),
])
def test_bad_values_name_the_key_and_file(tmp_path, text, key):
    with pytest.raises(C.ConfigError) as ei:
        load(tmp_path, text)
    msg = str(ei.value)
    assert ei.value.key == key
    assert msg.startswith(str(tmp_path / "s2s.yaml") + ": " + key + ":"), msg
    assert "\n" not in msg


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(C.ConfigError) as ei:
        load(tmp_path, "asr:\n  engine: [funasr\n")
    assert "line" in ei.value.key and "invalid YAML" in str(ei.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(C.ConfigError, match="cannot read"):
        C.load_config(str(tmp_path / "nope.yaml"), env={})


@pytest.mark.parametrize("dev", ["cpu", "auto", "cuda", "cuda:0", "cuda:1", "cuda:12"])
def test_valid_device_strings(tmp_path, dev):
    assert load(tmp_path, f"asr: {{device: '{dev}'}}\n").asr.device == dev


@pytest.mark.parametrize("dev", ["gpu", "cuda:", "cuda:-1", "CUDA:1", "cuda:1:2", "mps", ""])
def test_invalid_device_strings(tmp_path, dev):
    with pytest.raises(C.ConfigError, match="asr.device"):
        load(tmp_path, f"asr: {{device: '{dev}'}}\n")


def test_env_overrides_win_and_are_reported(tmp_path):
    env = {"ASR_ENGINE": "whisper", "TTS_ENGINE": "piper", "ASR_DEVICE": "cpu", "TTS_DEVICE": "cuda:0",
           "S2S_MODELS": "/srv/models"}
    cfg = load(tmp_path, "asr: {engine: funasr, device: 'cuda:1'}\n", env=env)
    assert (cfg.asr.engine, cfg.tts.engine, cfg.asr.device, cfg.tts.device) == ("whisper", "piper", "cpu", "cuda:0")
    assert cfg.models_root == "/srv/models"
    assert any("ASR_ENGINE=whisper" in o for o in cfg.overrides)


def test_env_override_is_validated(tmp_path):
    with pytest.raises(C.ConfigError, match="asr.engine"):
        load(tmp_path, "", env={"ASR_ENGINE": "kaldi"})
    with pytest.raises(C.ConfigError, match="tts.device"):
        load(tmp_path, "", env={"TTS_DEVICE": "gpu"})


def test_s2s_config_env_names_the_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("asr: {language: en}\n")
    cfg = C.load_config(env={"S2S_CONFIG": str(p)})
    assert cfg.asr.language == "en" and cfg.source == str(p)


def test_model_path_relative_and_absolute():
    cfg = C.Config(models_root="/m")
    assert cfg.model_path("fsmn-vad") == Path("/m/fsmn-vad")
    assert cfg.model_path("/abs/x") == Path("/abs/x")


def test_endpoints_use_runtime_dir(monkeypatch):
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    d = C.DaemonConfig(runtime_dir="/tmp/r")
    assert d.endpoint("asr") == "ipc:///tmp/r/asr.sock" and d.endpoint("tts") == "ipc:///tmp/r/tts.sock"
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/s2s")
    assert C.DaemonConfig().endpoint("asr") == "ipc:///run/s2s/asr.sock"
    assert C.DaemonConfig().socket_mode_bits == 0o660


def test_secrets_redacted():
    import dataclasses

    cfg = C.Config()
    cfg = dataclasses.replace(cfg, bridge=dataclasses.replace(cfg.bridge, token="s3cret"),
                              agent=dataclasses.replace(cfg.agent, api_key="sk-x"))
    d = C.as_dict(cfg)
    assert d["bridge"]["token"] == "***" and d["agent"]["api_key"] == "***"
    assert "s3cret" not in repr(d) and "sk-x" not in repr(d)


def test_reload_changes_split_live_and_restart():
    import dataclasses

    from daemon.serving.reload import changes

    a = C.Config()
    b = dataclasses.replace(a, limits=dataclasses.replace(a.limits, max_sessions=4),
                            asr=dataclasses.replace(a.asr, device="cpu", hotwords=("阿里巴巴",)))
    applied, restart = changes(a, b)
    assert applied == ["asr.hotwords [] -> [阿里巴巴]", f"limits.max_sessions {a.limits.max_sessions} -> 4"]
    assert restart == ["asr.device"]


def test_reload_applies_the_turn_timing_to_new_sessions():
    import dataclasses

    from daemon.serving.reload import changes, merge

    a = C.Config()
    b = dataclasses.replace(a, turn=dataclasses.replace(a.turn, early_silence=0.25, sentence_end=False, speculate=False))
    applied, restart = changes(a, b)
    assert applied == ["turn.early_silence 0.3 -> 0.25", "turn.sentence_end True -> False"]
    assert restart == ["turn.speculate"]  # the bridge's, read when it starts
    m = merge(a, b)
    assert (m.turn.early_silence, m.turn.sentence_end, m.turn.speculate) == (0.25, False, True)


def run_check(args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in C.ENV_OVERRIDES and k != "S2S_CONFIG"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "daemon", "--check-config", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_check_config_cli(tmp_path):
    r = run_check(["--config", str(ROOT / "etc" / "s2s.yaml")])
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and "engine=funasr" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("asr: {engin: funasr}\n")
    r = run_check(["--config", str(bad)])
    assert r.returncode != 0 and "asr.engin" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr
    r = run_check(["--config", str(ROOT / "etc" / "s2s.yaml")], {"ASR_ENGINE": "whisper"})
    assert r.returncode == 0 and "engine=whisper" in r.stdout and "ASR_ENGINE=whisper" in r.stdout


def test_check_config_strict_reports_absent_models(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(f"models_root: {tmp_path}/none\ndaemon: {{strict: true}}\n")
    r = run_check(["--config", str(p)])
    assert r.returncode == 1 and "ABSENT" in r.stdout and "strict" in r.stderr


def test_check_config_does_not_import_heavy_modules(tmp_path):
    code = ("import sys; from daemon.__main__ import main; rc = main(['--check-config']); "
            "heavy = [m for m in ('torch', 'funasr', 'melo', 'faster_whisper', 'zmq') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout


def test_readme_config_table_names_every_key():
    """The README's config table lists every key of every section (it is the user's map)."""
    import dataclasses

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(C.Config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(default):
            continue
        row = next((l for l in readme.splitlines() if l.startswith(f"| `{f.name}` |")), "")
        assert row, f"README config table has no row for {f.name}"
        for sub in dataclasses.fields(default):
            assert f"`{sub.name}" in row or f"{sub.name}." in row or f",{sub.name}" in row, \
                f"README config table lacks {f.name}.{sub.name}"
