"""A radix tree over token ids recording which llama.cpp sequence's KV holds which prefix.

Every sequence slot that holds KV (running or kept as cache after its request ended) registers its tokens;
`longest_match(prompt)` walks the tree once and returns how many leading tokens of the prompt some slot
already holds, and which slots hold them. Edges are compressed (a node stores a run of tokens), so a lookup
costs O(prompt length) token comparisons plus O(depth) dictionary steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class _Node:
    edge: list[int]
    children: dict[int, _Node] = field(default_factory=dict)
    # Slots whose registered tokens pass through the end of this node's edge (or end inside it).
    holders: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class PrefixMatch:
    length: int
    holders: frozenset[int]


class RadixTree:
    def __init__(self) -> None:
        self._root = _Node([])
        self._registered: dict[int, list[int]] = {}

    def tokens_of(self, slot: int) -> list[int]:
        return self._registered.get(slot, [])

    def insert(self, slot: int, tokens: Sequence[int]) -> None:
        """Registers `tokens` as held by `slot` (replacing what it held before)."""
        if slot in self._registered:
            self.remove(slot)
        tokens = list(tokens)
        self._registered[slot] = tokens
        node, i = self._root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                child = _Node(tokens[i:])
                node.children[tokens[i]] = child
                child.holders.add(slot)
                return
            common = _common_length(child.edge, tokens, i)
            if common < len(child.edge):
                self._split(node, child, common)
                child = node.children[tokens[i]]
            child.holders.add(slot)
            node, i = child, i + common

    @staticmethod
    def _split(parent: _Node, child: _Node, at: int) -> None:
        head = _Node(child.edge[:at], holders=set(child.holders))
        child.edge = child.edge[at:]
        head.children[child.edge[0]] = child
        parent.children[head.edge[0]] = head

    def remove(self, slot: int) -> None:
        tokens = self._registered.pop(slot, None)
        if not tokens:
            return
        node, i = self._root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                return
            child.holders.discard(slot)
            if not child.holders:
                del node.children[tokens[i]]  # nothing below is held by anyone else either
                return
            node, i = child, i + len(child.edge)

    def longest_match(self, prompt: Sequence[int]) -> PrefixMatch:
        """The longest prefix of `prompt` that registered slots hold, and the slots holding all of it."""
        node, i = self._root, 0
        best = PrefixMatch(0, frozenset())
        while i < len(prompt):
            child = node.children.get(prompt[i])
            if child is None:
                break
            common = _common_length(child.edge, prompt, i)
            best = PrefixMatch(i + common, frozenset(child.holders))
            if common < len(child.edge):
                break
            node, i = child, i + common
        return best

    def match_lengths(self, prompt: Sequence[int]) -> dict[int, int]:
        """For every slot sharing a prefix with `prompt`, how many leading tokens it shares."""
        lengths: dict[int, int] = {}
        node, i = self._root, 0
        while i < len(prompt):
            child = node.children.get(prompt[i])
            if child is None:
                break
            common = _common_length(child.edge, prompt, i)
            for slot in child.holders:  # deeper nodes hold subsets: later values are longer
                lengths[slot] = i + common
            if common < len(child.edge):
                break
            node, i = child, i + common
        return lengths

    def registered_prefixes(self, prompt: Sequence[int]) -> list[tuple[int, int]]:
        """(length, slot) for every slot whose whole registered token list is a prefix of `prompt`.

        Each registered list ends exactly at a node boundary (insert splits edges there), so the walk
        only checks holders whose length equals the depth reached.
        """
        found: list[tuple[int, int]] = []
        node, i = self._root, 0
        while i < len(prompt):
            child = node.children.get(prompt[i])
            if child is None:
                break
            common = _common_length(child.edge, prompt, i)
            if common < len(child.edge):
                break
            i += common
            found.extend((i, slot) for slot in child.holders if len(self._registered[slot]) == i)
            node = child
        return found


def _common_length(edge: list[int], tokens: Sequence[int], offset: int) -> int:
    limit = min(len(edge), len(tokens) - offset)
    n = 0
    while n < limit and edge[n] == tokens[offset + n]:
        n += 1
    return n
