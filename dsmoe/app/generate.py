"""``dsmoe generate``: greedy decoding on the eager model, the fused graph, ONNX Runtime, or GenAI.

A *step function* has the decoder signature of :mod:`dsmoe.ir`:
``step(input_ids, attention_mask, position_ids, past) -> (logits, present)``; the eager model
(:func:`eager_step`), the fused graph (:func:`fused_step`) and an exported model in ONNX Runtime
(:class:`dsmoe.export.OrtDecoder`, either cache mode) all are one, so :func:`greedy_generate`
(one prompt) and :func:`greedy_generate_batch` (unequal prompts, left-padded) are written once.
``--backend genai`` hands the export to ONNX Runtime GenAI instead
(:class:`dsmoe.export.genai_runner.GenaiModel`: its own loop, search and tokenizer).

On ``--device cuda`` the model is built or loaded on the GPU; the fused graph runs the Triton
kernels (``--kernels triton-interpret`` runs them on the CPU under Triton's interpreter), and its
decode steps replay one CUDA graph over a static KV cache
(:class:`dsmoe.app.cuda_graphs.StaticDecoder`) unless ``--no-cuda-graph``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import dsmoe
from dsmoe.app.cuda_graphs import StaticDecoder, Step, static_length
from dsmoe.app.device import cpu_kernels, require_cuda_kernels, resolve_device
from dsmoe.app.engine import Engine
from dsmoe.app.expert_stats import RouterTrace
from dsmoe.app.router_trace import eager_router_step, fused_router_step, ort_router_step, tap
from dsmoe.app.sampling import SamplingParams
from dsmoe.app.step_timing import Timing
from dsmoe.cache import cache_layout
from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError, NonFiniteError
from dsmoe.export import MODEL_FILE, OrtDecoder, TrtDecoder
from dsmoe.export.genai_runner import GenaiModel
from dsmoe.export.runner import export_target
from dsmoe.ir import capture
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import run_pipeline

# the last engine run's generated tokens and seconds (prefill included): tokens/s for callers
LAST_RUN: dict = {}


def eager_step(model: torch.nn.Module) -> Step:
    def step(input_ids, attention_mask, position_ids, past):
        return model(input_ids, attention_mask, position_ids, past, use_cache=True)
    return step


def fused_step(model: torch.nn.Module, *, fold_shared_experts: bool = False, absorb_mla: bool = True) -> Step:
    """Capture the model and run the pass pipeline; the fused graph is the step function.

    The graph runs where the model is: on a GPU, call :func:`require_cuda_kernels` first so that
    ``dsmoe::route``/``dsmoe::moe`` dispatch to the plugins' kernels.
    """
    gm, _ = run_pipeline(capture(model), PassContext(fold_shared_experts=fold_shared_experts, absorb_mla=absorb_mla))
    return gm


def empty_cache(config: DeepseekConfig, batch: int, dtype: torch.dtype, device="cpu") -> list:
    """The cache before the first step, in the model's layout (:func:`dsmoe.cache.cache_layout`)."""
    return cache_layout(config).empty(batch, dtype, device)


def greedy_generate(step: Step, config: DeepseekConfig, prompt_ids: list[int], max_new_tokens: int, *,
                    dtype: torch.dtype = torch.float32, stop_at_eos: bool = False,
                    device: str | torch.device = "cpu") -> list[int]:
    """Greedy decoding with the KV cache: one prefill step, then one step per new token
    (:class:`dsmoe.app.engine.Engine` with one sequence).

    The prompt plus the new tokens must fit the model's positions (``max_position_embeddings``);
    a step whose logits are not finite stops with :class:`NonFiniteError` instead of emitting a
    token read from NaN.
    """
    check_request(config, prompt_ids, max_new_tokens)
    return _engine_generate(step, config, [list(prompt_ids)], max_new_tokens, dtype=dtype, device=device,
                            stop_at_eos=stop_at_eos)[0]


def _engine_generate(step, config, prompts, max_new_tokens, *, dtype, device, stop_at_eos=False) -> list[list[int]]:
    """The prompts through the engine, all in one batch (each prefilled alone, then decoded together)."""
    eng = Engine(step, config, dtype=dtype, device=device, max_running=len(prompts),
                 max_step_tokens=len(prompts) + sum(len(p) for p in prompts), max_waiting=len(prompts))
    seqs = [eng.add(p, SamplingParams(max_tokens=max_new_tokens, ignore_eos=not stop_at_eos)) for p in prompts]
    t0 = time.perf_counter()
    eng.run()
    LAST_RUN.update(tokens=sum(len(s.out) for s in seqs), seconds=time.perf_counter() - t0)
    for s in seqs:
        if s.finish_reason == "error":
            raise NonFiniteError(f"{s.error} (were its weights loaded with --allow-nonfinite?)")
    return [s.out for s in seqs]


def check_request(config: DeepseekConfig, prompt_ids: list[int], max_new_tokens: int) -> None:
    """A prompt and a number of new tokens the model can take, or one :class:`DsmoeError`."""
    if not prompt_ids:
        raise DsmoeError("the prompt is empty")
    bad = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
    if bad:
        raise DsmoeError(f"prompt id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    if max_new_tokens < 1:
        raise DsmoeError("--max-new-tokens must be at least 1")
    limit = config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise DsmoeError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                         f"{limit} positions (max_position_embeddings); ask for at most "
                         f"{max(limit - len(prompt_ids), 0)} new tokens, or raise the limit with "
                         "--set max_position_embeddings=N at your own risk (RoPE beyond its trained range)")


def greedy_generate_batch(step: Step, config: DeepseekConfig, prompts: list[list[int]], max_new_tokens: int, *,
                          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> list[list[int]]:
    """Greedy decoding of unequal prompts in one batch (the engine: each prompt prefilled alone,
    then all decoded together in right-aligned, masked KV slots), so each row's tokens are those of
    its prompt alone (up to floating-point ties). ``max_new_tokens`` for every row."""
    for p in prompts:
        check_request(config, p, max_new_tokens)
    return _engine_generate(step, config, [list(p) for p in prompts], max_new_tokens, dtype=dtype, device=device)


def generate_ort(export_dir: str | Path, prompt_ids: list[int], max_new_tokens: int, *,
                 threads: int | None = None) -> list[int]:
    """Greedy decoding of an exported directory in ONNX Runtime (one prefill step, then one per token)."""
    dec = ort_generation_decoder(export_dir, threads)
    return greedy_generate(dec, dec.config, list(prompt_ids), max_new_tokens, dtype=dec.dtype)


def ort_generation_decoder(export_dir: str | Path, threads: int | None = None) -> OrtDecoder:
    """The export's decoder as generation runs it: last-token logits (the loop reads the last row
    only), the cache-shaped keys/values, written in place where the graph allows (no per-step copy)."""
    return OrtDecoder(export_dir, threads=threads, logits="auto", kv_bnsh=True, kv_inplace="auto")


def generate_tensorrt(export_dir: str | Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding of a ``--target tensorrt`` export's engine (the same loop as ONNX Runtime's)."""
    dec = TrtDecoder(export_dir)
    return greedy_generate(dec, dec.config, list(prompt_ids), max_new_tokens, dtype=dec.dtype, device=dec.device)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise DsmoeError(f"--prompt-ids must be integers, got {text!r}") from None
    if not ids:
        raise DsmoeError("--prompt-ids is empty")
    return ids


def _prompts(source: str, prompt_ids, prompt: str | None, genai: GenaiModel | None):
    """Token ids (one list per prompt) from --prompt-ids (repeatable: a batch) or, with a
    tokenizer.json in SOURCE, from --prompt; and the tokenizer that made them (GenAI's own for
    the genai backend)."""
    if isinstance(prompt_ids, str):
        prompt_ids = [prompt_ids]
    if bool(prompt_ids) == (prompt is not None):
        raise DsmoeError("give exactly one of --prompt-ids or --prompt")
    if prompt_ids:
        return [_parse_ids(t) for t in prompt_ids], None
    if genai is not None:
        tok = genai.tokenizer()
        return [[int(i) for i in tok.encode(prompt)]], tok
    tok_path = Path(source) / "tokenizer.json"
    if not tok_path.is_file():
        raise DsmoeError(f"--prompt needs {tok_path}; use --prompt-ids instead")
    tok = load_tokenizer(tok_path, what="--prompt")
    ids = tok.encode(prompt).ids
    if not ids:
        raise DsmoeError(f"--prompt {prompt!r} encodes to no tokens with {tok_path}")
    return [ids], tok


def load_tokenizer(path: Path, *, what: str):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (``what`` names the flag that needs it)."""
    try:
        from tokenizers import Tokenizer  # lazy: optional dependency
    except ImportError:
        raise DsmoeError(f"{what} needs the 'tokenizers' package (pip install tokenizers)") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers package raises plain Exceptions for a bad file
        raise DsmoeError(f"cannot read {path}: not a valid tokenizer.json ({str(e).splitlines()[0][:160]})") from None


def run_generate(*, source: str, prompt_ids: str | list[str] | None = None, prompt: str | None = None,
                 max_new_tokens: int = 16, backend: str = "eager", dtype: str | None = None,
                 fold_shared_experts: bool = False, absorb_mla: bool = True, overrides: dict | None = None,
                 device: str = "cpu", cuda_graph: bool | None = None, allow_nonfinite: bool = False,
                 kernels: str = "reference", trace: RouterTrace | None = None,
                 timing: Timing | None = None) -> tuple[list[list[int]], str | None]:
    """Returns the generated ids, one list per prompt (several ``prompt_ids`` strings are one
    batch), and their text when a tokenizer was used. ``kernels`` (``reference`` |
    ``triton-interpret``) is what the fused graph's ops run on the CPU. With ``trace``, the
    routers' choices of every step (prefill and each new token) are recorded into it
    (``--router-stats``; an ONNX source must be exported with ``--router-stats``). With ``timing``,
    the prefill and the decode steps are timed into it (a TensorRT run is not split).

    Backends ``ort`` and ``genai`` run an export directory: ``ort`` with dsmoe's own loop
    (:class:`dsmoe.export.OrtDecoder`), ``genai`` in ONNX Runtime GenAI from the directory's
    ``genai_config.json`` (GenAI's search ends a sequence at an eos id; the other backends always
    make ``max_new_tokens``). Batches are left-padded in dsmoe's loops, right-padded for GenAI
    (what GenAI 0.18 detects on the CPU).
    """
    if max_new_tokens < 1:
        raise DsmoeError("--max-new-tokens must be at least 1")
    timed = timing.wrap if timing is not None else (lambda step: step)
    exported = (Path(source) / MODEL_FILE).is_file()
    if backend in ("ort", "genai", "tensorrt") or exported:
        target = export_target(source) if exported else None
        if not exported:
            raise DsmoeError(f"the {backend} backend runs an exported directory; {source} has no {MODEL_FILE} "
                             f"(run: dsmoe-export {source}{' --target tensorrt' if backend == 'tensorrt' else ''} "
                             "--out DIR)")
        if target == "tensorrt" and backend != "tensorrt":
            raise DsmoeError(f"{source} is a TensorRT export (--target tensorrt): use --backend tensorrt")
        if target != "tensorrt" and backend not in ("ort", "genai"):
            raise DsmoeError(f"{source} is an ONNX Runtime export: use --backend ort or --backend genai")
        unused = [flag for flag, given in (("--device", device != "cpu"), ("--dtype", dtype is not None),
                                           ("--set", bool(overrides)), ("--fold-shared-experts", fold_shared_experts),
                                           ("--cuda-graph", cuda_graph is not None),
                                           ("--allow-nonfinite", allow_nonfinite),
                                           ("--kernels", kernels != "reference"),
                                           ("--no-absorb-mla", not absorb_mla)) if given]
        if unused:
            where = "TensorRT on the GPU" if backend == "tensorrt" else "ONNX Runtime's CPU provider"
            raise DsmoeError(f"{', '.join(unused)} do(es) not apply to an exported model (the {backend} backend runs "
                             f"the export as it was written, on {where}); drop it")
        if trace is not None and backend in ("genai", "tensorrt"):
            raise DsmoeError("--router-stats reads the routers in dsmoe's own loops: use --backend ort")
        genai = GenaiModel(source) if backend == "genai" else None
        prompts, tok = _prompts(source, prompt_ids, prompt, genai)
        config = dsmoe.load_config(source)
        for p in prompts:
            check_request(config, p, max_new_tokens)
        if genai is not None:
            new = genai.generate(prompts, max_new_tokens, on_token=timing and timing.mark, on_start=timing and timing.start)
        elif trace is not None:
            dec = ort_router_step(source)
            new = _generate(timed(tap(dec, trace)), dec.config, prompts, max_new_tokens, dtype=dec.dtype)
        elif backend == "tensorrt":
            if len(prompts) > 1:
                raise DsmoeError("the tensorrt backend takes one prompt (its engine's loop is not batched here)")
            new = [generate_tensorrt(source, prompts[0], max_new_tokens)]
        else:
            dec = ort_generation_decoder(source)
            new = _generate(timed(dec), dec.config, prompts, max_new_tokens, dtype=dec.dtype)
    else:
        prompts, tok = _prompts(source, prompt_ids, prompt, None)
        dev = resolve_device(device)
        if cuda_graph is not None and (backend != "fused" or dev.type != "cuda"):
            raise DsmoeError(f"--{'' if cuda_graph else 'no-'}cuda-graph needs --backend fused --device cuda")
        fused_only = [f for f, given in (("--fold-shared-experts", fold_shared_experts), ("--no-absorb-mla", not absorb_mla))
                      if given]
        if fused_only and backend != "fused":
            raise DsmoeError(f"{', '.join(fused_only)} apply to --backend fused only (the {backend} backend runs the "
                             "model as written)")
        if kernels != "reference" and (backend != "fused" or dev.type != "cpu"):
            raise DsmoeError(f"--kernels {kernels} runs the fused graph's ops on the CPU: use --backend fused "
                             "(and no --device)")
        if trace is not None and cuda_graph and dev.type == "cuda":
            raise DsmoeError("--router-stats does not run inside a CUDA graph: use --no-cuda-graph")
        if dev.type == "cuda" and backend == "fused":
            require_cuda_kernels()
        config = dsmoe.load_config(source, overrides)
        if not absorb_mla and not config.is_mla:
            raise DsmoeError(f"--no-absorb-mla applies to MLA models (deepseek_v2/v3) only; {source} is {config.model_type}")
        for p in prompts:  # before loading any weight
            check_request(config, p, max_new_tokens)
        with cpu_kernels(kernels):
            model = dsmoe.load(source, dtype=dtype, overrides=overrides, device=dev, allow_nonfinite=allow_nonfinite)
            config, mdtype = model.config, next(model.parameters()).dtype
            if trace is not None:
                step = tap(eager_router_step(model) if backend == "eager"
                           else fused_router_step(model, fold_shared_experts=fold_shared_experts, absorb_mla=absorb_mla),
                           trace)
            elif backend == "eager":
                step = eager_step(model)
            else:
                step = fused_step(model, fold_shared_experts=fold_shared_experts, absorb_mla=absorb_mla)
                if dev.type == "cuda" and cuda_graph is not False and len(prompts) == 1:
                    step = StaticDecoder(step, config, max_len=static_length(len(prompts[0]) + max_new_tokens),
                                         dtype=mdtype, device=dev, cuda_graph=True)
            new = _generate(timed(step), config, prompts, max_new_tokens, dtype=mdtype, device=dev)
    return new, (tok.decode(new[0]) if tok is not None else None)


def _generate(step, config, prompts, max_new_tokens, **kw) -> list[list[int]]:
    if len(prompts) == 1:
        return [greedy_generate(step, config, prompts[0], max_new_tokens, **kw)]
    return greedy_generate_batch(step, config, prompts, max_new_tokens, **kw)
