"""The help formatter of ``dn2`` and ``dn2-protocol``: jsonargparse's, shortened; and their parsers' "did you
mean" hint for a mistyped option.

Its own module so that ``dn2-protocol`` can use it without importing Lightning (seconds of start-up)."""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import textwrap
from typing import Any, NoReturn

from jsonargparse import ArgumentParser, DefaultHelpFormatter

DID_YOU_MEAN = "did you mean"


class DN2HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, shortened: no "known subclasses" lists, no reST markup, one line for the
    options marked ``one_line``, none for those marked ``dn2_hidden`` (named in their group's description),
    option names without metavars, and descriptions kept as written."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 32, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, width)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if action.option_strings and action.nargs != 0 and not self._is_config(action):
            return ", ".join(action.option_strings)  # the metavar repeats the name; the type is in the help
        return super()._format_action_invocation(action)

    @staticmethod
    def _is_config(action: argparse.Action) -> bool:
        return "-c" in action.option_strings or action.dest in ("print_config", "trainer", "model")

    def _format_action(self, action: argparse.Action) -> str:
        if getattr(action, "dn2_hidden", False):
            return ""
        one_line = getattr(action, "one_line", None)
        if one_line is not None:
            return f"  {action.option_strings[0]:<29} {one_line}".rstrip() + "\n"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        return plain_text(re.sub(r", known subclasses: [^)]*", "", super()._get_help_string(action)))

    def _expand_help(self, action: argparse.Action) -> str:
        return re.sub(r"type: Literal\[([^\]]*)\],", _choices, super()._expand_help(action))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # line breaks are kept (the data options are a table); only over-long lines are wrapped
        lines = []
        for line in plain_text(text).splitlines():
            if len(line) <= width:
                lines.append(indent + line)
                continue
            hang = " " * (len(line) - len(line.lstrip()))
            lines += textwrap.wrap(line, width, initial_indent=indent, subsequent_indent=indent + hang) or [indent]
        return "\n".join(lines)


def _choices(literal: re.Match) -> str:
    """``type: Literal['auto', 'torch'],`` as ``auto | torch;``: the choices, short enough for one line."""
    return " | ".join(choice.strip(" '\"") for choice in literal.group(1).split(",")) + ";"


def plain_text(text: str) -> str:
    """Drop reST markup from a docstring text: ``:func:`a.b``` -> ``a.b()``, double backquotes -> none."""
    text = re.sub(r":(?:func|meth):`~?([^`]+)`", r"\1()", text)
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


# ------------------------------------------------------------------------------------------------ did you mean


class SuggestingParserMixin:
    """A jsonargparse parser whose error for an unknown option adds the closest known ones: ``unrecognized
    arguments: --model.kk=3 (did you mean --model.k?)``. For a subcommand's option the subcommand's parser is
    searched (jsonargparse prints its usage too)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        # a parser that raises instead of exiting (a class's, inside a config's "data:") is read by an outer one
        reported = getattr(self, "exit_on_error", True)
        super().error(with_suggestions(message, parser, reported), ex)  # type: ignore[misc]


class SuggestingArgumentParser(SuggestingParserMixin, ArgumentParser):
    """jsonargparse's parser with :class:`SuggestingParserMixin`'s hint (``dn2-protocol``)."""


def with_suggestions(message: str, parser: argparse.ArgumentParser, reported: bool = True) -> str:
    """``message`` with "(did you mean --NAME?)" for each option it names as unknown that is close to one of
    ``parser``'s: jsonargparse's "unrecognized arguments: ..." (flags), "does not accept option 'name'" and "Option
    'name' is not accepted" (keys of a config file), and a subclass's "Option 'name' is not accepted"
    (``--data.normal_clas``: the options of the class the config's class_path names). Unchanged otherwise.
    ``reported``: the message goes to the user now (not to an outer parser that rewrites it)."""
    if DID_YOU_MEAN in message:  # (once, should an error pass through a parent parser's)
        return message
    hints = []
    known = [
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--")
    ]
    unknown = re.match(r"unrecognized arguments: (.*)", message, re.DOTALL)
    if unknown:
        for token in unknown.group(1).split():
            if token.startswith("--"):
                hints += _close(token.split("=", 1)[0], known)
    # a key of a --config file: "Subcommand 'test' does not accept option 'model.kk'", "Option 'bakcbone' is not
    # accepted" (a parser's own, not a class's: those are matched below)
    for name in re.findall(r"does not accept option '([\w.]+)'|^Option '([\w.]+)' is not accepted", message):
        if reported:  # (a nested parser's keys lack the outer prefix: the outer error names them, below)
            hints += _close("--" + (name[0] or name[1]), known)
    group = re.match(r'Parser key "([\w.]+)"', message)
    for class_path, name in re.findall(r"class_path '([\w.]+)':\s+Option '(\w+)' is not accepted", message):
        prefix = f"--{group.group(1)}." if group else "--"
        hints += _close(prefix + name, [prefix + known for known in _init_parameters(class_path)])
    if not hints:
        return message
    separator = "\n" if "\n" in message.rstrip() else " "  # after a multi-line error: on a line of its own
    return f"{message.rstrip()}{separator}({DID_YOU_MEAN} {' or '.join(dict.fromkeys(hints))}?)"


def _close(option: str, known: list[str]) -> list[str]:
    """The known option closest to ``option`` among its siblings (the same ``--group.`` prefix), compared by their
    last names: whole names share the prefix, which made ``--model.seed`` look like ``--model.k``."""
    head, _, leaf = option.rpartition(".")
    siblings = {
        name.rpartition(".")[2] if head else name: name
        for name in known
        if (name.rpartition(".")[0] == head if head else "." not in name)
    }
    matches = difflib.get_close_matches(leaf if head else option, list(siblings), n=1, cutoff=0.65)
    return [siblings[match] for match in matches]


def _init_parameters(class_path: str) -> list[str]:
    """The ``__init__`` parameters of the class ``class_path`` names; none when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        cls: Any = getattr(importlib.import_module(module), name)
        parameters = inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [n for n, p in parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
