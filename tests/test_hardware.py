"""Precision defaults follow the hardware: bf16 only where it runs natively (mocked both ways)."""

from __future__ import annotations

import pytest
import torch

from lmrc.machine import cpu_guard, cpu_info, hardware
from lmrc.stage2.modeling import resolve_dtype


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU with native bf16 (AVX512-BF16) or without it (Ice Lake AVX512), the guard's verdict passing."""

    def set_(value: bool, mode: str = "bf16") -> None:
        flags = frozenset({"avx2", "avx512f"} | ({"avx512_bf16"} if value else set()))
        cpu = cpu_info.CpuInfo("test CPU", flags, "x86_64", None)
        monkeypatch.setattr(cpu_info, "read_cpu", lambda: cpu)
        verdict = cpu_guard.Verdict(mode if value else "not-needed", "test", cpu.kind())
        monkeypatch.setattr(cpu_guard, "ensure", lambda: verdict)
        monkeypatch.setattr(
            torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True
        )  # as on AVX512 without bf16
        monkeypatch.setattr("platform.machine", lambda: "x86_64")

    return set_


def test_auto_precision_is_bf16_only_on_cpus_that_run_it_natively(native_bf16):
    native_bf16(True)
    assert hardware.cpu_supports_bf16() is True
    assert hardware.resolve_mixed_precision("auto", cuda=False) == "bf16"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    # AVX512 without AVX512-BF16 (Ice Lake) or AVX2-only: torch's own check says yes, but bf16 is emulated there
    # (4.6x slower than float32 measured on Ice Lake, ~10x on AVX2)
    native_bf16(False)
    assert hardware.resolve_mixed_precision("auto", cuda=False) == "no"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    for forced in ("bf16", "fp16", "no"):
        assert hardware.resolve_mixed_precision(forced, cuda=False) == forced


def test_a_cpu_whose_bf16_kernels_fail_the_guard_runs_float32_even_when_bf16_is_asked(native_bf16, caplog):
    native_bf16(True, mode="float32")
    assert hardware.cpu_supports_bf16() is False
    assert hardware.resolve_mixed_precision("auto", cuda=False) == "no"
    with caplog.at_level("WARNING"):
        assert hardware.resolve_mixed_precision("bf16", cuda=False) == "no"
        assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.float32
    assert "turned off on this CPU" in caplog.text
    native_bf16(True, mode="bf16-no-amx")  # AMX off, bf16 kept
    assert hardware.resolve_mixed_precision("auto", cuda=False) == "bf16"
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def _fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """A CUDA GPU of the given compute capability, as torch reports it (emulated bf16 counts as bf16 there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or capability >= (8, 0)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


@pytest.mark.parametrize(
    "gpu, capability, native",
    [("V100", (7, 0), False), ("T4", (7, 5), False), ("A100", (8, 0), True), ("H100", (9, 0), True)],
)
def test_auto_precision_on_cuda_is_bf16_only_where_native_else_fp16(monkeypatch, gpu, capability, native):
    _fake_gpu(monkeypatch, capability)
    assert torch.cuda.is_bf16_supported()  # what torch says with emulation: the old check accepted every GPU
    assert hardware.cuda_supports_bf16() is native, gpu
    assert hardware.resolve_mixed_precision("auto", cuda=True) == ("bf16" if native else "fp16")
    assert resolve_dtype("auto", torch.device("cuda", 0)) == (torch.bfloat16 if native else torch.float16)


def test_bf16_detection_falls_back_to_the_compute_capability_on_older_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def old_signature():  # torch < 2.3: no including_emulation argument
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", old_signature)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert hardware.cuda_supports_bf16() is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert hardware.cuda_supports_bf16() is True


def test_on_a_v100_both_stages_train_in_fp16_with_a_loss_scaler(monkeypatch):
    from dataclasses import astuple

    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.engine import resolve_precision

    _fake_gpu(monkeypatch, (7, 0))
    assert hardware.resolve_mixed_precision("auto") == "fp16"  # stage 1: accelerate's fp16 + GradScaler
    cfg = load_stage2_config(None, [])
    cuda = torch.device("cuda", 0)
    # stage 2: fp16 weights with the Trainer's autocast + loss scaler; FSDP: float32 flat parameters
    assert astuple(resolve_precision(cfg, cuda, "ddp")) == (torch.float16, False, True)
    assert astuple(resolve_precision(cfg, cuda, "fsdp")) == (torch.float32, False, True)
    _fake_gpu(monkeypatch, (8, 0))
    assert astuple(resolve_precision(cfg, cuda, "fsdp")) == (torch.float32, True, False)
    assert astuple(resolve_precision(cfg, cuda, "deepspeed")) == (torch.bfloat16, True, False)
    assert astuple(resolve_precision(cfg, cuda, "ddp")) == (torch.bfloat16, False, False)


def test_gpu_memory_reports_every_local_device(monkeypatch):
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"GPU{i}")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=None: (i + 1) * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda i=None: (i + 2) * gib)
    # the device-wide use (another process, e.g. vLLM's engine core) comes from NVML or the CUDA runtime
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (30 * gib, 80 * gib))
    entries = hardware.gpu_memory()
    assert [(e["device"], e["peak_allocated_gib"], e["peak_reserved_gib"]) for e in entries] == [
        (0, 1.0, 2.0),
        (1, 2.0, 3.0),
    ]
    assert entries[1]["device_used_gib"] == 50.0 and entries[1]["device_total_gib"] == 80.0
    line = hardware.gpu_memory_line(entries)
    assert "cuda:0 peak 1.0 GiB allocated / 2.0 GiB reserved" in line and "cuda:1" in line


def test_gpu_memory_without_cuda_is_empty():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert hardware.gpu_memory() == [] and hardware.gpu_memory_line() == "GPU memory: no CUDA device"


def test_version_floors_are_what_the_code_needs_and_are_installed():
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    reqs = {r.name: r for r in map(Requirement, project["dependencies"])}
    floor = {
        name: min(Version(s.version) for s in r.specifier if s.operator == ">=") for name, r in reqs.items()
    }
    assert floor["transformers"] >= Version("5.5")  # Trainer._run_epoch, logits_to_keep masks
    assert floor["torch"] >= Version("2.6") and floor["accelerate"] >= Version("1.1")
    for name, r in reqs.items():  # the environment the tests run in satisfies every declared range
        assert r.specifier.contains(version(name), prereleases=True), (name, version(name), str(r.specifier))
    from transformers import Trainer

    assert hasattr(Trainer, "_run_epoch")
    vllm = [Requirement(r) for r in project["optional-dependencies"]["vllm"]]
    assert min(Version(s.version) for s in vllm[0].specifier) >= Version("0.7")  # guided decoding API


def test_describe_names_the_cpu_capability():
    d = hardware.describe()
    assert d["cpu_capability"] == str(torch.backends.cpu.get_cpu_capability())
    assert isinstance(d["cpu_native_bf16"], bool) and d["cores"] >= 1
    assert d["cpu_capability"] in hardware.describe_line()


def test_cpu_configs_leave_precision_and_threads_to_the_machine():
    from pathlib import Path

    import yaml

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*cpu*.yaml")):
        train = (yaml.safe_load(path.read_text()) or {}).get("train", {}) or {}
        assert train.get("mixed_precision", "auto") == "auto", path.name
        assert "num_threads" not in train, path.name
