"""The decoding engine: a batch of sequences sharing one KV cache, advanced one cycle at a time.

Orthrus mode, per cycle (ORTHRUS.md section 2), for every running row at once:
  draft   diffusion view over [anchor, MASK x (B-1)]: drafts d_1..d_{B-1}
  verify  AR view over [anchor, d_1..d_{B-1}], causal, K/V written into the cache
  accept  speculative rule (greedy = argmax prefix), one extra token from the AR distribution
  commit  each row's length advances by its own 1 + accepted; the rest is cropped by not counting it
AR mode runs the same loop with no draft and a block of one token: the baseline.

The cycle planner (`plan_cycle`) picks, per row and cycle, what to verify: the diffusion draft
(a draft pass, then a verify pass), a prompt lookup (the tokens that followed the latest earlier
occurrence of the row's last few tokens in its prompt and output, as HF prompt lookup and
llama.cpp lookup do: a verify pass only), or nothing (a plain AR step), whichever gives the most
expected tokens per second: expected tokens from the row's own recent acceptance of each source,
seconds from `PassCosts`, the pass times measured on this machine, at the row's context length.
A lookup draft is a deterministic proposal (one-hot q), so the accept rule stays exact; rows of
one cycle may mix sources, and the draft pass runs only over the rows that need it.

After the draft pass `plan_tree` adds, where they pay for their verify rows: tree leaves, other tokens
at the block draft's positions, verified in the same pass after the drafts, each seeing the drafts
before its position and itself (a token tree of the chain and leaves; with a few-token block the
best-first tree has that shape), where draft j is rejected its position's leaves tried in turn
(exactly: `sampling.Leaves`), an accepted leaf's K/V moved to its position and its own logits giving
the next token; and a lookup extension, what followed the drafts' last tokens earlier in the text,
verified after the drafts as a longer chain (one-hot q, as a lookup's).

Adaptive verify (`draft_confidence` > 0): drafts after the first one the drafter itself is unsure
of (top probability below the threshold) are not verified, which shortens the verify pass where
a pass costs more with more tokens (CPUs). The cut depends on the draft side only, so the
accept rule stays exact.

Invariant: the cache holds every committed token of a row except the last one, the anchor.
Requests join between cycles (their prompt is prefilled into a free row) and leave at once.
"""

from __future__ import annotations

import itertools
import math
import operator
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import kernels
from .cache import KVCache
from .errors import OrthrusError
from .model import OrthrusLM, View
from .sampling import Leaves, SamplingParams, accept, draw

Mode = Literal["orthrus", "ar"]
PREFILL_CHUNK = 1024  # prompt tokens per prefill forward: bounds attention memory on long prompts


def prefill_chunk(model: OrthrusLM) -> int:
    """Prompt tokens per prefill pass: where the CPU kernels run this model's passes, as many as
    they take in one (their few-row tiles beat the plain path's GEMMs: a 400-token prompt
    prefills 1.8x faster in bf16, and its K/V come out as decode steps would compute them);
    elsewhere PREFILL_CHUNK."""
    return kernels.MAX_TOKENS if kernels.usable(next(model.parameters()), kernels.MAX_TOKENS) else PREFILL_CHUNK


def prefill(model: OrthrusLM, cache: KVCache, rows: torch.Tensor, bodies: list[list[int]]) -> int:
    """Write each row's tokens (`bodies`, from the row's length on) into the cache, `prefill_chunk`
    tokens a pass, shorter rows padded and not counted; returns the passes run."""
    longest, step = max(map(len, bodies)), prefill_chunk(model)
    device = next(model.parameters()).device
    for start in range(0, longest, step):
        chunk = [b[start : start + step] for b in bodies]
        width = max(map(len, chunk))
        tokens = torch.tensor([c + [0] * (width - len(c)) for c in chunk], device=device)
        window = cache.window(rows, width, bidirectional=False)
        model(tokens, window.positions, window, "ar", logits=False)
        cache.lengths[rows] += torch.tensor([len(c) for c in chunk])
    return -(-longest // step)


def acceptance_length(accepted: list[int]) -> float:
    """Mean tokens per cycle (accepted drafts + the AR token), given accepted drafts per cycle."""
    return (sum(accepted) + len(accepted)) / max(1, len(accepted))


def extension_accepted(accepted: list[int], drafted: list[int], extended: list[int]) -> list[int]:
    """Per cycle, the accepted drafts that were lookup extension tokens (past the block draft)."""
    return [max(0, a - (d - e)) if e else 0 for a, d, e in zip(accepted, drafted, extended)]


def position_acceptance(accepted: list[int], block_size: int) -> list[float]:
    """Fraction of cycles in which draft position i (1-based, up to block_size - 1) was accepted."""
    return [sum(a >= i for a in accepted) / max(1, len(accepted)) for i in range(1, block_size)]


LOOKUP_NGRAMS = (3, 2)  # suffix lengths prompt lookup matches, longest first
MAX_LOOKUP_DRAFTS = 7  # the planner verifies fewer when the pass costs say so
EXPLORE_EVERY = 8  # a row that has not tried the drafter for this many cycles tries it again ...
MAX_EXPLORE_EVERY = 64  # ... or for up to this many, after tries in a row that lost to AR steps
# A row's expected drafts a drafter cycle: its recent cycles' mean, with PRIOR_CYCLES pseudo-cycles
# of PRIOR_ACCEPTED. A row turns to AR steps right after bad luck, and its AR steps learn nothing
# about the drafter: with one pseudo-cycle of 1.0, rows kept to AR steps where the drafter went on
# to accept 1.5-1.9 drafts a cycle (`benchmarks/planner_replay.py`; AVX2 build, MT-Bench: 562 AR
# steps in 848 cycles, now 109).
PRIOR_ACCEPTED = 1.5
PRIOR_CYCLES = 4
MAX_LEAVES = 4  # tree leaves (other tokens at the block draft's positions) a drafter cycle may verify
MAX_EXTENSION = 4  # lookup tokens after the block draft (the chain made longer) a drafter cycle may verify
LEAF_CHOICES = 3  # other tokens weighed per draft position
MIN_LEAF_CHANCE = 0.01  # a leaf less likely than this is never worth its row, however cheap rows look
SOURCES = ("diffusion", "lookup", "tree", "ar")  # "tree": leaves beside the diffusion draft


def most_verify_tokens(block_size: int) -> int:
    """The widest verify pass the planner weighs: a lookup's, or the anchor, block draft and MAX_LEAVES
    more rows (leaves, or a lookup extension); the pass costs are measured up to it."""
    return max(block_size + MAX_LEAVES, MAX_LOOKUP_DRAFTS + 1)


class PromptLookup:
    """Prompt lookup over a row's growing tokens (prompt, then what it generates): up to `max_drafts`
    tokens that followed the latest earlier occurrence of the last n tokens (n tried longest first).
    Each n-gram's latest start is kept in an index that grows with the tokens, so a lookup costs the
    new tokens since the last one, not a scan of the whole context (0.3 ms a cycle at 1,500 tokens)."""

    def __init__(self, ngrams: tuple[int, ...] = LOOKUP_NGRAMS):
        self.ngrams = ngrams
        self.latest: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in ngrams}
        self.indexed = dict.fromkeys(ngrams, 0)  # starts [0, indexed[n]) are in latest[n]

    def drafts(self, tokens: list[int], max_drafts: int, ahead: list[int] = ()) -> list[int]:
        """`tokens` must extend the list of the previous call; [] when no suffix occurs earlier. `ahead`:
        tokens not committed yet (a block's drafts) that the suffix ends with, never indexed: what
        followed the drafts' last n tokens earlier in the text."""
        text = tokens + list(ahead) if ahead else tokens
        for n in self.ngrams:
            if len(tokens) <= n:
                continue
            latest = self.latest[n]
            for start in range(self.indexed[n], len(tokens) - n):  # every n-gram before the suffix itself
                latest[tuple(tokens[start : start + n])] = start
            self.indexed[n] = max(self.indexed[n], len(tokens) - n)
            start = latest.get(tuple(text[-n:]))
            if start is not None:
                return text[start + n : start + n + max_drafts]
        return []


@dataclass(frozen=True)
class PassCosts:
    """Seconds of one forward pass over a warm cache of `context` tokens: `verify[t]` for an AR pass
    of t tokens (index 0 unused), `draft` for the diffusion pass over a block; and what each further
    cached token adds to them (`verify_per_token[t]`, `draft_per_token`): attention reads the whole
    cache, and on a CPU it costs a pass of several tokens far more per cached token than a step."""

    verify: tuple[float, ...]
    draft: float
    context: int = 0
    verify_per_token: tuple[float, ...] = ()
    draft_per_token: float = 0.0

    def verify_pass(self, tokens: int, context: int | None = None) -> float:
        t = min(tokens, len(self.verify) - 1)
        return self.verify[t] + (self.verify_per_token[t] if self.verify_per_token else 0.0) * self._more(context)

    def draft_pass(self, context: int | None = None) -> float:
        return self.draft + self.draft_per_token * self._more(context)

    def _more(self, context: int | None) -> int:  # cached tokens past the measured ones (fewer: the measured cost)
        return max(0, (context or 0) - self.context)

    @classmethod
    def counting_passes(cls, max_tokens: int) -> "PassCosts":
        """Every pass costs the same: the planner then maximises tokens per pass."""
        return cls((0.0,) + (1.0,) * max_tokens, 1.0)

    def as_dict(self) -> dict:
        return {"verify": list(self.verify), "draft": self.draft, "context": self.context,
                "verify_per_token": list(self.verify_per_token), "draft_per_token": self.draft_per_token}


PASS_COSTS_METHOD = 5  # moves when measure_pass_costs measures otherwise: files of another method are re-measured


@torch.inference_mode()
def measure_pass_costs(model: OrthrusLM, block_size: int, max_tokens: int, contexts: tuple[int, int] = (128, 1024),
                       repeats: int = 6) -> PassCosts:
    """Time AR passes of 1..max_tokens tokens and the block's draft pass after each of two cache
    lengths (the fastest of `repeats` each): the costs at the first, and per cached token the rise
    to the second. Each repeat times every pass once, in turn, and the two lengths are two rows of
    one cache, so a slow spell of the machine hits one repeat of every pass rather than every repeat
    of one (which would make that pass look dear next to the others: a planner weighs them against
    each other). A pass over more tokens is never taken as cheaper, nor a longer cache."""
    param = next(model.parameters())
    cache = KVCache(model.config, 2, max(contexts) + max(max_tokens, block_size) + 1, param.dtype, param.device)
    prefill(model, cache, torch.tensor([0, 1]), [[0] * context for context in contexts])  # as a prompt's prefill fills them
    shapes = [("ar", t) for t in range(1, max_tokens + 1)] + [("diffusion", block_size)]
    best = {shape: [math.inf, math.inf] for shape in shapes}
    for repeat in range(repeats + 1):  # the first round warms up (the first use packs weights) and is not kept
        for view, tokens in shapes:
            for row in (0, 1):
                took = time_pass(model, cache, row, view, tokens)
                if repeat:
                    best[view, tokens][row] = min(best[view, tokens][row], took)
    verify, far_verify = [0.0], [0.0]
    for t in range(1, max_tokens + 1):
        near, far = best["ar", t]
        verify.append(max(near, verify[-1]))
        far_verify.append(max(far, far_verify[-1]))
    draft, far_draft = best["diffusion", block_size]
    span = contexts[1] - contexts[0]
    per_token = [0.0]
    for near, far in zip(verify[1:], far_verify[1:]):
        per_token.append(max((far - near) / span, per_token[-1]))
    return PassCosts(tuple(verify), draft, contexts[0], tuple(per_token), max(0.0, (far_draft - draft) / span))


def time_pass(model: OrthrusLM, cache: KVCache, row: int, view: View, tokens: int) -> float:
    """Seconds one pass of `tokens` tokens in `view` takes over row `row` of `cache`, nothing
    committed: the draft pass with its head, or an AR pass."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    window = cache.window(torch.tensor([row]), tokens, bidirectional=view == "diffusion")
    block = torch.zeros(1, tokens, dtype=torch.long, device=device)
    if view == "diffusion":
        model.draft(block, window.positions, window)
    else:
        model(block, window.positions, window, view)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@dataclass
class Plan:
    source: str  # one of SOURCES
    drafts: list[int] = field(default_factory=list)  # the lookup drafts (source "lookup")


def plan_cycle(seqs: list["Sequence"], block_size: int, costs: PassCosts, sources: tuple[str, ...],
               room: list[int]) -> list[Plan]:
    """The cycle planner: per row, the plan with the most expected tokens per second.

    Expected tokens come from the row's own recent cycles (a function of its history alone, so a
    row plans the same in a batch as alone): 1 + the mean accepted diffusion drafts for the
    drafter; 1 + r_1 + r_1 r_2 + ... + r_1 ... r_n for n lookup drafts, r_j the row's recent rate at
    lookup position j once the drafts before it are accepted (`SequenceStats.lookup_rates`); 1 for
    an AR step. Seconds come from `costs`. A row that has not tried the drafter for
    EXPLORE_EVERY cycles tries it instead of an AR step, so its estimate follows the text. `room`:
    the most lookup drafts each row can use (its cache slots and token budget)."""
    plans = []
    for s, space in zip(seqs, room):
        context = s.context
        options = [(1 / costs.verify_pass(1, context), Plan("ar"))] if "ar" in sources else []
        if "diffusion" in sources:
            tokens = 1 + s.stats.recent_accepted("diffusion")
            options.append((tokens / (costs.draft_pass(context) + costs.verify_pass(block_size, context)), Plan("diffusion")))
        found = s.lookup.drafts(s.prompt + s.generated, min(MAX_LOOKUP_DRAFTS, space)) if "lookup" in sources and space > 0 else []
        tokens = 1.0
        for n, reach in enumerate(itertools.accumulate(s.stats.lookup_rates(len(found)), operator.mul), 1):
            tokens += reach  # the chance the chain gets through draft n
            options.append((tokens / costs.verify_pass(n + 1, context), Plan("lookup", found[:n])))
        if not options:
            options.append((0.0, Plan("ar")))  # only lookup allowed and none found
        plan = max(options, key=lambda option: option[0])[1]
        if (plan.source == "ar" and "diffusion" in sources
                and "diffusion" not in s.stats.sources[-exploration_interval(s.stats, block_size, costs, context):]):
            plan = Plan("diffusion")
        plans.append(plan)
    return plans


def chance_scales(positions: int, temperatures: tuple[float, ...], greedy: list[bool]) -> torch.Tensor | None:
    """Scales [N, B-1] of draft logits [N, B-1, V] whose softmax is then the planner's chance that a token
    is the one verification keeps at its position: a greedy row's 1 / the drafter's `chance_temperatures`
    (position j by the j-th, the last one past them), a sampling row's 1 (as drafted); None: all 1."""
    if not temperatures or not any(greedy):
        return None
    per_position = [1 / temperatures[min(j, len(temperatures) - 1)] for j in range(positions)]
    return torch.tensor([per_position if g else [1.0] * positions for g in greedy])


def plan_tree(seqs: list["Sequence"], logits: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor,
              costs: PassCosts, room: list[int], leaves: bool = True, extend: bool = True,
              temperatures: tuple[float, ...] = ()) -> tuple[Leaves | None, list[list[int]]]:
    """The planner's second half, after the draft pass: per drafting row, the tokens its verify pass
    takes besides the block draft, the likeliest first, while the expected tokens they add beat what
    their rows add to the pass (each row by its own costs and history, so a row plans alike in a batch
    and alone):
    - tree leaves (`leaves`): another token t for draft j's position, as DDTree's best-first tree comes
      out for a few-token block. Its chance to be the accepted token there is, by the drafter's own
      distributions (softmax of the draft `logits` [N, B-1, V] at the drafter's chance `temperatures`,
      `chance_scales`), q_1(d_1) ... q_{j-1}(d_{j-1}) q_j(t) (a sampling row's drafts at its recent
      acceptance rates instead, `SequenceStats.draft_rates`).
    - a lookup extension (`extend`): the tokens that followed the drafts' last few tokens earlier in the
      row's text (`PromptLookup` keyed on the drafts), verified after them as a longer chain, where a
      copy goes on past what the drafter drafts (summaries, code, repeated phrases). Extension token i
      is reached if every draft is right, q_1(d_1) ... q_k(d_k), and the extension tokens before it
      are, each at the row's recent rate for its position (`SequenceStats.extension_rates`).
    `room`: the most drafts each row can use (its cache slots and token budget). Returns the leaves
    (None: none) and each row's extension tokens. (A few dozen numbers go to Python: small tensor ops
    right after a pass cost more than the loops.)"""
    scales = chance_scales(logits.shape[1], temperatures, [s.params.greedy for s in seqs])
    top, token, norm = kernels.top_tokens(logits, LEAF_CHOICES + 1, scales)  # the drafts' own tokens among them, skipped below
    chance = (top - norm[..., None]).exp().tolist()
    drafted = logits.gather(-1, drafts[..., None]).squeeze(-1)
    right = ((drafted if scales is None else drafted * scales.to(drafted.device)) - norm).exp().tolist()
    # a sampled draft is accepted with probability min(1, p/q): likely where p and q agree, however unlikely the
    # draft itself (BENCHMARKS.md, "The planner's chances, calibrated"), so a sampling row's count at its recent rates
    right = [r if s.params.greedy else s.stats.draft_rates(len(r)) for s, r in zip(seqs, right)]
    token, drafts = token.tolist(), drafts.tolist()
    most_rows = len(costs.verify) - 1  # no plan past the passes the costs know
    plans = []
    for s, row_chance, row_token, row_right, row_drafts, kept, space in zip(seqs, chance, token, right, drafts,
                                                                           lengths.tolist(), room):
        reach, candidates = 1.0, []  # (chance, token, depth): a leaf's depth is its draft's position, an extension's past the drafts
        for j in range(kept):
            if leaves:
                candidates += [(reach * c, t, j + 1) for c, t in zip(row_chance[j], row_token[j])
                               if t != row_drafts[j] and reach * c >= MIN_LEAF_CHANCE][:LEAF_CHOICES]
            reach *= row_right[j]
        candidates = sorted(candidates, reverse=True)[:MAX_LEAVES]
        room_left = min(MAX_EXTENSION, space - kept, most_rows - 1 - kept)
        if extend and room_left > 0:
            found = s.lookup.drafts(s.prompt + s.generated, room_left, row_drafts[:kept])
            chances = list(itertools.accumulate(s.stats.extension_rates(len(found)), operator.mul, initial=reach))[1:]
            candidates = sorted(candidates + [(c, t, kept + i) for i, (c, t) in enumerate(zip(chances, found), 1)
                                              if c >= MIN_LEAF_CHANCE], reverse=True)
        candidates = candidates[: max(0, most_rows - 1 - kept)]
        context = s.context
        tokens, draft = 1 + s.stats.recent_accepted("diffusion"), costs.draft_pass(context)
        rates, gained = [tokens / (draft + costs.verify_pass(1 + kept, context))], tokens
        for m, (chance_m, _, _) in enumerate(candidates, 1):
            gained += chance_m
            rates.append(gained / (draft + costs.verify_pass(1 + kept + m, context)))
        plans.append((kept, candidates[: max(range(len(rates)), key=lambda m: (rates[m], -m))]))
    extensions = [[t for _, t, depth in sorted(plan, key=lambda c: c[2]) if depth > kept] for kept, plan in plans]
    picked = [[(t, depth) for _, t, depth in plan if depth <= kept] for kept, plan in plans]
    width = max(map(len, picked))
    if width == 0:
        return None, extensions
    padded = [row + [(0, 0)] * (width - len(row)) for row in picked]  # depth 0: padding
    tree = torch.tensor(padded, dtype=torch.long, device=logits.device)
    return Leaves(tree[..., 0], tree[..., 1]), extensions


def exploration_interval(stats: "SequenceStats", block_size: int, costs: PassCosts, context: int | None = None) -> int:
    """Cycles between tries of the drafter on a row that takes AR steps: EXPLORE_EVERY, doubled for
    each of the row's latest drafter cycles in a row that gave fewer tokens a second than AR steps
    would have (up to MAX_EXPLORE_EVERY). Where drafting does not pay, trying it costs a row ~1/64
    of its time instead of ~1/8; one winning try brings the interval back."""
    cycle_seconds, interval = costs.draft_pass(context) + costs.verify_pass(block_size, context), EXPLORE_EVERY
    recent = itertools.islice(zip(reversed(stats.accepted), reversed(stats.sources)), 2 * MAX_EXPLORE_EVERY)
    for accepted, source in recent:
        if source != "diffusion":
            continue
        if interval >= MAX_EXPLORE_EVERY or (1 + accepted) / cycle_seconds >= 1 / costs.verify_pass(1, context):
            break
        interval *= 2
    return min(interval, MAX_EXPLORE_EVERY)


def chained_rates(outcomes: list[tuple[int, int]], positions: int) -> list[float]:
    """Per position j of a copied chain (lookup drafts), the chance its draft is accepted once those
    before it are, from (drafts offered, drafts accepted) of recent chains. A copy that starts right
    tends to go on (HumanEval's lookup drafts: 65% of first ones accepted, then 82%, 94%, 100%), so
    position j's prior is position j - 1's rate with the weight of two chains (position 0's: 1/2)."""
    hits, tries = [0] * positions, [0] * positions
    for offered, accepted in outcomes:
        for j in range(min(positions, offered, accepted + 1)):
            tries[j] += 1
            hits[j] += accepted > j
    rates, prior = [], 0.5
    for h, t in zip(hits, tries):
        prior = (h + 2 * prior) / (t + 2)
        rates.append(prior)
    return rates


@dataclass
class SequenceStats:
    accepted: list[int] = field(default_factory=list)  # accepted drafts per cycle
    sources: list[str] = field(default_factory=list)  # where each cycle's drafts came from (SOURCES)
    drafted: list[int] = field(default_factory=list)  # drafts verified per cycle
    branches: list[int] = field(default_factory=list)  # 1 where the cycle's last accepted draft was a tree leaf
    extended: list[int] = field(default_factory=list)  # lookup extension drafts verified per cycle (after the block draft)

    @property
    def cycles(self) -> int:
        return len(self.accepted)

    def recent_accepted(self, source: str, window: int = 16) -> float:
        """Mean accepted drafts over the last `window` cycles of `source`, with PRIOR_CYCLES pseudo-cycles of PRIOR_ACCEPTED."""
        recent = [a for a, s in zip(reversed(self.accepted), reversed(self.sources)) if s == source][:window]
        return (sum(recent) + PRIOR_ACCEPTED * PRIOR_CYCLES) / (len(recent) + PRIOR_CYCLES)

    def draft_rates(self, positions: int, window: int = 16) -> list[float]:
        """Per block draft position, the chance a draft there is accepted once the drafts before it are,
        over the last `window` drafter cycles that verified it (Laplace: 1/2 with none). A tree leaf
        accepted in a draft's place does not count as that draft's."""
        hits, tries = [0] * positions, [0] * positions
        seen = 0
        for a, d, e, leaf, source in zip(reversed(self.accepted), reversed(self.drafted), reversed(self.extended),
                                         reversed(self.branches), reversed(self.sources)):
            if source != "diffusion":
                continue
            chain = a - leaf if a <= d - e else d - e  # block drafts accepted (past them: extension tokens)
            for j in range(min(positions, chain + 1, d - e)):
                tries[j] += 1
                hits[j] += chain > j
            seen += 1
            if seen == window:
                break
        return [(h + 1) / (t + 2) for h, t in zip(hits, tries)]

    def lookup_rates(self, positions: int, window: int = 16) -> list[float]:
        """Per lookup draft position, the chance a lookup draft there is accepted once the ones before it
        are, over the last `window` lookup cycles (`chained_rates`)."""
        recent = ((d, a) for a, d, s in zip(reversed(self.accepted), reversed(self.drafted), reversed(self.sources))
                  if s == "lookup")
        return chained_rates(list(itertools.islice(recent, window)), positions)

    def extension_rates(self, positions: int, window: int = 16) -> list[float]:
        """Per lookup extension position, the chance an extension draft there is accepted once the drafts
        before it are, over the last `window` cycles that reached their extension (every block draft
        accepted; `chained_rates`)."""
        reached = ((e, a - (d - e)) for a, d, e, leaf in zip(reversed(self.accepted), reversed(self.drafted),
                                                              reversed(self.extended), reversed(self.branches))
                   if e and a >= d - e and not leaf)
        return chained_rates(list(itertools.islice(reached, window)), positions)  # the latest first, no further

    @property
    def forwards(self) -> int:
        """Decoding passes this row took part in: a diffusion cycle drafts and verifies, others only verify."""
        return sum(2 if s == "diffusion" else 1 for s in self.sources)


@dataclass(eq=False)  # identity semantics: two requests with the same prompt are different sequences
class Sequence:
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    stop_token_ids: frozenset[int] = frozenset()
    id: int = field(default_factory=itertools.count().__next__)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stats: SequenceStats = field(default_factory=SequenceStats)
    lookup: PromptLookup = field(default_factory=PromptLookup)
    row: int | None = None
    anchor: int | None = None
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def context(self) -> int:
        """Tokens of the row so far (prompt and generated): the cache length its passes attend over."""
        return len(self.prompt) + len(self.generated)


@dataclass
class StepOutput:
    sequence: Sequence
    new_tokens: list[int]


class Engine:
    def __init__(self, model: OrthrusLM, max_rows: int, max_len: int, mode: Mode = "orthrus", block_size: int | None = None,
                 draft_confidence: float = 0.0, sources: tuple[str, ...] = SOURCES, pass_costs: PassCosts | None = None):
        if mode not in ("orthrus", "ar"):
            raise OrthrusError(f"mode must be 'orthrus' or 'ar', got {mode!r}")
        if not 0 <= draft_confidence <= 1:
            raise OrthrusError(f"draft confidence must be in [0, 1] (0 verifies every draft), got {draft_confidence!r}")
        if not sources or set(sources) - set(SOURCES):
            raise OrthrusError(f"draft sources are some of {', '.join(SOURCES)}, got {sources!r}")
        self.model, self.mode, self.draft_confidence, self.sources = model, mode, draft_confidence, tuple(sources)
        self.block_size = 1 if mode == "ar" else (block_size or model.config.block_size)
        if self.block_size < 1 or (mode == "orthrus" and self.block_size < 2):
            raise OrthrusError(f"block size must be >= 2 in orthrus mode, got {self.block_size}")
        param = next(model.parameters())
        self.device = param.device
        self.pass_costs = pass_costs or PassCosts.counting_passes(most_verify_tokens(self.block_size))
        self.cache = KVCache(model.config, max_rows, max_len, param.dtype, param.device)
        self.free_rows = list(range(max_rows))
        self.running: dict[int, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.forwards = 0

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def capacity_error(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """Why a request does not fit (the model's positions, or this engine's cache rows), or None."""
        limit = min(self.model.config.max_position_embeddings, self.max_len - self.block_size)
        if prompt_len + max_new_tokens > limit:
            return (f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                    f"{limit} tokens; shorten the prompt or lower max_new_tokens (at most {max(0, limit - prompt_len)})")
        return None

    def add(self, seq: Sequence) -> None:
        if not seq.prompt:
            raise OrthrusError("the prompt is empty: give at least one token")
        if seq.max_new_tokens < 1:
            raise OrthrusError(f"max_new_tokens must be >= 1, got {seq.max_new_tokens}")
        vocab = self.model.config.vocab_size
        if min(seq.prompt) < 0 or max(seq.prompt) >= vocab:
            raise OrthrusError(f"prompt token ids must be in [0, {vocab})")
        if err := self.capacity_error(len(seq.prompt), seq.max_new_tokens):
            raise OrthrusError(err)
        if not seq.params.greedy:
            seed = seq.params.seed if seq.params.seed is not None else int(torch.randint(2**62, ()).item())
            seq.generator = torch.Generator().manual_seed(seed)
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence now (client gone, stop string hit); its row is free for the next cycle."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish_reason = seq.finish_reason or "abort"
        self._release(seq)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the cache's slots (rows x max_len) holding committed tokens of running rows."""
        rows = list(self.running)
        return float(self.cache.lengths[rows].sum()) / (self.cache.lengths.numel() * self.max_len) if rows else 0.0

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit waiting sequences into free rows, then run one cycle over every running row."""
        admitted = []
        while self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            seq.row = self.free_rows.pop(0)
            self.running[seq.row] = seq
            admitted.append(seq)
        if admitted:
            self._prefill(admitted)
        if not self.running:
            return []
        seqs = [self.running[r] for r in sorted(self.running)]
        outputs = []
        for seq, n_acc, tokens, source, n_drafted, branch, n_extended in zip(seqs, *self._cycle(seqs)):
            seq.stats.accepted.append(n_acc)
            seq.stats.sources.append(source)
            seq.stats.drafted.append(n_drafted)
            seq.stats.branches.append(branch)
            seq.stats.extended.append(n_extended)
            kept = []
            for tok in tokens:
                kept.append(tok)
                seq.generated.append(tok)
                if tok in seq.stop_token_ids:
                    seq.finish_reason = "stop"
                elif len(seq.generated) >= seq.max_new_tokens:
                    seq.finish_reason = "length"
                if seq.finished:
                    break
            seq.anchor = tokens[-1]
            outputs.append(StepOutput(seq, kept))
            if seq.finished:
                self._release(seq)
        return outputs

    def _release(self, seq: Sequence) -> None:
        if seq.row is not None and self.running.get(seq.row) is seq:
            del self.running[seq.row]
            self.cache.lengths[seq.row] = 0
            self.free_rows.append(seq.row)
            self.free_rows.sort()

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Write each prompt but its last token into the cache; the last token is the first anchor."""
        rows = torch.tensor([s.row for s in seqs])
        self.cache.lengths[rows] = 0
        for s in seqs:
            s.anchor = s.prompt[-1]
        self.forwards += prefill(self.model, self.cache, rows, [s.prompt[:-1] for s in seqs])

    def _uniforms(self, seqs: list[Sequence], count: int) -> torch.Tensor:
        """Per-row uniforms from each sequence's own generator: a seeded request repeats exactly
        whatever else shares its batch. Greedy rows need none (their p and q are one-hot)."""
        u = torch.zeros(len(seqs), count)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = torch.rand(count, generator=s.generator)
        return u.to(self.device)

    def _cycle(self, seqs: list[Sequence]) -> tuple[list[int], list[list[int]], list[str], list[int], list[int], list[int]]:
        """One cycle over every running row: (accepted drafts, new tokens, draft source, drafts verified,
        whether the last accepted draft was a tree leaf, lookup extension drafts verified) per row."""
        rows = torch.tensor([s.row for s in seqs])
        params = [s.params for s in seqs]
        anchors = torch.tensor([s.anchor for s in seqs], device=self.device)
        b = self.block_size
        most = max(b - 1 + MAX_EXTENSION, MAX_LOOKUP_DRAFTS)  # uniforms per row: drafts, accepts, the next token, leaves
        u = self._uniforms(seqs, 2 * most + 1 + MAX_LEAVES)
        u_accept, u_next = u[:, most : 2 * most], u[:, 2 * most]
        if self.mode == "ar":
            window = self.cache.window(rows, 1, bidirectional=False)
            logits = self.model(anchors[:, None], window.positions, window, "ar")
            self.forwards += 1
            self.cache.lengths[rows] += 1
            tokens = draw(logits, params, u[:, :1])[0][:, 0]
            return [0] * len(seqs), [[t] for t in tokens.tolist()], ["ar"] * len(seqs), [0] * len(seqs), [0] * len(seqs), [0] * len(seqs)
        # lookup drafts a row may take: the verify pass is as wide as its widest row for every row, so
        # it must fit the fullest row's cache slots; and none past the row's own token budget
        slots = self.max_len - 1 - int(self.cache.lengths[rows].max())
        room = [min(slots, s.max_new_tokens - len(s.generated)) - 1 for s in seqs]
        plans = plan_cycle(seqs, b, self.pass_costs, self.sources, room)
        diffuse = [i for i, plan in enumerate(plans) if plan.source == "diffusion"]
        width = max([len(plan.drafts) for plan in plans] + [b - 1] * bool(diffuse))  # drafts any row may verify
        drafts = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        # the drafts' distributions, for the accept rule, only when a row samples (a greedy row's stay
        # zero: its one-hot p decides alone); a lookup draft is a deterministic proposal, one-hot
        sampling = not all(p.greedy for p in params)
        q = torch.zeros(len(seqs), width, self.model.config.vocab_size, device=self.device) if sampling else None
        lengths = torch.tensor([len(plan.drafts) for plan in plans], device=self.device)
        for i, plan in enumerate(plans):
            if plan.drafts:
                drafts[i, : len(plan.drafts)] = torch.tensor(plan.drafts, device=self.device)
                if q is not None:
                    q[i, range(len(plan.drafts)), plan.drafts] = 1.0  # a deterministic proposal
        leaves, extended = None, [0] * len(seqs)
        if diffuse:
            # draft: one diffusion pass over [anchor, MASK...] for the rows the planner gave the
            # drafter; row j predicts position anchor + j + 1
            picked = torch.tensor(diffuse, device=self.device)
            block = torch.full((len(diffuse), b), self.model.mask_token_id, device=self.device)
            block[:, 0] = anchors[picked]
            window = self.cache.window(rows[picked.cpu()], b, bidirectional=True)
            draft_logits = self.model.draft(block, window.positions, window)
            drafts[picked, : b - 1], draft_probs = draw(draft_logits, [params[i] for i in diffuse], u[picked, : b - 1])
            if q is not None:
                for j, i in enumerate(diffuse):  # row by row: see sampling.row_at
                    q[i, : b - 1] = draft_probs[j]
            kept = torch.full((len(diffuse),), b - 1, device=self.device)
            if self.draft_confidence > 0:  # verify through the first unsure draft
                sure = draft_logits.softmax(-1).amax(-1) >= self.draft_confidence
                kept = (sure.long().cumprod(-1).sum(-1) + 1).clamp(max=b - 1)
            lengths[picked] = kept
            self.forwards += 1
            if "tree" in self.sources or "lookup" in self.sources:
                leaves, extensions = plan_tree([seqs[i] for i in diffuse], draft_logits, drafts[picked, : b - 1], kept,
                                               self.pass_costs, [room[i] for i in diffuse], "tree" in self.sources,
                                               "lookup" in self.sources, self.model.chance_temperatures)
                longest = max(n + len(e) for n, e in zip(kept.tolist(), extensions))
                if longest > drafts.shape[1]:  # the drafts' (and their distributions') room for the longest chain
                    drafts = torch.cat([drafts, drafts.new_zeros(len(seqs), longest - drafts.shape[1])], 1)
                    if q is not None:
                        q = torch.cat([q, q.new_zeros(len(seqs), longest - q.shape[1], q.shape[2])], 1)
                for j, (i, extension) in enumerate(zip(diffuse, extensions)):
                    if extension:  # after the drafts: a deterministic proposal each (one-hot q)
                        n = int(kept[j])
                        drafts[i, n : n + len(extension)] = torch.tensor(extension, device=self.device)
                        if q is not None:
                            q[i, range(n, n + len(extension)), extension] = 1.0
                        lengths[i], extended[i] = n + len(extension), len(extension)
        k = int(lengths.max())
        drafts = drafts[:, :k]
        # verify: one AR pass over [anchor, drafts] for every row, writing the cache; a tree's leaves
        # after them, each seeing the drafts before its position and itself
        verify_tokens = torch.cat([anchors[:, None], drafts], 1)
        depths = None
        fits = self.max_len - int(self.cache.lengths[rows].max()) - (k + 1)  # leaves the fullest row's slots can hold
        if leaves is not None and fits > 0:
            leaf_rows = min(leaves.tokens.shape[1], fits)  # each row's leaves go best first; other rows' are padding
            every = Leaves(*(torch.zeros(len(seqs), leaf_rows, dtype=torch.long, device=self.device) for _ in range(2)))
            every.tokens[picked], every.depths[picked] = leaves.tokens[:, :leaf_rows], leaves.depths[:, :leaf_rows]
            leaves = every
            verify_tokens = torch.cat([verify_tokens, leaves.tokens], 1)
            depths = torch.cat([torch.arange(k + 1).expand(len(seqs), -1), leaves.depths.cpu()], 1)
        else:
            leaves = None
        window = self.cache.window(rows, verify_tokens.shape[1], bidirectional=False, depths=depths)
        logits = self.model(verify_tokens, window.positions, window, "ar")
        self.forwards += 1
        accepted, next_tokens, leaf = accept(logits, params, drafts, None if q is None else q[:, :k], lengths,
                                             u_accept[:, :k], u_next, leaves, u[:, 2 * most + 1 :])
        new_tokens = [d[:a] + [t] for d, a, t in zip(drafts.tolist(), accepted.tolist(), next_tokens.tolist())]
        for i in (leaf >= 0).nonzero().flatten().tolist():  # the leaf's K/V to its position, after the drafts before it
            a, s = int(accepted[i]), int(leaf[i])
            start = int(self.cache.lengths[rows[i]])
            for kv in (self.cache.k, self.cache.v):
                kv[:, rows[i], :, start + a] = kv[:, rows[i], :, start + k + 1 + s]
            new_tokens[i][a - 1] = int(leaves.tokens[i, s])
        self.cache.lengths[rows] += accepted.cpu() + 1  # commit the anchor and the accepted drafts (a leaf's included)
        return (accepted.tolist(), new_tokens, [plan.source for plan in plans], lengths.tolist(), (leaf >= 0).long().tolist(),
                extended)
