"""Loading and saving weights: HF folders (config.json + safetensors, sharded or not), the
official Orthrus layout (one folder, base + `*_diff` twins, `architectures: ["OrthrusLM"]`), and
drafter-only folders (twins + mask embedding + the base model's fingerprint).

A drafter-only folder stores its twins either as floats (`"storage": "float"`, the default) or,
to ship small, as int8 deltas from the base's own AR weights (`"storage": "int8-delta"`): each
2-D twin `W_diff` is saved as int8 `W_diff` plus fp32 `W_diff_scale` per output row, and loads
as `W_ar + int8 * scale` (1-D tensors such as the mask embedding stay floats). Both load into
the same model, so inference code never sees the difference.

Weights are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig, read_hf_config
from .errors import OrthrusError
from .model import OrthrusLM

DRAFTER_ARCHITECTURE = "OrthrusDrafter"
DRAFT_VOCAB = "draft_vocab"  # a drafter's tensor of the token ids its drafts may take (`OrthrusLM.draft_vocab`)


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise OrthrusError(f"{folder}: shards named in model.safetensors.index.json are missing: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt*")):
            raise OrthrusError(f"{folder}: only pickle weights (*.bin/*.pt) found; orthrus loads safetensors only. "
                               "Convert them with transformers' save_pretrained(safe_serialization=True).")
        raise OrthrusError(f"{folder}: no *.safetensors weights found.")
    return files


def read_tensors(folder: Path):
    """Yield (name, tensor) from every safetensors file of a folder, with a clear error on damage."""
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise OrthrusError(f"{path}: cannot read weights ({e}). The file is truncated or corrupt; "
                               "download or convert it again.") from None


def base_fingerprint(model: OrthrusLM) -> str:
    """A short hash of a few frozen base weights (rounded to bf16, so fp32/bf16 copies agree)."""
    h = hashlib.sha256()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        h.update(model.get_parameter(name).detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def _load_into(model: OrthrusLM, tensors, where: Path, only_twins: bool = False) -> set[str]:
    params = dict(model.named_parameters())
    loaded = set()
    for name, tensor in tensors:
        is_twin = name.endswith(("_diff.weight", "_diff.bias")) or name == "model.mask_embedding"
        if name not in params or (only_twins and not is_twin):
            continue
        p = params[name]
        if tuple(tensor.shape) != tuple(p.shape):
            raise OrthrusError(f"{where}: {name} has shape {tuple(tensor.shape)}, the model expects "
                               f"{tuple(p.shape)}. Is this checkpoint for another model size?")
        with torch.no_grad():
            p.copy_(tensor)
        loaded.add(name)
    return loaded


def load_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    mask_token_id: int | None = None,
    block_size: int | None = None,
) -> tuple[OrthrusLM, bool]:
    """Load an HF-format Qwen3/Llama folder or an official Orthrus folder.

    Returns (model, has_trained_twins). Twins missing from the folder start as copies of the AR
    projections. `mask_token_id` is used when the folder's config names none.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise OrthrusError(f"{folder}: no such model folder.")
    hf = read_hf_config(folder)
    cfg = ModelConfig.from_hf(hf, where=str(folder / "config.json"))
    if cfg.mask_token_id is None:
        cfg.mask_token_id = mask_token_id if mask_token_id is not None else cfg.vocab_size
    if block_size is not None:
        cfg.block_size = block_size
    with torch.device("meta"):
        model = OrthrusLM(cfg)
    model.to_empty(device=device).to(dtype).tie_weights()
    loaded = _load_into(model, read_tensors(folder), folder)
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")
    twin_names = {n for n, _ in model.twin_parameters()}
    missing = set(dict(model.named_parameters())) - loaded - twin_names
    if missing:
        raise OrthrusError(f"{folder}: weights missing from the checkpoint: {sorted(missing)[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
    has_twins = twin_names <= loaded
    if not has_twins:
        init_untrained_twins(model)
    model.eval().requires_grad_(False)
    return model, has_twins


def init_untrained_twins(model: OrthrusLM) -> None:
    model.copy_twins_from_ar()
    if model.config.learned_mask:
        with torch.no_grad():  # start the learned mask at the average token embedding
            model.model.mask_embedding.copy_(model.model.embed_tokens.weight.mean(0))


def drafter_fits(model: OrthrusLM, folder: Path) -> bool:
    """Whether a drafter-only folder was trained for this base model (same fingerprint)."""
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("base_fingerprint") == base_fingerprint(model)


def load_drafter(model: OrthrusLM, folder: str | Path) -> None:
    """Load twins from a drafter-only folder, or from a full official Orthrus folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OrthrusError(f"{folder}: no such drafter folder.")
    hf = read_hf_config(folder)
    if DRAFTER_ARCHITECTURE in hf.get("architectures", []):
        expected = hf.get("base_fingerprint")
        actual = base_fingerprint(model)
        if expected != actual:
            raise OrthrusError(f"{folder}: this drafter was trained for base model {hf.get('base_model')!r} "
                               f"(fingerprint {expected}), not for the loaded model (fingerprint {actual}).")
    else:
        base_cfg = ModelConfig.from_hf(hf, where=str(folder / "config.json"))
        mine = model.config
        if (base_cfg.hidden_size, base_cfg.num_hidden_layers, base_cfg.vocab_size) != (
                mine.hidden_size, mine.num_hidden_layers, mine.vocab_size):
            raise OrthrusError(f"{folder}: this checkpoint is for a different base model "
                               f"(hidden {base_cfg.hidden_size}, {base_cfg.num_hidden_layers} layers).")
    if (hf.get("mask_token_id") is not None and hf["mask_token_id"] != model.config.mask_token_id):
        raise OrthrusError(f"{folder}: drafter uses mask token {hf['mask_token_id']}, "
                           f"the model {model.config.mask_token_id}.")
    tensors = dict(read_tensors(folder))
    vocab = _draft_vocab(tensors.pop(DRAFT_VOCAB, None), model.config.vocab_size, folder)
    pairs = _dequantize_deltas(model, tensors, folder) if hf.get("storage", "float") == "int8-delta" else tensors.items()
    loaded = _load_into(model, pairs, folder, only_twins=True)
    needed = {n for n, _ in model.twin_parameters()}
    if needed - loaded:
        raise OrthrusError(f"{folder}: drafter weights missing: {sorted(needed - loaded)[:5]}")
    model.config.block_size = hf.get("block_size", model.config.block_size)
    model.draft_vocab = None if vocab is None else vocab.to(model.lm_head.weight.device)
    model.chance_temperatures = _chance_temperatures(hf.get("chance_temperatures"), folder)


def _chance_temperatures(values, where: Path) -> tuple[float, ...]:
    """A drafter's `chance_temperatures` (none: ()), after checking they are positive numbers."""
    if values is None:
        return ()
    if not (isinstance(values, list) and values and all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                                        and math.isfinite(t) and t > 0 for t in values)):
        raise OrthrusError(f"{where / 'config.json'}: chance_temperatures must be a non-empty list of positive numbers, "
                           f"got {values!r}.")
    return tuple(float(t) for t in values)


def _draft_vocab(ids: torch.Tensor | None, vocab_size: int, where: Path) -> torch.Tensor | None:
    """A drafter's draft vocabulary as sorted int64 ids, after checking it is one."""
    if ids is None:
        return None
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64) or len(ids) == 0:
        raise OrthrusError(f"{where}: {DRAFT_VOCAB} must be a non-empty 1-D tensor of token ids, got {ids.dtype} {tuple(ids.shape)}.")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size or not bool((ids[1:] > ids[:-1]).all()):
        raise OrthrusError(f"{where}: {DRAFT_VOCAB} must hold distinct token ids in [0, {vocab_size}), sorted.")
    return ids


def _dequantize_deltas(model: OrthrusLM, tensors: dict, where: Path):
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if t.dtype == torch.int8:
            ar = params.get(name.replace("_diff.", "."))
            if name + "_scale" not in tensors or ar is None:
                raise OrthrusError(f"{where}: int8 tensor {name} has no {name}_scale or no AR weight to add it to.")
            yield name, (ar.float() + t.float() * tensors[name + "_scale"].float()[:, None]).to(ar.dtype)
        elif not name.endswith("_scale"):
            yield name, t


def _quantize_delta(twin: torch.Tensor, ar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row of (twin - ar): the twins start as AR copies and stay close."""
    delta = twin.detach().float().cpu() - ar.detach().float().cpu()
    scale = (delta.abs().amax(1) / 127).clamp(min=1e-12)
    return (delta / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def staging_folder(target: Path) -> Path:
    """A temporary sibling of `target` to write a checkpoint into; `publish_folder` swaps it in,
    so a crash never leaves half a checkpoint under the real name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a published checkpoint is readable like any folder
    return tmp


def publish_folder(tmp: Path, target: Path) -> None:
    """Rename a finished staging folder to `target`, replacing an older one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


def save_drafter(model: OrthrusLM, folder: str | Path, base_model: str, dtype=torch.bfloat16, extra: dict | None = None,
                 storage: str = "float") -> None:
    """storage "float" (twins in `dtype`) or "int8" (int8 deltas from the AR weights, see above)."""
    if storage not in ("float", "int8"):
        raise OrthrusError(f"drafter storage must be 'float' or 'int8', got {storage!r}")
    folder = Path(folder)
    tmp = staging_folder(folder)
    tensors = {}
    for n, p in model.twin_parameters():
        if storage == "int8" and p.dim() == 2:
            tensors[n], tensors[n + "_scale"] = _quantize_delta(p, model.get_parameter(n.replace("_diff.", ".")))
        else:
            tensors[n] = p.detach().to("cpu", dtype).contiguous()
    if model.draft_vocab is not None:
        tensors[DRAFT_VOCAB] = model.draft_vocab.to("cpu", torch.int32)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "architectures": [DRAFTER_ARCHITECTURE],
        "model_type": model.config.model_type,
        "base_model": base_model,
        "base_fingerprint": base_fingerprint(model),
        "block_size": model.config.block_size,
        "mask_token_id": model.config.mask_token_id,
        "storage": "int8-delta" if storage == "int8" else "float",
        **({"chance_temperatures": list(model.chance_temperatures)} if model.chance_temperatures else {}),
        **(extra or {}),
    }
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    publish_folder(tmp, folder)


def save_orthrus(model: OrthrusLM, folder: str | Path, dtype=torch.bfloat16) -> None:
    """Write the official layout: base and twins in one folder, `architectures: ["OrthrusLM"]`."""
    folder = Path(folder)
    tmp = staging_folder(folder)
    tensors = {n: p.detach().to("cpu", dtype).contiguous() for n, p in model.named_parameters()
               if not (model.config.tie_word_embeddings and n == "lm_head.weight")}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(model.config.to_hf("OrthrusLM"), indent=2) + "\n")
    publish_folder(tmp, folder)
