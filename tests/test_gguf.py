"""The llama.cpp baseline's GGUF: llama.cpp's names and keys, the same weights (quantized by ggml's
own rules), and — where llama.cpp is built — llama-bench runs it."""

from __future__ import annotations

import pytest
import torch

import dsmoe
from dsmoe.bench.gguf_export import _permute, check_supported, write_gguf
from dsmoe.bench.llama_cpp import find_llama_bench, run_llama_bench
from dsmoe.errors import DsmoeError
from dsmoe.quant import ggml_dequantize, ggml_quantize

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module", params=["Q8_0", "Q4_0"])
def written(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    info = write_gguf("preset:tiny", path, qtype=request.param)
    return request.param, path, info, gguf.GGUFReader(str(path))


def test_keys_and_names_are_llama_cpps(written):
    qtype, _, info, r = written
    cfg = dsmoe.load_config("preset:tiny")
    f = {k: v for k, v in r.fields.items()}
    assert bytes(f["general.architecture"].parts[-1]).decode() == "deepseek"
    scalar = lambda k: f[k].parts[-1][0]  # noqa: E731
    assert scalar("deepseek.block_count") == cfg.num_hidden_layers
    assert scalar("deepseek.expert_count") == 8 and scalar("deepseek.expert_used_count") == 2
    assert scalar("deepseek.leading_dense_block_count") == 1 and scalar("deepseek.expert_shared_count") == 2
    assert scalar("deepseek.expert_feed_forward_length") == 32 and scalar("deepseek.vocab_size") == 256
    assert bytes(f["tokenizer.ggml.model"].parts[-1]).decode() == "none"
    t = {x.name: x for x in r.tensors}
    assert info["tensors"] == len(t) == 1 + 2 + 9 + 2 * 13  # embd, norm+output, dense layer, 2 MoE layers
    assert t["token_embd.weight"].tensor_type.name == "F32" and t["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert t["blk.1.ffn_gate_exps.weight"].tensor_type.name == qtype and t["output.weight"].tensor_type.name == qtype
    assert [int(d) for d in t["blk.1.ffn_down_exps.weight"].shape] == [32, 64, 8]  # ggml order: K, N, E


def test_weights_are_the_models(written):
    qtype, _, _, r = written
    model = dsmoe.load("preset:tiny")
    t = {x.name: x for x in r.tensors}
    e = model.model.layers[2].mlp.experts
    want = torch.stack([x.down_proj.weight for x in e])
    raw = torch.from_numpy(t["blk.2.ffn_down_exps.weight"].data.copy())
    assert torch.equal(raw.reshape(-1), ggml_quantize(want, qtype).reshape(-1))
    got = ggml_dequantize(raw, qtype, 32).reshape(want.shape)
    assert (got - want).abs().max() < want.abs().max() * (0.02 if qtype == "Q8_0" else 0.2)
    q = model.model.layers[0].self_attn.q_proj.weight
    stored = ggml_dequantize(torch.from_numpy(t["blk.0.attn_q.weight"].data.copy()), qtype, 64).reshape(64, 64)
    assert torch.equal(stored, ggml_dequantize(ggml_quantize(_permute(q, 4), qtype), qtype, 64))
    norm = torch.from_numpy(t["output_norm.weight"].data.copy())
    assert torch.equal(norm, model.model.norm.weight)


def test_permute_pairs_rotate_half_rows():
    """Head rows [x0..x7] in rotate-half order become ggml's adjacent pairs [x0 x4 x1 x5 …]."""
    w = torch.arange(8.0).reshape(8, 1)
    assert _permute(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("over,msg", [({"norm_topk_prob": True}, "V1"), ({"topk_method": "noaux_tc",
                                      "scoring_func": "sigmoid", "n_group": 2, "topk_group": 1}, "V1"),
                                      ({"moe_layer_freq": 2}, "moe_layer_freq"), ({"tie_word_embeddings": True}, "untied")])
def test_what_llama_cpps_deepseek_cannot_compute_is_refused(over, msg):
    with pytest.raises(DsmoeError, match=msg):
        check_supported(dsmoe.load_config("preset:tiny", over))


@pytest.mark.skipif(find_llama_bench()[0] is None, reason="llama.cpp's llama-bench is not built here")
def test_llama_bench_runs_the_gguf(written):
    _, path, _, _ = written
    run = run_llama_bench(path, threads=1, gen=4, depth=8, reps=1)
    assert run.tokens == 4 and run.mean_s > 0 and run.tokens_per_s > 0
