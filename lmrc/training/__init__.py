"""Plumbing the three trainers share: the run folder (start, resume, fingerprint, interrupts, snapshots), the learning-rate schedule and batches, the distributed engine."""
