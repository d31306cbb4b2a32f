"""Generation backends behind one interface, chosen by name (`generation.backend`).

- `hf` (default, lmrc.stage2.generate.hf_backend): transformers `generate` on the base model with the LoRA
  adapter, batched with LEFT padding (a decoder continues from the last position, so every prompt must end at the
  same column), greedy by default.
- `vllm` (optional extra, lmrc.stage2.generate.vllm_backend): vLLM serves the base model and loads the adapter
  through a `LoRARequest`; vLLM is imported only when chosen.

Both take token ids from `PromptEncoder` (so the prompt tokens match training exactly) and a per-prompt budget of
new tokens (`answer_budget`), and stop at EOS or at the budget, whichever comes first; `hf` also stops an answer
that repeats one line over and over (`generation.stop_repeated_lines`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmrc.errors import LmrcError
from lmrc.stage2.config import Stage2Config
from lmrc.stage2.generate.base import Generation, Generator, answer_budget
from lmrc.stage2.generate.hf_backend import HFGenerator
from lmrc.stage2.generate.vllm_backend import VLLMGenerator

__all__ = [
    "BACKENDS",
    "Generation",
    "Generator",
    "HFGenerator",
    "VLLMGenerator",
    "answer_budget",
    "create_generator",
]

BACKENDS: dict[str, type] = {"hf": HFGenerator, "vllm": VLLMGenerator}


def create_generator(cfg: Stage2Config, adapter_dir: Path, device: Any = None) -> Generator:
    """The backend named by `generation.backend`, loaded with the trained adapter."""
    try:
        backend = BACKENDS[cfg.generation.backend]
    except KeyError:
        raise LmrcError(
            f"unknown generation backend {cfg.generation.backend!r} (expected one of {', '.join(BACKENDS)})"
        ) from None
    return backend.load(cfg, Path(adapter_dir), device)
