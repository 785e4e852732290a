"""The help formatter of ``dn2`` and ``dn2-protocol``: jsonargparse's, shortened.

Its own module so that ``dn2-protocol`` can use it without importing Lightning (seconds of start-up)."""

from __future__ import annotations

import argparse
import re
import textwrap

from jsonargparse import DefaultHelpFormatter


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
