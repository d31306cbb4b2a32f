"""The CPU guard (lmrc.machine.cpu_guard) and the crash report (lmrc.machine.crash).

No machine here has AMX, so the real SIGFPE cannot happen: the probe's child is made to die by a real SIGFPE
before chosen cases (LMRC_CPU_PROBE_FAULT[_CAPPED]), which is what oneDNN's kernel does to it on AMX.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmrc.errors import LmrcError
from lmrc.machine import cpu_guard, cpu_info, cpu_probe
from lmrc.machine.cpu_guard import Verdict, decide
from lmrc.machine.cpu_info import CpuInfo
from lmrc.machine.cpu_probe import run_probe
from lmrc.machine.cpu_probe_child import relative_error
from lmrc.machine.crash import crash_line, innermost_lmrc_frame

AMX = CpuInfo("Xeon (Sapphire Rapids)", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
              "x86_64", None)  # fmt: skip
ICE_LAKE = CpuInfo("Xeon (Ice Lake)", frozenset({"avx2", "avx512f"}), "x86_64", None)
# the crashing shape, its sibling with 2 relations, their split-K routes, the bilinear's backward and two LLM layers
SUBSET = r"^stage1-bilinear(-split)? m=32 |^stage1-bilinear-backward m=32|^llm m=1 k=576 n=(576|1536)$"
probe = functools.partial(run_probe, only=SUBSET)


@pytest.fixture
def faults(monkeypatch):
    for name in ("LMRC_CPU_PROBE_FAULT", "LMRC_CPU_PROBE_FAULT_CAPPED", "LMRC_CPU_GUARD"):
        monkeypatch.delenv(name, raising=False)
    # The probe children run below AMX (and AVX512), so that on an AMX machine the real crash cannot mix with the
    # injected ones; the "capped" probe sets its own cap, as in use.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")

    def set_(native: str | None = None, capped: str | None = None) -> None:
        for name, value in (("LMRC_CPU_PROBE_FAULT", native), ("LMRC_CPU_PROBE_FAULT_CAPPED", capped)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return set_


def test_native_bf16_needs_the_hardware_and_an_isa_cap_that_allows_it():
    assert AMX.native_bf16 and AMX.amx_in_use and AMX.kind() == "AMX"
    assert not ICE_LAKE.native_bf16 and ICE_LAKE.kind() == "AVX512 no native bf16"
    amx_off = dataclasses.replace(AMX, isa_cap="AVX512_CORE_BF16")
    assert amx_off.native_bf16 and not amx_off.amx_in_use
    assert not dataclasses.replace(AMX, isa_cap="avx2").native_bf16  # AVX2 imitated: float32
    assert not dataclasses.replace(AMX, isa_cap="AVX512_CORE").native_bf16
    assert not dataclasses.replace(AMX, machine="aarch64").native_bf16  # ARM: torch's own check decides


def test_read_cpu_parses_the_flags_that_matter(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n\n"
    )
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cpu = cpu_info.read_cpu(str(info))
    assert cpu.model == "Some Xeon" and cpu.flags == {"avx2", "avx512f", "amx_bf16", "amx_tile"}
    assert cpu.has_amx and cpu.isa_cap == "AVX2" and not cpu.native_bf16


def test_a_cpu_without_native_bf16_needs_no_probe(faults):
    def no_probe(cap):
        raise AssertionError("probed")

    assert decide(ICE_LAKE, probe=no_probe).mode == "not-needed"


@pytest.mark.slow
def test_all_shapes_passing_keeps_bf16_and_amx(faults):
    v = decide(AMX, probe=probe)
    assert v.mode == "bf16" and v.isa_cap is None and v.k_chunk is None and not v.failures


@pytest.mark.slow
def test_a_sigfpe_on_the_bilinear_tail_only_splits_its_k_and_keeps_amx(faults):
    faults(native=r"^stage1-bilinear m=32 ")  # what oneDNN's AMX brgemm does on [32, 49152] x [49152, n]
    v = decide(AMX, probe=probe)
    assert v.mode == "bf16-split-k" and v.k_chunk == cpu_probe.K_CHUNK and v.isa_cap is None
    assert v.failures == {
        "stage1-bilinear m=32 k=49152 n=97": "crashed (SIGFPE)",
        "stage1-bilinear m=32 k=49152 n=2": "crashed (SIGFPE)",
    }  # the probe went on after each crash: the cases after them passed


@pytest.mark.slow
def test_crashes_beyond_the_bilinear_turn_amx_off_and_keep_bf16(faults):
    faults(native=r"^stage1-bilinear m=32 |^llm m=1 k=576 n=1536")  # AMX-only: nothing fails with the cap
    v = decide(AMX, probe=probe)
    assert v.mode == "bf16-no-amx" and v.isa_cap == "AVX512_CORE_BF16" and v.bf16_allowed
    assert "llm m=1 k=576 n=1536" in v.failures


@pytest.mark.slow
def test_bf16_that_crashes_without_amx_too_falls_back_to_float32(faults):
    faults(native=r"^llm m=1 k=576 n=576", capped=r"^llm m=1 k=576 n=576")
    v = decide(AMX, probe=probe)
    assert v.mode == "float32" and not v.bf16_allowed and v.isa_cap is None
    no_amx_cpu = dataclasses.replace(AMX, flags=AMX.flags - {"amx_bf16", "amx_tile"})  # AMD: no cap to try
    faults(native=r"^llm m=1 k=576 n=576")
    assert decide(no_amx_cpu, probe=probe).mode == "float32"


def _fake_children(monkeypatch, outputs: list[tuple[str, int]]) -> list[list[int]]:
    """run_probe with scripted children: each (stdout, exit code); returns the indices each child was asked."""
    asked: list[list[int]] = []

    def fake_run(cmd, **kw):
        asked.append([int(i) for i in cmd[-1].split(",")])
        out, code = outputs[len(asked) - 1]
        return SimpleNamespace(stdout=out, returncode=code, stderr="Traceback\nRuntimeError: boom\n")

    monkeypatch.setattr(cpu_probe.subprocess, "run", fake_run)
    return asked


def test_the_probe_blames_the_case_a_child_died_in_and_goes_on(monkeypatch):
    names = [c.name for c in cpu_probe.probe_cases()]
    # child 1: case 0 fine, case 1 wrong (error 0.9), dies by SIGFPE in case 2; child 2: case 3 nan, case 4 raises
    asked = _fake_children(
        monkeypatch,
        [
            ("start 0\ndone 0 0.001\nstart 1\ndone 1 0.9\nstart 2\n", -signal.SIGFPE),
            ("start 3\ndone 3 nan\nstart 4\n", 1),
            ("".join(f"start {i}\ndone {i} 0.0\n" for i in range(5, len(names))), 0),
        ],
    )
    result = run_probe()
    assert asked[0][0] == 0 and asked[1][0] == 3 and asked[2][0] == 5
    assert result.failures == {
        names[1]: "wrong results (relative error 0.9)",
        names[2]: "crashed (SIGFPE)",
        names[3]: "wrong results (relative error nan)",
        names[4]: "failed: RuntimeError: boom",
    }


def test_probe_cases_compute_what_float32_computes():
    """The real kernels of this machine, in a child (on an AMX machine a case may crash: reported, not fatal)."""
    only = r"^stage1-bilinear-split m=33 k=49152 n=97$|^lora-b m=512 r=8 n=576$|^attention"
    assert run_probe(only=only).failures == {}
    assert relative_error(torch.ones(3), torch.ones(3)) == 0.0
    assert relative_error(torch.tensor([float("nan")]), torch.ones(1)) == float("inf")


def test_the_verdict_is_probed_once_and_cached_per_cpu_and_torch_build(faults, monkeypatch, tmp_path):
    calls = []

    def fake_decide(cpu, probe=None):
        calls.append(cpu)
        return Verdict(
            "bf16-no-amx", "test", cpu.kind(), {"x": "crashed (SIGFPE)"}, isa_cap="AVX512_CORE_BF16"
        )

    monkeypatch.setattr(cpu_guard, "read_cpu", lambda: AMX)
    monkeypatch.setattr(cpu_guard, "decide", fake_decide)
    first = cpu_guard.verdict(cache=tmp_path)
    again = cpu_guard.verdict(cache=tmp_path)
    assert len(calls) == 1 and again == first and again.key
    saved = json.loads((tmp_path / f"{first.key}.json").read_text())
    assert saved["mode"] == "bf16-no-amx" and saved["failures"] == {"x": "crashed (SIGFPE)"}
    cpu_guard.verdict(cache=tmp_path, refresh=True)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # another thread count: kernels may block differently
    cpu_guard.verdict(cache=tmp_path)
    assert len(calls) == 3


def test_ensure_caps_onednn_for_this_process_and_its_children(faults, monkeypatch):
    v = Verdict("bf16-no-amx", "test", "AMX", isa_cap="AVX512_CORE_BF16")
    monkeypatch.setattr(cpu_guard, "verdict", lambda: v)
    cpu_guard.ensure.cache_clear()
    try:
        assert cpu_guard.ensure() is v and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"
    finally:
        cpu_guard.ensure.cache_clear()


def test_overrides(faults, monkeypatch):
    monkeypatch.setenv("LMRC_CPU_GUARD", "no-amx")
    assert decide(AMX).isa_cap == "AVX512_CORE_BF16"
    monkeypatch.setenv("LMRC_CPU_GUARD", "float32")
    assert not decide(AMX).bf16_allowed
    monkeypatch.setenv("LMRC_CPU_GUARD", "off")
    assert decide(AMX).mode == "off"
    monkeypatch.setenv("LMRC_CPU_GUARD", "sometimes")
    with pytest.raises(LmrcError, match="LMRC_CPU_GUARD: must be one of"):
        decide(AMX)


# ----------------------------------------------------------------------------- the bilinear's split-K route


@pytest.mark.parametrize("n", [1, 32, 33, 600])
def test_the_split_k_bilinear_matches_float32_forward_and_backward(monkeypatch, n):
    """bf16 in K chunks against the float32 product (never the unsplit bf16 product: on an AMX machine that is the
    shape that crashes)."""
    from lmrc.stage1 import model as model_mod

    torch.manual_seed(0)
    b1 = torch.randn(n, 12, 64, requires_grad=True)
    b2 = torch.randn(n, 12, 64, requires_grad=True)
    weight = torch.randn(97, 12 * 64 * 64, requires_grad=True)  # K = 49,152, as emb 768 x block 64
    bias = torch.randn(97, requires_grad=True)
    results = []
    for chunk, bf16 in ((None, False), (5000, True)):  # 5000 does not divide K: the last chunk is short
        monkeypatch.setattr(model_mod, "_k_chunk", lambda device, dtype, c=chunk: c)
        for t in (b1, b2, weight, bias):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model_mod.grouped_bilinear(b1, b2, weight, bias)
        out.float().square().mean().backward()
        results.append([out.detach().float()] + [t.grad.clone() for t in (b1, b2, weight, bias)])
    for got, ref in zip(results[1], results[0]):
        assert ((got - ref).norm() / ref.norm()) < 2e-2
    g = (b1.detach().unsqueeze(3) * b2.detach().unsqueeze(2)).reshape(n, -1)  # the formula, recomputed
    ref = g @ weight.detach().t() + bias.detach()
    assert ((results[0][0] - ref).norm() / ref.norm()) < 1e-5


def test_the_bilinear_asks_the_guard_only_for_bf16_on_a_cpu(monkeypatch):
    from lmrc.stage1 import model as model_mod

    monkeypatch.setattr(cpu_guard, "bilinear_k_chunk", lambda: 16384)
    assert model_mod._k_chunk(torch.device("cpu"), torch.bfloat16) == 16384
    assert model_mod._k_chunk(torch.device("cpu"), torch.float32) is None
    assert model_mod._k_chunk(torch.device("meta"), torch.bfloat16) is None


# ----------------------------------------------------------------------------- the crash report


def _entry(tmp_path: Path, body: str) -> tuple[Path, dict]:
    """A script that runs `lmrc` through the console entry point (lmrc.cli.run) with lmrc.cli.main replaced by
    `body` (run in the supervised child), and the environment to run it in."""
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, signal, sys, time\nimport lmrc.cli as cli\n\ndef main(argv=None):\n"
        + textwrap.indent(textwrap.dedent(body).strip(), "    ")
        + "\n\ncli.main = main\nsys.exit(cli.run(sys.argv[1:]))\n"
    )
    env = {**os.environ, "LMRC_CACHE": str(tmp_path / "cache")}
    env.pop("LMRC_SUPERVISED", None)
    return script, env


def _run_cli(tmp_path: Path, body: str, *argv: str) -> subprocess.CompletedProcess:
    script, env = _entry(tmp_path, body)
    return subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, env=env, timeout=60
    )


def test_a_native_crash_is_one_line_with_the_place_and_what_to_do(tmp_path):
    proc = _run_cli(tmp_path, "os.kill(os.getpid(), signal.SIGFPE)", "stage1", "train")
    assert proc.returncode == 128 + signal.SIGFPE
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmrc: error: crashed in native code (SIGFPE")
    assert "entry.py" in lines[0] and "LMRC_CPU_GUARD=" in lines[0] and "resume" in lines[0]
    log = Path(lines[0].split("the stack is in ")[1].split(" (--debug")[0])
    assert "Floating point exception" in log.read_text()


def test_debug_prints_the_stack_above_the_line(tmp_path):
    proc = _run_cli(tmp_path, "os.kill(os.getpid(), signal.SIGSEGV)", "--debug", "env")
    assert proc.returncode == 128 + signal.SIGSEGV
    assert "Segmentation fault" in proc.stderr and "in main" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("lmrc: error: crashed in native code (SIGSEGV")


def test_exit_codes_and_output_pass_through_and_no_crash_log_is_left(tmp_path):
    proc = _run_cli(tmp_path, "print('hello'); return 3", "env")
    assert proc.returncode == 3 and proc.stdout == "hello\n" and proc.stderr == ""
    assert not list((tmp_path / "cache" / "crashes").glob("*.log"))


def test_the_out_of_memory_killer_is_named(tmp_path):
    proc = _run_cli(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)", "predict")
    assert proc.returncode == 128 + signal.SIGKILL and "out of memory" in proc.stderr


def test_sigterm_reaches_the_command(tmp_path):
    body = """
    signal.signal(signal.SIGTERM, lambda *a: (print("child got SIGTERM", flush=True), sys.exit(7)))
    print("ready", flush=True)
    time.sleep(30)
    """
    script, env = _entry(tmp_path, body)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)  # to the watching parent, as `kill`, `timeout` or torchrun send it
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 7 and "child got SIGTERM" in out


def test_the_command_stops_when_its_watcher_is_killed(tmp_path):
    body = """
    signal.signal(signal.SIGTERM, lambda *a: (open(os.environ["MARK"], "w").write("stopped"), os._exit(9)))
    print(os.getpid(), flush=True)
    time.sleep(30)
    """
    script, env = _entry(tmp_path, body)
    env["MARK"] = str(tmp_path / "mark")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    child = int(proc.stdout.readline())
    proc.kill()  # SIGKILL to the watcher: nothing can be forwarded
    proc.wait(timeout=10)
    for _ in range(100):
        if (tmp_path / "mark").exists():
            break
        time.sleep(0.1)
    assert (tmp_path / "mark").read_text() == "stopped"
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)


def test_the_innermost_lmrc_frame_is_named_not_torchs():
    stack = (
        "Fatal Python error: Floating point exception\n\nCurrent thread 0x1 (most recent call first):\n"
        '  File "/home/u/lmrc/.venv/lib/python3.11/site-packages/torch/nn/functional.py", line 5 in linear\n'
        '  File "/home/u/lmrc/lmrc/stage1/model.py", line 71 in forward\n'
        '  File "/home/u/lmrc/lmrc/stage1/train.py", line 300 in step\n'
    )
    assert innermost_lmrc_frame(stack) == "lmrc/stage1/model.py:71 in forward"
    assert "lmrc/stage1/model.py:71" in crash_line(signal.SIGFPE, stack, Path("/tmp/x.log"))
    assert innermost_lmrc_frame("") is None


def test_lmrc_env_shows_kind_precision_threads_and_verdict(capsys):
    from lmrc.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for label in ("machine:", "CPU kind:", "stage 1:", "stage 2 (CPU):", "threads:", "CPU guard:"):
        assert label in out
    assert cpu_info.read_cpu().kind() in out
    assert main(["env", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cpu_guard"]["mode"] in cpu_guard.MODES
