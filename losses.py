"""Triplet losses with online mining for deep metric learning.

All losses work on Euclidean distances between embeddings. For the unit-norm embeddings every model
of this toolkit returns, d(a, b)^2 = 2 - 2 cos(a, b); we use the general form |a|^2 + |b|^2 - 2 a.b,
which is the same number for unit vectors and stays correct otherwise. Mining strategies:

- ``batch_hard`` (Hermans et al., 2017): for every anchor, its hardest (farthest) positive and hardest
  (closest) negative in the batch; loss = mean over anchors of relu(d_ap - d_an + margin).
- ``batch_all``: every valid triplet (a, p, n); loss = mean of relu(d_ap - d_an + margin) over the
  *active* triplets (loss > 0); 0 when none is active.
- ``semihard`` (FaceNet, Schroff et al., 2015; the rule of TensorFlow Addons' triplet_semihard_loss):
  for every anchor-positive pair the closest negative that is farther than the positive (d_an > d_ap).
  When that negative is beyond the margin the pair contributes 0. When no negative is farther than the
  positive (all negatives are "hard"), we fall back to the farthest negative, i.e. the least hard one,
  which keeps a gradient without the collapse that the hardest negatives cause early in training.
  loss = mean over all anchor-positive pairs.

Every function returns ``(loss, active_fraction)``: ``active_fraction`` is the fraction of *all* valid
triplets of the batch with d_ap - d_an + margin > 0 (a detached tensor), so the number is comparable
between mining strategies and falls as the embedding separates the classes. Anchors without a positive
or a negative in the batch are ignored; a batch without any valid triplet gives a zero loss that still
belongs to the autograd graph.
"""
import torch
import torch.nn as nn

MINING = ("batch_hard", "batch_all", "semihard")


def pairwise_distances(emb, eps=1e-12):
    """(B, D) -> (B, B) Euclidean distances. The squared distance is clamped at ``eps`` before the sqrt:
    sqrt has an infinite gradient at 0 (the diagonal, duplicate images), and clamp passes none there."""
    if emb.dtype in (torch.float16, torch.bfloat16):
        emb = emb.float()  # distances in fp32 even under autocast: 2 - 2cos loses precision in bf16
    sq_norm = (emb * emb).sum(1)
    sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * emb @ emb.t()
    return sq.clamp_min(eps).sqrt()


def _masks(labels):
    """Boolean (B, B) masks: positive pairs (same label, not self) and negative pairs (other label)."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _active_fraction(dist, pos, neg, margin):
    # (B, B, B) triplet table [a, p, n]: fine for the batch sizes used here (128^3 = 2M entries).
    valid = pos[:, :, None] & neg[:, None, :]
    active = valid & (dist[:, :, None] - dist[:, None, :] + margin > 0)
    n_valid = valid.sum()
    frac = active.sum().float() / n_valid.clamp_min(1).float()
    return frac.detach(), valid


def _zero(emb):
    return emb.sum() * 0.0  # a zero that keeps the graph (DDP expects every step to call backward)


def batch_hard_loss(emb, labels, margin=0.2):
    dist = pairwise_distances(emb)
    pos, neg = _masks(labels)
    frac, _ = _active_fraction(dist, pos, neg, margin)
    inf = torch.finfo(dist.dtype).max
    hardest_pos = dist.masked_fill(~pos, -inf).amax(1)  # (B,)
    hardest_neg = dist.masked_fill(~neg, inf).amin(1)  # (B,)
    has_triplet = pos.any(1) & neg.any(1)
    if not has_triplet.any():
        return _zero(emb), frac
    loss = torch.relu(hardest_pos - hardest_neg + margin)[has_triplet].mean()
    return loss, frac


def batch_all_loss(emb, labels, margin=0.2):
    dist = pairwise_distances(emb)
    pos, neg = _masks(labels)
    frac, valid = _active_fraction(dist, pos, neg, margin)
    losses = torch.relu(dist[:, :, None] - dist[:, None, :] + margin)  # (B, B, B) [a, p, n]
    active = valid & (losses > 0)
    if not active.any():
        return _zero(emb), frac
    return losses[active].mean(), frac


def semihard_loss(emb, labels, margin=0.2):
    dist = pairwise_distances(emb)
    pos, neg = _masks(labels)
    frac, valid = _active_fraction(dist, pos, neg, margin)
    d_ap = dist[:, :, None]  # (B, B, 1) [a, p]
    d_an = dist[:, None, :]  # (B, 1, B) [a, n]
    inf = torch.finfo(dist.dtype).max
    farther = valid & (d_an > d_ap)  # (B, B, B): negatives beyond the positive
    closest_farther = d_an.expand_as(farther).masked_fill(~farther, inf).amin(2)  # (B, B)
    # fallback when no negative is farther than the positive: the farthest (least hard) negative
    farthest_neg = dist.masked_fill(~neg, -inf).amax(1)  # (B,)
    chosen = torch.where(farther.any(2), closest_farther, farthest_neg[:, None].expand_as(dist))
    pairs = pos & neg.any(1)[:, None]  # anchor-positive pairs that have at least one negative
    if not pairs.any():
        return _zero(emb), frac
    loss = torch.relu(dist - chosen + margin)[pairs].mean()
    return loss, frac


_LOSSES = {"batch_hard": batch_hard_loss, "batch_all": batch_all_loss, "semihard": semihard_loss}


def triplet_loss(emb, labels, margin=0.2, mining="batch_hard"):
    """Triplet loss of (B, D) embeddings with (B,) integer labels -> (loss, active_fraction)."""
    if mining not in _LOSSES:
        raise ValueError(f"unknown mining {mining!r}; choose one of {', '.join(MINING)}")
    return _LOSSES[mining](emb, labels, margin)


class TripletLoss(nn.Module):
    def __init__(self, margin=0.2, mining="batch_hard"):
        super().__init__()
        if mining not in _LOSSES:
            raise ValueError(f"unknown mining {mining!r}; choose one of {', '.join(MINING)}")
        self.margin, self.mining = margin, mining

    def forward(self, emb, labels):
        return triplet_loss(emb, labels, self.margin, self.mining)

    def extra_repr(self):
        return f"margin={self.margin}, mining={self.mining}"
