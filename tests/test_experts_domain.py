"""``dsmoe experts --by-domain``: per-domain expert use, MI(domain; expert), shared share.

The reference counts each domain's expert choices with forward hooks on the eager model's
routers (not through the router trace the command uses) and computes the mutual information
from them by the formula.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import dsmoe
from dsmoe.checkpoint import save_checkpoint
from dsmoe.model import MoEGate

CODE = (Path(__file__).parents[1] / "dsmoe" / "model.py").read_text()[2000:3600]
PROSE = ("The quick brown fox jumps over the lazy dog. " * 20) + ("Licenses grant rights under conditions. " * 15)
SEQ = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("dom")
    ckpt = root / "tiny"
    model = dsmoe.load("preset:tiny", overrides={"vocab_size": 300})
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.mul_(10.0)  # decisive routing
    save_checkpoint(model, ckpt)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CODE, PROSE], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(ckpt / "tokenizer.json"))
    (root / "code.txt").write_text(CODE)
    (root / "prose.txt").write_text(PROSE)
    return root, ckpt, tok


def _counts(ckpt, tok, text, E=8):
    """Per MoE layer, how often each expert is chosen for the text's prompts of SEQ tokens (router hooks)."""
    model = dsmoe.load(str(ckpt))
    ids = tok.encode(text, add_special_tokens=False).ids
    counts: dict[int, torch.Tensor] = {}
    gates = [(i, m.mlp.gate) for i, m in enumerate(model.model.layers) if isinstance(getattr(m.mlp, "gate", None), MoEGate)]
    for i, g in gates:
        g.register_forward_hook(lambda mod, inp, out, i=i: counts.__setitem__(
            i, counts.get(i, torch.zeros(E, dtype=torch.float64)) + torch.bincount(out[1].flatten().long(), minlength=E).double()))
    with torch.no_grad():
        for s in range(0, len(ids) - SEQ + 1, SEQ):
            model(torch.tensor([ids[s:s + SEQ]]))
    return counts


def test_by_domain_loads_and_mutual_information_match_router_hooks(setup, capsys):
    root, ckpt, tok = setup
    code, out, err = run_cli(capsys, "experts", ckpt, "--by-domain", f"code={root / 'code.txt'}",
                             "--by-domain", f"prose={root / 'prose.txt'}", "--seq-len", SEQ, "--max-prompts", 1000, "--json")
    assert code == 0, err
    rep = json.loads(out)["by_domain"]
    ref = {d: _counts(ckpt, tok, t) for d, t in (("code", CODE), ("prose", PROSE))}
    for s in rep["layers"]:
        p = {d: (ref[d][s["layer"]] / ref[d][s["layer"]].sum()).tolist() for d in ref}
        for d in ref:
            assert s["load"][d] == pytest.approx(p[d], abs=1e-12)
            assert s["shared_share"][d] is not None and 0 < s["shared_share"][d] < 1
        pe = [(p["code"][e] + p["prose"][e]) / 2 for e in range(8)]
        mi = sum(p[d][e] / 2 * math.log2(p[d][e] / pe[e]) for d in p for e in range(8) if p[d][e] > 0)
        assert s["mi_bits"] == pytest.approx(mi, rel=1e-9) and 0 < s["mi_normalized"] <= 1


def test_the_same_text_twice_has_zero_mutual_information(setup, capsys):
    root, ckpt, _ = setup
    code, out, err = run_cli(capsys, "experts", ckpt, "--by-domain", f"a={root / 'code.txt'}",
                             "--by-domain", f"b={root / 'code.txt'}", "--seq-len", SEQ, "--json")
    assert code == 0, err
    assert all(abs(s["mi_bits"]) < 1e-12 for s in json.loads(out)["by_domain"]["layers"])


def test_bad_domains_are_one_line_exit_2(setup, capsys):
    root, ckpt, _ = setup
    for argv, match in (((f"code={root / 'code.txt'}",), "at least two"),
                        ((f"code={root / 'code.txt'}", "prose"), "NAME=FILE"),
                        ((f"code={root / 'code.txt'}", f"x={root / 'missing.txt'}"), "does not exist")):
        args = [a for d in argv for a in ("--by-domain", d)]
        code, _, err = run_cli(capsys, "experts", ckpt, *args, "--seq-len", SEQ)
        assert code == 2 and err.startswith("error:") and match in err, err
    code, _, err = run_cli(capsys, "experts", ckpt, "--by-domain", f"a={root / 'code.txt'}", "--by-domain",
                           f"b={root / 'prose.txt'}", "--random", 2)
    assert code == 2 and "--by-domain brings its own prompts" in err
