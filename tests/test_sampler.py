"""PKSampler: batch composition, epoch length, determinism, ranks, replacement, errors."""
import warnings

import numpy as np
import pytest
import torch

from dataset import PKSampler

# 12 images: class 0 has 6 (indices 0-5), class 1 has 4 (6-9), class 2 has 2 (10, 11)
LABELS = np.array([0] * 6 + [1] * 4 + [2] * 2)


def test_batches_hold_p_distinct_classes_of_k():
    s = PKSampler(LABELS, p=2, k=2, seed=0)
    batches = list(s)
    assert len(s) == len(batches) == 3  # ceil(12 / (2 * 2))
    for b in batches:
        assert len(b) == 4 and all(isinstance(i, int) for i in b)
        classes = LABELS[b]
        assert classes[0] == classes[1] and classes[2] == classes[3] and classes[0] != classes[2]


def test_classes_cycle_through_their_images():
    s = PKSampler(LABELS, p=3, k=2, seed=3)  # every batch has all three classes
    assert len(s) == 2  # ceil(12 / 6)
    s.num_batches = 3
    batches = list(s)
    class0 = [i for b in batches for i in b if LABELS[i] == 0]
    assert sorted(class0) == [0, 1, 2, 3, 4, 5]  # 3 batches x 2 = 6: each image exactly once
    class1 = [i for b in batches[:2] for i in b if LABELS[i] == 1]
    assert sorted(class1) == [6, 7, 8, 9]  # not cut short: batch 3 starts a new pass
    assert all(len(b) == 6 for b in batches)


def test_deterministic_per_seed_and_epoch():
    a = PKSampler(LABELS, 2, 2, num_batches=5, seed=1)
    b = PKSampler(LABELS, 2, 2, num_batches=5, seed=1)
    assert list(a) == list(b) == list(a)  # iterating again replays the epoch
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(PKSampler(LABELS, 2, 2, num_batches=5, seed=2)) != first


def test_ranks_draw_different_batches_that_together_equal_one_process():
    r0 = PKSampler(LABELS, 2, 2, seed=0, rank=0, world_size=2)
    r1 = PKSampler(LABELS, 2, 2, seed=0, rank=1, world_size=2)
    assert len(r0) == len(r1) == 2  # ceil(12 / (2 * 2 * 2))
    b0, b1 = list(r0), list(r1)
    assert b0 != b1
    single = list(PKSampler(LABELS, 2, 2, num_batches=4, seed=0))
    assert single == [b0[0], b1[0], b0[1], b1[1]]


def test_small_class_drawn_with_replacement_and_one_warning():
    with pytest.warns(UserWarning, match=r"drawn with replacement \(class 1: 4, class 2: 2\)") as rec:
        s = PKSampler(LABELS, p=3, k=5, num_batches=4, seed=0)
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warnings while sampling
        batches = list(s)
    for b in batches:
        assert len(b) == 15
        small = [i for i in b if LABELS[i] == 2]
        assert len(small) == 5 and set(small) == {10, 11}  # both images, then 3 repeats
        assert set(i for i in b if LABELS[i] == 1) == {6, 7, 8, 9}


def test_errors():
    with pytest.raises(ValueError, match=r"labels-per-batch 4 is larger than the number of classes .*\(3\)"):
        PKSampler(LABELS, p=4, k=2)
    with pytest.raises(ValueError, match=r"fewer than 2 images.*class 2: 1"):
        PKSampler(np.array([0, 0, 1, 1, 2]), p=2, k=2)
    with pytest.raises(ValueError, match=">= 1"):
        PKSampler(LABELS, p=0, k=2)
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        PKSampler(LABELS, 2, 2, rank=2, world_size=2)


def test_works_as_dataloader_batch_sampler():
    data = torch.utils.data.TensorDataset(torch.arange(12), torch.as_tensor(LABELS))
    loader = torch.utils.data.DataLoader(data, batch_sampler=PKSampler(LABELS, 3, 2, seed=0))
    batches = list(loader)
    assert len(batches) == 2
    for idx, lab in batches:
        assert torch.equal(lab, torch.as_tensor(LABELS)[idx]) and sorted(lab.tolist()) == [0, 0, 1, 1, 2, 2]
