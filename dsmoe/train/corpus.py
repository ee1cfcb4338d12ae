"""The training corpora, read where they lie (never copied): three domains every machine of this kind has.

* ``code``  — the Python standard library's sources (``<stdlib>/**/*.py``, without ``site-packages``)
* ``legal`` — ``/usr/share/common-licenses/*`` and ``/usr/share/doc/*/copyright``
* ``prose`` — the manual pages ``/usr/share/man/**`` (gzipped troff, several languages), troff
  markup stripped by :func:`strip_troff`; the ~17k generated ``gcloud*`` pages (one template, four
  fifths of the files) are left out so that prose is prose

Held-out files are named by ``heldout.txt`` beside this file (one path per line, ``domain<TAB>path``;
code paths relative to the standard library, so another Python version finds its own copies):
training never reads them, evaluation reads only them (:func:`heldout_text`). Which files exist varies
a little between machines; a listed file that is absent is skipped, never replaced.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import random
import re
import sys
import sysconfig
import tempfile
import unicodedata
from pathlib import Path

from dsmoe.errors import DsmoeError

DOMAINS = ("code", "legal", "prose")
HELDOUT_LIST = Path(__file__).with_name("heldout.txt")
MAN_ROOT = Path("/usr/share/man")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def domain_files(domain: str) -> list[Path]:
    """Every file of ``domain`` on this machine, sorted (a deterministic order for seeded sampling)."""
    if domain == "code":
        root = stdlib_root()
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    elif domain == "legal":
        files = [p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file()]
        files += list(Path("/usr/share/doc").glob("*/copyright"))
    elif domain == "prose":
        files = [p for p in MAN_ROOT.rglob("*") if p.is_file() and not p.is_symlink() and not p.name.startswith("gcloud")]
    else:
        raise DsmoeError(f"unknown corpus domain {domain!r} (domains: {', '.join(DOMAINS)})")
    return sorted(p for p in files if p.is_file())


def read_text(domain: str, path: Path) -> str | None:
    """The text of one corpus file (troff stripped for man pages); None when it is not UTF-8 text."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    if "\0" in text:
        return None
    return strip_troff(text) if domain == "prose" else text


_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_SIZE = re.compile(r"\\s[+-]?\d+")
_SPECIAL = {"em": "—", "en": "–", "hy": "-", "bu": "•", "co": "©", "rg": "®", "aq": "'", "dq": '"',
            "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "mu": "×",
            "lh": "<=", "rh": "=>", "fo": "«", "fc": "»", "de": "°", "tm": "™", "bv": "|", "ba": "|", "pl": "+"}
_ACCENT = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327", "o": "\u030a"}
_SPECIAL_RE = re.compile(r"\\\((..)|\\\[([^\]]*)\]")
_STRING_RE = re.compile(r"\\\*(\(..|\[[^\]]*\]|.)")
_OTHER = re.compile(r"\\[&|^%c:!)]|\\[hvwlLxbNoDHSRz]'[^']*'|\\[nkgmY](\(..|\[[^\]]*\]|.)|\\[dtu]")
_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "OP", "UR", "MT",
                "Nm", "Nd", "Sh", "Ss", "Fl", "Ar", "Pa", "Xr", "Dq", "Sq", "Ql", "Em", "Cm", "Fn", "Va", "Dv", "Er",
                "Ev", "It", "Op", "Li", "Ic", "Ad", "Sy", "Tn"}
_BREAK_MACROS = {"PP", "LP", "P", "Pp", "sp", "br", "TP", "IP", "HP", "SH", "SS", "Sh", "Ss"}


def _special(name: str) -> str:
    """A troff special character: ``:u`` → ü, ``'e`` → é, ``ss`` → ß, ``em`` → —; unknown ones → ''."""
    if name in _SPECIAL:
        return _SPECIAL[name]
    if name == "ss":
        return "ß"
    if len(name) == 2 and name[0] in _ACCENT and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + _ACCENT[name[0]])
    if name.startswith("u") and len(name) >= 5:  # \[u00FC]
        try:
            return chr(int(name[1:5], 16))
        except ValueError:
            return ""
    return ""


def strip_troff(src: str) -> str:
    """Man-page troff → plain text: comments and formatting requests dropped, the words of text
    macros kept (``.SH NAME`` → ``NAME``), escapes for fonts/sizes removed, special characters mapped."""
    out: list[str] = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"', ".\\#")):
            continue
        if line[:1] in (".", "'"):
            name, _, args = line[1:].strip().partition(" ")
            if name in _BREAK_MACROS and out and out[-1] != "":
                out.append("")
            if name not in _TEXT_MACROS or not args:
                continue
            line = args.replace('"', "") if name not in ("UR", "MT") else args
        line = _FONT.sub("", line)
        line = _SIZE.sub("", line)
        line = _SPECIAL_RE.sub(lambda m: _special(m.group(1) or m.group(2)), line)
        line = _STRING_RE.sub("", line)
        line = _OTHER.sub("", line)
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ").replace("\\0", " ")
        out.append(line.rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def is_heldout_by_rule(path: Path) -> bool:
    """The rule the committed list was drawn with (1 file in 25, by a hash of the path)."""
    return int(hashlib.sha1(str(path).encode()).hexdigest(), 16) % 25 == 0


def heldout_paths() -> dict[str, list[Path]]:
    """The committed held-out list: ``{domain: [path, …]}`` (paths may be absent on another machine)."""
    out: dict[str, list[Path]] = {d: [] for d in DOMAINS}
    for line in HELDOUT_LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            domain, path = line.split("\t")
            out[domain].append(stdlib_root() / path if domain == "code" else Path(path))
    return out


def training_files(domain: str) -> list[Path]:
    held = set(heldout_paths()[domain])
    return [p for p in domain_files(domain) if p not in held]


def sample_texts(domain: str, max_bytes: int, *, seed: int) -> list[str]:
    """Training documents of ``domain``: files in a seeded random order until ``max_bytes`` of text."""
    files = training_files(domain)
    random.Random(f"{seed}-{domain}").shuffle(files)
    texts, total = [], 0
    for p in files:
        t = read_text(domain, p)
        if not t or len(t) < 64:
            continue
        texts.append(t)
        total += len(t.encode())
        if total >= max_bytes:
            break
    return texts


def heldout_text(domain: str, max_bytes: int | None = None) -> str:
    """The held-out text of ``domain``: its listed files that exist, in list order, joined by a blank line."""
    parts, total = [], 0
    for p in heldout_paths()[domain]:
        t = read_text(domain, p) if p.is_file() else None
        if t:
            parts.append(t)
            total += len(t.encode())
            if max_bytes is not None and total >= max_bytes:
                break
    if not parts:
        raise DsmoeError(f"no held-out {domain} files of {HELDOUT_LIST.name} exist on this machine")
    text = "\n\n".join(parts)
    return text if max_bytes is None else text.encode()[:max_bytes].decode("utf-8", "ignore")


def write_heldout_list(path: Path = HELDOUT_LIST) -> int:
    """Draw the held-out list by :func:`is_heldout_by_rule` (run once; the result is committed)."""
    lines = ["# held-out files of the minimoe corpora (domain<TAB>path); drawn by dsmoe.train.corpus.is_heldout_by_rule"]
    for d in DOMAINS:
        root = stdlib_root()
        lines += [f"{d}\t{p.relative_to(root) if d == 'code' else p}" for p in domain_files(d)
                  if is_heldout_by_rule(p) and read_text(d, p)]
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def write_heldout(domain: str, out: str | Path, *, max_bytes: int | None = None, force: bool = False) -> int:
    """Write the held-out text of ``domain`` to ``out`` (atomically; an existing file only with ``force``)."""

    out = Path(out)
    if out.exists() and not force:
        raise DsmoeError(f"{out} exists (use --force to replace it)")
    text = heldout_text(domain, max_bytes)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(text.encode())


def main(argv=None) -> None:
    """``python -m dsmoe.train.corpus heldout DOMAIN OUT [--max-bytes N] [--force]``: a domain's held-out
    text as one file (what ``dsmoe eval --text`` and ``dsmoe experts --by-domain`` read);
    ``draw-list``: draw the held-out list again (maintainers only; the committed list is the reference)."""

    p = argparse.ArgumentParser(prog="python -m dsmoe.train.corpus", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("heldout")
    h.add_argument("domain", choices=DOMAINS)
    h.add_argument("out")
    h.add_argument("--max-bytes", type=int, default=None)
    h.add_argument("--force", action="store_true")
    sub.add_parser("draw-list")
    a = p.parse_args(argv)
    try:
        if a.cmd == "draw-list":
            print(write_heldout_list(), "held-out files listed in", HELDOUT_LIST)
        else:
            print(f"wrote {write_heldout(a.domain, a.out, max_bytes=a.max_bytes, force=a.force)} bytes of held-out "
                  f"{a.domain} text to {a.out}")
    except DsmoeError as e:

        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
