"""The paged KV cache: block accounting (``BlockManager``, on the scheduler's side) and the blocks' tensors
(``KvStorage``, on every tensor-parallel rank).

As TensorRT-LLM's KV cache manager (reference/trtllm-serving-features.md §3, trtllm-checkpoint-and-build.md §6): a
primary pool of ``tokens_per_block``-token blocks, handed to a sequence one block at a time as it grows; with reuse
on, full blocks are cached in a ``PrefixTree`` and an unreferenced cached block counts as free (it is evicted, least
recently used leaf first, when a new block is needed). With a host pool (``kv_cache_host_memory_bytes``) an evicted
block is copied there instead of being dropped, stays reusable, and is copied back (onboarded) when a request reuses
it. The counters are the C++ backend's ``nv_trt_llm_kv_cache_block_metrics``: ``reused`` blocks found in the cache,
``alloc_new`` blocks newly allocated, ``alloc_total`` both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from yitrt.reference.engine.prefix_tree import Node, PrefixTree

if TYPE_CHECKING:
    import torch

#: a copy between the pools that every rank makes before the step's forward: (kind, source block, target block)
Copy = tuple[str, int, int]


class NoFreeBlock(Exception):
    """Every primary block is referenced by a running sequence."""


def blocks_for(tokens: int, tokens_per_block: int) -> int:
    """Blocks that hold ``tokens`` cached tokens."""
    return -(-tokens // tokens_per_block)


@dataclass
class BlockCounters:
    """Running counts since start (TensorRT-LLM's KvCacheStats: reusedBlocks, allocNewBlocks, allocTotalBlocks)."""

    reused: int = 0
    alloc_new: int = 0
    alloc_total: int = 0


class BlockManager:
    """Which primary (and host) block holds what, who references it, and what is cached for reuse."""

    def __init__(self, primary_blocks: int, host_blocks: int, tokens_per_block: int, reuse: bool) -> None:
        if primary_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.primary_blocks, self.host_blocks = primary_blocks, host_blocks
        self.tokens_per_block, self.reuse = tokens_per_block, reuse
        self.tree = PrefixTree(tokens_per_block)
        self._free = list(range(primary_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self._host_free = list(range(host_blocks - 1, -1, -1))
        self._refs = [0] * primary_blocks
        self._node: list[Node | None] = [None] * primary_blocks  # the cached block a primary block holds, if any
        self._cached_idle: set[Node] = set()  # cached primary blocks nobody references (free for allocation)
        self._host_nodes: set[Node] = set()
        self.counters = BlockCounters()
        self.clock = 0

    # ---- what the scheduler asks ----
    def free_blocks(self) -> int:
        """Blocks a new allocation can get: never used, or cached and unreferenced (evictable)."""
        return len(self._free) + len(self._cached_idle)

    def used_blocks(self) -> int:
        """Blocks referenced by sequences."""
        return self.primary_blocks - self.free_blocks()

    def match(self, tokens: list[int], logits_from: int | None = None, adapter: int | None = None) -> list[Node]:
        """Cached blocks a sequence with ``tokens`` under LoRA task ``adapter`` (None: none) can reuse: its full blocks
        before the first position whose logits must be computed (``logits_from``; default the last token), computed
        under the same task. Empty when reuse is off."""
        if not self.reuse:
            return []
        first = len(tokens) - 1 if logits_from is None else logits_from
        return self.tree.match(tokens, first // self.tokens_per_block, adapter)

    def resident_idle(self, nodes: list[Node]) -> tuple[int, int]:
        """(nodes in the primary pool, of which unreferenced): what reusing ``nodes`` costs in free blocks."""
        resident = [n for n in nodes if not n.on_host]
        return len(resident), sum(1 for n in resident if n in self._cached_idle)

    # ---- changes ----
    def acquire(self, nodes: list[Node], copies: list[Copy]) -> list[int]:
        """Reference reused blocks for a sequence (onboarding those on the host); returns their primary blocks."""
        self.clock += 1
        out, keep = [], frozenset(nodes)  # onboarding one must not evict a later one of the same chain
        for node in nodes:
            if node.on_host:
                self._onboard(node, copies, keep)
            self._cached_idle.discard(node)
            self._refs[node.block] += 1
            node.last_used = self.clock
            out.append(node.block)
        self.counters.reused += len(nodes)
        self.counters.alloc_total += len(nodes)
        return out

    def allocate(self, copies: list[Copy], protect: frozenset[Node] = frozenset()) -> int:
        """A new primary block for a sequence (evicting an idle cached block if none is free).

        Raises:
            NoFreeBlock: every block is referenced.
        """
        block = self._take(copies, protect)
        self._refs[block] = 1
        self.counters.alloc_new += 1
        self.counters.alloc_total += 1
        return block

    def release(self, table: list[int]) -> None:
        """A sequence lets go of its blocks: private ones become free, cached ones stay cached (idle)."""
        self.clock += 1
        for block in table:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                node = self._node[block]
                if node is None:
                    self._free.append(block)
                else:
                    node.last_used = self.clock
                    self._cached_idle.add(node)

    def commit(self, parent: Node | None, key: tuple[int, ...], block: int, adapter: int | None = None) -> Node:
        """A sequence's block ``block`` is full: cache it after ``parent`` (None: as a first block under LoRA task
        ``adapter``) and return its node — or, when the same block is cached already (computed by another sequence
        meanwhile), return that node and keep ``block`` private (values are identical either way)."""
        existing = self.tree.child(parent, key, adapter)
        if existing is not None:
            return existing
        node = self.tree.insert(parent, key, block, self.clock, adapter)
        self._node[block] = node
        return node

    # ---- internals ----
    def _take(self, copies: list[Copy], protect: frozenset[Node]) -> int:
        if self._free:
            return self._free.pop()
        victim = self._lru(n for n in self._cached_idle
                           if n not in protect and not any(not c.on_host for c in n.children.values()))
        if victim is None:
            raise NoFreeBlock
        block = victim.block
        self._cached_idle.discard(victim)
        self._node[block] = None
        if self.host_blocks and self._host_room(protect):
            host = self._host_free.pop()
            copies.append(("offload", block, host))
            victim.block, victim.on_host = host, True
            self._host_nodes.add(victim)
        else:
            self._drop(victim)
        return block

    def _host_room(self, protect: frozenset[Node]) -> bool:
        """A free host block, dropping the least recently used host leaf if needed."""
        if self._host_free:
            return True
        victim = self._lru(n for n in self._host_nodes if not n.children and n not in protect)
        if victim is None:
            return False
        self._host_nodes.discard(victim)
        self._host_free.append(victim.block)
        self.tree.remove(victim)
        return True

    def _drop(self, node: Node) -> None:
        # a primary leaf may still have host children: they lose their prefix, so they go too
        for child in list(node.children.values()):
            self._drop(child)
        if node.on_host:
            self._host_nodes.discard(node)
            self._host_free.append(node.block)
        self.tree.remove(node)

    def _onboard(self, node: Node, copies: list[Copy], protect: frozenset[Node]) -> None:
        block = self._take(copies, protect)
        copies.append(("onboard", node.block, block))
        self._host_nodes.discard(node)
        self._host_free.append(node.block)
        node.block, node.on_host = block, False
        self._node[block] = node

    @staticmethod
    def _lru(candidates) -> Node | None:
        return min(candidates, key=lambda n: n.last_used, default=None)


class KvStorage:
    """One rank's KV blocks: per layer, keys and values of ``[blocks, tokens_per_block, kv_heads, head_size]``."""

    def __init__(self, layers: int, primary_blocks: int, host_blocks: int, tokens_per_block: int, kv_heads: int,
                 head_size: int, dtype: torch.dtype, device: torch.device, scratch_tokens: int = 0) -> None:
        import torch  # here: the block accounting above is imported by deploy, which has no torch to spare

        # scratch slots (lookahead's tree rows) follow the pool's blocks: slot primary_blocks × tokens_per_block + i
        shape = (primary_blocks + blocks_for(scratch_tokens, tokens_per_block), tokens_per_block, kv_heads, head_size)
        host_shape = (host_blocks, tokens_per_block, kv_heads, head_size)
        # zeros: pages are committed only when written (a pool much larger than what runs costs address space only)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.host_keys = [torch.zeros(host_shape, dtype=dtype) for _ in range(layers)] if host_blocks else []
        self.host_values = [torch.zeros(host_shape, dtype=dtype) for _ in range(layers)] if host_blocks else []
        self.tokens_per_block = tokens_per_block

    def copy(self, copies: list[Copy]) -> None:
        """Move blocks between the pools, in order (an offload frees the primary block a later copy may fill)."""
        for kind, source, target in copies:
            for layer in range(len(self.keys)):
                if kind == "offload":
                    self.host_keys[layer][target] = self.keys[layer][source].cpu()
                    self.host_values[layer][target] = self.values[layer][source].cpu()
                else:
                    self.keys[layer][target] = self.host_keys[layer][source].to(self.keys[layer].device)
                    self.values[layer][target] = self.host_values[layer][source].to(self.values[layer].device)

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values as ``[slots, kv_heads, head_size]`` (slot = block × tokens_per_block + i)."""
        k, v = self.keys[layer], self.values[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])
