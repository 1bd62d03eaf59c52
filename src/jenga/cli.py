"""The argparse set-up every command-line module shares, so that `--help` says what a command does (its module
docstring, line breaks kept for the example commands) and shows each option's default."""

from __future__ import annotations

import argparse
import textwrap


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help (bar None: the help says what an absent option means); the
    description as written; names like `jenga-2d+ckpt` never split at their hyphens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by `doc` (pass the module's `__doc__`)."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
