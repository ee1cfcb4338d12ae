"""Text in and out of the server: the checkpoint's ``tokenizer.json`` (the ``tokenizers`` library),
its chat template from ``tokenizer_config.json`` rendered the way transformers renders it (a
sandboxed jinja2 environment with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, the
``tojson`` filter, ``raise_exception`` and ``strftime_now``; the special tokens as variables), and
streaming detokenization that never emits a broken UTF-8 sequence or a prefix of a stop string.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from dsmoe.errors import DsmoeError


class Text:
    """A source's tokenizer and chat template (either may be missing)."""

    def __init__(self, source: str | Path):
        d = Path(source)
        self.tokenizer = None
        self.template: str | None = None
        self.special: dict[str, str] = {}
        if (d / "tokenizer.json").is_file():
            from dsmoe.app.generate import load_tokenizer
            self.tokenizer = load_tokenizer(d / "tokenizer.json", what="dsmoe serve's text prompts")
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except ValueError as e:
                raise DsmoeError(f"{cfg_path} is not valid JSON ({e})") from None
            template = cfg.get("chat_template")
            if isinstance(template, list):  # named templates: transformers picks "default"
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            self.template = template if isinstance(template, str) else None
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                v = cfg.get(key)
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str):
                    self.special[key] = v

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special``: the tokenizer's post-processor adds its special tokens
        (BOS...) as ``dsmoe generate --prompt`` does; a rendered chat template has its own."""
        if self.tokenizer is None:
            raise DsmoeError("this model has no tokenizer.json: send prompts as token ids (a list of integers)")
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def chat_prompt(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise DsmoeError("this model has no chat template (tokenizer_config.json's chat_template): use /v1/completions")
        return render_chat(self.template, messages, add_generation_prompt=add_generation_prompt, **self.special)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **special) -> str:
    """The chat template rendered as transformers' ``apply_chat_template(tokenize=False)`` does."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special)
    except jinja2.exceptions.TemplateError as e:
        raise DsmoeError(f"the chat template failed on these messages: {e}") from None


class Detokenizer:
    """Incremental text of a growing list of ids. :meth:`add` returns the new text that is safe to
    show: complete characters only (a decode ending in U+FFFD waits for the next token), and
    nothing that could be the start of a stop string. Once a stop string appears, the text is cut
    before it and :attr:`stopped` is set."""

    def __init__(self, text: Text, stop: tuple[str, ...] = ()):
        self.text, self.stop = text, stop
        self.ids: list[int] = []
        self.full = ""        # decoded, complete characters
        self.sent = 0         # characters of ``full`` already returned
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        decoded = self.text.decode(self.ids)
        if decoded.endswith("\ufffd"):
            return ""
        self.full = decoded
        return self._release(final=False)

    def flush(self) -> str:
        """The rest at the end of the sequence (held stop-string prefixes are real text then, and
        bytes that never completed a character are shown as U+FFFD, as a full decode shows them)."""
        if not self.stopped:
            self.full = self.text.decode(self.ids)
        return self._release(final=True)   # a stop string completed by the last bytes still cuts

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        for s in self.stop:
            at = self.full.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.full, self.stopped = self.full[:at], True
        end = len(self.full)
        if not final and not self.stopped:
            for s in self.stop:   # hold back the longest tail that begins a stop string
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.full.endswith(s[:k]):
                        end = min(end, len(self.full) - k)
                        break
        out, self.sent = self.full[self.sent:end], max(self.sent, end)
        return out
