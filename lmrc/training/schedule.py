"""The order of training, shared by the trainers: which examples go into a batch (grouped by length, in a seeded
order per epoch) and the learning rate of each step (warmup, then linear decay)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True, group: int = 50
) -> list[list[int]]:
    """Batches of indices of similar lengths, to cut padding.

    Without shuffling: sorted by length (longest first). With shuffling (as Hugging Face's LengthGroupedSampler):
    a seeded permutation is cut into mega-batches of `group` batches, each sorted by length and cut into batches,
    and the batch order is shuffled; pass a different seed per epoch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: (-lengths[i], i))
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    rng = random.Random(seed)
    perm = list(range(n))
    rng.shuffle(perm)
    mega = group * batch_size
    batches: list[list[int]] = []
    for m in range(0, n, mega):
        chunk = sorted(perm[m : m + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def linear_schedule(optimizer: Any, warmup: int, total: int) -> Any:
    """Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total` (ATLOP Sec. 4.1; LMRC)."""
    from transformers import get_linear_schedule_with_warmup  # importing lmrc must not import transformers

    return get_linear_schedule_with_warmup(optimizer, warmup, total)
