"""End to end: fused IR → per-target lowering → ONNX → ONNX Runtime equals eager.

One capture per routing variant (module-scoped), one ONNX export per (variant, target). The ORT
sessions run with ORT's graph optimizations off, so the comparison is of our graph's numerics.
fp32 tolerance: 1e-4 relative (max |ort - eager| / max |eager|); fp16: 1e-2 (both sides round
every op to fp16, in different orders).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from conftest import ROUTING_VARIANTS

import dsmoe
from dsmoe.app.generate import eager_step, generate_ort, greedy_generate, greedy_generate_batch
from dsmoe.cache import cache_layout
from dsmoe.dtypes import VERIFY_RTOL
from dsmoe.errors import DsmoeError
from dsmoe.export import LoweringError, OrtDecoder, export_model, lower
from dsmoe.export.onnx_writer import to_onnx
from dsmoe.export.kv_inplace import attention_gqa_inplace
from dsmoe.export.runner import attention_kv_bnsh, cores_free, polygraphy_command
from dsmoe.ir import capture, sample_inputs
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import run_pipeline

# the lowering paths: softmax greedy inside com.microsoft.MoE (plain, normalized), masked logits
# (group-limited, sigmoid + bias); the others share these paths (see lower.py)
VARIANTS = ["v1-softmax-greedy", "v1-norm", "v2-group-limited", "v3-noaux-tc"]
PROMPT = [1, 5, 9, 17, 33]


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    return (ref.float() - got.float()).abs().max().item() / ref.float().abs().max().item()


# ---- fixtures: the greedy (default) tiny model through the public API --------------------------

@pytest.fixture(scope="module")
def tiny():
    return dsmoe.load("preset:tiny")


@pytest.fixture(scope="module", params=["ort", "portable"])
def exported(request, tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("exp") / request.param
    stages = []
    report = export_model("preset:tiny", out=str(out), target=request.param, verify=True, progress=stages.append)
    return out, report, stages


def test_export_dir_and_report(exported):
    out, report, stages = exported
    assert stages == ["load", "capture", "passes", "lower", "write", "verify"]
    assert sorted(p.name for p in out.iterdir()) == [".dsmoe-output.json", "config.json", "export_report.json",
                                                     "genai_config.json", "model.onnx"]  # the marker: what --force may replace
    on_disk = json.loads((out / "export_report.json").read_text())
    assert on_disk["target"] == report["target"] and on_disk["dtype"] == "fp32"
    assert set(on_disk["versions"]) >= {"torch", "onnx", "onnxruntime"}
    assert on_disk["verification"]["passed"] and on_disk["verification"]["rel_err"] <= 1e-4
    assert [p["name"] for p in on_disk["passes"]][:3] == ["fuse_router", "outline_moe", "fuse_gated_mlp"]
    assert sum(on_disk["onnx_ops"].values()) == on_disk["onnx_nodes"]
    assert dsmoe.load_config(out).to_dict() == dsmoe.load_config("preset:tiny").to_dict()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # the temporary dir was renamed away


def test_onnx_io_checker_and_domains(exported, tiny):
    out, report, _ = exported
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    c = tiny.config
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset[""] >= 20
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    assert ins[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins[3:] == [f"past_key_values.{i}.{k}" for i in range(c.num_hidden_layers) for k in ("key", "value")]
    assert outs == ["logits"] + [f"present.{i}.{k}" for i in range(c.num_hidden_layers) for k in ("key", "value")]
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(model.graph.input[3]) == ["batch", c.num_key_value_heads, "past_sequence", c.head_dim]
    assert dims(model.graph.output[0]) == ["batch", "sequence", c.vocab_size]
    assert dims(model.graph.output[1]) == ["batch", c.num_key_value_heads, "total_sequence", c.head_dim]
    ops = report["onnx_ops"]
    domains = {n.domain for n in model.graph.node} - {""}
    moe_layers = len(c.moe_layers)
    if report["target"] == "portable":
        assert domains == set()
    else:
        assert domains == {"com.microsoft"}
        assert ops["com.microsoft::MoE"] == moe_layers
        # No per-expert MatMul: attention 4 per layer (q, k, v, o; QK and PV are inside the fused
        # com.microsoft::MultiHeadAttention), dense MLP 2, MoE layers router 1 + shared experts 2,
        # lm_head 1 — independent of n_routed_experts.
        L, dense = c.num_hidden_layers, c.num_hidden_layers - moe_layers
        assert report["ort_fusions"].get("sdpa_via_mha") == L
        assert ops["com.microsoft::MultiHeadAttention"] == L
        assert ops.get("MatMul", 0) + ops.get("Gemm", 0) == 4 * L + 2 * dense + 3 * moe_layers + 1


@pytest.mark.parametrize("batch,seq,past", [(1, 1, 0), (3, 1, 0), (1, 17, 0), (3, 17, 0), (1, 1, 9), (3, 17, 4)])
def test_dynamic_shapes_match_eager(exported, tiny, batch, seq, past):
    out, _, _ = exported
    dec = _decoder(out)
    ids, mask, pos, cache = sample_inputs(tiny.config, batch=batch, seq=seq, past=past, seed=batch * 100 + seq + past)
    with torch.no_grad():
        ref, ref_present = tiny(ids, mask, pos, cache, use_cache=True)
    got, present = dec(ids, mask, pos, cache)
    assert got.shape == (batch, seq, tiny.config.vocab_size)
    assert rel_err(ref, got) <= 1e-4
    for (rk, rv), (k, v) in zip(ref_present, present):
        assert k.shape == (batch, tiny.config.num_key_value_heads, past + seq, tiny.config.head_dim)
        assert rel_err(rk, k) <= 1e-4 and rel_err(rv, v) <= 1e-4


def test_generate_ort_equals_eager(exported, tiny):
    out, _, _ = exported
    want = greedy_generate(eager_step(tiny), tiny.config, PROMPT, 12)
    assert generate_ort(out, PROMPT, 12) == want


def test_keys_values_in_place_match_eager(exported, tiny):
    """``kv_inplace``: every layer's Concat + MultiHeadAttention rewritten to one GroupQueryAttention
    writing into bound buffers; the same numbers as the eager model over chained steps — a
    left-padded prefill, decode steps, a multi-token step of a batch (run token by token) — and a
    copied-in history that is not the decoder's own. The portable export (no com.microsoft
    attention) is refused when asked for, and runs the copying path under ``"auto"``."""
    out, _, _ = exported
    if out.name == "portable":
        with pytest.raises(DsmoeError, match=r"cannot be written in place: .*MultiHeadAttention"):
            OrtDecoder(out, kv_inplace=True)
        assert not OrtDecoder(out, kv_inplace="auto").kv_inplace
        return
    dec, c = OrtDecoder(out, kv_inplace=True), tiny.config
    assert dec.kv_inplace and dec.present_views
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert attention_kv_bnsh(m) == c.num_hidden_layers
    assert attention_gqa_inplace(m, c.num_key_value_heads) == c.num_hidden_layers
    assert not any(n.op_type in ("MultiHeadAttention", "Concat") and any(i.startswith("past_key_values") for i in n.input)
                   for n in m.graph.node)
    g = torch.Generator().manual_seed(5)
    B, mask = 3, torch.ones(3, 6, dtype=torch.int64)
    mask[1, :2] = mask[2, :5] = 0  # left padding: rows of 6, 4 and 1 tokens
    past_ref = past = cache_layout(c).empty(B)
    for S in (6, 1, 4, 1, 2):
        ids = torch.randint(0, c.vocab_size, (B, S), generator=g)
        if S != 6:
            mask = torch.cat([mask, torch.ones(B, S, dtype=torch.int64)], 1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)[:, -S:]
        with torch.no_grad():
            ref, past_ref = tiny(ids, mask, pos, past_ref, use_cache=True)
        got, past = dec(ids, mask, pos, past)
        keep = mask[:, -S:].bool()  # padded positions attend to nothing: their values are the kernels' own
        assert rel_err(ref[keep], got[keep]) <= 1e-4, S
        slots = mask[:, None, :, None]
        for (rk, rv), (k, v) in zip(past_ref, past):
            assert k.shape == rk.shape and rel_err(rk * slots, k * slots) <= 1e-4 and rel_err(rv * slots, v * slots) <= 1e-4
    # a history the decoder did not return last is copied into its buffers first
    ids = torch.randint(0, c.vocab_size, (B, 1), generator=g)
    mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.int64)], 1)
    pos = mask.sum(1, keepdim=True) - 1
    with torch.no_grad():
        ref, _ = tiny(ids, mask, pos, past_ref, use_cache=True)
    got, _ = dec(ids, mask, pos, [tuple(t.clone() for t in layer) for layer in past_ref])
    assert rel_err(ref, got) <= 1e-4
    # one row, a prompt in chunks (the server's chunked prefill): several new tokens after a past
    past_ref = past = cache_layout(c).empty(1)
    for lo, hi in ((0, 3), (3, 7), (7, 8)):
        ids, mask, pos = torch.tensor([PROMPT + PROMPT[:3]])[:, lo:hi], torch.ones(1, hi, dtype=torch.int64), torch.arange(lo, hi)[None]
        with torch.no_grad():
            ref, past_ref = tiny(ids, mask, pos, past_ref, use_cache=True)
        got, past = dec(ids, mask, pos, past)
        assert rel_err(ref, got) <= 1e-4, (lo, hi)


def test_threads_spin_only_when_the_cores_are_free(exported):
    """``cores_free``: with a busy process on every core there is no core to spare (so ``spinning=
    "auto"`` sleeps); an unknown spinning value is one error."""
    out, _, _ = exported
    if out.name == "portable":
        pytest.skip("one export is enough")
    n = os.cpu_count() or 1
    busy = [subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
            for _ in range(n)]
    try:
        time.sleep(0.5)
        assert not cores_free(n)
        assert OrtDecoder(out, spinning="auto").spinning is False
    finally:
        for b in busy:
            b.kill()
            b.wait()
    with pytest.raises(DsmoeError, match="spinning must be True, False or 'auto'"):
        OrtDecoder(out, spinning="yes")


def test_batched_generation_in_place_equals_copying(exported, tiny):
    """The engine (prompts prefilled alone, then decoded together in right-aligned slots) over a
    decoder whose present is a view of its buffers: the same tokens as the copying decoder — the
    engine clones what it keeps (``present_views``), so one prompt's prefill cannot overwrite
    another's cache."""
    out, _, _ = exported
    if out.name == "portable":
        pytest.skip("no in-place path for the portable target (see above)")
    prompts = [PROMPT, [3, 8], [40, 2, 11, 6, 9, 13, 21]]
    want = greedy_generate_batch(OrtDecoder(out), tiny.config, prompts, 8)
    assert greedy_generate_batch(OrtDecoder(out, kv_inplace=True), tiny.config, prompts, 8) == want
    assert want == [greedy_generate(eager_step(tiny), tiny.config, p, 8) for p in prompts]


def test_polygraphy_runs_the_export(exported):
    out, _, _ = exported
    exe = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    cmd = polygraphy_command(out, batch=2, seq=5)
    proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASSED" in proc.stdout + proc.stderr


# ---- every routing variant, both targets --------------------------------------------------------

@pytest.fixture(scope="module")
def fused_variants():
    """variant → (eager model, fused graph); captured once, deep-copied per target."""
    cache: dict[str, tuple] = {}

    def get(name):
        if name not in cache:
            model = dsmoe.load("preset:tiny", overrides=ROUTING_VARIANTS[name])
            gm, _ = run_pipeline(capture(model), PassContext())
            cache[name] = (model, gm)
        return cache[name]

    return get


def _variant_params():
    for name in VARIANTS:
        for target in ("ort", "portable"):
            if name == "v1-softmax-greedy":
                continue  # covered through export_model above
            marks = [pytest.mark.slow]  # export + ORT per variant: make test, not test-fast
            yield pytest.param(name, target, marks=marks, id=f"{name}-{target}")


@pytest.mark.parametrize("variant,target", list(_variant_params()))
def test_routing_variant_matches_eager(fused_variants, tmp_path, variant, target):
    model, fused = fused_variants(variant)
    gm = copy.deepcopy(fused)
    report = lower(gm, target=target)
    how = next(iter(report.lowered["dsmoe::moe"]))
    if target == "ort":
        direct = model.config.scoring_func == "softmax" and model.config.topk_method == "greedy"
        assert ("router logits" in how) == direct
    _write(gm, model, tmp_path)
    dec = _decoder(tmp_path)
    for batch, seq, past in [(2, 7, 0), (3, 1, 6)]:
        args = sample_inputs(model.config, batch=batch, seq=seq, past=past, seed=seq)
        with torch.no_grad():
            ref, _ = model(*args, use_cache=True)
        assert rel_err(ref, dec(*args)[0]) <= 1e-4
    want = greedy_generate(eager_step(model), model.config, PROMPT, 8)
    assert greedy_generate(dec, model.config, PROMPT, 8) == want
    domains = {n.domain for n in onnx.load(str(tmp_path / "model.onnx")).graph.node} - {""}
    assert domains == (set() if target == "portable" else {"com.microsoft"})


@pytest.mark.slow
def test_folded_shared_experts_lower_to_one_moe(tmp_path):
    model = dsmoe.load("preset:tiny")
    gm, _ = run_pipeline(capture(model), PassContext(fold_shared_experts=True))
    report = lower(gm, target="ort")
    assert report.lowered["dsmoe::moe"] == {"com.microsoft.MoE (masked logits, rescaled)": 2}
    _write(gm, model, tmp_path)
    args = sample_inputs(model.config, batch=2, seq=5, past=3, seed=3)
    with torch.no_grad():
        ref, _ = model(*args, use_cache=True)
    assert rel_err(ref, _decoder(tmp_path)(*args)[0]) <= 1e-4


# ---- fp16 ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("target", ["ort", "portable"])
def test_fp16_export_matches_eager(tmp_path, target):
    out = tmp_path / "fp16"
    report = export_model("preset:tiny", out=str(out), target=target, dtype="fp16", verify=True)
    v = report["verification"]
    assert report["dtype"] == "fp16" and v["passed"] and v["rel_err"] <= VERIFY_RTOL[torch.float16]
    dec = OrtDecoder(out)
    assert dec.dtype == torch.float16
    model16 = dsmoe.load("preset:tiny", dtype="float16")
    assert generate_ort(out, PROMPT, 6) == greedy_generate(eager_step(model16), model16.config, PROMPT, 6,
                                                           dtype=torch.float16)


# ---- refusals and unsupported nodes (fast: nothing is exported) ---------------------------------

def test_existing_output_is_refused_unless_force(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(DsmoeError, match="already exists"):
        export_model("preset:tiny", out=str(out))
    assert (out / "keep").exists()


@pytest.mark.parametrize("kwargs,match", [(dict(target="tensorrt-nope"), "unsupported target"),
                                          (dict(dtype="int8"), "unsupported dtype"),
                                          (dict(dtype="bf16"), "unsupported dtype")])
def test_unsupported_target_or_dtype(tmp_path, kwargs, match):
    out = tmp_path / "o"
    with pytest.raises(DsmoeError, match=match):
        export_model("preset:tiny", out=str(out), **kwargs)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unlowerable_node_is_reported(fused_variants):
    _, fused = fused_variants("v3-noaux-tc")
    gm = copy.deepcopy(fused)
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.dsmoe.moe.default)
    node.args = (*node.args[:5], "gelu")
    for target in ("ort", "portable"):
        with pytest.raises(LoweringError, match=r"activation 'gelu' has no lowering"):
            lower(copy.deepcopy(gm), target=target)


def test_missing_export_dir_is_a_user_error(tmp_path):
    with pytest.raises(DsmoeError, match=r"no model\.onnx"):
        OrtDecoder(tmp_path)


# ---- helpers ---------------------------------------------------------------------------------

def _write(gm, model, out: Path) -> None:
    to_onnx(gm, out / "model.onnx", config=model.config, dtype=torch.float32)
    (out / "config.json").write_text(model.config.to_json_string())


def _decoder(out: Path) -> OrtDecoder:
    return OrtDecoder(out, optimize=False)
