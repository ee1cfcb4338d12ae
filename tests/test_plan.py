"""``dsmoe plan``: its counts and formulas against hand-computed values, and its errors."""

from __future__ import annotations

import json

import pytest

from dsmoe.app.plan import kv_bytes_per_token, plan
from dsmoe.app.plan_model import a2a_bytes_per_token, a2a_seconds, a2a_step_bytes
from dsmoe.app.plan_run import load_plan_config, run_plan

V3 = "benchmarks/configs/deepseek-v3/config.json"


def test_v3_counts_and_bytes_by_hand():
    c = load_plan_config(V3)
    d = plan(c, gpus=8, weights="bf16", dispatch_dtype="bf16", combine_dtype="bf16", batch=1, context=1)
    assert round(d["model"]["params_total"] / 1e9, 1) == 671.0  # DeepSeek-V3's published 671B (MTP excluded)
    assert d["model"]["expert_params"] == 58 * 256 * 3 * 2048 * 7168
    assert d["a2a_bytes_per_token_per_layer"] == {"dispatch": 8 * (7168 * 2 + 8), "combine": 8 * 7168 * 2}
    assert kv_bytes_per_token(c, 2) == 61 * (512 + 64) * 2  # the MLA latent, bf16
    assert d["experts_per_gpu"] == 32
    weights = (d["model"]["non_expert_params"] + 58 * 32 * 3 * 2048 * 7168) * 2
    assert d["memory_gib"]["weights"] == pytest.approx(weights / 2**30)


def test_fit_and_comm_scale_with_gpus():
    c = load_plan_config(V3)
    small = plan(c, gpus=8, nodes=1)
    big = plan(c, gpus=64, nodes=8)
    assert big["memory_gib"]["weights"] < small["memory_gib"]["weights"]
    assert small["smallest_ep_that_fits"] == big["smallest_ep_that_fits"] > 1
    assert small["decode"]["comm_ms"] < big["decode"]["comm_ms"]  # the network is slower than NVLink
    # one node: everything but the local share over NVLink at 450 GB/s
    assert a2a_seconds(8e9, 8, 8, 450, None) == pytest.approx(8e9 * 7 / 8 / 450e9)
    assert a2a_step_bytes(3, 64, 2, 4, 2) == 3 * (2 * (64 * 4 + 8) + 2 * 64 * 4) + 2 * 8
    assert a2a_bytes_per_token(64, 2, 4) == (2 * (64 * 4 + 8), 2 * 64 * 4)


def test_placement_sets_the_imbalance(tmp_path):
    from dsmoe.app.placement import placement_report
    counts = [40, 1, 2, 30, 3, 25, 1, 8]
    doc = {"experts": 8, "layers": [{"layer": layer, "counts": counts} for layer in (1, 2)]}
    doc["placement"] = placement_report(doc, 2)
    f = tmp_path / "p.json"
    f.write_text(json.dumps(doc))
    d = run_plan(source="preset:tiny", gpus=2, placement=str(f))
    share = max(doc["placement"]["layers"][0]["device_load"]) / sum(counts)
    assert d["imbalance"] == pytest.approx(2 * share)


@pytest.mark.parametrize("args, message", [
    (["--gpus", "8", "--gpu", "a100"], "--gpu 'a100'"),
    (["--gpus", "12", "--nodes", "5"], "multiple of --nodes"),
    (["--gpus", "9"], "more GPUs than expert copies"),
    (["--gpus", "2", "--weights", "fp7"], "--weights 'fp7'"),
    (["--gpus", "4", "--nodes", "2", "--interconnect", "nvlink"], "inside one node"),
])
def test_bad_input_is_one_line(capsys, args, message):
    from dsmoe.app.cli import main
    with pytest.raises(SystemExit) as e:
        main(["plan", "preset:tiny", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_prints_the_plan(capsys):
    from dsmoe.app.cli import main
    main(["plan", V3, "--gpus", "16", "--nodes", "2", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["hardware"]["gpus_per_node"] == 8 and d["fits"] is True


def test_docs_reference_lists_every_option():
    import re
    from pathlib import Path

    from dsmoe.app.ep import ep_options
    from dsmoe.app.plan_cmd import plan as plan_cmd
    page = Path(__file__).parent.parent / "docs" / "expert-parallelism.md"
    text = page.read_text()
    ref = text.split("## Reference: dsmoe plan", 1)[1]
    documented = set(re.findall(r"`(--[a-z0-9-]+)`", ref))
    options = {o for p in plan_cmd.params for o in p.opts if o.startswith("--")}
    assert documented == options
    ep = {o for p in ep_options(lambda **kw: None).__click_params__ for o in p.opts}
    assert ep <= set(re.findall(r"`(--[a-z0-9-]+)`", text.split("## Options of `dsmoe generate`", 1)[1]))
