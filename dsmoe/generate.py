"""``dsmoe generate``: greedy decoding on the eager model, the fused graph, or ONNX Runtime."""

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
                 overrides: dict | None = None) -> tuple[list[int], str | None]:
    """Returns the generated ids (and their text when a tokenizer was used)."""
    import dsmoe
    from dsmoe.runtime import eager_step, fused_step, greedy_generate

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
        from dsmoe.export import generate_ort

        new = generate_ort(source, ids, max_new_tokens)
    else:
        model = dsmoe.load(source, dtype=dtype, overrides=overrides)
        config = model.config
        step = eager_step(model) if backend == "eager" else fused_step(model, fold_shared_experts=fold_shared_experts)
        new = greedy_generate(step, config, ids, max_new_tokens, dtype=next(model.parameters()).dtype)
    return new, (tok.decode(new) if tok is not None else None)
