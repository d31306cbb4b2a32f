"""The stage-1 pair classifier: ATLOP's localized-context pair representation and a (grouped) bilinear.

Zhou et al. (2021), reused by LMRC Sec. 3.1 and MD-RE Sec. 3.2:
- a mention is the hidden state of its opening `*` marker; an entity is the logsumexp over its mentions (Eq. 2);
- an entity's attention is the mean over its mentions of the marker's attention row, per head (LMRC Sec. 3.1);
- localized context c(h,t) = H^T q, q = mean over heads of A_h * A_t, normalised to sum 1 (LMRC Eq. 3-4; ATLOP
  averages over heads and divides by the sum + 1e-5, which MD-RE Eq. 3 writes as a division by A_h^T A_t);
- z_h = tanh(W_h [e_h; c] + b_h), z_t = tanh(W_t [e_t; c] + b_t) (MD-RE Eq. 4; LMRC Eq. 5 with W_s, W_c);
- logits = grouped bilinear over blocks of `block_size` (ATLOP Eq. 7), or a full d x d bilinear
  z_h^T W_r z_t + b_r (LMRC Eq. 6, MD-RE Eq. 5).

MD-RE's three discriminators (`n_classifiers=3`): the paper defines one document-encoding module (Sec. 3.2,
Eq. 1-5, including z_h, z_t) and three discriminators that each score the pairs it produces (Sec. 3.3); it does
not give the discriminators extractors of their own. So by default they share the extractor and each has its own
bilinear; `separate_extractors=True` gives each its own W_h, W_t as well. The logits are concatenated in
discriminator order ([recall | coarse | fine] for mdre).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmrc.errors import LmrcError
from lmrc.machine import cpu_guard
from lmrc.stage1.encoder import encode, ensure_eager_attention, usable_window
from lmrc.stage1.features import SpecialTokens

BILINEAR = ("grouped", "full")


def _fail(msg: str) -> LmrcError:
    return LmrcError(f"stage1 model: {msg}")


PAIR_CHUNK = 512  # pairs whose outer products exist at once in grouped_bilinear
# Pairs scored at once by Stage1Model.forward: see pair_chunk.
PAIR_CONTEXT_ELEMENTS = 1 << 24  # 64 MiB of float32 for the [pairs, heads, length] attention product
MAX_PAIR_CHUNK = 8192  # pairs whose features (entities, context, extractor outputs) exist at once


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast would run a linear layer in on this device (the tensor's own dtype without autocast)."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


class _GroupedBilinear(torch.autograd.Function):
    """logits = flatten(b1 (x) b2 per block) @ W^T + bias, without keeping the [pairs, emb x block] outer products.

    nn.Linear on the materialised outer products keeps them for the backward pass: with MiniLM's emb 768 and
    block 64, 49,152 floats per pair (1.2 GB for a batch of 6,000 pairs, the largest tensor of a training step).
    Here they are built PAIR_CHUNK pairs at a time, in the forward pass and again in the backward pass, where
    dW = dlogits^T @ outer and d(outer) = dlogits @ W give db1, db2. The FLOPs are those of nn.Linear plus one
    more elementwise outer product; the dtype is the one autocast gives a linear layer.
    """

    @staticmethod
    def forward(
        ctx, b1: Tensor, b2: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype
    ) -> Tensor:
        n, width = b1.shape[0], weight.shape[0]
        w = weight.to(dtype)
        out = torch.empty((n, width), dtype=dtype, device=b1.device)
        k_chunk = _k_chunk(b1.device, dtype)
        for s in range(0, n, PAIR_CHUNK):
            e = min(n, s + PAIR_CHUNK)
            g = (b1[s:e].to(dtype).unsqueeze(3) * b2[s:e].to(dtype).unsqueeze(2)).reshape(e - s, -1)
            out[s:e] = _matmul_t(g, w, k_chunk)
        if bias is not None:
            out += bias.to(dtype)
        ctx.save_for_backward(b1, b2, weight)
        ctx.dtype, ctx.has_bias = dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        b1, b2, weight = ctx.saved_tensors
        dtype = ctx.dtype
        w = weight.to(dtype)
        grad = grad.to(dtype)
        n, k, bs = b1.shape
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        d_b1 = torch.empty(b1.shape, dtype=dtype, device=b1.device)
        d_b2 = torch.empty(b2.shape, dtype=dtype, device=b2.device)
        for s in range(0, n, PAIR_CHUNK):
            e = min(n, s + PAIR_CHUNK)
            x1, x2 = b1[s:e].to(dtype), b2[s:e].to(dtype)
            g = (x1.unsqueeze(3) * x2.unsqueeze(2)).reshape(e - s, -1)
            d_weight += (grad[s:e].t() @ g).float()
            d_g = (grad[s:e] @ w).view(e - s, k, bs, bs)
            d_b1[s:e] = (d_g * x2.unsqueeze(2)).sum(3)
            d_b2[s:e] = (d_g * x1.unsqueeze(3)).sum(2)
        d_bias = grad.float().sum(0).to(weight.dtype) if ctx.has_bias else None
        return d_b1.to(b1.dtype), d_b2.to(b2.dtype), d_weight.to(weight.dtype), d_bias, None


def _k_chunk(device: torch.device, dtype: torch.dtype) -> int | None:
    """The K chunk this CPU's bf16 kernels need for the bilinear (lmrc.machine.cpu_guard: oneDNN's AMX kernel crashes on
    some [rows, 49152] tails); None elsewhere, and on GPUs."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return None
    return cpu_guard.bilinear_k_chunk()


def _matmul_t(g: Tensor, w: Tensor, k_chunk: int | None) -> Tensor:
    """g @ w.t(), summed over K chunks of `k_chunk` columns (float32 sums of the bf16 products) when given."""
    if k_chunk is None or g.shape[1] <= k_chunk:
        return g @ w.t()
    out = torch.zeros((g.shape[0], w.shape[0]), dtype=torch.float32, device=g.device)
    for s in range(0, g.shape[1], k_chunk):
        out += g[:, s : s + k_chunk] @ w[:, s : s + k_chunk].t()
    return out.to(g.dtype)


def grouped_bilinear(b1: Tensor, b2: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """ATLOP's grouped bilinear (Eq. 7) on blocks b1, b2 [pairs, k, block]: see _GroupedBilinear."""
    return _GroupedBilinear.apply(b1, b2, weight, bias, _compute_dtype(weight))


class Stage1Model(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        num_logits: int,
        emb_size: int = 768,
        block_size: int = 64,
        bilinear: str = "grouped",
        n_layers_avg: int = 1,
        n_classifiers: int = 1,
        window: int | None = None,
        specials: SpecialTokens | None = None,
        separate_extractors: bool = False,
    ) -> None:
        """`specials` (from `lmrc.stage1.features.special_tokens(tokenizer)`) sets the tokens that open and close
        windows of long documents; without it they are read from each document (its first and last token), which
        matches BERT exactly but closes RoBERTa windows with `</s>` instead of `</s></s>`."""
        super().__init__()
        if bilinear not in BILINEAR:
            raise _fail(f"bilinear must be one of {BILINEAR}, got {bilinear!r}")
        if num_logits < 1 or n_classifiers < 1 or num_logits % n_classifiers:
            raise _fail(
                f"num_logits ({num_logits}) must be a positive multiple of n_classifiers ({n_classifiers})"
            )
        if bilinear == "grouped" and (block_size < 1 or emb_size % block_size):
            raise _fail(f"emb_size ({emb_size}) must be a multiple of block_size ({block_size})")
        n_layers = getattr(encoder.config, "num_hidden_layers", None)
        if n_layers_avg < 1 or (n_layers is not None and n_layers_avg > n_layers):
            raise _fail(f"n_layers_avg must be in 1..{n_layers}, got {n_layers_avg}")
        usable = usable_window(encoder)
        if window is not None and not 0 < window <= usable:
            raise _fail(f"window must be in 1..{usable} (the encoder's positions), got {window}")
        ensure_eager_attention(encoder)

        self.encoder = encoder
        self.num_logits = num_logits
        self.emb_size = emb_size
        self.block_size = block_size
        self.bilinear = bilinear
        self.n_layers_avg = n_layers_avg
        self.n_classifiers = n_classifiers
        self.window = window or usable
        self.specials = specials
        hidden = encoder.config.hidden_size
        n_ext = n_classifiers if separate_extractors else 1
        self.head_extractors = nn.ModuleList(nn.Linear(2 * hidden, emb_size) for _ in range(n_ext))
        self.tail_extractors = nn.ModuleList(nn.Linear(2 * hidden, emb_size) for _ in range(n_ext))
        width = num_logits // n_classifiers
        if bilinear == "grouped":
            self.classifiers = nn.ModuleList(
                nn.Linear(emb_size * block_size, width) for _ in range(n_classifiers)
            )
        else:
            self.classifiers = nn.ModuleList(
                nn.Bilinear(emb_size, emb_size, width) for _ in range(n_classifiers)
            )

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the encoder (ATLOP trains these with a larger learning rate)."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in encoder_ids]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        entity_pos: Sequence[Sequence[Sequence[int]]],
        hts: Sequence[Sequence[tuple[int, int]]],
    ) -> Tensor:
        """Logits [sum over documents of len(hts), num_logits], pairs in document then `hts` order."""
        # Only the attention rows at mention markers are used: encode returns those ([B, heads, R, L]).
        rows = [sorted({p for ent in doc_pos for p in ent}) for doc_pos in entity_pos]
        hidden, attention = encode(
            self.encoder, input_ids, attention_mask, self.window, self.specials, self.n_layers_avg, rows=rows
        )
        lengths = attention_mask.sum(1).tolist()
        logits = []
        for b in range(len(entity_pos)):
            n = lengths[b]  # padding adds nothing to the context (zero attention), so it is left out
            doc = _DocumentEntities.build(
                hidden[b, :n], attention[b, :, :, :n], entity_pos[b], n, b, positions=rows[b]
            )
            pairs = torch.as_tensor(list(hts[b]), dtype=torch.long, device=hidden.device).view(-1, 2)
            step = pair_chunk(attention.size(1), n)
            for s in range(0, pairs.size(0), step):
                e_h, e_t, ctx = doc.pair_inputs(pairs[s : s + step])
                logits.append(self._classify(e_h, e_t, ctx))
        if not logits:  # no pairs at all: empty logits that are still part of the graph (loss.backward works)
            empty = hidden.reshape(-1, hidden.size(-1))[:0]
            return self._classify(empty, empty, empty)
        return torch.cat(logits)

    def _classify(self, e_h: Tensor, e_t: Tensor, ctx: Tensor) -> Tensor:
        """Logits [pairs, num_logits] from head / tail entities and their localized context."""
        logits = []
        for i, classifier in enumerate(self.classifiers):
            j = i if len(self.head_extractors) > 1 else 0
            z_h = torch.tanh(self.head_extractors[j](torch.cat([e_h, ctx], dim=-1)))
            z_t = torch.tanh(self.tail_extractors[j](torch.cat([e_t, ctx], dim=-1)))
            logits.append(self._bilinear(classifier, z_h, z_t))
        return torch.cat(logits, dim=-1)

    def _bilinear(self, classifier: nn.Module, z_h: Tensor, z_t: Tensor) -> Tensor:
        if self.bilinear == "full":
            # F.bilinear is not on autocast's cast lists: under bf16 autocast its inputs arrive in bf16 while the
            # weight stays float32, so this layer runs in the weight's dtype.
            dtype = classifier.weight.dtype
            return classifier(z_h.to(dtype), z_t.to(dtype))
        # ATLOP Eq. 7: the outer product within each block of `block_size` dimensions, then a linear layer.
        k = self.emb_size // self.block_size
        b1 = z_h.reshape(-1, k, self.block_size)
        b2 = z_t.reshape(-1, k, self.block_size)
        return grouped_bilinear(b1, b2, classifier.weight, classifier.bias)


def pair_chunk(heads: int, length: int) -> int:
    """Pairs scored at once: the [pairs, heads, length] attention product of a chunk holds at most
    PAIR_CONTEXT_ELEMENTS numbers, and at most MAX_PAIR_CHUNK pairs' features exist at once. A long document
    (hundreds of entities, thousands of tokens) then needs memory linear in its pairs (their logits) instead of
    pairs x heads x length (50 GB for 433 entities and 5,500 tokens); a normal one is a single chunk, as before."""
    return max(1, min(MAX_PAIR_CHUNK, PAIR_CONTEXT_ELEMENTS // max(1, heads * length)))


class _DocumentEntities:
    """One document's entity embeddings and entity attention, from which any chunk of pairs gets its inputs."""

    def __init__(self, hidden: Tensor, entity: Tensor, entity_att: Tensor) -> None:
        self.hidden = hidden  # [L, d]
        self.entity = entity  # [E, d]
        self.entity_att = entity_att  # [E, heads, L]

    @classmethod
    def build(
        cls,
        hidden: Tensor,
        attention: Tensor,
        entity_pos: Sequence[Sequence[int]],
        length: int,
        doc: int,
        positions: Sequence[int] | None = None,
    ) -> _DocumentEntities:
        """`attention` is [heads, L, L], or [heads, R, L] holding the rows of `positions` (in that order)."""
        device = hidden.device
        counts = [len(p) for p in entity_pos]
        if not counts or min(counts) == 0:
            raise ValueError(f"document {doc} of the batch: every entity needs at least one mention position")
        flat = [p for ent in entity_pos for p in ent]
        if max(flat) >= length or min(flat) < 0:
            raise ValueError(
                f"document {doc} of the batch: a mention position is outside its {length} tokens"
            )
        n_ent, most = len(counts), max(counts)
        count_t = torch.tensor(counts, device=device)
        mask = torch.arange(most, device=device) < count_t[:, None]  # [E, M]: real mention slots
        index = torch.zeros((n_ent, most), dtype=torch.long, device=device)
        index[mask] = torch.tensor(flat, dtype=torch.long, device=device)

        # LMRC Eq. 2: logsumexp pooling over mentions (empty slots are -inf, so they add nothing).
        mentions = hidden[index].masked_fill(~mask[..., None], float("-inf"))  # [E, M, d]
        entity = torch.logsumexp(mentions, dim=1)
        # Entity attention: mean of the mentions' attention rows, per head -> [E, heads, L]. The rows are summed
        # per entity (index_add) rather than gathered into padded [heads, E, M, L] slots, which a long document
        # with one much-mentioned entity would make E x M x L large.
        owner = torch.repeat_interleave(torch.arange(n_ent, device=device), count_t)
        row_of = {p: r for r, p in enumerate(positions)} if positions is not None else None
        picked = flat if row_of is None else [row_of[p] for p in flat]
        rows = attention[:, torch.tensor(picked, dtype=torch.long, device=device)]  # [heads, mentions, L]
        summed = rows.new_zeros((attention.size(0), n_ent, attention.size(-1))).index_add(1, owner, rows)
        entity_att = (summed / count_t[None, :, None].to(rows.dtype)).transpose(0, 1)
        return cls(hidden, entity, entity_att)

    def pair_inputs(self, pairs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Head entity, tail entity and localized context of the given (h, t) pairs ([P, d] each)."""
        h, t = pairs[:, 0], pairs[:, 1]
        # LMRC Eq. 3-4 / ATLOP: q = mean over heads of A_h * A_t, normalised; c = H^T q.
        q = (self.entity_att[h] * self.entity_att[t]).mean(1)
        q = q / (q.sum(1, keepdim=True) + 1e-5)
        return self.entity[h], self.entity[t], q @ self.hidden
