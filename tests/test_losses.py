"""Stage-1 losses: values against independent pure-Python references, closed-form gradients, the papers'
properties, decision rules and parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

from lmrc.errors import LmrcError
from lmrc.stage1.losses import (
    LOSSES,
    AMTLoss,
    ATGLoss,
    ATLoss,
    ATSLoss,
    BCELoss,
    MDRELoss,
    amtl_segments,
    build_loss,
    select_hard_negatives,
)

# Four pairs, R = 4; columns [TH, r1, r2, r3, r4]. Label patterns: no positive (NA), one positive,
# three positives, all positive (no negatives).
LOGITS = [
    [0.5, 1.2, -0.3, 2.0, -1.5],
    [-0.2, 0.7, 1.1, -0.4, 0.3],
    [1.0, 0.2, 2.5, -0.7, 1.8],
    [0.0, 3.0, -2.0, 0.4, 1.0],
]
LABELS = [
    [1, 0, 0, 0, 0],
    [0, 0, 1, 0, 0],
    [0, 1, 1, 0, 1],
    [0, 1, 1, 1, 1],
]


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# independent references (plain Python, straight from the papers' equations)


def ref_atsl_pair(th, rel, positive, lam=0.0, beta=0.0):
    """MD-RE Eq. 15 (ATL when lam = beta = 0) for one pair; `positive` is a list of bools."""
    pos = [r for r, p in zip(rel, positive) if p]
    neg = [r for r, p in zip(rel, positive) if not p]
    denom1 = math.exp(th + beta) + sum(math.exp(r) for r in pos)
    l1 = sum(-math.log(math.exp(r) / denom1) for r in pos)
    l2 = -math.log(math.exp(th + lam) / (math.exp(th + lam) + sum(math.exp(r) for r in neg)))
    return l1 + l2


def ref_atsl(logits, labels, lam=0.0, beta=0.0):
    vals = [
        ref_atsl_pair(row[0], row[1:], [bool(v) for v in lab[1:]], lam, beta)
        for row, lab in zip(logits, labels)
    ]
    return sum(vals) / len(vals)


def ref_atgl(logits, labels, alpha):
    total = 0.0
    for row, lab in zip(logits, labels):
        z = sum(math.exp(s) for s in row)
        weights = [1.0] + [alpha if v else 0.0 for v in lab[1:]]
        total += -sum(w * math.log(math.exp(s) / z) for w, s in zip(weights, row))
    return total / len(logits)


def ref_amtl(logits, labels, segments, lam):
    n = len(segments)
    total = 0.0
    for row, lab in zip(logits, labels):
        th = sum(row[:n]) / lam  # Eq. 2
        rel = row[n:]
        pair = 0.0
        for seg in segments:
            cols = [c - 1 for c in seg]
            pair += ref_atsl_pair(th, [rel[c] for c in cols], [bool(lab[c + 1]) for c in cols])
        total += pair / n
    return total / len(logits)


def ref_bce(z_values, labels):
    total = 0.0
    for z, lab in zip(z_values, labels):
        y = 0.0 if any(lab[1:]) else 1.0  # target: NA
        p = 1.0 / (1.0 + math.exp(-z))
        total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    return total / len(z_values)


# ---------------------------------------------------------------------------------------------------------
# values


def test_atl_hand_values_on_two_logits():
    # one positive, logits (TH, r) = (0, 0): L1 = -log(1/2), L2 = -log(1) -> ln 2; NA pair: L1 = 0, L2 = ln 2
    assert ATLoss()(_t([[0.0, 0.0]]), _t([[0, 1]])).item() == pytest.approx(math.log(2))
    assert ATLoss()(_t([[0.0, 0.0]]), _t([[1, 0]])).item() == pytest.approx(math.log(2))
    assert ATLoss()(_t([[0.0, 0.0], [0.0, 0.0]]), _t([[1, 0], [0, 1]])).item() == pytest.approx(math.log(2))


def test_atl_matches_reference_on_fixed_logits():
    for i in range(len(LOGITS)):
        got = ATLoss()(_t(LOGITS[i : i + 1]), _t(LABELS[i : i + 1])).item()
        assert got == pytest.approx(ref_atsl(LOGITS[i : i + 1], LABELS[i : i + 1]), rel=1e-12)
    assert ATLoss()(_t(LOGITS), _t(LABELS)).item() == pytest.approx(ref_atsl(LOGITS, LABELS), rel=1e-12)


def test_atgl_hand_value_and_reference():
    # one positive, logits (0, 0): -(alpha log 1/2 + 1 log 1/2) = (alpha + 1) ln 2
    assert ATGLoss(alpha=3.0)(_t([[0.0, 0.0]]), _t([[0, 1]])).item() == pytest.approx(4 * math.log(2))
    for alpha in (1.5, 16.5):
        for i in range(len(LOGITS)):
            got = ATGLoss(alpha=alpha)(_t(LOGITS[i : i + 1]), _t(LABELS[i : i + 1])).item()
            assert got == pytest.approx(ref_atgl(LOGITS[i : i + 1], LABELS[i : i + 1], alpha), rel=1e-12)


def test_atsl_hand_value_and_reference():
    # NA pair, logits (0, 0): L2' = -log(e^lam / (e^lam + 1))
    assert ATSLoss(lam=2.0)(_t([[0.0, 0.0]]), _t([[1, 0]])).item() == pytest.approx(
        math.log1p(math.exp(-2.0))
    )
    for lam, beta in ((3.0, 0.0), (1.5, 0.7)):
        for i in range(len(LOGITS)):
            got = ATSLoss(lam=lam, beta=beta)(_t(LOGITS[i : i + 1]), _t(LABELS[i : i + 1])).item()
            assert got == pytest.approx(ref_atsl(LOGITS[i : i + 1], LABELS[i : i + 1], lam, beta), rel=1e-12)


def test_amtl_matches_reference_with_default_lambda():
    # columns by frequency: r3 (9), r1 (7), r4 (5), r2 (1); sizes 1/3 -> segments (3,), (1, 4, 2)
    loss = AMTLoss(relation_counts=[7, 1, 9, 5], segment_sizes=[1, 3])
    assert loss.segments == ((3,), (1, 4, 2))
    assert loss.lam == 1.5  # n - 0.5
    logits = [[0.3, -0.4] + row[1:] for row in LOGITS]  # [TH_1, TH_2 | r1..r4]
    for i in range(len(logits)):
        got = loss(_t(logits[i : i + 1]), _t(LABELS[i : i + 1])).item()
        assert got == pytest.approx(
            ref_amtl(logits[i : i + 1], LABELS[i : i + 1], loss.segments, 1.5), rel=1e-12
        )
    got = AMTLoss(segments=[[2, 4], [1], [3]], lam=2.0)(
        _t([[0.1, 0.5, -0.2] + r[1:] for r in LOGITS]), _t(LABELS)
    )
    want = ref_amtl([[0.1, 0.5, -0.2] + r[1:] for r in LOGITS], LABELS, [[2, 4], [1], [3]], 2.0)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_bce_matches_reference_and_target_is_na():
    z = [0.3, -1.2, 2.0, 0.0]
    assert BCELoss()(_t([[v] for v in z]), _t(LABELS)).item() == pytest.approx(ref_bce(z, LABELS), rel=1e-12)
    assert BCELoss()(_t(z), _t(LABELS)).item() == pytest.approx(ref_bce(z, LABELS), rel=1e-12)
    # a large NA logit on an NA pair costs almost nothing; on a relation pair it costs about the logit
    assert BCELoss()(_t([[20.0]]), _t([[1, 0, 0]])).item() < 1e-8
    assert BCELoss()(_t([[20.0]]), _t([[0, 0, 1]])).item() == pytest.approx(20.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# gradients against closed forms


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [x / sum(e) for x in e]


def _closed_form_atsl_grad(row, lab, lam=0.0, beta=0.0):
    """dL/dlogit for one pair: L1' = |P| lse(P u {TH+beta}) - sum_P l; L2' = lse(N u {TH+lam}) - TH - lam."""
    th, rel = row[0], row[1:]
    pos = [i for i in range(len(rel)) if lab[i + 1]]
    neg = [i for i in range(len(rel)) if not lab[i + 1]]
    grad = [0.0] * len(row)
    q = _softmax([th + beta] + [rel[i] for i in pos])
    grad[0] += len(pos) * q[0]
    for j, i in enumerate(pos):
        grad[1 + i] += len(pos) * q[1 + j] - 1.0
    u = _softmax([th + lam] + [rel[i] for i in neg])
    grad[0] += u[0] - 1.0
    for j, i in enumerate(neg):
        grad[1 + i] += u[1 + j]
    return grad


@pytest.mark.parametrize("lam,beta", [(0.0, 0.0), (3.0, 0.0), (1.5, 0.8)])
def test_atl_and_atsl_gradients_match_closed_form(lam, beta):
    logits = _t(LOGITS).requires_grad_(True)
    loss = ATLoss() if lam == beta == 0.0 else ATSLoss(lam=lam, beta=beta)
    loss(logits, _t(LABELS)).backward()
    want = _t([_closed_form_atsl_grad(r, lab, lam, beta) for r, lab in zip(LOGITS, LABELS)]) / len(LOGITS)
    torch.testing.assert_close(logits.grad, want, rtol=1e-10, atol=1e-12)


def test_atgl_gradient_is_w_p_minus_w():
    alpha = 5.0
    logits = _t(LOGITS).requires_grad_(True)
    ATGLoss(alpha=alpha)(logits, _t(LABELS)).backward()
    want = []
    for row, lab in zip(LOGITS, LABELS):
        w = [1.0] + [alpha if v else 0.0 for v in lab[1:]]
        p = _softmax(row)
        want.append([(sum(w) * pk - wk) / len(LOGITS) for pk, wk in zip(p, w)])  # Eq. 20, mean over pairs
    torch.testing.assert_close(logits.grad, _t(want), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# the papers' properties


def test_atgl_optimum_gap_is_log_alpha_without_negatives():
    alpha = 4.0
    s = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([s], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        ATGLoss(alpha=alpha)(s, _t([[0, 1]])).backward()
        opt.step()
    assert (s[0, 1] - s[0, 0]).item() == pytest.approx(math.log(alpha), abs=1e-6)


def test_atgl_optimum_gap_is_log_alpha_with_negatives():
    # negatives only enter through the normaliser and sink towards -inf; every positive ends ln(alpha) above TH
    alpha = 16.5
    s = torch.tensor([[0.0, 0.5, 1.0, -0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    labels = _t([[0, 1, 0, 1, 0]])
    opt = torch.optim.Adam([s], lr=0.1)
    for _ in range(1500):
        opt.zero_grad()
        ATGLoss(alpha=alpha)(s, labels).backward()
        opt.step()
    th, r1, r2, r3, r4 = s[0].tolist()
    assert r1 - th == pytest.approx(math.log(alpha), abs=1e-2)
    assert r3 - th == pytest.approx(math.log(alpha), abs=1e-2)
    assert max(r2, r4) < th - 5


@pytest.mark.parametrize("alpha", [1.0, 0.5, -2.0])
def test_atgl_rejects_alpha_not_above_one(alpha):
    with pytest.raises(LmrcError, match="alpha"):
        build_loss("atgl", alpha=alpha)


def test_atsl_with_zero_shifts_equals_atl():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=g, dtype=torch.float64)
    labels = (torch.rand(12, 7, generator=g) < 0.3).double()
    labels[:, 0] = (labels[:, 1:].sum(1) == 0).double()
    torch.testing.assert_close(ATSLoss(lam=0.0, beta=0.0)(logits, labels), ATLoss()(logits, labels))


def test_atsl_predicts_against_unshifted_threshold():
    logits = _t(LOGITS)
    assert torch.equal(ATSLoss(lam=3.0, beta=1.0).predict(logits), ATLoss().predict(logits))
    torch.testing.assert_close(ATSLoss(lam=3.0).margins(logits), logits[:, 1:] - logits[:, :1])


def test_amtl_combined_threshold_is_sum_of_thresholds_over_lambda():
    loss = AMTLoss(segments=[[1, 3], [2], [4]], lam=2.5)
    logits = _t([[0.4, -1.0, 2.0, 0.1, 0.2, 0.3, 0.4]])
    torch.testing.assert_close(loss.margins(logits), _t([[0.1 - 0.56, 0.2 - 0.56, 0.3 - 0.56, 0.4 - 0.56]]))


def test_amtl_raw_threshold_is_each_segments_own():
    loss = AMTLoss(segments=[[1, 3], [2], [4]], threshold_mode="raw")
    logits = _t([[0.4, -1.0, 2.0, 0.1, 0.2, 0.3, 0.4]])
    torch.testing.assert_close(loss.margins(logits), _t([[0.1 - 0.4, 0.2 + 1.0, 0.3 - 0.4, 0.4 - 2.0]]))
    assert loss.predict(logits).tolist() == [[False, False, True, False, False]]


def test_amtl_one_segment_with_lambda_one_is_atl():
    # Eq. 2 with n = 1: TH / lambda, so lambda = 1 leaves ATL's threshold unchanged (the layout is ATL's too)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 6, generator=g, dtype=torch.float64)
    labels = (torch.rand(10, 6, generator=g) < 0.3).double()
    amtl = AMTLoss(relation_counts=[3, 1, 4, 1, 5], n_segments=1, lam=1.0)
    torch.testing.assert_close(amtl(logits, labels), ATLoss()(logits, labels))
    assert torch.equal(amtl.predict(logits), ATLoss().predict(logits))


def test_amtl_default_segments_are_tens_by_frequency():
    counts = [(7 * i) % 37 for i in range(35)]  # distinct counts
    segs = amtl_segments(counts)
    assert [len(s) for s in segs] == [10, 10, 10, 5]
    flat = [c for s in segs for c in s]
    assert [counts[c - 1] for c in flat] == sorted(counts, reverse=True)
    assert sorted(flat) == list(range(1, 36))


def test_amtl_segments_ties_keep_column_order_and_explicit_sizes():
    assert amtl_segments([2, 5, 2, 5, 0], segment_sizes=[2, 2, 1]) == ((2, 4), (1, 3), (5,))
    with pytest.raises(LmrcError, match="sum to"):
        amtl_segments([1, 2, 3], segment_sizes=[1, 1])


def test_amtl_rejects_more_segments_than_relations_and_bad_setups():
    with pytest.raises(LmrcError, match="more than the number of relations"):
        build_loss("amtl", relation_counts=[1, 2, 3], n_segments=4)
    with pytest.raises(LmrcError, match="segment_sizes"):  # 4 x 10 needs more than 30 relations
        build_loss("amtl", relation_counts=list(range(20)), n_segments=4)
    with pytest.raises(LmrcError, match="relation_counts"):
        build_loss("amtl")
    with pytest.raises(LmrcError, match="each exactly once"):
        build_loss("amtl", segments=[[1, 2], [2, 3]])
    with pytest.raises(LmrcError, match="threshold_mode"):
        build_loss("amtl", segments=[[1]], threshold_mode="mean")


# ---------------------------------------------------------------------------------------------------------
# MD-RE


def test_negative_selection_picks_top_k_by_loss():
    pair_loss = torch.tensor([0.1, 5.0, 0.3, 2.0, 0.9, 4.0, 0.2, 3.0, 0.05])
    positive = torch.tensor([True, False, False, False, False, False, False, False, False])
    keep = select_hard_negatives(pair_loss, positive, rho=4)  # k = min(4, 8) = 4
    assert keep.nonzero().flatten().tolist() == [0, 1, 3, 5, 7]
    keep = select_hard_negatives(pair_loss, positive, rho=1.5)  # k = floor(1.5) = 1
    assert keep.nonzero().flatten().tolist() == [0, 1]


def test_negative_selection_without_positives_keeps_nothing_and_caps_at_negatives():
    pair_loss = torch.tensor([1.0, 2.0, 3.0])
    assert not select_hard_negatives(pair_loss, torch.zeros(3, dtype=torch.bool), rho=4).any()
    assert select_hard_negatives(pair_loss, torch.tensor([True, False, False]), rho=4).all()  # k = min(4, 2)


def _mdre_logits(rows_recall, rows_coarse, rows_fine):
    return _t([a + b + c for a, b, c in zip(rows_recall, rows_coarse, rows_fine)])


def test_mdre_loss_matches_reference_with_per_discriminator_selection():
    # pairs: 0 positive; 1-5 negatives. rho = 0.5 -> k = 0 with one positive; rho = 2 -> k = 2.
    labels = [[0, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]]
    recall = [
        [0.0, 1.0, -1.0],
        [0.0, 0.5, 0.1],
        [0.2, -1.0, 0.3],
        [0.0, 2.0, 1.0],
        [1.0, -2.0, -2.0],
        [0.0, 0.0, 0.0],
    ]
    # coarse ranks pairs 3 and 1 hardest; fine ranks pairs 4 and 2 hardest
    coarse = [
        [0.5, 0.2, 0.0],
        [0.0, 2.0, 1.0],
        [0.0, -1.0, -1.0],
        [0.0, 3.0, 2.0],
        [0.0, -0.5, -0.5],
        [0.0, 0.0, -3.0],
    ]
    fine = [
        [0.0, 0.4, 0.0],
        [0.0, -1.0, -1.0],
        [0.0, 2.0, 1.5],
        [0.0, -2.0, -1.0],
        [0.0, 3.0, 2.0],
        [0.0, -1.0, 0.0],
    ]
    logits = _mdre_logits(recall, coarse, fine)

    def ref(rho):
        pos_pairs = [i for i, lab in enumerate(labels) if any(lab[1:])]
        neg_pairs = [i for i in range(len(labels)) if i not in pos_pairs]
        total = ref_atsl(recall, labels, lam=3.0)
        for rows, lam in ((coarse, 1.5), (fine, 0.0)):
            k = min(math.floor(rho * len(pos_pairs)), len(neg_pairs))
            hard = sorted(neg_pairs, key=lambda i: -ref_atsl([rows[i]], [labels[i]], lam=lam))[:k]
            kept = pos_pairs + hard
            total += ref_atsl([rows[i] for i in kept], [labels[i] for i in kept], lam=lam)
        return total

    assert ref(2.0) != pytest.approx(ref(0.5))
    for rho in (0.5, 2.0, 4.0):
        assert MDRELoss(rho=rho)(logits, _t(labels)).item() == pytest.approx(ref(rho), rel=1e-12)


def test_mdre_without_positives_is_recall_loss_only():
    labels = [[1, 0, 0], [1, 0, 0]]
    recall, coarse, fine = [[0.0, 1.0, 2.0], [1.0, 0.0, 0.5]], [[0.0, 5.0, 5.0]] * 2, [[0.0, 7.0, 7.0]] * 2
    logits = _mdre_logits(recall, coarse, fine).requires_grad_(True)
    loss = MDRELoss()(logits, _t(labels))
    assert loss.item() == pytest.approx(ref_atsl(recall, labels, lam=3.0), rel=1e-12)
    loss.backward()
    assert logits.grad[:, 3:].abs().sum().item() == 0.0


def test_mdre_fused_inference_rule():
    # R = 4, blocks [TH, r1..r4] for recall | coarse | fine, alpha = 0.65
    recall = [[-10.0, -9.0, -9.5, -9.0, -9.0]]
    coarse = [[0.0, 1.0, -1.0, -2.0, 0.5]]
    fine = [[0.0, 1.0, -1.0, -2.0, 0.5]]
    # r1: all three accept; fused -7 < fused TH -6.5, accepted by unanimity.
    # r2: only recall accepts (margin 0.5); fused -11.5 < -6.5: rejected.
    # r3: only recall accepts; fused -13 < -6.5: rejected.   r4: all accept.
    loss = MDRELoss()
    assert loss.predict(_mdre_logits(recall, coarse, fine)).tolist() == [[False, True, False, False, True]]
    # recall rejects r1 (TH 2 > 1), coarse and fine accept: fused 2 vs 0.65 * 2 = 1.3 -> accept; alpha 1 -> 2 > 2 fails
    logits = _mdre_logits([[2.0, 1.0]], [[0.0, 0.5]], [[0.0, 0.5]])
    assert MDRELoss(alpha=0.65).predict(logits).tolist() == [[False, True]]
    assert MDRELoss(alpha=1.0).predict(logits).tolist() == [[True, False]]
    assert MDRELoss(alpha=0.65).margins(logits).item() == pytest.approx(2.0 - 1.3)
    # recall accepts strongly, coarse and fine reject: fused 5 - 1 - 1 = 3 > 0 -> accept without unanimity
    logits = _mdre_logits([[0.0, 5.0]], [[0.0, -1.0]], [[0.0, -1.0]])
    assert MDRELoss().predict(logits).tolist() == [[False, True]]


def test_mdre_margins_agree_with_predict_under_unanimity():
    loss = MDRELoss()
    logits = _mdre_logits([[-10.0, -9.0]], [[0.0, 1.0]], [[0.0, 2.0]])
    # fused margin -7 + 6.5 = -0.5, but all three accept: margin is the weakest own margin, 1
    assert loss.margins(logits).item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 3 * 6, generator=g) * 3
    assert torch.equal(loss.predict(logits)[:, 1:], loss.margins(logits) > 0)


# ---------------------------------------------------------------------------------------------------------
# decisions shared by all heads


def _all_losses():
    return [
        BCELoss(),
        ATLoss(),
        ATLoss(top_k=2),
        ATGLoss(),
        ATSLoss(),
        AMTLoss(segments=[[1, 4], [2, 3, 5]]),
        AMTLoss(segments=[[1, 4], [2, 3, 5]], threshold_mode="raw"),
        MDRELoss(),
    ]


def _random_batch(loss, n_pairs=40, n_rel=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_pairs, loss.num_logits(n_rel), generator=g) * 2
    labels = (torch.rand(n_pairs, 1 + n_rel, generator=g) < 0.25).float()
    labels[:5, 1:] = 0
    labels[:, 0] = (labels[:, 1:].sum(1) == 0).float()
    return logits, labels


@pytest.mark.parametrize("loss", _all_losses(), ids=lambda x: type(x).__name__)
def test_predict_marks_na_exactly_when_no_relation_and_agrees_with_score(loss):
    logits, _ = _random_batch(loss)
    pred = loss.predict(logits)
    assert pred.dtype == torch.bool
    assert torch.equal(pred[:, 0], ~pred[:, 1:].any(dim=1))
    assert torch.equal(~pred[:, 0], loss.score(logits) > loss.score_threshold)
    assert 0 < int(pred[:, 0].sum()) < len(pred)  # both outcomes occur, so the checks above bite


@pytest.mark.parametrize("loss", _all_losses(), ids=lambda x: type(x).__name__)
def test_forward_leaves_inputs_unmodified_and_backpropagates(loss):
    logits, labels = _random_batch(loss)
    labels_before, logits_before = labels.clone(), logits.clone()
    logits.requires_grad_(True)
    value = loss(logits, labels)
    value.backward()
    assert value.dim() == 0 and torch.isfinite(value)
    assert torch.equal(labels, labels_before) and torch.equal(logits.detach(), logits_before)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_single_threshold_predict_equals_positive_margins():
    logits = _t(LOGITS)
    for loss in (ATLoss(), ATGLoss(), ATSLoss()):
        assert torch.equal(loss.predict(logits)[:, 1:], loss.margins(logits) > 0)
    assert ATLoss().predict(logits).tolist() == [
        [False, True, False, True, False],
        [False, True, True, False, True],
        [False, False, True, False, True],
        [False, True, False, True, True],
    ]
    torch.testing.assert_close(ATLoss().score(logits), _t([1.5, 1.3, 1.5, 3.0]))


def test_atl_top_k_keeps_the_k_highest_above_threshold():
    logits = _t([[0.0, 1.0, 4.0, 2.0, 3.0, -1.0], [0.0, -1.0, 0.5, -2.0, -3.0, -4.0]])
    assert ATLoss(top_k=2).predict(logits).tolist() == [
        [False, False, True, False, True, False],
        [False, False, True, False, False, False],
    ]


def test_bce_predicts_na_and_has_relation_columns_with_threshold():
    z = _t([[2.0], [-2.0], [-0.1]])  # P(has relation) = sigmoid(-z)
    torch.testing.assert_close(BCELoss().score(z), torch.sigmoid(_t([-2.0, 2.0, 0.1])))
    assert BCELoss().predict(z).tolist() == [[True, False], [False, True], [False, True]]
    assert BCELoss(threshold=0.6).predict(z).tolist() == [[True, False], [False, True], [True, False]]
    assert BCELoss().margins(z) is None and not BCELoss.per_relation


def test_num_logits():
    assert BCELoss().num_logits(96) == 1
    assert ATLoss().num_logits(96) == ATGLoss().num_logits(96) == ATSLoss().num_logits(96) == 97
    assert AMTLoss(relation_counts=list(range(96))).num_logits(96) == 100
    assert MDRELoss().num_logits(96) == 291
    with pytest.raises(LmrcError, match="relation set has 5"):
        AMTLoss(relation_counts=list(range(96))).num_logits(5)


# ---------------------------------------------------------------------------------------------------------
# registry, parameters, inputs


def test_registry_builds_each_loss_with_paper_defaults():
    assert set(LOSSES) == {"bce", "atl", "atgl", "amtl", "atsl", "mdre"}
    assert build_loss("atgl").alpha == 16.5
    atsl = build_loss("atsl")
    assert (atsl.lam, atsl.beta) == (3.0, 0.0)
    amtl = build_loss("amtl", relation_counts=list(range(40)))
    assert (amtl.n_segments, amtl.lam, amtl.threshold_mode) == (4, 3.5, "combined")
    mdre = build_loss("mdre")
    assert (mdre.lams, mdre.rho, mdre.alpha) == ((3.0, 1.5, 0.0), 4.0, 0.65)
    assert build_loss("bce").threshold == 0.5


def test_unknown_loss_and_parameter_are_rejected():
    with pytest.raises(LmrcError, match="known: bce, atl, atgl, amtl, atsl, mdre"):
        build_loss("focal")
    with pytest.raises(LmrcError, match="unknown parameter.*alph"):
        build_loss("atl", alph=2.0)
    with pytest.raises(LmrcError, match="threshold"):
        build_loss("bce", threshold=1.0)
    with pytest.raises(LmrcError, match="lam"):
        build_loss("atsl", lam=-1.0)
    with pytest.raises(LmrcError, match="top_k"):
        build_loss("atl", top_k=0)


def test_shape_mismatch_is_reported():
    with pytest.raises(LmrcError, match="labels must have shape"):
        ATLoss()(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(LmrcError, match="expected 7 logits"):
        AMTLoss(segments=[[1, 2], [3, 4, 5]])(torch.zeros(3, 5), torch.zeros(3, 6))


def test_half_precision_logits_give_float32_loss_and_empty_batch_gives_zero():
    logits, labels = _random_batch(ATLoss(), n_pairs=8)
    half = ATLoss()(logits.bfloat16(), labels)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(ATLoss()(logits.bfloat16().float(), labels).item(), rel=1e-6)
    assert ATLoss()(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0
    assert MDRELoss()(torch.zeros(0, 9), torch.zeros(0, 3)).item() == 0.0
