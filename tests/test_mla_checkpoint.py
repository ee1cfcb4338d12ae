"""DeepSeek-V3 checkpoints as DeepSeek publishes them: multi-token-prediction layers left out
with a note, fp8 e4m3 weights with block scales dequantized exactly, and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

import dsmoe
from dsmoe.checkpoint import save_checkpoint
from dsmoe.errors import CheckpointError

V3 = {"model_type": "deepseek_v3", "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 2, "topk_group": 1,
      "norm_topk_prob": True, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1}
BLOCK = [16, 16]  # small blocks: several per tiny weight, with partial last blocks (40 = 16 + 16 + 8 rows)
IDS = torch.tensor([[1, 7, 3, 250, 9, 11]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = dsmoe.load("preset:mla-tiny", overrides=V3)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("v3") / "ck")


def _write(dst, sd, config: dict):
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def _mtp_tensors(layer: int, H: int = 64) -> dict[str, torch.Tensor]:
    """The extra module of a V3 MTP layer as DeepSeek stores it (a subset of its keys)."""
    p = f"model.layers.{layer}"
    return {f"{p}.enorm.weight": torch.ones(H), f"{p}.hnorm.weight": torch.ones(H), f"{p}.eh_proj.weight": torch.zeros(H, 2 * H),
            f"{p}.self_attn.kv_a_proj_with_mqa.weight": torch.zeros(40, H), f"{p}.mlp.experts.0.up_proj.weight": torch.zeros(32, H),
            f"{p}.shared_head.head.weight": torch.zeros(256, H)}


def test_mtp_layer_is_left_out_with_a_note(saved, tmp_path, capsys):
    model, ck = saved
    sd = load_file(str(ck / "model.safetensors")) | _mtp_tensors(3)
    src = _write(tmp_path / "mtp", sd, json.loads((ck / "config.json").read_text()))
    loaded = dsmoe.load(src)
    assert loaded.load_notes == ["left out 1 multi-token-prediction layer(s) (model.layers.3): not used for inference"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=0)
    code, out, err = run_cli(capsys, "generate", src, "--prompt-ids", "1 2", "--max-new-tokens", "2")
    assert code == 0 and "note: left out 1 multi-token-prediction layer(s) (model.layers.3)" in err
    code, out, _ = run_cli(capsys, "info", src)
    assert code == 0 and "multi-token-prediction" in out and "model.layers.3" in out


@pytest.mark.parametrize("mtp, layer", [(0, 3), (1, 4)])
def test_layers_past_the_mtp_ones_are_unexpected(saved, tmp_path, mtp, layer):
    _, ck = saved
    cfg = json.loads((ck / "config.json").read_text()) | {"num_nextn_predict_layers": mtp}
    src = _write(tmp_path / "extra", load_file(str(ck / "model.safetensors")) | _mtp_tensors(layer), cfg)
    with pytest.raises(CheckpointError, match=rf"unexpected key model\.layers\.{layer}\."):
        dsmoe.load(src)


def _quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block amax/448 scales and the e4m3 weight (what DeepSeek's conversion stores)."""
    bn, bk = block
    N, K = w.shape
    s = torch.empty((N + bn - 1) // bn, (K + bk - 1) // bk)
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def _quantized_checkpoint(saved, dst):
    """Every linear weight of attention and experts in fp8; norms, router, embeddings and lm_head not."""
    _, ck = saved
    sd, want, n = load_file(str(ck / "model.safetensors")), {}, 0
    for key in list(sd):
        if key.endswith("proj.weight") or key.endswith("proj_with_mqa.weight"):
            q, s = _quantize(sd[key], BLOCK)
            sd[key], sd[key + "_scale_inv"] = q, s
            # the expected value, block by block in plain loops: q · s
            w = torch.empty(q.shape)
            for i in range(q.shape[0]):
                for j in range(q.shape[1]):
                    w[i, j] = q[i, j].float() * s[i // BLOCK[0], j // BLOCK[1]]
            want[key] = w
            n += 1
    cfg = json.loads((ck / "config.json").read_text()) | {"quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": BLOCK}}
    return _write(dst, sd, cfg), want, n


def test_fp8_weights_load_to_their_dequantized_values_exactly(saved, tmp_path):
    src, want, n = _quantized_checkpoint(saved, tmp_path / "fp8")
    assert n == 3 * 5 + 3 + 2 * 9 * 3  # 5 attention linears per layer; the dense MLP; 8 experts + shared per MoE layer
    model = dsmoe.load(src, dtype="float32")
    params = dict(model.named_parameters())
    for key, w in want.items():
        assert params[key].dtype == torch.float32 and torch.equal(params[key], w), key
    assert model.load_notes == [f"dequantized {n} fp8 weights (16×16 block scales) to float32"]
    assert dsmoe.load(src).lm_head.weight.dtype == torch.float32  # torch_dtype of the config
    bf16 = dsmoe.load(src, dtype="bfloat16")
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    assert torch.equal(dict(bf16.named_parameters())[key], want[key].to(torch.bfloat16))


def test_fp8_errors(saved, tmp_path):
    src, _, _ = _quantized_checkpoint(saved, tmp_path / "fp8")
    sd = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    cases = [
        ({k: v for k, v in sd.items() if k != key + "_scale_inv"}, cfg, f"fp8 tensor {key} has no {key}_scale_inv"),
        (sd | {key + "_scale_inv": torch.ones(1, 1)}, cfg, rf"wrong shape for {key}_scale_inv: expected \[8, 2\]"),
        (sd, {k: v for k, v in cfg.items() if k != "quantization_config"}, "has no quantization_config"),
        (sd | {"model.norm.weight_scale_inv": torch.ones(1, 1)}, cfg, "which is not an fp8 tensor"),
    ]
    for i, (bad_sd, bad_cfg, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            dsmoe.load(_write(tmp_path / f"bad{i}", bad_sd, bad_cfg))
