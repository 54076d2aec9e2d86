"""Losses against values worked out by hand (numbers written out, not the same formula re-run)."""

import math

import pytest
import torch

from ml.losses import moco_loss, nt_xent_loss, scan_loss, scan_loss_all_neighbors, scan_loss_per_head, selflabel_loss

LN3 = math.log(3.0)


# --- NT-Xent --------------------------------------------------------------------------------------


def test_nt_xent_identical_separated_pairs():
    # Views identical, the two images orthogonal. Every anchor: positive at similarity 1, two
    # negatives at 0 (the other image, both views) -> -log(e^{1/t} / (e^{1/t} + 2)).
    e = torch.eye(2)
    loss = nt_xent_loss(e, e.clone(), temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2.0)), rel=1e-6)  # 0.2395...
    assert loss.item() == pytest.approx(0.23954, abs=1e-4)


def test_nt_xent_swapped_pairs():
    # z2 swaps the images: each anchor's positive is orthogonal (0) while one negative is identical
    # (1/t) and one is orthogonal (0) -> log(2 + e^{1/t}); with t = 1: log(2 + e) = 1.5514.
    e = torch.eye(2)
    loss = nt_xent_loss(e, e.flip(0), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(2 + math.e), rel=1e-6)


def test_nt_xent_is_symmetric_in_views_and_has_gradient():
    g = torch.Generator().manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1).requires_grad_()
    z2 = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    a = nt_xent_loss(z1, z2)
    b = nt_xent_loss(z2, z1)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    a.backward()
    assert z1.grad.abs().sum() > 0


# --- MoCo -----------------------------------------------------------------------------------------


def test_moco_loss_by_hand():
    # q = k = e1, queue = [e2, -e1], t = 1 -> logits [1, 0, -1], target 0.
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    k = torch.tensor([[1.0, 0.0]], requires_grad=True)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    loss = moco_loss(q, k, queue, temperature=1.0)
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1 + 1 / math.e)), rel=1e-6)
    loss.backward()
    assert q.grad is not None and k.grad is None  # stop-gradient on the key


def test_moco_temperature_scales_logits():
    # t = 0.5 doubles the logits: [2, 0, -2].
    q = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    loss = moco_loss(q, q, queue, temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2) + math.exp(-4)), rel=1e-6)


# --- SCAN (Eq. 2) ---------------------------------------------------------------------------------

# Two anchors, K = 2: p1 = [.5, .5], p2 = [.75, .25]; neighbours q1 = [.75, .25], q2 = [.25, .75].
ANCHORS = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
NEIGHBORS = torch.tensor([[LN3, 0.0], [0.0, LN3]])
# <p1,q1> = .375 + .125 = .5 ; <p2,q2> = .1875 + .1875 = .375
CONSISTENCY = -(math.log(0.5) + math.log(0.375)) / 2  # 0.83698
# pbar = [.625, .375]
ENTROPY = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))  # 0.66156


def test_scan_loss_by_hand():
    total, consistency, entropy = scan_loss(ANCHORS, NEIGHBORS, entropy_weight=5.0)
    assert consistency.item() == pytest.approx(CONSISTENCY, rel=1e-6)
    assert consistency.item() == pytest.approx(0.83698, abs=1e-5)
    assert entropy.item() == pytest.approx(ENTROPY, rel=1e-6)
    assert entropy.item() == pytest.approx(0.66156, abs=1e-5)
    assert total.item() == pytest.approx(CONSISTENCY - 5.0 * ENTROPY, rel=1e-6)


def test_scan_entropy_term_prefers_spread_clusters():
    # Confident, consistent predictions: all in cluster 0 versus one cluster per sample.
    # Consistency is ~0 in both; the entropy term (-w * H(pbar)) must favour the spread batch,
    # where pbar is uniform and H = log K.
    big = 30.0
    collapsed = torch.tensor([[big, 0, 0], [big, 0, 0], [big, 0, 0]])
    spread = torch.tensor([[big, 0, 0], [0, big, 0], [0, 0, big]])
    t_collapsed, c_collapsed, h_collapsed = scan_loss(collapsed, collapsed)
    t_spread, c_spread, h_spread = scan_loss(spread, spread)
    assert c_collapsed.item() == pytest.approx(0.0, abs=1e-6)
    assert c_spread.item() == pytest.approx(0.0, abs=1e-6)
    assert h_collapsed.item() == pytest.approx(0.0, abs=1e-6)
    assert h_spread.item() == pytest.approx(math.log(3), rel=1e-5)
    assert t_spread.item() == pytest.approx(-5.0 * math.log(3), rel=1e-5)
    assert t_spread < t_collapsed


def test_scan_uniform_predictions_maximise_entropy():
    # All-zero logits: p = q = uniform over 4 -> <p,q> = 1/4, H = log 4.
    z = torch.zeros(5, 4)
    total, consistency, entropy = scan_loss(z, z, entropy_weight=2.0)
    assert consistency.item() == pytest.approx(math.log(4), rel=1e-6)
    assert entropy.item() == pytest.approx(math.log(4), rel=1e-6)
    assert total.item() == pytest.approx(math.log(4) - 2 * math.log(4), rel=1e-6)


def test_scan_heads_are_summed_and_reported_per_head():
    # Head 0: the hand-worked case; head 1: uniform predictions (consistency log 2, entropy log 2).
    anchors = torch.stack([ANCHORS, torch.zeros(2, 2)])
    neighbors = torch.stack([NEIGHBORS, torch.zeros(2, 2)])
    per_total, per_consistency, per_entropy = scan_loss_per_head(anchors, neighbors, entropy_weight=5.0)
    assert per_total.shape == per_consistency.shape == per_entropy.shape == (2,)
    expected_head1 = math.log(2) - 5.0 * math.log(2)
    assert per_total.tolist() == pytest.approx([CONSISTENCY - 5.0 * ENTROPY, expected_head1], rel=1e-6)
    total, consistency, entropy = scan_loss(anchors, neighbors, entropy_weight=5.0)
    assert total.item() == pytest.approx(CONSISTENCY - 5.0 * ENTROPY + expected_head1, rel=1e-6)
    assert consistency.item() == pytest.approx(CONSISTENCY + math.log(2), rel=1e-6)
    assert entropy.item() == pytest.approx(ENTROPY + math.log(2), rel=1e-6)


def test_scan_loss_is_finite_for_disagreeing_confident_predictions():
    a = torch.tensor([[100.0, -100.0]], requires_grad=True)
    n = torch.tensor([[-100.0, 100.0]])
    total, consistency, _ = scan_loss(a, n)
    assert torch.isfinite(total) and consistency.item() == pytest.approx(-math.log(1e-8), rel=1e-4)
    total.backward()
    assert torch.isfinite(a.grad).all()


def test_scan_loss_bf16_logits_computed_in_float32():
    total, _, _ = scan_loss(ANCHORS.bfloat16(), NEIGHBORS.bfloat16(), entropy_weight=5.0)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(CONSISTENCY - 5.0 * ENTROPY, abs=2e-2)


# --- Self-labeling --------------------------------------------------------------------------------

# Weak view: samples 0-2 confidently class 0 (p = 0.99995), sample 3 class 1, sample 4 unsure.
WEAK = torch.tensor([[10.0, 0.0], [10.0, 0.0], [10.0, 0.0], [0.0, 10.0], [0.0, 0.0]])
# Strong view cross-entropies against those labels: ln 2, ln 4/3, ln 4, ln 4/3 (sample 4 unused).
STRONG = torch.tensor([[0.0, 0.0], [LN3, 0.0], [0.0, LN3], [0.0, LN3], [5.0, -5.0]])


def test_selflabel_unbalanced_by_hand():
    loss, n = selflabel_loss(WEAK, STRONG, threshold=0.99, class_balance=False)
    assert n == 4
    expected = (math.log(2) + math.log(4 / 3) + math.log(4) + math.log(4 / 3)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(0.66371, abs=1e-4)


def test_selflabel_class_balanced_by_hand():
    # Class 0 (3 samples) and class 1 (1 sample) weigh equally: mean of the per-class means.
    loss, n = selflabel_loss(WEAK, STRONG, threshold=0.99, class_balance=True)
    assert n == 4
    class0 = (math.log(2) + math.log(4 / 3) + math.log(4)) / 3
    class1 = math.log(4 / 3)
    assert loss.item() == pytest.approx((class0 + class1) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.53836, abs=1e-4)


def test_selflabel_threshold_is_strict_and_weak_view_gets_no_gradient():
    weak = WEAK.clone().requires_grad_()
    strong = STRONG.clone().requires_grad_()
    loss, n = selflabel_loss(weak, strong, threshold=0.9999)  # 0.99995 > 0.9999 still passes
    assert n == 4
    loss.backward()
    assert weak.grad is None
    assert strong.grad[4].abs().sum() == 0 and strong.grad[:4].abs().sum() > 0
    _, n_strict = selflabel_loss(WEAK, STRONG, threshold=0.99996)
    assert n_strict == 0


def test_selflabel_cluster_quota_adds_the_most_confident_of_every_cluster():
    # Nothing passes 0.99; with quota 0.5 the more confident half (rounded up) of each predicted
    # cluster is pseudo-labelled: cluster 0 has 3 members (2 taken), cluster 1 has 1 (1 taken).
    weak = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
    strong = torch.zeros(4, 2, requires_grad=True)
    _, n_plain = selflabel_loss(weak, strong, threshold=0.99)
    loss, n = selflabel_loss(weak, strong, threshold=0.99, class_balance=False, cluster_quota=0.5)
    assert (n_plain, n) == (0, 3)
    loss.backward()
    assert strong.grad[2].abs().sum() == 0 and strong.grad[[0, 1, 3]].abs().sum(1).min() > 0


def test_selflabel_no_confident_sample_gives_zero_loss_with_grad():
    strong = torch.randn(3, 4, requires_grad=True)
    loss, n = selflabel_loss(torch.zeros(3, 4), strong, threshold=0.99)
    assert n == 0
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(strong.grad, torch.zeros(3, 4))


def test_scan_loss_all_neighbors_is_eq2_over_every_pair():
    """The model-selection loss is Eq. 2 with every (anchor, neighbour) pair listed once: the same
    number as scan_loss_per_head on the explicit pair list (consistency) and the anchors (entropy)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 4, generator=g) * 3  # 3 heads, 50 images, 4 clusters
    nb = torch.randint(0, 50, (50, 6), generator=g)  # 6 neighbours each
    got = scan_loss_all_neighbors(logits.softmax(-1), nb, entropy_weight=5.0, chunk=7)
    anchors = logits.repeat_interleave(6, dim=1)
    neighbours = logits[:, nb.reshape(-1)]
    _, consistency, _ = scan_loss_per_head(anchors, neighbours, entropy_weight=5.0)
    _, _, entropy = scan_loss_per_head(logits, logits, entropy_weight=5.0)
    assert torch.allclose(got, consistency - 5.0 * entropy, atol=1e-5)
