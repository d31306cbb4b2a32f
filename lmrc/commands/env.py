"""`lmrc env`: the machine as lmrc sees it: CPU kind, precision and threads it chooses, the CPU guard's verdict."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from lmrc.commands.common import add_command
from lmrc.machine import cpu_guard


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "env",
        cmd_env,
        help="show the machine kind, the precision and threads lmrc chooses, and the CPU kernel check's verdict",
        description="The machine as lmrc sees it. The CPU guard probes this CPU's bf16 kernels once (in a child "
        "process: a crash there costs nothing) and caches the verdict; --reprobe runs the probe again.",
    )
    p.add_argument("--reprobe", action="store_true", help="forget the cached verdict and probe again")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


def environment(reprobe: bool = False) -> dict:
    """What `lmrc env` shows, as a dict (also what benchmarks record)."""
    if reprobe:
        cpu_guard.ensure.cache_clear()
        cpu_guard.verdict(refresh=True)
    verdict = cpu_guard.ensure()
    # torch and the torch-based modules after the guard's verdict (see lmrc.commands)
    import torch

    from lmrc.machine import hardware
    from lmrc.stage2.modeling import resolve_dtype

    cpu = cpu_guard.read_cpu()
    return {
        "machine": hardware.describe_line(),
        "cpu_kind": cpu.kind(),
        "cpu_flags": sorted(cpu.flags),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "stage1_mixed_precision": hardware.resolve_mixed_precision("auto"),
        "llm_dtype_cpu": str(resolve_dtype("auto", torch.device("cpu"))).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "cpu_guard": dataclasses.asdict(verdict),
        "cuda": [g["name"] for g in hardware.gpu_memory()],
    }


def cmd_env(args: argparse.Namespace) -> int:
    env = environment(args.reprobe)
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    guard = env["cpu_guard"]
    print(f"machine:        {env['machine']}")
    print(f"CPU kind:       {env['cpu_kind']} (flags: {', '.join(env['cpu_flags']) or 'none of interest'})")
    print(f"oneDNN ISA cap: {env['onednn_max_cpu_isa'] or 'none'}")
    print(f"stage 1:        mixed_precision auto -> {env['stage1_mixed_precision']}")
    print(f"stage 2 (CPU):  dtype auto -> {env['llm_dtype_cpu']}")
    print(f"threads:        {env['torch_threads']} torch threads")
    print(f"CPU guard:      {guard['mode']}: {guard['reason']}")
    if guard["probe_seconds"]:
        print(
            f"                probe took {guard['probe_seconds']:.1f} s; verdict cached (--reprobe to redo it)"
        )
    for name, why in sorted(guard["failures"].items()):
        print(f"  failed: {name}: {why}")
    print(f"GPUs:           {', '.join(env['cuda']) or 'none'}")
    return 0
