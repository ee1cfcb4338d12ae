"""Dtypes, once: the names users type, the short tags files and tables use, and the tolerances.

Every command, the export, the benchmarks and the kernels parse and name dtypes through this
module, so ``--dtype bf16`` means the same thing everywhere and a comparison in fp16 is held to
the same bound wherever it is made.
"""

from __future__ import annotations

import torch

from dsmoe.errors import DsmoeError

# the names a user may type (torch's, the short tags, and "torch.float32" spellings)
NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# the short tag of a dtype: result files, tables, the export report
TAGS: dict[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Verification of a rewritten or exported graph against eager: max|out − ref| ≤ tol · max|ref|.
# 16-bit graphs round every op, in another order than eager (fused MatMuls, ORT's MoE kernel).
VERIFY_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# The benchmark's cross-check of each backend before timing it: looser, because its model suite
# compounds rounding over up to 28 layers and its inputs are not chosen to avoid near-ties.
BENCH_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def parse_dtype(name: str | torch.dtype | None, *, default: str = "float32",
                supported: tuple[torch.dtype, ...] = FLOATS, what: str = "dtype") -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` → ``torch.bfloat16``; anything else, or a
    dtype outside ``supported``, is one :class:`DsmoeError` naming what is supported."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = (default if name is None else str(name)).strip().lower().removeprefix("torch.")
        dtype = NAMES.get(key)
    if dtype not in supported:
        allowed = ", ".join(TAGS[d] for d in supported)
        raise DsmoeError(f"unsupported {what} {name!r} (supported: {allowed})")
    return dtype


def tag(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bf16"``."""
    return TAGS[dtype]


def torch_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the ``torch_dtype`` of a Hugging Face config)."""
    return str(dtype).removeprefix("torch.")
