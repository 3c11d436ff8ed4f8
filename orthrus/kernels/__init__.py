"""The CPU hot path: few-row kernels under the model's `Linear`, and every decoder layer of a
pass over the KV cache in one call (`decoder_stack`: no Python between the ops).

`cpu.cpp` is compiled on first use with the machine's C++ compiler and cached under
`$ORTHRUS_CACHE/kernels` (default `~/.cache/orthrus/kernels`), keyed by the source, the torch
version and the instruction set, so later runs load it in a fraction of a second; `make install`
builds it. The instruction set is AVX2 + FMA, or AVX-512 where the CPU has it (its products hold
twice the rows per tile), with AVX512-BF16 and VNNI where it has those too (bf16 products by
the BF16 dot instruction; the int8 products of drafts, `linear(..., int8=True)` and the stack's
int8 diffusion view, by VNNI's); all compute every output with the same operations in the same
order, so they give the same bits (`ORTHRUS_ISA=avx2` or `avx512` forces a build). On a CPU with
AMX, the `amx` build runs a bf16 model's products and attention in the tile unit: a few rows cost
what one does, and its bf16 results differ from the other builds' in the last bits (fp32 and int8
products do not; `ORTHRUS_ISA=avx512bf16` there gives the other builds' bits).
Products stream each weight from a packed copy (`packed`), made on first use and kept beside the
weight: it doubles the weights' memory, the price of one sequential stream per tile.
Every output element is computed with the same reduction order whatever the number of rows, so
a T-token pass computes each token bit for bit as a 1-token step does (the batch invariance that
makes bf16 decoding exact).

Where it cannot be built (no compiler, no AVX2, not x86) or `ORTHRUS_KERNELS=0` is set, the model
falls back to plain PyTorch, said once in one line.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu.cpp")
# Beyond this many tokens per sequence (a long prefill) MKL's fp32 GEMM beats the few-row tiling
# (bf16 weights go through it widened to fp32: aten's own bf16 GEMM on AVX2 is several times
# slower), and SDPA beats the stack's attention, built for a few queries per sequence.
MAX_TOKENS = 64

_module = None
_tried = False
enabled = True  # a switch for side-by-side timing of the plain path in one process


def cache_dir() -> Path:
    return Path(os.environ.get("ORTHRUS_CACHE", Path.home() / ".cache" / "orthrus")) / "kernels"


def unavailable_reason() -> str | None:
    if os.environ.get("ORTHRUS_KERNELS", "1") == "0":
        return "ORTHRUS_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"{platform.machine()} is not x86-64"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2"
    if isa() not in runnable_isas():
        return f"ORTHRUS_ISA={isa()} but this CPU runs {' or '.join(runnable_isas())}"
    return None


_AVX512 = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl"]
_AVX512BF16 = [*_AVX512, "-mavx512bf16", "-mavx512vnni"]
ISA_FLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"], "avx512": _AVX512, "avx512bf16": _AVX512BF16,
             "amx": [*_AVX512BF16, "-mamx-tile", "-mamx-bf16"]}


def isa() -> str:
    """The instruction set the kernels are built for: the CPU's best, unless ORTHRUS_ISA names one."""
    return os.environ.get("ORTHRUS_ISA") or runnable_isas()[-1]


def runnable_isas() -> list[str]:
    """The instruction sets this CPU runs, best last."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return ["avx2"]
    if not {"avx512_bf16", "avx512_vnni"} <= cpu_flags():
        return ["avx2", "avx512"]
    return ["avx2", "avx512", "avx512bf16", "amx"] if amx_permitted() else ["avx2", "avx512", "avx512bf16"]


@functools.cache
def amx_permitted() -> bool:
    """Whether the CPU has AMX's bf16 tiles and Linux lets this process use them (it must ask:
    arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA); older kernels and some hypervisors refuse)."""
    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        return False
    import ctypes

    SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XTILEDATA = 158, 0x1023, 18
    return ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XTILEDATA) == 0


def quantized_drafts() -> bool:
    """Whether drafts take quantized products by default here: wherever the kernels run. A bf16
    SmolLM2 draft pass (4 tokens, 256 cached, 2 threads, Zen 4) in int8 (its MLP 4-bit, as the GGUF
    has it) takes 7.5 ms against 12 ms in bf16 on the AVX512-VNNI build, and 9.1 against 15.0 on
    the AVX2 build, whose bf16 products of a few rows are bound by the widening multiplies."""
    return module() is not None


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


def compile_flags() -> list[str]:
    """The C++ flags of a build for this machine's instruction set (no contraction of a * b + c into
    an FMA the source does not ask for: the order of every rounding is the source's)."""
    return ["-O3", *ISA_FLAGS[isa()], "-fopenmp", "-ffp-contract=off"]


def build_id() -> str:
    """What a build depends on (the source, the torch version, the instruction set), as a short hash."""
    return hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + isa().encode()).hexdigest()[:12]


def _build():
    """Load the cached build for this source and torch, or compile one. Each build runs in a
    private temp folder and is published by an atomic rename, so a build killed midway leaves no
    lock or half-written library behind, and concurrent first runs do not wait on each other."""
    import importlib.util
    import tempfile

    from torch.utils.cpp_extension import load

    name = f"orthrus_cpu_{isa()}_{build_id()}"
    library = cache_dir() / f"{name}.so"
    if not library.is_file():
        cache_dir().mkdir(parents=True, exist_ok=True)
        print("orthrus: compiling the CPU kernels (once per machine, about a minute)...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".build-") as tmp:
            load(name=name, sources=[str(SOURCE)], extra_cflags=compile_flags(), extra_ldflags=["-fopenmp"], build_directory=tmp,
                 verbose=False)
            (Path(tmp) / f"{name}.so").rename(library)  # same file system: atomic
        for old in cache_dir().glob(f"orthrus_cpu_{isa()}_*.so"):  # builds of older sources or torch versions
            if old != library:
                old.unlink(missing_ok=True)
        if name in sys.modules:
            return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, library)
    built = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(built)
    return built


def module():
    """The compiled kernels, or None (plain PyTorch). Builds once per machine, then loads."""
    global _module, _tried
    if not _tried:
        _tried = True
        reason = unavailable_reason()
        if reason is None:
            try:
                _module = _build()
            except Exception as err:  # no compiler, a failed build: the plain path still works
                reason = f"the C++ build failed ({str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__})"
        if reason is not None and reason != "ORTHRUS_KERNELS=0":
            print(f"orthrus: few-row CPU kernels off ({reason}); using plain PyTorch (slower)", file=sys.stderr)
    return _module


def usable(x: torch.Tensor, tokens: int) -> bool:
    """Whether `x` takes the kernels (CPU inference): `tokens` is the tokens per sequence of a pass
    over the cache (decided once per pass, so every op and row of it takes the same path), or the
    rows of a lone product."""
    return tokens <= MAX_TOKENS and not torch.is_grad_enabled() and _kernel_tensor(x)


def _kernel_tensor(t: torch.Tensor) -> bool:
    """Whether the kernels take tensors like `t`: on the CPU, fp32 or bf16, with the kernels built and on."""
    return (enabled and t.dtype in (torch.float32, torch.bfloat16) and not t.is_cuda
            and (_module is not None or (not _tried and module() is not None)))


def linear(x: torch.Tensor, *layers: torch.nn.Linear, int8: bool = False, float_out: bool = False) -> list[torch.Tensor]:
    """x @ W.T + b for each layer, for a few rows of x ([..., K]), in one call; fp32 accumulation,
    outputs in x's dtype. `int8`: multiply by quantized copies of the weights, for drafts: 4-bit where
    a weight is 4-bit already (a Q4_1 GGUF's), else int8 (`draft_weight`), and x's rows in int8.
    `float_out`: the same values as fp32 tensors (what `.float()` of the outputs gives, without its copy)."""
    weights = [packed(m, int8) for m in layers]
    return _module.linear(x, [w[0] for w in weights], [m.bias for m in layers], [w[1] for w in weights], float_out)


def packed(layer: torch.nn.Linear, int8: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight in the layout the kernel streams (and its scales when `int8`), made on
    first use and kept beside the weight (outside the parameters, so state dicts, training and the
    plain path never see it); remade when the weight is replaced or changed in place (its version
    counter moves). One copy per kernel library: libraries may lay weights out differently."""
    w = layer._parameters["weight"]  # not `layer.weight`: Module.__getattr__ costs more than the check
    copies = layer.__dict__.setdefault("_packed_weights", {})
    kept = copies.get((_module, int8))
    if kept is None or kept[0] is not w or kept[1] != w._version or kept[2] != w.data_ptr():
        made = _module.draft_weight(w.detach()) if int8 else (_module.pack(w.detach()), None)
        kept = copies[_module, int8] = (w, w._version, w.data_ptr(), tuple(made))
    return kept[3]


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _module.rmsnorm(x, weight, eps)


def takes_fp32(t: torch.Tensor) -> bool:
    """Whether the kernels take `t` as fp32 CPU values (the vocabulary-wide work of sampling and planning)."""
    return t.dtype is torch.float32 and _kernel_tensor(t)


def top_tokens(logits: torch.Tensor, k: int, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits [..., V], each row times its scale (`scales` [...], none: 1) -> (the k largest
    [..., k], largest first, their indices, and the log-sum-exp [...]): one read of the logits, by
    both cores, where the kernels run, else torch's topk and logsumexp."""
    if takes_fp32(logits):
        flat = logits.reshape(-1, logits.shape[-1]).contiguous()
        values, indices, lse = _module.top_tokens(flat, k, None if scales is None else scales.reshape(-1))
        return values.view(*logits.shape[:-1], k), indices.view(*logits.shape[:-1], k), lse.view(logits.shape[:-1])
    if scales is not None:
        logits = logits * scales[..., None]
    values, indices = logits.topk(k, -1)
    return values, indices, logits.logsumexp(-1)


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """fp32 probs [R, V] (need not be normalised), uniforms [R] -> an inverse-CDF draw per row, in
    one pass over each row's blocks and one over a block (`sampling.sample` where `takes_fp32`)."""
    return _module.sample(probs.contiguous(), uniforms.float())


def residual_draw(p: torch.Tensor, q: torch.Tensor, accepted: torch.Tensor, lengths: torch.Tensor, leaf_tokens: torch.Tensor,
                  leaf_depths: torch.Tensor, u_leaves: torch.Tensor, u_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail of `sampling.speculative_accept` after the accepted drafts: (next token [N], accepted
    leaf [N] or -1), a few passes over one row of the vocabulary per sequence."""
    return tuple(_module.residual_draw(p, q, accepted, lengths, leaf_tokens, leaf_depths, u_leaves.float(), u_next.float()))


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding applied in place to x [N, T, heads, D] (returned)."""
    _module.rope_(x, cos, sin)
    return x


def prepare(model) -> None:
    """Pack the weights and build the decoder stack now (a few tenths of a second, once per model)
    when the kernels will run its passes, so the first pass of a generation costs what any other does."""
    if _kernel_tensor(model.lm_head.weight):
        decoder_stack(model)
        packed(model.lm_head)
        packed(model.draft_head(), int8=model.int8_drafts)


def decoder_stack(model):
    """The model's decoder layers as one compiled call (`DecoderStack`), built on first use and
    kept on the model (per kernel library and draft precision); rebuilt when a weight changes in
    place or its data is swapped. With `model.int8_drafts` the diffusion view runs on quantized
    copies (4-bit where a weight is 4-bit already, else int8)."""
    stacks = model.__dict__.setdefault("_decoder_stacks", {})
    key = (_module, model.int8_drafts)
    stack = stacks.get(key)
    if stack is None or not stack.fresh():
        cfg = model.config
        stack = stacks[key] = _module.DecoderStack([layer.kernel_weights() for layer in model.model.layers],
                                                   cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                                   cfg.rms_norm_eps, model.int8_drafts)
    return stack
