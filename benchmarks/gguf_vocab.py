"""A checkpoint's byte-level BPE ``tokenizer.json`` as GGUF tokenizer metadata, so that llama.cpp
(``llama-perplexity``) tokenizes text to the same ids as ``tokenizers`` does.

Written as llama.cpp's converter writes a GPT-2-style vocabulary: ``tokenizer.ggml.model = "gpt2"``,
pre-tokenizer ``gpt-2`` (GPT-2's split regex, what ``pre_tokenizers.ByteLevel(use_regex=True)``
applies), the tokens in id order with their types (added special tokens → control), the merges,
BOS/EOS ids, and no automatic BOS (dsmoe eval scores text without one). Anything else (another
model type, another pre-tokenizer, a normalizer) is refused: llama.cpp would split text differently.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError


def add_tokenizer(w, source: str | Path, config: DeepseekConfig) -> bool:
    """Add the tokenizer of ``source`` to GGUF writer ``w``; False (nothing written) when it has none."""
    path = Path(source) / "tokenizer.json"
    if not path.is_file():
        return False
    import gguf

    doc = json.loads(path.read_text())
    model, pre = doc.get("model", {}), doc.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space") or doc.get("normalizer"):
        raise DsmoeError(f"{path}: only byte-level BPE (ByteLevel pre-tokenizer with GPT-2's regex, no prefix space, "
                         "no normalizer) is written to GGUF, where llama.cpp splits text the same way")
    vocab = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in doc.get("added_tokens", [])}
    vocab.update(special)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise DsmoeError(f"{path}: token ids are not 0..{len(vocab) - 1}")
    tokens = [""] * config.vocab_size
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for tok, i in vocab.items():
        if i >= config.vocab_size:
            raise DsmoeError(f"{path}: token id {i} is outside the model's vocabulary of {config.vocab_size}")
        tokens[i] = tok
        types[i] = gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL
    for i, t in enumerate(tokens):
        if not t:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if config.bos_token_id is not None:
        w.add_bos_token_id(config.bos_token_id)
    if config.eos_token_ids:
        w.add_eos_token_id(config.eos_token_ids[0])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    return True
