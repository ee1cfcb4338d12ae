"""Expert parallelism on torch.distributed (gloo): 2 and 4 processes, one launch per group size.

Every rank checks itself against the single-process fused graph (``tests/ep_cases.py``); the
tests here assert on what the ranks returned: equal tokens, logits within fp32 tolerance, only the
rank's experts as parameters, the bytes moved equal ``dsmoe plan``'s formulas, and refusals of
ranks that disagree. The CLI tests run ``dsmoe generate --ep 2`` for real (torchrun's launcher),
including a rank killed mid-generation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import ep_cases
from dsmoe.app.ep_placement import Placement, add_redundant, check_assignment
from dsmoe.app.placement import placement_report
from dsmoe.app.plan_model import a2a_bytes_per_token, allreduce_step_bytes
from dsmoe.errors import DsmoeError

GROUP_LIMITED = {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}
SKEW = [40, 1, 2, 30, 3, 25, 1, 8]  # routing slots per expert of `tiny`: hot experts 0, 3, 5


def _placement_file(tmp: Path, devices: int) -> str:
    """What ``dsmoe experts --place N --json`` writes (via the same function), for skewed loads."""
    doc = {"experts": 8, "layers": [{"layer": layer, "counts": SKEW[layer:] + SKEW[:layer]} for layer in (1, 2)]}
    doc["placement"] = placement_report(doc, devices)
    path = tmp / f"place{devices}.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _launch(nproc: int, models: list, checks: dict) -> dict:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                       rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2, start_method="spawn")
    return elastic_launch(cfg, ep_cases.entry)(models, checks)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    import dsmoe
    from dsmoe.checkpoint import save_checkpoint
    tmp = tmp_path_factory.mktemp("ep-ckpt")
    model = dsmoe.load("preset:tiny")  # the weights of preset:tiny, so the tokens of `ep2`'s tiny cases hold for it
    a = save_checkpoint(model, tmp / "a")
    with torch.no_grad():
        model.model.layers[1].mlp.experts[5].down_proj.weight.add_(0.01)
    b = save_checkpoint(model, tmp / "b")
    return str(a), str(b)


@pytest.fixture(scope="module")
def ep2(tmp_path_factory, ckpts):
    tmp = tmp_path_factory.mktemp("ep2")
    f = _placement_file(tmp, 2)
    models = [
        {"name": "tiny", "source": "preset:tiny", "cases": [
            {"placement": "contiguous"}, {"placement": f}, {"placement": f, "redundant": 1},
            {"placement": "contiguous", "mode": "allreduce"}]},
        {"name": "mla-tiny-grouped", "source": "preset:mla-tiny", "overrides": GROUP_LIMITED,
         "cases": [{"placement": "contiguous"}, {"placement": f, "redundant": 1}]},
        {"name": "v3-small", "source": "preset:v3-small", "overrides": {"num_hidden_layers": 2, "vocab_size": 1024},
         "cases": [{"placement": "contiguous"}]},
    ]
    return _launch(2, models, {"placement_mismatch": True, "checkpoints": list(ckpts), "partial_load": ckpts[0]})


@pytest.fixture(scope="module")
def ep4(tmp_path_factory):
    f = _placement_file(tmp_path_factory.mktemp("ep4"), 4)
    models = [{"name": "tiny", "source": "preset:tiny",
               "cases": [{"placement": "contiguous"}, {"placement": f, "redundant": 2},
                         {"placement": "contiguous", "mode": "allreduce"}]}]
    return _launch(4, models, {})


def _cases(results: dict):
    for rank, out in results.items():
        for name, cases in out["models"].items():
            for c in cases:
                yield rank, name, c


@pytest.mark.parametrize("group", ["ep2", "ep4"])
def test_tokens_logits_params_and_bytes(group, request):
    results = request.getfixturevalue(group)
    world = len(results)
    seen = set()
    for rank, name, c in _cases(results):
        where = f"{group} rank {rank} {name} {c['case']}"
        assert c["ep"] == c["ref"], where
        assert c["logit_diff"] <= 1e-5 * max(c["logit_scale"], 1.0), where
        assert c["rewrites"] == c["moe_layers"] and c["again"] == 0, where
        assert c["params"] == c["expected_params"], where  # only this rank's experts
        t, L, H, K = c["tokens"], c["moe_layers"], c["hidden"], c["top_k"]
        tr = c["traffic"]
        if c["case"].get("mode", "a2a") == "a2a":
            d, cb = a2a_bytes_per_token(H, K, 4)
            assert (tr["dispatch"], tr["combine"]) == (t * L * d, t * L * cb), where
            # the engine prefills each of the rank's prompts alone, then decodes them together
            calls = (len(c["rows"]) + ep_cases.NEW - 1) * L
            assert tr["counts"] == tr["calls"] * world * 8 and tr["calls"] == calls, where
            assert tr["slots"] == t * L * K and 0 < tr["slots_remote"] < tr["slots"], where
        else:
            assert tr["allreduce"] == L * allreduce_step_bytes(t, H) and tr["dispatch"] == 0, where
        seen.add((name, json.dumps(c["case"])))
    assert len(seen) == sum(len(cases) for cases in results[0]["models"].values())


def test_redundant_experts_lower_the_busiest_share(ep2, ep4):
    from dsmoe.app.ep_placement import read_placement
    for world, results in ((2, ep2), (4, ep4)):
        red = [c for c in results[0]["models"]["tiny"] if c["case"].get("redundant")]
        assert red
        for c in red:
            before = read_placement(c["case"]["placement"], [1, 2], 8, world).busiest_share()
            assert 1 / world <= c["busiest"] < before


def test_ranks_that_disagree_refuse(ep2):
    for out in ep2.values():
        assert "rank 1 disagrees with rank 0 on the placement" in out["placement_mismatch"]
        assert "disagrees with rank 0 on the checkpoint" in out["checkpoint_mismatch"]


def test_each_rank_reads_only_its_experts(ep2):
    for out in ep2.values():
        pl = out["partial_load"]
        assert pl["skipped"] == 2 * 4 * 3  # 2 MoE layers × 4 foreign experts × gate/up/down
        assert pl["read_bytes"] < pl["file_bytes"]
        assert pl["expert_bytes"] == 2 * 4 * 3 * 32 * 64 * 4  # its own experts, fp32


def test_placement_checks():
    check_assignment([[0, 1, 2, 3], [4, 5, 6, 7]], 8, 2, where="x", redundant=False)
    with pytest.raises(DsmoeError, match="expert 7 is on no rank"):
        check_assignment([[0, 1, 2, 3], [4, 5, 6]], 8, 2, where="x", redundant=False)
    with pytest.raises(DsmoeError, match="expert 3 is placed twice"):
        check_assignment([[0, 1, 2, 3], [3, 4, 5, 6, 7]], 8, 2, where="x", redundant=False)
    check_assignment([[0, 1, 2, 3], [3, 4, 5, 6, 7]], 8, 2, where="x", redundant=True)
    p = Placement(2, 8, {1: [[0, 1, 2, 3], [4, 5, 6, 7]]}, loads={1: SKEW})
    r = add_redundant(p, 1)
    assert [0 in a for a in r.layers[1]] == [True, True]  # the hottest expert, on both ranks
    check_assignment(r.layers[1], 8, 2, where="x", redundant=True)
    assert r.busiest_share() < p.busiest_share()


def _dsmoe(*args, env=None, timeout=240):
    return subprocess.run([str(Path(sys.executable).with_name("dsmoe")), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_cli_ep2_equals_one_process(ep2, ckpts):
    """``dsmoe generate CHECKPOINT --ep 2`` of three prompts (each rank reading only its experts):
    rank 0 decodes prompts 0 and 2, rank 1 prompt 1 beside a filler (ranks must make equal numbers
    of forward calls), which the ranks of ``ep2`` decoded with the single-process fused graph of
    the same weights (``ref``; the engine's batched rows are its rows alone)."""
    prompts = ep_cases.PROMPTS[:3]
    args = [a for p in prompts for a in ("--prompt-ids", " ".join(map(str, p)))]
    r = _dsmoe("generate", ckpts[0], *args, "--max-new-tokens", str(ep_cases.NEW), "--ep", "2", "--json")
    assert r.returncode == 0, r.stderr
    ref = {}
    for out in ep2.values():
        c = out["models"]["tiny"][0]
        assert c["case"] == {"placement": "contiguous"}
        ref.update(zip(c["rows"], c["ref"]))
    assert json.loads(r.stdout)["ids"] == [ref[i] for i in range(len(prompts))]


def test_cli_rank_killed_mid_generation(tmp_path):
    t = time.monotonic()
    r = _dsmoe("generate", "preset:tiny", "--prompt-ids", "1 2 3", "--max-new-tokens", "6", "--ep", "2",
               "--ep-timeout", "20", env={"DSMOE_EP_FAULT": "1:3", "TMPDIR": str(tmp_path)})
    took = time.monotonic() - t
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: rank 1 died: killed by SIGKILL"], r.stderr
    assert took < 120
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(tmp_path) in _cmdline(p)]
    assert not left


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("assignment, message", [
    ([[0, 1, 2, 3], [4, 5, 6]], "expert 7 is on no rank"),
    ([[0, 1, 2, 3], [3, 4, 5, 6, 7]], "expert 3 is placed twice"),
])
def test_cli_refuses_a_bad_placement(tmp_path, capsys, assignment, message):
    from dsmoe.app.cli import main
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"placement": {"layers": [{"layer": 1, "assignment": assignment},
                                                      {"layer": 2, "assignment": [[0, 1, 2, 3], [4, 5, 6, 7]]}]}}))
    with pytest.raises(SystemExit) as e:
        main(["generate", "preset:tiny", "--prompt-ids", "1 2", "--ep", "2", "--placement", str(f)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def _note(tmp: Path, rank: int, error: str, consequence: bool, t: float, code: int = 1) -> None:
    (tmp / f"rank{rank}.err").write_text(json.dumps({"rank": rank, "error": error, "consequence": consequence,
                                                     "time": t, "exit": code}))


def test_the_failure_line_names_the_cause(tmp_path):
    """What the launcher's failures plus the ranks' notes become (no launch: the cases by hand)."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from dsmoe.app.ep import _cause

    def pf(code):
        return ProcessFailure(local_rank=0, pid=1, exitcode=code, error_file=str(tmp_path / "none.json"))
    killed = {0: pf(1), 1: pf(-signal.SIGKILL)}
    _note(tmp_path, 0, "RuntimeError: [gloo] Connection reset by peer", True, 2.0)
    assert _cause(tmp_path, killed) == ("rank 1 died: killed by SIGKILL", 1)
    hung = {0: pf(1), 1: pf(-signal.SIGTERM)}
    line, code = _cause(tmp_path, hung)
    assert line.startswith("rank 1 stopped answering: rank 0's collective gave up on it") and code == 1
    _note(tmp_path, 1, "rank 1 disagrees with rank 0 on the placement", False, 1.0, code=2)
    assert _cause(tmp_path, {0: pf(1), 1: pf(2)}) == ("rank 1 failed: rank 1 disagrees with rank 0 on the placement", 2)
