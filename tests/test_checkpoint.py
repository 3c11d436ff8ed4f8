"""Checkpoints: the official Orthrus layout and drafter-only folders round-trip; bad input
gets one clear OrthrusError; drafting adds memory independent of context length."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.profiler import ProfilerActivity, profile

import orthrus
from orthrus.cache import KVCache
from orthrus.checkpoint import load_drafter, load_model, save_drafter, save_orthrus
from orthrus.errors import OrthrusError

from .conftest import write_random_model


def twins(model):
    return {n: p.detach().clone() for n, p in model.twin_parameters()}


def perturb_twins(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.twin_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def test_official_layout_round_trips(qwen3_folder, tmp_path):
    model, trained = load_model(qwen3_folder, mask_token_id=151669)
    assert not trained
    perturb_twins(model)
    save_orthrus(model, tmp_path / "orthrus", dtype=torch.float32)
    config = json.loads((tmp_path / "orthrus" / "config.json").read_text())
    assert config["architectures"] == ["OrthrusLM"] and config["model_type"] == "qwen3"
    assert config["mask_token_id"] == 151669 and config["block_size"] == 32
    with safe_open(str(tmp_path / "orthrus" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name in ("q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff", "q_norm_diff", "k_norm_diff"):
        assert f"model.layers.1.self_attn.{name}.weight" in keys
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied, as upstream
    shutil.copy(qwen3_folder / "tokenizer.json", tmp_path / "orthrus")
    shutil.copy(qwen3_folder / "tokenizer_config.json", tmp_path / "orthrus")
    again, trained = load_model(tmp_path / "orthrus")
    assert trained and again.config.mask_token_id == 151669
    for name, tensor in twins(model).items():
        assert torch.equal(again.get_parameter(name), tensor), name
    llm = orthrus.load(str(tmp_path / "orthrus"), dtype="float32")
    assert llm.drafter_trained and llm.model.config.mask_token_id == 151669
    # the official release's config.json names its own model type (OrthrusConfig extends Qwen3Config)
    config.update(model_type="orthrus", architectures=["OrthrusForCausalLM"])
    (tmp_path / "orthrus" / "config.json").write_text(json.dumps(config))
    official = orthrus.load(str(tmp_path / "orthrus"), dtype="float32")
    assert official.model.config.qk_norm and official.drafter_trained
    prompt = [{"role": "user", "content": "Hello"}]
    assert official.generate(prompt, max_new_tokens=8).token_ids == llm.generate(prompt, max_new_tokens=8).token_ids


def test_drafter_only_folder_round_trips_and_checks_its_base(qwen3_folder, tmp_path):
    model, _ = load_model(qwen3_folder, mask_token_id=151669)
    perturb_twins(model)
    save_drafter(model, tmp_path / "drafter", base_model="tiny-qwen3", dtype=torch.float32)
    files = sorted(p.name for p in (tmp_path / "drafter").iterdir())
    assert files == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "drafter" / "model.safetensors"), "pt") as f:
        assert all("_diff." in k for k in f.keys())
    fresh, _ = load_model(qwen3_folder, mask_token_id=151669)
    load_drafter(fresh, tmp_path / "drafter")
    for name, tensor in twins(model).items():
        assert torch.equal(fresh.get_parameter(name), tensor)
    other, _ = load_model(write_random_model(tmp_path / "other", seed=7), mask_token_id=151669)
    with pytest.raises(OrthrusError, match="trained for base model"):
        load_drafter(other, tmp_path / "drafter")


def test_a_draft_vocabulary_is_saved_with_the_drafter_and_checked(qwen3_folder, tmp_path):
    model, _ = load_model(qwen3_folder, mask_token_id=151669)
    save_drafter(model, tmp_path / "every", base_model="tiny-qwen3", dtype=torch.float32)
    model.draft_vocab = torch.tensor([0, 5, 17, 400])
    save_drafter(model, tmp_path / "d", base_model="tiny-qwen3", dtype=torch.float32, storage="int8")
    fresh, _ = load_model(qwen3_folder, mask_token_id=151669)
    load_drafter(fresh, tmp_path / "d")
    assert fresh.draft_vocab.tolist() == [0, 5, 17, 400]
    load_drafter(fresh, tmp_path / "every")  # a drafter without one: every token
    assert fresh.draft_vocab is None
    tensors = load_file(str(tmp_path / "d" / "model.safetensors"))
    for bad in (torch.tensor([5, 0], dtype=torch.int32), torch.tensor([0, 10**6], dtype=torch.int32),
                torch.tensor([0.5, 1.0])):
        save_file({**tensors, "draft_vocab": bad}, str(tmp_path / "d" / "model.safetensors"))
        with pytest.raises(OrthrusError, match="draft_vocab must"):
            load_drafter(fresh, tmp_path / "d")


def test_chance_temperatures_are_saved_with_the_drafter_and_checked(qwen3_folder, tmp_path):
    model, _ = load_model(qwen3_folder, mask_token_id=151669)
    save_drafter(model, tmp_path / "plain", base_model="tiny-qwen3", dtype=torch.float32)
    model.chance_temperatures = (0.3, 0.8, 0.95)
    save_drafter(model, tmp_path / "d", base_model="tiny-qwen3", dtype=torch.float32)
    fresh, _ = load_model(qwen3_folder, mask_token_id=151669)
    load_drafter(fresh, tmp_path / "d")
    assert fresh.chance_temperatures == (0.3, 0.8, 0.95)
    load_drafter(fresh, tmp_path / "plain")  # a drafter without them: the drafts' own distributions
    assert fresh.chance_temperatures == ()
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    for bad in ([], [0.5, 0], [0.5, -1.0], "0.5", [True], [float("inf")]):
        (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "chance_temperatures": bad}))
        with pytest.raises(OrthrusError, match="chance_temperatures must"):
            load_drafter(fresh, tmp_path / "d")


def test_learned_mask_embedding_is_saved_with_the_drafter(smollm2_folder, tmp_path):
    model, _ = load_model(smollm2_folder)  # SmolLM2's vocabulary has no spare row
    assert model.config.learned_mask and hasattr(model.model, "mask_embedding")
    with torch.no_grad():
        model.model.mask_embedding.normal_()
    save_drafter(model, tmp_path / "d", base_model="smollm2", dtype=torch.float32)
    fresh, _ = load_model(smollm2_folder)
    load_drafter(fresh, tmp_path / "d")
    assert torch.equal(fresh.model.mask_embedding, model.model.mask_embedding)


def test_bad_checkpoints_give_clear_errors(qwen3_folder, tmp_path):
    with pytest.raises(OrthrusError, match="no such model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(OrthrusError, match="draft_dtype must be"):
        orthrus.load(str(qwen3_folder), draft_dtype="int4")
    broken = tmp_path / "broken"
    shutil.copytree(qwen3_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OrthrusError, match="truncated or corrupt"):
        load_model(broken)
    weights.unlink()
    (broken / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(OrthrusError, match="safetensors only"):
        load_model(broken)
    cfg = json.loads((qwen3_folder / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(OrthrusError, match="not supported"):
        load_model(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(OrthrusError, match="not valid JSON"):
        load_model(broken)
    smaller = write_random_model(tmp_path / "smaller", hidden_size=32, head_dim=8)
    mixed = tmp_path / "mixed"
    shutil.copytree(qwen3_folder, mixed)
    shutil.copy(smaller / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(OrthrusError, match="shape"):
        load_model(mixed)


def test_generation_input_errors(qwen3):
    with pytest.raises(OrthrusError, match="exceeds the context"):
        qwen3.generate(list(range(100, 2145)), max_new_tokens=10)
    with pytest.raises(OrthrusError, match="empty"):
        qwen3.generate([], max_new_tokens=5)
    with pytest.raises(OrthrusError, match="max_new_tokens"):
        qwen3.generate("hi", max_new_tokens=0)
    with pytest.raises(OrthrusError, match="temperature"):
        qwen3.generate("hi", temperature=-0.5)
    with pytest.raises(OrthrusError, match="token ids"):
        qwen3.generate([10**7], max_new_tokens=5)


def peak_bytes(fn) -> int:
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def test_drafting_memory_is_independent_of_context_length(qwen3):
    model, block = qwen3.model, 16

    def draft_peak(context: int) -> int:
        cache = KVCache(model.config, 1, context + block, torch.float32, "cpu")
        cache.lengths[0] = context
        tokens = torch.full((1, block), model.mask_token_id)
        before = cache.nbytes

        def run():
            w = cache.window(torch.arange(1), block, bidirectional=True)
            model(tokens, w.positions, w, "diffusion")

        with torch.inference_mode():
            run()  # first use packs the twins' weights for the kernels: not part of a pass's working memory
        peak = peak_bytes(run)
        assert cache.nbytes == before and cache.lengths.tolist() == [context]
        return peak

    short, long = draft_peak(32), draft_peak(1900)
    assert long == short, f"draft pass peak grew with context: {short} -> {long} bytes"


def test_stop_ids_also_come_from_generation_config(qwen3_folder, tmp_path):
    folder = shutil.copytree(qwen3_folder, tmp_path / "model")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert {151645, 151643} <= orthrus.load(str(folder), drafter="none", dtype="float32").stop_token_ids
    (folder / "generation_config.json").write_text("{")
    with pytest.raises(OrthrusError, match="generation_config.json"):
        orthrus.load(str(folder), drafter="none", dtype="float32")
