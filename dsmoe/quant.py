"""Weight-only block quantization, once: the scheme, the math, the packing and the reference matmul.

A weight ``w [.., N, K]`` (PyTorch's ``[out, in]``) is cut into blocks of B consecutive weights
along the *input* dimension K; each block gets its own fp32 scale s (and, asymmetric, a zero point
z), and each weight an unsigned ``bits``-bit code q:

- symmetric:  ``s = max|w| / (2^(b-1) − 1)``, ``q = clamp(round(w / s), −2^(b-1), 2^(b-1) − 1) + 2^(b-1)``,
  implied ``z = 2^(b-1)`` (8 for int4, 128 for int8: ONNX Runtime's default zero point);
- asymmetric: ``s = (max(w, 0) − min(w, 0)) / (2^b − 1)``, ``z = clamp(round(−min(w, 0) / s), 0, 2^b − 1)``,
  ``q = clamp(round(w / s) + z, 0, 2^b − 1)``;
- dequantized: ``ŵ = (q − z) · s`` in fp32 (what every kernel computes).

Everything runs in fp32 torch with round-half-to-even, element by element, so it is
deterministic, and quantizing rows together or apart (stacked experts, fused gate|up) gives the
same codes: the exporter, the reference model and the GGUF comparison all quantize through here.

Packing (ONNX Runtime's ``MatMulNBits`` / ``QMoE`` and ONNX ``INT4``): int4 codes two to a byte
along K, the first in the low nibble; int8 one per byte. Zero points are packed the same way along
the blocks.

:func:`qlinear` is the reference matmul. With ``act_quant`` it also does what ONNX Runtime's CPU
kernels do at ``accuracy_level`` 4 (and its block-wise int8 ``QMoE`` always): each row of the
activations is quantized to int8 per block of B (``scale = max|x| / 127``, ``code = round(x · 127
/ max|x|)``), integer dot products per block, scaled by both scales and summed in fp32 — measured
to agree with ORT 1.32 to ~3e-7 relative (the tests pin it).

Shape letters: T tokens, N output features, K input features, B block size, nb = K / B blocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from dsmoe.errors import DsmoeError

QUANT_TYPES = {"int8": 8, "int4": 4}
BLOCK_SIZES = (32, 64, 128)
# Without --block-size each weight takes the first of these that divides its input dimension:
# larger blocks decode faster (ORT 1.32, 2 threads, weights far beyond the caches: int4 MatMulNBits
# 21.1 / 19.8 / 18.9 GB/s and int4 QMoE 21.7 / 19.9 / 18.6 GB/s at 128 / 64 / 32), smaller ones
# are more accurate.
PREFERRED_BLOCK_SIZES = (128, 64, 32)
SCOPES = ("all", "experts")  # all linears but the router | routed + shared experts and dense MLPs


@dataclass(frozen=True)
class QuantScheme:
    """What gets quantized and how. ``act_quant``: the matmuls also quantize their activations to
    int8 per block (set by the export target: ``ort``'s fast CPU kernels do, ``portable`` does not)."""

    bits: int
    block_size: int | None  # None: per weight, the first of PREFERRED_BLOCK_SIZES that divides its K
    symmetric: bool = True
    scope: str = "all"
    act_quant: bool = False

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def block_for(self, *dims: int) -> int:
        """The block size of a weight with input dimension(s) ``dims`` (a QMoE node's fc1 and fc2
        share one: both H and I)."""
        if self.block_size is not None:
            return self.block_size
        for b in PREFERRED_BLOCK_SIZES:
            if all(d % b == 0 for d in dims):
                return b
        raise DsmoeError(f"no block size of {', '.join(map(str, BLOCK_SIZES))} divides {', '.join(map(str, dims))}")

    def with_act_quant(self, on: bool) -> QuantScheme:
        return replace(self, act_quant=on)

    def as_dict(self) -> dict:
        d = {"type": self.name, **asdict(self)}
        if self.block_size is None:
            d["block_size"] = "auto"
            d["preferred_block_sizes"] = list(PREFERRED_BLOCK_SIZES)
        return d


def parse_scheme(quant: str, *, block_size: int | None = None, symmetric: bool = True, scope: str = "all",
                 dims: dict[str, int] | None = None) -> QuantScheme:
    """``--quant int4 --block-size 32`` → :class:`QuantScheme`; a bad value is one :class:`DsmoeError`.

    ``dims`` (``{"hidden_size": 2048, ...}``) are the input dimensions the scheme will cut into
    blocks: an explicit block size must divide each; without one (``auto``) each weight takes the
    first of :data:`PREFERRED_BLOCK_SIZES` that divides its own input dimension.
    """
    key = str(quant).strip().lower()
    if key not in QUANT_TYPES:
        raise DsmoeError(f"unsupported --quant {quant!r} (supported: {', '.join(QUANT_TYPES)})")
    if scope not in SCOPES:
        raise DsmoeError(f"unsupported --quant-scope {scope!r} (supported: {', '.join(SCOPES)})")
    dims = dims or {}
    if block_size is None:
        bad = {k: v for k, v in dims.items() if v % min(BLOCK_SIZES)}
        if bad:
            raise DsmoeError(f"no block size of {', '.join(map(str, BLOCK_SIZES))} divides {_dims_text(bad)}")
        return QuantScheme(bits=QUANT_TYPES[key], block_size=None, symmetric=symmetric, scope=scope)
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise DsmoeError(f"unsupported --block-size {block_size!r} for {key} (supported: {', '.join(map(str, BLOCK_SIZES))})")
    for name, v in dims.items():
        if v % block_size:
            raise DsmoeError(f"--block-size {block_size} does not divide {name} {v} (blocks run along each weight's "
                             f"input dimension; use a block size that divides {_dims_text(dims)})")
    return QuantScheme(bits=QUANT_TYPES[key], block_size=block_size, symmetric=symmetric, scope=scope)


def _dims_text(dims: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in dims.items())


@dataclass
class QuantizedTensor:
    """``codes [.., N, K]`` uint8 in ``[0, 2^bits)``, ``scales [.., N, nb]`` fp32 and, when
    asymmetric, ``zero_points [.., N, nb]`` uint8 (``None``: the implied ``2^(bits-1)``)."""

    codes: Tensor
    scales: Tensor
    zero_points: Tensor | None
    bits: int
    block_size: int

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def zero_point_values(self) -> Tensor:
        if self.zero_points is not None:
            return self.zero_points
        return torch.full(self.scales.shape, 1 << (self.bits - 1), dtype=torch.uint8, device=self.codes.device)

    def integer_weights(self) -> Tensor:
        """``q − z`` as fp32 (exact small integers) ``[.., N, nb, B]``."""
        *lead, N, K = self.codes.shape
        q = self.codes.reshape(*lead, N, K // self.block_size, self.block_size).float()
        return q - self.zero_point_values().float().unsqueeze(-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``ŵ = (q − z) · s`` ``[.., N, K]`` (computed in fp32, then cast)."""
        w = self.integer_weights() * self.scales.float().unsqueeze(-1)
        return w.reshape(self.codes.shape).to(dtype)

    def packed(self) -> Tensor:
        """The codes as stored: ``[.., N, K·bits/8]`` uint8."""
        return pack(self.codes, self.bits)

    def packed_zero_points(self) -> Tensor | None:
        """``[.., N, ceil(nb·bits/8)]`` uint8, or ``None`` when symmetric."""
        return None if self.zero_points is None else pack(self.zero_points, self.bits)

    def map_rows(self, fn) -> QuantizedTensor:
        """The same quantized weight with ``fn`` (a re-layout of the leading/N dims, e.g. a row
        permutation or a transpose of leading dims) applied to codes, scales and zero points."""
        zp = None if self.zero_points is None else fn(self.zero_points)
        return QuantizedTensor(fn(self.codes), fn(self.scales), zp, self.bits, self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes as stored: packed codes, fp32 scales, packed zero points."""
        zp = self.packed_zero_points()
        return self.codes.numel() * self.bits // 8 + self.scales.numel() * 4 + (0 if zp is None else zp.numel())


CHUNK = 1 << 24  # weights quantized at a time (rows are independent: chunking changes nothing)


def quantize(w: Tensor, bits: int, block_size: int, *, symmetric: bool = True) -> QuantizedTensor:
    """Block-quantize ``w [.., N, K]`` along K (see the module docstring); K must be a multiple of B.
    Done :data:`CHUNK` weights at a time, so a 1.5 GB expert stack needs tens of MB of temporaries."""
    *lead, N, K = w.shape
    if K % block_size:
        raise DsmoeError(f"block size {block_size} does not divide the input dimension {K} of a weight {list(w.shape)}")
    rows = w.detach().reshape(-1, K)
    step = max(1, CHUNK // K)
    if rows.shape[0] > step:
        parts = [_quantize_rows(rows[i:i + step], bits, block_size, symmetric) for i in range(0, rows.shape[0], step)]
        zp = None if symmetric else torch.cat([p.zero_points for p in parts])
        nb = K // block_size
        return QuantizedTensor(torch.cat([p.codes for p in parts]).reshape(w.shape),
                               torch.cat([p.scales for p in parts]).reshape(*lead, N, nb),
                               None if zp is None else zp.reshape(*lead, N, nb), bits, block_size)
    return _quantize_rows(w.detach(), bits, block_size, symmetric)


def _quantize_rows(w: Tensor, bits: int, block_size: int, symmetric: bool) -> QuantizedTensor:
    *lead, N, K = w.shape
    wb = w.float().reshape(*lead, N, K // block_size, block_size)
    levels = (1 << bits) - 1
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = wb.abs().amax(dim=-1) / qmax
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.clamp(torch.round(wb / safe.unsqueeze(-1)), -qmax - 1, qmax) + (1 << (bits - 1))
        zero = None
    else:
        lo = torch.clamp(wb.amin(dim=-1), max=0.0)
        hi = torch.clamp(wb.amax(dim=-1), min=0.0)
        scale = (hi - lo) / levels
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zf = torch.clamp(torch.round(-lo / safe), 0, levels)
        codes = torch.clamp(torch.round(wb / safe.unsqueeze(-1)) + zf.unsqueeze(-1), 0, levels)
        zero = zf.to(torch.uint8)
    return QuantizedTensor(codes.to(torch.uint8).reshape(w.shape), scale.contiguous(), zero, bits, block_size)


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes ``[.., n]`` → storage bytes: int8 as is; int4 two per byte along the last dim,
    the first in the low nibble (an odd count is padded with a zero nibble)."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits != 4:
        raise ValueError(f"packing of {bits}-bit codes is not implemented")
    c = codes.to(torch.uint8)
    if c.shape[-1] % 2:
        c = F.pad(c, (0, 1))
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes of the last dim."""
    if bits == 8:
        return packed[..., :n]
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :n]


def quantize_activations(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Int8 per block, as ONNX Runtime's CPU kernels do: ``x [.., K]`` → ``(codes [.., nb, B]`` as
    fp32 integers in [−127, 127], ``scales [.., nb])`` with ``scale = max|x|/127`` and ``code =
    round(x · (127 / max|x|))`` (an all-zero block has scale 0)."""
    *lead, K = x.shape
    xb = x.float().reshape(*lead, K // block_size, block_size)
    amax = xb.abs().amax(dim=-1)
    inv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(xb * inv.unsqueeze(-1)), amax / 127.0


def qlinear(x: Tensor, qt: QuantizedTensor, bias: Tensor | None = None, *, act_quant: bool = False,
            chunk: int = 1 << 25) -> Tensor:
    """``y = x · ŵᵀ (+ bias)`` for ``x [.., K]`` and a quantized 2-D ``[N, K]`` weight, in fp32, cast
    back to x's dtype. ``act_quant``: int8 block-quantized activations (see the module docstring)."""
    if not act_quant:
        return F.linear(x, qt.dequantize(x.dtype), bias)
    *lead, K = x.shape
    N, B = qt.shape[0], qt.block_size
    nb = K // B
    xq, xs = quantize_activations(x.reshape(-1, K), B)       # [T, nb, B], [T, nb]
    wq = qt.integer_weights().permute(1, 2, 0)                # [nb, B, N]
    ws = qt.scales.float().t().unsqueeze(1)                   # [nb, 1, N]
    rows = max(1, chunk // max(1, nb * N))
    out = []
    for xc, sc in zip(xq.split(rows), xs.split(rows)):
        # [nb, t, N]: integer sums, exact in fp32 (|Σ| ≤ 127·255·128 < 2^24)
        dots = torch.bmm(xc.transpose(0, 1), wq)
        out.append((dots * (sc.t().unsqueeze(-1) * ws)).sum(dim=0))
    y = torch.cat(out).reshape(*lead, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- llama.cpp's block formats (the GGUF baseline) -------------------------------------------
# Q8_0 and Q4_0 as ggml's reference quantizers (ggml-quants.c, quantize_row_q{8,4}_0_ref) write
# them, byte for byte (a test compares with the gguf package's implementation): blocks of 32
# along K, an fp16 scale d, then the codes. Q8_0: d = max|x|/127, q = roundf(x/d) (half away from
# zero), int8. Q4_0: d = m/−8 with m the value of largest magnitude, q = min(15, trunc(x/d + 8.5)),
# stored two per byte: element j in the low nibble, element j + 16 in the high one.
GGML_BLOCK = 32
GGML_TYPES = ("Q8_0", "Q4_0")
GGML_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18}


def ggml_quantize(w: Tensor, qtype: str) -> Tensor:
    """``w [.., K]`` → ``[.., K/32 · bytes per block]`` uint8 (34 for Q8_0, 18 for Q4_0)."""
    *lead, K = w.shape
    if K % GGML_BLOCK:
        raise DsmoeError(f"{qtype} needs the last dimension to be a multiple of {GGML_BLOCK}, got {K}")
    b = w.detach().float().reshape(-1, GGML_BLOCK)
    if qtype == "Q8_0":
        d = b.abs().amax(dim=-1, keepdim=True) / 127
        q = _roundf(b * torch.where(d == 0, torch.zeros_like(d), 1 / d)).to(torch.int8).view(torch.uint8)
    elif qtype == "Q4_0":
        m = b.gather(1, b.abs().argmax(dim=-1, keepdim=True))
        d = m / -8
        q = torch.trunc(b * torch.where(d == 0, torch.zeros_like(d), 1 / d) + 8.5).clamp(0, 15).to(torch.uint8)
        q = q[:, :16] | (q[:, 16:] << 4)
    else:
        raise DsmoeError(f"unsupported GGML type {qtype!r} (supported: {', '.join(GGML_TYPES)})")
    out = torch.cat([d.half().view(torch.uint8), q], dim=1)
    return out.reshape(*lead, -1)


def ggml_dequantize(blocks: Tensor, qtype: str, K: int) -> Tensor:
    """Inverse of :func:`ggml_quantize` (fp32 ``[.., K]``), as ggml dequantizes."""
    *lead, _ = blocks.shape
    b = blocks.reshape(-1, GGML_BLOCK_BYTES[qtype])
    d = b[:, :2].contiguous().view(torch.float16).float()
    if qtype == "Q8_0":
        q = b[:, 2:].contiguous().view(torch.int8).float()
    else:
        qs = b[:, 2:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float() - 8
    return (q * d).reshape(*lead, K)


def _roundf(x: Tensor) -> Tensor:
    """C ``roundf`` (half away from zero), as ggml and the gguf package compute it."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))
