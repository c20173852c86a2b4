"""The CPU decode-attention kernel against PyTorch's attention over each row's own keys."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from components.decode_attention import decode_attention


def _reference(q, k, v, slots, seen):
    """(D, nh, hs): SDPA of each query over its slot's first `seen` keys, one row at a time."""
    rows = [F.scaled_dot_product_attention(q[d][:, None], k[s, :, :n], v[s, :, :n])[:, 0]
            for d, (s, n) in enumerate(zip(slots, seen))]
    return torch.stack(rows)


@pytest.mark.parametrize("hs", [32, 64, 7])
def test_each_query_attends_over_its_own_slot_up_to_its_own_length(hs):
    torch.manual_seed(hs)
    S, nh, C = 6, 3, 40
    k, v = torch.randn(S, nh, C, hs) * 3, torch.randn(S, nh, C, hs)
    # rows out of slot order, a slot left out, one key only, the whole capacity
    slots = np.array([4, 0, 5, 2, 1], dtype=np.int64)
    seen = np.array([1, 40, 17, 33, 2], dtype=np.int64)
    q = torch.randn(len(slots), nh, hs) * 3
    got = decode_attention(q, k, v, slots, seen)
    assert got.shape == (5, nh, hs) and got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(q, k, v, slots, seen), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], v[4, :, 0])  # one key: its value, exactly


def test_keys_past_a_rows_length_and_other_slots_do_not_reach_it():
    torch.manual_seed(1)
    k, v = torch.randn(3, 2, 16, 32), torch.randn(3, 2, 16, 32)
    q = torch.randn(1, 2, 32)
    slots, seen = np.array([1], dtype=np.int64), np.array([9], dtype=np.int64)
    before = decode_attention(q, k, v, slots, seen)
    k[1, :, 9:], v[1, :, 9:] = float("nan"), float("nan")  # past its length
    k[[0, 2]], v[[0, 2]] = 1e30, 1e30  # the other slots
    assert torch.equal(decode_attention(q, k, v, slots, seen), before)


def test_a_row_gives_the_same_bits_alone_and_among_other_rows():
    """What a seeded request's sameness alone and in company rests on: no batch-size-dependent sums."""
    torch.manual_seed(2)
    k, v = torch.randn(8, 4, 64, 32), torch.randn(8, 4, 64, 32)
    q = torch.randn(8, 4, 32)
    slots, seen = np.arange(8, dtype=np.int64), np.array([5, 64, 30, 1, 12, 50, 63, 2], dtype=np.int64)
    together = decode_attention(q, k, v, slots, seen)
    for d in range(8):
        alone = decode_attention(q[d: d + 1], k, v, slots[d: d + 1], seen[d: d + 1])
        assert torch.equal(alone[0], together[d])


def test_large_scores_do_not_overflow():
    k = torch.full((1, 1, 4, 32), 30.0)
    k[0, 0, 2] = 31.0
    v = torch.arange(4.0)[None, None, :, None].expand(1, 1, 4, 32).contiguous()
    q = torch.full((1, 1, 32), 30.0)  # scores of ~5000: exp overflows unless the maximum comes off first
    got = decode_attention(q, k, v, np.array([0]), np.array([4]))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 0], torch.full((32,), 2.0))  # softmax all but one-hot on key 2


@pytest.mark.parametrize("slots, seen, match", [
    ([3], [1], "out of range for a cache of 2 slots of 8 positions"),
    ([0], [9], "out of range"),
    ([0], [0], "out of range"),
    ([0, 1], [1], "do not match"),
])
def test_out_of_range_slots_and_lengths_are_refused_before_the_kernel_reads(slots, seen, match):
    k = v = torch.zeros(2, 1, 8, 4)
    q = torch.zeros(len(slots), 1, 4)
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, np.array(slots, dtype=np.int64), np.array(seen, dtype=np.int64))
