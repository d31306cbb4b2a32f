"""Prompt templates for stage 2: the plain-text files in `prompts/` and their slots; lmrc.stage2.prompts renders
a document's prompts from them.

A template is a plain-text file (`prompts/rc.txt`, `prompts/direct.txt`) in the Alpaca-style frame of the LMRC
paper (Tables 11 and 12). The code fills named slots and writes no prose of its own:

- `{relations}`  the relation set, one relation name (from `rel_info`) per line
- `{text}`       the document text (words joined by spaces; truncated when it alone does not fit the context)
- `{title}`      the document title (unused by the shipped templates)
- `{n_pairs}`    the number of entity pairs in this prompt
- `{pairs}`      the pairs, one `(head| -| tail)` per line
- `{{` and `}}`  a literal brace

A line that starts with `{if none}` is kept only when the template allows `None` answers, one that starts with
`{if not none}` only when it does not (rc mode adds a None option with `rc_allow_none`; direct mode always has it).
A line that starts with `{if hints}` is kept only when the pairs carry stage-1 hints (`hints` > 0): such a pair is
written `(head| hints: relation; relation| tail)` instead of `(head| -| tail)`.

Slots are substituted in a single regex pass, so braces or slot-like text inside a document are never expanded.
The template splits at the start of the line holding the first per-prompt slot (`{n_pairs}` or `{pairs}`): the
part before it is the document's shared prefix (reusable across that document's prompts), the rest the suffix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmrc.errors import LmrcError
from lmrc.stage2.config import MODES

PREFIX_SLOTS = ("title", "relations", "text")
SUFFIX_SLOTS = ("n_pairs", "pairs")
REQUIRED_SLOTS = ("text", "pairs")

_SLOT = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*)\}")
_STRAY = re.compile(r"[{}]")
_IF_NONE = "{if none}"
_IF_NOT_NONE = "{if not none}"
_IF_HINTS = "{if hints}"


@dataclass(frozen=True)
class PromptTemplate:
    """A resolved template: `text` holds slots only (conditional lines already applied)."""

    mode: str  # "rc" or "direct"
    text: str
    allow_none: bool
    hints: bool = False  # the pairs carry stage-1 hints (the template's `{if hints}` lines are kept)
    source: str = field(default="<string>", compare=False)  # file name, for error messages
    prefix_text: str = field(init=False, repr=False, compare=False)  # the document's shared part
    suffix_text: str = field(init=False, repr=False, compare=False)  # the per-prompt part

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LmrcError(
                f"{self.source}: unknown prompt mode {self.mode!r} (expected one of {', '.join(MODES)})"
            )
        if self.mode == "direct" and not self.allow_none:
            raise LmrcError(f"{self.source}: direct mode always answers None for pairs without relations")
        prefix, suffix = _split(self.text, self.source)
        object.__setattr__(self, "prefix_text", prefix)
        object.__setattr__(self, "suffix_text", suffix)


def _where(source: str, text: str, pos: int) -> str:
    return f"{source}: line {text.count(chr(10), 0, pos) + 1}"


def _split(text: str, source: str) -> tuple[str, str]:
    """Validate the slots and split the template before the line of its first per-prompt slot."""
    slots: list[tuple[str, int]] = []
    pos = 0
    for m in [*_SLOT.finditer(text), None]:
        gap = text[pos : m.start() if m else len(text)]
        stray = _STRAY.search(gap)
        if stray:
            raise LmrcError(
                f"{_where(source, text, pos + stray.start())}: stray brace (write {{{{ or }}}} for a literal brace)"
            )
        if m is None:
            break
        pos = m.end()
        name = m.group(1)
        if name is None:
            continue
        if name not in PREFIX_SLOTS + SUFFIX_SLOTS:
            known = ", ".join("{" + s + "}" for s in PREFIX_SLOTS + SUFFIX_SLOTS)
            raise LmrcError(f"{_where(source, text, m.start())}: unknown slot {{{name}}} (known: {known})")
        slots.append((name, m.start()))
    for name in REQUIRED_SLOTS:
        if name not in {n for n, _ in slots}:
            raise LmrcError(f"{source}: the template has no {{{name}}} slot")
    first_suffix = min(at for name, at in slots if name in SUFFIX_SLOTS)
    cut = text.rfind("\n", 0, first_suffix) + 1
    for name, at in slots:
        if name in PREFIX_SLOTS and at >= cut:
            raise LmrcError(
                f"{_where(source, text, at)}: {{{name}}} must come before the line of the entity pairs "
                "(it belongs to the document's shared prefix)"
            )
    return text[:cut], text[cut:]


def _resolve_conditionals(raw: str, allow_none: bool, hints: bool = False) -> str:
    lines = []
    for line in raw.splitlines(keepends=True):
        if line.startswith(_IF_HINTS):
            if hints:
                lines.append(line[len(_IF_HINTS) :])
        elif line.startswith(_IF_NOT_NONE):
            if not allow_none:
                lines.append(line[len(_IF_NOT_NONE) :])
        elif line.startswith(_IF_NONE):
            if allow_none:
                lines.append(line[len(_IF_NONE) :])
        else:
            lines.append(line)
    return "".join(lines)


def default_prompts_dir() -> Path:
    """The shipped templates: `lmrc/prompts/` in an installed wheel, else `prompts/` at the repository root.

    pyproject.toml maps the top-level `prompts/` folder into the wheel as `lmrc/prompts`, so there is one copy in
    the source tree; a source checkout or an editable install reads the top-level folder directly.
    """
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "prompts", package.parent / "prompts"):
        if (folder / "rc.txt").is_file():
            return folder
    raise LmrcError(f"prompt templates not found in {package / 'prompts'} or {package.parent / 'prompts'}")


def load_template(
    mode: str, path: str | os.PathLike | None = None, allow_none: bool | None = None, hints: bool = False
) -> PromptTemplate:
    """Load `prompts/<mode>.txt` (or `path`); `allow_none` defaults to False for rc and True for direct."""
    if mode not in MODES:
        raise LmrcError(f"unknown prompt mode {mode!r} (expected one of {', '.join(MODES)})")
    file = Path(path) if path is not None else default_prompts_dir() / f"{mode}.txt"
    try:
        raw = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmrcError(f"{file}: prompt template not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LmrcError(f"{file}: cannot read prompt template: {exc}") from None
    return parse_template(mode, raw, allow_none, source=str(file), hints=hints)


def parse_template(
    mode: str, raw: str, allow_none: bool | None = None, source: str = "<string>", hints: bool = False
) -> PromptTemplate:
    """A template from its raw text (e.g. the copy saved next to an adapter); see `load_template`."""
    if allow_none is None:
        allow_none = mode == "direct"
    text = _resolve_conditionals(raw.replace("\r\n", "\n"), allow_none, hints)
    if not text.endswith("\n"):
        text += "\n"
    return PromptTemplate(mode=mode, text=text, allow_none=allow_none, hints=hints, source=source)


def fill_slots(text: str, values: dict[str, str]) -> str:
    """Single-pass substitution: inserted values are never scanned again."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name is None:
            return m.group(0)[0]  # "{{" -> "{", "}}" -> "}"
        return values[name]

    return _SLOT.sub(sub, text)
