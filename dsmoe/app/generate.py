"""``dsmoe generate``: greedy decoding on the eager model, the fused graph, or ONNX Runtime.

A *step function* has the decoder signature of :mod:`dsmoe.ir`:
``step(input_ids, attention_mask, position_ids, past) -> (logits, present)``; the eager model
(:func:`eager_step`), the fused graph (:func:`fused_step`) and an exported model in ONNX Runtime
(:class:`dsmoe.export.OrtDecoder`) all are one, so :func:`greedy_generate` is written once.

On ``--device cuda`` the model is built or loaded on the GPU; the fused graph runs the plugins'
CUDA kernels, and its decode steps replay one CUDA graph over a static KV cache
(:class:`dsmoe.app.cuda_graphs.StaticDecoder`) unless ``--no-cuda-graph``.
"""

from __future__ import annotations

from pathlib import Path

import torch

import dsmoe
from dsmoe.app.cuda_graphs import StaticDecoder, Step, static_length
from dsmoe.app.device import cpu_kernels, require_cuda_kernels, resolve_device
from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError, NonFiniteError
from dsmoe.export import MODEL_FILE, OrtDecoder, TrtDecoder
from dsmoe.export.runner import export_target
from dsmoe.ir import capture
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import run_pipeline


def eager_step(model: torch.nn.Module) -> Step:
    def step(input_ids, attention_mask, position_ids, past):
        return model(input_ids, attention_mask, position_ids, past, use_cache=True)
    return step


def fused_step(model: torch.nn.Module, *, fold_shared_experts: bool = False) -> Step:
    """Capture the model and run the pass pipeline; the fused graph is the step function.

    The graph runs where the model is: on a GPU, call :func:`require_cuda_kernels` first so that
    ``dsmoe::route``/``dsmoe::moe`` dispatch to the plugins' kernels.
    """
    gm, _ = run_pipeline(capture(model), PassContext(fold_shared_experts=fold_shared_experts))
    return gm


def empty_cache(config: DeepseekConfig, batch: int, dtype: torch.dtype, device="cpu") -> list:
    shape = (batch, config.num_key_value_heads, 0, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]


@torch.no_grad()
def greedy_generate(step: Step, config: DeepseekConfig, prompt_ids: list[int], max_new_tokens: int, *,
                    dtype: torch.dtype = torch.float32, stop_at_eos: bool = False,
                    device: str | torch.device = "cpu") -> list[int]:
    """Greedy decoding with the KV cache: one prefill step, then one step per new token.

    The prompt plus the new tokens must fit the model's positions (``max_position_embeddings``);
    a step whose logits are not finite stops with :class:`NonFiniteError` instead of emitting a
    token read from NaN.
    """
    check_request(config, prompt_ids, max_new_tokens)
    ids = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
    past = empty_cache(config, 1, dtype, device)
    out: list[int] = []
    pos = 0
    for _ in range(max_new_tokens):
        S = ids.shape[1]
        mask = torch.ones(1, pos + S, dtype=torch.int64, device=device)
        position_ids = torch.arange(pos, pos + S, dtype=torch.int64, device=device).unsqueeze(0)
        logits, past = step(ids, mask, position_ids, list(past))
        last = torch.as_tensor(logits)[0, -1]
        if not bool(torch.isfinite(last).all()):
            raise NonFiniteError(f"the model's logits are not finite (NaN/Inf) at step {len(out) + 1}: no token can be "
                                 "chosen (were its weights loaded with --allow-nonfinite?)")
        nxt = int(last.argmax())
        out.append(nxt)
        pos += S
        ids = torch.tensor([[nxt]], dtype=torch.int64, device=device)
        if stop_at_eos and nxt in config.eos_token_ids:
            break
    return out


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


def generate_ort(export_dir: str | Path, prompt_ids: list[int], max_new_tokens: int, *,
                 threads: int | None = None) -> list[int]:
    """Greedy decoding of an exported directory in ONNX Runtime (one prefill step, then one per token)."""
    dec = OrtDecoder(export_dir, threads=threads)
    return greedy_generate(dec, dec.config, list(prompt_ids), max_new_tokens, dtype=dec.dtype)


def generate_tensorrt(export_dir: str | Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding of a ``--target tensorrt`` export's engine (the same loop as ONNX Runtime's)."""
    dec = TrtDecoder(export_dir)
    return greedy_generate(dec, dec.config, list(prompt_ids), max_new_tokens, dtype=dec.dtype, device=dec.device)


def _prompt(source: str, prompt_ids: str | None, prompt: str | None):
    """Token ids from --prompt-ids or, with a tokenizer.json in SOURCE, from --prompt."""
    if (prompt_ids is None) == (prompt is None):
        raise DsmoeError("give exactly one of --prompt-ids or --prompt")
    if prompt_ids is not None:
        try:
            ids = [int(t) for t in prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise DsmoeError(f"--prompt-ids must be integers, got {prompt_ids!r}") from None
        if not ids:
            raise DsmoeError("--prompt-ids is empty")
        return ids, None
    tok_path = Path(source) / "tokenizer.json"
    if not tok_path.is_file():
        raise DsmoeError(f"--prompt needs {tok_path}; use --prompt-ids instead")
    try:
        from tokenizers import Tokenizer  # lazy: optional dependency
    except ImportError:
        raise DsmoeError("--prompt needs the 'tokenizers' package (pip install tokenizers)") from None
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # the tokenizers package raises plain Exceptions for a bad file
        raise DsmoeError(f"cannot read {tok_path}: not a valid tokenizer.json ({str(e).splitlines()[0][:160]})") from None
    ids = tok.encode(prompt).ids
    if not ids:
        raise DsmoeError(f"--prompt {prompt!r} encodes to no tokens with {tok_path}")
    return ids, tok


def run_generate(*, source: str, prompt_ids: str | None = None, prompt: str | None = None, max_new_tokens: int = 16,
                 backend: str = "eager", dtype: str | None = None, fold_shared_experts: bool = False,
                 overrides: dict | None = None, device: str = "cpu", cuda_graph: bool | None = None,
                 allow_nonfinite: bool = False, kernels: str = "reference") -> tuple[list[int], str | None]:
    """Returns the generated ids (and their text when a tokenizer was used). ``kernels``
    (``reference`` | ``triton-interpret``) is what the fused graph's ops run on the CPU."""
    if max_new_tokens < 1:
        raise DsmoeError("--max-new-tokens must be at least 1")
    ids, tok = _prompt(source, prompt_ids, prompt)
    exported = (Path(source) / MODEL_FILE).is_file()
    if backend in ("ort", "tensorrt") or exported:
        want = "tensorrt" if exported and export_target(source) == "tensorrt" else "ort"
        if not exported:
            raise DsmoeError(f"the {backend} backend runs an exported directory; {source} has no {MODEL_FILE} "
                             f"(run: dsmoe-export {source} --target {backend} --out DIR)")
        if backend != want:
            what = "a TensorRT export (--target tensorrt)" if want == "tensorrt" else "an ONNX Runtime export"
            raise DsmoeError(f"{source} is {what}: use --backend {want}")
        unused = [flag for flag, given in (("--device", device != "cpu"), ("--dtype", dtype is not None),
                                           ("--set", bool(overrides)), ("--fold-shared-experts", fold_shared_experts),
                                           ("--cuda-graph", cuda_graph is not None),
                                           ("--allow-nonfinite", allow_nonfinite),
                                           ("--kernels", kernels != "reference")) if given]
        if unused:
            where = "ONNX Runtime's CPU provider" if backend == "ort" else "TensorRT on the GPU"
            raise DsmoeError(f"{', '.join(unused)} do(es) not apply to an exported model (the {backend} backend runs "
                             f"the export as it was written, on {where}); drop it")
        new = (generate_ort if backend == "ort" else generate_tensorrt)(source, ids, max_new_tokens)
    else:
        dev = resolve_device(device)
        if cuda_graph and (backend != "fused" or dev.type != "cuda"):
            raise DsmoeError("--cuda-graph needs --backend fused --device cuda")
        if kernels != "reference" and (backend != "fused" or dev.type != "cpu"):
            raise DsmoeError(f"--kernels {kernels} runs the fused graph's ops on the CPU: use --backend fused "
                             "(and no --device)")
        if dev.type == "cuda" and backend == "fused":
            require_cuda_kernels()
        check_request(dsmoe.load_config(source, overrides), ids, max_new_tokens)  # before loading any weight
        with cpu_kernels(kernels):
            model = dsmoe.load(source, dtype=dtype, overrides=overrides, device=dev, allow_nonfinite=allow_nonfinite)
            config, mdtype = model.config, next(model.parameters()).dtype
            if backend == "eager":
                step = eager_step(model)
            else:
                step = fused_step(model, fold_shared_experts=fold_shared_experts)
                if dev.type == "cuda" and cuda_graph is not False:
                    step = StaticDecoder(step, config, max_len=static_length(len(ids) + max_new_tokens), dtype=mdtype,
                                         device=dev, cuda_graph=True)
            new = greedy_generate(step, config, ids, max_new_tokens, dtype=mdtype, device=dev)
    return new, (tok.decode(new) if tok is not None else None)
