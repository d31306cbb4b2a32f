"""The CPU guard's probe: the matmul shapes lmrc runs in bf16, each tried in a child process
(lmrc.machine.cpu_probe_child), so that a kernel that kills its process by a signal is a verdict, not a crash of lmrc.

`LMRC_CPU_PROBE_FAULT` / `LMRC_CPU_PROBE_FAULT_CAPPED` (regular expressions over case names) make the child kill
itself by SIGFPE before the matching cases, on the first probe / on the probe with AMX capped: that is how the
guard is tested on machines that cannot meet the real crash.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

K_CHUNK = 16384  # the bilinear's K chunk: K <= 32768 never crashed
MAX_REL_ERR = 0.02  # bf16 output rounding is ~0.4%; a wrong kernel is off by O(1)


@dataclass(frozen=True)
class Case:
    """One product lmrc computes in bf16: `op` on [m, k] x [k, n] ("linear": F.linear forward and backward, as in
    the encoder, the extractor and the LLM; "mm": stage 1's bilinear forward `g @ w.t()`, summed over K chunks of
    `k_chunk` when set; "sdpa": attention [m heads... ] with `k` = head size and `n` = key length)."""

    name: str
    family: str
    op: str
    m: int
    k: int
    n: int
    k_chunk: int | None = None


def probe_cases() -> tuple[Case, ...]:
    """The shapes and ops lmrc runs in bf16 on a CPU: stage 1's encoder (MiniLM, RoBERTa-large), its extractor and
    grouped bilinear (emb 768 x block 64 = 49,152 inputs; tails of every size class, 2 or 97 relations), LoRA
    training and generation of SmolLM2 and a Llama-7B-wide layer, and attention (training and one-token decoding)."""
    cases: list[Case] = []
    bilinear_k = 768 * 64
    for n in (97, 2):
        for m in (1, 8, 16, 31, 32, 33, 48, 63, 64, 96, 128, 200, 512):
            cases.append(
                Case(f"stage1-bilinear m={m} k={bilinear_k} n={n}", "stage1-bilinear", "mm", m, bilinear_k, n)
            )
            cases.append(
                Case(
                    f"stage1-bilinear-split m={m} k={bilinear_k} n={n}",
                    "stage1-bilinear-split",
                    "mm",
                    m,
                    bilinear_k,
                    n,
                    K_CHUNK,
                )
            )
    for m in (32, 512):  # the bilinear's backward: d(outer) = dlogits @ W, dW = dlogits^T @ outer
        cases.append(
            Case(f"stage1-bilinear-backward m={m}", "stage1-bilinear-backward", "linear", m, bilinear_k, 97)
        )
    for m in (37, 512):
        for k, n in ((384, 384), (384, 1536), (1536, 384), (768, 768), (1024, 4096), (4096, 1024)):
            cases.append(Case(f"encoder m={m} k={k} n={n}", "encoder", "linear", m, k, n))
        for k in (768, 2048):
            cases.append(Case(f"stage1-extractor m={m} k={k} n=768", "encoder", "linear", m, k, 768))
    for m in (1, 8, 24, 512):
        for k, n in ((576, 576), (576, 1536), (1536, 576), (4096, 4096)):
            if not (m == 512 and k == 4096):  # a 7B-wide layer at 512 tokens costs more than it teaches
                cases.append(Case(f"llm m={m} k={k} n={n}", "llm", "linear", m, k, n))
    cases.append(Case("llm-lm-head m=24 k=576 n=49152", "llm", "linear", 24, 576, 49152))
    for k, r in ((576, 8), (576, 64), (4096, 16)):
        cases.append(Case(f"lora-a m=512 k={k} r={r}", "lora", "linear", 512, k, r))
        cases.append(Case(f"lora-b m=512 r={r} n={k}", "lora", "linear", 512, r, k))
    cases.append(Case("attention-train heads=9 d=64 len=512", "attention", "sdpa", 9, 64, 512))
    cases.append(Case("attention-encoder heads=12 d=32 len=512", "attention", "sdpa", 12, 32, 512))
    cases.append(
        Case("attention-decode batch=24 heads=9 d=64 len=600", "attention", "sdpa-decode", 24 * 9, 64, 600)
    )
    return tuple(cases)


@dataclass(frozen=True)
class ProbeResult:
    """Failed cases (name -> why) of one probe run under one ISA cap."""

    isa_cap: str | None
    failures: dict[str, str]
    seconds: float


def run_probe(isa_cap: str | None = None, only: str | None = None, timeout: float = 300.0) -> ProbeResult:
    """The cases of probe_cases() (those whose name matches the regular expression `only`, if given) in child
    processes under `isa_cap`: a new child after each crash, going on with the next case."""
    cases = probe_cases()
    todo = [i for i, c in enumerate(cases) if only is None or re.search(only, c.name)]
    env = dict(os.environ, LMRC_CPU_PROBE_LEVEL="capped" if isa_cap else "native")
    if isa_cap:
        env["ONEDNN_MAX_CPU_ISA"] = isa_cap
    failures: dict[str, str] = {}
    t0 = time.monotonic()
    while todo:
        cmd = [sys.executable, "-m", "lmrc.machine.cpu_probe_child", ",".join(map(str, todo))]
        stderr = ""
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
            out, code, stderr = proc.stdout, proc.returncode, proc.stderr or ""
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            code = None
        current = None
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "start":
                current = int(parts[1])
            elif len(parts) == 3 and parts[0] == "done":
                i, err = int(parts[1]), float(parts[2])
                if not err <= MAX_REL_ERR:  # also catches nan
                    failures[cases[i].name] = f"wrong results (relative error {err:.3g})"
                todo.remove(i)
                current = None
        if code == 0 or not todo:
            break
        blamed = current if current is not None else todo[0]
        if code is None:
            why = f"hung past {timeout:.0f} s"
        elif code < 0:
            why = f"crashed ({_signal_name(-code)})"
        else:
            tail = stderr.strip().splitlines()[-1:] or [f"exit {code}"]
            why = f"failed: {tail[0][:200]}"
        failures[cases[blamed].name] = why
        todo.remove(blamed)
    return ProbeResult(isa_cap, failures, round(time.monotonic() - t0, 2))


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
