"""The shared KV cache: written only by the AR view, for committed tokens.

One preallocated tensor per K and V, shaped [layers, rows, kv_heads, max_len, head_dim], and one
length per row. Slots at and past a row's length are scratch: a forward pass writes its block
there before attending (so the block sees itself), and the length moves only when tokens are
committed. Rejected drafts are "cropped" by not advancing the length; the next pass overwrites
them. The diffusion view's block also lands in that scratch and is overwritten by the verify
pass over the same positions, so drafting costs one block of K/V whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import kernels
from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long)  # committed tokens per row (host side)
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def window(self, rows: torch.Tensor, num_tokens: int, bidirectional: bool) -> "CacheWindow":
        """Prepare a forward of `num_tokens` new tokens for `rows`, each starting at its length.

        Causal (AR view): token t sees the context and block tokens 0..t. Bidirectional
        (diffusion view): every block token sees the context and the whole block.
        """
        start = self.lengths[rows]
        positions = start[:, None] + torch.arange(num_tokens)
        end = int(start.max()) + num_tokens
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        limits = positions + 1 if not bidirectional else (start + num_tokens)[:, None].expand_as(positions)
        if kernels.usable(self.k, positions.numel()):
            # Few query rows on CPU: the batch-invariant kernels copy K/V by row and start and read
            # each row's keys [0, limit) in place: no mask, no index tensors, no gather.
            return CacheWindow(self, rows.to(self.k.device), positions.to(self.k.device), end, None, False, (), limits)
        mask = None
        if not bool((limits == end).all()):
            mask = (torch.arange(end) < limits[..., None])[:, None].to(self.k.device)  # [N, 1, T, S]
        every_row = len(rows) == self.k.shape[1] and bool((rows == torch.arange(len(rows))).all())
        rows, positions = rows.to(self.k.device), positions.to(self.k.device)
        heads = torch.arange(self.k.shape[2], device=self.k.device)
        slots = (rows[:, None, None], heads[None, :, None], positions[:, None, :])  # where [N, H, T] K/V go
        return CacheWindow(self, rows, positions, end, mask, every_row, slots, None)


@dataclass
class CacheWindow:
    """What one forward pass sees of the cache: where it writes and how far it reads."""

    cache: KVCache
    rows: torch.Tensor  # [N] row indices
    positions: torch.Tensor  # [N, T] absolute positions
    end: int  # keys read: slots [0, end)
    mask: torch.Tensor | None  # [N, 1, T, end] boolean, None when every key is visible
    in_place: bool  # all cache rows in order: attend through a view, no gather of rows
    slots: tuple[torch.Tensor, ...]  # index of this pass's K/V in a layer's cache, shared by all layers
    limits: torch.Tensor | None  # [N, T] query t of row n sees keys [0, limit); set when the kernel attends

    @property
    def attend(self) -> Callable | None:
        """The model's attention hook: the few-row kernel over cache rows in place, or None (SDPA + mask)."""
        if self.limits is None:
            return None
        return lambda q, keys, values: kernels.attend(q, keys, values, self.rows, self.limits)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's K/V ([N, kv_heads, T, D]) and return the keys/values to attend to."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if self.limits is not None:  # the kernel path: plain copies, and the kernel reads the rows in place
            kernels.write_cache(kc, vc, k, v, self.rows, self.positions[:, 0])
            return kc, vc
        kc.index_put_(self.slots, k)
        vc.index_put_(self.slots, v)
        if self.in_place:
            return kc[:, :, : self.end], vc[:, :, : self.end]
        return kc[self.rows, :, : self.end], vc[self.rows, :, : self.end]
