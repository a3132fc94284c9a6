"""Device choice is a pure function of CUDA facts: every case without a GPU."""

import pytest

from daemon.devices import CudaFacts, choose_device, is_cuda_error

P100 = (6, 0)
RTX3080 = (8, 6)
NEW_BUILD = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")  # torch >= 2.8 cu128: no Pascal
CU126 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
REFERENCE_HOST = CudaFacts(True, 2, (RTX3080, P100), CU126, ("GeForce RTX 3080", "Tesla P100-PCIE-16GB"))


def test_reference_host_p100_fp16():
    c = choose_device("cuda:1", "auto", REFERENCE_HOST)
    assert (c.device, c.dtype, c.fallback_reason) == ("cuda:1", "float16", "")
    assert "P100" in c.name and c.is_cuda


def test_p100_never_bf16():
    assert choose_device("cuda:1", "bfloat16", REFERENCE_HOST).dtype == "float16"


def test_ampere_may_use_bf16_when_asked():
    assert choose_device("cuda:0", "bfloat16", REFERENCE_HOST).dtype == "bfloat16"
    assert choose_device("cuda:0", "auto", REFERENCE_HOST).dtype == "float16"


def test_float32_request_honoured_on_cuda():
    assert choose_device("cuda:1", "float32", REFERENCE_HOST).dtype == "float32"


def test_p100_without_sm60_kernels_falls_back_to_cpu_with_reason():
    facts = CudaFacts(True, 2, (RTX3080, P100), NEW_BUILD, ("RTX 3080", "Tesla P100"))
    c = choose_device("cuda:1", "auto", facts)
    assert (c.device, c.dtype) == ("cpu", "float32")
    assert "sm_60" in c.fallback_reason and "12.6" in c.fallback_reason
    # the 3080 on the same build is fine
    assert choose_device("cuda:0", "auto", facts).device == "cuda:0"


def test_ptx_forward_compat_counts():
    facts = CudaFacts(True, 1, ((8, 9),), ("sm_80", "compute_80"), ("L4",))
    assert choose_device("cuda:0", "auto", facts).device == "cuda:0"
    facts = CudaFacts(True, 1, (P100,), ("sm_70", "compute_70"), ("P100",))
    assert choose_device("cuda:0", "auto", facts).device == "cpu"


def test_no_cuda():
    c = choose_device("cuda:1", "auto", CudaFacts(error="CUDA is not available"))
    assert c.device == "cpu" and "not available" in c.fallback_reason


def test_missing_index():
    facts = CudaFacts(True, 1, (RTX3080,), CU126, ("RTX 3080",))
    c = choose_device("cuda:1", "auto", facts)
    assert c.device == "cpu" and "only 1 CUDA device" in c.fallback_reason


def test_cpu_and_auto():
    assert choose_device("cpu", "float16", REFERENCE_HOST) .dtype == "float32"
    assert choose_device("cpu", "auto", REFERENCE_HOST).device == "cpu"
    c = choose_device("auto", "auto", CudaFacts())
    assert c.device == "cpu" and c.fallback_reason == ""
    assert choose_device("auto", "auto", REFERENCE_HOST).device == "cuda:0"
    assert choose_device("cuda", "auto", REFERENCE_HOST).device == "cuda:0"


def test_pre_pascal_gets_fp32():
    facts = CudaFacts(True, 1, ((5, 2),), ("sm_52",), ("Maxwell",))
    assert choose_device("cuda:0", "auto", facts).dtype == "float32"


@pytest.mark.parametrize("exc,want", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (type("OutOfMemoryError", (RuntimeError,), {})("oom"), True),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"), True),
    (ValueError("text is empty"), False),
    (RuntimeError("shape mismatch"), False),
])
def test_is_cuda_error(exc, want):
    assert is_cuda_error(exc) is want


def test_probe_cuda_on_this_host_is_consistent():
    from daemon.devices import probe_cuda, resolve

    facts = probe_cuda()
    c = resolve("cuda:1", "auto", facts, what="test")
    if not facts.available:
        assert c.device == "cpu" and c.fallback_reason


def test_cpu_threads_auto_is_each_engines_measured_best_within_the_cores(monkeypatch):
    from daemon import devices
    from daemon.config import ConfigError, parse_config

    assert parse_config({}).asr.ncpu == 0  # auto by default
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 16)
    assert devices.cpu_threads(0, "funasr") == 1 and devices.cpu_threads(0, "whisper") == 2
    assert devices.cpu_threads(3, "funasr") == 3  # a configured count is kept
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 1)
    assert devices.cpu_threads(0, "whisper") == 1
    from daemon.asr.funasr_engine import FunASRConfig
    from daemon.asr.whisper_engine import WhisperConfig

    cfg = parse_config({})
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 2)
    assert FunASRConfig.from_config(cfg).ncpu == 1 and WhisperConfig.from_config(cfg).ncpu == 2
    with pytest.raises(ConfigError):
        parse_config({"asr": {"ncpu": -1}})


def test_openmp_threads_sleep_unless_the_environment_chose(monkeypatch):
    """Spinning OpenMP threads starved the thread doing the work (a Whisper final took 12-16 s in
    the daemon, 1.8 s alone): the daemon asks for passive waiting, unless the operator set it."""
    from daemon import devices

    env = {}
    devices.quiet_thread_pools(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    devices.quiet_thread_pools(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_daemon_quiets_openmp_before_it_loads_anything(monkeypatch, tmp_path):
    import daemon.__main__ as m
    from daemon import devices

    order = []
    monkeypatch.setattr(devices, "quiet_thread_pools", lambda env=None: order.append("quiet"))
    monkeypatch.setattr(m, "run", lambda cfg, strict=False: order.append("run") or 0)
    cfg = tmp_path / "s2s.yaml"
    cfg.write_text("models_root: /nonexistent\n")
    assert m.main(["--config", str(cfg)]) == 0
    assert order == ["quiet", "run"]
