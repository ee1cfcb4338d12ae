"""Run an exported directory in ONNX Runtime: a decoder step with the KV cache (the step function
:func:`dsmoe.app.generate.greedy_generate` drives), and the polygraphy command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from dsmoe import load_config
from dsmoe.errors import DsmoeError
from dsmoe.export.onnx_writer import CONFIG_FILE, DATA_FILE, MODEL_FILE, REPORT_FILE, io_names

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
    returns torch tensors."""

    def __init__(self, export_dir: str | Path, threads: int | None = None, *, optimize: bool = True):
        d = self.dir = Path(export_dir)
        if not (d / MODEL_FILE).is_file():
            raise DsmoeError(f"{d} holds no {MODEL_FILE} (export it with: dsmoe-export SOURCE --out {d})")
        self.config = load_config(d)
        check_config_unchanged(d)
        if export_target(d) == "tensorrt":
            raise DsmoeError(f"{d} is a TensorRT export: its DsRoute/DsMoE plugin nodes run in TensorRT, not ONNX "
                             "Runtime (use --backend tensorrt, or export with --target ort)")
        self.sess = _open_session(d, threads=threads, optimize=optimize)
        self.input_names, self.output_names = io_names(self.config.num_hidden_layers)
        _check_io(d, self.sess, self.config, self.input_names, self.output_names)
        types = {i.name: i.type for i in self.sess.get_inputs()}
        self.dtype = _NP_TO_TORCH[types["past_key_values.0.key"]]

    def __call__(self, input_ids, attention_mask, position_ids, past):
        feed = {"input_ids": _np(input_ids, np.int64), "attention_mask": _np(attention_mask, np.int64),
                "position_ids": _np(position_ids, np.int64)}
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = _np(k, np_dtype)
            feed[f"past_key_values.{i}.value"] = _np(v, np_dtype)
        try:
            outs = [torch.from_numpy(o) for o in self.sess.run(self.output_names, feed)]
        except Exception as e:  # onnxruntime's errors are plain RuntimeError-like classes
            raise ExportRunError(f"ONNX Runtime failed running {self.dir / MODEL_FILE}: "
                                 f"{str(e).strip().splitlines()[0][:300]}") from None
        present = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(self.config.num_hidden_layers)]
        return outs[0], present


class ExportRunError(DsmoeError):
    """ONNX Runtime failed while running an export that loaded (exit code 1: a runtime failure)."""

    exit_code = 1


def export_target(d: str | Path) -> str:
    """The ``--target`` an export directory was written for (``ort`` when its report does not say)."""
    try:
        target = json.loads((Path(d) / REPORT_FILE).read_text()).get("target", "ort")
    except (OSError, ValueError, AttributeError):
        return "ort"
    return target if isinstance(target, str) else "ort"


def check_config_unchanged(d: Path) -> None:
    """The export's ``config.json`` is the one it was made with (its hash is in the report)."""
    try:
        want = json.loads((d / REPORT_FILE).read_text()).get("config_sha256")
    except (OSError, ValueError, AttributeError):
        return  # no (readable) report: the I/O checks below still run
    if want and hashlib.sha256((d / CONFIG_FILE).read_bytes()).hexdigest() != want:
        raise DsmoeError(f"{d / CONFIG_FILE} was changed after the export: it no longer matches the model "
                         f"({REPORT_FILE} records its hash); restore it or export again")


def _open_session(d: Path, **kw):
    """The session, or one line saying which file is damaged."""
    model = d / MODEL_FILE
    if model.stat().st_size == 0:
        raise DsmoeError(f"{model} is empty (a damaged export: export it again)")
    try:
        return session(model, **kw)
    except Exception as e:  # onnxruntime raises its own exception classes for unreadable models
        text = str(e)
        if DATA_FILE in text or "external" in text.lower():
            raise DsmoeError(f"{d / DATA_FILE} is missing or damaged ({MODEL_FILE} keeps its weights there): "
                             "export it again") from None
        raise DsmoeError(f"{model} is damaged or not an ONNX model ({text.strip().splitlines()[0][:160]})") from None


def _check_io(d: Path, sess, config, inputs: list[str], outputs: list[str]) -> None:
    """The graph's inputs and outputs agree with ``config.json`` (layers, KV heads, head size, vocabulary)."""
    got_in = {i.name: i.shape for i in sess.get_inputs()}
    got_out = {o.name: o.shape for o in sess.get_outputs()}
    if set(got_in) != set(inputs) or not set(outputs) <= set(got_out):
        n = sum(1 for k in got_in if k.startswith("past_key_values.")) // 2
        raise DsmoeError(f"{d / MODEL_FILE} and {CONFIG_FILE} disagree: the graph has {n} layers' cache inputs, "
                         f"the config says num_hidden_layers {config.num_hidden_layers}")
    want = {"KV heads (num_key_value_heads)": (got_in["past_key_values.0.key"][1], config.num_key_value_heads),
            "head size (hidden_size / num_attention_heads)": (got_in["past_key_values.0.key"][3], config.head_dim),
            "vocabulary (vocab_size)": (got_out["logits"][-1], config.vocab_size)}
    for what, (graph, cfg) in want.items():
        if isinstance(graph, int) and graph != cfg:
            raise DsmoeError(f"{d / MODEL_FILE} and {CONFIG_FILE} disagree on the {what}: graph {graph}, config {cfg}")


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
