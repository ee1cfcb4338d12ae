"""The ``--quant`` options of an export: which targets take them, what each target's kernels do
with activations, and the scheme they make (or the one line saying why not)."""

from __future__ import annotations

import torch

from dsmoe.dtypes import tag
from dsmoe.errors import DsmoeError
from dsmoe.quant import QuantScheme, parse_scheme
from dsmoe.quantized import quantized_dims

QUANT_TARGETS = ("ort", "portable")
# ONNX Runtime's MatMulNBits / QMoE accuracy level for every quantized matmul of the ort target:
# 4 = int8 activations, the only fast CPU path (see dsmoe.export.lower_quant)
ACCURACY_LEVEL = 4


def act_quant_of(target: str) -> bool:
    """Whether the target's quantized matmuls quantize activations (what the reference emulates)."""
    return target == "ort"


def quant_scheme(config, *, target: str, dtype: torch.dtype, quant: str | None, block_size: int | None = None,
                 scope: str | None = None, asymmetric: bool = False) -> QuantScheme | None:
    """The ``--quant`` options as a :class:`QuantScheme` for ``target`` (``None`` without
    ``--quant``); options that do not apply are one :class:`DsmoeError`."""
    if quant is None:
        given = [f for f, v in (("--block-size", block_size), ("--quant-scope", scope), ("--asymmetric", asymmetric)) if v]
        if given:
            raise DsmoeError(f"{given[0]} applies only with --quant int8|int4")
        return None
    check_quant_target(target)
    if dtype != torch.float32:
        raise DsmoeError(f"--quant keeps fp32 activations and scales: --dtype {tag(dtype)} does not apply "
                         "(ONNX Runtime's fast quantized CPU kernels are fp32 with int8 activations)")
    scope = scope or "all"
    scheme = parse_scheme(quant, block_size=block_size, symmetric=not asymmetric, scope=scope,
                          dims=quantized_dims(config, scope))
    return scheme.with_act_quant(act_quant_of(target))


def check_quant_target(target: str) -> None:
    if target not in QUANT_TARGETS:
        raise DsmoeError(f"--quant does not apply to target {target!r} (quantized targets: {', '.join(QUANT_TARGETS)})")
