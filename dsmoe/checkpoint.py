"""Hugging Face safetensors checkpoints: read (single file or sharded, both expert layouts) and write.

Reading builds the model on the ``meta`` device and *assigns* the tensors read from the
memory-mapped files (cast once to the requested dtype), so a checkpoint is never held twice.
Two layouts of the routed experts are accepted:

- on disk (the original remote code, and what transformers writes back):
  ``mlp.experts.{j}.{gate,up,down}_proj.weight``
- transformers v5's in-memory stacked layout:
  ``mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows first) and ``mlp.experts.down_proj [E, H, I]``

DeepSeek-V3 checkpoints may also hold multi-token-prediction layers (``model.layers.{L…}`` for
``num_nextn_predict_layers`` > 0; never read, noted) and fp8 weights with block scales
(dequantized on load, :mod:`dsmoe.fp8`).

Writing always uses the on-disk layout, sharded above ``max_shard_bytes`` with
``model.safetensors.index.json``; the output directory is written to a temporary sibling and
renamed, so nothing half-written is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsmoe.config import DeepseekConfig
from dsmoe.contract import FP32_KEY, HF_STACKED, LAYER_KEY, NON_PERSISTENT_KEY
from dsmoe.dtypes import torch_name
from dsmoe.errors import CheckpointError, DsmoeError
from dsmoe.fp8 import dequantize_state_dict, is_fp8, is_scale_key

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (via the index when sharded)."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"malformed {path / INDEX}: {e}") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{INDEX} names shard {f!r}, which is missing from {path}")
        return [path / f for f in files]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise CheckpointError(f"{path} holds only pickle weights (*.bin/*.pt); dsmoe loads safetensors only")
    raise CheckpointError(f"no weights in {path}: expected {SINGLE} or {INDEX}")


def read_tensors(path: Path, dtype: torch.dtype, skip=None):
    """Yield ``(key, tensor)`` from every shard, memory-mapped, cast to ``dtype`` (fp32 keys kept;
    fp8 weights and their scales as stored, for :func:`dsmoe.fp8.dequantize_state_dict`); keys
    for which ``skip(key)`` holds are not read."""
    for f in shard_files(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if NON_PERSISTENT_KEY.search(key) or (skip is not None and skip(key)):
                        continue
                    t = sf.get_tensor(key)
                    want = torch.float32 if FP32_KEY.search(key) or is_scale_key(key) else dtype
                    yield key, (t.to(want) if t.is_floating_point() and t.dtype != want and not is_fp8(t) else t)
        except SafetensorError as e:
            raise CheckpointError(f"corrupt or truncated safetensors file {f.name}: {e}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {f}: {e}") from None


def unstack_experts(key: str, t: torch.Tensor, config: DeepseekConfig) -> dict[str, torch.Tensor]:
    """transformers-v5 stacked expert tensors → per-expert keys (views, no copy)."""
    prefix, kind = HF_STACKED.match(key).groups()
    E, I, H = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
    want = (E, 2 * I, H) if kind == "gate_up_proj" else (E, H, I)
    if tuple(t.shape) != want:
        raise CheckpointError(f"wrong shape for {key}: expected {list(want)}, found {list(t.shape)}")
    out = {}
    for j in range(E):
        if kind == "gate_up_proj":
            out[f"{prefix}.{j}.gate_proj.weight"] = t[j, :I]
            out[f"{prefix}.{j}.up_proj.weight"] = t[j, I:]
        else:
            out[f"{prefix}.{j}.down_proj.weight"] = t[j]
    return out


def mtp_layers(config: DeepseekConfig) -> range:
    """The layer indices of V3's multi-token-prediction layers (stored after the decoder's)."""
    L = config.num_hidden_layers
    return range(L, L + (config.num_nextn_predict_layers if config.is_mla else 0))


def load_state_dict(path: str | Path, config: DeepseekConfig, expected: dict[str, torch.Size],
                    dtype: torch.dtype, notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read and check a checkpoint against the model's expected ``{key: shape}``; what was left
    out on purpose (multi-token-prediction layers) and dequantized is appended to ``notes``."""
    path = Path(path)
    sd: dict[str, torch.Tensor] = {}
    mtp, skipped = mtp_layers(config), set()

    def is_mtp(key: str) -> bool:
        m = LAYER_KEY.match(key)
        if m and int(m.group(1)) in mtp:
            skipped.add(int(m.group(1)))
            return True
        return False

    for key, t in read_tensors(path, dtype, skip=is_mtp):
        if HF_STACKED.match(key):
            sd.update(unstack_experts(key, t, config))
        else:
            sd[key] = t
    quantized = sum(1 for t in sd.values() if is_fp8(t))
    sd = dequantize_state_dict(sd, config.fp8_block, dtype)
    if notes is not None:
        if skipped:
            notes.append(f"left out {len(skipped)} multi-token-prediction layer(s) "
                         f"({', '.join(f'model.layers.{i}' for i in sorted(skipped))}): not used for inference")
        if quantized:
            notes.append(f"dequantized {quantized} fp8 weights ({config.fp8_block[0]}×{config.fp8_block[1]} "
                         f"block scales) to {torch_name(dtype)}")
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    unexpected = sorted(set(sd) - set(expected))
    missing = sorted(set(expected) - set(sd))
    hint = " (config/weights mismatch: check num_hidden_layers, n_routed_experts, first_k_dense_replace)"
    if unexpected:
        raise CheckpointError(f"unexpected key {unexpected[0]}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "") + hint)
    if missing:
        raise CheckpointError(f"missing key {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "") + hint)
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"wrong shape for {k}: expected {list(shape)}, found {list(sd[k].shape)}")
    return sd


def save_checkpoint(model: torch.nn.Module, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 5 * 2**30, force: bool = False) -> Path:
    """Write ``config.json`` + safetensors (per-expert keys) atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    tmp = prepare_output_dir(out_dir, force=force)
    try:
        config: DeepseekConfig = model.config
        sd = {}
        for k, t in model.state_dict().items():
            if NON_PERSISTENT_KEY.search(k) or (config.tie_word_embeddings and k == "lm_head.weight"):
                continue
            if dtype is not None and t.is_floating_point() and not FP32_KEY.search(k):
                t = t.to(dtype)
            sd[k] = t.detach().contiguous()
        shards = _split_shards(sd, max_shard_bytes)
        cfg = config.to_dict()
        if dtype is not None:
            cfg["torch_dtype"] = torch_name(dtype)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in sd.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        commit_output_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _split_shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def prepare_output_dir(out_dir: Path, *, force: bool) -> Path:
    """Refuse an existing ``out_dir`` unless ``force``; return a fresh temporary sibling to fill."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise DsmoeError(f"output {out_dir} already exists (use --force to replace it)")
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as e:
        raise DsmoeError(f"cannot write output {out_dir}: {e.strerror or e}") from None


def commit_output_dir(tmp: Path, out_dir: Path) -> None:
    """Atomically move a finished temporary directory to ``out_dir`` (replacing an old one)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
