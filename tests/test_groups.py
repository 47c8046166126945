"""Per-group batching (:mod:`svq_modules.groups`): ranks among equal keys, pieces, padded batches."""

import pytest
import torch

from svq_modules.groups import piece_batches, rank_in_runs, split_pieces


def test_rank_in_runs_counts_from_zero_in_every_run_of_equal_keys():
    assert rank_in_runs(torch.tensor([3, 3, 5, 7, 7, 7])).tolist() == [0, 1, 0, 0, 1, 2]
    assert rank_in_runs(torch.tensor([], dtype=torch.long)).tolist() == []
    keys = torch.randint(0, 9, (500,), generator=torch.Generator().manual_seed(0)).sort().values
    expected = [sum(1 for j in range(i) if keys[j] == keys[i]) for i in range(keys.numel())]  # brute force
    assert rank_in_runs(keys).tolist() == expected


@pytest.mark.parametrize("max_rows", [1, 3, 64])
def test_split_pieces_cuts_every_group_into_short_runs_in_the_asked_order(max_rows):
    g = torch.Generator().manual_seed(1)
    row_group = torch.randint(0, 7, (300,), generator=g)
    group_rank = torch.randperm(7, generator=g)
    pieces = split_pieces(row_group, group_rank, max_rows)
    # every row exactly once, groups in the order of group_rank, rows of a group in their original order
    assert sorted(pieces.order.tolist()) == list(range(300))
    ranks = group_rank[row_group[pieces.order]]
    assert bool((ranks[1:] >= ranks[:-1]).all())
    for start, length, group in zip(pieces.start.tolist(), pieces.length.tolist(), pieces.group.tolist()):
        rows = pieces.order[start : start + length]
        assert 1 <= length <= max_rows
        assert bool((row_group[rows] == group).all())
        assert bool((rows[1:] > rows[:-1]).all())
    # a piece is cut short only at the end of its group
    sizes = torch.bincount(row_group, minlength=7)
    per_group = torch.zeros(7, dtype=torch.long).index_add_(0, pieces.group, torch.ones_like(pieces.group))
    assert torch.equal(per_group, (sizes + max_rows - 1) // max_rows)


def test_piece_batches_cover_the_pieces_in_order_within_the_budget():
    height = torch.tensor([8, 8, 5, 4, 4, 2, 1, 1])
    width = torch.tensor([9, 7, 7, 6, 3, 3, 2, 1])
    batches = list(piece_batches(height, width, block_elements=100, extra=1))
    assert batches[0][0] == 0 and batches[-1][1] == 8
    for (first, last, rows, cols), nxt in zip(batches, [*batches[1:], None]):
        assert (rows, cols) == (int(height[first]), int(width[first]))  # padded to the first piece
        assert last > first
        assert (last - first) == 1 or (last - first) * rows * (cols + 1) <= 100  # over budget only when alone
        if nxt is not None:
            assert nxt[0] == last
