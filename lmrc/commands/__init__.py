"""The subcommands of `lmrc`, one module per group (`data`, `evaluate`, `models`, `stage1`, `stage2`, `predict`,
`compare`, `entities`, `env`); each has `register(subparsers)`, and lmrc.cli imports them all.

Imports stand at the top of each module, with ONE exception: a handler (`cmd_*`) imports the library modules that
import torch (stage 1 and 2, the prediction driver, the entity model, the experiments) inside its body. Why:
`lmrc --help` and every command's argument errors come back in a third of a second, where importing torch,
transformers and peft takes seconds; the crash supervisor (lmrc.machine.crash) forks before anything heavy is loaded; and
the CPU guard (lmrc.machine.cpu_guard.ensure, called by lmrc.cli.main before a handler runs) settles oneDNN's kernels
before torch first runs one. Such an import carries the comment `# torch: see lmrc.commands`.
"""
