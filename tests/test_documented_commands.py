"""Every `gem-run` / `gem` command shown in README.md and docs/ works as written.

Commands come from fenced code blocks (continuation lines joined, comments cut) and from inline
code spans. A command with a placeholder (RECIPE, RUN_DIR, [...], ...) is a synopsis, not a command,
and is left out. The rest run in process, in one folder per document, in document order (so
``gem-run celeba --print-recipe > my_recipe.yaml`` makes the file a later command reads):

* ``gem-run ...`` with ``--print-recipe``: the recipe resolves and validates;
* ``gem compare ...`` with ``--dry-run``: every run's recipe validates;
* ``gem plugins`` / ``gem recipes``: run as they are;
* ``gem oracle-eval RECIPE ...``: the arguments parse and the recipe validates;
* ``gem data ...``: run as they are, against a loopback server (tests/data_server.py) that
  ``GEM_DATA_MIRROR`` points at, serving miniature copies of the published files, with the table
  of data sets swapped for one holding those copies' checksums: the download, verify and unpack
  paths all run, and nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

#: Commands that need the example oracle package of docs/examples installed (what
#: tests/test_third_party_package.py does) or a recipe the reader writes for it.
_PLUGINS, _EXAMPLE = "docs/plugins.md", "docs/examples/gem-brightness-oracle/README.md"
NEEDS_SETUP = {
    (_PLUGINS, "gem-run my_recipe.yaml"),
    (_PLUGINS, "gem-run my_recipe.yaml --print-recipe"),
    (_PLUGINS, "gem oracle-eval my_recipe.yaml --n-images 200"),
    (_EXAMPLE, 'gem oracle-eval recipes/synthetic.yaml --set "oracle={plugin: brightness}" --n-images 300'),
    (_EXAMPLE, 'gem-run recipes/synthetic.yaml --set "oracle={plugin: brightness, gain: 1.5}"  '
               '--set training.steps=200 --set training.warmup_steps=50'),
}

PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]*\b|\.\.\.|[\[<]|…")


def _commands_in(text: str) -> list[str]:
    """`gem-run`/`gem` commands of one document, in order."""
    found: list[tuple[int, str]] = []
    for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block.group(1))
        for line in joined.splitlines():
            line = re.sub(r"^\$\s+", "", line.strip())
            line = re.sub(r"\s+#.*$", "", line)
            found.append((block.start(), line))
    without_blocks = re.sub(r"^```.*?^```", lambda m: " " * len(m.group(0)), text, flags=re.S | re.M)
    for span in re.finditer(r"`([^`\n]+)`", without_blocks):
        found.append((span.start(), span.group(1).strip()))
    commands = []
    for _, line in sorted(found):
        line = re.sub(r"^\S*/bin/(?=gem)", "", line)  # .venv/bin/gem-run is gem-run
        words = line.split()
        if not words or words[0] not in ("gem-run", "gem"):
            continue
        if words[0] == "gem" and (len(words) < 2 or words[1] == "="):  # the entry-point table, not a command
            continue
        if words in (["gem", "eval"], ["gem", "explore"]):  # a subcommand's name in prose; both take a run folder
            continue
        if PLACEHOLDER.search(line.replace("--set", "")):
            continue
        commands.append(line)
    return commands


def _documented() -> list[tuple[str, str]]:
    return [(doc.relative_to(ROOT).as_posix(), command) for doc in DOCUMENTS
            for command in _commands_in(doc.read_text())]


def test_the_documents_show_commands_to_check():
    documented = _documented()
    commands = [c for _, c in documented]
    assert len(commands) >= 40
    assert "gem-run recipes/synthetic.yaml --set graph.plugin=fixed" in commands
    assert "gem-run celeba --print-recipe > my_recipe.yaml" in commands
    assert "gem-run --set training.steps=1000" in commands  # written .venv/bin/gem-run
    assert any(c.startswith("gem compare --sweep") for c in commands)
    assert NEEDS_SETUP <= set(documented), "a skipped command is no longer documented: update NEEDS_SETUP"


def _run(command: str) -> tuple[int, str, str]:
    """Run one documented command in the current folder; returns (status, stdout, stderr)."""
    from gem.cli import main, run_main

    argv = shlex.split(command)
    redirect = None
    if "|" in argv:  # `gem plugins --json | head -1`: gem's part
        argv = argv[:argv.index("|")]
    if ">" in argv:
        at = argv.index(">")
        argv, redirect = argv[:at], argv[at + 1]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if argv[0] == "gem-run":
                status = run_main([*argv[1:], "--print-recipe"])
            elif argv[1] == "compare":
                status = main([*argv[1:], "--dry-run"])
            elif argv[1] == "oracle-eval":
                status = _check_oracle_eval(argv[2:])
            else:
                status = main(argv[1:])
        except SystemExit as exc:  # argparse rejected the arguments
            status = exc.code if isinstance(exc.code, int) else 1
        if redirect is not None:
            Path(redirect).write_text(out.getvalue())
    return status, out.getvalue(), err.getvalue()


def _check_oracle_eval(argv: list[str]) -> int:
    from gem.oracle_eval import _parser
    from gem.plugins import Registry, make_plugin_manager
    from gem.recipe import load_recipe_file, override_recipe, validate_recipe

    args = _parser("gem oracle-eval").parse_args(argv)
    registry = Registry(make_plugin_manager())
    data, _ = override_recipe(load_recipe_file(args.recipe) if args.recipe else {}, args.overrides, registry)
    validate_recipe(data, registry)
    return 0


def test_a_broken_command_is_caught(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run("gem-run --set graph.plugin=gat")[0] != 0
    assert _run("gem-run --set extractor.plugin=beta_vae --set extractor.disc_lr=1")[0] != 0
    assert _run("gem compare --methods gem no_such_method")[0] != 0
    assert _run("gem plugins --jsn")[0] != 0


def _serve_data_sets(commands: list[str], tmp_path: Path, monkeypatch) -> None:
    """Point ``gem data`` at a loopback server of the data sets these commands name."""
    from data_server import DataServer, fixture_sources
    from gem import data_download

    names = {w for c in commands if c.startswith("gem data ") for w in shlex.split(c) if w in data_download.SOURCES}
    server = DataServer()
    monkeypatch.setattr(data_download, "SOURCES", {**data_download.SOURCES,
                                                   **fixture_sources(tmp_path / ".published", server, tuple(names))})
    monkeypatch.setenv(data_download.MIRROR_ENV, server.url)
    return server


@pytest.mark.parametrize("document", [d.relative_to(ROOT).as_posix() for d in DOCUMENTS
                                      if _commands_in(d.read_text())])
def test_documented_commands_work_as_written(document, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").symlink_to(ROOT / "docs")  # commands are written for the repository root
    commands = [c for doc, c in _documented() if doc == document]
    server = _serve_data_sets(commands, tmp_path, monkeypatch) if any(c.startswith("gem data ") for c in commands) \
        else None
    try:
        _run_documented(document)
    finally:
        if server is not None:
            server.close()
    if server is not None:  # every data set a document downloads came from the server, and landed
        from gem.data_download import SOURCES

        for command in commands:
            words = shlex.split(command)
            if words[:3] == ["gem", "data", "download"]:
                root = Path(words[words.index("--root") + 1] if "--root" in words else SOURCES[words[3]].root)
                assert root.is_dir() and any(p for p in root.iterdir() if not p.name.startswith(".")), command


def _run_documented(document: str) -> None:
    for doc, command in _documented():
        if doc != document or (doc, command) in NEEDS_SETUP:
            continue
        status, out, err = _run(command)
        assert status == 0, f"{document}: `{command}` exited {status}:\n{err[-2000:]}"
        if command.startswith("gem-run"):
            assert "dataset:" in out, f"{document}: `{command}` printed no recipe"
