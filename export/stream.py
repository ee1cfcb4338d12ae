"""Streaming quantized export: a model too big to hold (the 28-layer 16B: 61 GiB in fp32) exported
with at most one decoder layer in full precision in memory.

1. **Graph, without weights.** The model is built on the ``meta`` device and goes through the one
   pipeline — :func:`dsmoe.ir.capture`, the passes, :func:`lower_quantized` — on shapes alone.
   Its weights are then swapped for placeholders (zero-stride CPU tensors of the right shape and
   dtype; small ones get distinct random values so no deduplication can merge them) and it is
   exported by :func:`dsmoe.export.export_module`, the one ONNX path, with the optimizer told never
   to fold a node that reads a placeholder.
2. **Weights, one part at a time.** Each part (the embeddings and head; then each layer) is read
   from the checkpoint (memory-mapped), built into a one-layer *slice* model, and put through the
   same capture → passes → quantized lowering; its lowered buffers are the real values of the
   graph's initializers of that part (names checked, shapes and dtypes checked), appended to
   ``model.onnx.data`` as they come. An initializer left unwritten is an error.
3. **Accuracy, streamed** (:func:`streamed_checks`): ONNX Runtime runs the seeded prompts through
   the export; then the unquantized model and the quantized reference run them layer by layer.

The weights come from a checkpoint directory, or — for a preset, with no checkpoint on disk — are
drawn part by part in :func:`dsmoe.model.init_weights`' order (the same weights ``dsmoe init``
writes and ``dsmoe.load("preset:NAME")`` builds).
"""

from __future__ import annotations

import gc
import os
import resource
from pathlib import Path

import onnx_ir as ir
import psutil
import torch
from dsmoe.export.lower_quant import int4_tensor, lower_quantized
from dsmoe.export.onnx_writer import DATA_FILE
from dsmoe.export.quant_report import PROMPT_LEN, PROMPTS, Routes, compare_logits, prompts, routing_drift
from dsmoe.export.runner import OrtDecoder
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import run_pipeline

from dsmoe import is_preset
from dsmoe.architecture import architecture, available_memory
from dsmoe.checkpoint import check_checkpoint, check_tied_head
from dsmoe.checkpoint import read_part as _read_keys
from dsmoe.config import DeepseekConfig
from dsmoe.contract import CORRECTION_BIAS
from dsmoe.dtypes import VERIFY_RTOL
from dsmoe.errors import DsmoeError
from dsmoe.ir import capture
from dsmoe.model import DeepseekForCausalLM, DeepseekRotaryEmbedding, causal_mask, rebuild_rotary
from dsmoe.quant import PREFERRED_BLOCK_SIZES, QuantScheme
from dsmoe.quantized import quantized_reference
from dsmoe.streaming import layer_of, part_module, part_names, part_shapes, random_parts, read_part

SMALL = 4096          # placeholders up to this many elements hold distinct random values
ALIGN = 4096          # external-data offsets (page-aligned: ORT can map them)
ONNX_PREFIX = "gm."   # the exported module holds the lowered graph as ``gm``


def must_stream(config: DeepseekConfig) -> bool:
    """Whether the fp32 model (plus the exporter's copies) would not fit: weights over 40% of the
    memory available now."""
    return architecture(config).params_total * 4 > 0.4 * available_memory(torch.device("cpu"))


def lowered_graph(model: torch.nn.Module, *, target: str, scheme: QuantScheme):
    """capture → passes → quantized lowering: ``(graph, pass reports, lowering report)``; a region
    a pass leaves alone is an error (the streamed parts must lower exactly as the whole graph)."""
    gm = capture(model)
    gm, reports = run_pipeline(gm, PassContext())
    skipped = [s for r in reports for s in r.skipped]
    if skipped:
        raise DsmoeError(f"cannot stream this export: a pass left a region alone ({skipped[0]})")
    return gm, reports, lower_quantized(gm, target=target, scheme=scheme)


def meta_model(config: DeepseekConfig) -> DeepseekForCausalLM:
    with torch.device("meta"):
        model = DeepseekForCausalLM(config).eval().requires_grad_(False)
    for mod in model.modules():  # the rotary tables are computed on the CPU whatever the device
        if isinstance(mod, DeepseekRotaryEmbedding):
            mod.inv_freq = mod.inv_freq.to("meta")
    return model


def template(config: DeepseekConfig, *, target: str, scheme: QuantScheme):
    """The whole lowered graph with meta weights (shapes and dtypes only), with its reports; the
    tensors it creates itself (``arange``, ``zeros``, the device checks) say ``cpu``, where it runs."""
    gm, reports, lowered = lowered_graph(meta_model(config), target=target, scheme=scheme)
    cpu = torch.device("cpu")
    fix = lambda a: cpu if isinstance(a, torch.device) and a.type == "meta" else a  # noqa: E731
    for n in gm.graph.nodes:
        n.args = tuple(fix(a) for a in n.args)
        n.kwargs = {k: fix(v) for k, v in n.kwargs.items()}
    gm.recompile()
    return gm, reports, lowered


def swap_in_placeholders(gm: torch.fx.GraphModule, config: DeepseekConfig) -> set[str]:
    """Replace every meta parameter/buffer of ``gm`` by a placeholder; returns their ONNX names.
    The rotary ``inv_freq`` (computed, not a weight) gets its real value."""
    g = torch.Generator().manual_seed(0)
    inv_freq = DeepseekRotaryEmbedding(config).inv_freq  # computed on the CPU
    names = set()
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if leaf == "inv_freq":
            value = inv_freq
        elif t.numel() <= SMALL:
            value = (torch.rand(t.shape, generator=g) * 100 + 1).to(t.dtype) if t.is_floating_point() else \
                torch.randint(0, 127, t.shape, generator=g).to(t.dtype)
        else:
            value = torch.zeros((), dtype=t.dtype).expand(t.shape)
        if leaf in mod._parameters:
            mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            mod._buffers[leaf] = value
        names.add(ONNX_PREFIX + name)
    return names


def _slice_config(config: DeepseekConfig, part: str, scheme: QuantScheme) -> DeepseekConfig:
    """A one-layer config whose layer 0 is ``part``'s layer (same kind); the embedding/head of a
    layer slice, and the layer of the ends slice, are minimal stand-ins that are discarded."""
    i = layer_of(part)
    if i is not None:
        return config.override({"num_hidden_layers": 1, "first_k_dense_replace": 0 if config.is_moe_layer(i) else 1,
                                "moe_layer_freq": 1, "vocab_size": 2})
    return config.override({"num_hidden_layers": 1, "first_k_dense_replace": 1,
                            "intermediate_size": scheme.block_size or PREFERRED_BLOCK_SIZES[-1]})


def lowered_part(config: DeepseekConfig, part: str, weights: dict[str, torch.Tensor], *, target: str,
                 scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """``{ONNX initializer name: tensor}`` of one part — ``"ends"`` (``weights``: the embedding's
    and the head's) or a layer — lowered through a slice model exactly as the whole graph is."""
    cfg = _slice_config(config, part, scheme)
    i = layer_of(part)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg).eval().requires_grad_(False)
    if i is not None:
        real = {k.replace(f"model.layers.{i}.", "model.layers.0.", 1): t for k, t in weights.items()}
    else:
        real = dict(weights)
    weights.clear()
    sd = {k: real.pop(k) if k in real else torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()
          if not k.endswith("inv_freq")}
    model.load_state_dict(sd, strict=False, assign=True)
    del sd, real
    if cfg.tie_word_embeddings:  # as the loader does: one tensor, as in the whole graph
        model.lm_head.weight = model.model.embed_tokens.weight
    rebuild_rotary(model)
    gm = lowered_graph(model.float(), target=target, scheme=scheme)[0]
    del model
    out = {}
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        in_layer = name.startswith("lm.model.layers.0.")
        if i is not None and in_layer:
            out[ONNX_PREFIX + name.replace("lm.model.layers.0.", f"lm.model.layers.{i}.", 1)] = t
        elif i is None and not in_layer and not name.endswith("inv_freq"):
            out[ONNX_PREFIX + name] = t
    del gm
    # the captured graph, its exported program and fake-tensor caches hold the slice's fp32 weights
    # in reference cycles: collect them now, not when Python's object counts say so (that was one
    # layer's weights more per layer, until the OOM killer came at layer 8 of 28)
    gc.collect()
    return out


def source_parts(source: str | Path, config: DeepseekConfig, *, check_finite: bool = True, seed: int = 0):
    """``(part, {key: fp32 tensor})`` in model order (embed, layers, head): read from a checkpoint
    directory, or a preset's random weights drawn part by part (equal to ``dsmoe.load(preset)``)."""
    if is_preset(source):
        if any(CORRECTION_BIAS in k for p in part_names(config) for k in part_shapes(config, p)):
            raise DsmoeError("a preset with routing biases (noaux_tc) draws them after every weight, so it cannot be "
                             "streamed: write it with dsmoe init DIR first and export DIR")
        for part, sd in random_parts(config, seed):
            yield part, {k: v.to(torch.float32) for k, v in sd.items()}
        return
    check_source(source, config, check_finite=check_finite)
    for part in part_names(config):
        yield part, read_part(source, config, part, check_finite=check_finite)


def check_source(source: str | Path, config: DeepseekConfig, *, check_finite: bool = True) -> None:
    """The loader's checkpoint contract (:func:`dsmoe.checkpoint.check_checkpoint`: keys, shards,
    shapes, layers; a tied head equal to the embedding) for a streamed export, before any weight of
    a layer is read. Presets have no checkpoint to check."""
    if is_preset(source):
        return
    expected = {k: v for p in part_names(config) for k, v in part_shapes(config, p).items()}
    where = check_checkpoint(source, config, expected)
    if config.tie_word_embeddings and "lm_head.weight" in where:
        head = _read_keys(source, config, {"lm_head.weight": expected["model.embed_tokens.weight"]}, torch.float32,
                          check_finite=check_finite)["lm_head.weight"]
        embed = read_part(source, config, "embed", check_finite=check_finite)["model.embed_tokens.weight"]
        check_tied_head(config, embed, head)


class StreamedWeights:
    """``save(model, path)`` for :func:`dsmoe.export.export_module`: writes every part's lowered
    weights into ``model.onnx.data`` and points the graph's initializers at them."""

    def __init__(self, source: str | Path, config: DeepseekConfig, *, target: str, scheme: QuantScheme,
                 placeholders: set[str], check_finite: bool = True, progress=None):
        self.source, self.config, self.target, self.scheme = source, config, target, scheme
        self.placeholders, self.check_finite = placeholders, check_finite
        self.progress = progress or (lambda s: None)
        self.bytes_written = 0

    def parts(self):
        """The lowered parts in the order the weights come: each layer as it is read or drawn; the
        embeddings wait (fp32, one [V, H]) for the head, and the two go through one slice."""
        ends = {}
        for part, sd in source_parts(self.source, self.config, check_finite=self.check_finite):
            if part in ("embed", "head"):
                ends.update(sd)
                if part == "head":
                    yield "ends", lowered_part(self.config, "ends", ends, target=self.target, scheme=self.scheme)
                continue
            yield part, lowered_part(self.config, part, sd, target=self.target, scheme=self.scheme)

    def __call__(self, model: ir.Model, path: Path) -> None:
        inits = model.graph.initializers
        unknown = sorted(n for n in inits if n not in self.placeholders and n.startswith(ONNX_PREFIX))
        if unknown:
            raise DsmoeError(f"cannot stream this export: the ONNX exporter derived initializer {unknown[0]} from the "
                             "weights (it would hold placeholder values)")
        todo = {n for n in self.placeholders if n in inits and not n.endswith("inv_freq")}
        with open(path.parent / DATA_FILE, "wb") as f:
            for part, tensors in self.parts():
                self.progress(f"write {part} (RSS {rss_bytes() / 2**30:.1f} GiB)")
                for name, t in tensors.items():
                    if name not in inits:  # a stand-in the whole graph does not have (deduplicated)
                        continue
                    v = inits[name]
                    want = (v.const_value.dtype, tuple(v.const_value.shape))
                    arr = t.detach().contiguous().numpy()
                    got = int4_tensor(arr, name) if want[0] in (ir.DataType.INT4, ir.DataType.UINT4) else ir.Tensor(arr)
                    if (got.dtype, tuple(got.shape)) != want:
                        raise DsmoeError(f"streamed {name}: {got.dtype} {list(got.shape)}, the graph wants "
                                         f"{want[0]} {list(want[1])}")
                    f.write(b"\0" * (-f.tell() % ALIGN))
                    offset = f.tell()
                    data = got.tobytes()
                    f.write(data)
                    v.const_value = ir.ExternalTensor(DATA_FILE, offset, len(data), got.dtype, shape=got.shape,
                                                      name=name, base_dir=path.parent)
                    todo.discard(name)
                    del data, got, arr
                del tensors
            self.bytes_written = f.tell()
        if todo:
            raise DsmoeError(f"streaming left initializer {sorted(todo)[0]} unwritten (+{len(todo) - 1} more)")
        ir.save(model, str(path))


def rss_bytes() -> int:
    """This process's resident set now."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def file_bytes(d: Path) -> int:
    return sum(os.path.getsize(d / n) for n in os.listdir(d) if not n.startswith("."))


def _module(config: DeepseekConfig, part: str, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A part as a real fp32 module holding ``sd`` (its checkpoint keys)."""
    prefix, mod = part_module(config, part)
    mod.load_state_dict({(k[len(prefix):] if prefix else k.removeprefix("model.")): v for k, v in sd.items()},
                        strict=True, assign=True)
    return mod.float().eval().requires_grad_(False)


@torch.no_grad()
def streamed_checks(source, config: DeepseekConfig, scheme: QuantScheme, export_dir: Path, *, n: int = PROMPTS,
                    length: int = PROMPT_LEN, seed: int = 1234, check_finite: bool = True,
                    progress=None) -> tuple[dict, dict]:
    """Both accuracy checks of a streamed export, ``(end to end vs the quantized reference,
    quality)``: ONNX Runtime runs the seeded prompts first (then lets go of its session), then the
    unquantized model and the quantized reference run them one part at a time (prefill; the logits
    and every present cache are compared — the decode step is the same graph, checked on small
    models)."""
    say = progress or (lambda s: None)
    args = prompts(config, n, length, seed)
    ids, mask, pos, _ = args
    say("verify: ONNX Runtime")
    got, present = OrtDecoder(export_dir)(*args)
    cos, sin = DeepseekRotaryEmbedding(config)(pos, torch.float32)
    amask = causal_mask(*ids.shape, 0, mask, ids.device)
    tol, worst = VERIFY_RTOL[torch.float32], 0.0
    fp_ids, q_ids = {}, {}
    for part, sd in source_parts(source, config, check_finite=check_finite):
        say(f"verify: {part}")
        mod = _module(config, part, sd)
        i = layer_of(part)
        if part == "embed":
            embed = mod
            h_fp = embed(ids)
            h_q = h_fp.clone()
        elif i is not None:
            qmod = quantized_reference(mod, scheme, config)
            r_fp, r_q = Routes(mod, [i]), Routes(qmod, [i])
            h_fp, _ = mod(h_fp, cos, sin, amask, None)
            h_q, (k, v) = qmod(h_q, cos, sin, amask, None)
            fp_ids.update(r_fp.close())
            q_ids.update(r_q.close())
            for ref, out in ((k, present[i][0]), (v, present[i][1])):
                worst = max(worst, float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12)))
        else:
            lm_head = mod.lm_head if hasattr(mod, "lm_head") else _tied_head(embed)
            q_lm = quantized_reference(torch.nn.Sequential(lm_head), scheme, config)[0]
            want = lm_head(mod.norm(h_fp))
            ref = q_lm(mod.norm(h_q))
        del mod
    abs_err = float((ref - got).abs().max())
    worst = max(worst, abs_err / float(ref.abs().max().clamp_min(1e-12)))
    passed = bool(torch.isfinite(got).all()) and worst <= tol
    end_to_end = {"passed": passed, "tolerance": tol, "rel_err": worst, "max_abs_err": abs_err,
                  "summary": f"max abs error {abs_err:.3g}, relative {worst:.3g} ({'<=' if passed else '>'} {tol:g}; "
                             "prefill logits and caches, streamed)"}
    quality = {"prompts": n, "prompt_len": ids.shape[1], "seed": seed, **compare_logits(want, got),
               **routing_drift(fp_ids, q_ids)}
    return end_to_end, quality


def _tied_head(embed: torch.nn.Embedding) -> torch.nn.Linear:
    lin = torch.nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False, device="meta")
    lin.weight = embed.weight
    return lin
