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
from functools import cached_property

import torch

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

    def window(self, rows: torch.Tensor, num_tokens: int, bidirectional: bool,
               depths: torch.Tensor | None = None) -> "CacheWindow":
        """Prepare a forward of `num_tokens` new tokens for `rows`, written from each row's length on.

        Causal (AR view): token t sees the context and block tokens 0..t. Bidirectional
        (diffusion view): every block token sees the context and the whole block.
        `depths` [N, T] (causal only): a token tree of a chain and leaves. Token t sits at position
        length + depths[n, t] and sees the context, block tokens 0 .. depths[n, t] - 1 and itself;
        the chain's tokens have depths[n, t] == t, a leaf (an alternative to chain token d, written
        after the chain) depth d <= t.
        """
        start = self.lengths[rows]
        offsets = torch.arange(num_tokens)
        if depths is None:
            depths = offsets.expand(len(rows), -1)
        elif bidirectional or depths.shape != (len(rows), num_tokens) or not all(map(is_tree, depths.tolist())):
            raise ValueError("a tree's depths: causal, [rows, tokens], each token's ancestors the chain before it")
        positions = start[:, None] + depths
        end = int(start.max()) + num_tokens
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        limits = positions + 1 if not bidirectional else (start + num_tokens)[:, None].expand_as(positions)
        lasts = start[:, None] + offsets if not bidirectional else limits - 1
        return CacheWindow(self, rows.to(self.k.device), positions.to(self.k.device), end, limits, lasts)


def is_tree(depths: list[int]) -> bool:
    """Whether one row's depths are a chain and leaves: token t at depth t up to the deepest one, each
    later token (a leaf) at a depth no greater than its own index."""
    deepest = max(depths)
    return all(d <= t and (t >= deepest or d == t) for t, d in enumerate(depths))


@dataclass
class CacheWindow:
    """What one forward pass sees of the cache: where it writes and how far it reads. The CPU
    kernels' decoder stack takes `kernel_cache`; the plain path writes with `update` and attends
    with `mask` (both built on first use)."""

    cache: KVCache
    rows: torch.Tensor  # [N] row indices
    positions: torch.Tensor  # [N, T] absolute positions (token t is written to slot positions[n, 0] + t)
    end: int  # keys read: slots [0, end)
    limits: torch.Tensor  # [N, T] host side: query t of row n sees keys [0, limit) ...
    lasts: torch.Tensor  # [N, T] host side: ... the last one read from this slot (limit - 1 but in a tree's leaves)

    @property
    def kernel_cache(self) -> tuple:
        """(k, v, rows, starts, limits, lasts): the whole cache and where this pass writes and reads."""
        return self.cache.k, self.cache.v, self.rows, self.positions[:, 0], self.limits, self.lasts

    @cached_property
    def mask(self) -> torch.Tensor | None:
        """[N, 1, T, end] boolean, None when every key is visible."""
        if bool((self.limits == self.end).all()):
            return None
        keys = torch.arange(self.end)
        visible = (keys < self.limits[..., None] - 1) | (keys == self.lasts[..., None])
        return visible[:, None].to(self.cache.k.device)

    @cached_property
    def slots(self) -> tuple[torch.Tensor, ...]:
        """Index of this pass's K/V [N, H, T] in a layer's cache, shared by all layers."""
        heads = torch.arange(self.cache.k.shape[2], device=self.cache.k.device)
        written = self.positions[:, :1] + torch.arange(self.positions.shape[1], device=self.positions.device)
        return self.rows[:, None, None], heads[None, :, None], written[:, None, :]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's K/V ([N, kv_heads, T, D]) and return the keys/values to attend to."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc.index_put_(self.slots, k)
        vc.index_put_(self.slots, v)
        if self.every_row:
            return kc[:, :, : self.end], vc[:, :, : self.end]
        return kc[self.rows, :, : self.end], vc[self.rows, :, : self.end]

    @cached_property
    def every_row(self) -> bool:
        """All cache rows in order: attend through a view, no gather of rows."""
        rows = self.rows.cpu()
        return len(rows) == self.cache.k.shape[1] and bool((rows == torch.arange(len(rows))).all())
