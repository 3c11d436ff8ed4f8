"""One sampling transform for both views, and the exact speculative accept rule.

`sampling_probs` turns logits into the distribution that is actually sampled (temperature,
top-k, top-p; temperature 0 gives a one-hot argmax). The draft distribution q and the verify
distribution p both come from it, so greedy decoding is the special case of speculative
sampling with one-hot p and q: a draft is accepted iff it is the AR argmax, and the residual
max(p - q, 0) is the AR argmax. All randomness enters as uniforms drawn per row by the caller,
which keeps every function here deterministic and batch-independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kernels
from .errors import OrthrusError


GREEDY_BELOW = 1e-5  # a smaller positive temperature is greedy (as in vLLM): 1/T would overflow
TOP_K_MAX = 2**31  # a top_k at least this large keeps every token of any vocabulary: no limit
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
NUCLEUS_CANDIDATES = 256  # the largest tokens top-k / top-p sort first (most nuclei hold fewer)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 (or -1) = no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and 0 <= self.temperature <= 100):
            raise OrthrusError(f"temperature must be a number in [0, 100] (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= -1):
            raise OrthrusError(f"top_k must be an integer >= 0 (0 or -1 = no limit), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise OrthrusError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise OrthrusError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if self.top_k == -1 or self.top_k >= TOP_K_MAX:
            object.__setattr__(self, "top_k", 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [N, T, V] (fp32) -> the probabilities each row samples from, row n under params[n]."""
    v = logits.shape[-1]
    if all(p.greedy for p in params):
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    x = logits / temperature[:, None, None]
    limited = [i for i, p in enumerate(params) if p.top_k or p.top_p < 1]  # the others keep every token
    if limited:
        x[limited] = truncate(x[limited], torch.tensor([min(params[i].top_k or v, v) for i in limited]),
                              torch.tensor([params[i].top_p for i in limited]))
    probs = x.softmax(-1)
    greedy = [i for i, p in enumerate(params) if p.greedy]  # each full-vocabulary pass costs: only where needed
    if greedy:
        probs[greedy] = torch.zeros_like(probs[greedy]).scatter_(-1, logits[greedy].argmax(-1, keepdim=True), 1.0)
    return probs


def truncate(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Tempered logits x [N, T, V] with -inf outside each row's nucleus: its top_k[n] largest tokens
    (V = no limit), and of those the fewest, largest first, whose mass (normalised over the top_k)
    reaches top_p[n]. Only the largest NUCLEUS_CANDIDATES tokens are sorted, 4x more until every
    row's cut falls among them: a full sort of a large vocabulary costs more than a forward pass
    (12 ms against 0.3 ms for 5 x 49,152 logits)."""
    v = x.shape[-1]
    top_k, top_p = top_k.to(x.device)[:, None, None], top_p.to(x.device)[:, None, None]
    everything = x.logsumexp(-1, keepdim=True) if bool((top_k == v).any()) else None  # the mass with no top_k
    width = min(NUCLEUS_CANDIDATES, int(top_k.max()))
    while True:
        width = min(width, v)
        values, order = x.topk(width, -1)
        rank = torch.arange(width, device=x.device)
        values = values.masked_fill(rank >= top_k, -math.inf)
        total = values.logsumexp(-1, keepdim=True)  # the top_k's mass where the candidates hold it
        if everything is not None:
            total = torch.where(top_k == v, everything, total)
        probs = (values - total).exp()
        cut = ((probs.cumsum(-1) - probs) >= top_p) & (rank > 0)  # keep a token while the mass above it is < top_p
        settled = (top_k <= width) | ((top_k == v) & cut[..., -1:])
        if width == v or bool(settled.all()):
            return torch.full_like(x, -math.inf).scatter_(-1, order, values.masked_fill(cut, -math.inf))
        width *= 4


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [..., V] (need not be normalised), uniforms [...] in [0, 1)."""
    if kernels.takes_fp32(probs):  # no vocabulary-wide cumulative sum to allocate and search
        return kernels.sample(probs.reshape(-1, probs.shape[-1]), uniforms.reshape(-1)).view(probs.shape[:-1])
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype) * cdf[..., -1]
    return torch.searchsorted(cdf, target[..., None], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@dataclass(frozen=True)
class Leaves:
    """A token tree's leaves beside the drafts (block draft + leaves): tokens [N, S] and depths [N, S];
    a leaf of depth d is another token for draft d's position (after drafts 1 .. d-1), depth 0 is
    padding. The verify pass scores leaf s in its row K + 1 + s."""

    tokens: torch.Tensor
    depths: torch.Tensor


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor, u_next: torch.Tensor,
    lengths: torch.Tensor | None = None, leaves: Leaves | None = None, u_leaves: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard speculative sampling over a block, vectorised over rows, with a tree's leaves.

    p [N, K+1(+S), V]: verify distributions (row i is the target for draft i, row K the bonus, then
    the leaves'). q [N, K, V]: draft distributions; drafts [N, K] were sampled from q (a one-hot q
    for a deterministic proposal such as a prompt lookup). lengths [N] (default K): row n has only its
    first lengths[n] drafts; the rest is padding and never accepted.
    Draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the
    next token is drawn from the residual r = normalize(max(p_i - q_i, 0)), and after all of a row's
    drafts from p at that position (the bonus). At a rejection the leaves of that position, each a
    deterministic proposal, are tried in turn against r (accepted with probability r(leaf), else
    r loses that token, renormalised: together an exact draw from r); an accepted leaf's own row
    gives the next token. Returns (accepted count [N], next token [N], accepted leaf [N] or -1).
    """
    n, k = drafts.shape
    lengths = torch.full((n,), k, device=p.device) if lengths is None else lengths.to(p.device)
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    real = torch.arange(k, device=p.device) < lengths[:, None]
    accepted = ((u_accept * q_d < p_d) & real).long().cumprod(-1).sum(-1)
    if kernels.takes_fp32(p):  # the rest in a few passes over one row a sequence, not a dozen tensor ops
        none = torch.zeros(n, 0, dtype=torch.long)
        next_token, leaf = kernels.residual_draw(p, q, accepted, lengths, *(
            (leaves.tokens, leaves.depths, u_leaves[:, : leaves.tokens.shape[1]]) if leaves is not None else (none, none, none.float())),
            u_next)
        return accepted + (leaf >= 0).long(), next_token, leaf
    p_a = row_at(p, accepted)
    q_a = row_at(q, accepted.clamp(max=k - 1)) if k else torch.zeros_like(p_a)
    q_a = torch.where((accepted < lengths)[:, None], q_a, 0.0)  # past a row's drafts: the bonus, from p alone
    residual = (p_a - q_a).clamp_(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)  # p == q: nothing to correct
    leaf = torch.full((n,), -1, dtype=torch.long, device=p.device)
    if leaves is not None:
        # The leaves at the rejected position are tried in order; each refused one takes its mass out
        # of the residual (a repeat of it has none left), so leaf s is tried against what the ones
        # before it left, and the first taken one wins. Vectorised over the leaves: a few ops in all
        # rather than several a leaf (right after a pass each op runs with cold caches).
        at_rejection = (accepted < lengths)[:, None] & (leaves.depths == (accepted + 1)[:, None])
        same = (leaves.tokens[:, :, None] == leaves.tokens[:, None]) & (leaves.depths[:, :, None] == leaves.depths[:, None])
        repeat = (same & torch.ones_like(same[0]).tril(-1)).any(-1)  # an earlier leaf of the row is the same
        mass = residual.gather(-1, leaves.tokens).masked_fill(repeat | ~at_rejection, 0.0)
        left = residual.sum(-1, keepdim=True) - (mass.cumsum(-1) - mass)
        taken = at_rejection & (u_leaves[:, : mass.shape[1]] * left < mass)
        leaf = torch.where(taken.any(-1), taken.long().argmax(-1), leaf)  # the first taken
        refused = at_rejection & (leaf < 0)[:, None]
        residual = residual.scatter_reduce(-1, leaves.tokens, (~refused).to(residual.dtype), "prod")
        if bool((leaf >= 0).any()):  # after a leaf: its row
            residual = torch.where((leaf >= 0)[:, None], row_at(p, k + 1 + leaf.clamp(min=0)), residual)
    return accepted + (leaf >= 0).long(), sample(residual, u_next), leaf


def row_at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[n, index[n]] for every n: [N, T, V] -> [N, V]. Row by row: on the CPU, advanced indexing of
    a few rows of a large vocabulary costs 5-20x more (50-240 against 12 us for one row of 49,152)."""
    return torch.stack([x[n, i] for n, i in enumerate(index.tolist())])


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> the index of each row's largest value (the first one on ties, as torch's).
    On the CPU through numpy, whose argmax is several times faster than torch's for a few rows of a
    large vocabulary (21 against 141 us for 5 x 49,152)."""
    if logits.device.type != "cpu" or logits.dtype is torch.bfloat16:  # numpy has no bf16
        return logits.argmax(-1)
    return torch.from_numpy(logits.detach().numpy().argmax(-1))


def greedy_accept(targets: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor,
                  leaves: Leaves | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`speculative_accept` when every distribution is one-hot (greedy rows): targets [N, K+1(+S)] are
    the verify pass's argmaxes, drafts [N, K] with lengths [N] real drafts per row. A draft is accepted
    while it equals the target at its position; at the first that does not, a leaf of that position
    that does is accepted; the next token is the target after the last accepted token. Returns
    (accepted count [N], next token [N], accepted leaf [N] or -1), what `speculative_accept` gives for
    one-hot p and q, without building vocabulary-wide distributions. In Python over a few rows: a
    dozen small tensor ops right after a pass cost more (~0.4 ms, the caches cold) than the loop."""
    k = drafts.shape[1]
    targets, drafts, lengths = targets.tolist(), drafts.tolist(), lengths.tolist()
    tokens, depths = (leaves.tokens.tolist(), leaves.depths.tolist()) if leaves is not None else ([[]] * len(drafts),) * 2
    out = []
    for target, draft, length, leaf_tokens, leaf_depths in zip(targets, drafts, lengths, tokens, depths):
        a = 0
        while a < length and draft[a] == target[a]:
            a += 1
        leaf = next((s for s, (t, d) in enumerate(zip(leaf_tokens, leaf_depths)) if d == a + 1 and t == target[a]), -1)
        if a == length or leaf < 0:
            out.append((a, target[a], -1))
        else:
            out.append((a + 1, target[k + 1 + leaf], leaf))
    accepted, next_token, leaf = torch.tensor(out, dtype=torch.long).reshape(-1, 3).T
    return accepted, next_token, leaf


def draw(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens from logits [N, T, V], row n under params[n] with uniforms [N, T]; and the distributions
    they were drawn from, which the accept rule needs, or None when every row is greedy (one-hot
    distributions decide by argmax alone, so none is built)."""
    if all(p.greedy for p in params):
        return argmax(logits), None
    probs = sampling_probs(logits, params)
    return sample(probs, uniforms), probs


def accept(
    logits: torch.Tensor, params: list[SamplingParams], drafts: torch.Tensor, q: torch.Tensor | None, lengths: torch.Tensor,
    u_accept: torch.Tensor, u_next: torch.Tensor, leaves: Leaves | None = None, u_leaves: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The speculative rule on verify logits [N, K+1(+S), V] for drafts [N, K] (lengths [N] real ones
    per row) drawn from q [N, K, V], or q None when every row is greedy (as `draw` returns it), and a
    tree's leaves: by argmax then, else `speculative_accept` on the verify distributions. Returns
    (accepted count, next token, accepted leaf or -1); an accepted leaf counts as an accepted draft."""
    if q is None:
        return greedy_accept(argmax(logits), drafts, lengths, leaves)
    return speculative_accept(sampling_probs(logits, params), q, drafts, u_accept, u_next, lengths, leaves, u_leaves)
