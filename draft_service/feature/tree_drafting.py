"""Candidate trees from the feature drafter: where each node's children are predicted from.

A node's children come from a drafter feature: the semi-AR head gives k features per forward
(offsets 0..k-1), so a node predicted from offset j < k - 1 has its children predicted from offset
j + 1 of the same forward, at no cost. Only a node at the last offset needs a forward, which feeds
its rows (and those of its ancestors not yet fed) with tree attention. With k = 1 every level is
one forward over the expanded nodes (EAGLE-2); with k = 4 a depth-4 tree costs no forward beyond
the one that every round runs (Medusa-style levels). Rows fed here are speculative: the session's
next `advance` cuts them off.
"""

from __future__ import annotations

import torch
from draft_service.feature.layer import LayerCache
from draft_service.feature.model import FeatureDraftModel
from speculum import tree


class TreeFeatures:
    """The drafter features behind one round's tree; `children_logits` is tree_growth's `expand`."""

    def __init__(self, model: FeatureDraftModel, cache: LayerCache, features: torch.Tensor):
        self.model = model
        self.cache = cache
        self.real = cache.length  # rows before the tree (all computed from target features)
        self.root_source = (features, 0)  # features: [k, D] predicted after the last real row
        self.source: dict[int, tuple[torch.Tensor, int]] = {}  # node -> (features [k, D], offset) it came from
        self.row_of: dict[int, int] = {}  # node -> its speculative row in the cache
        self.fed_features: dict[int, torch.Tensor] = {}  # fed node -> the features [k, D] its row predicts

    def root_logits(self) -> torch.Tensor:
        features, offset = self.root_source
        return self.model.logits(features[offset])

    def children_logits(self, nodes: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
        """[len(nodes), V] logits for the children of each of `nodes`."""
        for node in range(len(tokens)):
            if node not in self.source:
                self.source[node] = self.root_source if parents[node] < 0 else self._children_source(parents[node])
        last = [n for n in nodes if self.source[n][1] + 1 >= self.source[n][0].shape[0]]
        if last:
            self._feed(last, tokens, parents)
        sources = [self._children_source(n) for n in nodes]
        return self.model.logits(torch.stack([features[offset] for features, offset in sources]))

    def _children_source(self, node: int) -> tuple[torch.Tensor, int]:
        features, offset = self.source[node]
        if offset + 1 < features.shape[0]:
            return features, offset + 1
        return self.fed_features[node], 0

    def _feed(self, nodes: list[int], tokens: list[int], parents: list[int]) -> None:
        """Run the rows of `nodes` and their unfed ancestors; keep the features each predicts."""
        todo = sorted({a for n in nodes for a in tree.path_to(parents, n) if a not in self.row_of})
        cached = self.cache.length
        inputs = torch.stack([self.source[n][0][self.source[n][1]] for n in todo])
        rows = self.model.fuse(self.model.embed(torch.tensor([tokens[n] for n in todo])), inputs)
        for r, node in enumerate(todo):
            self.row_of[node] = cached + r
        visible = torch.zeros(len(todo), cached + len(todo), dtype=torch.bool)
        visible[:, : self.real] = True
        positions = []
        for r, node in enumerate(todo):
            path = tree.path_to(parents, node)
            visible[r, [self.row_of[a] for a in path]] = True
            positions.append(self.real + len(path) - 1)
        out = self.model(rows[None], self.cache, visible[None, None], torch.tensor([positions]))[0]  # [T, k, D]
        self.fed_features.update({node: out[r] for r, node in enumerate(todo)})
