"""dsmoe.quant: block quantization by hand, packing, the reference matmul, the GGML formats, and the
quantized reference model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dsmoe
from dsmoe.errors import DsmoeError
from dsmoe.quant import (ggml_dequantize, ggml_quantize, pack, parse_scheme, qlinear, quantize,
                         quantize_activations, unpack)
from dsmoe.quantized import QuantLinear, linears_in_scope, quantized_dims, quantized_reference


def test_symmetric_int4_by_hand():
    # one block of 4: max|w| = 0.7 → s = 0.1; codes round(w/s) + 8
    w = torch.tensor([[0.7, -0.35, 0.04, -0.7]])
    qt = quantize(w, 4, 4)
    assert torch.allclose(qt.scales, torch.tensor([[0.1]]))
    assert qt.codes.tolist() == [[15, 4, 8, 1]]  # 7, -3.5 → -4 (half to even), 0.4 → 0, -7
    assert qt.zero_points is None and qt.zero_point_values().tolist() == [[8]]
    assert torch.allclose(qt.dequantize(), torch.tensor([[0.7, -0.4, 0.0, -0.7]]))


def test_asymmetric_int4_by_hand():
    # min 0 (w ≥ 0 → min clamped to 0), max 1.5 → s = 0.1, z = 0
    w = torch.tensor([[1.5, 0.0, 0.25, 0.75]])
    qt = quantize(w, 4, 4, symmetric=False)
    assert torch.allclose(qt.scales, torch.tensor([[0.1]])) and qt.zero_points.tolist() == [[0]]
    assert qt.codes.tolist() == [[15, 0, 2, 8]]  # 2.5 → 2, 7.5 → 8 (half to even)
    # a negative range: min −1.5, max 0 → s 0.1, z 15
    qt = quantize(-w, 4, 4, symmetric=False)
    assert qt.zero_points.tolist() == [[15]] and qt.codes.tolist() == [[0, 15, 13, 7]]
    assert torch.allclose(qt.dequantize(), torch.tensor([[-1.5, 0.0, -0.2, -0.8]]))


def test_zero_blocks_and_int8():
    w = torch.zeros(2, 8)
    w[1, 4:] = torch.tensor([1.27, -1.27, 0.5, 0.0])
    qt = quantize(w, 8, 4)
    assert qt.scales[0].tolist() == [0.0, 0.0] and qt.codes[0].tolist() == [128] * 8
    assert qt.codes[1, 4:].tolist() == [255, 1, 178, 128]
    assert torch.equal(qt.dequantize()[0], torch.zeros(8))


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    qt = quantize(w, bits, 32, symmetric=symmetric)
    err = (qt.dequantize() - w).abs().reshape(16, 4, 32)
    assert bool((err <= qt.scales.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-7).all())
    assert int(qt.codes.max()) < 2**bits and qt.nbytes == 16 * 128 * bits // 8 + 16 * 4 * 4 + (0 if symmetric else 16 * 4 * bits // 8)


def test_rows_quantize_alike_together_or_apart():
    """Stacking experts or fusing gate|up never changes a row's codes (the exporter quantizes the
    stacked weights, the reference each linear)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 64, generator=g), torch.randn(10, 64, generator=g)
    both = quantize(torch.cat([a, b]), 4, 32, symmetric=False)
    qa = quantize(a, 4, 32, symmetric=False)
    assert torch.equal(both.codes[:6], qa.codes) and torch.equal(both.scales[:6], qa.scales)
    assert torch.equal(quantize(torch.stack([a, a]), 4, 32).codes[1], quantize(a, 4, 32).codes)


def test_pack_low_nibble_first_and_unpack():
    codes = torch.tensor([[1, 2, 3, 4, 15]], dtype=torch.uint8)
    packed = pack(codes, 4)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(unpack(packed, 4, 5), codes)
    assert torch.equal(pack(codes, 8), codes)


def test_activation_quantization_and_qlinear():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0, 2.0, 2.0, -1.0, 0.5]])
    q, s = quantize_activations(x, 4)
    assert q.tolist() == [[[127, -64, 32, 0], [127, 127, -64, 32]]]  # −63.5 → −64 (half to even)
    assert torch.allclose(s, torch.tensor([[1 / 127, 2 / 127]]))
    w = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    qt = quantize(w, 8, 4)
    # by hand: Σ_blocks (codes_x · (q − z)) · s_x · s_w
    want = sum((q[0, b] @ qt.integer_weights()[:, b].T) * s[0, b] * qt.scales[:, b] for b in range(2))
    assert torch.allclose(qlinear(x, qt, act_quant=True)[0], want, rtol=1e-6, atol=1e-7)
    assert torch.allclose(qlinear(x, qt), x @ qt.dequantize().T)


def test_parse_scheme_refuses_and_defaults():
    dims = {"hidden_size": 64, "moe_intermediate_size": 32}
    auto = parse_scheme("int4", dims=dims)
    assert auto.block_size is None and auto.as_dict()["block_size"] == "auto"
    assert (auto.block_for(64), auto.block_for(32), auto.block_for(10944), auto.block_for(2048, 1408)) == (64, 32, 64, 128)
    assert auto.block_for(64, 32) == 32  # a QMoE node: one block size for fc1 and fc2
    assert parse_scheme("INT8", block_size=32, dims=dims).block_for(64) == 32
    with pytest.raises(DsmoeError, match="no block size of 32, 64, 128 divides intermediate_size 48"):
        parse_scheme("int4", dims={"intermediate_size": 48})
    for bad, msg in [(dict(quant="int3"), "unsupported --quant"), (dict(quant="int4", block_size=48), "unsupported --block-size"),
                     (dict(quant="int4", block_size=64), "does not divide moe_intermediate_size 32"),
                     (dict(quant="int4", scope="attention"), "unsupported --quant-scope")]:
        with pytest.raises(DsmoeError, match=msg):
            parse_scheme(dims=dims, **bad)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_ggml_blocks_are_ggmls_byte_for_byte(qtype):
    """Against the gguf package's reference implementation (ggml-quants.c, bit-exact)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize as gq

    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    w[0, :32] = 0
    w[1, 7] = -1.0
    w[2, :32] = 0.5  # ties for the largest magnitude
    t = getattr(gguf.GGMLQuantizationType, qtype)
    ref = gq(w.numpy(), t)
    assert np.array_equal(ggml_quantize(w, qtype).numpy(), ref)
    assert np.array_equal(ggml_dequantize(torch.from_numpy(ref), qtype, 128).numpy(), dequantize(ref, t))


def test_quantized_reference_swaps_the_scoped_linears_only():
    model = dsmoe.load("preset:tiny")
    ref = quantized_reference(model, parse_scheme("int4", block_size=32))
    assert isinstance(ref.model.layers[1].mlp.experts[0].gate_proj, QuantLinear)
    assert isinstance(ref.lm_head, QuantLinear) and isinstance(ref.model.layers[0].self_attn.q_proj, QuantLinear)
    assert ref.model.layers[1].mlp.gate.weight is model.model.layers[1].mlp.gate.weight  # router: shared, fp32
    assert isinstance(model.lm_head, torch.nn.Linear)  # the original is untouched
    experts_only = quantized_reference(model, parse_scheme("int4", block_size=32, scope="experts"))
    assert isinstance(experts_only.lm_head, torch.nn.Linear)
    assert isinstance(experts_only.model.layers[0].mlp.down_proj, QuantLinear)
    assert len(linears_in_scope(model, "experts")) == 3 + 2 * (8 * 3 + 3)
    assert quantized_dims(model.config, "all") == {"hidden_size": 64, "moe_intermediate_size": 32,
                                                   "shared experts' width": 64, "intermediate_size": 160,
                                                   "attention width (num_attention_heads × head_dim)": 64}
    ids = torch.tensor([[1, 5, 9, 17]])
    with torch.no_grad():
        a, b = model(ids), ref(ids)
    assert 0 < (a - b).abs().max() < 0.5 * a.abs().max()
