"""What each rank of ``tests/test_ep.py``'s process groups runs (one launch per group size, many checks).

Per model: the rank loads the model (same seed everywhere), captures and fuses it once, decodes
its prompts with that single-process fused graph (the reference), then for each placement and
mode shards a copy (:func:`dsmoe.passes.shard_experts.shard_experts`) and decodes again. Returned
per case: reference and EP tokens, the first step's max logit difference, parameter counts, the
traffic counted and the placement. Not a test module (no ``test_`` prefix): imported by the workers.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

import dsmoe
from dsmoe.app.ep_placement import add_redundant, contiguous_placement, read_placement
from dsmoe.app.generate import _generate, fused_step
from dsmoe.distributed import ExpertComm
from dsmoe.errors import DsmoeError
from dsmoe.passes.context import PassContext
from dsmoe.passes.shard_experts import ExpertShard, shard_experts

PROMPTS = [[1, 17, 42, 7], [5, 6, 9], [3, 200, 11, 12, 13], [77]]
NEW = 4


def _expert_params(config) -> int:
    return 3 * config.moe_intermediate_size * config.hidden_size


def run_cases(models: list[dict], checks: dict) -> dict:
    """``models``: ``[{"name", "source", "overrides", "cases": [{"placement": "contiguous"|FILE,
    "redundant", "mode"}]}]``; ``checks``: extra refusal checks (``placement_mismatch``,
    ``checkpoints``: one checkpoint directory per rank)."""
    torch.set_num_threads(1)
    group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out: dict = {"rank": rank, "models": {}}
    for m in models:
        model = dsmoe.load(m["source"], overrides=m.get("overrides"))
        config = model.config
        full = fused_step(model)
        del model
        full_params = sum(p.numel() for p in full.parameters())
        shared = full_params - len(config.moe_layers) * config.n_routed_experts * _expert_params(config)
        res = []
        for case in m["cases"]:
            p = (contiguous_placement(config.moe_layers, config.n_routed_experts, world)
                 if case["placement"] == "contiguous"
                 else read_placement(case["placement"], config.moe_layers, config.n_routed_experts, world))
            p = add_redundant(p, case.get("redundant", 0))
            comm = ExpertComm(group, case.get("mode", "a2a"))
            gm = copy.deepcopy(full)
            rewrites = shard_experts(gm, PassContext(expert_shard=ExpertShard(comm, p))).rewrites
            again = shard_experts(gm, PassContext(expert_shard=ExpertShard(comm, p))).rewrites
            rows = list(range(rank, len(PROMPTS), world)) if comm.mode == "a2a" else list(range(len(PROMPTS)))
            prompts = [PROMPTS[i] for i in rows]
            ref = _generate(full, config, prompts, NEW)
            logits_ref = _prefill_logits(full, config, prompts[0])
            logits_ep = _prefill_logits(gm, config, prompts[0])
            comm.traffic.__init__()  # count the generation only
            got = _generate(gm, config, prompts, NEW)
            local = sum(len(p.local(layer, rank)) for layer in p.layers)
            res.append({"case": case, "rows": rows, "ref": ref, "ep": got, "rewrites": rewrites, "again": again,
                        "logit_diff": float((logits_ref - logits_ep).abs().max()),
                        "logit_scale": float(logits_ref.abs().max()),
                        "params": sum(q.numel() for q in gm.parameters()),
                        "expected_params": shared + local * _expert_params(config),
                        "traffic": asdict(comm.traffic), "tokens": _tokens(prompts, NEW),
                        "hidden": config.hidden_size, "top_k": config.num_experts_per_tok,
                        "moe_layers": len(config.moe_layers), "busiest": p.busiest_share()})
        out["models"][m["name"]] = res
    if "placement_mismatch" in checks:
        out["placement_mismatch"] = _refused(lambda: _agree_on_placement(group, rank, world))
    if "checkpoints" in checks:
        from dsmoe.app.ep_rank import agree, checkpoint_digest
        mine = checks["checkpoints"][rank]
        out["checkpoint_mismatch"] = _refused(lambda: agree(group, {"checkpoint": checkpoint_digest(mine)}))
    if "partial_load" in checks:
        out["partial_load"] = _partial_load(checks["partial_load"], rank, world)
    return out


def _tokens(prompts, new) -> int:
    """Token rows the rank runs through each MoE layer: the decoding engine prefills each prompt
    alone (no padding), then decodes one row per prompt for each of the ``new - 1`` later steps."""
    return sum(len(p) for p in prompts) + len(prompts) * (new - 1)


@torch.no_grad()
def _prefill_logits(gm, config, prompt):
    from dsmoe.app.generate import empty_cache
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    pos = torch.arange(len(prompt)).unsqueeze(0)
    return gm(ids, mask, pos, list(empty_cache(config, 1, torch.float32)))[0]


def _agree_on_placement(group, rank, world):
    from dsmoe.app.ep_rank import agree
    p = contiguous_placement([1, 2], 8, world)
    if rank == world - 1:  # the last rank swaps two experts: a different plan
        layers = {k: [list(a) for a in v] for k, v in p.layers.items()}
        layers[1][0][0], layers[1][-1][0] = layers[1][-1][0], layers[1][0][0]
        p = type(p)(p.world, p.experts, layers)
    agree(group, {"placement": p.digest()})


def _refused(fn) -> str | None:
    try:
        fn()
    except DsmoeError as e:
        return str(e)
    return None


def _partial_load(path, rank, world):
    """What the rank reads of a checkpoint (the tokens of this path: ``test_cli_ep2_equals_one_process``)."""
    from dsmoe.app.ep_load import load_rank_model
    config = dsmoe.load_config(path)
    p = contiguous_placement(config.moe_layers, config.n_routed_experts, world)
    model, read = load_rank_model(path, p, rank)
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    own = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
              if ".experts." in k and t.stride() and t.stride()[0] != 0)
    return {"read_bytes": read["read_bytes"], "file_bytes": total, "skipped": read["skipped_keys"], "expert_bytes": own}


def entry(models: list[dict], checks: dict) -> dict:
    """The function torchrun's launcher starts on every rank (it sets the rendezvous environment)."""
    import datetime
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        return run_cases(models, checks)
    finally:
        dist.destroy_process_group()
