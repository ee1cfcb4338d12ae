"""The minimoe tokenizer: byte-level BPE trained with the ``tokenizers`` library.

GPT-2's byte-level pre-tokenizer (its split regex, no prefix space) so that llama.cpp's ``gpt-2``
pre-tokenizer splits text the same way and ``llama-perplexity`` sees the same token ids. Special
tokens: ``<|endoftext|>`` (id 0: document separator, BOS and EOS) and the chat roles.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>")
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries (specials first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def tokenizer_config() -> str:
    """``tokenizer_config.json`` (transformers' fields) with the chat template."""
    return json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "unk_token": None,
        "pad_token": EOS, "add_bos_token": False, "add_eos_token": False, "model_max_length": 1024,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n"
