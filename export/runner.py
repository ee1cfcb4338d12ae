"""Run an exported directory in ONNX Runtime: a decoder step with the KV cache (the step function
:func:`dsmoe.app.generate.greedy_generate` drives), and the polygraphy command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from dsmoe import load_config
from dsmoe.cache import cache_layout
from dsmoe.errors import DsmoeError
from dsmoe.export.onnx_writer import MODEL_FILE, io_names

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
    -> (logits, present)`` with ``past``/``present`` one tuple per layer in the model's cache
    layout (``(key, value)`` or ``(latent,)``, :mod:`dsmoe.cache`) — the same signature as the
    eager model and the fused graph. Takes torch tensors or numpy arrays and returns torch tensors."""

    def __init__(self, export_dir: str | Path, threads: int | None = None, *, optimize: bool = True):
        d = Path(export_dir)
        if not (d / MODEL_FILE).is_file():
            raise DsmoeError(f"{d} holds no {MODEL_FILE} (export it with: dsmoe-export SOURCE --out {d})")
        self.config = load_config(d)
        self.sess = session(d / MODEL_FILE, threads=threads, optimize=optimize)
        self.layout = cache_layout(self.config)
        self.input_names, self.output_names = io_names(self.layout)
        types = {i.name: i.type for i in self.sess.get_inputs()}
        self.dtype = _NP_TO_TORCH[types[self.layout.input_names()[0]]]

    def __call__(self, input_ids, attention_mask, position_ids, past):
        feed = {"input_ids": _np(input_ids, np.int64), "attention_mask": _np(attention_mask, np.int64),
                "position_ids": _np(position_ids, np.int64)}
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        flat = [t for layer in past for t in layer]
        if len(flat) != len(self.layout.input_names()):
            raise DsmoeError(f"the cache has {len(flat)} tensors; this export takes {len(self.layout.input_names())} "
                             f"({', '.join(self.layout.names)} per layer)")
        for name, t in zip(self.layout.input_names(), flat):
            feed[name] = _np(t, np_dtype)
        outs = [torch.from_numpy(o) for o in self.sess.run(self.output_names, feed)]
        return outs[0], self.layout.unflatten(outs[1:])


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
    layout = cache_layout(c)
    shapes = [f"input_ids:[{batch},{seq}]", f"attention_mask:[{batch},{past + seq}]", f"position_ids:[{batch},{seq}]"]
    dims = [",".join(map(str, s)) for s in layout.shapes(batch, past)] * c.num_hidden_layers
    shapes += [f"{name}:[{d}]" for name, d in zip(layout.input_names(), dims)]
    return ["polygraphy", "run", str(d / MODEL_FILE), "--onnxrt", "--input-shapes", *shapes,
            "--val-range", f"input_ids:[0,{c.vocab_size - 1}]", "attention_mask:[1,1]", f"position_ids:[0,{seq - 1}]"]
