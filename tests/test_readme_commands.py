"""The command lines of README.md and of the pages in docs/ parse with the real parsers, as written.

Every ``edgeci …``, ``python -m MODULE …`` and ``.venv/bin/python benchmarks/X.py …`` in their
bash code blocks and inline code spans is handed to its own argparse parser's
``parse_args`` (the commands themselves are never run): a renamed or dropped flag, a choice
that no longer exists or a value its type refuses fails here, naming the file and line.

What is not parsed, and why, is listed in :data:`PLACEHOLDER` and :data:`FRAGMENTS`; a
fragment's flags must still exist on its command's parser.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import runpy
import shlex
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from demos.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
"""The README's pages: each section of the README ends with a link to its whole page here."""

PLACEHOLDER = re.compile(r"^(\.\.\.|….*|.*…|[A-Z][A-Z_]*|<[^>]*>|.*\|.*)$")
"""Words the README writes for "fill in yours": ``...`` / ``…``, an all-capitals name (N, DIR, ID,
EPOCH, REF, CMD; PKI is a folder name, see :data:`NOT_PLACEHOLDERS`), ``<labels>``, ``a|b|c``
alternatives. A command with one is not parsed; its flags are still checked."""
NOT_PLACEHOLDERS = frozenset({"PKI"})
"""All-capitals words that are real values in the README (the PKI folder of its examples)."""

FRAGMENTS = {
    "edgeci device --partition": "names the flag in prose (its value follows in the sentence)",
    "edgeci device --refresh": "names the flag in prose (its value follows in the sentence)",
    "edgeci device --model detection": "names the task; the device's other required flags are in the code block above it",
    "edgeci emulate --transport codec": "names the option; the scenario file is the sentence's subject",
    "edgeci pretrain --model acme_vision.tasks:AcmeCnn": "an app package the README invents (acme_vision is not installed)",
    "edgeci device --dataset acme_vision.tasks:AcmeCnn": "an app package the README invents (acme_vision is not installed)",
    "edgeci rollback/pin/unpin": "three commands named together",
}
"""Inline spans that are not whole command lines: their subcommand, ``--flags`` and choices are
checked, nothing is parsed."""
NOT_COMMANDS = {"edgeci CMD: error: …": "an error message's shape (CMD stands for any subcommand), not a command"}
"""Spans that start like a command and are none: not checked at all."""


@dataclass(frozen=True)
class Command:
    kind: str  # "edgeci", "module" (python -m) or "script" (python path.py)
    target: str  # "" for edgeci, else the module or the script's path
    argv: tuple[str, ...]
    source: str  # the text it came from
    line: int
    inline: bool
    file: str = "README.md"

    @property
    def placeholders(self) -> list[str]:
        return [w for w in self.argv if PLACEHOLDER.match(w) and w not in NOT_PLACEHOLDERS]

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source.strip()}"


def _commands_in(text: str, line: int, inline: bool, file: str) -> list[Command]:
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return []
    out: list[Command] = []
    for i, word in enumerate(words):
        rest = tuple(words[i + 1:])
        if word in ("edgeci", ".venv/bin/edgeci") and (i == 0 or words[i - 1] in ("-a", "xvfb-run")):
            out.append(Command("edgeci", "", rest, text, line, inline, file))
        elif word in ("python", ".venv/bin/python", "python3") and rest[:1] == ("-m",) and len(rest) > 1:
            out.append(Command("module", rest[1], rest[2:], text, line, inline, file))
        elif word in ("python", ".venv/bin/python", "python3") and rest[:1] and rest[0].endswith(".py"):
            out.append(Command("script", rest[0], rest[1:], text, line, inline, file))
        else:
            continue
        break
    return out


def readme_commands(text: str | None = None, file: str = "README.md") -> list[Command]:
    """Every command line of the README (or of ``text``, named ``file``): bash code blocks (``\\``
    continuations joined) and inline spans."""
    text = README.read_text(encoding="utf-8") if text is None else text
    out: list[Command] = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) not in ("bash", "sh", "shell", "console"):
            continue
        first = text.count("\n", 0, m.start(2)) + 1
        body = m.group(2)
        joined: list[tuple[int, str]] = []
        pending, start = "", first
        for n, raw in enumerate(body.splitlines(), first):
            if not pending:
                start = n
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            joined.append((start, pending + raw))
            pending = ""
        for n, line in joined:
            out += _commands_in(line, n, inline=False, file=file)
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):  # (a span may wrap onto the next line)
        out += _commands_in(m.group(1), prose.count("\n", 0, m.start()) + 1, inline=True, file=file)
    return out


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


@contextlib.contextmanager
def _capturing() -> Iterator[None]:
    """While inside, the first parse of any ArgumentParser raises :class:`_Captured` with it."""
    real = argparse.ArgumentParser.parse_known_args

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> object:
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = capture  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = real  # type: ignore[method-assign]


def parser_of(command: Command) -> argparse.ArgumentParser:
    """The parser that reads ``command``'s arguments: ``edgeci``'s (its subcommand's flags
    loaded), or the one a module / script builds when run as ``__main__`` (caught at its first
    parse, before it does anything else)."""
    if command.kind == "edgeci":
        return build_parser(list(command.argv))
    saved = sys.argv[:]
    sys.argv = [command.target, *command.argv]
    try:
        with _capturing(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)  # runpy, the module imported before
            if command.kind == "module":
                runpy.run_module(command.target, run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(ROOT / command.target), run_name="__main__")
    except _Captured as got:
        return got.parser
    finally:
        sys.argv = saved
    raise AssertionError(f"{command}: {command.target} finished without parsing a command line")


def parse(command: Command) -> argparse.Namespace | None:
    """``parse_args`` of the command's words; None for ``--help`` (it exits 0 after printing)."""
    parser = parser_of(command)
    try:
        return parser.parse_args(list(command.argv))
    except SystemExit as exc:
        if exc.code == 0 and ("--help" in command.argv or "-h" in command.argv):
            return None
        raise AssertionError(f"{command}: the parser refused it (exit {exc.code}; its message is above)") from None


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    from coordinator.config import parsers_of

    return parsers_of(parser)


def _all_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for p in _parsers(parser) for a in p._actions for s in a.option_strings}


def all_commands() -> list[Command]:
    """The README's command lines, then each docs/ page's."""
    out = readme_commands()
    for page in DOCS:
        out += readme_commands(page.read_text(encoding="utf-8"), file=f"docs/{page.name}")
    return out


COMMANDS = [c for c in all_commands() if c.source.strip() not in NOT_COMMANDS]
def _names_only(command: Command) -> bool:
    """An inline ``edgeci``, ``edgeci device`` or ``edgeci pki issue``: prose naming a command (or
    an action), no option, no value."""
    words = list(command.argv)
    if not command.inline or command.kind != "edgeci" or any(w.startswith("-") for w in words):
        return False
    if len(words) <= 1:
        return True
    parser = _subcommand_parser(words[0])
    actions = [a for a in (parser._actions if parser else ()) if isinstance(a, argparse._SubParsersAction)]
    return len(words) == 2 and any(words[1] in a.choices for a in actions)


def _subcommand_parser(name: str) -> argparse.ArgumentParser | None:
    sub = next(a for a in build_parser([name])._actions if isinstance(a, argparse._SubParsersAction))
    found = sub.choices.get(name)
    return found if isinstance(found, argparse.ArgumentParser) else None


FULL = [c for c in COMMANDS if not c.placeholders and c.source.strip() not in FRAGMENTS and not _names_only(c)]
"""Parsed whole: every code-block line, and every inline span with an option or value but no
placeholder (``edgeci``, ``edgeci device`` or ``edgeci pki issue`` in prose names a command: checked
below, as the fragments are; a bare ``python -m edge_sdk.tasks.registry`` is a whole command line)."""
PARTIAL = [c for c in COMMANDS if c not in FULL]


def test_the_readme_has_commands_to_check() -> None:
    # (a change of the README's layout that this extraction no longer reads would pass every test below)
    kinds = {c.kind for c in FULL}
    assert len(FULL) >= 40 and kinds == {"edgeci", "module", "script"}, [str(c) for c in COMMANDS]
    assert any(c.argv[:1] == ("coordinator",) and "--init" in c.argv for c in FULL)  # a `\`-continued block line
    files = {c.file for c in FULL}
    assert {"README.md", "docs/security.md", "docs/guide.md", "docs/results.md"} <= files, sorted(files)  # docs/ is read too


def _anchors(text: str) -> set[str]:
    """The #fragments GitHub gives a page's headings (lower case, punctuation but ``-`` and ``_``
    dropped, spaces as ``-``; a repeated heading gets ``-1``, ``-2`` …), code blocks skipped."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_the_readme_links_every_page_and_every_link_resolves() -> None:
    """Each section of the README ends with a link to its page in docs/: every page is linked from the
    README, and every relative link or image in the README and the pages names a file that exists,
    and a ``#heading`` in it a heading of that page (a renamed heading breaks links silently)."""
    readme = README.read_text(encoding="utf-8")
    assert DOCS, "no docs/*.md"
    unlinked = [p.name for p in DOCS if f"](docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    anchors = {page.resolve(): _anchors(page.read_text(encoding="utf-8")) for page in [README, *DOCS]}
    broken = []
    fragments = 0
    for page in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            file, _, fragment = target.partition("#")
            dest = (page.parent / file).resolve() if file else page.resolve()
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif fragment and dest in anchors:
                fragments += 1
                if fragment not in anchors[dest]:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
    assert fragments >= 10, fragments  # (the check reads the links it is meant to)


@pytest.mark.parametrize("command", FULL, ids=[f"{c.file}:L{c.line}:{' '.join(c.argv[:3])}" for c in FULL])
def test_readme_command_parses(command: Command, capsys: pytest.CaptureFixture[str]) -> None:
    parse(command)


@pytest.mark.parametrize("command", PARTIAL, ids=[f"{c.file}:L{c.line}:{' '.join(c.argv[:3])}" for c in PARTIAL])
def test_readme_fragment_names_real_flags(command: Command) -> None:
    """A command with a placeholder (``--state-dir DIR``) or a prose fragment: every ``--flag``
    in it is one its command has (the subcommand is the first word that is not a placeholder)."""
    argv = [w for w in command.argv if not PLACEHOLDER.match(w) or w in NOT_PLACEHOLDERS]
    if command.kind == "edgeci" and argv and "/" in argv[0]:  # rollback/pin/unpin
        words = argv[0].split("/")
        choices = next(a for a in build_parser([])._actions if isinstance(a, argparse._SubParsersAction)).choices
        assert set(words) <= set(choices), command
        return
    if command.kind == "edgeci":
        parser = build_parser(argv)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        name = argv[0].rstrip(":") if argv else ""
        assert name in sub or not argv, f"{command}: no subcommand {name!r}"
        if argv and isinstance(sub[name], argparse.ArgumentParser) and len(argv) > 1 and not argv[1].startswith("-"):
            actions = {a for a in sub[name]._actions if isinstance(a, argparse._SubParsersAction)}
            for action in actions:  # `edgeci pki acl`: the action exists
                assert argv[1] in action.choices, f"{command}: no {name} action {argv[1]!r}"
    else:
        parser = parser_of(Command(command.kind, command.target, (), command.source, command.line, command.inline, command.file))
    known = _all_options(parser)
    flags = [w.split("=", 1)[0] for w in argv if w.startswith("--")]
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{command}: no such option {unknown}"
    by_flag = {s: a for p in _parsers(parser) for a in p._actions for s in a.option_strings}
    for flag, value in itertools.pairwise(argv):  # `--transport codec`: a choice that exists
        action = by_flag.get(flag)
        if action is not None and action.choices is not None and not value.startswith("-"):
            assert value in action.choices, f"{command}: {flag} {value!r} is not one of {list(action.choices)}"


def test_a_renamed_flag_fails_the_check() -> None:
    """The check can fail: a README line with a flag the parser lacks, or a bad value, is refused."""
    bad = readme_commands("```bash\nedgeci coordinator --state-dirr x\nedgeci run --devices many\n```\n")
    assert len(bad) == 2
    for command in bad:
        with pytest.raises(AssertionError, match="refused"):
            parse(command)
