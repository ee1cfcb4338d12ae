"""Wall time of a generation, split as every decoding loop splits it: the first step (the prefill:
the whole prompt, which also yields the first new token) and the rest (decode: one step per
further token). ``dsmoe generate`` prints it as tokens/s on stderr and puts it in ``--json``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timing:
    prefill_s: float | None = None
    decode_s: float = 0.0
    decode_steps: int = 0
    _marks: list[float] = field(default_factory=list, repr=False)

    def wrap(self, step: Callable) -> Callable:
        """``step`` timed: its first call is the prefill, every later one a decode step."""

        def timed(*args, **kwargs):
            t = time.perf_counter()
            result = step(*args, **kwargs)
            self.add(time.perf_counter() - t)
            return result

        timed.present_views = getattr(step, "present_views", False)  # what the engine must know of the step
        return timed

    def add(self, seconds: float) -> None:
        if self.prefill_s is None:
            self.prefill_s = seconds
        else:
            self.decode_s += seconds
            self.decode_steps += 1

    def start(self) -> None:
        """For a loop dsmoe does not own (GenAI): call :meth:`start`, then :meth:`mark` after each token."""
        self._marks = [time.perf_counter()]

    def mark(self) -> None:
        now = time.perf_counter()
        self.add(now - self._marks[-1])
        self._marks.append(now)

    def as_dict(self, *, prompt_tokens: int | None, new_tokens: int, rows: int = 1) -> dict:
        """``decode_tokens_per_s`` counts every row of a batch (rows × decode steps / decode time)."""
        return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "decode_steps": self.decode_steps,
                "decode_tokens_per_s": rows * self.decode_steps / self.decode_s if self.decode_s > 0 else None}

    def line(self, *, prompt_tokens: int | None, new_tokens: int, rows: int = 1) -> str:
        """One line for stderr, e.g. ``16 tokens: prefill 4 tokens 31.0 ms, decode 15 steps 9.8 ms/step (102.0 tokens/s)``."""
        if self.prefill_s is None:
            return f"{new_tokens} tokens (no step was timed)"
        prompt = f"{prompt_tokens} tokens " if prompt_tokens is not None else ""
        text = f"{new_tokens} tokens: prefill {prompt}{self.prefill_s * 1e3:.1f} ms"
        if self.decode_steps:
            per = self.decode_s / self.decode_steps
            text += (f", decode {self.decode_steps} steps {per * 1e3:.1f} ms/step "
                     f"({rows * self.decode_steps / self.decode_s:.1f} tokens/s)")
        return text
