"""The probe's child process: runs the cases of lmrc.machine.cpu_probe.probe_cases() it is given in bf16 and compares
them with float32, one line per case on stdout ("start i" before it, "done i <error>" after it), so that the
parent knows which case a crash happened in.

    python -m lmrc.machine.cpu_probe_child 0,1,2
"""

from __future__ import annotations

import os
import re
import signal
import sys

import torch
import torch.nn.functional as F

from lmrc.machine.cpu_probe import Case, probe_cases


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """|got - ref| / |ref| in float32; inf when `got` holds a non-finite value."""
    got, ref = got.float(), ref.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def run_case(case: Case) -> float:
    """Run one case in bf16 and return its largest relative error against float32 on the same bf16 inputs
    (outputs and, for "linear" and "sdpa", gradients): a broken kernel gives O(1) errors or non-finite values."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).bfloat16()

    if case.op == "mm":
        a, w = rnd(case.m, case.k), rnd(case.n, case.k)
        if case.k_chunk:
            out = torch.zeros(case.m, case.n)
            for s in range(0, case.k, case.k_chunk):
                out += (a[:, s : s + case.k_chunk] @ w[:, s : s + case.k_chunk].t()).float()
        else:
            out = a @ w.t()
        return relative_error(out, a.float() @ w.float().t())
    if case.op == "linear":
        x, w, b = rnd(case.m, case.k), rnd(case.n, case.k), rnd(case.n)
        grad = rnd(case.m, case.n)
        errs = []
        outs = []
        for dtype in (torch.bfloat16, torch.float32):
            xx, ww = (t.detach().to(dtype).clone().requires_grad_() for t in (x, w))
            y = F.linear(xx, ww, b.to(dtype))
            y.backward(grad.to(dtype))
            outs.append((y.detach(), xx.grad, ww.grad))
        for got, ref in zip(*outs):
            errs.append(relative_error(got, ref))
        return max(errs)
    if case.op in ("sdpa", "sdpa-decode"):
        decode = case.op == "sdpa-decode"
        q_len = 1 if decode else case.n
        q, k, v = (
            rnd(1, case.m, q_len, case.k),
            rnd(1, case.m, case.n, case.k),
            rnd(1, case.m, case.n, case.k),
        )
        grad = rnd(1, case.m, q_len, case.k)
        outs = []
        for dtype in (torch.bfloat16, torch.float32):
            qq, kk, vv = (t.detach().to(dtype).clone().requires_grad_(not decode) for t in (q, k, v))
            y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=not decode)
            if decode:
                outs.append((y.detach(),))
            else:
                y.backward(grad.to(dtype))
                outs.append((y.detach(), qq.grad, kk.grad, vv.grad))
        # attention's softmax runs in bf16 too: a few percent off float32 is normal, a broken kernel is not
        return max(relative_error(g, r) for g, r in zip(*outs)) / 2.5
    raise ValueError(f"unknown probe op {case.op!r}")


def _die_of_sigfpe() -> None:
    """Die as a faulting kernel dies, even where the launcher blocked or ignored SIGFPE (a CI harness may): the
    kernel forces a real fault's signal through, a `kill` it would not."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGFPE})
    signal.signal(signal.SIGFPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGFPE)


def main(indices: list[int]) -> int:
    """Run the cases of probe_cases() at `indices`, reporting each on stdout (see the module docstring)."""
    cases = probe_cases()
    capped = os.environ.get("LMRC_CPU_PROBE_LEVEL") == "capped"
    fault = os.environ.get("LMRC_CPU_PROBE_FAULT_CAPPED" if capped else "LMRC_CPU_PROBE_FAULT")
    torch.manual_seed(0)
    for i in indices:
        print(f"start {i}", flush=True)
        if fault and re.search(fault, cases[i].name):
            _die_of_sigfpe()  # the test hook: dies as the AMX kernel does
        err = run_case(cases[i])
        print(f"done {i} {err!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main([int(i) for i in sys.argv[1].split(",")]))
