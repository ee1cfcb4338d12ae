"""Run an exported directory in ONNX Runtime: a decoder step with the KV cache (the step function
:func:`dsmoe.app.generate.greedy_generate` drives), and the polygraphy command line.

An export made with ``--router-stats`` also returns the routers' choices: ``OrtDecoder(d,
router_stats=True)`` steps return ``(logits, present, router)`` with ``router`` ``{layer:
{field: tensor}}`` read from the ``router.{layer}.{field}`` outputs (the fused graph's shape).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from dsmoe import load_config
from dsmoe.errors import DsmoeError
from dsmoe.export.onnx_writer import MODEL_FILE, io_names
from dsmoe.passes.expose_router import parse_router_output_name

_NP_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


def session(path: str | Path, *, threads: int | None = None, optimize: bool = True,
            providers: list[str] | None = None):
    """An ``InferenceSession`` (CPU unless ``providers``); ``optimize=False`` turns ORT's graph
    rewrites off (numerics tests)."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


class OrtDecoder:
    """One decoder step of an exported model: ``(input_ids, attention_mask, position_ids, past)
    -> (logits, present)`` with ``past``/``present`` lists of ``(key, value)`` — the same
    signature as the eager model and the fused graph. Takes torch tensors or numpy arrays and
    returns torch tensors. ``router_stats=True`` (an export with router outputs) adds a third
    value, ``router`` (see the module docstring)."""

    def __init__(self, export_dir: str | Path, threads: int | None = None, *, optimize: bool = True,
                 router_stats: bool = False):
        d = Path(export_dir)
        if not (d / MODEL_FILE).is_file():
            raise DsmoeError(f"{d} holds no {MODEL_FILE} (export it with: dsmoe-export SOURCE --out {d})")
        self.config = load_config(d)
        self.sess = session(d / MODEL_FILE, threads=threads, optimize=optimize)
        self.input_names, self.output_names = io_names(self.config.num_hidden_layers)
        types = {i.name: i.type for i in self.sess.get_inputs()}
        self.dtype = _NP_TO_TORCH[types["past_key_values.0.key"]]
        self.router_outputs = {o.name: parsed for o in self.sess.get_outputs()
                               if (parsed := parse_router_output_name(o.name)) is not None}
        self.router_stats = router_stats
        if router_stats and not self.router_outputs:
            raise DsmoeError(f"{d / MODEL_FILE} has no router outputs (export it with: dsmoe-export SOURCE "
                             f"--out {d} --router-stats)")
        self._fetch = self.output_names + (list(self.router_outputs) if router_stats else [])

    def __call__(self, input_ids, attention_mask, position_ids, past):
        feed = {"input_ids": _np(input_ids, np.int64), "attention_mask": _np(attention_mask, np.int64),
                "position_ids": _np(position_ids, np.int64)}
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = _np(k, np_dtype)
            feed[f"past_key_values.{i}.value"] = _np(v, np_dtype)
        outs = [torch.from_numpy(o) for o in self.sess.run(self._fetch, feed)]
        L = self.config.num_hidden_layers
        present = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(L)]
        if not self.router_stats:
            return outs[0], present
        router: dict[int, dict[str, torch.Tensor]] = {}
        for (layer, field), t in zip(self.router_outputs.values(), outs[1 + 2 * L:]):
            router.setdefault(layer, {})[field] = t
        return outs[0], present, router


def _np(t, dtype) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a.astype(dtype, copy=False))


def polygraphy_command(export_dir: str | Path, *, batch: int = 1, seq: int = 4, past: int = 0) -> list[str]:
    """The ``polygraphy run MODEL --onnxrt`` command line for an exported directory.

    The decoder's axes are dynamic and tied together (``attention_mask`` is past + sequence long),
    so polygraphy needs explicit shapes; ``input_ids`` values must lie in the vocabulary.
    """
    d = Path(export_dir)
    c = load_config(d)
    kv = f"[{batch},{c.num_key_value_heads},{past},{c.head_dim}]"
    shapes = [f"input_ids:[{batch},{seq}]", f"attention_mask:[{batch},{past + seq}]", f"position_ids:[{batch},{seq}]"]
    for i in range(c.num_hidden_layers):
        shapes += [f"past_key_values.{i}.key:{kv}", f"past_key_values.{i}.value:{kv}"]
    return ["polygraphy", "run", str(d / MODEL_FILE), "--onnxrt", "--input-shapes", *shapes,
            "--val-range", f"input_ids:[0,{c.vocab_size - 1}]", "attention_mask:[1,1]", f"position_ids:[0,{seq - 1}]"]
