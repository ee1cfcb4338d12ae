"""``dsmoe experts``: where the tokens go — expert load per layer, routing drift, placement.

Each prompt runs once through the source (a prefill: every prompt token is routed in every MoE
layer) on a backend that has the router: ``eager`` (forward hooks), ``fused`` (the fused graph
with ``expose_router``) or ``ort`` (an export made with ``dsmoe-export --router-stats``; the
default for an export directory). The statistics are :mod:`dsmoe.app.expert_stats`'s, the
placement :mod:`dsmoe.app.placement`'s, the picture :mod:`dsmoe.app.experts_plot`'s.

Prompts: ``--prompt-ids "1 2 3"``, ``--prompt-file FILE`` (one prompt per line: text when the
source has ``tokenizer.json``, else space-separated ids; blank lines skipped) or
``--random N --seq-len L`` (uniform ids, seeded by ``--seed``), or ``--by-domain NAME=FILE …``
(each file's text cut into prompts of ``--seq-len`` tokens; per-domain statistics in
:mod:`dsmoe.app.experts_domain`).
"""

from __future__ import annotations

from pathlib import Path

import torch

import dsmoe
from dsmoe.app.expert_stats import RouterTrace, compare_report, expert_report
from dsmoe.app.experts_domain import domain_prompts, domain_report, parse_domains, plot_domains
from dsmoe.app.experts_plot import plot_report
from dsmoe.app.generate import empty_cache, load_tokenizer, run_generate
from dsmoe.app.placement import placement_report
from dsmoe.app.router_trace import BACKENDS, eager_router_step, fused_router_step, ort_router_step, tap
from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError
from dsmoe.export import MODEL_FILE
from dsmoe.outputs import check_output_file

TOKENIZER_FILE = "tokenizer.json"


def is_export(source: str) -> bool:
    return (Path(source) / MODEL_FILE).is_file()


def read_prompts(source: str, *, prompt_ids: str | None = None, prompt_file: str | None = None,
                 random: int | None = None, seq_len: int | None = None, seed: int | None = None,
                 vocab_size: int, max_positions: int | None = None) -> list[list[int]]:
    """The prompts as token ids (exactly one of the three ways), every id checked against the
    vocabulary and every prompt against the model's positions. ``seq_len`` (default 64) and
    ``seed`` (default 0) apply to ``random`` only: given without it, they are refused."""
    given = [x is not None for x in (prompt_ids, prompt_file, random)]
    if sum(given) != 1:
        raise DsmoeError("give exactly one of --prompt-ids, --prompt-file or --random N")
    if random is None and (seq_len is not None or seed is not None):
        raise DsmoeError("--seq-len and --seed apply to --random N only")
    seq_len = 64 if seq_len is None else seq_len
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise DsmoeError(f"--seed must be an integer in [0, 2**64), got {seed!r}")
    if prompt_ids is not None:
        prompts = [_ids(prompt_ids, "--prompt-ids")]
    elif prompt_file is not None:
        prompts = _read_file(source, Path(prompt_file))
    else:
        if random < 1 or seq_len < 1:
            raise DsmoeError(f"--random and --seq-len must be at least 1, got {random} and {seq_len}")
        if max_positions is not None and seq_len > max_positions:
            raise DsmoeError(f"--seq-len {seq_len} exceeds the model's {max_positions} positions (max_position_embeddings)")
        g = torch.Generator().manual_seed(seed)
        prompts = torch.randint(0, vocab_size, (random, seq_len), generator=g).tolist()
    for n, p in enumerate(prompts, 1):
        if not p:
            raise DsmoeError(f"prompt {n} is empty")
        if max_positions is not None and len(p) > max_positions:
            raise DsmoeError(f"prompt {n} has {len(p)} tokens, more than the model's {max_positions} positions "
                             "(max_position_embeddings)")
        bad = [i for i in p if not 0 <= i < vocab_size]
        if bad:
            raise DsmoeError(f"prompt {n}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return prompts


def _ids(text: str, where: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise DsmoeError(f"{where} must be integers, got {text.strip()!r}") from None


def _read_file(source: str, path: Path) -> list[list[int]]:
    if path.is_dir():
        raise DsmoeError(f"--prompt-file {path} is a directory; give a file with one prompt per line")
    if not path.is_file():
        raise DsmoeError(f"--prompt-file {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise DsmoeError(f"--prompt-file {path} holds no prompts")
    tok_path = Path(source) / TOKENIZER_FILE
    if tok_path.is_file():
        tok = load_tokenizer(tok_path, what="--prompt-file with text")
        return [tok.encode(line).ids for line in lines]
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            prompts.append([int(t) for t in line.replace(",", " ").split()])
        except ValueError:
            raise DsmoeError(f"{path}:{n}: {line.strip()[:40]!r} is not token ids (without {TOKENIZER_FILE} in the "
                             f"source, each line is a prompt of space-separated ids)") from None
    return prompts


def open_source(source: str, *, backend: str | None = None, dtype: str | None = None,
                overrides: dict | None = None) -> tuple:
    """``(router step, config, backend, dtype)`` for a checkpoint, preset or export directory."""
    exported = is_export(source)
    backend = backend or ("ort" if exported else "eager")
    if backend not in BACKENDS:
        raise DsmoeError(f"unknown backend {backend!r} (backends: {', '.join(BACKENDS)})")
    if exported != (backend == "ort"):
        raise DsmoeError(f"{source} is an ONNX export: it runs on the ort backend" if exported else
                         f"the ort backend runs an export made with --router-stats; {source} has no {MODEL_FILE}")
    if exported:
        if overrides or dtype:
            raise DsmoeError(f"--set and --dtype do not apply to an export ({source}: its config is fixed)")
        config = dsmoe.load_config(source)
        _check_moe(source, config)
        step = ort_router_step(source)
        return step, config, backend, step.dtype
    config = dsmoe.load_config(source, overrides)
    _check_moe(source, config)
    model = dsmoe.load(source, dtype=dtype, overrides=overrides)
    step = eager_router_step(model) if backend == "eager" else fused_router_step(model)
    return step, config, backend, next(model.parameters()).dtype


def _check_moe(source: str, config: DeepseekConfig) -> None:
    if not config.moe_layers:
        raise DsmoeError(f"{source} has no MoE layers (n_routed_experts {config.n_routed_experts}, "
                         f"first_k_dense_replace {config.first_k_dense_replace}, {config.num_hidden_layers} layers)")


@torch.no_grad()
def trace_prompts(step, config: DeepseekConfig, prompts: list[list[int]], dtype: torch.dtype) -> RouterTrace:
    """One prefill per prompt (batch 1) through a router step; the trace of every token."""
    trace = RouterTrace()
    plain = tap(step, trace)
    for p in prompts:
        ids = torch.tensor([p], dtype=torch.int64)
        S = ids.shape[1]
        plain(ids, torch.ones(1, S, dtype=torch.int64), torch.arange(S).unsqueeze(0), empty_cache(config, 1, dtype))
    return trace


def report_of(trace: RouterTrace, config: DeepseekConfig, *, top_pairs: int = 5) -> dict:
    """The expert report of a trace, for a model of this config."""
    return expert_report(trace, num_experts=config.n_routed_experts, top_k=config.routing.top_k,
                         has_shared=bool(config.n_shared_experts), top_pairs=top_pairs)


def run_experts(*, source: str, prompt_ids: str | None = None, prompt_file: str | None = None,
                random: int | None = None, seq_len: int | None = None, seed: int | None = None, backend: str | None = None,
                dtype: str | None = None, overrides: dict | None = None, compare: str | None = None,
                compare_backend: str | None = None, compare_dtype: str | None = None, place: int | None = None,
                top_pairs: int = 5, plot: str | None = None, force: bool = False, by_domain: list[str] | None = None,
                max_prompts: int = 64) -> dict:
    """The ``dsmoe experts`` document: ``{"source", "backend", "prompts", **expert report,
    "compare"?, "placement"?, "plot"?}`` (see :func:`dsmoe.app.expert_stats.expert_report`)."""
    stray = [f for f, v in (("--compare-backend", compare_backend), ("--compare-dtype", compare_dtype)) if v is not None]
    if stray and compare is None:
        raise DsmoeError(f"{', '.join(stray)} apply to --compare OTHER only")
    if top_pairs < 0:
        raise DsmoeError(f"--top-pairs must be at least 0, got {top_pairs}")
    if place is not None and place < 1:
        raise DsmoeError(f"--place needs a positive number of devices, got {place}")
    if plot is not None and not plot.lower().endswith(".png"):
        raise DsmoeError(f"--plot writes a PNG: give a FILE.png, got {plot!r}")
    inputs = [p for p in (source, compare, prompt_file) if p is not None and not p.startswith("preset:")]
    if plot is not None:
        check_output_file(plot, force=force, inputs=inputs, option="--plot")
    # everything that can be checked from the configs and the prompts, before a model is loaded
    config = _config(source, overrides)
    domains = None
    if by_domain:
        if any(x is not None for x in (prompt_ids, prompt_file, random)):
            raise DsmoeError("--by-domain brings its own prompts: drop --prompt-ids, --prompt-file and --random")
        domains = domain_prompts(source, parse_domains(by_domain), seq_len=seq_len, max_prompts=max_prompts,
                                 vocab_size=config.vocab_size)
        prompts = [p for ps in domains.values() for p in ps]
    else:
        prompts = read_prompts(source, prompt_ids=prompt_ids, prompt_file=prompt_file, random=random, seq_len=seq_len,
                               seed=seed, vocab_size=config.vocab_size,
                               max_positions=config.max_position_embeddings)
    if compare is not None:
        _check_comparable(source, config, compare, _config(compare, overrides))
    step, config, backend, tdtype = open_source(source, backend=backend, dtype=dtype, overrides=overrides)
    other = None
    if compare is not None:
        other = open_source(compare, backend=compare_backend, dtype=compare_dtype,
                            overrides=None if is_export(compare) else overrides)
    if domains is not None:
        traces = {d: trace_prompts(step, config, ps, tdtype) for d, ps in domains.items()}
        trace = merge_traces(list(traces.values()))
    else:
        trace = trace_prompts(step, config, prompts, tdtype)
    doc = {"source": source, "backend": backend, "dtype": str(tdtype).removeprefix("torch."), "prompts": len(prompts),
           **report_of(trace, config, top_pairs=top_pairs)}
    if domains is not None:
        doc["by_domain"] = domain_report(traces, num_experts=config.n_routed_experts, top_k=config.routing.top_k,
                                         has_shared=bool(config.n_shared_experts))
    if other is not None:
        step_b, config_b, backend_b, dtype_b = other
        trace_b = trace_prompts(step_b, config_b, prompts, dtype_b)
        doc["compare"] = {"source": compare, "backend": backend_b, "dtype": str(dtype_b).removeprefix("torch."),
                          **compare_report(trace, trace_b, num_experts=config.n_routed_experts)}
    if place is not None:
        doc["placement"] = placement_report(doc, place)
    if plot is not None:
        doc["plot"] = (plot_domains(doc, plot, force=force, inputs=inputs) if domains is not None
                       else plot_report(doc, plot, force=force, inputs=inputs))
    return doc


def merge_traces(traces: list[RouterTrace]) -> RouterTrace:
    """One trace holding the tokens of several, in order."""
    out = RouterTrace()
    for t in traces:
        out.calls += t.calls
        for layer, fields in t.parts.items():
            dst = out.parts.setdefault(layer, {})
            for name, parts in fields.items():
                dst.setdefault(name, []).extend(parts)
    return out


def generate_with_stats(*, source: str, overrides: dict | None = None, top_pairs: int = 5,
                        **generate: object) -> tuple[list[int], str | None, dict]:
    """``dsmoe generate --router-stats``: :func:`run_generate` recording every step's routing;
    returns ``(ids, text, report)`` with the report of :func:`report_of` (all prompt and generated tokens)."""
    config = _config(source, overrides)
    trace = RouterTrace()
    ids, text = run_generate(source=source, overrides=overrides, trace=trace, **generate)
    return ids, text, {"source": source, "backend": generate.get("backend", "eager"),
                       **report_of(trace, config, top_pairs=top_pairs)}


def _config(source: str, overrides: dict | None) -> DeepseekConfig:
    """The source's config (``--set`` applies to checkpoints and presets, not to an export), with MoE layers."""
    config = dsmoe.load_config(source, None if is_export(source) else overrides)
    _check_moe(source, config)
    return config


def _check_comparable(source: str, a: DeepseekConfig, compare: str, b: DeepseekConfig) -> None:
    """Same MoE layers, experts and experts per token, else one line."""
    for what, x, y in (("MoE layers", a.moe_layers, b.moe_layers), ("routed experts", a.n_routed_experts, b.n_routed_experts),
                       ("experts per token", a.routing.top_k, b.routing.top_k), ("vocabulary", a.vocab_size, b.vocab_size)):
        if x != y:
            raise DsmoeError(f"cannot compare {source} with {compare}: {what} {x} vs {y}")
