"""Run an exported directory in ONNX Runtime: a decoder step with the KV cache (the step function
:func:`dsmoe.app.generate.greedy_generate` drives) for both cache modes of an export, the session
options (one home, also written into ``genai_config.json``), and the polygraphy command line.

An export made with ``--router-stats`` also returns the routers' choices: ``OrtDecoder(d,
router_stats=True)`` steps return ``(logits, present, router)`` with ``router`` ``{layer:
{field: tensor}}`` read from the ``router.{layer}.{field}`` outputs (the fused graph's shape).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from dsmoe.export.files import verify_export_files
from dsmoe.export.kv_inplace import KvInplaceUnsupported, attention_gqa_inplace
from dsmoe.export.onnx_writer import CONFIG_FILE, DATA_FILE, MODEL_FILE, REPORT_FILE, io_names
from dsmoe.export.static_cache import PAST_AXIS
from dsmoe.passes.expose_router import parse_router_output_name

from dsmoe import load_config
from dsmoe.cache import cache_layout
from dsmoe.errors import DsmoeError
from dsmoe.outputs import Interrupted

_NP_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}

# Session options, chosen by measurement on this project's machines (2 cores, shared by several
# engineers; /proc/cpuinfo: "Intel(R) Xeon(R) Processor", AVX-512/AMX). `small` preset, fp32,
# greedy decode of 32 tokens after a 128-token prompt, ms per decoded token, medians of 3-4
# interleaved runs; "+busy": one more process spinning on a core during the run:
#
#   load average                        ~1.5    ~2    ~2.5 +busy    ~4    ~7 +busy
#   2 threads, spinning (ORT default)    3.8   15.1      8.7       40.7     72.4
#   2 threads, no spinning               5.0    6.0      6.0       20.6     44.0
#   1 thread                             5.8    6.5      5.9       16.6     58.3
#   GenAI 0.18 as is (1 thread here)     5.6    6.2      6.0       15.2     51.5
#
# Spinning threads win only on an idle machine; once other processes want the cores, a spinning
# worker and the waiting main thread take turns on them and a decode step takes 2-3× longer. Two
# threads without spinning are never far from one and faster when the machine is quiet or very
# busy (prefill of 128 tokens, quiet: 43-53 ms vs 66-70 ms), so: intra-op threads = ORT's
# default (the cores), spinning off. IO binding of the KV cache did not pay in the dynamic mode at
# these sizes (5.1 vs 5.0 ms, quiet); the static mode binds it because that is the mode (one
# buffer as past and present).
#
# Quiet, the gain is real but small: AMD EPYC VM (Zen 4, 2 cores, load ~0), the 4-layer
# DeepSeekMoE-16B cut in int4, keys/values in place, 3 alternating rounds: decode @128 11.8-12.8 vs
# 13.0-13.4 ms, @2048 15.9-16.2 vs 17.1-17.4 ms, prefill 512 1080-1219 vs 1123-1294 ms. So
# :class:`OrtDecoder` decides when it opens the session (``spinning="auto"``): spin when the
# machine is idle enough to give its threads their cores (:func:`cores_free`), sleep otherwise.
# GenAI's config (one file for every machine) keeps SPINNING.
SPINNING = False
SESSION_CONFIG = {"session.intra_op.allow_spinning": "1" if SPINNING else "0"}


def cores_free(threads: int, window_s: float = 0.1) -> bool:
    """Whether the other processes leave ``threads`` cores free: the busy time of all cores in
    ``/proc/stat`` over ``window_s`` (this process sleeps through it), at most a quarter of a core
    beyond ``cores - threads``. False where ``/proc/stat`` cannot be read."""

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user … steal (guest time is in user already)
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return False
    cores = os.cpu_count() or 1
    busy = cores * (1 - (i1 - i0) / max(t1 - t0, 1))
    return busy <= cores - threads + 0.25


def session(path: str | Path, *, threads: int | None = None, optimize: bool = True,
            providers: list[str] | None = None, spinning: bool = SPINNING, profile_prefix: str | None = None,
            last_logits: bool = False, kv_bnsh: bool = False, kv_inplace: int | None = None):
    """An ``InferenceSession`` (CPU unless ``providers``) with :data:`SESSION_CONFIG`;
    ``optimize=False`` turns ORT's graph rewrites off (numerics tests), ``spinning=True`` lets the
    intra-op threads spin (faster on an idle machine only), ``profile_prefix`` turns ONNX Runtime's
    per-node profiler on (``sess.end_profiling()`` writes it; :mod:`dsmoe.bench.ort_profile`),
    ``last_logits=True`` runs the graph rewritten by :func:`last_token_logits`, ``kv_bnsh=True`` the
    one rewritten by :func:`attention_kv_bnsh` (in memory; the weights are read from beside ``path``),
    ``kv_inplace=H`` (the KV heads) the one rewritten by that and
    :func:`dsmoe.export.kv_inplace.attention_gqa_inplace` (raises :class:`KvInplaceUnsupported`)."""
    so = ort.SessionOptions()
    if profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # ORT fuses a blocked DequantizeLinear + MatMul (a portable quantized export) into MatMulNBits,
    # by default at accuracy level 4 (int8 activations): level 1 keeps the standard ops' fp32
    # semantics, so a portable export computes what it says. (ort-target MatMulNBits nodes carry
    # their own accuracy_level attribute; this setting does not touch them.)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    so.log_severity_level = 3
    if last_logits or kv_bnsh or kv_inplace:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(path).parent))
        m = onnx.load(str(path), load_external_data=False)
        if last_logits:
            last_token_logits(m)
        if kv_bnsh or kv_inplace:
            attention_kv_bnsh(m)
        if kv_inplace:
            attention_gqa_inplace(m, kv_inplace)
        return ort.InferenceSession(m.SerializeToString(), so, providers=providers or ["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


LM_HEAD_OPS = ("MatMul", "MatMulNBits")   # rank-preserving: a [B, S, V] output has a [B, S, H] input


def last_token_logits(m: onnx.ModelProto) -> onnx.ModelProto:
    """The decoder graph computing ``logits`` for the last position only (``[B, 1, V]``): a
    ``Slice`` of the final hidden states before the lm_head. A prefill of S tokens then runs the
    lm_head (the 102400-row matmul, a third of a 4-layer 16B model's prefill FLOPs) once instead of
    S times; generation needs nothing more. ``m`` is changed in place and returned; a graph whose
    rank-3 ``logits`` do not come from a ``MatMul``/``MatMulNBits`` (through ``Cast``s) is refused."""
    prod = {o: n for n in m.graph.node for o in n.output}
    out = next((o for o in m.graph.output if o.name == "logits"), None)
    head = prod.get("logits")
    while head is not None and head.op_type == "Cast":
        head = prod.get(head.input[0])
    if out is None or head is None or head.op_type not in LM_HEAD_OPS or len(out.type.tensor_type.shape.dim) != 3:
        what = "no logits output" if out is None else f"logits from a {head.op_type if head else 'graph input'} node"
        raise DsmoeError(f"this export has {what}, not a [B, S, V] matmul: last-token logits cannot be cut out of it")
    x = head.input[0]
    consts = [onnx.helper.make_tensor(f"dsmoe_last.{k}", onnx.TensorProto.INT64, [1], [v])
              for k, v in (("starts", -1), ("ends", 2**62), ("axes", 1))]
    m.graph.initializer.extend(consts)
    cut = onnx.helper.make_node("Slice", [x, *(c.name for c in consts)], [f"{x}.dsmoe_last"], name="dsmoe_last_token")
    m.graph.node.insert(list(m.graph.node).index(head), cut)
    head.input[0] = cut.output[0]
    dim = out.type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = 1
    return m


def attention_kv_bnsh(m: onnx.ModelProto) -> int:
    """Rewrite ``MultiHeadAttention(q, Reshape(Transpose(K, [0,2,1,3])), Reshape(Transpose(V, …)))`` →
    ``MultiHeadAttention(q, K, V)``: the cache-shaped keys/values ``[B, heads, L, head_dim]`` (past and
    new, concatenated: ``present``) go to the op as they are — ONNX Runtime takes BNSH keys/values —
    instead of being transposed to ``[B, L, heads·head_dim]`` (a copy of the whole cache per layer
    per step) and transposed back inside the op (another). At a 2048-token context those copies
    were most of a decode step. Same numbers; returns how many nodes were rewritten (the
    orphaned Transpose/Reshape are dropped)."""
    prod = {o: n for n in m.graph.node for o in n.output}
    done = 0
    for node in m.graph.node:
        if node.op_type != "MultiHeadAttention" or len(node.input) < 3:
            continue
        srcs = []
        for i in (1, 2):
            r = prod.get(node.input[i])
            t = prod.get(r.input[0]) if r is not None and r.op_type == "Reshape" else None
            perm = next((list(onnx.helper.get_attribute_value(a)) for a in t.attribute if a.name == "perm"), None) \
                if t is not None and t.op_type == "Transpose" else None
            if perm != [0, 2, 1, 3]:
                break
            srcs.append(t.input[0])
        else:
            node.input[1], node.input[2] = srcs
            done += 1
    for _ in range(2):  # the Reshapes, then the Transposes, that nothing reads any more
        used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
        dead = [n for n in m.graph.node if n.op_type in ("Reshape", "Transpose") and not any(o in used for o in n.output)]
        for n in dead:
            m.graph.node.remove(n)
    return done


def can_cut_logits(path: Path) -> bool:
    try:
        last_token_logits(onnx.load(str(path), load_external_data=False))
        return True
    except DsmoeError:
        return False


class OrtDecoder:
    """One decoder step of an exported model: ``(input_ids, attention_mask, position_ids, past)
    -> (logits, present)`` with ``past``/``present`` one tuple per layer in the model's cache
    layout (``(key, value)`` or ``(latent,)``, :mod:`dsmoe.cache`) — the same signature as the
    eager model and the fused graph. Takes torch tensors or numpy arrays and returns torch
    tensors. ``router_stats=True`` (an export with router outputs) adds a third value,
    ``router`` (see the module docstring).

    Either cache mode of an export runs behind this signature (``kv_cache``, read from the
    model's past axis). A ``static`` export keeps its buffers here: numpy arrays of a capacity
    that grows by doubling, bound with IO binding as both the past inputs and the present outputs,
    so ONNX Runtime writes each step's keys/values into them in place. A call whose ``past`` is not
    the present this decoder returned last is copied in first; the returned present is a view of
    the buffers (valid until a call with another history overwrites them).

    ``logits="last"`` returns the logits of the last position only (``[B, 1, V]``, the graph cut by
    :func:`last_token_logits`): what generation needs, at a fraction of a long prefill's cost;
    ``"auto"``: last where the graph allows it, else all (``self.logits`` says which). ``kv_bnsh=True``
    feeds the attention the cache-shaped keys/values (:func:`attention_kv_bnsh`): same numbers,
    no per-step transposes of the whole cache. ``kv_inplace=True`` runs a dynamic-cache fp32 export
    with its keys/values written in place (:mod:`dsmoe.export.kv_inplace`: buffers as in the static
    mode, no per-step copy of the whole cache); ``"auto"``: where the export allows it (``self.kv_inplace``
    says). ``present_views`` is true when the returned present is a view of reused buffers.
    ``spinning="auto"`` lets the intra-op threads spin when :func:`cores_free` (``self.spinning``);
    ``profile_prefix`` turns ONNX Runtime's profiler on (``self.sess.end_profiling()``).
    """

    def __init__(self, export_dir: str | Path, threads: int | None = None, *, optimize: bool = True,
                 spinning: bool | str = "auto", router_stats: bool = False, logits: str = "all", kv_bnsh: bool = False,
                 kv_inplace: bool | str = False, profile_prefix: str | None = None):
        d = self.dir = Path(export_dir)
        if not (d / MODEL_FILE).is_file():
            raise DsmoeError(f"{d} holds no {MODEL_FILE} (export it with: dsmoe-export SOURCE --out {d})")
        check_config_unchanged(d)  # the files belong together, before any of them is read
        self.config = load_config(d)
        if export_target(d) == "tensorrt":
            raise DsmoeError(f"{d} is a TensorRT export: its DsRoute/DsMoE plugin nodes run in TensorRT, not ONNX "
                             "Runtime (use --backend tensorrt, or export with --target ort)")
        if logits not in ("all", "last", "auto"):
            raise DsmoeError(f"logits must be 'all', 'last' or 'auto', not {logits!r}")
        if logits == "auto":  # last where the graph allows it (a generation loop reads the last row either way)
            logits = "last" if can_cut_logits(d / MODEL_FILE) else "all"
        self.logits = logits
        if kv_inplace not in (True, False, "auto"):
            raise DsmoeError(f"kv_inplace must be True, False or 'auto', not {kv_inplace!r}")
        if spinning not in (True, False, "auto"):
            raise DsmoeError(f"spinning must be True, False or 'auto', not {spinning!r}")
        if spinning == "auto":  # spin only when the cores are ours (see SPINNING)
            spinning = cores_free(threads or os.cpu_count() or 1)
        self.spinning = spinning
        kw = dict(threads=threads, optimize=optimize, spinning=spinning, last_logits=logits == "last", kv_bnsh=kv_bnsh,
                  profile_prefix=profile_prefix)
        if kv_inplace is True and router_stats:
            raise DsmoeError(f"{d}: keys/values cannot be written in place: router statistics are read from the "
                             "copying path")
        self.kv_inplace = False
        if kv_inplace and not router_stats:  # the rewrite itself refuses the graphs it does not know
            try:
                self.sess = _open_session(d, kv_inplace=self.config.num_key_value_heads, **kw)
                self.kv_inplace = True
            except KvInplaceUnsupported as e:  # the graph's attention is not the pattern: copy
                if kv_inplace is True:
                    raise DsmoeError(f"{d}: keys/values cannot be written in place: {e}") from None
        if not self.kv_inplace:
            self.sess = _open_session(d, **kw)
        self.layout = cache_layout(self.config)
        self.input_names, self.output_names = io_names(self.layout)
        _check_io(d, self.sess, self.config, self.layout, self.input_names, self.output_names)
        inputs = {i.name: i for i in self.sess.get_inputs()}
        first = inputs[self.layout.input_names()[0]]
        self.dtype = _NP_TO_TORCH[first.type]
        self.np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        self.kv_cache = "static" if first.shape[2] == PAST_AXIS["static"] else "dynamic"
        self.present_views = self.kv_cache == "static" or self.kv_inplace
        self._bufs: list[np.ndarray] = []   # static mode: the cache's tensors in ONNX order, [B, heads, M, dim]
        self._views: list[torch.Tensor] = []
        self._fill = -1                      # slots of the present returned last (-1: none)
        self.router_outputs = {o.name: parsed for o in self.sess.get_outputs()
                               if (parsed := parse_router_output_name(o.name)) is not None}
        self.router_stats = router_stats
        if router_stats and not self.router_outputs:
            raise DsmoeError(f"{d / MODEL_FILE} has no router outputs (export it again with: {reexport_command(d)})")
        if router_stats and self.kv_cache == "static":
            raise DsmoeError(f"{d}: router statistics are read from dynamic-cache exports only "
                             "(export with --router-stats and --kv-cache dynamic)")
        self._fetch = self.output_names + (list(self.router_outputs) if router_stats else [])

    def __call__(self, input_ids, attention_mask, position_ids, past):
        feed = {"input_ids": _np(input_ids, np.int64), "attention_mask": _np(attention_mask, np.int64),
                "position_ids": _np(position_ids, np.int64)}
        flat = [t for layer in past for t in layer]
        if len(flat) != len(self.layout.input_names()):
            raise DsmoeError(f"the cache has {len(flat)} tensors; this export takes {len(self.layout.input_names())} "
                             f"({', '.join(self.layout.names)} per layer)")
        if self.present_views:
            return self._static_step(feed, past, flat)
        for name, t in zip(self.layout.input_names(), flat):
            feed[name] = _np(t, self.np_dtype)
        outs = [torch.from_numpy(o) for o in self._run(lambda: self.sess.run(self._fetch, feed))]
        n = len(flat)
        present = self.layout.unflatten(outs[1:1 + n])
        if not self.router_stats:
            return outs[0], present
        router: dict[int, dict[str, torch.Tensor]] = {}
        for (layer, field), t in zip(self.router_outputs.values(), outs[1 + n:]):
            router.setdefault(layer, {})[field] = t
        return outs[0], present, router

    def _static_step(self, feed: dict, past, flat: list):
        B, S = feed["input_ids"].shape
        P = past[0][0].shape[2] if past else 0
        if feed["attention_mask"].shape[1] != P + S:
            raise DsmoeError(f"attention_mask covers {feed['attention_mask'].shape[1]} slots, past + new tokens are {P + S}")
        if self.kv_inplace and B > 1 and S > 1 and P > 0:
            return self._token_by_token(feed, past)  # GroupQueryAttention takes several new tokens of one row only
        own = self._is_own(past, P)
        if not self._bufs or self._bufs[0].shape[0] != B or self._bufs[0].shape[2] < P + S:
            self._allocate(B, P + S, past if own else None)
        if not own:
            for buf, t in zip(self._bufs, flat):
                buf[:, :, :P] = _np(t, self.np_dtype)
        for name, a in feed.items():
            self._binding.bind_cpu_input(name, a)
        self._binding.bind_output("logits", "cpu")
        self._run(lambda: self.sess.run_with_iobinding(self._binding))
        logits = torch.from_numpy(self._binding.get_outputs()[0].numpy())
        self._fill = P + S
        n = P + S
        return logits, self.layout.unflatten([v[:, :, :n] for v in self._views])

    def _token_by_token(self, feed: dict, past):
        """``S`` new tokens of a batch with a past, one at a time (what a ``GroupQueryAttention``
        step can take): the same numbers, the logits of every position concatenated."""
        S, P = feed["input_ids"].shape[1], past[0][0].shape[2]
        rows, present = [], past
        for s in range(S):
            logits, present = self._static_step({"input_ids": feed["input_ids"][:, s:s + 1],
                                                 "attention_mask": np.ascontiguousarray(feed["attention_mask"][:, :P + s + 1]),
                                                 "position_ids": feed["position_ids"][:, s:s + 1]}, present,
                                                [t for layer in present for t in layer])
            rows.append(logits)
        return (rows[-1] if self.logits == "last" else torch.cat(rows, 1)), present

    def _run(self, fn):
        try:
            return fn()
        except Interrupted:  # a signal during a run is the signal, not a failure of the model
            raise
        except Exception as e:  # onnxruntime's errors are plain RuntimeError-like classes
            raise ExportRunError(f"ONNX Runtime failed running {self.dir / MODEL_FILE}: "
                                 f"{str(e).strip().splitlines()[0][:300]}") from None

    def _is_own(self, past, P: int) -> bool:
        return (bool(self._bufs) and self._fill == P and P > 0 and isinstance(past[0][0], torch.Tensor)
                and all(t.data_ptr() == v.data_ptr() for t, v in zip([t for layer in past for t in layer], self._views)))

    def _allocate(self, B: int, need: int, keep) -> None:
        """Buffers of at least ``need`` slots (doubling, multiples of 64); ``keep``: the present this
        decoder returned last, carried over."""
        old = self._bufs[0].shape[2] if self._bufs and self._bufs[0].shape[0] == B else 0
        M = max(need, 2 * old, 64)
        M = -(-M // 64) * 64
        bufs = [np.zeros(shape, self.np_dtype) for _ in range(self.layout.layers) for shape in self.layout.shapes(B, M)]
        if keep is not None:
            for buf, t in zip(bufs, [t for layer in keep for t in layer]):
                buf[:, :, :t.shape[2]] = t.numpy()
        self._bufs, self._views = bufs, [torch.from_numpy(b) for b in bufs]
        self._values = [ort.OrtValue.ortvalue_from_numpy(b) for b in bufs]
        self._binding = self.sess.io_binding()
        self._binding.bind_output("logits", "cpu")  # first: get_outputs()[0] is the logits
        for name, value in zip(self.input_names[3:], self._values):
            self._binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.output_names[1:], self._values):
            self._binding.bind_ortvalue_output(name, value)


def reexport_command(d: Path) -> str:
    """The command that replaces export ``d`` by one with router outputs (its source from the report;
    ``--force`` because ``d`` exists and dsmoe wrote it)."""
    try:
        report = json.loads((d / "export_report.json").read_text())
    except (OSError, ValueError):
        report = {}
    source = report.get("source") or "SOURCE"
    extra = [f"--{k.replace('_', '-')} {report[k]}" for k in ("target", "dtype") if report.get(k) not in (None, "ort", "fp32")]
    quant = (report.get("quant") or {}).get("scheme", {}).get("type")
    if quant:
        extra.append(f"--quant {quant}")
    return shlex.join(["dsmoe-export", source, "--out", str(d), *" ".join(extra).split(), "--router-stats", "--force"])


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
    """The export's files are the ones it was made with (:func:`dsmoe.export.files.verify_export_files`;
    for exports older than the digests: ``config.json``'s hash in the report)."""
    verify_export_files(d)
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
    except (Interrupted, KvInplaceUnsupported):
        raise
    except Exception as e:  # onnxruntime raises its own exception classes for unreadable models
        text = str(e)
        if DATA_FILE in text or "external" in text.lower():
            raise DsmoeError(f"{d / DATA_FILE} is missing or damaged ({MODEL_FILE} keeps its weights there): "
                             "export it again") from None
        raise DsmoeError(f"{model} is damaged or not an ONNX model ({text.strip().splitlines()[0][:160]})") from None


# what a cache entry's heads and width are, in the words of the config
_ENTRY_LABELS = {"key": ("KV heads (num_key_value_heads)", "head size (hidden_size / num_attention_heads)"),
                 "latent": ("latent heads (one per layer)", "latent width (kv_lora_rank + qk_rope_head_dim)")}


def _check_io(d: Path, sess, config, layout, inputs: list[str], outputs: list[str]) -> None:
    """The graph's inputs and outputs agree with ``config.json`` (layers, the cache entries'
    heads and widths, vocabulary)."""
    got_in = {i.name: i.shape for i in sess.get_inputs()}
    got_out = {o.name: o.shape for o in sess.get_outputs()}
    if set(got_in) != set(inputs) or not set(outputs) <= set(got_out):
        cache = [k for k in got_in if k.startswith("past_key_values.")]
        names = sorted({k.rsplit(".", 1)[1] for k in cache})
        if names != sorted(layout.names):
            raise DsmoeError(f"{d / MODEL_FILE} and {CONFIG_FILE} disagree: the graph caches {', '.join(names)}, "
                             f"the config ({config.model_type}) {', '.join(layout.names)}")
        raise DsmoeError(f"{d / MODEL_FILE} and {CONFIG_FILE} disagree: the graph has {len(cache) // len(names)} layers' "
                         f"cache inputs, the config says num_hidden_layers {config.num_hidden_layers}")
    want = {"vocabulary (vocab_size)": (got_out["logits"][-1], config.vocab_size)}
    for name, heads, dim in layout.entries:
        if name in _ENTRY_LABELS:
            shape = got_in[f"past_key_values.0.{name}"]
            want[_ENTRY_LABELS[name][0]] = (shape[1], heads)
            want[_ENTRY_LABELS[name][1]] = (shape[3], dim)
    for what, (graph, cfg) in want.items():
        if isinstance(graph, int) and graph != cfg:
            raise DsmoeError(f"{d / MODEL_FILE} and {CONFIG_FILE} disagree on the {what}: graph {graph}, config {cfg}")


def _np(t, dtype) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a.astype(dtype, copy=False))


def polygraphy_command(export_dir: str | Path, *, batch: int = 1, seq: int = 4, past: int = 0) -> list[str]:
    """The ``polygraphy run MODEL --onnxrt`` command line for an exported directory.

    The decoder's axes are dynamic and tied together (``attention_mask`` is past + sequence long),
    so polygraphy needs explicit shapes; ``input_ids`` values must lie in the vocabulary. A
    static-cache export gets buffers of exactly past + sequence slots.
    """
    d = Path(export_dir)
    c = load_config(d)
    layout = cache_layout(c)
    graph = onnx.load(str(d / MODEL_FILE), load_external_data=False).graph
    first = layout.input_names()[0]
    past_axis = next(v for v in graph.input if v.name == first).type.tensor_type.shape.dim[2].dim_param
    slots = past + seq if past_axis == PAST_AXIS["static"] else past
    shapes = [f"input_ids:[{batch},{seq}]", f"attention_mask:[{batch},{past + seq}]", f"position_ids:[{batch},{seq}]"]
    dims = [",".join(map(str, s)) for s in layout.shapes(batch, slots)] * c.num_hidden_layers
    shapes += [f"{name}:[{d}]" for name, d in zip(layout.input_names(), dims)]
    return ["polygraphy", "run", str(d / MODEL_FILE), "--onnxrt", "--input-shapes", *shapes,
            "--val-range", f"input_ids:[0,{c.vocab_size - 1}]", "attention_mask:[1,1]", f"position_ids:[0,{seq - 1}]"]
