"""Docs that cannot drift: the README and every page of docs/ are checked against the code.

- every relative link, image and ``#anchor`` in README.md and docs/*.md points at something that
  exists (anchors: GitHub's heading slugs), and every repository path written in inline code
  (`export/genai_config.py`, `benchmarks/results/`) exists;
- every command registered on the ``dsmoe`` group (iterated, so commands added later are checked
  too), the group itself and ``dsmoe-export`` have one section headed exactly
  ``## Reference: dsmoe CMD`` (``## Reference: dsmoe-export`` for the export) whose `` `--option` ``
  entries are exactly the options ``CMD --help`` lists;
- every docs page starts with ``## Quick`` and a fenced ``sh`` block; the blocks run (slow tier).

How the Quick blocks run: in a fresh temporary directory holding what ``make demo`` leaves behind,
made small — ``models/small`` is ``dsmoe init --preset tiny`` (the demo's ``small`` is 101M
parameters) and ``out/small-ort`` its ``dsmoe-export`` — with this environment's ``dsmoe`` and
``python`` first on PATH, by ``bash -e -o pipefail``. A command line may end with
``# needs: NAME[, NAME]``: the line is left out where a NAME is missing (an executable on PATH,
or ``gpu``, ``tensorrt``, ``tensorrt-headers``). Keep Quick blocks to a few seconds each.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from dsmoe.app.cli import cli, export_cmd

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
# inline code that names a path of this repository (placeholders like <x>, {i}, * are not paths)
REPO_PATH = re.compile(r"^(?:dsmoe|export|passes|plugins|benchmarks|tests|docs|\.ci)/[\w./-]*$")
REFERENCE = re.compile(r"^## Reference: (dsmoe(?:[ -][\w-]+)?)\s*$", re.M)
OPTION = re.compile(r"`(--[a-z0-9][a-z0-9-]*)`")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped (not - or _), spaces → -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+?)\s*$", text, re.M)}


def prose(path: Path) -> str:
    return FENCE.sub("", path.read_text())


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for name in ("deepseek-ai/deepseek-moe-16b-base", "deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V3",
                 "huggingface-cli download", "make demo", "make test"):
        assert name in text, name
    for page in DOCS:  # one click to every page
        assert f"](docs/{page.name})" in text, f"README.md does not link docs/{page.name}"


def test_slug_is_githubs():
    assert slug("Outputs and `--force`") == "outputs-and---force"
    assert slug("On a CPU: int4, streamed") == "on-a-cpu-int4-streamed"
    assert slug("Reference: dsmoe build-plugins") == "reference-dsmoe-build-plugins"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_and_anchor_exists(page):
    bad = []
    for target in LINK.findall(prose(page)):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: {dest} does not exist")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_repository_path_exists(page):
    paths = [m for m in INLINE.findall(prose(page)) if REPO_PATH.match(m)]
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def test_the_path_check_catches_a_false_path(tmp_path):
    page = tmp_path / "x.md"
    page.write_text("`dsmoe/export/genai_config.py` and `export/genai_config.py`\n")
    paths = [m for m in INLINE.findall(prose(page)) if REPO_PATH.match(m)]
    assert [p for p in paths if not (ROOT / p).exists()] == ["dsmoe/export/genai_config.py"]


# ---- references -------------------------------------------------------------------------------

def help_options(command: click.Command) -> set[str]:
    """The long options ``COMMAND --help`` lists (both names of a --x/--no-x pair), without --help."""
    # the CLI's own help names: click keeps the first help option it makes on the command, so a
    # context with click's default (--help alone) would take `-h` from every later invocation
    ctx = click.Context(command, info_name=command.name, help_option_names=["-h", "--help"])
    names = set()
    for p in command.get_params(ctx):
        if isinstance(p, click.Option) and not p.hidden:
            names.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--") and o != "--help")
    return names


def references() -> dict[str, list[tuple[Path, str]]]:
    """``{"dsmoe CMD": [(page, section text)]}`` over docs/."""
    found: dict[str, list[tuple[Path, str]]] = {}
    for page in DOCS:
        text = page.read_text()
        heads = list(REFERENCE.finditer(text))
        for m in heads:
            end = text.find("\n## ", m.end())
            found.setdefault(m.group(1), []).append((page, text[m.end(): end if end != -1 else len(text)]))
    return found


def commands() -> dict[str, click.Command]:
    """Every command a user can run, under the heading its reference has."""
    out = {"dsmoe": cli, "dsmoe-export": export_cmd}
    for name, cmd in cli.commands.items():
        out[f"dsmoe {name}"] = cmd
    return out


def test_export_and_dsmoe_export_are_one_command():
    assert help_options(cli.commands["export"]) == help_options(export_cmd)


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_has_a_reference_with_exactly_its_options(name):
    refs = references()
    heading = "dsmoe-export" if name == "dsmoe export" else name  # one reference for the two spellings
    assert heading in refs, f"no docs page has a section '## Reference: {heading}'"
    assert len(refs[heading]) == 1, f"'## Reference: {heading}' is in {[p.name for p, _ in refs[heading]]}"
    page, section = refs[heading][0]
    documented = set(OPTION.findall(section))
    listed = help_options(commands()[name])
    assert not listed - documented, f"{page.name}, '{heading}' misses options --help lists: {sorted(listed - documented)}"
    assert not documented - listed, f"{page.name}, '{heading}' names options {name} does not have: {sorted(documented - listed)}"


def test_every_reference_names_a_command():
    extra = set(references()) - set(commands())
    assert not extra, f"reference sections for commands that do not exist: {sorted(extra)}"


# ---- Quick blocks -------------------------------------------------------------------------------

def quick_block(page: Path) -> str:
    text = page.read_text()
    m = re.search(r"^## Quick\s*\n\s*```sh\n(.*?)^```", text, re.M | re.S)
    assert m, f"{page.name} does not start its usage with '## Quick' and a fenced sh block"
    return m.group(1)


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_every_page_starts_with_a_quick_block(page):
    text = page.read_text()
    assert text.startswith("# "), f"{page.name}: no title"
    assert text.split("\n## ")[1].startswith("Quick"), f"{page.name}: its first section is not '## Quick'"
    assert quick_block(page).strip()


def _missing(need: str) -> bool:
    need = need.strip()
    if need == "gpu":
        import torch

        return not torch.cuda.is_available()
    if need == "tensorrt":
        import importlib.util

        return importlib.util.find_spec("tensorrt") is None
    if need == "tensorrt-headers":
        from dsmoe.plugins.trt.build import find_tensorrt_include

        return find_tensorrt_include() is None
    return shutil.which(need) is None


def runnable(block: str) -> str:
    """The block's commands with `# needs:` lines whose needs are missing left out."""
    lines = block.replace("\\\n", " ").splitlines()
    keep = []
    for line in lines:
        m = re.search(r"#\s*needs:\s*(.+)$", line)
        if m and any(_missing(n) for n in m.group(1).split(",")):
            continue
        keep.append(line)
    return "\n".join(keep)


def _env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}


def _run(script: str, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """What `make demo` leaves, small: models/small (the tiny preset) and its export out/small-ort;
    beside them the repository's own assets/ and benchmarks/ (linked)."""
    ws = tmp_path_factory.mktemp("docs-quick")
    for shipped in ("assets", "benchmarks"):  # what the repository ships (the trained model, configs), read only
        (ws / shipped).symlink_to(ROOT / shipped)
    r = _run("dsmoe init models/small --preset tiny && dsmoe-export models/small --out out/small-ort", ws)
    assert r.returncode == 0, r.stderr
    return ws


def test_needs_lines_are_left_out_only_when_missing():
    block = "echo a   # needs: sh\necho b   # needs: no-such-tool-here\necho c \\\n  d\n"
    assert runnable(block).split("\n") == ["echo a   # needs: sh", "echo c    d"]


@pytest.mark.slow
@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_quick_block_runs(page, workspace):
    r = _run(runnable(quick_block(page)), workspace)
    assert r.returncode == 0, f"{page.name} Quick block failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    if page.name == "quantization.md":  # the demo's int4 line is labelled on random weights
        assert "random weights (seed 0)" in r.stderr
    if page.name == "errors.md":  # each refusal is one line, exit code 2
        assert r.stdout.count("exit code 2") == 3 and r.stderr.count("error: ") == 3


@pytest.mark.slow
def test_the_readme_leads_to_a_verified_export_of_your_own(tmp_path):
    """README's "Your own checkpoint": a checkpoint in HF layout (config.json, safetensors, a
    tokenizer) stands in for the download; the CPU and GenAI blocks run as written on it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    r = _run("dsmoe init models/mine --preset tiny", tmp_path)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(models.BPE())  # byte-level BPE over the tiny vocabulary, as a real checkpoint ships one
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["The capital of France is"], trainers.BpeTrainer(
        vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp_path / "models/mine/tokenizer.json"))
    text = (ROOT / "README.md").read_text()
    blocks = []
    for heading in ("### On a CPU: int4, streamed", "### ONNX Runtime GenAI"):
        m = re.search(re.escape(heading) + r".*?```sh\n(.*?)```", text, re.S)
        assert m, heading
        blocks.append(m.group(1))
    script = re.sub(r"^CKPT=.*$", "CKPT=models/mine", "\n".join(blocks), count=1, flags=re.M)
    assert "CKPT=models/mine" in script
    r = _run(script, tmp_path)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert (tmp_path / "out/ds16b-int4/genai_config.json").is_file()
    assert "verified" in r.stderr and "tokens/s" in r.stderr
