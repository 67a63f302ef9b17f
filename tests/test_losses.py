"""Each triplet loss against a brute-force enumeration of every triplet with itertools."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from losses import TripletLoss, pairwise_distances, triplet_loss

MARGIN = 0.2


def _d(emb, i, j):
    return math.sqrt(max(float(((emb[i] - emb[j]) ** 2).sum()), 1e-12))


def _triplets(labels):
    n = len(labels)
    for a, p, q in itertools.product(range(n), repeat=3):
        if a != p and labels[a] == labels[p] and labels[q] != labels[a]:
            yield a, p, q


def brute_force(emb, labels, margin, mining):
    labels = labels.tolist()
    n = len(labels)
    trip = list(_triplets(labels))
    losses = [_d(emb, a, p) - _d(emb, a, q) + margin for a, p, q in trip]
    frac = sum(l > 0 for l in losses) / len(trip) if trip else 0.0
    if mining == "batch_all":
        act = [l for l in losses if l > 0]
        return (sum(act) / len(act) if act else 0.0), frac
    if mining == "batch_hard":
        per_anchor = []
        for a in range(n):
            ps = [_d(emb, a, p) for p in range(n) if p != a and labels[p] == labels[a]]
            ns = [_d(emb, a, q) for q in range(n) if labels[q] != labels[a]]
            if ps and ns:
                per_anchor.append(max(0.0, max(ps) - min(ns) + margin))
        return (sum(per_anchor) / len(per_anchor) if per_anchor else 0.0), frac
    # semihard: closest negative farther than the positive, else the farthest negative
    per_pair = []
    for a, p in itertools.permutations(range(n), 2):
        if labels[a] != labels[p]:
            continue
        ns = [_d(emb, a, q) for q in range(n) if labels[q] != labels[a]]
        if not ns:
            continue
        d_ap = _d(emb, a, p)
        farther = [x for x in ns if x > d_ap]
        d_an = min(farther) if farther else max(ns)
        per_pair.append(max(0.0, d_ap - d_an + margin))
    return (sum(per_pair) / len(per_pair) if per_pair else 0.0), frac


def _batch(seed, p=3, k=4, dim=8, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(p, dim, generator=g)
    labels = torch.arange(p).repeat_interleave(k)
    emb = centers[labels] + spread * torch.randn(p * k, dim, generator=g)
    return F.normalize(emb, dim=1).double(), labels


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semihard"])
@pytest.mark.parametrize("seed,spread", [(0, 1.0), (1, 0.3), (2, 3.0), (3, 0.05)])
def test_matches_brute_force(mining, seed, spread):
    emb, labels = _batch(seed, spread=spread)
    loss, frac = triplet_loss(emb, labels, MARGIN, mining)
    exp_loss, exp_frac = brute_force(emb, labels, MARGIN, mining)
    assert loss.item() == pytest.approx(exp_loss, abs=1e-6)
    assert frac.item() == pytest.approx(exp_frac, abs=1e-6)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semihard"])
def test_unbalanced_batch_and_lonely_anchor(mining):
    # label 3 appears once: it is never an anchor, but it is a negative for the others
    emb, _ = _batch(5, p=2, k=5)
    labels = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1, 1, 3])
    loss, frac = triplet_loss(emb, labels, MARGIN, mining)
    exp_loss, exp_frac = brute_force(emb, labels, MARGIN, mining)
    assert loss.item() == pytest.approx(exp_loss, abs=1e-6)
    assert frac.item() == pytest.approx(exp_frac, abs=1e-6)


def test_hand_computed_batch_hard():
    # 1-D points on a circle are awkward; use 2-D unit vectors at known angles.
    ang = torch.tensor([0.0, 0.5, 2.0, 2.4])  # classes 0, 0, 1, 1
    emb = torch.stack([ang.cos(), ang.sin()], 1).double()
    labels = torch.tensor([0, 0, 1, 1])
    chord = lambda t: 2 * math.sin(t / 2)  # distance between unit vectors t radians apart
    # anchor 0: d_ap = chord(.5), d_an = chord(2.0); anchor 1: chord(.5), chord(1.5);
    # anchor 2: chord(.4), chord(1.5); anchor 3: chord(.4), chord(1.9). All negatives beyond margin.
    loss, frac = triplet_loss(emb, labels, 0.2, "batch_hard")
    assert loss.item() == pytest.approx(0.0) and frac.item() == 0.0
    loss, frac = triplet_loss(emb, labels, 1.0, "batch_hard")
    expected = sum(max(0, chord(a) - chord(b) + 1.0) for a, b in [(.5, 2.0), (.5, 1.5), (.4, 1.5), (.4, 1.9)]) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semihard"])
def test_gradients_finite_with_duplicates_and_no_triplets(mining):
    emb = F.normalize(torch.randn(6, 4), dim=1)
    emb = torch.cat([emb, emb[:2]]).requires_grad_()  # duplicates: distance 0 must not give NaN grads
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])
    loss, _ = TripletLoss(0.2, mining)(emb, labels)
    loss.backward()
    assert torch.isfinite(emb.grad).all()
    single = torch.randn(4, 4, requires_grad=True)
    loss, frac = triplet_loss(single, torch.zeros(4, dtype=torch.long), 0.2, mining)
    assert loss.item() == 0.0 and frac.item() == 0.0 and loss.requires_grad


def test_distances_match_cdist_and_unknown_mining():
    emb = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    torch.testing.assert_close(pairwise_distances(emb).fill_diagonal_(0), torch.cdist(emb, emb).fill_diagonal_(0))
    with pytest.raises(ValueError, match="semihard"):
        triplet_loss(emb, torch.zeros(7), 0.2, "hardest")
