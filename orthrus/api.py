"""The public API: `orthrus.load(...)` and `Orthrus.generate / stream`.

Takes text, chat messages (the tokenizer's chat template is applied) or token ids, one prompt
or a batch, and decodes them together through the engine in orthrus or AR mode.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence as Seq, Union

import torch

from . import kernels
from .checkpoint import drafter_fits, load_drafter, load_model
from .engine import (MAX_LOOKUP_DRAFTS, PASS_COSTS_METHOD, SOURCES, Engine, Mode, PassCosts, Sequence, acceptance_length,
                     extension_accepted, measure_pass_costs, most_verify_tokens, position_acceptance)
from .errors import OrthrusError
from .hub import DEFAULT_DRAFTER, DEFAULT_MODEL, cache_dir, resolve_model
from .sampling import SamplingParams

Prompt = Union[str, list[dict], list[int]]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class GenerationStats:
    tokens: int
    accepted: list[int]  # accepted drafts in each cycle
    block_size: int  # 1 in AR mode
    seconds: float
    forwards: int  # decoding passes: draft + verify in a diffusion cycle, one otherwise
    sources: list[str] = field(default_factory=list)  # each cycle's draft source (engine.SOURCES)
    drafted: list[int] = field(default_factory=list)  # drafts verified in each cycle
    branches: list[int] = field(default_factory=list)  # 1 where a cycle's last accepted draft was a tree leaf
    extended: list[int] = field(default_factory=list)  # lookup extension drafts verified in each cycle

    @property
    def cycles(self) -> int:
        return len(self.accepted)

    @property
    def tokens_per_cycle(self) -> float:
        """Mean acceptance length: tokens emitted per verify (accepted drafts + 1)."""
        return acceptance_length(self.accepted)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def position_acceptance(self) -> list[float]:
        """Fraction of cycles in which draft position i (1-based) was accepted."""
        return position_acceptance(self.accepted, self.block_size)

    def as_dict(self) -> dict:
        by_source = {src: sum(a for a, s in zip(self.accepted, self.sources) if s == src) for src in SOURCES if src in self.sources}
        if leaves := sum(self.branches):  # a drafter cycle's accepted tree leaf: from the tree, not the block draft
            by_source["diffusion"] -= leaves
            by_source["tree"] = leaves
        if extension := sum(extension_accepted(self.accepted, self.drafted, self.extended)):  # lookup after the block draft
            by_source["diffusion"] -= extension
            by_source["lookup"] = by_source.get("lookup", 0) + extension
        return {"cycles": self.cycles, "tokens": self.tokens, "forwards": self.forwards,
                "tokens_per_cycle": round(self.tokens_per_cycle, 3), "tokens_per_second": round(self.tokens_per_second, 2),
                "seconds": round(self.seconds, 3), "position_acceptance": [round(x, 3) for x in self.position_acceptance],
                "cycles_by_source": {src: self.sources.count(src) for src in SOURCES if src in self.sources},
                "accepted_by_source": by_source}


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    prompt_tokens: int = 0


class TextStream:
    """Incremental detokenisation with stop strings: emits only text that can no longer change
    (no half UTF-8 character, no prefix of a stop string) and cuts at the first stop string."""

    def __init__(self, tokenizer, stop: Seq[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.tokens = 0  # tokens the text came from: all pushed, or up to the one completing a stop string

    def push(self, ids: list[int], final: bool = False) -> str:
        before = len(self.ids)
        self.ids.extend(ids)
        self.tokens = len(self.ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, self.stopped, final = text[: min(hits)], True, True
            self.tokens = next(n for n in range(before + 1, len(self.ids) + 1)  # the stop string completed in this push
                               if self._has_stop(self.tokenizer.decode(self.ids[:n], skip_special_tokens=True)))
        self.text = text
        safe = len(text)
        if not final:
            safe = len(text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a tail that could still grow into a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        delta = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def _has_stop(self, text: str) -> bool:
        return any(s in text for s in self.stop)


class Orthrus:
    def __init__(self, model, tokenizer, name: str, drafter: str | None, drafter_trained: bool,
                 extra_stop_ids: Seq[int] = ()):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.drafter, self.drafter_trained = drafter, drafter_trained
        self._pass_costs: dict = {}
        self.stop_token_ids = frozenset(model.config.eos_token_id) | frozenset(extra_stop_ids) | (
            frozenset([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else frozenset())

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def pass_costs(self, block_size: int | None = None, refresh: bool = False) -> PassCosts:
        """This machine's pass times for the planner: measured once (a second or two) and kept in
        the cache folder per architecture, dtype, device, thread count and kernel build (what a
        pass's time depends on); `refresh` measures again."""
        block = block_size or self.block_size
        identity, path = self.calibration_file(block)
        if not refresh and path in self._pass_costs:
            return self._pass_costs[path]
        costs = None if refresh else read_pass_costs(path)
        if costs is None:
            print("orthrus: timing this machine's passes for the planner (once per model, dtype and threads)...",
                  file=sys.stderr, flush=True)
            costs = measure_pass_costs(self.model, block, most_verify_tokens(block))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**costs.as_dict(), "identity": identity}, indent=1))
            tmp.replace(path)
        self._pass_costs[path] = costs
        return costs

    def calibration_file(self, block_size: int) -> tuple[dict, Path]:
        """What this model's pass times depend on, and the file they are kept in."""
        param = next(self.model.parameters())
        identity = {"config": repr(self.model.config), "dtype": str(param.dtype), "device": str(param.device),
                    "threads": torch.get_num_threads(), "block": block_size, "most_verify": most_verify_tokens(block_size),
                    "torch": torch.__version__,
                    "kernels": kernels.module() is not None and kernels.enabled and kernels.build_id(),
                    "int8_drafts": self.model.int8_drafts, "method": PASS_COSTS_METHOD,
                    "draft_vocab": None if self.model.draft_vocab is None else len(self.model.draft_vocab),
                    "cpu": platform.processor() or platform.machine()}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        return identity, cache_dir() / "calibration" / f"{key}.json"

    def encode(self, prompt: Prompt, chat_template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a prompt; chat messages go through the tokenizer's chat template, with
        `chat_template_kwargs` passed to it (e.g. {"enable_thinking": False} for Qwen3)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise OrthrusError("each chat message needs a string 'role' and 'content'")
            # variables for the template only: its own arguments (a template, tools, ...) are not for a request to set
            reserved = set(inspect.signature(self.tokenizer.apply_chat_template).parameters) & set(chat_template_kwargs or {})
            if reserved:
                raise OrthrusError(f"chat_template_kwargs cannot set {', '.join(sorted(reserved))}")
            ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                     **(chat_template_kwargs or {}))
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise OrthrusError("a prompt is a string, a list of chat messages ({'role', 'content'}) or a list of token ids")

    def stream(self, prompt: Prompt, **kwargs) -> Iterator[str]:
        """Yield text as it is accepted; the finished Generation is the iterator's return value."""
        result = yield from self._run([prompt], streaming=True, **kwargs)
        return result[0]

    def generate(self, prompts: Prompt | list[Prompt], **kwargs) -> Generation | list[Generation]:
        """Generate for one prompt or a batch (a list of prompts, decoded together)."""
        single = not (isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list)))
        batch = [prompts] if single else prompts
        gen = self._run(batch, streaming=False, **kwargs)
        try:
            while True:
                next(gen)
        except StopIteration as done:
            return done.value[0] if single else done.value

    def _run(self, prompts: list[Prompt], streaming: bool, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: Seq[str] | str | None = None,
             mode: Mode = "orthrus", block_size: int | None = None, draft_confidence: float = 0.0,
             sources: Seq[str] = SOURCES, chat_template_kwargs: dict | None = None):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        encoded = [self.encode(p, chat_template_kwargs) for p in prompts]
        block = 1 if mode == "ar" else (block_size or self.block_size)
        max_len = max(map(len, encoded)) + max_new_tokens + block
        costs = self.pass_costs(block) if mode == "orthrus" else None
        engine = Engine(self.model, len(encoded), max_len, mode=mode, block_size=block_size, draft_confidence=draft_confidence,
                        sources=tuple(sources), pass_costs=costs)
        seqs = [Sequence(ids, params, max_new_tokens, self.stop_token_ids) for ids in encoded]
        for s in seqs:
            engine.add(s)
        texts = {s: TextStream(self.tokenizer, stop) for s in seqs}
        kernels.prepare(self.model)  # one-time setup, not decoding time
        start = time.perf_counter()
        while engine.has_work():
            for out in engine.step():
                text = texts[out.sequence]
                delta = text.push(out.new_tokens, final=out.sequence.finished)
                if text.stopped and not out.sequence.finished:
                    out.sequence.finish_reason = "stop"
                    engine.abort(out.sequence)
                if streaming and delta:
                    yield delta
        seconds = time.perf_counter() - start
        return [
            Generation(text=t.text, token_ids=s.generated, finish_reason=s.finish_reason, prompt_tokens=len(s.prompt),
                       stats=GenerationStats(tokens=len(s.generated), accepted=s.stats.accepted,
                                             block_size=engine.block_size, seconds=seconds, forwards=s.stats.forwards,
                                             sources=s.stats.sources, drafted=s.stats.drafted, branches=s.stats.branches,
                                             extended=s.stats.extended))
            for s, t in texts.items()
        ]


def read_pass_costs(path) -> PassCosts | None:
    """Saved pass costs, or None when missing, damaged or from an older layout (then they are measured)."""
    try:
        saved = json.loads(path.read_text())
        costs = PassCosts(tuple(float(t) for t in saved["verify"]), float(saved["draft"]), int(saved["context"]),
                          tuple(float(t) for t in saved["verify_per_token"]), float(saved["draft_per_token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return costs if len(costs.verify) >= MAX_LOOKUP_DRAFTS + 2 and len(costs.verify_per_token) == len(costs.verify) else None


def parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on CUDA, and on a CPU where the kernels run (measured faster there: the AR
    step and the few-token passes cost ~0.6-0.7x of fp32, BENCHMARKS.md; still token-exact, the
    kernels being batch-invariant); fp32 on the plain CPU path, whose bf16 products are slow."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or kernels.module() is not None else torch.float32
    if dtype not in DTYPES:
        raise OrthrusError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def parse_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OrthrusError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise OrthrusError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None


def load(model: str | None = None, drafter: str | None = None, dtype: str | torch.dtype = "auto",
         device: str = "auto", block_size: int | None = None, draft_dtype: str = "auto") -> Orthrus:
    """Load a base model (default: SmolLM2-135M-Instruct) and a drafter.

    `drafter`: a drafter folder, a full Orthrus folder, "none" for the untrained twin copy, or
    None for the model's own twins (an official Orthrus folder) or else the shipped default drafter.
    `draft_dtype`: "int8" computes the drafts with int8 activations and int8 weights (4-bit where
    the model's are 4-bit already, as a Q4_1 GGUF's) where the CPU kernels run (verification keeps
    the model's own weights, so the output is the same), "model" with the model's own; "auto" picks
    int8 wherever the kernels run.
    """
    if draft_dtype not in ("auto", "int8", "model"):
        raise OrthrusError(f"draft_dtype must be 'auto', 'int8' or 'model', got {draft_dtype!r}")
    from transformers import AutoTokenizer

    folder = resolve_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise OrthrusError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    spare = len(tokenizer)  # the first id past the tokenizer: a free embedding row if the vocab has one
    dev = parse_device(device)
    net, trained = load_model(folder, parse_dtype(dtype, dev), dev, mask_token_id=spare, block_size=block_size)
    net.int8_drafts = draft_dtype == "int8" or (draft_dtype == "auto" and dev.type == "cpu" and kernels.quantized_drafts())
    drafter_name = str(folder) if trained else None
    if drafter is None and not trained and drafter_fits(net, DEFAULT_DRAFTER):  # the shipped drafter, for its base
        drafter = str(DEFAULT_DRAFTER)
    if drafter not in (None, "none"):
        load_drafter(net, drafter)
        trained, drafter_name = True, drafter
        if block_size is not None:
            net.config.block_size = block_size
    return Orthrus(net, tokenizer, name=model or DEFAULT_MODEL, drafter=drafter_name, drafter_trained=trained,
                   extra_stop_ids=generation_stop_ids(folder))


def generation_stop_ids(folder) -> list[int]:
    """The eos ids of the folder's generation_config.json (chat models often stop on more ids there
    than config.json names, e.g. Qwen3's <|im_end|> and <|endoftext|>); [] without one."""
    path = folder / "generation_config.json"
    try:
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    except (ValueError, AttributeError):
        raise OrthrusError(f"{path}: not a valid JSON object") from None
    ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    return [i for i in ids if isinstance(i, int)]
