"""This machine's limits, measured in the benchmark run, and the floor of a case.

Two microbenchmarks: memory *read* bandwidth (sum / GEMV over a buffer far larger than the
caches) and the GEMM rate (``torch.mm`` in the run's dtype), best of a few runs (a limit is what
the machine can do, not what it did on average). On the CPU: fp32, the run's thread count. On a
GPU (:func:`measure_gpu_limits`): HBM bandwidth as the faster of a 4 GiB ``sum`` (bytes read) and
a 2 GiB device-to-device copy (bytes read + written), and an 8192³ GEMM in the run's dtype,
timed with CUDA events. A case's floor is then

    floor = max(bytes_touched / bandwidth, flops / gemm_rate)

with ``bytes_touched`` the weights the case actually reads (router, the *distinct* experts the
router hit, shared experts, dense weights) plus its activations. ``fraction of floor`` is
``floor / latency``: 1.0 means the backend runs at the machine's limit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from dsmoe.architecture import mla_attention_params
from dsmoe.config import DeepseekConfig
from dsmoe.dtypes import tag


@dataclass
class Limits:
    bandwidth_gbs: float     # GB/s (1e9 bytes) read
    gemm_gflops: float       # GFLOP/s in gemm_dtype
    bandwidth_bytes: int     # buffer size used
    gemm_n: int              # square GEMM size used
    device: str = "cpu"
    gemm_dtype: str = "fp32"

    def as_dict(self) -> dict:
        return asdict(self)


def measure_limits(*, quick: bool = False, bandwidth_mb: int | None = None, gemm_n: int | None = None,
                   repeats: int | None = None) -> Limits:
    """Measure read bandwidth and fp32 GEMM rate (best of ``repeats`` and of two kernels each).

    Bandwidth: the faster of ``sum`` over the buffer and ``mv`` (GEMV: the access pattern of
    decode, which MKL streams better than the reduction). GEMM: the faster of a square ``mm`` and
    a wide ``[512, n] × [n, 4n]`` one (the lm_head / expert-batch shape).
    """
    mb = bandwidth_mb or (256 if quick else 1024)
    n = gemm_n or (1024 if quick else 2048)
    reps = repeats or (3 if quick else 7)
    return Limits(bandwidth_gbs=_cpu_read_bandwidth(mb, reps) / 1e9, gemm_gflops=_cpu_gemm_rate(n, reps) / 1e9,
                  bandwidth_bytes=mb << 20, gemm_n=n)


def _cpu_read_bandwidth(mb: int, reps: int) -> float:
    """Bytes/s: the faster of a sum and a GEMV over ``mb`` MiB (freed on return)."""
    cols = 4096
    buf = torch.ones(mb * (1 << 20) // 4 // cols, cols, dtype=torch.float32)
    vec = torch.ones(cols)
    buf.sum()  # fault the pages in
    nbytes = buf.numel() * 4
    return max(nbytes / min(_time(lambda: buf.sum()), _time(lambda: torch.mv(buf, vec))) for _ in range(reps))


def _cpu_gemm_rate(n: int, reps: int) -> float:
    """FLOP/s: the faster of an n² square and a 512×n×4n torch.mm."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c, d = torch.randn(512, n), torch.randn(n, 4 * n)
    torch.mm(a, b), torch.mm(c, d)
    return max(max(2.0 * n ** 3 / _time(lambda: torch.mm(a, b)), 2.0 * 512 * n * 4 * n / _time(lambda: torch.mm(c, d)))
               for _ in range(reps))


def measure_int8_gemm_rate(*, n: int = 2048, repeats: int = 5) -> float:
    """int8 × int8 → int32 GEMM rate in GOP/s (``torch._int_mm``, ``[512, n] × [n, 4n]``, best of
    ``repeats``): the peak the int8-activation kernels of a quantized prefill run against."""
    a = torch.randint(-127, 127, (512, n), dtype=torch.int8)
    b = torch.randint(-127, 127, (n, 4 * n), dtype=torch.int8)
    torch._int_mm(a, b)
    return max(2.0 * 512 * n * 4 * n / _time(lambda: torch._int_mm(a, b)) for _ in range(repeats)) / 1e9


def measure_gpu_limits(device, dtype, *, quick: bool = False, repeats: int | None = None) -> Limits:
    """HBM bandwidth and the GEMM rate in ``dtype`` on a CUDA device (CUDA events, best of repeats)."""
    dev = torch.device(device)
    reps = repeats or (3 if quick else 10)
    nbytes = (1 if quick else 4) << 30
    n = 4096 if quick else 8192
    bandwidth = _gpu_bandwidth(dev, nbytes, reps)
    gemm = _gpu_gemm_rate(dev, dtype, n, reps)
    torch.cuda.empty_cache()
    return Limits(bandwidth_gbs=bandwidth / 1e9, gemm_gflops=gemm / 1e9, bandwidth_bytes=nbytes, gemm_n=n,
                  device=str(dev), gemm_dtype=tag(dtype))


def _gpu_bandwidth(dev: torch.device, nbytes: int, reps: int) -> float:
    """Bytes/s: the faster of a sum (bytes read) and a device-to-device copy (read + written)."""
    buf = torch.randn(nbytes // 4, device=dev)         # random, not zeros: see the device's METHOD.md
    dst = torch.empty(nbytes // 8, device=dev)
    src = buf[: nbytes // 8]
    read = max(nbytes / _time_cuda(lambda: buf.sum()) for _ in range(reps))
    copy = max(2 * (nbytes // 2) / _time_cuda(lambda: dst.copy_(src)) for _ in range(reps))
    return max(read, copy)


def _gpu_gemm_rate(dev: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return max(2.0 * n ** 3 / _time_cuda(lambda: torch.mm(a, b)) for _ in range(reps))


def _time_cuda(fn, inner: int = 5) -> float:
    """Seconds per call: ``inner`` back-to-back calls between two CUDA events, after one warm-up."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / inner


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class Work:
    """What one case must do at least: bytes read from memory and floating-point operations."""

    bytes: float
    flops: float

    def __add__(self, other: Work) -> Work:
        return Work(self.bytes + other.bytes, self.flops + other.flops)

    def scaled(self, s: float) -> Work:
        return Work(self.bytes * s, self.flops * s)


def floor_s(work: Work, limits: Limits) -> dict:
    """``{"memory_s", "compute_s", "floor_s", "bound"}`` for a case's work on this machine."""
    mem = work.bytes / (limits.bandwidth_gbs * 1e9)
    comp = work.flops / (limits.gemm_gflops * 1e9)
    return {"memory_s": mem, "compute_s": comp, "floor_s": max(mem, comp),
            "bound": "memory" if mem >= comp else "compute"}


# ---- work of the DeepSeek blocks (S = bytes per weight element) -----------------------------

def moe_layer_work(config: DeepseekConfig, T: int, hit_experts: int, *, itemsize: int = 4,
                   weight_bytes: float | None = None) -> Work:
    """One MoE layer on T tokens whose router hit ``hit_experts`` distinct experts.

    bytes: router [E,H] + hit experts · 3·H·I + shared 3·H·I_s (+ x and y, T·H each);
    flops: 2·T·(E·H + K·3·H·I + 3·H·I_s) (router, routed and shared GEMMs; element-wise ops ignored).
    ``weight_bytes``: bytes per element of the (quantized) expert weights, scales included;
    the router stays at ``itemsize``.
    """
    H, E, I, K = config.hidden_size, config.n_routed_experts, config.moe_intermediate_size, config.num_experts_per_tok
    Is = config.shared_intermediate_size
    wb = itemsize if weight_bytes is None else weight_bytes
    nbytes = (E * H + 2 * T * H) * itemsize + (hit_experts * 3 * H * I + 3 * H * Is) * wb
    return Work(bytes=float(nbytes), flops=float(2 * T * (E * H + K * 3 * H * I + 3 * H * Is)))


def attention_work(config: DeepseekConfig, S: int, past: int, *, itemsize: int = 4,
                   weight_bytes: float | None = None) -> Work:
    """q/k/v/o projections for S tokens plus scores and weighted sum over past+S keys, as executed
    (the full S×(past+S) score matrix); reads the projections and the past K/V cache."""
    H, d = config.hidden_size, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    proj = H * nh * d * 2 + H * nkv * d * 2
    L = past + S
    wb = itemsize if weight_bytes is None else weight_bytes
    return Work(bytes=float(proj * wb + 2 * nkv * d * past * itemsize),
                flops=float(2 * S * proj + 4 * nh * d * S * L))


def mla_attention_work(config: DeepseekConfig, S: int, past: int, *, itemsize: int = 4,
                       weight_bytes: float | None = None) -> Work:
    """MLA attention at least: its weights and the latent cache read once; the projections for S
    tokens plus the absorbed form's scores and weighted sum over past+S latents
    (``2·nh·S·L·(2R + d_rope)``, the fewer FLOPs of the two forms for decode)."""
    params = mla_attention_params(config)
    L, R = past + S, config.kv_lora_rank
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    wb = itemsize if weight_bytes is None else weight_bytes
    return Work(bytes=float(params * wb + past * latent * itemsize),
                flops=float(2 * S * params + 2 * config.num_attention_heads * S * L * (2 * R + config.qk_rope_head_dim)))


def dense_mlp_work(config: DeepseekConfig, S: int, *, itemsize: int = 4, weight_bytes: float | None = None) -> Work:
    w = 3 * config.hidden_size * config.intermediate_size
    return Work(bytes=float(w * (itemsize if weight_bytes is None else weight_bytes)), flops=float(2 * S * w))


def model_step_work(config: DeepseekConfig, S: int, past: int, hits: list[int], *, itemsize: int = 4,
                    weight_bytes: float | None = None) -> Work:
    """One decoder step of S tokens after ``past`` cached ones; ``hits[j]`` is the number of
    distinct experts the router of the j-th MoE layer hit. Embedding rows read: S·H; lm_head read
    whole; norms ignored. ``weight_bytes``: bytes per element of every linear's weight (a
    quantized model: codes + scales), the router, embeddings and KV cache staying at ``itemsize``."""
    H, V = config.hidden_size, config.vocab_size
    kw = dict(itemsize=itemsize, weight_bytes=weight_bytes)
    w = Work(bytes=float(S * H * itemsize), flops=0.0)
    moe = iter(hits)
    for i in range(config.num_hidden_layers):
        attn = mla_attention_work if config.is_mla else attention_work
        w = w + attn(config, S, past, **kw)
        if config.is_moe_layer(i):
            w = w + moe_layer_work(config, S, next(moe), **kw)
        else:
            w = w + dense_mlp_work(config, S, **kw)
    return w + Work(bytes=float(H * V * (itemsize if weight_bytes is None else weight_bytes)), flops=float(2 * S * H * V))
