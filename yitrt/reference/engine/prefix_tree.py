"""KV-cache reuse: a radix tree of full KV blocks keyed by their token ids.

TensorRT-LLM's block reuse (reference/trtllm-serving-features.md §3): a block enters the tree once all its
``tokens_per_block`` slots hold computed keys and values (during generation too, as in 1.x), a later request
reuses its longest chain of matching full blocks, and unreferenced blocks stay cached until evicted, least recently
used first and leaves only. A block's key is its own token ids under its parent's node, so two blocks with the same
tokens after different prefixes are different nodes. Blocks are also keyed by the LoRA task that computed them, as
TensorRT-LLM's ``BlockKey.loraTaskId`` (§2.6, §3): every task (and the base model, task None) has its own root, so a
chain never crosses from one adapter to another or to the base model — the same tokens give other keys and values
under another adapter. Like the engine, the key is the task *id*: an id re-used for another adapter while its blocks
are cached would reuse them (§2.6; the slot's adapter cache keeps the first weights of a cached id). (Extra ids are not
served; the engine's copy-on-partial-reuse of a last, partly matching block is not modelled: whole blocks only.)
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
        self.root = Node((), None)  # the base model's (no adapter)
        self.roots: dict[int | None, Node] = {None: self.root}  # LoRA task id → the root of its blocks
        self.size = 0

    def _root(self, adapter: int | None) -> Node:
        root = self.roots.get(adapter)
        if root is None:
            root = self.roots[adapter] = Node((), None)
        return root

    def match(self, tokens: Sequence[int], max_blocks: int, adapter: int | None = None) -> list[Node]:
        """The longest chain of cached blocks equal to the first full blocks of ``tokens`` (at most ``max_blocks``)
        that were computed under the LoRA task ``adapter`` (None: the base model)."""
        b, node, found = self.tokens_per_block, self.roots.get(adapter), []
        if node is None:
            return found
        for i in range(min(max_blocks, len(tokens) // b)):
            node = node.children.get(tuple(tokens[i * b : (i + 1) * b]))
            if node is None:
                break
            found.append(node)
        return found

    def child(self, parent: Node | None, key: tuple[int, ...], adapter: int | None = None) -> Node | None:
        """The cached block ``key`` after ``parent`` (None: after nothing — a sequence's first block under ``adapter``)."""
        owner = parent if parent is not None else self.roots.get(adapter)
        return None if owner is None else owner.children.get(key)

    def insert(self, parent: Node | None, key: tuple[int, ...], block: int, tick: int, adapter: int | None = None) -> Node:
        """Cache ``block`` (in the primary pool) as the block ``key`` after ``parent`` (None: a first block, under the
        LoRA task ``adapter``; a later block belongs to its parent's task)."""
        owner = parent if parent is not None else self._root(adapter)
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
        stack = [node for root in self.roots.values() for node in root.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
