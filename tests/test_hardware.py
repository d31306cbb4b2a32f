"""Precision defaults follow the hardware: bf16 only where it runs natively (mocked both ways)."""

from __future__ import annotations

import pytest
import torch

from lmrc import hardware
from lmrc.stage2.modeling import resolve_dtype


@pytest.fixture
def native_bf16(monkeypatch):
    def set_(value: bool) -> None:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: value)

    return set_


def test_auto_precision_is_bf16_only_on_cpus_that_run_it_natively(native_bf16):
    native_bf16(True)
    assert hardware.cpu_supports_bf16() is True
    assert hardware.resolve_mixed_precision("auto", cuda=False) == "bf16"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    native_bf16(False)  # an AVX2-only CPU: emulated bf16 is ~10x slower than float32
    assert hardware.resolve_mixed_precision("auto", cuda=False) == "no"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    for forced in ("bf16", "fp16", "no"):
        assert hardware.resolve_mixed_precision(forced, cuda=False) == forced


def test_auto_precision_on_cuda_prefers_bf16_then_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.resolve_mixed_precision("auto", cuda=True) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.resolve_mixed_precision("auto", cuda=True) == "fp16"


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
