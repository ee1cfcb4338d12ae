"""The TensorRT plugins, once: names, versions, namespace, fields, I/O and kernel-argument bindings.

Everything both sides of the plugin boundary must agree on lives here, and both read it from here:
the Python exporter writes ONNX plugin nodes from :data:`PLUGINS` (op type = plugin name,
``plugin_version`` / ``plugin_namespace`` attributes, one attribute per field), and the C++ build
renders :func:`render_header` into ``dsmoe_plugin_spec.h``, which the plugins compile against
(their names, versions, field table with types, defaults and ranges, the kernels' integer codes
and limits). The kernel limits and codes themselves come from the launch-configuration modules
(``route/config.py``, ``moe/config.py``), so no number is written twice.

Shape letters: T tokens, H hidden, E experts, K per token, I expert width, G groups.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from dsmoe.plugins import aot
from dsmoe.plugins._triton import Buffer
from dsmoe.plugins.moe import config as moe_cfg
from dsmoe.plugins.route import config as route_cfg

NAMESPACE = "dsmoe"            # the plugin namespace (creators, plugins, ONNX attribute plugin_namespace)
ONNX_DOMAIN = "trt.plugins"    # the plugin nodes' ONNX domain (TensorRT's parser dispatches on the op type)
LIBRARY = "libdsmoe_trt_plugins.so"
HARNESS = "libdsmoe_trt_harness.so"
ALIGN_BYTES = aot.ALIGN        # pointers, and H and I as element counts, divisible by 16 (the AOT build's assumption)
WORKSPACE_ALIGN = 256          # each workspace buffer starts on a 256-byte boundary
KINDS = ("int", "float", "string")


@dataclass(frozen=True)
class Field:
    """A plugin field = an ONNX node attribute of the same name (INT → kINT32, FLOAT → kFLOAT32,
    STRING → kCHAR). ``default`` None: required (a node without it is refused)."""

    name: str
    kind: str
    default: int | float | str | None
    choices: tuple = ()
    lo: int | None = None
    hi: int | None = None
    doc: str = ""


@dataclass(frozen=True)
class PluginSpec:
    """One plugin: what TensorRT sees (name, version, fields, I/O) and how the plugin binds the
    Triton kernels' arguments (``tensors``: pointer argument → ``in:N`` / ``out:N`` / ``ws:NAME``,
    ``in:N|ws:NAME`` when input N is optional; ``scalars``: the integer/float arguments in the
    order of the plugin's scalar slots; ``extra_buffers``: workspace beyond the launch config's)."""

    op: str
    name: str
    version: str
    fused_op: str
    fields: tuple[Field, ...]
    inputs: tuple[str, ...]
    optional_inputs: int
    outputs: tuple[str, ...]
    tensors: dict[str, str] = field(default_factory=dict)
    scalars: tuple[tuple[str, str], ...] = ()
    extra_buffers: tuple[Buffer, ...] = ()

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def node_attributes(self, values: dict) -> dict:
        """The ONNX attributes of a plugin node with these field values (every field, defaults
        filled in): ``plugin_version``, ``plugin_namespace`` and one attribute per field."""
        unknown = set(values) - {f.name for f in self.fields}
        if unknown:
            raise ValueError(f"{self.name}: unknown fields {sorted(unknown)}")
        attrs: dict = {"plugin_version": self.version, "plugin_namespace": NAMESPACE}
        for f in self.fields:
            v = values.get(f.name, f.default)
            if v is None:
                raise ValueError(f"{self.name}: field {f.name} is required")
            attrs[f.name] = {"int": int, "float": float, "string": str}[f.kind](v)
        return attrs


def _codes(table: dict[str, int]) -> tuple[str, ...]:
    """The choices of an enum field in code order (the C++ code of a choice is its index)."""
    names = tuple(sorted(table, key=table.__getitem__))
    assert [table[n] for n in names] == list(range(len(names))), table
    return names


ROUTE = PluginSpec(
    op="route", name="DsRoute", version="1", fused_op="dsmoe::route",
    fields=(
        Field("scoring", "string", "softmax", _codes(route_cfg.SCORINGS), doc="score function"),
        Field("topk_method", "string", "greedy", _codes(route_cfg.TOPK_METHODS), doc="expert selection"),
        Field("top_k", "int", None, lo=1, hi=route_cfg.MAX_K, doc="experts per token (K)"),
        Field("n_group", "int", 1, lo=1, doc="expert groups (G); greedy ignores it"),
        Field("topk_group", "int", 1, lo=1, doc="groups kept"),
        Field("norm_topk_prob", "int", 0, (0, 1), doc="renormalize the K weights"),
        Field("scaling", "float", 1.0, doc="routed_scaling_factor (finite)"),
        Field("scale_when", "string", "unnormalized", route_cfg.SCALE_WHEN, doc="when scaling applies"),
    ),
    inputs=("x", "w_gate", "bias"), optional_inputs=1, outputs=("weights", "ids"),
    tensors={"x": "in:0", "w": "in:1", "bias": "in:2|ws:bias", "logits": "ws:logits", "weights": "out:0",
             "ids": "out:1"},
    scalars=(("T", "i32"), ("H", "i32"), ("E", "i32"), ("K", "i32"), ("n_group", "i32"), ("topk_group", "i32"),
             ("scoring", "i32"), ("method", "i32"), ("normalize", "i32"), ("scale", "i32"), ("scaling", "fp32")),
    extra_buffers=(Buffer("bias", "fp32", "E", zeroed=True),),  # zeros, read when the node has no bias input
)

MOE = PluginSpec(
    op="moe", name="DsMoE", version="1", fused_op="dsmoe::moe",
    fields=(Field("activation", "string", "silu", ("silu",), doc="gate activation (SwiGLU)"),),
    inputs=("x", "weights", "ids", "w13", "w2"), optional_inputs=0, outputs=("y",),
    tensors={"x": "in:0", "weights": "in:1", "ids": "in:2", "w13": "in:3", "w2": "in:4", "y": "out:0",
             **{b: f"ws:{b}" for b in ("counts", "rank", "start", "block_expert", "sorted_pair", "act", "out")}},
    scalars=(("T", "i32"), ("H", "i32"), ("E", "i32"), ("K", "i32"), ("I", "i32"), ("P", "i32"), ("MB", "i32")),
)

PLUGINS: dict[str, PluginSpec] = {"route": ROUTE, "moe": MOE}

# The kernels' limits the plugins check at creation and configuration (from the config modules).
LIMITS = {"ROUTE_MAX_E": route_cfg.MAX_E, "ROUTE_MAX_K": route_cfg.MAX_K, "ROUTE_MAX_G": route_cfg.MAX_G,
          "MOE_MAX_E": moe_cfg.MAX_E, "ALIGN": ALIGN_BYTES, "WORKSPACE_ALIGN": WORKSPACE_ALIGN}


def describe() -> dict:
    """The plugins as JSON-able data (written beside the library as ``plugins.json``)."""
    return {"namespace": NAMESPACE, "onnx_domain": ONNX_DOMAIN, "library": LIBRARY, "limits": LIMITS,
            "plugins": {op: {"name": p.name, "version": p.version, "fused_op": p.fused_op,
                             "inputs": list(p.inputs), "optional_inputs": p.optional_inputs,
                             "outputs": list(p.outputs), "fields": [asdict(f) for f in p.fields]}
                        for op, p in PLUGINS.items()}}


# ---- the C++ header ------------------------------------------------------------------------------

def _cstr(s: str) -> str:
    return json.dumps(s)  # a JSON string of ASCII text is a valid C string literal


def render_header() -> str:
    """``dsmoe_plugin_spec.h``: the names, versions, fields and limits above, for the C++ build."""
    out = ["// Generated by dsmoe.plugins.trt.spec.render_header(): do not edit.", "#pragma once",
           "#include <cstdint>", '#include "dsPluginTypes.h"', "", "namespace dsmoe", "{",
           f"constexpr char const* kNamespace = {_cstr(NAMESPACE)};"]
    out += [f"constexpr int64_t k{k.title().replace('_', '')} = {v};" for k, v in LIMITS.items()]
    for p in PLUGINS.values():
        tag = p.op.title()
        out += ["", f"constexpr char const* k{tag}Name = {_cstr(p.name)};",
                f"constexpr char const* k{tag}Version = {_cstr(p.version)};",
                f"constexpr int32_t k{tag}NbInputs = {len(p.inputs)};",
                f"constexpr int32_t k{tag}OptionalInputs = {p.optional_inputs};",
                f"constexpr int32_t k{tag}NbOutputs = {len(p.outputs)};"]
        rows = []
        for f in p.fields:
            assert f.kind in KINDS, f
            if f.choices:
                vals = ", ".join(_cstr(str(c)) for c in f.choices)
                out.append(f"inline char const* const k{tag}Choices_{f.name}[] = {{{vals}}};")
            req = "true" if f.default is None else "false"
            d_int = int(f.default) if f.kind == "int" and f.default is not None else 0
            d_flt = float(f.default) if f.kind == "float" and f.default is not None else 0.0
            d_str = _cstr(f.default) if f.kind == "string" and f.default is not None else "nullptr"
            lo = "INT64_MIN" if f.lo is None else str(f.lo)
            hi = "INT64_MAX" if f.hi is None else str(f.hi)
            kind = {"int": "FieldKind::kInt", "float": "FieldKind::kFloat", "string": "FieldKind::kString"}[f.kind]
            choices = (f"k{tag}Choices_{f.name}, {len(f.choices)}" if f.choices and f.kind == "string"
                       else "nullptr, 0")
            if f.choices and f.kind == "int":  # an int enum is a range
                lo, hi = str(min(f.choices)), str(max(f.choices))
            rows.append(f"    {{{_cstr(f.name)}, {kind}, {req}, {d_int}, {d_flt!r}F, {d_str}, {lo}, {hi}, {choices}}},")
        out += [f"inline FieldSpec const k{tag}Fields[] = {{", *rows, "};",
                f"constexpr int32_t k{tag}NbFields = {len(p.fields)};"]
        out += [f"enum {tag}Field : int32_t {{"] + [f"    k{tag}F_{f.name} = {i}," for i, f in enumerate(p.fields)]
        out += ["};", f"enum {tag}Scalar : int32_t {{"]
        out += [f"    k{tag}S_{n} = {i}," for i, (n, _) in enumerate(p.scalars)] + [f"    k{tag}NbScalars = {len(p.scalars)}", "};"]
    out += ["} // namespace dsmoe", ""]
    return "\n".join(out)
