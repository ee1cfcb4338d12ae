"""A model one part at a time: the embeddings, each decoder layer, the head (final norm, lm_head).

The 16B model is 61 GiB in fp32 and 30.5 GiB in bf16: it cannot be held on the 24 GB reference
machine, so what must see all of it sees it part by part, never more than one layer in full
precision at once:

- :func:`write_random_checkpoint` (``dsmoe init``) draws a preset's random weights part by part
  in exactly the order and with exactly the rule of :func:`dsmoe.model.init_weights` (one
  generator, parameters in ``model.named_parameters()`` order, then the routing biases), so the
  checkpoint equals ``dsmoe.load("preset:NAME")`` bit for bit, and writes shards as they fill;
- :func:`read_part` reads one part of a checkpoint directory (memory-mapped safetensors);
- :func:`part_module` builds a part as a real module (what the streaming exporter and the
  streamed reference run).

Part names: ``"embed"``, ``"layer 0"`` … ``"layer L-1"``, ``"head"``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dsmoe.architecture import available_memory
from dsmoe.checkpoint import INDEX, SINGLE, check_checkpoint
from dsmoe.checkpoint import read_part as _read_keys
from dsmoe.config import DeepseekConfig
from dsmoe.contract import FP32_KEY
from dsmoe.dtypes import torch_name
from dsmoe.errors import DsmoeError
from dsmoe.model import DeepseekDecoderLayer, DeepseekRMSNorm, init_value
from dsmoe.outputs import OutputDir

CORRECTION_BIAS_SUFFIX = "mlp.gate.e_score_correction_bias"


def part_names(config: DeepseekConfig) -> list[str]:
    return ["embed", *[f"layer {i}" for i in range(config.num_hidden_layers)], "head"]


def layer_of(part: str) -> int | None:
    return int(part.split()[1]) if part.startswith("layer ") else None


def part_module(config: DeepseekConfig, part: str, device: str | torch.device = "meta") -> tuple[str, nn.Module]:
    """``(key prefix, module)`` of a part, uninitialized on ``device``; the module's
    ``named_parameters()`` prefixed are the checkpoint keys, in the whole model's order."""
    with torch.device(device):
        if part == "embed":
            return "model.embed_tokens.", nn.Embedding(config.vocab_size, config.hidden_size)
        i = layer_of(part)
        if i is not None:
            return f"model.layers.{i}.", DeepseekDecoderLayer(config, i)
        head = nn.Module()
        head.norm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            head.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        return "", head


def _key(prefix: str, name: str) -> str:
    return f"{prefix}{name}" if prefix else {"norm.weight": "model.norm.weight"}.get(name, name)


def part_shapes(config: DeepseekConfig, part: str) -> dict[str, torch.Size]:
    """``{checkpoint key: shape}`` of a part's parameters and persistent buffers."""
    prefix, mod = part_module(config, part)
    out = {_key(prefix, n): p.shape for n, p in mod.named_parameters()}
    out.update({_key(prefix, n): b.shape for n, b in mod.named_buffers() if n.endswith("e_score_correction_bias")})
    return out


def read_part(path: str | Path, config: DeepseekConfig, part: str, dtype: torch.dtype = torch.float32, *,
              check_finite: bool = True) -> dict[str, torch.Tensor]:
    """One part's tensors from a checkpoint directory (the routing bias kept fp32)."""
    return _read_keys(path, config, part_shapes(config, part), dtype, check_finite=check_finite)


def random_parts(config: DeepseekConfig, seed: int) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(part, {key: fp32 tensor})`` in order, drawn as :func:`dsmoe.model.init_weights` draws;
    the routing biases (drawn after every parameter) come last, as part ``"biases"``."""
    g = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    for part in part_names(config):
        prefix, mod = part_module(config, part)
        yield part, {_key(prefix, n): init_value(_key(prefix, n), p.shape, g, std) for n, p in mod.named_parameters()}
    biases = {}
    for part in part_names(config):
        for key, shape in part_shapes(config, part).items():
            if key.endswith(CORRECTION_BIAS_SUFFIX):
                biases[key] = init_value(key, shape, g, std)
    if biases:
        yield "biases", biases


def check_token_ids(config: DeepseekConfig) -> None:
    """bos/eos/pad ids inside the vocabulary (what every command reading the checkpoint checks)."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(config, name, config.extra.get(name))
        for i in v if isinstance(v, list) else [v]:
            if i is not None and not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size):
                raise DsmoeError(f"{name} {v!r} is not a token id of the vocabulary [0, {config.vocab_size}): "
                                 f"set it with --set {name}=N (or null)")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise DsmoeError(f"seed must be an integer in [0, 2**64), got {seed!r}")


def _nbytes(shapes: dict[str, torch.Size], dtype: torch.dtype) -> int:
    return sum(s.numel() * (4 if FP32_KEY.search(k) else dtype.itemsize) for k, s in shapes.items())


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _check_memory(config: DeepseekConfig, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """Refuse (one line, with the numbers) what cannot be drawn: memory for one shard plus the
    largest part drawn in fp32."""
    sizes = {p: part_shapes(config, p) for p in part_names(config)}
    largest = max(sizes, key=lambda p: _nbytes(sizes[p], torch.float32))
    part_fp32 = _nbytes(sizes[largest], torch.float32)
    total = sum(_nbytes(v, dtype) for v in sizes.values())
    need = min(max_shard_bytes, total) + part_fp32 + _nbytes(sizes[largest], dtype)
    have = available_memory(torch.device("cpu"))
    gib = _size
    if need > have:
        raise DsmoeError(f"writing this checkpoint needs {gib(need)} of memory (a shard of up to {gib(min(max_shard_bytes, total))} "
                         f"plus its largest part, {largest}, drawn in float32: {gib(part_fp32)}), but only {gib(have)} "
                         "are available (try a smaller preset or --set num_hidden_layers=N)")


def _check_disk(config: DeepseekConfig, staging: Path, out: Path, dtype: torch.dtype) -> None:
    """Refuse a checkpoint larger than the free space where it is being written (one line)."""
    total = sum(_nbytes(part_shapes(config, p), dtype) for p in part_names(config))
    free = shutil.disk_usage(staging).free
    if total > free:
        raise DsmoeError(f"no space left on the device for {out}: the checkpoint is {_size(total)} in {torch_name(dtype)}, "
                         f"{_size(free)} are free; nothing was written")


RANDOM_KEY = "dsmoe_random_init_seed"  # safetensors metadata of `dsmoe init`'s shards: the weights are random


def random_metadata(seed: int) -> dict[str, str]:
    return {"format": "pt", RANDOM_KEY: str(seed)}


def random_init_seed(source: str | Path) -> int | None:
    """The seed of a checkpoint ``dsmoe init`` wrote (random weights: accuracy numbers on it mean
    nothing about a trained model), else None. A preset is random too (``preset:NAME`` → its seed 0)."""
    if str(source).startswith("preset:"):
        return 0
    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        return None
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            seed = (f.metadata() or {}).get(RANDOM_KEY)
    except (OSError, SafetensorError):  # an unreadable shard is the loader's to report
        return None
    return int(seed) if seed is not None and seed.isdigit() else None


def write_random_checkpoint(config: DeepseekConfig, out_dir: str | Path, *, seed: int = 0,
                            dtype: torch.dtype = torch.float32, force: bool = False,
                            max_shard_bytes: int = 5 * 2**30) -> Path:
    """A preset's random checkpoint, written part by part (peak memory: one shard plus one part in
    fp32), sharded like :func:`dsmoe.checkpoint.save_checkpoint`, atomically through
    :class:`dsmoe.outputs.OutputDir`; equal to ``init_model(config, seed=seed, dtype=dtype)``."""
    config.validate()
    check_seed(seed)
    check_token_ids(config)
    _check_memory(config, dtype, max_shard_bytes)
    plan: list[list[str]] = [[]]
    size = 0
    for part in part_names(config):  # shards by part, in order, each under max_shard_bytes if it can be
        n = _nbytes(part_shapes(config, part), dtype)
        if plan[-1] and size + n > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(part)
        size += n
    names = [SINGLE] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    shard_of = {part: names[i] for i, parts in enumerate(plan) for part in parts}
    with OutputDir(out_dir, force=force, kind="checkpoint") as staging:
        tmp = staging.path
        _check_disk(config, tmp, Path(out_dir), dtype)
        cfg = config.to_dict()
        cfg["torch_dtype"] = torch_name(dtype)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        weight_map, pending, total = {}, {}, 0
        current = names[0]
        for part, tensors in random_parts(config, seed):
            name = shard_of.get(part, names[-1])  # the routing biases join the last shard
            if name != current and pending:
                save_file(pending, str(tmp / current), metadata=random_metadata(seed))
                pending = {}
            current = name
            for key, t in tensors.items():
                # as init_model: drawn into a model already cast to dtype (the routing bias too,
                # which cast_model then returns to fp32)
                t = t.to(dtype).float() if FP32_KEY.search(key) else t.to(dtype)
                pending[key] = t.contiguous()
                weight_map[key] = name
                total += t.numel() * t.element_size()
        save_file(pending, str(tmp / current), metadata=random_metadata(seed))
        if len(names) > 1:
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        # never a checkpoint dsmoe would refuse: its config and keys read back under the loader's contract
        written = DeepseekConfig.from_json(tmp / "config.json")
        check_checkpoint(tmp, written, {k: v for p in part_names(written) for k, v in part_shapes(written, p).items()})
        return staging.commit()
