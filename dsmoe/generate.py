"""``dsmoe generate``: greedy decoding on the eager model, the fused graph, or ONNX Runtime.

On ``--device cuda`` the model is built or loaded on the GPU; the fused graph runs the plugins'
CUDA kernels, and its decode steps replay one CUDA graph over a static KV cache
(:class:`dsmoe.runtime.StaticDecoder`) unless ``--no-cuda-graph``.
"""

from __future__ import annotations

from pathlib import Path

from dsmoe.errors import DsmoeError


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
        from tokenizers import Tokenizer
    except ImportError:
        raise DsmoeError("--prompt needs the 'tokenizers' package (pip install tokenizers)") from None
    tok = Tokenizer.from_file(str(tok_path))
    return tok.encode(prompt).ids, tok


def run_generate(*, source: str, prompt_ids: str | None = None, prompt: str | None = None, max_new_tokens: int = 16,
                 backend: str = "eager", dtype: str | None = None, fold_shared_experts: bool = False,
                 overrides: dict | None = None, device: str = "cpu",
                 cuda_graph: bool | None = None) -> tuple[list[int], str | None]:
    """Returns the generated ids (and their text when a tokenizer was used)."""
    import dsmoe
    from dsmoe.runtime import (StaticDecoder, eager_step, fused_step, greedy_generate, require_cuda_kernels,
                               resolve_device, static_length)

    if max_new_tokens < 1:
        raise DsmoeError("--max-new-tokens must be at least 1")
    ids, tok = _prompt(source, prompt_ids, prompt)
    exported = (Path(source) / "model.onnx").is_file()
    if backend == "ort" or exported:
        if not exported:
            raise DsmoeError(f"the ort backend runs an exported directory; {source} has no model.onnx "
                             f"(run: dsmoe-export {source} --out DIR)")
        if backend not in ("ort",):
            raise DsmoeError(f"{source} is an ONNX export: use --backend ort")
        if device != "cpu":
            raise DsmoeError("the ort backend runs on ONNX Runtime's CPU execution provider: drop --device")
        from dsmoe.export import generate_ort

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
            step = fused_step(model, fold_shared_experts=fold_shared_experts)
            if dev.type == "cuda" and cuda_graph is not False:
                step = StaticDecoder(step, config, max_len=static_length(len(ids) + max_new_tokens), dtype=mdtype,
                                     device=dev, cuda_graph=True)
        new = greedy_generate(step, config, ids, max_new_tokens, dtype=mdtype, device=dev)
    return new, (tok.decode(new) if tok is not None else None)
