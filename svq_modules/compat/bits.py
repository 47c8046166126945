"""The seed's bit arguments (``n_bit_baselayer``, ``n_bits_proposal``) turned into core layer tables.

Conventions accepted (see :func:`svq_modules.compat.encode_layers`):

* README style: the full list, base first, in ``n_bit_baselayer``
  (``[4, 2, 2, 2, 2]``), ``n_bits_proposal`` unset;
* package style: ``n_bit_baselayer`` an int (default 4) and ``n_bits_proposal``
  a list of enhancement widths (default ``[2, 2, 2, 2]``), an int (that many
  bits per layer until every leaf is reached) or a seed callable
  ``f(n_bit_baselayer, node_codes, quantized_data) -> widths`` (base included);
* core strategies: ``n_bits_proposal`` a name or ``f(hierarchy, num_listed)``,
  which choose the base width too (``n_bit_baselayer`` unset).

Lists and ints are checked by :func:`svq_modules.validation.check_bit_proposal`,
base widths and limits by :func:`svq_modules.validation.check_int`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from ..hierarchy import Hierarchy
from ..layers import LayerTables
from ..layers import build_layers as build_layer_tables
from ..tree import node_depth, scan_to_marked
from ..validation import MAX_LAYER_BITS, check_bit_proposal, check_int

__all__ = ["NBitsProposal", "DEFAULT_BASE_BITS", "DEFAULT_PROPOSAL", "resolve_tables", "seed_prefix_codes"]

SeedProposal = Callable[[int, Tensor, Tensor], Sequence[int]]
CoreProposal = Callable[[Hierarchy, int], Sequence[int]]
NBitsProposal = Union[int, Sequence[int], str, SeedProposal, CoreProposal]

DEFAULT_BASE_BITS = 4
DEFAULT_PROPOSAL = (2, 2, 2, 2)


def _bits_list(value: Any) -> list | None:
    """``value`` as a Python list if it is a sequence of widths (list, tuple, 1-D tensor / array), else None."""
    if isinstance(value, (str, bytes)) or callable(value):
        return None
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return value.tolist() if value.ndim == 1 else None
    return list(value) if isinstance(value, Sequence) else None


def _checked(bits: Any, num_layers: Any, name: str) -> tuple[Any, int | None]:
    """:func:`check_bit_proposal` (functional-API rules), its message prefixed with the argument's name."""
    try:
        return check_bit_proposal(bits, num_layers, need_num_layers=False)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _callable_arity(fn: Callable) -> int | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


def seed_prefix_codes(hierarchy: Hierarchy, base_tables: LayerTables, n_bit_baselayer: int) -> Tensor:
    """Prefix codes of the nodes below the base cut, as the seed hands them to a proposal.

    A base node with symbol ``s`` gets ``(1 << b0) | s``; a left child
    ``2 * code(parent)``, a right child ``2 * code(parent) + 1`` (so the bit
    length minus one is the depth in bits). Returns ``[K + m]`` int64: the K
    leaves first (by codeword index), then the m internal nodes below the base
    cut in merge order. Loops once per tree level (at most 62).
    """
    num_leaves, num_nodes = hierarchy.num_leaves, hierarchy.num_nodes
    device = hierarchy.device
    code = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
    base = base_tables.members[0]
    base = base[base >= 0]
    if base.numel() == 0:  # K == 1
        base = torch.tensor([hierarchy.root], device=device)
    code[base] = (1 << n_bit_baselayer) | torch.arange(base.numel(), device=device)
    depth = node_depth(hierarchy.parent)
    below_base, found, _ = scan_to_marked(hierarchy.parent, code >= 0)
    rel = torch.where(found, depth - depth[below_base], 0)
    if int(rel.max()) + n_bit_baselayer > 62:
        raise ValueError(
            "n_bits_proposal: the tree is too deep for the seed's 64-bit prefix codes "
            f"({int(rel.max())} levels below the base layer); pass a list of bits instead"
        )
    frontier = base
    while True:
        frontier = frontier[frontier >= num_leaves]
        if frontier.numel() == 0:
            break
        kids = hierarchy.children[frontier - num_leaves]
        code[kids[:, 0]] = code[frontier] * 2
        code[kids[:, 1]] = code[frontier] * 2 + 1
        frontier = kids.reshape(-1)
    internal = torch.arange(num_leaves, num_nodes, device=device)
    internal = internal[code[internal] >= 0]
    return torch.cat([code[:num_leaves], code[internal]])


def _tables_until_leaves(hierarchy: Hierarchy, base: int, step: int, cut: str) -> LayerTables:
    """``[base, step, step, ...]`` with as many layers as it takes to reach every leaf (no empty final layer)."""
    depth_bits = max(1, math.ceil(math.log2(max(2, hierarchy.num_leaves))))
    repeats = max(1, math.ceil(depth_bits / step))
    while True:
        tables = build_layer_tables(hierarchy, [base] + [step] * repeats, cut=cut)
        if int(tables.widths[-1]) == 0:  # the final catch-all layer had nothing left to do
            sent = (tables.leaf_symbol >= 0).any(dim=1)
            last = int(sent.nonzero().max()) if bool(sent.any()) else 0
            return LayerTables(**{k: v[: last + 1] for k, v in tables.as_dict().items()})
        repeats *= 2


def _seed_callable_widths(
    proposal: SeedProposal, hierarchy: Hierarchy, indices: Tensor, base: int, cut: str, num_layers: int | None
) -> list[int]:
    """Widths a seed-style callable returns (base layer's included), checked."""
    base_tables = build_layer_tables(hierarchy, [base], cut=cut)
    codes = seed_prefix_codes(hierarchy, base_tables, base)
    returned = proposal(base, codes, indices)
    widths = _bits_list(returned)
    if widths is None:
        raise ValueError(
            f"n_bits_proposal: the callable must return a list of widths (base layer first) such as [4, 2, 2], got {returned!r}"
        )
    return _checked(widths, num_layers, "n_bits_proposal (what the callable returned)")[0]


def resolve_tables(
    hierarchy: Hierarchy,
    indices: Tensor,
    n_bit_baselayer: Any,
    n_bits_proposal: Any,
    cut: str,
    num_layers: Any,
) -> LayerTables:
    """Core :class:`~svq_modules.layers.LayerTables` for the seed's / the README's bit arguments.

    Args:
        hierarchy: the merge tree of the codebook.
        indices: ``[N]`` int64 codeword indices (handed to seed callables).
        n_bit_baselayer, n_bits_proposal, cut, num_layers: as given to
            :func:`svq_modules.compat.encode_layers`.

    Raises:
        ValueError: one line naming the bad argument and what is allowed.
    """
    full = _bits_list(n_bit_baselayer)
    if full is not None:  # README style: the whole list in 4th position
        if n_bits_proposal is not None:
            raise ValueError(
                "pass either a full bits list as the 4th argument (README style, e.g. [4, 2, 2, 2, 2]) "
                "or n_bit_baselayer + n_bits_proposal (package style), not both"
            )
        bits, num_layers = _checked(full, num_layers, "n_bit_baselayer (the full bits list)")
        return build_layer_tables(hierarchy, bits, cut=cut, num_layers=num_layers)

    proposal = DEFAULT_PROPOSAL if n_bits_proposal is None else n_bits_proposal
    if isinstance(proposal, str) or (callable(proposal) and _callable_arity(proposal) == 2):
        # core strategies choose every width, the base layer's included
        if n_bit_baselayer is not None:
            raise ValueError(
                f"n_bits_proposal={proposal!r} chooses the base layer's width too; leave n_bit_baselayer unset"
            )
        bits, num_layers = _checked(proposal, num_layers, "n_bits_proposal")
        return build_layer_tables(hierarchy, bits, cut=cut, num_layers=num_layers)

    base = DEFAULT_BASE_BITS
    if n_bit_baselayer is not None:
        base = check_int(n_bit_baselayer, "n_bit_baselayer", min=1, max=MAX_LAYER_BITS)
    if num_layers is not None:
        num_layers = check_int(num_layers, "num_layers (base layer + final layer at least)", min=2)
    if callable(proposal):
        widths = _seed_callable_widths(proposal, hierarchy, indices, base, cut, num_layers)
        return build_layer_tables(hierarchy, widths, cut=cut, num_layers=num_layers)
    enhancement = _bits_list(proposal)
    if enhancement is not None:  # enhancement widths after the base layer; [] = base + final only
        if enhancement:
            _checked(enhancement, None, "n_bits_proposal")
        bits, num_layers = _checked([base] + enhancement, num_layers, "n_bits_proposal (after n_bit_baselayer)")
        return build_layer_tables(hierarchy, bits, cut=cut, num_layers=num_layers)
    step, _ = _checked(proposal, None, "n_bits_proposal")
    if not isinstance(step, int):
        raise ValueError(f"n_bits_proposal must be an int, a list of ints, a name or a callable, got {proposal!r}")
    if num_layers is not None:
        return build_layer_tables(hierarchy, [base] + [step] * (num_layers - 2), cut=cut, num_layers=num_layers)
    return _tables_until_leaves(hierarchy, base, step, cut)
