"""The AOT manifest as C++: ``dsmoe_kernels.cpp``, the kernel and launch-configuration table the
plugins read (the cubins embedded with ``.incbin``; every size formula, grid and selection rule
compiled to a C++ function).

The formulas are the manifest's, written by the launch-configuration functions that the PyTorch
launchers use (``route_config``/``moe_config``); :func:`cpp_expr` translates them through Python's
``ast`` and accepts only what they use (integers, the sizes T H E K I, + - * //, comparisons,
``and``/``or``/``not``, ``cdiv``/``min``/``max``), so a formula it cannot translate fails the build
instead of being approximated. Every kernel parameter is bound here to a plugin input, output,
workspace buffer or scalar slot (``spec.PluginSpec.tensors``/``scalars``); an unknown one fails the
build too.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from dsmoe.plugins.aot import SCRATCH_PARAMS, parse_arch
from dsmoe.plugins.trt.spec import PLUGINS

SIZE_NAMES = ("T", "H", "E", "K", "I")
_BIN = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "/"}
_CMP = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
_ELEM_BYTES = {"i32": 4, "fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE = {"fp32": "DType::kFP32", "bf16": "DType::kBF16", "fp16": "DType::kFP16"}
_OP = {"route": "Op::kRoute", "moe": "Op::kMoe"}


class CodegenError(ValueError):
    """The manifest holds something the C++ table cannot express (a formula, a parameter)."""


def cpp_expr(formula: str) -> str:
    """A size formula or selection rule as a C++ expression over ``s`` (a ``Sizes``)."""
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as e:
        raise CodegenError(f"formula {formula!r}: {e.msg}") from None
    return _emit(tree.body, formula)


def _emit(n: ast.AST, src: str) -> str:
    if isinstance(n, ast.Constant) and type(n.value) is int:
        return f"int64_t({n.value})"
    if isinstance(n, ast.Name) and n.id in SIZE_NAMES:
        return f"s.{n.id}"
    if isinstance(n, ast.BinOp) and type(n.op) in _BIN:
        return f"({_emit(n.left, src)} {_BIN[type(n.op)]} {_emit(n.right, src)})"
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
        return f"(!{_emit(n.operand, src)})"
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
        return f"(-{_emit(n.operand, src)})"
    if isinstance(n, ast.BoolOp):
        op = " && " if isinstance(n.op, ast.And) else " || "
        return "(" + op.join(_emit(v, src) for v in n.values) + ")"
    if isinstance(n, ast.Compare) and all(type(o) in _CMP for o in n.ops):
        terms = [n.left, *n.comparators]
        parts = [f"({_emit(a, src)} {_CMP[type(o)]} {_emit(b, src)})" for a, o, b in zip(terms, n.ops, terms[1:])]
        return "(" + " && ".join(parts) + ")"
    if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("cdiv", "min", "max")
            and len(n.args) == 2 and not n.keywords):
        a, b = (_emit(x, src) for x in n.args)
        return f"cdiv({a}, {b})" if n.func.id == "cdiv" else f"std::{n.func.id}<int64_t>({a}, {b})"
    raise CodegenError(f"formula {src!r}: cannot translate {ast.dump(n)[:80]}")


class _Functions:
    """C++ functions for formulas, one per distinct formula and kind."""

    def __init__(self):
        self.names: dict[tuple[str, str], str] = {}
        self.lines: list[str] = []

    def get(self, formula: str, kind: str = "size") -> str:
        key = (kind, formula)
        if key not in self.names:
            name = f"{'rule' if kind == 'rule' else 'size'}{len(self.names)}"
            ret = "bool" if kind == "rule" else "int64_t"
            self.lines.append(f"// {formula}\nstatic {ret} {name}(Sizes const& s)\n{{\n    (void) s;\n"
                              f"    return {cpp_expr(formula)};\n}}")
            self.names[key] = name
        return self.names[key]


def _arg(op: str, p: dict, buffers: list[str]) -> str:
    """The ``ArgSpec`` of one kernel parameter."""
    spec = PLUGINS[op]
    name, typ = p["name"], p["type"]
    if name in {s["name"] for s in SCRATCH_PARAMS}:
        return f'{{"{name}", ArgKind::kNull, 0, 0}}'
    scalars = dict(spec.scalars)
    if name in scalars:
        if scalars[name] != typ:
            raise CodegenError(f"{op}: kernel argument {name} is {typ}, the plugin's scalar slot is {scalars[name]}")
        kind = "kScalarI32" if typ == "i32" else "kScalarF32"
        return f'{{"{name}", ArgKind::{kind}, {[s for s, _ in spec.scalars].index(name)}, 0}}'
    if name not in spec.tensors or not typ.startswith("*"):
        raise CodegenError(f"{op}: kernel argument {name} ({typ}) is bound to nothing in plugins/trt/spec.py")
    where = spec.tensors[name]
    if "|" in where:
        primary, fallback = where.split("|")
        return (f'{{"{name}", ArgKind::kInputOrWorkspace, {int(primary.split(":")[1])}, '
                f'{buffers.index(fallback.split(":")[1])}}}')
    kind, idx = where.split(":")
    if kind == "ws":
        return f'{{"{name}", ArgKind::kWorkspace, {buffers.index(idx)}, 0}}'
    return f'{{"{name}", ArgKind::{"kInput" if kind == "in" else "kOutput"}, {int(idx)}, 0}}'


def _buffer_names(op: str, configs: list[dict]) -> list[str]:
    spec = PLUGINS[op]
    names = {tuple(b["name"] for b in c.get("buffers", [])) for c in configs}
    if len(names) != 1:
        raise CodegenError(f"{op}: configurations list different workspace buffers {sorted(names)}")
    return [*next(iter(names)), *(b.name for b in spec.extra_buffers)]


def render_kernels(manifest: dict, kernel_dir: Path, *, relative_to: Path | None = None) -> str:
    """``dsmoe_kernels.cpp`` for the manifest of :func:`dsmoe.plugins.aot.build_kernels` in ``kernel_dir``
    (cubin paths relative to ``relative_to`` when given: the directory the assembler runs in)."""
    fns = _Functions()
    ids = list(manifest["kernels"])
    index = {kid: i for i, kid in enumerate(ids)}
    asm, decls, kernels, tables = [], [], [], []
    buffers = {op: _buffer_names(op, manifest["ops"][op]["configs"]) for op in PLUGINS}
    for i, kid in enumerate(ids):
        k = manifest["kernels"][kid]
        path = (kernel_dir / k["cubin"]).resolve()
        if not path.is_file() or any(c in str(path) for c in '"\\\n'):
            raise CodegenError(f"cubin {path} is missing or its path cannot be embedded")
        if relative_to is not None:
            path = path.relative_to(relative_to.resolve())
        asm.append(f'    ".balign 64\\n.global dsmoe_img{i}\\n.hidden dsmoe_img{i}\\ndsmoe_img{i}:\\n'
                   f'.incbin \\"{path}\\"\\n.global dsmoe_img{i}_end\\n.hidden dsmoe_img{i}_end\\ndsmoe_img{i}_end:\\n"')
        decls.append(f"extern \"C\" unsigned char const dsmoe_img{i}[];\nextern \"C\" unsigned char const dsmoe_img{i}_end[];")
        args = ",\n    ".join(_arg(k["op"], p, buffers[k["op"]]) for p in k["params"])
        tables.append(f"static ArgSpec const kArgs{i}[] = {{\n    {args}}};")
        grid = ", ".join(fns.get(g) for g in k["grid"])
        kernels.append(
            f'    {{"{kid}", "{k["kernel"]}", "{k["entry"]}", {parse_arch(k["arch"])}, {_OP[k["op"]]}, dsmoe_img{i}, '
            f'std::size_t(dsmoe_img{i}_end - dsmoe_img{i}), {k["threads_per_block"]}, {k["shared_bytes"]}, '
            f'{k["num_stages"]}, kArgs{i}, {len(k["params"])}, {{{grid}}}, {json.dumps(json.dumps(k["constexprs"]))}}},')
        if k["global_scratch_bytes"] or k["profile_scratch_bytes"]:
            raise CodegenError(f"{kid} needs scratch memory; the plugins pass null scratch pointers")
    configs = []
    for op in PLUGINS:
        spec = PLUGINS[op]
        slots = [s for s, _ in spec.scalars]
        for j, c in enumerate(manifest["ops"][op]["configs"]):
            tag = f"{op}{j}"
            launches = ", ".join(str(index[kid]) for kid in c["launches"])
            bufs = [*c.get("buffers", []), *({"name": b.name, "type": b.type, "numel": b.numel, "zeroed": b.zeroed}
                                             for b in spec.extra_buffers)]
            rows = []
            for b in bufs:
                elem = 0 if b["type"] == "{x}" else _ELEM_BYTES[b["type"]]
                rows.append(f'{{"{b["name"]}", {elem}, {fns.get(b["numel"])}, {"true" if b["zeroed"] else "false"}}}')
            derived = [f"{{{slots.index(n)}, {fns.get(f)}}}" for n, f in c.get("sizes", {}).items()]
            tables.append(f"static int32_t const kLaunches_{tag}[] = {{{launches}}};")
            tables.append(f"static BufferSpec const kBuffers_{tag}[] = {{{', '.join(rows)}}};")
            tables.append(f"static DerivedSpec const kDerived_{tag}[] = {{{', '.join(derived) or '{0, nullptr}'}}};")
            configs.append(f'    {{{_OP[op]}, {parse_arch(c["arch"])}, {_DTYPE[c["dtype"]]}, "{c["path"]}", '
                           f'{json.dumps(c["when"])}, {fns.get(c["when"], "rule")}, kLaunches_{tag}, '
                           f'{len(c["launches"])}, kBuffers_{tag}, {len(bufs)}, kDerived_{tag}, {len(derived)}}},')
    archs = sorted({parse_arch(k["arch"]) for k in manifest["kernels"].values()})
    return "\n".join([
        "// Generated by dsmoe.plugins.trt.codegen.render_kernels() from the AOT manifest: do not edit.",
        "#include <algorithm>", "#include <cstdint>", '#include "dsPluginTypes.h"', "",
        "asm(\".section .rodata\\n\"", *asm, '    ".previous\\n");', "", *decls, "", "namespace dsmoe", "{", "",
        *fns.lines, "", *tables, "", "KernelSpec const kKernels[] = {", *kernels, "};",
        f"int32_t const kNbKernels = {len(ids)};", "ConfigSpec const kConfigs[] = {", *configs, "};",
        f"int32_t const kNbConfigs = {len(configs)};",
        f"int32_t const kArchs[] = {{{', '.join(map(str, archs))}}};", f"int32_t const kNbArchs = {len(archs)};",
        "", "} // namespace dsmoe", ""])
