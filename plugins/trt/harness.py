"""Drive the plugin library through the TensorRT plugin ABI, as TensorRT would, without TensorRT.

:class:`PluginLibrary` loads ``libdsmoe_trt_harness.so`` (``harness.cpp``), which loads the plugin
library the way TensorRT does (``dlopen``, ``setLoggerFinder``, ``getCreators``) and forwards each
IPluginV3 method; the structures cross as ctypes mirrors of TensorRT's (sizes checked against the
C++ ones). :func:`fields_from_onnx` builds a ``PluginFieldCollection`` from an ONNX node the way
TensorRT's ONNX parser does (onnx-tensorrt ``onnxOpImporters.cpp``: ``loadFields`` walks the
creator's ``getFieldNames()``; INT → kINT32, FLOAT → kFLOAT32, STRING → kCHAR with the NUL counted
in the length, INTS/FLOATS → arrays; a field the node lacks is skipped).
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

# nvinfer1::PluginFieldType / DataType / TensorFormat / TensorRTPhase values (NvInferPluginBase.h, NvInferRuntimeBase.h)
FIELD_TYPES = {"FLOAT16": 0, "FLOAT32": 1, "FLOAT64": 2, "INT8": 3, "INT16": 4, "INT32": 5, "CHAR": 6, "DIMS": 7,
               "UNKNOWN": 8, "BF16": 9, "INT64": 10}
FIELD_TYPE_NAMES = {v: k for k, v in FIELD_TYPES.items()}
DATA_TYPES = {"fp32": 0, "fp16": 1, "int8": 2, "int32": 3, "bool": 4, "uint8": 5, "fp8": 6, "bf16": 7, "int64": 8}
DATA_TYPE_NAMES = {v: k for k, v in DATA_TYPES.items()}
LINEAR, CHW2 = 0, 1
PHASES = {"build": 0, "runtime": 1}
MAX_DIMS = 8
_TENSOR_FIELD = {onnx.TensorProto.FLOAT: ("FLOAT32", ctypes.c_float), onnx.TensorProto.INT32: ("INT32", ctypes.c_int32),
                 onnx.TensorProto.INT8: ("INT8", ctypes.c_int8), onnx.TensorProto.INT16: ("INT16", ctypes.c_int16),
                 onnx.TensorProto.DOUBLE: ("FLOAT64", ctypes.c_double)}


class PluginField(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.c_void_p), ("type", ctypes.c_int32),
                ("length", ctypes.c_int32)]


class PluginFieldCollection(ctypes.Structure):
    _fields_ = [("nbFields", ctypes.c_int32), ("fields", ctypes.POINTER(PluginField))]


class Dims(ctypes.Structure):
    _fields_ = [("nbDims", ctypes.c_int32), ("d", ctypes.c_int64 * MAX_DIMS)]


class PluginTensorDesc(ctypes.Structure):
    _fields_ = [("dims", Dims), ("type", ctypes.c_int32), ("format", ctypes.c_int32), ("scale", ctypes.c_float)]


class DynamicPluginTensorDesc(ctypes.Structure):
    _fields_ = [("desc", PluginTensorDesc), ("min", Dims), ("max", Dims), ("opt", Dims)]


STRUCTS = {"PluginField": PluginField, "PluginFieldCollection": PluginFieldCollection, "Dims": Dims,
           "PluginTensorDesc": PluginTensorDesc, "DynamicPluginTensorDesc": DynamicPluginTensorDesc}


def dims(shape) -> Dims:
    d = Dims()
    d.nbDims = len(shape)
    for i, v in enumerate(shape):
        d.d[i] = int(v)
    return d


def tensor_desc(shape, dtype: str, fmt: int = LINEAR) -> PluginTensorDesc:
    return PluginTensorDesc(dims(shape), DATA_TYPES[dtype], fmt, -1.0)


def dynamic_desc(shape, dtype: str, lo=None, hi=None, opt=None, fmt: int = LINEAR) -> DynamicPluginTensorDesc:
    """``shape`` with -1 for a dynamic dimension; ``lo``/``hi``/``opt`` the profile (default: shape)."""
    return DynamicPluginTensorDesc(tensor_desc(shape, dtype, fmt), dims(lo or shape), dims(hi or shape),
                                   dims(opt or hi or shape))


@dataclass
class Field:
    """One PluginField: ``values`` are ints/floats (arrays) or bytes (kCHAR, NUL included when the
    parser would include it)."""

    name: str
    type: str
    values: object
    length: int


class FieldList:
    """Fields as a ``PluginFieldCollection`` (the ctypes buffers kept alive with it)."""

    def __init__(self, fields: list[Field]):
        self.fields = list(fields)
        self._keep = []
        arr = (PluginField * max(len(self.fields), 1))()
        for i, f in enumerate(self.fields):
            if f.type == "CHAR":
                buf = ctypes.create_string_buffer(bytes(f.values), len(f.values)) if len(f.values) else None
            else:
                ctype = {"INT32": ctypes.c_int32, "INT64": ctypes.c_int64, "FLOAT32": ctypes.c_float,
                         "FLOAT64": ctypes.c_double, "INT8": ctypes.c_int8, "INT16": ctypes.c_int16}[f.type]
                vals = list(f.values)
                buf = (ctype * max(len(vals), 1))(*vals)
            name = f.name.encode()
            self._keep += [buf, name]
            arr[i] = PluginField(name, ctypes.cast(buf, ctypes.c_void_p) if buf is not None else None,
                                 FIELD_TYPES[f.type], f.length)
        self._keep.append(arr)
        self.fc = PluginFieldCollection(len(self.fields), arr)

    def as_dict(self) -> dict:
        """``{name: (type, value)}``, strings decoded up to their NUL."""
        out = {}
        for f in self.fields:
            v = f.values
            if f.type == "CHAR":
                v = bytes(v)[: f.length].split(b"\0")[0].decode()
            elif f.length == 1:
                v = next(iter(v))
            out[f.name] = (f.type, v)
        return out


def fields_from_onnx(node: onnx.NodeProto, field_names: list[str]) -> tuple[FieldList, list[str]]:
    """The ``PluginFieldCollection`` TensorRT's ONNX parser builds for ``node`` (walking the creator's
    field names, as ``loadFields`` does), and the names it skipped because the node lacks them."""
    attrs = {a.name: a for a in node.attribute}
    fields, skipped = [], []
    A = onnx.AttributeProto
    for name in field_names:
        a = attrs.get(name)
        if a is None:
            skipped.append(name)
            continue
        if a.type == A.FLOAT:
            fields.append(Field(name, "FLOAT32", [a.f], 1))
        elif a.type == A.INT:
            fields.append(Field(name, "INT32", [ctypes.c_int32(a.i).value], 1))  # attrs.get<int32_t>
        elif a.type == A.STRING:
            fields.append(Field(name, "CHAR", a.s + b"\0", len(a.s) + 1))
        elif a.type == A.FLOATS:
            fields.append(Field(name, "FLOAT32", list(a.floats), len(a.floats)))
        elif a.type == A.INTS:
            fields.append(Field(name, "INT32", [ctypes.c_int32(v).value for v in a.ints], len(a.ints)))
        elif a.type == A.STRINGS:
            data = b"".join(s + b"\0" for s in a.strings)
            fields.append(Field(name, "CHAR", data, len(data)))
        elif a.type == A.TENSOR and a.t.data_type in _TENSOR_FIELD:
            arr = numpy_helper.to_array(a.t).reshape(-1)
            fields.append(Field(name, _TENSOR_FIELD[a.t.data_type][0], arr.tolist(), arr.size))
        else:
            raise ValueError(f"{node.op_type} attribute {name}: type {A.AttributeType.Name(a.type)} is unsupported "
                             "as a plugin field by TensorRT's ONNX parser")
    return FieldList(fields), skipped


def _read_fields(fc_ptr) -> FieldList:
    """A PluginFieldCollection the library returned, copied into Python."""
    fc = fc_ptr.contents
    out = []
    for i in range(fc.nbFields):
        f = fc.fields[i]
        t = FIELD_TYPE_NAMES[f.type]
        if t == "CHAR":
            vals = ctypes.string_at(f.data, f.length) if f.length else b""
        else:
            ctype = {"INT32": ctypes.c_int32, "INT64": ctypes.c_int64, "FLOAT32": ctypes.c_float,
                     "FLOAT64": ctypes.c_double}[t]
            vals = list((ctype * f.length).from_address(f.data))
        out.append(Field(f.name.decode(), t, vals, f.length))
    return FieldList(out)


@dataclass(frozen=True)
class Creator:
    kind: str
    name: str
    version: str
    namespace: str
    fields: tuple[tuple[str, str, int], ...]   # (name, PluginFieldType name, length) of getFieldNames()


class PluginLibrary:
    """The plugin library loaded through the harness shim."""

    def __init__(self, library: str | Path, harness: str | Path):
        self._h = h = ctypes.CDLL(str(harness))
        P, I32, S = ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p
        sigs = {"h_sizeof": (I32, [S]), "h_open": (P, [S, S, I32]), "h_last_log": (S, [P]), "h_clear_log": (None, [P]),
                "h_nb_creators": (I32, [P]), "h_creator": (I32, [P, I32, S, I32]),
                "h_create": (P, [P, S, S, S, S, ctypes.POINTER(PluginFieldCollection), I32]),
                "h_destroy": (None, [P]), "h_info": (I32, [P, S, I32]), "h_nb_outputs": (I32, [P]),
                "h_output_types": (I32, [P, P, I32, P, I32]),
                "h_output_shapes": (I32, [P, I32, P, P, I32, S, I32]), "h_supports": (I32, [P, I32, P, I32, I32]),
                "h_configure": (I32, [P, P, I32, P, I32]), "h_workspace": (ctypes.c_int64, [P, P, I32, P, I32]),
                "h_serialize": (ctypes.POINTER(PluginFieldCollection), [P]),
                "h_on_shape_change": (I32, [P, P, I32, P, I32]), "h_clone": (P, [P]), "h_attach": (P, [P]),
                "h_plan": (I32, [P, P, I32, S, I32]), "h_enqueue": (I32, [P, P, P, P, P, P, P])}
        for name, (res, args) in sigs.items():
            fn = getattr(h, name)
            fn.restype, fn.argtypes = res, args
        for name, cls in STRUCTS.items():
            if h.h_sizeof(name.encode()) != ctypes.sizeof(cls):
                raise RuntimeError(f"sizeof({name}) differs between the TensorRT headers and the harness's mirror")
        err = ctypes.create_string_buffer(1024)
        self._lib = h.h_open(str(library).encode(), err, len(err))
        if not self._lib:
            raise OSError(f"cannot load {library}: {err.value.decode()}")

    @property
    def last_log(self) -> str:
        return self._h.h_last_log(self._lib).decode()

    def creators(self) -> list[Creator]:
        out = []
        for i in range(self._h.h_nb_creators(self._lib)):
            buf = ctypes.create_string_buffer(4096)
            self._h.h_creator(self._lib, i, buf, len(buf))
            kind, name, version, ns, fields = (buf.value.decode().split("|") + [""] * 5)[:5]
            parsed = tuple((n, FIELD_TYPE_NAMES[int(t)], int(ln)) for n, t, ln in
                           (f.split(":") for f in fields.split(",") if f))
            out.append(Creator(kind, name, version, ns, parsed))
        return out

    def create(self, name: str, version: str, namespace: str, fields: FieldList, *, phase: str = "build",
               layer: str = "node") -> Plugin | None:
        """``createPlugin`` of the creator registered under (name, version, namespace); None when it
        refuses (:attr:`last_log` says why)."""
        self._h.h_clear_log(self._lib)
        p = self._h.h_create(self._lib, name.encode(), version.encode(), namespace.encode(), layer.encode(),
                             ctypes.byref(fields.fc), PHASES[phase])
        return Plugin(self, p) if p else None


class Plugin:
    """An IPluginV3 of the library; each method forwards one TensorRT call."""

    def __init__(self, lib: PluginLibrary, handle: int):
        self.lib, self._p, self._h = lib, handle, lib._h

    def __del__(self):
        if getattr(self, "_p", None):
            self._h.h_destroy(self._p)
            self._p = None

    def info(self) -> dict:
        buf = ctypes.create_string_buffer(1024)
        self._h.h_info(self._p, buf, len(buf))
        core, build, runtime, name, version, ns = buf.value.decode().split("|")
        return {"core": core, "build": build, "runtime": runtime, "name": name, "version": version, "namespace": ns}

    def nb_outputs(self) -> int:
        return self._h.h_nb_outputs(self._p)

    def output_types(self, inputs: list[str]) -> tuple[int, list[str]]:
        n = self.nb_outputs()
        ins = (ctypes.c_int32 * len(inputs))(*(DATA_TYPES[t] for t in inputs))
        outs = (ctypes.c_int32 * n)()
        status = self._h.h_output_types(self._p, ins, len(inputs), outs, n)
        return status, [DATA_TYPE_NAMES.get(v, str(v)) for v in outs]

    def output_shapes(self, inputs: list[list]) -> tuple[int, list[list[str]]]:
        """Input dims as ints (constants) or names (symbols, e.g. "T"); the outputs' dims as text."""
        tokens = [str(d).encode() for shape in inputs for d in shape]
        toks = (ctypes.c_char_p * max(len(tokens), 1))(*tokens)
        ranks = (ctypes.c_int32 * len(inputs))(*(len(s) for s in inputs))
        buf = ctypes.create_string_buffer(4096)
        status = self._h.h_output_shapes(self._p, len(inputs), ranks, toks, self.nb_outputs(), buf, len(buf))
        text = buf.value.decode()
        return status, [o.split(",") for o in text.split(";")] if text else []

    def _descs(self, descs, cls):
        return (cls * max(len(descs), 1))(*descs)

    def supports(self, pos: int, io: list[DynamicPluginTensorDesc], nb_inputs: int) -> bool:
        arr = self._descs(io, DynamicPluginTensorDesc)
        return bool(self._h.h_supports(self._p, pos, arr, nb_inputs, len(io) - nb_inputs))

    def configure(self, ins: list[DynamicPluginTensorDesc], outs: list[DynamicPluginTensorDesc]) -> int:
        return self._h.h_configure(self._p, self._descs(ins, DynamicPluginTensorDesc), len(ins),
                                   self._descs(outs, DynamicPluginTensorDesc), len(outs))

    def workspace(self, ins: list[DynamicPluginTensorDesc], outs: list[DynamicPluginTensorDesc]) -> int:
        return self._h.h_workspace(self._p, self._descs(ins, DynamicPluginTensorDesc), len(ins),
                                   self._descs(outs, DynamicPluginTensorDesc), len(outs))

    def serialize(self) -> FieldList:
        return _read_fields(self._h.h_serialize(self._p))

    def on_shape_change(self, ins: list[PluginTensorDesc], outs: list[PluginTensorDesc]) -> int:
        return self._h.h_on_shape_change(self._p, self._descs(ins, PluginTensorDesc), len(ins),
                                         self._descs(outs, PluginTensorDesc), len(outs))

    def clone(self) -> Plugin | None:
        p = self._h.h_clone(self._p)
        return Plugin(self.lib, p) if p else None

    def attach(self) -> Plugin | None:
        p = self._h.h_attach(self._p)
        return Plugin(self.lib, p) if p else None

    def plan(self, arch: int) -> dict | str:
        """The launch plan for the last onShapeChange() shapes on ``arch`` (a dict), or why not (a str)."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._h.h_plan(self.lib._lib, self._p, arch, buf, len(buf))
        return json.loads(buf.value.decode()) if n >= 0 else buf.value.decode()

    def enqueue(self, ins: list[PluginTensorDesc], outs: list[PluginTensorDesc], inputs: list[int],
                outputs: list[int], workspace: int, stream: int) -> int:
        """``enqueue`` with device pointers (ints) on a CUDA stream handle."""
        ip = (ctypes.c_void_p * max(len(inputs), 1))(*inputs)
        op = (ctypes.c_void_p * max(len(outputs), 1))(*outputs)
        return self._h.h_enqueue(self._p, self._descs(ins, PluginTensorDesc), self._descs(outs, PluginTensorDesc),
                                 ip, op, workspace, stream)
