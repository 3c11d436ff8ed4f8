"""The few-row CPU kernels: right answers, and batch invariance bit for bit.

Batch invariance is what makes a T-token verify pass compute each token exactly as a 1-token
decode step does, so greedy Orthrus equals greedy AR in bf16 too (tests/test_decoding.py)."""

import math

import pytest
import torch

from orthrus import kernels
from orthrus.cache import KVCache

from .conftest import untrained

# Only a machine that cannot run them (not x86, no AVX2) skips; where they should build, a failed build fails.
pytestmark = pytest.mark.skipif(kernels.unavailable_reason() is not None, reason=str(kernels.unavailable_reason()))


def test_the_kernels_build_on_this_machine():
    assert kernels.module() is not None

DTYPES = [torch.float32, torch.bfloat16]


def rows_alone(f, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([f(x[i : i + 1]) for i in range(x.shape[0])])


@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("xdtype", DTYPES)
# (K, N): model shapes, odd tails, odd K, groups of 3 and 1 panels (a group's last, odd panel alone)
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (64, 130), (20, 13), (33, 40), (70, 48), (36, 84)])
def test_linear_rows_are_bit_identical_to_each_row_alone(wdtype, xdtype, shape):
    kernels.module()
    K, N = shape
    g = torch.Generator().manual_seed(K * N)
    w = torch.randn(N, K, generator=g).to(wdtype)
    bias = torch.randn(N, generator=g).to(wdtype)
    layer = torch.nn.Linear(K, N)
    layer.weight.data, layer.bias.data = w, bias
    x = torch.randn(32, K, generator=g).to(xdtype)
    with torch.inference_mode():
        alone = rows_alone(lambda r: kernels.linear(r, layer)[0], x)
        for T in range(1, 33):
            assert torch.equal(kernels.linear(x[:T], layer)[0], alone[:T]), f"T={T}"
        ref = x.double() @ w.double().T + bias.double()
        tol = 2e-4 if xdtype == torch.float32 else 2e-2
        torch.testing.assert_close(alone.double(), ref.to(xdtype).double(), rtol=tol, atol=tol * K**0.5)
        assert alone.dtype == xdtype


def w8a8_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What an int8 product computes: weights per output feature and x per row over their largest
    magnitude, x 127, rounded; the integer dot, then (dot * x's scale) * the weight's scale + bias."""
    def quantize(t):
        top = t.float().abs().amax(1)
        inv = torch.where(top > 0, torch.full_like(top, 127) / top, torch.zeros_like(top))
        return torch.round(t.float() * inv[:, None]), top / 127

    q, w_scale = quantize(w)
    xq, x_scale = quantize(x)
    y = (xq.double() @ q.double().T).float() * x_scale[:, None] * w_scale
    return y + bias.float() if bias is not None else y


@pytest.mark.parametrize("xdtype", DTYPES)
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (33, 40), (7, 16), (70, 48), (36, 84)])  # (K, N): K not a multiple of 4, tails, groups of 3 and 1 panels
def test_int8_products_compute_w8a8_exactly_and_each_row_as_if_alone(xdtype, shape):
    """Drafts' products (`int8=True`): exactly the W8A8 reference, and every row bit for bit what it
    is alone (integer sums: the same in every build, checked across builds below)."""
    kernels.module()
    K, N = shape
    g = torch.Generator().manual_seed(K + N)
    layer = torch.nn.Linear(K, N)
    layer.weight.data, layer.bias.data = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    x = torch.randn(13, K, generator=g).to(xdtype)
    with torch.inference_mode():
        together = kernels.linear(x, layer, int8=True)[0]
        alone = rows_alone(lambda r: kernels.linear(r, layer, int8=True)[0], x)
    assert torch.equal(together, alone) and together.dtype == xdtype
    assert torch.equal(together, w8a8_reference(x, layer.weight, layer.bias).to(xdtype))


def four_bit(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A weight [n, k] as a Q4_1 GGUF dequantizes it: per 32 inputs d * q + m, q in [0, 15] (each
    group using both ends, as Q4_1's rounding of a group's least and greatest value does), d, m fp16."""
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-d * (7.5 + 2 * torch.randn(n, k // 32, 1, generator=g))).half().float()  # groups around zero, as trained weights
    return (q * d + m).reshape(n, k)


def w4a8_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What a 4-bit product computes (in float64): x per row over its largest magnitude x 127,
    rounded; per group of 32 inputs the weights' own d * q + m; then x's scale (+ bias)."""
    top = x.float().abs().amax(1)
    xq = torch.round(x.float() * torch.where(top > 0, 127 / top, 0)[:, None]).double()
    y = (xq @ w.double().T) * (top / 127).double()[:, None]
    return (y + bias.double() if bias is not None else y)


@pytest.mark.parametrize("xdtype", DTYPES)
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (64, 48)])  # (K, N)
def test_4bit_drafts_products_are_w4a8_and_each_row_as_if_alone(xdtype, shape):
    """Weights that are 4-bit already (a Q4_1 GGUF's, in fp32 or bf16) take 4-bit products for drafts:
    the W4A8 product of the weights' own grid, and every row bit for bit what it is alone, for 1 to
    32 rows. Weights that are not 4-bit keep int8."""
    kernels.module()
    K, N = shape
    g = torch.Generator().manual_seed(K + 3 * N)
    w, bias = four_bit(N, K, g), torch.randn(N, generator=g)
    x = torch.randn(32, K, generator=g).to(xdtype)
    want = w4a8_reference(x, w, bias)
    for wdtype in DTYPES:
        layer = torch.nn.Linear(K, N)
        layer.weight.data, layer.bias.data = w.to(wdtype), bias
        assert kernels.packed(layer, int8=True)[0].dtype == torch.uint8  # 4-bit, no scales
        with torch.inference_mode():
            alone = rows_alone(lambda r: kernels.linear(r, layer, int8=True)[0], x)
            for T in range(1, 33):
                assert torch.equal(kernels.linear(x[:T], layer, int8=True)[0], alone[:T]), f"T={T}"
        # fp32: the grid itself; bf16: the grid as the bf16 copy gives it back (ends rounded)
        tol = 1e-5 if xdtype == wdtype == torch.float32 else 2e-2
        torch.testing.assert_close(alone.double(), want.to(xdtype).double(), rtol=tol, atol=tol * want.abs().mean().item())
    off_grid = torch.nn.Linear(K, N)
    off_grid.weight.data = w + torch.randn(N, K, generator=g) * 1e-3
    assert kernels.packed(off_grid, int8=True)[0].dtype == torch.int8


def test_several_weights_in_one_call_equal_one_call_each():
    g = torch.Generator().manual_seed(1)
    layers = [torch.nn.Linear(96, n, bias=b) for n, b in ((64, False), (32, True), (8, False))]
    for m in layers:
        m.weight.data.normal_(generator=g)
    x = torch.randn(2, 5, 96, generator=g)
    with torch.inference_mode():
        together = kernels.linear(x, *layers)
        for m, y in zip(layers, together):
            assert y.shape == (2, 5, m.out_features)
            assert torch.equal(y, kernels.linear(x, m)[0])


def test_top_tokens_are_topk_and_logsumexp_in_one_pass():
    x = torch.randn(5, 49152, generator=torch.Generator().manual_seed(2)) * 3
    x[0, [70, 7, 900]] = 40.0  # ties: the lower index first
    x[1, :] = -math.inf
    x[1, 3] = 1.0  # one finite value
    values, indices, lse = kernels.top_tokens(x, 4)
    want_values, want_indices = x.topk(4, -1)
    assert torch.equal(values, want_values) and indices[0, :3].tolist() == [7, 70, 900]
    assert torch.equal(indices[2:], want_indices[2:]) and indices[1, 0] == 3
    torch.testing.assert_close(lse, x.logsumexp(-1), rtol=1e-6, atol=1e-5)
    scales = torch.tensor([1.0, 2.0, 0.5, 4.0, 1.0 / 3])  # each row times its scale, as the planner's chances take them
    values, indices, lse = kernels.top_tokens(x, 4, scales)
    want_values, want_indices = (x * scales[:, None]).topk(4, -1)
    assert torch.equal(values, want_values) and torch.equal(indices[2:], want_indices[2:])
    torch.testing.assert_close(lse, (x * scales[:, None]).logsumexp(-1), rtol=1e-6, atol=1e-5)
    # a row alone gives what it gives among others; a tie across the row's pieces keeps the lower index first
    assert all(torch.equal(kernels.top_tokens(x[r : r + 1], 4)[2][0], kernels.top_tokens(x, 4)[2][r]) for r in range(5))
    x[3, 49_000] = x[3, 12] = x[3].max() + 1
    assert kernels.top_tokens(x, 2)[1][3].tolist() == [12, 49_000]


def test_sample_and_residual_draw_give_what_the_plain_pytorch_rule_gives():
    """The kernels' inverse-CDF draws and the accept rule's tail (residual, leaves, next token) against
    `sampling`'s tensor ops on the same uniforms, over a real vocabulary's width: the same tokens but
    where a uniform falls within rounding of a boundary (the two sum the CDF in different orders)."""
    from orthrus import sampling

    g = torch.Generator().manual_seed(4)
    n, k, vocab, s = 64, 3, 49152, 4
    p = torch.softmax(torch.randn(n, k + 1 + s, vocab, generator=g) * 3, -1)
    q = torch.softmax(torch.randn(n, k, vocab, generator=g) * 3, -1)
    q[::4] = p[::4, :k]  # p == q: the residual has no mass, the draw comes from p
    u = torch.rand(n, k + 1 + s, generator=g)
    drafts = p[:, :k].argmax(-1)
    drafts[1::2] = torch.randint(0, vocab, (n // 2, k), generator=g)  # mostly rejected: the residual
    leaves = sampling.Leaves(p[:, :k].topk(2, -1).indices.reshape(n, -1)[:, :s], torch.tensor([1, 1, 2, 2]).expand(n, -1))
    leaves.tokens[::3, 1] = leaves.tokens[::3, 0]  # a repeat
    lengths = torch.randint(0, k + 1, (n,), generator=g)
    args = (p, q, drafts, torch.rand(n, k, generator=g), u[:, 0], lengths, leaves, u[:, 1 : 1 + s])
    with_kernels = sampling.speculative_accept(*args)
    draws = sampling.sample(p.reshape(-1, vocab), u.reshape(-1))
    kernels.enabled = False
    try:
        plain = sampling.speculative_accept(*args)
        plain_draws = sampling.sample(p.reshape(-1, vocab), u.reshape(-1))
    finally:
        kernels.enabled = True
    for got, want in zip(with_kernels, plain):
        assert float((got == want).float().mean()) >= 0.98 and got.dtype == want.dtype
    assert set(with_kernels[2].tolist()) >= {-1, 0} and float((draws == plain_draws).float().mean()) >= 0.99
    # never a token of zero weight, whatever the uniform
    sparse = torch.zeros(3, vocab)
    sparse[0, [5, 900]], sparse[1, vocab - 1], sparse[2, 64] = 1.0, 2.0, 1e-30
    edges = torch.tensor([0.0, 0.999999940, 0.5])
    assert kernels.sample(sparse, edges).tolist() == [5, vocab - 1, 64]
    assert kernels.sample(sparse, torch.full((3,), 0.99999994)).tolist() == [900, vocab - 1, 64]


def test_the_packed_weight_follows_changes_to_the_weight():
    """The kernel streams a packed copy of each weight; a changed or replaced weight is repacked."""
    kernels.module()
    layer = torch.nn.Linear(40, 12, bias=False)
    x = torch.randn(3, 40)
    with torch.no_grad():
        before = kernels.linear(x, layer)[0]
        layer.weight.mul_(2)  # in place, as an optimizer step or a drafter load does
        torch.testing.assert_close(kernels.linear(x, layer)[0], 2 * before)
        layer.weight = torch.nn.Parameter(torch.zeros(12, 40))  # replaced
        assert torch.equal(kernels.linear(x, layer)[0], torch.zeros(3, 12))
    assert "_packed_weights" not in layer.state_dict() and len(layer.state_dict()) == 1


def ragged_pass(llm, view: str, rows: list[int]):
    """Logits of one 5-token pass of `view` for the given cache rows (of 3), whose contexts are
    30 and 7 tokens long (row 2 and row 0), and the keys the pass wrote into the cache."""
    model = llm.model
    cache = KVCache(model.config, 3, 48, next(model.parameters()).dtype, "cpu")
    g = torch.Generator().manual_seed(5)
    context = {2: torch.randint(0, 1000, (1, 30), generator=g), 0: torch.randint(0, 1000, (1, 7), generator=g)}
    block = {2: torch.randint(0, 1000, (1, 5), generator=g), 0: torch.randint(0, 1000, (1, 5), generator=g)}
    with torch.inference_mode():
        for row, tokens in context.items():  # the same context, on the plain path, whatever is tested
            cache.k[:, row], cache.v[:, row] = 0, 0
            kernels.enabled, enabled = False, kernels.enabled
            window = cache.window(torch.tensor([row]), tokens.shape[1], bidirectional=False)
            model(tokens, window.positions, window, "ar", logits=False)
            kernels.enabled = enabled
            cache.lengths[row] = tokens.shape[1]
        window = cache.window(torch.tensor(rows), 5, bidirectional=view == "diffusion")
        logits = model(torch.cat([block[r] for r in rows]), window.positions, window, view)
    return logits, [cache.k[:, r, :, int(cache.lengths[r]) : int(cache.lengths[r]) + 5].clone() for r in rows]


@pytest.mark.parametrize("view", ["ar", "diffusion"])
@pytest.mark.parametrize("name", ["qwen3", "qwen3_bf16", "qwen3_wide_heads_bf16"])
def test_the_decoder_stack_is_right_and_each_row_is_computed_as_if_alone(request, name, view):
    """The kernels' decoder stack over a ragged batch (rows 2 and 0 of the cache, at different
    lengths): close to the plain path, in logits and in the keys it writes, and each row bit for
    bit what the same pass computes for that row alone."""
    llm = request.getfixturevalue(name)
    logits, keys = ragged_pass(llm, view, [2, 0])
    for i, row in enumerate([2, 0]):
        alone, alone_keys = ragged_pass(llm, view, [row])
        assert torch.equal(logits[i], alone[0]) and torch.equal(keys[i], alone_keys[0])
    kernels.enabled = False
    try:
        plain, plain_keys = ragged_pass(llm, view, [2, 0])
    finally:
        kernels.enabled = True
    tol = 1e-4 if logits.dtype == torch.float32 and keys[0].dtype == torch.float32 else 5e-2
    torch.testing.assert_close(logits, plain, rtol=tol, atol=tol)
    for k, plain_k in zip(keys, plain_keys):
        torch.testing.assert_close(k, plain_k, rtol=tol, atol=tol)


def test_int8_drafts_are_the_diffusion_view_on_w8a8_products(qwen3_int8_drafts, qwen3, qwen3_folder):
    """With int8 drafts the stack's diffusion view computes what the plain path computes when every
    product takes int8 weights and activations (close: roundings of the two paths differ slightly),
    while the AR view, which verifies, is untouched (bit for bit the model-dtype stack's)."""
    plain = untrained(qwen3_folder, "float32")
    plain_model = plain.model
    drafting = []  # non-empty during a diffusion pass: only drafts take int8 products

    def product(x, m):
        if not drafting:
            return torch.nn.Linear.forward(m, x)
        return w8a8_reference(x.reshape(-1, x.shape[-1]), m.weight, m.bias).reshape(*x.shape[:-1], -1)

    for module in plain_model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = lambda x, m=module: product(x, m)
    model_forward = plain_model.forward

    def forward(tokens, positions, kv, view="ar", logits=True):
        drafting[:] = [True] if view == "diffusion" else []
        return model_forward(tokens, positions, kv, view, logits)

    plain_model.forward = forward
    int8_logits, _ = ragged_pass(qwen3_int8_drafts, "diffusion", [2, 0])
    exact_logits, _ = ragged_pass(qwen3, "diffusion", [2, 0])
    kernels.enabled = False
    try:
        plain_logits, _ = ragged_pass(plain, "diffusion", [2, 0])
    finally:
        kernels.enabled = True
    torch.testing.assert_close(int8_logits, plain_logits, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(int8_logits, exact_logits, rtol=1e-3, atol=1e-3)  # int8 drafts really ran
    assert torch.equal(ragged_pass(qwen3_int8_drafts, "ar", [2, 0])[0], ragged_pass(qwen3, "ar", [2, 0])[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_and_rotary_match_the_plain_path_and_are_row_invariant(dtype):
    from orthrus.model import RMSNorm, Rotary, apply_rotary

    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(64, 1e-6).to(dtype)
    norm.weight.data = torch.randn(64, generator=g).to(dtype)
    x = torch.randn(1, 12, 64, generator=g).to(dtype)
    pos = torch.arange(100, 112)[None]
    cos, sin = Rotary(16, 10000.0)(pos)
    heads = torch.randn(1, 12, 4, 16, generator=g).to(dtype)
    with torch.inference_mode():
        fast_norm, fast_rope = norm(x), apply_rotary(heads.clone(), cos, sin)
        for t in range(12):
            assert torch.equal(norm(x[:, t : t + 1]), fast_norm[:, t : t + 1])
            assert torch.equal(apply_rotary(heads[:, t : t + 1].clone(), cos[:, t : t + 1], sin[:, t : t + 1]),
                               fast_rope[:, t : t + 1])
        kernels.enabled = False
        try:
            plain_norm, plain_rope = norm(x), apply_rotary(heads.clone(), cos, sin)
        finally:
            kernels.enabled = True
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fast_norm, plain_norm, rtol=tol, atol=tol)
    torch.testing.assert_close(fast_rope, plain_rope, rtol=tol, atol=tol)


def prefilled(llm, text: str, room: int) -> tuple[KVCache, int]:
    """A 1-row cache holding `text`'s tokens (committed), with `room` slots after them; and their count."""
    model = llm.model
    prompt = torch.tensor([llm.encode(text)])
    cache = KVCache(model.config, 1, prompt.shape[1] + room, next(model.parameters()).dtype, "cpu")
    window = cache.window(torch.tensor([0]), prompt.shape[1], bidirectional=False)
    model(prompt, window.positions, window, "ar", logits=False)
    cache.lengths[0] = prompt.shape[1]
    return cache, prompt.shape[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["qwen3_folder", "smollm2_folder", "qwen3_wide_heads_folder"])
def test_a_verify_pass_computes_each_token_as_a_decode_step_does(request, name, dtype):
    """Logits of one T-token AR pass == logits of T one-token steps, bit for bit, for T up to 32; and
    so are a token tree's leaves'."""
    llm = untrained(request.getfixturevalue(name), dtype)
    model = llm.model
    tokens = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        cache, prompt_len = prefilled(llm, "The quick brown fox jumps over the lazy dog. " * 3, room=64)
        rows = torch.tensor([0])
        steps = []
        for t in range(32):  # one token at a time, committing each
            window = cache.window(rows, 1, bidirectional=False)
            steps.append(model(tokens[:, t : t + 1], window.positions, window, "ar"))
            cache.lengths[0] += 1
        steps = torch.cat(steps, 1)
        for T in (2, 3, 4, 7, 16, 32):
            cache.lengths[0] = prompt_len
            window = cache.window(rows, T, bidirectional=False)
            assert torch.equal(model(tokens[:, :T], window.positions, window, "ar"), steps[:, :T]), f"T={T}"
        # a token tree: a chain of 8 whose token 6 is another one, and leaves after it with the
        # right tokens 6 and 3 (and 1): each leaf computed as the decode step of its token
        cache.lengths[0] = prompt_len
        chain = tokens[:, :8].clone()
        chain[0, 6] = tokens[0, 6] + 1
        tree = torch.cat([chain, tokens[:, [6, 3, 1]]], 1)
        window = cache.window(rows, 11, bidirectional=False, depths=torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 6, 3, 1]]))
        logits = model(tree, window.positions, window, "ar")
        assert torch.equal(logits[:, :6], steps[:, :6]) and torch.equal(logits[:, 8:], steps[:, [6, 3, 1]])


def test_a_failed_build_falls_back_to_plain_pytorch_with_one_line(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "cpu.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCE", broken)
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path / "cache"))
    assert kernels.module() is None and not kernels.usable(torch.zeros(1, 1, 4), 1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("orthrus: few-row")]
    assert len(lines) == 1 and "plain PyTorch" in lines[0]
    layer = torch.nn.Linear(4, 3)
    from orthrus.model import Linear

    plain = Linear(4, 3)
    plain.load_state_dict(layer.state_dict())
    with torch.inference_mode():
        x = torch.randn(2, 1, 4)
        torch.testing.assert_close(plain(x), layer(x))


def pass_logits(folder: str, dtype: str) -> dict[str, torch.Tensor]:
    """Logits of a 1-token step and of a 7-token pass after a prompt (drafts from int8 products),
    with the kernels this process built (run under each instruction set by the test below)."""
    llm = untrained(folder, dtype, "int8")
    model = llm.model
    tokens = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(6))
    rows = torch.tensor([0])
    out = {}
    with torch.inference_mode():
        cache, _ = prefilled(llm, "Batch-invariant kernels make verification exact. " * 2, room=8)
        for T in (1, 7):
            for view in ("ar", "diffusion"):
                window = cache.window(rows, T, bidirectional=view == "diffusion")
                out[f"{view}{T}"] = model(tokens[:, :T], window.positions, window, view).float().contiguous()
    return out


def logits_under(isa: str, folder: str, dtype: str, tmp_path) -> dict[str, torch.Tensor]:
    """`pass_logits` with the kernels built for `isa`: in this process if it runs that build, else in a child."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    if isa == kernels.isa():
        return pass_logits(folder, dtype)
    out = tmp_path / f"{isa}.st"
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r}); from tests.test_kernels import pass_logits; "
              f"from safetensors.torch import save_file; save_file(pass_logits({folder!r}, {dtype!r}), {str(out)!r})")
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "ORTHRUS_ISA": isa})
    return load_file(out)


def builds_of_one_bits(dtype: str) -> list[str]:
    """The builds this CPU runs that must give identical bits: all of them, but for bf16 the AMX
    build, whose tile unit sums a bf16 product's terms in an order of its own."""
    return [isa for isa in kernels.runnable_isas() if not (isa == "amx" and dtype == "bfloat16")]


@pytest.mark.parametrize("other", ["avx2", "avx512", "amx"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_build_gives_the_same_bits(request, tmp_path, dtype, other):
    """The AVX-512 builds hold more rows per tile, and with AVX512-BF16 multiply bf16 by its dot
    instruction, but compute each output with the AVX2 build's operations in the same order: a
    model's logits are identical under each, so output does not depend on the CPU it was decoded on
    (the AMX build's bf16 products excepted: the next test)."""
    builds = builds_of_one_bits(dtype)
    if other == builds[-1] or other not in builds:
        pytest.skip(f"for {dtype} this CPU runs {' and '.join(builds)}: no {other} build to compare with {builds[-1]}")
    for name in ("qwen3_folder", "smollm2_folder"):
        folder = str(request.getfixturevalue(name))
        theirs, ours = logits_under(other, folder, dtype, tmp_path), logits_under(builds[-1], folder, dtype, tmp_path)
        assert theirs.keys() == ours.keys()
        for key in ours:
            assert torch.equal(theirs[key], ours[key]), f"{name} {key}"


def test_the_amx_build_is_as_close_to_fp32_as_the_dot_instruction_build(request, tmp_path):
    """The AMX build's bf16 logits are not the dot-instruction build's bits (the tile unit sums a
    tile's products in an order of its own), but as close to the fp32 model's (the same bits in every
    build): within twice the dot-instruction build's largest error, pass by pass."""
    if "amx" not in kernels.runnable_isas():
        pytest.skip(f"this CPU runs {' and '.join(kernels.runnable_isas())}: no AMX")
    differ = False
    for name in ("qwen3_folder", "smollm2_folder"):
        folder = str(request.getfixturevalue(name))
        exact = logits_under(kernels.isa(), folder, "float32", tmp_path)
        dot, amx = (logits_under(isa, folder, "bfloat16", tmp_path) for isa in ("avx512bf16", "amx"))
        for key in exact:
            differ |= not torch.equal(dot[key], amx[key])
            dot_error, amx_error = ((got[key] - exact[key]).abs().max().item() for got in (dot, amx))
            assert amx_error <= 2 * dot_error, f"{name} {key}: AMX {amx_error}, dot instruction {dot_error}"
    assert differ, "the AMX build gave the dot instruction's bits"
