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
from dsmoe.app.device import require_cuda_kernels, resolve_device
from dsmoe.cache import cache_layout
from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError
from dsmoe.export import MODEL_FILE, OrtDecoder
from dsmoe.ir import capture
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import run_pipeline


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


@torch.no_grad()
def greedy_generate(step: Step, config: DeepseekConfig, prompt_ids: list[int], max_new_tokens: int, *,
                    dtype: torch.dtype = torch.float32, stop_at_eos: bool = False,
                    device: str | torch.device = "cpu") -> list[int]:
    """Greedy decoding with the KV cache: one prefill step, then one step per new token."""
    if not prompt_ids:
        raise DsmoeError("the prompt is empty")
    bad = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
    if bad:
        raise DsmoeError(f"prompt id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    ids = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
    past = empty_cache(config, 1, dtype, device)
    out: list[int] = []
    pos = 0
    for _ in range(max_new_tokens):
        S = ids.shape[1]
        mask = torch.ones(1, pos + S, dtype=torch.int64, device=device)
        position_ids = torch.arange(pos, pos + S, dtype=torch.int64, device=device).unsqueeze(0)
        logits, past = step(ids, mask, position_ids, list(past))
        nxt = int(torch.as_tensor(logits)[0, -1].argmax())
        out.append(nxt)
        pos += S
        ids = torch.tensor([[nxt]], dtype=torch.int64, device=device)
        if stop_at_eos and nxt == config.eos_token_id:
            break
    return out


def generate_ort(export_dir: str | Path, prompt_ids: list[int], max_new_tokens: int, *,
                 threads: int | None = None) -> list[int]:
    """Greedy decoding of an exported directory in ONNX Runtime (one prefill step, then one per token)."""
    dec = OrtDecoder(export_dir, threads=threads)
    return greedy_generate(dec, dec.config, list(prompt_ids), max_new_tokens, dtype=dec.dtype)


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
    tok = Tokenizer.from_file(str(tok_path))
    return tok.encode(prompt).ids, tok


def run_generate(*, source: str, prompt_ids: str | None = None, prompt: str | None = None, max_new_tokens: int = 16,
                 backend: str = "eager", dtype: str | None = None, fold_shared_experts: bool = False,
                 absorb_mla: bool = True, overrides: dict | None = None, device: str = "cpu",
                 cuda_graph: bool | None = None) -> tuple[list[int], str | None]:
    """Returns the generated ids (and their text when a tokenizer was used)."""
    if max_new_tokens < 1:
        raise DsmoeError("--max-new-tokens must be at least 1")
    ids, tok = _prompt(source, prompt_ids, prompt)
    exported = (Path(source) / MODEL_FILE).is_file()
    if backend == "ort" or exported:
        if not exported:
            raise DsmoeError(f"the ort backend runs an exported directory; {source} has no {MODEL_FILE} "
                             f"(run: dsmoe-export {source} --out DIR)")
        if backend != "ort":
            raise DsmoeError(f"{source} is an ONNX export: use --backend ort")
        if device != "cpu":
            raise DsmoeError("the ort backend runs on ONNX Runtime's CPU execution provider: drop --device")
        new = generate_ort(source, ids, max_new_tokens)
    else:
        dev = resolve_device(device)
        if cuda_graph and (backend != "fused" or dev.type != "cuda"):
            raise DsmoeError("--cuda-graph needs --backend fused --device cuda")
        if dev.type == "cuda" and backend == "fused":
            require_cuda_kernels()
        model = dsmoe.load(source, dtype=dtype, overrides=overrides, device=dev)
        config, mdtype = model.config, next(model.parameters()).dtype
        if backend == "eager":
            step = eager_step(model)
        else:
            step = fused_step(model, fold_shared_experts=fold_shared_experts, absorb_mla=absorb_mla)
            if dev.type == "cuda" and cuda_graph is not False:
                step = StaticDecoder(step, config, max_len=static_length(len(ids) + max_new_tokens), dtype=mdtype,
                                     device=dev, cuda_graph=True)
        new = greedy_generate(step, config, ids, max_new_tokens, dtype=mdtype, device=dev)
    return new, (tok.decode(new) if tok is not None else None)
