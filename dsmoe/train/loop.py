"""Train the minimoe model: a DeepSeekMoE (dense first layer, fine-grained routed experts plus
shared experts) of a few million parameters, on the three corpora of :mod:`dsmoe.train.corpus`.

Seeded end to end (data order, init, batches). The loss is next-token cross-entropy plus
DeepSeekMoE's sequence-level balance loss (``aux_loss_alpha · Σ_e f_e·P_e`` per sequence, ``f_e``
the expert's share of the sequence's K·S choices times E/K... i.e. ``E/(K·S)·count_e``, ``P_e`` its
mean router probability), summed over MoE layers. A checkpoint (bf16 safetensors, HF layout, with
``tokenizer.json`` and ``tokenizer_config.json``) is written every ``checkpoint_every`` steps and at
the end, so a usable model exists early; the log goes to ``train_log.jsonl`` in it.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dsmoe.config import DeepseekConfig
from dsmoe.model import DeepseekForCausalLM, MoEGate, init_weights
from dsmoe.train.corpus import DOMAINS, sample_texts
from dsmoe.train.save import save_minimoe
from dsmoe.train.tokenizer import EOS, train_tokenizer

MINIMOE_CONFIG = dict(
    model_type="deepseek", vocab_size=4096, hidden_size=256, intermediate_size=640, moe_intermediate_size=64,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1,
    n_shared_experts=2, n_routed_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
    max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, aux_loss_alpha=0.01, seq_aux=True,
    torch_dtype="bfloat16", tie_word_embeddings=False,
)
DOMAIN_BYTES = {"code": 10_000_000, "legal": 5_000_000, "prose": 10_000_000}
DOMAIN_WEIGHTS = {"code": 0.4, "legal": 0.2, "prose": 0.4}


@dataclass
class TrainOptions:
    steps: int = 3000
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    vocab_size: int = 4096
    threads: int = 2
    checkpoint_every: int = 250
    log_every: int = 10
    bytes_scale: float = 1.0  # fraction of DOMAIN_BYTES read (tests: tiny)
    overrides: dict = field(default_factory=dict)  # config fields (tests: a smaller model)


def lr_at(step: int, o: TrainOptions) -> float:
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    t = (step - o.warmup) / max(1, o.steps - o.warmup)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def build_data(o: TrainOptions, log):
    """Tokenizer and per-domain token streams (documents joined by ``<|endoftext|>``)."""


    texts = {d: sample_texts(d, int(DOMAIN_BYTES[d] * o.bytes_scale), seed=o.seed) for d in DOMAINS}
    log({"event": "corpus", **{d: {"files": len(t), "bytes": sum(len(x.encode()) for x in t)} for d, t in texts.items()}})
    t0 = time.time()
    mixed = [x for d in DOMAINS for x in texts[d]]
    random.Random(o.seed).shuffle(mixed)
    tok = train_tokenizer(mixed, o.vocab_size)
    eos = tok.token_to_id(EOS)
    streams = {}
    for d in DOMAINS:
        ids: list[int] = []
        for enc in tok.encode_batch(texts[d]):
            ids += [*enc.ids, eos]
        streams[d] = torch.tensor(ids, dtype=torch.long)
    log({"event": "tokenizer", "vocab": tok.get_vocab_size(), "seconds": round(time.time() - t0, 1),
         **{f"{d}_tokens": len(s) for d, s in streams.items()},
         **{f"{d}_bytes_per_token": round(sum(len(x.encode()) for x in texts[d]) / len(streams[d]), 3) for d in DOMAINS}})
    return tok, streams


def batch_of(streams, o: TrainOptions, g):

    domains = list(DOMAIN_WEIGHTS)
    w = torch.tensor([DOMAIN_WEIGHTS[d] for d in domains])
    picks = torch.multinomial(w, o.batch, replacement=True, generator=g).tolist()
    rows = []
    for i in picks:
        s = streams[domains[i]]
        start = int(torch.randint(0, len(s) - o.seq_len - 1, (1,), generator=g))
        rows.append(s[start:start + o.seq_len + 1])
    x = torch.stack(rows)
    return x[:, :-1], x[:, 1:]


class BalanceLoss:
    """Forward hooks on every ``MoEGate``: the sequence-level balance loss of the last forward."""

    def __init__(self, model, batch: int):

        self.terms, self.batch = [], batch
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, MoEGate)]

    def _hook(self, gate, inputs, outputs):

        x_TH, (_, ids_TK) = inputs[0], outputs
        E, K = gate.weight.shape[0], ids_TK.shape[1]
        scores = torch.softmax(x_TH.float() @ gate.weight.float().t(), dim=-1).view(self.batch, -1, E)  # [B,S,E]
        S = scores.shape[1]
        counts = torch.zeros(self.batch, E).scatter_add_(1, ids_TK.long().view(self.batch, -1),
                                                          torch.ones(self.batch, S * K))
        f = counts * E / (K * S)
        self.terms.append((f * scores.mean(dim=1)).sum(dim=1).mean())

    def pop(self):
        total = sum(self.terms)
        self.terms = []
        return total


def train(*, out: str | Path, options: TrainOptions, force: bool = False, log_path: str | Path | None = None) -> dict:
    """Train, checkpointing into ``out``; returns the final log record."""


    o = options
    torch.set_num_threads(o.threads)
    torch.manual_seed(o.seed)
    records: list[dict] = []
    log_file = Path(log_path) if log_path else None

    def log(rec):
        rec = {"t": round(time.time() - t_start, 1), **rec}
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if log_file:
            with log_file.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    t_start = time.time()
    log({"event": "options", **asdict(o)})
    tok, streams = build_data(o, log)
    config = DeepseekConfig(**{**MINIMOE_CONFIG, "vocab_size": tok.get_vocab_size(), **o.overrides}).validate()
    model = init_weights(DeepseekForCausalLM(config), seed=o.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log({"event": "model", "params": n_params, "config": config.to_dict()})
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(0.9, 0.95))
    balance = BalanceLoss(model, o.batch)
    g = torch.Generator().manual_seed(o.seed)
    t_train, ce_avg, tokens = time.time(), None, 0
    last = {}
    for step in range(o.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, o)
        x, y = batch_of(streams, o, g)
        logits = model(x)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        aux = balance.pop()
        loss = ce + config.aux_loss_alpha * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += x.numel()
        ce_avg = ce.item() if ce_avg is None else 0.95 * ce_avg + 0.05 * ce.item()
        if step % o.log_every == 0 or step == o.steps - 1:
            el = time.time() - t_train
            last = {"event": "step", "step": step, "ce": round(ce.item(), 4), "ce_avg": round(ce_avg, 4),
                    "aux": round(float(aux.detach()) / max(1, len(config.moe_layers)), 4), "lr": round(lr_at(step, o), 6),
                    "grad_norm": round(float(gnorm), 3), "tokens": tokens, "train_seconds": round(el, 1),
                    "tokens_per_s": round(tokens / el, 1)}
            log(last)
        if (step + 1) % o.checkpoint_every == 0 or step == o.steps - 1:
            save_minimoe(model, tok, out, force=force or step + 1 > o.checkpoint_every, log_path=log_file)
            log({"event": "checkpoint", "step": step + 1, "out": str(out)})
    log({"event": "done", "steps": o.steps, "train_seconds": round(time.time() - t_train, 1), "final_ce_avg": round(ce_avg, 4)})
    return last
