"""Collectives between the tensor-parallel ranks of the reference runtime.

TensorRT-LLM all-reduces after every row-parallel GEMM and all-gathers the lm_head outputs; the reference
runtime does the same between real processes with torch.distributed (gloo, CPU tensors — device tensors are
staged through host memory, which is fine for a verification tool). A single rank uses ``LocalComm``.
"""

from __future__ import annotations

import torch


class Comm:
    """The collectives a rank needs."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks."""
        raise NotImplementedError

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate the ranks' tensors along ``dim`` in rank order."""
        raise NotImplementedError

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s tensor on every rank."""
        raise NotImplementedError


class LocalComm(Comm):
    """One rank: every collective is the identity."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t


class GlooComm(Comm):
    """Ranks in separate processes, joined by a torch.distributed gloo process group."""

    def __init__(self, rank: int, size: int, init_file: str) -> None:
        import torch.distributed as dist

        self.dist, self.rank, self.size = dist, rank, size
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        host = t.detach().to("cpu", torch.float32, copy=True).contiguous()  # gloo sums float32 on every build
        self.dist.all_reduce(host)
        return host.to(t.device, t.dtype)

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        host = t.detach().to("cpu").contiguous()
        parts = [torch.empty_like(host) for _ in range(self.size)]
        self.dist.all_gather(parts, host)
        return torch.cat(parts, dim=dim).to(t.device)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        host = t.detach().to("cpu", copy=True).contiguous()
        self.dist.broadcast(host, src)
        return host.to(t.device)

    def close(self) -> None:
        """Leave the process group."""
        self.dist.destroy_process_group()
