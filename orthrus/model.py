"""The dual-view decoder: a frozen Qwen3 / Llama backbone plus a diffusion-attention twin per layer.

AR view: the unchanged backbone, causal. Diffusion view: the same stack with each layer's
attention projections (and QK-norms) swapped for the `*_diff` twins, reading a block
`[anchor, MASK, ...]` bidirectionally over the AR view's cached context. Everything else
(embeddings, MLPs, layer norms, final norm, head) is shared. Parameter names follow the HF
layout, and the twins use the official Orthrus names (`q_proj_diff`, ..., `k_norm_diff`).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig

View = Literal["ar", "diffusion"]
TWIN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


class KVStore(Protocol):
    """Where a forward's keys/values go and what it attends to: the KV cache at inference
    (`cache.CacheWindow`), a plain per-layer store in training. A store may bring its own
    `attend(q, keys, values)` (training's block-sparse FlexAttention); otherwise SDPA with `mask`.
    The KV cache also offers `kernel_cache`, which the CPU kernels' decoder stack reads and writes
    in place of `update` and attention."""

    mask: torch.Tensor | None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, T, ..., dim]."""
        if kernels.usable(x, x.shape[0] * x.shape[1]) and x.is_contiguous():
            return kernels.rmsnorm(x, self.weight, self.eps)
        # Normalise in fp32 and scale in the model dtype, as HF does, so bf16 runs round alike.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin [N, T, head_dim] at the given positions [N, T]."""
        # Recomputed per call (head_dim/2 numbers): no buffer to rebuild after meta-device loading.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=positions.device) / self.head_dim
        freqs = positions[..., None].float() * (1.0 / self.theta**exponents)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, T, heads, D]; cos, sin: fp32 [N, T, D]."""
    if kernels.usable(x, x.shape[0] * x.shape[1]):
        return kernels.rope_(x, cos, sin)
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Linear(nn.Linear):
    """nn.Linear whose few-row CPU inference products run on the batch-invariant kernels
    (`orthrus.kernels`: each weight read once for all rows, every row rounded as if alone)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if kernels.usable(x, rows):
            return kernels.linear(x, self)[0]
        if x.dtype is torch.bfloat16 and x.device.type == "cpu" and rows > kernels.MAX_TOKENS and not torch.is_autocast_enabled("cpu"):
            # many rows (a prefill): aten's bf16 GEMM is slow on CPUs without AMX; MKL's fp32 one, rounded
            # once (under autocast, as in bf16 training, autocast picks the product's precision itself)
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return super().forward(x)


def project_all(x: torch.Tensor, *layers: Linear) -> list[torch.Tensor]:
    """Several projections of one input (q, k, v; gate, up): one kernel call on the CPU path."""
    if kernels.usable(x, x.numel() // x.shape[-1]):
        return kernels.linear(x, *layers)
    return [layer(x) for layer in layers]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qk_norm = cfg.qk_norm
        q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        for suffix in ("", "_diff"):  # the AR projections, then their diffusion twins
            setattr(self, "q_proj" + suffix, Linear(cfg.hidden_size, q_out, bias=cfg.attention_bias))
            setattr(self, "k_proj" + suffix, Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias))
            setattr(self, "v_proj" + suffix, Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias))
            setattr(self, "o_proj" + suffix, Linear(q_out, cfg.hidden_size, bias=False))
            if cfg.qk_norm:
                setattr(self, "q_norm" + suffix, RMSNorm(cfg.head_dim, cfg.rms_norm_eps))
                setattr(self, "k_norm" + suffix, RMSNorm(cfg.head_dim, cfg.rms_norm_eps))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, view: View):
        """Queries, keys and values of `x` ([N, T, hidden]) through the view's projections: [N, heads, T, D]."""
        sfx = "_diff" if view == "diffusion" else ""
        n, t, _ = x.shape
        q, k, v = project_all(x, *(getattr(self, name + sfx) for name in ("q_proj", "k_proj", "v_proj")))
        q, k, v = (y.view(n, t, -1, self.head_dim) for y in (q, k, v))
        if self.qk_norm:
            q, k = getattr(self, "q_norm" + sfx)(q), getattr(self, "k_norm" + sfx)(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, kv: KVStore, view: View) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin, view)
        keys, values = kv.update(self.layer, k, v)
        if (attend := getattr(kv, "attend", None)) is not None:
            out = attend(q, keys, values)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=kv.mask, enable_gqa=self.n_kv != self.n_heads)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return getattr(self, "o_proj_diff" if view == "diffusion" else "o_proj")(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project_all(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv: KVStore, view: View) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, view)
        return x + self.mlp(self.post_attention_layernorm(x))

    def kernel_weights(self) -> list[torch.Tensor | None]:
        """This layer's weights in the order `kernels.DecoderStack` reads them."""
        a, f = self.self_attn, self.mlp
        weights = [self.input_layernorm.weight, self.post_attention_layernorm.weight, f.gate_proj.weight, f.up_proj.weight,
                   f.down_proj.weight]
        for sfx in ("", "_diff"):
            projections = [getattr(a, name + sfx) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            weights += [p.weight for p in projections] + [p.bias for p in projections[:3]]
            weights += [getattr(a, name + sfx).weight if a.qk_norm else None for name in ("q_norm", "k_norm")]
        return weights


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.learned_mask:
            self.mask_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))


class OrthrusLM(nn.Module):
    """Backbone + twins. `forward` runs either view over given tokens and positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        # Drafts (the diffusion view) from int8 copies of the weights where the CPU kernels run: half
        # the bytes of bf16 to stream for nearly the same drafts; verification keeps the model's own
        # weights, so the output is the same either way.
        self.int8_drafts = False
        # The tokens drafts may take (a drafter's `draft_vocab`: the ones the model writes most), or
        # None for every token. Drafts are proposals the AR view verifies, so a head over the tokens
        # the model actually writes drafts nearly always the same for a fraction of the full head's cost.
        self.register_buffer("draft_vocab", None, persistent=False)
        # Per draft position j, the temperature at which softmax(draft logits / t) is the chance that
        # greedy verification keeps a token there (a drafter's `chance_temperatures`, fit on held-out
        # text; none: t = 1). The planner weighs tree leaves and lookup extensions by it. A drafter
        # learns the model's distribution, and the model's argmax is likelier than its probability.
        self.chance_temperatures: tuple[float, ...] = ()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the head with the embeddings when the config says so (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.config.learned_mask:
            return self.model.embed_tokens(tokens)
        is_mask = (tokens == self.config.mask_token_id)[..., None]
        x = self.model.embed_tokens(tokens.masked_fill(is_mask[..., 0], 0))
        return torch.where(is_mask, self.model.mask_embedding.to(x.dtype), x)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVStore, view: View = "ar", logits: bool = True
    ) -> torch.Tensor:
        """tokens, positions: [N, T]. Returns fp32 logits [N, T, vocab] (or final hidden states)."""
        x = self.embed(tokens)
        cos, sin = self.rotary(positions)
        # A few tokens per sequence, whatever the batch: the CPU kernels, every layer in one call and
        # every op batch-invariant (a verify row computed as a decode step, however many rows).
        if hasattr(kv, "kernel_cache") and kernels.usable(x, tokens.shape[1]):
            x = kernels.decoder_stack(self).forward(x.contiguous(), cos, sin, *kv.kernel_cache, view == "diffusion")
            x = kernels.rmsnorm(x, self.model.norm.weight, self.model.norm.eps)
            if not logits:
                return x
            return kernels.linear(x, self.lm_head, int8=self.int8_drafts and view == "diffusion", float_out=True)[0]
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv, view)
        x = self.model.norm(x)
        return self.lm_head(x).float() if logits else x

    def draft(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVStore) -> torch.Tensor:
        """The diffusion view's drafts for a block [N, T]: fp32 logits [N, T - 1, vocab], row j for
        position j + 1 (the last row's, past the block, is not computed), -inf outside `draft_vocab`."""
        x = self(tokens, positions, kv, "diffusion", logits=False)[:, :-1]
        head = self.draft_head()
        if kernels.usable(x, x.shape[1]):
            logits = kernels.linear(x.contiguous(), head, int8=self.int8_drafts, float_out=True)[0]
        else:
            logits = head(x).float()
        if self.draft_vocab is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., self.draft_vocab] = logits
        return full

    def draft_head(self) -> nn.Linear:
        """The head's rows for `draft_vocab` (the head itself without one): made on first use and kept
        outside the parameters, remade when the head or the vocabulary changes."""
        if self.draft_vocab is None:
            return self.lm_head
        w, vocab = self.lm_head.weight, self.draft_vocab
        kept = self.__dict__.get("_draft_head")
        if kept is None or kept[0] is not w or kept[1] != (w._version, w.data_ptr()) or kept[2] is not vocab:
            with torch.inference_mode(False):  # a normal tensor (the kernels key packed copies on its version)
                head = Linear(w.shape[1], len(vocab), bias=False, device=w.device, dtype=w.dtype)
                head.weight = nn.Parameter(w.detach()[vocab.to(w.device)], requires_grad=False)
            kept = self.__dict__["_draft_head"] = (w, (w._version, w.data_ptr()), vocab, head)
        return kept[3]

    def twin_parameters(self):
        """(name, parameter) of everything a drafter owns: the twins and a learned mask."""
        for name, p in self.named_parameters():
            if name.endswith(("_diff.weight", "_diff.bias")) or name == "model.mask_embedding":
                yield name, p

    @torch.no_grad()
    def copy_twins_from_ar(self) -> None:
        """Initialise every twin as a copy of its AR projection (the untrained drafter)."""
        for name, p in self.twin_parameters():
            if name != "model.mask_embedding":
                p.copy_(self.get_parameter(name.replace("_diff.", ".")))
