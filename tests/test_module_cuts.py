"""Every layer method of the core is reachable from the module: ``ScalableVQ(cut=...)``."""

import pytest
import torch

from svq_modules import ScalableVQ


@pytest.mark.parametrize("cut", ["greedy", "depth", "nested"])
def test_each_cut_builds_nested_exact_layers_through_the_module(cut):
    torch.manual_seed(0)
    x = torch.randn(3000, 3) * torch.tensor([3.0, 1.0, 0.5])
    vq = ScalableVQ(3, 128, [3, 2, 2], cut=cut)
    vq.train()
    for s in range(0, 3000, 500):
        vq(x[s : s + 500])
    vq.eval()
    assert vq.update() is True
    idx = vq.quantize(x)
    # full depth decodes the exact codeword
    assert torch.equal(vq.reconstruct(idx, vq.num_layers), vq.codebook[idx])
    # every layer's cells are unions of the next layer's cells: the layer-l node of a leaf is an
    # ancestor of (or equal to) its layer-(l+1) node
    tables, parent = vq.tables, vq.hierarchy.parent
    for l in range(vq.num_layers - 1):
        node, finer = tables.leaf_node[l], tables.leaf_node[l + 1].clone()
        for _ in range(2 * vq.codebook_size):  # walk up until every finer node reached its layer-l node
            finer = torch.where(finer == node, finer, parent[finer].clamp_min(0))
        assert torch.equal(finer, node), f"layer {l} is not nested in layer {l + 1}"
    # the base layer has at most 2**3 cells
    assert int(tables.leaf_node[0].unique().numel()) <= 8
