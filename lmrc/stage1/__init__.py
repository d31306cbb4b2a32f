"""Stage 1: an ATLOP-style encoder classifier that proposes candidate entity pairs (and relations) for stage 2."""
