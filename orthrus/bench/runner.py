"""Run every method on every prompt, side by side: for each prompt the methods take turns, in an
order that rotates from prompt to prompt, so drift of a shared machine lands on all of them alike.

Methods: `orthrus` (draft + verify), `ar` (our engine, plain decoding), `hf` (transformers
`generate` on the same weights and dtype), `hf-pld` (transformers prompt-lookup decoding, a
drafter-free speculative peer) and `llama.cpp` (llama-cpp-python, an optional extra, on the GGUF
the model came from: its own quantized weights, so its tokens are not expected to match). All
stop at the same stop tokens and count them the same way (the stop token is included), and all
are timed around the whole call, prefill included.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..engine import SOURCES
from ..errors import OrthrusError
from ..sampling import SamplingParams
from .prompts import PromptSet

# orthrus: the planner's choice of drafter (with tree leaves), prompt lookup or AR step each cycle;
# orthrus-diffusion: the drafter every cycle; orthrus-chain: every source but the tree leaves
METHODS = ("orthrus", "orthrus-diffusion", "orthrus-chain", "ar", "hf", "hf-pld", "llama.cpp")
ORTHRUS_SOURCES = {"orthrus": SOURCES, "orthrus-diffusion": ("diffusion",),
                   "orthrus-chain": tuple(s for s in SOURCES if s != "tree"), "ar": SOURCES}  # ar: mode="ar" decides
DEFAULT_METHODS = ("orthrus", "ar", "hf", "hf-pld")  # llama.cpp needs an optional extra and a GGUF
PROMPT_LOOKUP_TOKENS = 10


@dataclass
class Run:
    """One method on one prompt."""

    set: str
    prompt: int
    method: str
    token_ids: list[int]
    seconds: float
    forwards: int  # decoding forwards of this sequence (orthrus: 2 per diffusion cycle, 1 per lookup cycle; HF: model calls)
    accepted: list[int] = field(default_factory=list)  # orthrus: accepted drafts per cycle
    sources: list[str] = field(default_factory=list)  # orthrus: each cycle's draft source
    branches: list[int] = field(default_factory=list)  # orthrus: 1 where a cycle's last accepted draft was a tree leaf
    drafted: list[int] = field(default_factory=list)  # orthrus: drafts verified per cycle
    extended: list[int] = field(default_factory=list)  # orthrus: lookup extension drafts among them


class HFGenerate:
    """transformers `generate` on the folder our model was loaded from, same dtype and device."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device, stop_token_ids):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
        self.device, self.stop = device, sorted(stop_token_ids)
        self.calls = 0
        self.model.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    @torch.inference_mode()
    def generate(self, ids: list[int], max_new_tokens: int, params: SamplingParams, seed: int,
                 prompt_lookup: bool) -> tuple[list[int], int]:
        sampling = dict(do_sample=False)
        if not params.greedy:
            sampling = dict(do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
            torch.manual_seed(seed)
        extra = dict(prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS) if prompt_lookup else {}
        self.calls = 0
        out = self.model.generate(torch.tensor([ids], device=self.device), max_new_tokens=max_new_tokens,
                                  eos_token_id=self.stop, pad_token_id=self.stop[0], **sampling, **extra)
        tokens = out[0, len(ids):].tolist()
        for i, t in enumerate(tokens):  # keep up to and including the first stop token, as our engine does
            if t in self.stop:
                return tokens[: i + 1], self.calls
        return tokens, self.calls


class LlamaCpp:
    """llama.cpp (through llama-cpp-python) decoding a GGUF on the CPU with the same thread count."""

    def __init__(self, gguf: Path | None, stop_token_ids, context: int = 4096):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise OrthrusError("the llama.cpp method needs llama-cpp-python (pip install llama-cpp-python; "
                               "it builds llama.cpp, ~10 minutes on 2 cores)") from None
        if gguf is None or not gguf.is_file():
            raise OrthrusError(f"{gguf}: no such GGUF file for the llama.cpp method (give --gguf)")
        threads = torch.get_num_threads()
        self.model = Llama(str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.stop = set(stop_token_ids)

    def generate(self, ids: list[int], max_new_tokens: int, params: SamplingParams, seed: int) -> tuple[list[int], int]:
        self.model.reset()
        self.model.set_seed(seed)
        sampling = dict(temp=0.0, top_k=1)
        if not params.greedy:
            sampling = dict(temp=params.temperature, top_k=params.top_k, top_p=params.top_p)
        tokens = []
        for token in self.model.generate(ids, repeat_penalty=1.0, min_p=0.0, **sampling):
            tokens.append(int(token))
            if token in self.stop or len(tokens) >= max_new_tokens:
                break
        return tokens, len(tokens)


def check_methods(methods: list[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise OrthrusError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return methods


class Runner:
    def __init__(self, llm, folder: Path, methods=DEFAULT_METHODS, max_new_tokens: int = 64,
                 sampling: SamplingParams = SamplingParams(), seed: int = 0, block_size: int | None = None,
                 draft_confidence: float = 0.0, gguf: Path | None = None, repeats: int = 1):
        if max_new_tokens < 1:
            raise OrthrusError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if repeats < 1:
            raise OrthrusError(f"repeats must be >= 1, got {repeats}")
        self.repeats = repeats
        self.llm, self.methods = llm, check_methods(list(methods))
        self.max_new_tokens, self.sampling, self.seed, self.block_size = max_new_tokens, sampling, seed, block_size
        self.draft_confidence = draft_confidence
        self.hf = None
        if any(m.startswith("hf") for m in methods):
            param = next(llm.model.parameters())
            self.hf = HFGenerate(folder, param.dtype, param.device, llm.stop_token_ids)
        self.llama_cpp = LlamaCpp(gguf, llm.stop_token_ids) if "llama.cpp" in methods else None

    def run_one(self, method: str, ids: list[int], max_new_tokens: int, seed: int) -> tuple:
        """(tokens, seconds, forwards, accepted, sources, branches, drafted, extended): the fields of a `Run` after its method."""
        start = time.perf_counter()
        if method.startswith("hf"):
            tokens, forwards = self.hf.generate(ids, max_new_tokens, self.sampling, seed, prompt_lookup=method == "hf-pld")
            return tokens, time.perf_counter() - start, forwards, [], [], [], [], []
        if method == "llama.cpp":
            tokens, forwards = self.llama_cpp.generate(ids, max_new_tokens, self.sampling, seed)
            return tokens, time.perf_counter() - start, forwards, [], [], [], [], []
        params = self.sampling
        out = self.llm.generate(ids, max_new_tokens=max_new_tokens, temperature=params.temperature, top_k=params.top_k,
                                top_p=params.top_p, seed=seed,
                                mode="ar" if method == "ar" else "orthrus", sources=ORTHRUS_SOURCES[method],
                                block_size=self.block_size, draft_confidence=self.draft_confidence)
        seconds = time.perf_counter() - start
        stats = out.stats
        return (out.token_ids, seconds, stats.forwards, list(stats.accepted), list(stats.sources), list(stats.branches),
                list(stats.drafted), list(stats.extended))

    def warm_up(self, ids: list[int]) -> None:
        for method in self.methods:
            self.run_one(method, ids, min(8, self.max_new_tokens), self.seed)

    def run(self, prompt_sets: list[PromptSet], progress=None) -> list[Run]:
        """Every method on every prompt, each `repeats` times in turn, keeping each method's fastest
        run of a prompt (its tokens are the same each time: same seed): a slow spell of a shared
        machine then reaches a method's time only if it lasts through all its turns."""
        encoded = [(ps.name, [self.llm.encode(p) for p in ps.prompts]) for ps in prompt_sets]
        self.warm_up(encoded[0][1][0])
        runs, turn = [], 0
        for name, prompts in encoded:
            for i, ids in enumerate(prompts):
                fastest = {}
                for _ in range(self.repeats):
                    order = self.methods[turn % len(self.methods):] + self.methods[: turn % len(self.methods)]
                    turn += 1
                    for method in order:
                        result = self.run_one(method, ids, self.max_new_tokens, self.seed + i)
                        if method not in fastest or result[1] < fastest[method][1]:
                            fastest[method] = result
                runs += [Run(name, i, method, *fastest[method]) for method in self.methods]
                if progress:
                    progress(f"{name} {i + 1}/{len(prompts)}")
        return runs


def runs_as_dicts(runs: list[Run]) -> list[dict]:
    return [asdict(r) for r in runs]
