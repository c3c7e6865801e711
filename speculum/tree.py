"""Candidate trees: the index arithmetic that the drafter and the verifier share.

A tree of N draft tokens is given by `parents`: parents[i] is the index of node i's parent, or -1
for the verifier's pending token (the root). Parents precede their children (parents[i] < i), so a
chain is (-1, 0, 1, ...). Rows of the verifier's pass are [pending, node 0, ..., node N-1]: node i
is row i + 1. Pure index math: no model, no sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speculum.errors import InvalidArgument

MAX_TREE_WIDTH = 8
MAX_TREE_NODES = 64


@dataclass(frozen=True)
class TreeShape:
    """How a drafter grows a candidate tree (EAGLE-2 style); the depth is the round's draft length K.

    width: children drawn for each expanded node, and nodes expanded per level (1 = a chain).
    nodes: the budget of tree nodes per round (the verifier checks nodes + 1 rows).
    """

    width: int = 1
    nodes: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.width <= MAX_TREE_WIDTH:
            raise InvalidArgument("tree.width", f"must be in [1, {MAX_TREE_WIDTH}], got {self.width}")
        if not 0 <= self.nodes <= MAX_TREE_NODES:
            raise InvalidArgument("tree.nodes", f"must be in [0, {MAX_TREE_NODES}], got {self.nodes}")

    @property
    def is_chain(self) -> bool:
        return self.width == 1

    def budget(self, depth: int) -> int:
        """Nodes allowed for a tree of `depth` levels (`nodes` unset: twice a chain's per unit of width)."""
        return self.nodes or 2 * depth * self.width


def check_parents(parents: Sequence[int]) -> None:
    """Raise InvalidArgument unless every parent is -1 or an earlier node."""
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise InvalidArgument("block.parents", f"node {i} has parent {parent}; parents must precede their children")


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node: 1 for a child of the pending token, then one more per level."""
    out: list[int] = []
    for parent in parents:
        out.append(1 if parent < 0 else out[parent] + 1)
    return out


def children(parents: Sequence[int]) -> list[list[int]]:
    """Children per row, in node order: entry 0 lists the root's, entry i + 1 node i's."""
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for node, parent in enumerate(parents):
        kids[parent + 1].append(node)
    return kids


def ancestor_mask(parents: Sequence[int]) -> torch.Tensor:
    """[N + 1, N + 1] bool: row r may attend to column c (c is r itself or one of its ancestors).

    Row and column 0 are the pending token, which every node descends from.
    """
    size = len(parents) + 1
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[:, 0] = True
    for node, parent in enumerate(parents):
        row = node + 1
        mask[row] = mask[parent + 1]
        mask[row, row] = True
    return mask


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """Nodes from the root's child down to `node` (inclusive); [] for node -1 (the root)."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def subtree_under(tokens: Sequence[int], parents: Sequence[int], token: int) -> tuple[list[int], list[int]] | None:
    """The part of a tree below the root's child holding `token`, re-rooted: (node indices, their
    new parents), or None when no root child holds it. Nodes keep their order (parents first)."""
    kids = children(parents)[0]
    top = next((node for node in kids if tokens[node] == token), None)
    if top is None:
        return None
    kept: dict[int, int] = {}  # old index -> new index
    new_parents: list[int] = []
    for node in range(top + 1, len(tokens)):
        parent = parents[node]
        if parent == top or parent in kept:
            kept[node] = len(new_parents)
            new_parents.append(-1 if parent == top else kept[parent])
    return list(kept), new_parents
