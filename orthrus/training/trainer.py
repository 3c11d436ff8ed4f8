"""The training step and the run around it (ORTHRUS.md section 3).

Per packed row: one no-grad AR pass records every layer's K/V (causal, within each conversation);
then one diffusion pass runs every anchor block of the row at once. Block b = [anchor, MASK x
(B-1)] at positions pos(a_b)..pos(a_b)+B-1; its queries see the AR keys before its anchor (same
conversation) and all B keys of its own block, nothing else: exactly what the inference draft
pass sees for that anchor. Block row j is taught by the AR distribution at a_b + j. Both passes
are `OrthrusLM.forward`; only the KVStore differs. Only the twins (and a learned mask) train.

A run folder holds `log.jsonl`, `checkpoints/step-N/` (twins + optimizer state as safetensors,
scalars in state.json, written to a temp folder and renamed) and `curves.png`. Everything that
decides the next step is in the checkpoint (step, epoch, cursor, the shard list of the epoch,
optimizer moments); anchors are a pure function of (seed, epoch, row), so a resumed run repeats
the uninterrupted one exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import base_fingerprint, load_drafter, publish_folder, save_drafter, staging_folder
from .. import kernels
from ..errors import OrthrusError
from ..model import OrthrusLM
from .data import (PackedRows, anchor_candidates, draw_anchors, frequent_tokens, pack, parse_mix, read_shards, row_draw,
                   shard_files, split_held_out, weigh_sources)


@dataclass
class TrainConfig:
    data: str
    model: str | None = None
    block_size: int = 16
    seq_len: int = 512
    anchors: int = 32
    batch: int = 4  # rows per micro-batch per process
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: float = 0.05
    steps: int = 2000
    loss: str = "kl"
    position_decay: float = 0.0  # block row j's loss weighs exp(-j / decay): > 0 as acceptance does, < 0 later rows up (0: alike)
    mix: str = ""  # "chat:2,math:1,code:1": an epoch takes each training row as many times as its source's weight ("": once)
    walk_anchors: bool = False  # anchors where greedy decoding with the drafter lands (`walk_anchors`), not uniform ones
    clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # auto: bf16 where the hardware multiplies bf16 natively (`train_dtype`)
    parallel: str = "ddp"
    checkpoint_minutes: float = 5.0
    eval_every: int = 50
    eval_rows: int = 8
    log_every: int = 5
    init_from: str | None = None  # drafter folder whose twins start a new run (not part of the run's identity)


# Fields that define the run: a checkpoint written under other values is refused.
IDENTITY = ("data", "model", "block_size", "seq_len", "anchors", "global_batch", "lr", "warmup", "steps", "loss",
            "position_decay", "mix", "walk_anchors", "clip", "seed")


# ---- the two passes ----------------------------------------------------------------------------

class RecordingStore:
    """AR pass: attends within `mask` and keeps each layer's keys/values for the diffusion pass."""

    def __init__(self, mask: torch.Tensor):
        self.mask, self.keys, self.values = mask, [], []

    def update(self, layer, k, v):
        self.keys.append(k)
        self.values.append(v)
        return k, v


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class BlockStore:
    """Diffusion pass: keys = the row's recorded AR keys followed by every block's own keys. On
    CUDA through a FlexAttention BlockMask (`flex`); else split (`split_attention`): each block's
    queries against the AR keys, masked, and against its own block's B keys, under one softmax,
    never the dense [blocks x B, L + blocks x B] score matrix whose block part is almost all masked."""

    def __init__(self, ar: RecordingStore, doc: torch.Tensor, anchors: torch.Tensor, block_size: int, flex: bool):
        self.ar, self.flex = ar, flex
        if flex:
            from torch.nn.attention.flex_attention import flex_attention

            attention = compiled_flex_attention() if doc.is_cuda else flex_attention  # eager flex is slow on GPU
            sparse = flex_block_mask(doc, anchors, block_size)
            self.attend = lambda q, k, v: attention(q, k, v, block_mask=sparse, enable_gqa=k.shape[1] != q.shape[1])
        else:
            visible = visible_ar_keys(doc, anchors, block_size)
            self.attend = lambda q, k, v: split_attention(q, k, v, visible, block_size)

    def update(self, layer, k, v):
        if self.flex:
            return torch.cat([self.ar.keys[layer], k], 2), torch.cat([self.ar.values[layer], v], 2)
        return (self.ar.keys[layer], k), (self.ar.values[layer], v)


def split_attention(q: torch.Tensor, keys: tuple, values: tuple, visible: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention of block queries q [R, H, nb*B, D] over (AR keys [R, KV, L, D], block keys [R, KV,
    nb*B, D]) and the same values: query t sees the AR keys `visible` [R, nb*B, L] and the B keys of
    its own block t // B. Head h reads KV head h // (H / KV), as SDPA's enable_gqa."""
    (k_ar, k_block), (v_ar, v_block) = keys, values
    R, H, T, D = q.shape
    kv, L, B = k_ar.shape[1], k_ar.shape[2], block_size
    g, nb = H // kv, T // B
    q = q.reshape(R, kv, g * T, D) * D**-0.5
    on_ar = (q @ k_ar.transpose(-1, -2)).view(R, kv, g, nb, B, L)
    on_ar = on_ar.masked_fill(~visible.view(R, 1, 1, nb, B, L), float("-inf"))
    on_block = q.view(R, kv, g, nb, B, D) @ k_block.view(R, kv, 1, nb, B, D).transpose(-1, -2)  # [.., nb, B, B]
    p = torch.cat([on_ar, on_block], -1).float().softmax(-1)
    out = (p[..., :L].reshape(R, kv, g * T, L).to(v_ar.dtype) @ v_ar).view(R, kv, g, nb, B, D)
    out = out + p[..., L:].to(v_block.dtype) @ v_block.view(R, kv, 1, nb, B, D)
    return out.reshape(R, H, T, D)


def ar_mask(doc: torch.Tensor) -> torch.Tensor:
    """[R, 1, L, L]: causal, within one conversation (padding, doc -1, sees padding only)."""
    L = doc.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def diffusion_mask_mod(doc: torch.Tensor, anchors: torch.Tensor, block_size: int):
    """The diffusion pass's mask as a FlexAttention mask_mod over (row, head, query, key): block
    b = q // B sees AR keys s < a_b of a_b's conversation, and the keys L + bB .. L + bB + B-1 of
    its own block. Also evaluates on broadcast index tensors, which gives the boolean mask."""
    L = doc.shape[1]
    anchor_doc = doc.gather(1, anchors)

    def mask_mod(b, h, q, kv):
        blk = q // block_size
        s = kv.clamp(max=L - 1)
        sees_ar = (kv < L) & (s < anchors[b, blk]) & (doc[b, s] == anchor_doc[b, blk])
        return sees_ar | ((kv >= L) & ((kv - L) // block_size == blk))

    return mask_mod


def visible_ar_keys(doc: torch.Tensor, anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """[R, nb*B, L] boolean: the AR keys each block query sees, from `diffusion_mask_mod`."""
    (R, L), queries = doc.shape, anchors.shape[1] * block_size
    idx = lambda n: torch.arange(n, device=doc.device)  # noqa: E731
    mask_mod = diffusion_mask_mod(doc, anchors, block_size)
    return mask_mod(idx(R)[:, None, None], None, idx(queries)[None, :, None], idx(L)[None, None, :])


def flex_block_mask(doc: torch.Tensor, anchors: torch.Tensor, block_size: int):
    """The same mask as a FlexAttention BlockMask: memory grows with the blocks that are visible,
    not with queries x keys (for long rows with hundreds of anchors on GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    (R, L), queries = doc.shape, anchors.shape[1] * block_size
    return create_block_mask(diffusion_mask_mod(doc, anchors, block_size), R, None, queries, L + queries,
                             device=str(doc.device))


def dual_pass(model: OrthrusLM, rows: PackedRows, anchors: torch.Tensor, block_size: int, diffusion_model=None,
              flex: bool | None = None):
    """Returns (student, teacher) final hidden states [R, nb, B-1, H] for block rows 0..B-2 and the
    teacher's AR states at a_b + j, plus target_ok [R, nb, B-1]: row j's target a_b+j+1 is a reply
    token of a_b's conversation. `diffusion_model` is the (DDP/FSDP-wrapped) module for the pass
    that gets gradients; the AR pass runs on the bare model with no graph. `flex` (default: on
    CUDA) attends through FlexAttention's block-sparse mask, else through `split_attention`."""
    device = next(model.parameters()).device
    # the rows' common trailing padding sees only itself and is no key of any anchor: not computed
    real = (rows.doc >= 0).any(0).nonzero()
    used = int(real.max()) + 1 if len(real) else 1
    tokens, positions, doc = (t[:, :used].to(device) for t in (rows.tokens, rows.positions, rows.doc))
    anchors = anchors.to(device)
    R, L = tokens.shape
    nb, B = anchors.shape[1], block_size
    with torch.no_grad():
        ar = RecordingStore(ar_mask(doc))
        ar_hidden = model(tokens, positions, ar, "ar", logits=False)
    offsets = torch.arange(B, device=device)
    block_tokens = torch.full((R, nb, B), model.mask_token_id, device=device)
    block_tokens[:, :, 0] = tokens.gather(1, anchors)
    block_positions = positions.gather(1, anchors)[:, :, None] + offsets
    store = BlockStore(ar, doc, anchors, B, flex=device.type == "cuda" if flex is None else flex)
    student = (diffusion_model or model)(block_tokens.view(R, nb * B), block_positions.view(R, nb * B), store, "diffusion",
                                         logits=False).view(R, nb, B, -1)[:, :, :-1].contiguous()  # (a head over a strided
    # view under bf16 autocast would go through a batched product with the weight expanded per block)
    at = (anchors[:, :, None] + offsets[:-1]).clamp(max=L - 1)  # teacher rows a_b + j
    teacher = ar_hidden.gather(1, at.view(R, -1, 1).expand(-1, -1, ar_hidden.shape[-1])).view(R, nb, B - 1, -1)
    target_ok = target_mask(rows, anchors.cpu(), B).to(device)
    return student, teacher, target_ok


@torch.no_grad()
def walk_anchors(model: OrthrusLM, rows: PackedRows, block_size: int, count: int | None = None, seed: int = 0,
                 row_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The anchors greedy decoding with this drafter visits in the rows' replies, and the drafts it
    accepts at each: a reply's first anchor is its last prompt token; after anchor a the next is
    a + accepted + 1, where accepted counts the leading drafts (the diffusion view's argmax) equal to
    the row's next tokens (which in the model's own greedy replies are the AR argmax, as decoding
    compares them). Decoding lands right after rejected drafts more often than uniform anchors do,
    where the drafter is weakest. With `count`, at most that many a row (`row_draw`, as `draw_anchors`).
    Returns anchors [R, n], valid [R, n] and accepted [R, n]."""
    candidates = anchor_candidates(rows)
    every = [c.nonzero().flatten() for c in candidates]
    width = max(1, max(map(len, every)))
    anchors = torch.stack([torch.cat([c, c.new_zeros(width - len(c))]) for c in every])
    student, _, _ = dual_pass(model, rows, anchors, block_size)
    flat = student.reshape(-1, student.shape[-1])
    drafts = torch.cat([model.lm_head(chunk).argmax(-1) for chunk in flat.split(256)]).view(*anchors.shape, -1).cpu()
    tokens, doc, reply = rows.tokens.tolist(), rows.doc.tolist(), rows.assistant.tolist()
    walks = []
    for i, positions in enumerate(every):
        at = {a: n for n, a in enumerate(positions.tolist())}
        row_drafts, walk = drafts[i].tolist(), []
        for start in (a for a in at if not reply[i][a]):  # each reply's last prompt token
            a = start
            while a in at:
                accepted = 0
                for j, d in enumerate(row_drafts[at[a]]):
                    t = a + 1 + j
                    if t >= len(tokens[i]) or doc[i][t] != doc[i][a] or not reply[i][t] or d != tokens[i][t]:
                        break
                    accepted += 1
                walk.append((a, accepted))
                a += accepted + 1
        if count is not None:  # the walk is in anchor order, so the draw keeps it so
            walk = [walk[k] for k in row_draw(len(walk), count, seed, row_ids[i] if row_ids else i).tolist()]
        walks.append(walk)
    n = max(1, max(map(len, walks)))
    anchors, accepted = (torch.zeros(len(walks), n, dtype=torch.long) for _ in range(2))
    valid = torch.zeros(len(walks), n, dtype=torch.bool)
    for i, walk in enumerate(walks):
        for k, (a, taken) in enumerate(walk):
            anchors[i, k], accepted[i, k], valid[i, k] = a, taken, True
    return anchors, valid, accepted


def target_mask(rows: PackedRows, anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """[R, nb, B-1]: block row j's target a_b+j+1 is in the row and a reply token of a_b's conversation."""
    R, L = rows.tokens.shape
    target = anchors[:, :, None] + torch.arange(1, block_size)
    clamped = target.clamp(max=L - 1).view(R, -1)
    return (target < L) & rows.assistant.gather(1, clamped).view_as(target) & (
        rows.doc.gather(1, clamped).view_as(target) == rows.doc.gather(1, anchors)[:, :, None])


def position_weights(block_size: int, decay: float) -> torch.Tensor:
    """[B-1] weights of block rows 0..B-2: exp(-j / decay), or all 1 when decay is 0. A draft counts
    only if every draft before it was accepted, so the first rows are worth the most (decay > 0); a
    negative decay weighs the later rows up instead, where the drafter is weakest."""
    j = torch.arange(block_size - 1, dtype=torch.float32)
    return torch.exp(-j / decay) if decay != 0 else torch.ones_like(j)


LOSS_CHUNK = 64  # rows of [rows, vocabulary] logits the loss holds at a time


class HeadLoss(torch.autograd.Function):
    """sum_i w_i loss_i over rows of the student's and the teacher's final hidden states [N, H]
    through the frozen head [V, H]: forward KL(p_AR || p_diff) or CE on the AR argmax. LOSS_CHUNK rows
    at a time, so the [N, V] logits are never whole; as the head is frozen, the gradient for the
    student's states, (softmax(s) - p) w_i through the head, is formed in the same pass (as fused
    linear-cross-entropy kernels do) and only it is kept for backward."""

    @staticmethod
    def forward(ctx, student, teacher, head, row_weights, kind):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        for rows in torch.arange(len(student), device=student.device).split(LOSS_CHUNK):
            q_logp = F.log_softmax((student[rows].to(head.dtype) @ head.T).float(), -1)
            p_logp = F.log_softmax((teacher[rows].to(head.dtype) @ head.T).float(), -1)
            if kind == "ce":
                target = p_logp.argmax(-1)
                per_row, p = -q_logp.gather(-1, target[:, None]).squeeze(-1), F.one_hot(target, q_logp.shape[-1]).float()
            else:
                p = p_logp.exp()
                per_row = (p * (p_logp - q_logp)).sum(-1)
            w = row_weights[rows]
            total += (per_row * w).sum()
            if grad is not None:
                grad[rows] = (((q_logp.exp() - p) * w[:, None]).to(head.dtype) @ head).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None


def draft_loss(model: OrthrusLM, student, teacher, ok, kind: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed loss over the valid rows [R, nb, B-1]: forward KL(p_AR || p_diff), or CE on the AR
    argmax; row j weighs weights[j] (default 1). `HeadLoss` computes it."""
    head = model.lm_head.weight.detach()
    head = head.full_tensor() if hasattr(head, "full_tensor") else head  # FSDP2 shards it
    row_weights = (torch.ones(ok.shape[-1]) if weights is None else weights).to(student.device, torch.float32)
    return HeadLoss.apply(student[ok], teacher[ok], head, row_weights.expand_as(ok)[ok], kind)


# ---- the run -----------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine down to 10% of the peak at `cfg.steps`."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Checkpoints:
    def __init__(self, run: Path):
        self.folder = run / "checkpoints"

    def latest(self) -> Path | None:
        done = sorted(p for p in self.folder.glob("step-*") if (p / "state.json").is_file())
        return done[-1] if done else None

    def save(self, twins: dict, moments: dict, state: dict, keep: int = 2) -> Path:
        target = self.folder / f"step-{state['step']:08d}"
        tmp = staging_folder(target)
        save_file(twins, str(tmp / "twins.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        publish_folder(tmp, target)
        for old in sorted(p for p in self.folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
        return target

    @staticmethod
    def load(path: Path, model: OrthrusLM, opt: torch.optim.Optimizer, names: list[str]) -> None:
        params = dict(model.named_parameters())
        with safe_open(str(path / "twins.safetensors"), "pt") as f, torch.no_grad():
            for n in names:
                copy_full(params[n], f.get_tensor(n))
        with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
            keys = set(f.keys())
            for n in names:
                p = params[n]
                state = {}
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    if f"{n}.{key}" in keys:
                        t = f.get_tensor(f"{n}.{key}")
                        state[key] = t.reshape(()) if key == "step" else like(p, t)
                if state:
                    opt.state[p] = state


def gather_checkpoint(model: OrthrusLM, opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """Whole CPU copies of the twins and their AdamW moments, in a fixed order (FSDP2 gathers)."""
    params = dict(model.named_parameters())
    twins = {n: full(params[n]).contiguous() for n in names}
    moments = {f"{n}.{key}": full(value).reshape(value.shape if value.dim() else (1,)).contiguous()
               for n in names for key, value in opt.state.get(params[n], {}).items()}
    return twins, moments


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole CPU tensor (gathers an FSDP2-sharded DTensor)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).to("cpu", torch.float32 if t.is_floating_point() else t.dtype)


def like(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` laid out like parameter p (sharded the same way under FSDP2)."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
    return value.to(p.device, p.dtype)


def copy_full(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(like(p, value))


class Logger:
    def __init__(self, run: Path, rank: int, resume_step: int):
        self.path, self.rank = run / "log.jsonl", rank
        if rank == 0 and self.path.is_file():  # drop what was logged after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def __call__(self, record: dict, console: str) -> None:
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(console, flush=True)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world, device); under torchrun the process group (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 1, torch.device(device)
    cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX
    (oneDNN then runs bf16 products ~1.75x faster than fp32; on an AVX2-only CPU bf16 is far slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & kernels.cpu_flags())


def train_dtype(requested: str, device: torch.device) -> str:
    """The precision a run trains in: `requested`, or for "auto" bf16 autocast where the device has native bf16."""
    if requested != "auto":
        return requested
    return "bf16" if native_bf16(device) else "fp32"


def load_base(cfg: TrainConfig, device: torch.device):
    from ..api import load

    llm = load(cfg.model, drafter="none", dtype="float32", device=str(device))
    llm.model.config.block_size = cfg.block_size
    return llm, llm.model


def backbone_to_bf16(model: OrthrusLM) -> None:
    """The frozen backbone in bf16 for a bf16 run; the twins stay fp32 master weights. Done after the
    base's fingerprint and after a drafter's int8 deltas are applied to the fp32 AR weights."""
    twins = {n for n, _ in model.twin_parameters()}
    for n, p in model.named_parameters():
        if n not in twins:
            p.data = p.data.to(torch.bfloat16)


def prepare_model(model: OrthrusLM) -> list[str]:
    """Freeze everything but the twins (and the learned mask); returns their names."""
    model.requires_grad_(False)
    names = []
    for name, p in model.twin_parameters():
        p.requires_grad_(True)
        names.append(name)
    return names


def wrap_parallel(model: OrthrusLM, cfg: TrainConfig, world: int, device: torch.device):
    """The module the diffusion pass runs through: itself (one process), DDP over the twins, or
    FSDP2 sharding every layer (frozen backbone included) and the root."""
    if world == 1:
        return model
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.dtype == "bf16" else None, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def epoch_rows(cfg: TrainConfig, files: list[str], epoch: int) -> tuple[PackedRows, torch.Tensor]:
    train_rows, _ = split_held_out(read_shards(Path(cfg.data), files))
    if cfg.mix:
        train_rows = weigh_sources(train_rows, parse_mix(cfg.mix))
        if not train_rows:
            raise OrthrusError(f"--mix {cfg.mix} leaves no training rows in {cfg.data}")
    packed = pack(train_rows, cfg.seq_len)
    order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
    return packed, order


def eval_set(cfg: TrainConfig, files: list[str]) -> PackedRows:
    _, held = split_held_out(read_shards(Path(cfg.data), files))
    packed = pack(held, cfg.seq_len)
    return packed.select(list(range(min(cfg.eval_rows, len(packed)))))


@torch.no_grad()
def evaluate(model: OrthrusLM, rows: PackedRows, cfg: TrainConfig) -> dict:
    """Held-out loss and simulated greedy acceptance: for anchors whose whole block is reply, the
    drafts accepted are the longest prefix where argmax q == argmax p; a cycle emits that + 1. And
    the tokens a cycle on the anchors decoding visits (`walk_anchors`), what decoding the rows would give."""
    anchors, valid = draw_anchors(rows, cfg.anchors, cfg.block_size, cfg.seed + 1, list(range(len(rows))), full_blocks=True)
    student, teacher, ok = dual_pass(model, rows, anchors, cfg.block_size)
    loss = draft_loss(model, student, teacher, ok, cfg.loss) / ok.sum().clamp(min=1)
    match = model.lm_head(student).argmax(-1) == model.lm_head(teacher).argmax(-1)  # [R, nb, B-1]
    match = match[valid.to(match.device)]
    accepted = match.long().cumprod(-1)
    _, walked, walk_accepted = walk_anchors(model, rows, cfg.block_size)
    return {"eval_loss": float(loss), "acceptance": float(accepted.sum(-1).float().mean() + 1) if len(match) else float("nan"),
            "per_position": [round(float(x), 4) for x in accepted.float().mean(0)], "eval_blocks": int(len(match)),
            "walk_acceptance": round(float(walk_accepted[walked].float().mean() + 1), 4)}


CHANCE_TEMPERATURES = tuple(round(0.05 * i, 2) for i in range(2, 41))  # what `fit_temperatures` picks from: 0.1 .. 2.0
CHANCE_FIT_ROWS = 16  # held-out packed rows an export fits the drafter's chance temperatures on


def fit_temperatures(batches) -> list[float]:
    """Per draft position j, the temperature t (from CHANCE_TEMPERATURES) at which softmax(logits / t) of
    the drafted token best predicts (Bernoulli log-likelihood) whether it is right, over the blocks whose
    drafts before j are right. `batches`: (draft logits [n, B-1, V], right [n, B-1] bool) pairs."""
    loss = None
    for logits, right in batches:
        logits = logits.float()
        reached = torch.cat([torch.ones_like(right[:, :1]), right[:, :-1].cumprod(-1).bool()], 1)  # [n, B-1]
        gaps = logits - logits.amax(-1, keepdim=True)
        # log-probability of the drafted (largest) token at each temperature: -logsumexp(gaps / t)
        top = torch.stack([-(gaps / t).logsumexp(-1) for t in CHANCE_TEMPERATURES], -1)  # [n, B-1, grid]
        miss = torch.log1p(-top.exp().clamp(max=1 - 1e-6))
        nll = -torch.where(right[..., None], top, miss) * reached[..., None]
        loss = nll.sum(0) if loss is None else loss + nll.sum(0)
    if loss is None:
        raise OrthrusError("no draft blocks to fit chance temperatures on")
    return [CHANCE_TEMPERATURES[i] for i in loss.argmin(-1).tolist()]


@torch.no_grad()
def fit_chance_temperatures(model: OrthrusLM, rows: PackedRows, block_size: int, anchors: int = 128, seed: int = 1,
                            chunk: int = 64) -> list[float]:
    """The drafter's `chance_temperatures` (model.py): per draft position, the temperature at which its
    distribution best gives the chance that greedy verification keeps a draft, fit on held-out rows'
    anchor blocks (drafts right where their argmax is the AR one, as `evaluate` counts them). The drafter
    learns the model's distribution, and the model's argmax is likelier than its probability: the
    shipped SmolLM2 drafter gives its first drafts 0.69 on average, and 90% of them are the model's
    choice (BENCHMARKS.md, "The planner's chances, calibrated")."""
    if len(rows) == 0:
        raise OrthrusError("no held-out rows to fit chance temperatures on")
    anchor_ids, valid = draw_anchors(rows, anchors, block_size, seed, list(range(len(rows))), full_blocks=True)
    student, teacher, _ = dual_pass(model, rows, anchor_ids, block_size)
    student, teacher = student[valid.to(student.device)], teacher[valid.to(teacher.device)]  # [blocks, B-1, H]
    head, vocab = model.draft_head(), model.draft_vocab  # drafts come from the draft vocabulary, if the drafter has one

    def batches():
        for s, t in zip(student.split(chunk), teacher.split(chunk)):
            logits = head(s).float()
            drafts = logits.argmax(-1) if vocab is None else vocab[logits.argmax(-1)]
            yield logits, drafts == model.lm_head(t).argmax(-1)

    return fit_temperatures(batches())


def fit_chance_temperatures_on(model: OrthrusLM, data: str | Path, files: list[str] | None = None, seq_len: int = 512,
                               rows: int = CHANCE_FIT_ROWS) -> tuple[list[float], int]:
    """`fit_chance_temperatures` at the model's block size on the first `rows` held-out packed rows of a data
    folder (`files`: its shards, default every one): (the temperatures, the rows fit on)."""
    held = eval_set(TrainConfig(data=str(data), seq_len=seq_len, eval_rows=rows),
                    files or [p.name for p in shard_files(Path(data))])
    return fit_chance_temperatures(model, held, model.config.block_size), len(held)


def init_trained(drafter: str | None) -> dict:
    """The steps and tokens the drafter a run starts from was trained on (from its config.json)."""
    path = Path(drafter or "") / "config.json"
    if not drafter or not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return {"steps": config.get("trained_steps", 0), "tokens": config.get("trained_tokens", 0)}


def check_resume(state: dict, cfg_identity: dict, fingerprint: str, path: Path) -> None:
    if state["base_fingerprint"] != fingerprint:
        raise OrthrusError(f"{path}: this checkpoint was trained on base model {state['config'].get('model')!r} "
                           f"(fingerprint {state['base_fingerprint']}), not the loaded one ({fingerprint}). "
                           "Use another --run-dir.")
    defaults = asdict(TrainConfig(data=""))  # a field newer than the checkpoint had its default there
    old = {k: state["config"].get(k, defaults.get(k)) for k in cfg_identity}
    changed = {k: (old[k], v) for k, v in cfg_identity.items() if old[k] != v}
    if changed:
        raise OrthrusError(f"{path}: the run was started with other settings: "
                           + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
                           + ". Resume with the same settings, or use another --run-dir.")


def train(cfg: TrainConfig, run: Path, device: str = "auto", stop_after: int | None = None) -> dict:
    """Train (or resume) the run in `run`; returns the final state. `stop_after` ends after that many
    optimizer steps of this call (tests)."""
    rank, world, dev = setup_distributed(device)
    cfg = replace(cfg, dtype=train_dtype(cfg.dtype, dev))
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    llm, model = load_base(cfg, dev)
    names = prepare_model(model)
    fingerprint = base_fingerprint(model)  # before FSDP2 turns the weights into shards
    ckpts = Checkpoints(run)
    latest = ckpts.latest()
    if latest is None and cfg.init_from:  # a new run that starts from a trained drafter's twins
        load_drafter(model, cfg.init_from)
        model.config.block_size = cfg.block_size
    if cfg.dtype == "bf16" and cfg.parallel != "fsdp":  # FSDP2 keeps fp32 shards; its policy gathers bf16 copies
        backbone_to_bf16(model)
    wrapped = wrap_parallel(model, cfg, world, dev)
    params = [p for _, p in model.twin_parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    identity = {**{k: v for k, v in asdict(cfg).items() if k in IDENTITY}, "global_batch": cfg.batch * cfg.grad_accum * world}
    if latest is not None:
        state = json.loads((latest / "state.json").read_text())
        check_resume(state, identity, fingerprint, latest)
        Checkpoints.load(latest, model, opt, names)
    else:
        if not shard_files(Path(cfg.data)):
            raise OrthrusError(f"{cfg.data}: no distilled shards; run `orthrus distill` first.")
        files = [p.name for p in shard_files(Path(cfg.data))]
        state = {"step": 0, "epoch": 0, "cursor": 0, "files": files, "eval_files": files, "tokens": 0, "seconds": 0.0,
                 "config": identity, "base_fingerprint": fingerprint, "base_model": llm.name, "init_from": cfg.init_from,
                 "init_trained": init_trained(cfg.init_from)}
    log = Logger(run, rank, state["step"])
    packed, order = epoch_rows(cfg, state["files"], state["epoch"])
    global_batch = identity["global_batch"]
    weights = position_weights(cfg.block_size, cfg.position_decay)
    if len(packed) < global_batch:
        raise OrthrusError(f"{cfg.data}: {len(packed)} packed rows, fewer than one global batch ({global_batch}).")
    held = eval_set(cfg, state["eval_files"])
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else nullcontext()
    last_ckpt, t0, steps_here = time.monotonic(), time.monotonic(), 0
    window_tokens, window_start = 0, time.monotonic()
    while state["step"] < cfg.steps and (stop_after is None or steps_here < stop_after):
        if state["cursor"] + global_batch > len(packed):  # next epoch, over whatever data exists now
            state["epoch"], state["cursor"] = state["epoch"] + 1, 0
            state["files"] = [p.name for p in shard_files(Path(cfg.data))]
            packed, order = epoch_rows(cfg, state["files"], state["epoch"])
            if len(held) < cfg.eval_rows:  # the held-out set grows with the data until it is full, then stays fixed
                state["eval_files"] = state["files"]
                held = eval_set(cfg, state["eval_files"])
        ids = order[state["cursor"] : state["cursor"] + global_batch]
        micro = [ids[m * world * cfg.batch + rank * cfg.batch :][: cfg.batch] for m in range(cfg.grad_accum)]
        draws = []
        for m_ids in micro:
            rows, seed = packed.select(m_ids), cfg.seed * 1009 + state["epoch"]
            if cfg.walk_anchors:
                with autocast:
                    anchors, valid, _ = walk_anchors(model, rows, cfg.block_size, cfg.anchors, seed, m_ids.tolist())
            else:
                anchors, valid = draw_anchors(rows, cfg.anchors, cfg.block_size, seed, m_ids.tolist())
            draws.append((rows, anchors, valid))
        # normalise by the (weighted) valid targets of the whole global batch, so any split gives the same gradient
        count = torch.tensor(0.0)
        for rows, anchors, valid in draws:
            count += ((target_mask(rows, anchors, cfg.block_size) & valid[:, :, None]) * weights).sum()
        if world > 1:
            dist.all_reduce(count)
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], cfg)
        total, step_tokens = 0.0, 0
        for m, (rows, anchors, valid) in enumerate(draws):
            sync = m == len(draws) - 1 or world == 1 or cfg.parallel != "ddp"
            with (nullcontext() if sync else wrapped.no_sync()), autocast:
                student, teacher, ok = dual_pass(model, rows, anchors, cfg.block_size, wrapped)
                ok &= valid.to(ok.device)[:, :, None]
                loss = draft_loss(model, student, teacher, ok, cfg.loss, weights) / count.to(ok.device)
            (loss * world).backward()  # DDP/FSDP average gradients over processes; undo that mean
            total += float(loss.detach())
            step_tokens += int((rows.doc >= 0).sum())
        if world > 1:
            t = torch.tensor([total, float(step_tokens)], dtype=torch.float64)
            dist.all_reduce(t)
            total, step_tokens = float(t[0]), int(t[1])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["cursor"] += global_batch
        state["tokens"] += step_tokens
        window_tokens += step_tokens
        steps_here += 1
        if state["step"] % cfg.log_every == 0 or state["step"] == 1:
            elapsed = time.monotonic() - window_start
            rate = window_tokens / max(elapsed, 1e-9)
            window_tokens, window_start = 0, time.monotonic()
            log({"step": state["step"], "loss": round(total, 5), "lr": lr_at(state["step"] - 1, cfg),
                 "grad_norm": round(float(full(grad_norm)), 4), "tokens": state["tokens"], "tokens_per_s": round(rate, 1),
                 "dtype": cfg.dtype, "seconds": round(state["seconds"] + time.monotonic() - t0, 1)},
                f"step {state['step']}/{cfg.steps} loss {total:.4f} lr {lr_at(state['step'] - 1, cfg):.2e} "
                f"{rate:.0f} tok/s ({cfg.dtype}) tokens {state['tokens']}")
        if cfg.eval_every and state["step"] % cfg.eval_every == 0 and len(held):
            with autocast:
                ev = evaluate(model, held, cfg)
            log({"step": state["step"], **ev}, f"eval step {state['step']}: loss {ev['eval_loss']:.4f} "
                                               f"acceptance {ev['acceptance']:.3f} ({ev['eval_blocks']} blocks), "
                                               f"on decoding's anchors {ev['walk_acceptance']:.3f}")
            if rank == 0:
                plot_curves(run)
        done = state["step"] >= cfg.steps or (stop_after is not None and steps_here >= stop_after)
        if done or time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            state["seconds"] += time.monotonic() - t0
            t0 = time.monotonic()
            tensors = gather_checkpoint(model, opt, names)  # collective under FSDP2: every rank takes part
            if rank == 0:
                print(f"checkpoint {ckpts.save(*tensors, state)}", flush=True)
            last_ckpt = time.monotonic()
            if world > 1:
                dist.barrier()
    return state


def read_log(run: Path) -> list[dict]:
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise OrthrusError(f"{run}: no log.jsonl; is this a training run folder?")
    return [json.loads(line) for line in path.read_text().splitlines()]


MAX_TREND_DOUBLINGS = 60  # a trend line reaching a target only past 2**60 tokens is flat: "never"


def acceptance_trend(records: list[dict], targets=(3.0, 4.0)) -> dict | None:
    """Least-squares fit of held-out acceptance against log2(tokens trained), over the evaluations
    on the final (fixed) held-out set: the gain per doubling of tokens, and the tokens the line
    reaches each target at (None where it never does, or only past 2**MAX_TREND_DOUBLINGS tokens: a
    nearly flat line). None with fewer than 3 such evaluations."""
    tokens_at = {r["step"]: r["tokens"] for r in records if "loss" in r}
    evals = [r for r in records if "acceptance" in r and tokens_at.get(r["step"], 0) > 0]
    evals = [r for r in evals if r["eval_blocks"] == evals[-1]["eval_blocks"]] if evals else []
    if len(evals) < 3:
        return None
    x = torch.tensor([math.log2(tokens_at[r["step"]]) for r in evals], dtype=torch.float64)
    y = torch.tensor([r["acceptance"] for r in evals], dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum().clamp(min=1e-12))
    intercept = float(y.mean() - slope * x.mean())
    doublings = {t: (t - intercept) / slope if slope > 0 else math.inf for t in targets}  # log2 of the tokens
    reach = {t: 2.0**d if d < MAX_TREND_DOUBLINGS else None for t, d in doublings.items()}
    return {"per_doubling": slope, "intercept": intercept, "evaluations": len(evals), "first_tokens": int(2 ** float(x[0])),
            "tokens": int(2 ** float(x[-1])), "acceptance": float(y[-1]), "tokens_to_reach": reach}


def describe_trend(trend: dict | None) -> str:
    if trend is None:
        return "acceptance trend: fewer than 3 evaluations on the fixed held-out set"
    reach = ", ".join(f"{t:g} at {n / 1e6:.3g}M tokens" if n else f"{t:g} never (flat or falling)"
                      for t, n in trend["tokens_to_reach"].items())
    return (f"acceptance trend over {trend['evaluations']} evaluations: {trend['per_doubling']:+.3f} tokens per cycle "
            f"per doubling of tokens trained (now {trend['acceptance']:.3f} at {trend['tokens'] / 1e3:.0f}K); "
            f"the line reaches {reach}")


def plot_curves(run: Path) -> Path:
    """curves.png: training loss and held-out acceptance against tokens trained, with the
    acceptance trend line extended to the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run)
    train_rows = [r for r in records if "loss" in r]
    tokens_at = {r["step"]: r["tokens"] for r in train_rows}
    evals = [r for r in records if "acceptance" in r and r["step"] in tokens_at]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["tokens"] for r in train_rows], [r["loss"] for r in train_rows], lw=0.8, label="train")
    left.plot([tokens_at[r["step"]] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    left.set(xlabel="tokens trained", ylabel="loss (KL)", yscale="log", title="draft loss")
    left.legend()
    right.plot([tokens_at[r["step"]] for r in evals], [r["acceptance"] for r in evals], "o-", label="held-out")
    trend = acceptance_trend(records)
    if trend is not None:
        ends = [trend["tokens"]] + [n for n in trend["tokens_to_reach"].values() if n]
        xs = torch.logspace(math.log10(trend["first_tokens"]), math.log10(min(max(ends), 1e12)), 50)
        right.plot(xs, trend["intercept"] + trend["per_doubling"] * torch.log2(xs), "--",
                   label=f"trend {trend['per_doubling']:+.3f} per doubling")
        for target in trend["tokens_to_reach"]:
            right.axhline(target, color="grey", lw=0.6, ls=":")
    right.set(xlabel="tokens trained", ylabel="tokens per cycle", xscale="log", title="simulated greedy acceptance")
    right.legend()
    fig.tight_layout()
    out = Path(run) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def export_drafter(run: Path, out: Path, storage: str = "int8", model: str | None = None, block_size: int | None = None,
                   draft_vocab: int = 0) -> None:
    """Write the run's last checkpoint as a drafter-only folder (orthrus.checkpoint.save_drafter), with
    its chance temperatures fit on the run's held-out rows (`fit_chance_temperatures`).
    `block_size`: the drafter's default decode block, if not the trained one (pick it by measurement).
    `draft_vocab`: how many of the tokens the run's data replies with most its drafts may take (0: every
    token). Worth it where the head is a large part of a draft pass (Qwen3's 151,936 tokens); on
    SmolLM2 (49,152) its 16,384 most used tokens saved what they cost in acceptance (BENCHMARKS.md)."""
    from ..api import load

    latest = Checkpoints(Path(run)).latest()
    if latest is None:
        raise OrthrusError(f"{run}: no checkpoint to export yet.")
    state = json.loads((latest / "state.json").read_text())
    llm = load(model or state["config"]["model"], drafter="none", dtype="float32", device="cpu")
    if base_fingerprint(llm.model) != state["base_fingerprint"]:
        raise OrthrusError(f"{latest}: trained for another base model than {llm.name!r}.")
    params = dict(llm.model.named_parameters())
    with safe_open(str(latest / "twins.safetensors"), "pt") as f, torch.no_grad():
        for n in f.keys():
            params[n].copy_(f.get_tensor(n))
    llm.model.config.block_size = block_size or state["config"]["block_size"]
    if draft_vocab:
        rows = read_shards(Path(state["config"]["data"]))
        stops = sorted(t for t in llm.stop_token_ids if t < llm.model.config.vocab_size)
        llm.model.draft_vocab = frequent_tokens(rows, draft_vocab, stops)
    settings = state["config"]
    try:
        temperatures, _ = fit_chance_temperatures_on(llm.model, settings["data"], state.get("eval_files", state["files"]),
                                                     settings["seq_len"])
        llm.model.chance_temperatures = tuple(temperatures)
    except OrthrusError as e:  # the run's data is not here (or has no held-out block): export without them
        print(f"orthrus train: exported without chance temperatures ({e}); `benchmarks/chance_temperatures.py "
              "--write` fits them later", file=sys.stderr, flush=True)
    before = state.get("init_trained", {})  # a run started from a drafter counts what that one had seen
    steps, tokens = state["step"] + before.get("steps", 0), state["tokens"] + before.get("tokens", 0)
    save_drafter(llm.model, out, base_model=state["base_model"], storage=storage,
                 extra={"trained_block_size": state["config"]["block_size"], "trained_steps": steps, "trained_tokens": tokens})
