"""Speed per CPU kind: stage-1 training step, LoRA step and generation under every ISA level this machine can run
as (lmrc.machine.cpu_guard.imitable_levels: itself, AMX off, AVX512 without bf16, AVX2), in float32 and, where the level
has bf16 (natively, or emulated on the machine itself), in bf16. Each level runs in fresh processes with the CPU
guard active, as a user's run would; the table says the guard's verdict per level.

    python benchmarks/cpu_kinds.py [--docs 8] [--prompts 2] [--gen-tokens 32] [--out FILE]

On an AMX machine this is the "AMX on / off" table of docs/PERFORMANCE.md. It prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _guard(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "lmrc", "env", "--json"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def _stage1(env: dict[str, str], docs: int, precisions: list[str]) -> dict[str, float]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "stage1_throughput.py"), "--docs", str(docs)]
    cmd += ["--batch-sizes", "4", "--precision", ",".join(precisions)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s*(fp32|bf16)\s+\d+\s+4\s+([\d.]+)", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    return rows


def _stage2(env: dict[str, str], prompts: int, gen_tokens: int, dtypes: list[str]) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s2.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / "stage2_throughput.py"), "--prompts", str(prompts)]
        cmd += ["--gen-tokens", str(gen_tokens), "--dtypes", ",".join(dtypes), "--out", str(out)]
        subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return {r["dtype"]: r for r in json.loads(out.read_text())["rows"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=8, help="stage-1 documents (batches of 4)")
    p.add_argument("--prompts", type=int, default=2, help="LoRA / generation prompts")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--levels", help="comma-separated subset of the level names")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/cpu_kinds/<kind>.json")
    args = p.parse_args(argv)

    from lmrc.machine.cpu_info import imitable_levels, level_environment, read_cpu
    from lmrc.machine.hardware import describe_line

    cpu = read_cpu()
    levels = imitable_levels(cpu)
    if args.levels:
        levels = [lv for lv in levels if lv[0] in args.levels.split(",")]
    results = {"machine": describe_line(), "cpu_kind": cpu.kind(), "levels": []}
    for name, level_env in levels:
        env = level_environment(level_env)
        t0 = time.monotonic()
        info = _guard(env)
        native = info["stage1_mixed_precision"] == "bf16"
        # bf16 where the level runs it natively; on the machine itself also when emulated (to show its cost)
        with_bf16 = native or name == "native"
        s1 = _stage1(env, args.docs, ["fp32", "bf16"] if with_bf16 else ["fp32"])
        s2 = _stage2(
            env, args.prompts, args.gen_tokens, ["float32", "bfloat16"] if with_bf16 else ["float32"]
        )
        results["levels"].append(
            {
                "level": name,
                "env": level_env,
                "guard": info["cpu_guard"]["mode"],
                "auto": info["stage1_mixed_precision"],
                "stage1_s_per_batch4": s1,
                "stage2": s2,
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
        print(f"{name}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    out = (
        args.out
        or REPO / "benchmarks" / "results" / "cpu_kinds" / f"{_slug(cpu.kind())}-{os.cpu_count()}cores.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)  # apart from make bench's results/*.json (another format)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


def _slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def render(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']} ({results['cpu_kind']})",
        "",
        "| level | guard | auto precision | precision | stage-1 s / batch of 4 | LoRA tokens/s | decode tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in results["levels"]:
        env = " ".join(f"{k}={v}" for k, v in lv["env"].items()) or "as is"
        for s1_name, s2_name in (("fp32", "float32"), ("bf16", "bfloat16")):
            if s1_name not in lv["stage1_s_per_batch4"]:
                continue
            s2 = lv["stage2"].get(s2_name, {})
            lines.append(
                f"| {lv['level']} ({env}) | {lv['guard']} | {lv['auto']} | {s1_name} | "
                f"{lv['stage1_s_per_batch4'][s1_name]:.2f} | {s2.get('train_tokens_per_s_median', '-')} | "
                f"{s2.get('decode_tokens_per_s', '-')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
