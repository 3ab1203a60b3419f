"""KV-cache reuse: a radix tree of full KV blocks keyed by their token ids.

TensorRT-LLM's block reuse (reference/trtllm-serving-features.md §3): a block enters the tree once all its
``tokens_per_block`` slots hold computed keys and values (during generation too, as in 1.x), a later request
reuses its longest chain of matching full blocks, and unreferenced blocks stay cached until evicted, least recently
used first and leaves only. A block's key is its own token ids under its parent's node, so two blocks with the same
tokens after different prefixes are different nodes. (TensorRT-LLM also keys by LoRA task and extra ids; the slot
serves neither yet. It reuses whole blocks only: the engine's copy-on-partial-reuse of a last, partly matching
block is not modelled.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    """One cached block.

    Attributes:
        key: the block's token ids.
        parent: the node of the block before it (the root for a sequence's first block).
        block: the block's id in the pool it is in (``on_host``: the host pool, else the primary pool).
        children: the next blocks, by key.
        last_used: the clock tick of the last request that used it (LRU eviction).
    """

    key: tuple[int, ...]
    parent: Node | None
    block: int = -1
    on_host: bool = False
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    last_used: int = 0


class PrefixTree:
    """Cached blocks of earlier requests, found by the token ids of a prompt's full blocks."""

    def __init__(self, tokens_per_block: int) -> None:
        self.tokens_per_block = tokens_per_block
        self.root = Node((), None)
        self.size = 0

    def match(self, tokens: Sequence[int], max_blocks: int) -> list[Node]:
        """The longest chain of cached blocks equal to the first full blocks of ``tokens`` (at most ``max_blocks``)."""
        b, node, found = self.tokens_per_block, self.root, []
        for i in range(min(max_blocks, len(tokens) // b)):
            node = node.children.get(tuple(tokens[i * b : (i + 1) * b]))
            if node is None:
                break
            found.append(node)
        return found

    def child(self, parent: Node | None, key: tuple[int, ...]) -> Node | None:
        """The cached block ``key`` after ``parent`` (None: after nothing, a sequence's first block)."""
        return (parent or self.root).children.get(key)

    def insert(self, parent: Node | None, key: tuple[int, ...], block: int, tick: int) -> Node:
        """Cache ``block`` (in the primary pool) as the block ``key`` after ``parent``."""
        owner = parent or self.root
        if key in owner.children:
            raise ValueError("block already cached")  # the caller reuses the existing node instead
        node = Node(key, owner, block, last_used=tick)
        owner.children[key] = node
        self.size += 1
        return node

    def remove(self, node: Node) -> None:
        """Forget a leaf block."""
        if node.children:
            raise ValueError("only a leaf block can be forgotten")
        assert node.parent is not None
        del node.parent.children[node.key]
        node.parent = None
        self.size -= 1

    def nodes(self) -> Iterator[Node]:
        """Every cached block, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
