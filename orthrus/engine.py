"""The decoding engine: a batch of sequences sharing one KV cache, advanced one cycle at a time.

Orthrus mode, per cycle (ORTHRUS.md section 2), for every running row at once:
  draft   diffusion view over [anchor, MASK x (B-1)]: drafts d_1..d_{B-1}
  verify  AR view over [anchor, d_1..d_{B-1}], causal, K/V written into the cache
  accept  speculative rule (greedy = argmax prefix), one extra token from the AR distribution
  commit  each row's length advances by its own 1 + accepted; the rest is cropped by not counting it
AR mode runs the same loop with no draft and a block of one token: the baseline.

Draft sources, chosen per row each cycle by `plan_drafts`: prompt lookup (the tokens that followed
the latest earlier occurrence of the row's last few tokens in its prompt and output, as HF prompt
lookup and llama.cpp lookup do) when it finds one, since it needs no draft pass; the diffusion
view otherwise. A lookup draft is a deterministic proposal (one-hot q), so the accept rule stays
exact; rows of one cycle may mix sources, and the draft pass runs only over the rows that need it.

Adaptive verify (`draft_confidence` > 0): drafts after the first one the drafter itself is unsure
of (top probability below the threshold) are not verified, which shortens the verify pass where
a pass costs more with more tokens (CPUs). The cut depends on the draft side only, so the
accept rule stays exact.

Invariant: the cache holds every committed token of a row except the last one, the anchor.
Requests join between cycles (their prompt is prefilled into a free row) and leave at once.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch

from .cache import KVCache
from .errors import OrthrusError
from .model import OrthrusLM
from .sampling import SamplingParams, sample, sampling_probs, speculative_accept

Mode = Literal["orthrus", "ar"]
PREFILL_CHUNK = 1024  # prompt tokens per prefill forward: bounds attention memory on long prompts


def acceptance_length(accepted: list[int]) -> float:
    """Mean tokens per cycle (accepted drafts + the AR token), given accepted drafts per cycle."""
    return (sum(accepted) + len(accepted)) / max(1, len(accepted))


def position_acceptance(accepted: list[int], block_size: int) -> list[float]:
    """Fraction of cycles in which draft position i (1-based, up to block_size - 1) was accepted."""
    return [sum(a >= i for a in accepted) / max(1, len(accepted)) for i in range(1, block_size)]


LOOKUP_NGRAMS = (3, 2)  # suffix lengths prompt lookup matches, longest first
SOURCES = ("diffusion", "lookup", "ar")


def lookup_drafts(tokens: list[int], max_drafts: int, ngrams: tuple[int, ...] = LOOKUP_NGRAMS) -> list[int]:
    """Prompt lookup: up to `max_drafts` tokens that followed the latest earlier occurrence of the
    last n tokens of `tokens` (n tried longest first); [] when none occurs."""
    for n in ngrams:
        if len(tokens) <= n:
            continue
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + max_drafts]
    return []


def plan_drafts(seqs: list["Sequence"], max_drafts: int, lookup: bool) -> list[list[int]]:
    """The cycle planner: per row, the lookup drafts to verify, or [] to draft with the diffusion
    view. A lookup cycle takes one pass, a diffusion cycle two, so a row takes its lookup drafts
    when their expected tokens per pass beat the diffusion draft's, each estimated from the row's
    own recent cycles of that source (a function of the row's history alone: batch == alone)."""
    if not lookup:
        return [[] for _ in seqs]
    plans = []
    for s in seqs:
        drafts = lookup_drafts(s.prompt + s.generated, max_drafts)
        if drafts and 1 + s.stats.recent_accepted("lookup") < (1 + s.stats.recent_accepted("diffusion")) / 2:
            drafts = []
        plans.append(drafts)
    return plans


@dataclass
class SequenceStats:
    accepted: list[int] = field(default_factory=list)  # accepted drafts per cycle
    sources: list[str] = field(default_factory=list)  # where each cycle's drafts came from (SOURCES)

    @property
    def cycles(self) -> int:
        return len(self.accepted)

    def recent_accepted(self, source: str, window: int = 16, prior: float = 1.0) -> float:
        """Mean accepted drafts over the last `window` cycles of `source`, with one pseudo-cycle of `prior`."""
        recent = [a for a, s in zip(reversed(self.accepted), reversed(self.sources)) if s == source][:window]
        return (sum(recent) + prior) / (len(recent) + 1)

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
    row: int | None = None
    anchor: int | None = None
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutput:
    sequence: Sequence
    new_tokens: list[int]


class Engine:
    def __init__(self, model: OrthrusLM, max_rows: int, max_len: int, mode: Mode = "orthrus", block_size: int | None = None,
                 draft_confidence: float = 0.0, lookup: bool = True):
        if mode not in ("orthrus", "ar"):
            raise OrthrusError(f"mode must be 'orthrus' or 'ar', got {mode!r}")
        if not 0 <= draft_confidence <= 1:
            raise OrthrusError(f"draft confidence must be in [0, 1] (0 verifies every draft), got {draft_confidence!r}")
        self.model, self.mode, self.draft_confidence, self.lookup = model, mode, draft_confidence, lookup
        self.block_size = 1 if mode == "ar" else (block_size or model.config.block_size)
        if self.block_size < 1 or (mode == "orthrus" and self.block_size < 2):
            raise OrthrusError(f"block size must be >= 2 in orthrus mode, got {self.block_size}")
        param = next(model.parameters())
        self.device = param.device
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
        accepted, new_tokens, sources = self._cycle(seqs)
        outputs = []
        for seq, n_acc, tokens, source in zip(seqs, accepted, new_tokens, sources):
            seq.stats.accepted.append(n_acc)
            seq.stats.sources.append(source)
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
        bodies = [s.prompt[:-1] for s in seqs]
        for s in seqs:
            s.anchor = s.prompt[-1]
        longest = max(map(len, bodies))
        for start in range(0, longest, PREFILL_CHUNK):
            chunk = [b[start : start + PREFILL_CHUNK] for b in bodies]
            width = max(map(len, chunk))
            tokens = torch.tensor([c + [0] * (width - len(c)) for c in chunk], device=self.device)
            window = self.cache.window(rows, width, bidirectional=False)
            self.model(tokens, window.positions, window, "ar", logits=False)
            self.forwards += 1
            self.cache.lengths[rows] += torch.tensor([len(c) for c in chunk])

    def _uniforms(self, seqs: list[Sequence], count: int) -> torch.Tensor:
        """Per-row uniforms from each sequence's own generator: a seeded request repeats exactly
        whatever else shares its batch. Greedy rows need none (their p and q are one-hot)."""
        u = torch.zeros(len(seqs), count)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = torch.rand(count, generator=s.generator)
        return u.to(self.device)

    def _cycle(self, seqs: list[Sequence]) -> tuple[list[int], list[list[int]], list[str]]:
        """One cycle over every running row: (accepted drafts, new tokens, draft source) per row."""
        rows = torch.tensor([s.row for s in seqs])
        params = [s.params for s in seqs]
        anchors = torch.tensor([s.anchor for s in seqs], device=self.device)
        b = self.block_size
        u = self._uniforms(seqs, 2 * b - 1)
        if self.mode == "ar":
            window = self.cache.window(rows, 1, bidirectional=False)
            p = sampling_probs(self.model(anchors[:, None], window.positions, window, "ar"), params)
            self.forwards += 1
            self.cache.lengths[rows] += 1
            return [0] * len(seqs), [[t] for t in sample(p[:, 0], u[:, 0]).tolist()], ["ar"] * len(seqs)
        looked_up = plan_drafts(seqs, b - 1, self.lookup)
        diffuse = [i for i, d in enumerate(looked_up) if not d]
        vocab = self.model.config.vocab_size
        drafts = torch.zeros(len(seqs), b - 1, dtype=torch.long, device=self.device)
        q = torch.zeros(len(seqs), b - 1, vocab, device=self.device)
        lengths = torch.tensor([len(d) for d in looked_up], device=self.device)
        for i, d in enumerate(looked_up):
            if d:
                drafts[i, : len(d)] = torch.tensor(d, device=self.device)
                q[i, range(len(d)), d] = 1.0  # a deterministic proposal
        if diffuse:
            # draft: one diffusion pass over [anchor, MASK...] for the rows without a lookup;
            # row j predicts position anchor + j + 1
            picked = torch.tensor(diffuse, device=self.device)
            block = torch.full((len(diffuse), b), self.model.mask_token_id, device=self.device)
            block[:, 0] = anchors[picked]
            window = self.cache.window(rows[picked.cpu()], b, bidirectional=True)
            draft_logits = self.model(block, window.positions, window, "diffusion")[:, :-1]
            q[picked] = sampling_probs(draft_logits, [params[i] for i in diffuse])
            drafts[picked] = sample(q[picked], u[picked, : b - 1])
            kept = torch.full((len(diffuse),), b - 1, device=self.device)
            if self.draft_confidence > 0:  # verify through the first unsure draft
                sure = draft_logits.softmax(-1).amax(-1) >= self.draft_confidence
                kept = (sure.long().cumprod(-1).sum(-1) + 1).clamp(max=b - 1)
            lengths[picked] = kept
            self.forwards += 1
        k = int(lengths.max())
        drafts, q = drafts[:, :k], q[:, :k]
        # verify: one AR pass over [anchor, drafts] for every row, writing the cache
        window = self.cache.window(rows, k + 1, bidirectional=False)
        verify_tokens = torch.cat([anchors[:, None], drafts], 1)
        p = sampling_probs(self.model(verify_tokens, window.positions, window, "ar"), params)
        self.forwards += 1
        accepted, next_tokens = speculative_accept(p, q, drafts, u[:, b - 1 : b - 1 + k], u[:, 2 * b - 2], lengths)
        self.cache.lengths[rows] += accepted.cpu() + 1  # commit the anchor and the accepted drafts
        drafts, accepted, next_tokens = drafts.tolist(), accepted.tolist(), next_tokens.tolist()
        sources = ["lookup" if d else "diffusion" for d in looked_up]
        return accepted, [d[:a] + [t] for d, a, t in zip(drafts, accepted, next_tokens)], sources
