"""The owned backbone matches HF transformers, and the cached forward matches the full one."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from orthrus.cache import KVCache
from orthrus.checkpoint import load_model
from orthrus.errors import OrthrusError
from orthrus.hub import resolve_model

from .conftest import write_random_model


def full_logits(model, ids):
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, ids.shape[0], ids.shape[1] + 8, dtype, "cpu")
    window = cache.window(torch.arange(ids.shape[0]), ids.shape[1], bidirectional=False)
    return model(ids, window.positions, window)


def test_parity_with_hf_on_random_configs(tmp_path):
    for arch, extra in [("qwen3", dict(tie_word_embeddings=False)), ("llama", dict(num_key_value_heads=1)),
                        ("qwen3", dict(num_key_value_heads=4, attention_bias=True))]:
        folder = write_random_model(tmp_path / f"{arch}{len(extra)}{extra.get('num_key_value_heads')}", arch, vocab_size=500, **extra)
        ours, _ = load_model(folder)
        ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        ids = torch.randint(0, 500, (3, 17))
        torch.testing.assert_close(full_logits(ours, ids), ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_few_row_linear_path_equals_nn_linear():
    from orthrus.model import Linear

    torch.manual_seed(0)
    ours, ref = Linear(48, 80, bias=True), torch.nn.Linear(48, 80, bias=True)
    ref.load_state_dict(ours.state_dict())
    for shape in [(1, 48), (1, 1, 48), (2, 3, 48), (1, 6, 48), (7, 48)]:  # 7 rows: the plain path
        x = torch.randn(shape)
        with torch.inference_mode():
            got, want = ours(x), ref(x)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        x.requires_grad_(True)  # training takes the plain path and gets gradients
        ours(x).sum().backward()
        torch.testing.assert_close(x.grad, ours.weight.detach().sum(0).expand_as(x))


def test_parity_with_hf_on_smollm2(smollm2_folder):
    ours, _ = load_model(smollm2_folder)
    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411]])
    with torch.no_grad():
        torch.testing.assert_close(full_logits(ours, ids), ref(ids).logits, rtol=1e-4, atol=2e-4)


def test_incremental_decoding_matches_full_forward(qwen3):
    """Prefill + one-token steps through the cache, rows at different lengths, equal the full pass."""
    model = qwen3.model
    ids = torch.randint(0, 1000, (2, 12))
    expected = full_logits(model, ids)
    cache = KVCache(model.config, 2, 32, torch.float32, "cpu")
    rows = torch.arange(2)
    cache.lengths[:] = torch.tensor([0, 0])
    w = cache.window(rows, 5, bidirectional=False)
    model(ids[:, :5], w.positions, w)
    cache.lengths += 5
    for t in range(5, 12):
        w = cache.window(rows, 1, bidirectional=False)
        step = model(ids[:, t : t + 1], w.positions, w)
        cache.lengths += 1
        torch.testing.assert_close(step[:, 0], expected[:, t], rtol=1e-4, atol=1e-4)
    # a subset of rows (not in order) reads and writes only its own rows
    w = cache.window(torch.tensor([1]), 1, bidirectional=False)
    assert w.mask is None and w.positions.tolist() == [[12]]


def test_diffusion_view_uses_twins_and_sees_the_whole_block(qwen3):
    model = qwen3.model
    cache = KVCache(model.config, 1, 64, torch.float32, "cpu")
    rows = torch.arange(1)
    ctx = torch.randint(0, 1000, (1, 10))
    w = cache.window(rows, 10, bidirectional=False)
    model(ctx, w.positions, w)
    cache.lengths += 10
    block = torch.full((1, 4), model.mask_token_id)
    block[0, 0] = 7
    w = cache.window(rows, 4, bidirectional=True)
    first = model(block, w.positions, w, "diffusion")
    assert cache.lengths.tolist() == [10], "the diffusion view commits nothing"
    # bidirectional: changing the last block token changes the first row's logits
    block2 = block.clone()
    block2[0, 3] = 5
    w = cache.window(rows, 4, bidirectional=True)
    assert not torch.allclose(model(block2, w.positions, w, "diffusion")[0, 0], first[0, 0])
    w = cache.window(rows, 1, bidirectional=False)
    ar = model(block[:, :1], w.positions, w)
    # perturbing a twin changes the diffusion view and leaves the AR view alone
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj_diff.weight.mul_(1.5)
    try:
        w = cache.window(rows, 4, bidirectional=True)
        assert not torch.allclose(model(block, w.positions, w, "diffusion"), first)
        w = cache.window(rows, 1, bidirectional=False)
        torch.testing.assert_close(model(block[:, :1], w.positions, w), ar)
    finally:
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj_diff.weight.div_(1.5)


def test_bf16_rounds_like_hf(tmp_path):
    """In bf16 the owned forward stays as close to HF's bf16 forward as HF's bf16 is to fp32."""
    folder = write_random_model(tmp_path / "q", "qwen3", vocab_size=500)
    ours, _ = load_model(folder, dtype=torch.bfloat16)
    ref32 = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ref16 = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        exact, hf16 = ref32(ids).logits, ref16(ids).logits.float()
        mine = full_logits(ours, ids)
    hf_error = (hf16 - exact).abs().max()
    assert (mine - hf16).abs().max() <= hf_error + 1e-6
    assert (mine.argmax(-1) == hf16.argmax(-1)).float().mean() > 0.9


def test_hub_ids_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OrthrusError, match="Offline"):
        resolve_model("Qwen/Qwen3-0.6B-not-cached")
