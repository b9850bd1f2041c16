"""Reading a job spec file into plain YAML data, within fixed bounds.

``read_spec_text(path)`` checks what the path is before opening it (a regular file of at most
``SPEC_MAX_BYTES``: a FIFO or a device such as ``/dev/zero`` is refused without being read) and
decodes it as UTF-8. ``load_yaml(text)`` parses it with a SafeLoader that refuses what a job
spec never needs and a hostile one could abuse: aliases (a nested alias "bomb" expands into
gigabytes), nesting deeper than ``SPEC_MAX_DEPTH`` (Python's recursion limit), more than
``SPEC_MAX_VALUES`` values (1 MiB of small tokens takes seconds and 100 MB to build), tags
other than the core ones (``!!timestamp garbage`` crashes PyYAML), control characters, and
keys given twice. Whole numbers longer than ``NUMBER_MAX_DIGITS`` digits are not converted
(Python refuses past 4,300 digits, slowly before): they stand in as ``LongNumber``, which every
range check refuses. Every refusal is a ``SpecProblem`` whose sentence says what is wrong and
where.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.resolver import Resolver

from .errors import cut, shown

SPEC_MAX_BYTES = 1 << 20  # a real spec is about 1 KiB
SPEC_MAX_DEPTH = 10  # lists and mappings inside each other; a valid spec needs 3
SPEC_MAX_VALUES = 10_000  # scalars, lists and mappings (keys included); a valid spec has ~40
NUMBER_MAX_DIGITS = 100  # longer whole numbers become LongNumber

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class SpecProblem(Exception):
    """The spec file cannot be read, or is not valid YAML; one sentence naming the place."""


class LongNumber(int):
    """A whole number too long to convert, standing in as ±10**NUMBER_MAX_DIGITS.

    It compares beyond every bound, so every range check refuses it, and it prints as its size
    (``<a number of 5000 digits>``), never as digits: it is not a name either."""

    digits: int

    def __new__(cls, text: str) -> LongNumber:
        digits = text.replace("_", "").strip()
        number = super().__new__(cls, (-1 if digits.startswith("-") else 1) * 10**NUMBER_MAX_DIGITS)
        number.digits = len(digits.lstrip("+-"))
        return number

    def __repr__(self) -> str:
        return f"<a number of {self.digits} digits>"

    __str__ = __repr__


def file_kind(mode: int) -> str:
    """What a ``st_mode`` says a path is: ``a regular file``, ``a folder``, ``a socket``, ..."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_spec_text(path: Path) -> str:
    """The spec file's text; ``SpecProblem`` if it is not a readable UTF-8 regular file."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise SpecProblem("file not found") from None
    except OSError as exc:
        raise SpecProblem(f"cannot read: {exc.strerror}") from None
    except ValueError:  # a NUL byte, or a character the file system cannot encode
        raise SpecProblem("cannot be a file name (a NUL byte or an invalid character)") from None
    _check_kind_and_size(st)
    try:  # O_NONBLOCK: should the path have become a FIFO since, open() still returns at once
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecProblem(f"cannot read: {exc.strerror}") from None
    try:
        _check_kind_and_size(os.fstat(fd))
        raw = _read_at_most(fd, SPEC_MAX_BYTES + 1)
    except OSError as exc:
        raise SpecProblem(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > SPEC_MAX_BYTES:  # it grew since it was checked
        raise SpecProblem(_too_large(len(raw)))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecProblem(
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, byte offset "
            f"{exc.start}); save the spec as UTF-8"
        ) from None


def _check_kind_and_size(st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise SpecProblem("is a folder, not a YAML file")
    if not stat.S_ISREG(st.st_mode):
        raise SpecProblem(f"is {file_kind(st.st_mode)}, not a regular file; give the YAML file")
    if st.st_size > SPEC_MAX_BYTES:
        raise SpecProblem(_too_large(st.st_size))


def _too_large(size: int) -> str:
    return f"is {size} bytes; a job spec is at most {SPEC_MAX_BYTES} bytes (1 MiB)"


def _read_at_most(fd: int, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size < limit:
        part = os.read(fd, limit - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


# --- YAML ------------------------------------------------------------------------------------


def load_yaml(text: str) -> Any:
    """The YAML document of ``text``; ``SpecProblem`` with line and column if it is not valid."""
    bad = yaml.reader.Reader.NON_PRINTABLE.search(text)
    if bad:  # PyYAML's own message gives only a position in "<unicode string>"
        line, column = _line_column(text, bad.start())
        raise SpecProblem(
            f"not valid YAML at line {line}, column {column}: {_character(bad.group())} is "
            "not allowed in a YAML file; remove it"
        )
    try:
        return yaml.load(text, Loader=_SpecLoader)  # safe: SafeConstructor only
    except yaml.YAMLError as exc:
        raise SpecProblem(_yaml_sentence(exc)) from None
    except RecursionError:  # the depth limit comes first; this is a second guard
        raise SpecProblem(f"not valid YAML: nested too deeply (at most {SPEC_MAX_DEPTH})") from None


def _line_column(text: str, index: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _character(char: str) -> str:
    code = ord(char)
    if code == 0:
        return "the NUL character (U+0000)"
    if 0xD800 <= code <= 0xDFFF:
        return f"a lone surrogate (U+{code:04X})"
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return f"the control character U+{code:04X}"
    return f"the character U+{code:04X}"


def _yaml_sentence(exc: yaml.YAMLError) -> str:
    """PyYAML's error as one sentence: where, what, and where the enclosing part started."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
    text = f"not valid YAML{where}: {cut(problem, 120)}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark and (mark is None or context_mark.line != mark.line):
        at = f"line {context_mark.line + 1}, column {context_mark.column + 1}"
        text += f" ({cut(context, 40)}, from {at})"
    return text


class _Bounds(Composer):
    """The composing and constructing steps of a SafeLoader, without aliases, deep nesting,
    non-core tags, duplicate keys or huge numbers (see ``_SpecLoader``)."""

    _depth = 0
    _values = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in a job spec; write the value out",
                self.peek_event().start_mark,
            )
        self._values += 1
        if self._values > SPEC_MAX_VALUES:  # before they cost time and memory to build
            raise ComposerError(
                None,
                None,
                f"more than {SPEC_MAX_VALUES} values (a job spec has a few dozen)",
                self.peek_event().start_mark,
            )
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        if self._depth >= SPEC_MAX_DEPTH:
            raise ComposerError(
                None,
                None,
                f"lists and mappings are nested more than {SPEC_MAX_DEPTH} deep "
                "(a job spec needs 3)",
                self.peek_event().start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            # An explicit tag on a value it does not fit (!!int abc, !!bool maybe): PyYAML
            # lets Python's own error through.
            raise ConstructorError(
                None,
                None,
                f"{shown(node.value)} is not a valid {_tag_name(node.tag)} value",
                node.start_mark,
            ) from exc


if yaml.__with_libyaml__:
    from yaml.cyaml import CParser

    class _SpecLoader(_Bounds, CParser, SafeConstructor, Resolver):
        """libyaml's parser (about ten times faster than PyYAML's own over a large spec)
        under the bounded composer above."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            Composer.__init__(self)

else:  # pragma: no cover - the locked PyYAML wheels include libyaml

    class _SpecLoader(_Bounds, yaml.SafeLoader):  # type: ignore[no-redef]
        """PyYAML's pure-Python SafeLoader with the bounded composer above."""


def _tag_name(tag: str) -> str:
    return cut(tag.replace("tag:yaml.org,2002:", "!!"), 40)


def _construct_mapping(loader: _SpecLoader, node: yaml.MappingNode, deep: bool = False):
    """A mapping whose keys are plain values, each given once (YAML allows repeats silently)."""
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:  # e.g. "[a, b]: 1"; without this check: a TypeError traceback
            raise ConstructorError(
                None,
                None,
                "a key must be a plain value, not a list or mapping",
                key_node.start_mark,
            ) from None
        if key in seen:
            mark = key_node.start_mark
            raise ConstructorError(
                None,
                None,
                f"key {shown(key)} appears twice (line {seen[key].start_mark.line + 1} "
                f"and line {mark.line + 1}); keep one",
                mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


def _construct_int(loader: _SpecLoader, node: yaml.ScalarNode) -> int:
    digits = node.value.replace("_", "").lstrip("+-")
    if len(digits) > NUMBER_MAX_DIGITS:
        return LongNumber(node.value)
    return SafeConstructor.construct_yaml_int(loader, node)


def _refuse_tag(loader: _SpecLoader, node: yaml.Node) -> Any:
    raise ConstructorError(
        None,
        None,
        f"the YAML tag {_tag_name(node.tag)} has no use in a job spec; write a plain value",
        node.start_mark,
    )


_INT_TAG = "tag:yaml.org,2002:int"
_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_SpecLoader.add_constructor(_INT_TAG, _construct_int)
for _tag in ("binary", "timestamp", "set", "omap", "pairs", "merge", "value"):
    _SpecLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)
_SpecLoader.add_constructor(None, _refuse_tag)  # any other tag: !foo, !!python/...

# YAML 1.1 reads 0001 as octal 1, 0x10 as 16 and 1:30 as 90, which silently renamed a party
# written as ``0001:``. Only plain decimal numbers are ints here; the rest stay text.
# Dates are text too (a job_id of 2024-01-01 is a name, not a date), and so are ``<<`` and
# ``=`` (YAML 1.1's merge and value keys).
_DECIMAL = re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$")
_TEXT_TAGS = {f"tag:yaml.org,2002:{tag}" for tag in ("timestamp", "merge", "value")}
_SpecLoader.yaml_implicit_resolvers = {
    first: [
        (tag, _DECIMAL if tag == _INT_TAG else rx) for tag, rx in resolvers if tag not in _TEXT_TAGS
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
