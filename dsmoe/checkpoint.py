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
import re
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsmoe.config import DeepseekConfig
from dsmoe.contract import CORRECTION_BIAS, FP32_KEY, HF_STACKED, LAYER_KEY, NON_PERSISTENT_KEY
from dsmoe.dtypes import torch_name
from dsmoe.errors import CheckpointError
from dsmoe.fp8 import dequantize_state_dict, is_fp8, is_scale_key
from dsmoe.outputs import OutputDir

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def shard_plan(path: Path) -> list[tuple[Path, set[str] | None]]:
    """The safetensors files of a checkpoint directory, each with the keys to read from it: with
    ``model.safetensors.index.json``, exactly the keys its ``weight_map`` assigns to that file
    (the index is the truth); without one, ``None`` (every key of the file)."""
    if (path / INDEX).is_file():
        weight_map = _weight_map(path)
        plan: dict[str, set[str]] = {}
        for key, name in weight_map.items():
            plan.setdefault(name, set()).add(key)
        for name in plan:
            if not (path / name).is_file():
                raise CheckpointError(f"{INDEX} names shard {name!r}, which is missing from {path}")
        return [(path / name, keys) for name, keys in sorted(plan.items())]
    if (path / SINGLE).is_file():
        return [(path / SINGLE, None)]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return [(f, None) for f in found]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise CheckpointError(f"{path} holds only pickle weights (*.bin/*.pt); dsmoe loads safetensors only")
    raise CheckpointError(f"no weights in {path}: expected {SINGLE} or {INDEX}")


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (via the index when sharded)."""
    return [f for f, _ in shard_plan(path)]


def _weight_map(path: Path) -> dict[str, str]:
    """The index's ``{key: shard file}``, checked: string keys and values, shard names that stay
    inside the checkpoint directory (no absolute paths, no ``..``)."""
    try:
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"malformed {path / INDEX}: {type(e).__name__}: {e}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"malformed {path / INDEX}: weight_map must be an object of key -> shard file")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"malformed {path / INDEX}: weight_map[{key!r}] is {name!r}, not a shard file name")
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or "\\" in name:
            raise CheckpointError(f"{INDEX} names shard {name!r} for {key}, outside the checkpoint directory; "
                                  "dsmoe reads only files inside it")
    return weight_map


def read_tensors(path: Path, dtype: torch.dtype, *, check_finite: bool = True, skip=None):
    """Yield ``(key, tensor)`` from every shard, memory-mapped, cast to ``dtype`` (fp32 keys and
    fp8 scales kept fp32; fp8 weights as stored, for :func:`dsmoe.fp8.dequantize_state_dict`);
    keys for which ``skip(key)`` holds are not read.

    A key is read from the one shard the index names; a key found in two shards, a key the index
    lists that its shard lacks, and a key a shard holds that the index does not list are errors.
    Every tensor must be floating point, and (unless ``check_finite`` is off) finite after the cast
    (fp8 weights: once dequantized).
    """
    def read(sf, key):
        return None if skip is not None and skip(key) else _cast(key, sf.get_tensor(key), dtype, check_finite)

    for key, _, tensor in _walk_shards(path, read):
        if tensor is not None:
            yield key, tensor


def _walk_shards(path: Path, read):
    """``(key, shard file name, read(safe_open handle, key))`` for every key of every shard, in
    order, each shard checked by :func:`_check_shard` (a key in one shard only, the index the truth)
    before any of its keys is read; unreadable files are one :class:`CheckpointError`."""
    where: dict[str, str] = {}
    for f, keys in shard_plan(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                present = {k for k in sf.keys() if not NON_PERSISTENT_KEY.search(k)}  # noqa: SIM118
                wanted = present if keys is None else {k for k in keys if not NON_PERSISTENT_KEY.search(k)}
                _check_shard(f, present, wanted, keys is not None, where)
                for key in sorted(wanted):
                    where[key] = f.name
                    yield key, f.name, read(sf, key)
        except SafetensorError as e:
            raise CheckpointError(f"corrupt or truncated safetensors file {f.name}: {e}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {f}: {e}") from None


def _check_shard(f: Path, present: set[str], wanted: set[str], indexed: bool, where: dict[str, str]) -> None:
    lacking = sorted(wanted - present)
    if lacking:
        raise CheckpointError(f"{INDEX} puts {lacking[0]} in {f.name}, which does not hold it"
                              + (f" (+{len(lacking) - 1} more)" if len(lacking) > 1 else ""))
    seen = sorted(k for k in present if k in where)
    if seen:
        raise CheckpointError(f"key {seen[0]} is in two shards, {where[seen[0]]} and {f.name}: refusing an ambiguous "
                              "checkpoint" + (f" (+{len(seen) - 1} more)" if len(seen) > 1 else ""))
    if indexed:
        stray = sorted(present - wanted)
        if stray:
            raise CheckpointError(f"{f.name} holds {stray[0]}, which {INDEX} does not list (or puts in another shard)"
                                  + (f" (+{len(stray) - 1} more)" if len(stray) > 1 else ""))


def _cast(key: str, t: torch.Tensor, dtype: torch.dtype, check_finite: bool) -> torch.Tensor:
    if is_fp8(t):
        return t  # dequantized with its block scale by load_state_dict (then checked)
    if "float8" in str(t.dtype):
        raise CheckpointError(f"{key} is {torch_name(t.dtype)}: dsmoe dequantizes e4m3 (float8_e4m3fn) weights "
                              "with block scales only")
    if not t.is_floating_point():
        raise CheckpointError(f"{key} has dtype {torch_name(t.dtype)}: model weights must be floating point "
                              "(float32, float16 or bfloat16)")
    want = torch.float32 if FP32_KEY.search(key) or is_scale_key(key) else dtype
    if t.dtype != want:
        t = t.to(want)
    if check_finite and not all_finite(t):
        raise CheckpointError(f"{key} holds NaN or Inf values (as {torch_name(want)}): a model with them computes "
                              "garbage (--allow-nonfinite loads it anyway)")
    return t


def all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Whether every element is finite, in chunks (no bool copy of a multi-GB tensor)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(c).all()) for c in flat.split(chunk))


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


def read_part(path: str | Path, config: DeepseekConfig, expected: dict[str, torch.Size], dtype: torch.dtype, *,
              check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Read only the keys of ``expected`` (one layer, say) from a checkpoint, memory-mapped, cast
    to ``dtype``, in the on-disk per-expert layout; missing or wrongly shaped keys are errors. What
    the streaming exporter reads one part of the model at a time with."""
    path = Path(path)
    stacked = {m.group(1) for k in expected if (m := re.match(r"^(.*\.mlp\.experts)\.\d+\.", k))}
    sd: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for f, keys in shard_plan(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sorted(keys if keys is not None else sf.keys()):
                    hf = HF_STACKED.match(key)
                    if key in expected or (hf and hf.group(1) in stacked):
                        if key in where:  # never "the last copy wins"
                            raise CheckpointError(f"key {key} is in two shards, {where[key]} and {f.name}: refusing an "
                                                  "ambiguous checkpoint")
                        where[key] = f.name
                        t = _cast(key, sf.get_tensor(key), dtype, check_finite)
                        sd.update(unstack_experts(key, t, config) if hf else {key: t})
        except SafetensorError as e:
            raise CheckpointError(f"corrupt or truncated safetensors file {f.name}: {e}") from None
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"missing key {missing[0]}" + _more(missing) + mismatch_hint(missing))
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"wrong shape for {k}: expected {list(shape)}, found {list(sd[k].shape)}")
    return {k: sd[k] for k in expected}


def check_checkpoint(path: str | Path, config: DeepseekConfig, expected: dict[str, torch.Size]) -> dict[str, str]:
    """THE checkpoint contract, from the safetensors headers alone (no tensor is read): every
    reader — :func:`load_state_dict` (the in-memory loader) and the streaming exporter — calls it
    first, so they accept and refuse exactly the same checkpoints. Returns ``{key: shard file}``.

    - a key is in exactly one shard (the index, when there is one, is the truth: see :func:`read_tensors`);
    - every key the model expects is present with its shape (both expert layouts), and no other
      key is (a config that says fewer ``num_hidden_layers`` than the checkpoint holds is refused);
      multi-token-prediction layers and fp8 block scales are the only keys set aside;
    - ``tie_word_embeddings`` with an ``lm_head.weight`` present: allowed here; the readers compare
      it with the embedding and refuse a different one (:func:`check_tied_head`).

    Errors name the key and the shard holding it."""
    path = Path(path)
    where: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, shard, shape in _walk_shards(path, lambda sf, k: tuple(sf.get_slice(k).get_shape())):
        where[key], shapes[key] = shard, shape
    mtp = mtp_layers(config)
    found: dict[str, tuple[int, ...]] = {}
    origin: dict[str, str] = {}
    for key, shape in shapes.items():
        m = LAYER_KEY.match(key)
        if (m and int(m.group(1)) in mtp) or is_scale_key(key):
            continue
        hf = HF_STACKED.match(key)
        if hf:
            E, I, H = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
            want = (E, 2 * I, H) if hf.group(2) == "gate_up_proj" else (E, H, I)
            if LAYER_KEY.match(key) and int(LAYER_KEY.match(key).group(1)) < config.num_hidden_layers and shape != want:
                raise CheckpointError(f"wrong shape for {key}: expected {list(want)}, found {list(shape)} (in {where[key]})")
            per = ({f"{hf.group(1)}.{j}.{p}.weight": (I, H) for j in range(E) for p in ("gate_proj", "up_proj")}
                   if hf.group(2) == "gate_up_proj" else {f"{hf.group(1)}.{j}.down_proj.weight": (H, I) for j in range(E)})
            found.update(per)
            origin.update(dict.fromkeys(per, key))
        else:
            found[key] = shape
            origin[key] = key
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    unexpected = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if unexpected:
        k = origin[unexpected[0]]
        raise CheckpointError(f"unexpected key {k}" + _more(unexpected) + mismatch_hint(unexpected) + f"; it is in {where[k]}")
    if missing:
        raise CheckpointError(f"missing key {missing[0]}" + _more(missing) + mismatch_hint(missing))
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise CheckpointError(f"wrong shape for {k}: expected {list(shape)}, found {list(found[k])} "
                                  f"(in {where[origin[k]]})")
    return where


def check_tied_head(config: DeepseekConfig, embed: torch.Tensor | None, head: torch.Tensor | None) -> None:
    """``tie_word_embeddings`` with an ``lm_head.weight`` in the checkpoint: it must equal the
    embedding (then it is the same tensor and is dropped); a different one would be silently
    replaced by the embedding, so it is refused."""
    if not config.tie_word_embeddings or head is None or embed is None:
        return
    if head.shape != embed.shape or not torch.equal(head, embed.to(head.dtype)):
        raise CheckpointError("config.json says tie_word_embeddings: true, but the checkpoint's lm_head.weight differs "
                              "from model.embed_tokens.weight (it would be ignored): set tie_word_embeddings to false "
                              "to use it, or remove it")


def mtp_layers(config: DeepseekConfig) -> range:
    """The layer indices of V3's multi-token-prediction layers (stored after the decoder's)."""
    L = config.num_hidden_layers
    return range(L, L + (config.num_nextn_predict_layers if config.is_mla else 0))


def load_state_dict(path: str | Path, config: DeepseekConfig, expected: dict[str, torch.Size],
                    dtype: torch.dtype, *, check_finite: bool = True,
                    notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read and check a checkpoint against the model's expected ``{key: shape}``; what was left
    out on purpose (multi-token-prediction layers) and dequantized is appended to ``notes``."""
    path = Path(path)
    check_checkpoint(path, config, expected)  # the contract every reader shares, before any tensor is read
    sd: dict[str, torch.Tensor] = {}
    mtp, skipped = mtp_layers(config), set()

    def is_mtp(key: str) -> bool:
        m = LAYER_KEY.match(key)
        if m and int(m.group(1)) in mtp:
            skipped.add(int(m.group(1)))
            return True
        return False

    for key, t in read_tensors(path, dtype, check_finite=check_finite, skip=is_mtp):
        if HF_STACKED.match(key):
            sd.update(unstack_experts(key, t, config))
        else:
            sd[key] = t
    quantized = sorted(k for k, t in sd.items() if is_fp8(t))
    sd = dequantize_state_dict(sd, config.fp8_block, dtype)
    for key in quantized if check_finite else ():
        if not all_finite(sd[key]):
            raise CheckpointError(f"{key} holds NaN or Inf values once dequantized: a model with them computes "
                                  "garbage (--allow-nonfinite loads it anyway)")
    if notes is not None:
        if skipped:
            notes.append(f"left out {len(skipped)} multi-token-prediction layer(s) "
                         f"({', '.join(f'model.layers.{i}' for i in sorted(skipped))}): not used for inference")
        if quantized:
            notes.append(f"dequantized {len(quantized)} fp8 weights ({config.fp8_block[0]}×{config.fp8_block[1]} "
                         f"block scales) to {torch_name(dtype)}")
    if config.tie_word_embeddings:
        check_tied_head(config, sd.get("model.embed_tokens.weight"), sd.pop("lm_head.weight", None))
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    unexpected = sorted(set(sd) - set(expected))
    missing = sorted(set(expected) - set(sd))
    if unexpected:
        raise CheckpointError(f"unexpected key {unexpected[0]}" + _more(unexpected) + mismatch_hint(unexpected))
    if missing:
        raise CheckpointError(f"missing key {missing[0]}" + _more(missing) + mismatch_hint(missing))
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"wrong shape for {k}: expected {list(shape)}, found {list(sd[k].shape)}")
    return sd


def _more(keys: list[str]) -> str:
    return f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""


MLA_KEY = re.compile(r"\.self_attn\.(q_a_proj|q_b_proj|q_a_layernorm|kv_a_proj_with_mqa|kv_a_layernorm|kv_b_proj)\.")


def mismatch_hint(keys: list[str]) -> str:
    """What a set of unexpected (or missing) keys says about the config they disagree with."""
    if any(MLA_KEY.search(k) for k in keys):
        return (" (these are Multi-head Latent Attention weights of a DeepSeek-V2/V3 checkpoint, whose config says "
                "model_type deepseek_v2 or deepseek_v3, not deepseek)")
    if any(FP32_KEY.search(k) for k in keys):
        return (f" ({CORRECTION_BIAS} is the V3 routing bias: the config must say topk_method 'noaux_tc' and "
                "scoring_func 'sigmoid' for a checkpoint that has it, and only then)")
    return " (config/weights mismatch: check num_hidden_layers, n_routed_experts, first_k_dense_replace, moe_layer_freq)"


def save_checkpoint(model: torch.nn.Module, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 5 * 2**30, force: bool = False) -> Path:
    """Write ``config.json`` + safetensors (per-expert keys) atomically into ``out_dir``
    (:class:`dsmoe.outputs.OutputDir`: refused if it exists unless ``force``, never half-written)."""
    with OutputDir(out_dir, force=force, kind="checkpoint") as staging:
        tmp = staging.path
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
        return staging.commit()


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
