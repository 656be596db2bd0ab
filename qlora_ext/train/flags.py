"""The command line's parser, shared by every qlora-train subcommand: argparse, taking the spellings a Hugging Face
user types as well as its own.

- `--output_dir` is `--output-dir` (transformers' and artidoro/qlora's scripts spell flags with underscores);
- a boolean flag takes `--x`, `--no-x`, and also `--x true` / `--x false` (HfArgumentParser's form, copied from
  TrainingArguments commands);
- a flag that is still unknown gets the closest real one named in the error;
- no abbreviations (argparse's prefix matching): `--eval` or `--num` would be one flag today and ambiguous once a
  flag or alias sharing the prefix is added, so flags are spelled out.
"""
from __future__ import annotations

import argparse
import difflib
import sys

TRUE_WORDS = ("true", "yes", "y", "t", "on", "1")
FALSE_WORDS = ("false", "no", "n", "f", "off", "0")


class BoolFlag(argparse.Action):
    """`--x`, `--x true|false` and `--no-x` (argparse's BooleanOptionalAction takes no value)."""

    def __init__(self, option_strings, dest, default=None, required=False, help=None):
        strings = []
        for s in option_strings:
            strings += [s, "--no-" + s[2:]] if s.startswith("--") else [s]
        super().__init__(strings, dest, nargs="?", default=default, required=required, help=help,
                         metavar="true|false")

    def __call__(self, parser, namespace, values, option_string=None):
        negated = option_string.startswith("--no-")
        if values is None:
            value = not negated
        elif negated:
            parser.error(f"argument {option_string}: takes no value (got {values!r})")
        elif values.lower() in TRUE_WORDS + FALSE_WORDS:
            value = values.lower() in TRUE_WORDS
        else:
            parser.error(f"argument {option_string}: expected true or false (or no value), got {values!r}")
        setattr(namespace, self.dest, value)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_action_invocation(self, action):
        if isinstance(action, BoolFlag):   # "--x [true|false], --no-x", not the value after --no-x too
            return ", ".join(s if s.startswith("--no-") else f"{s} [true|false]" for s in action.option_strings)
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """argparse with the spellings above."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = [self._own_spelling(a) for a in (sys.argv[1:] if args is None else args)]
        return super().parse_known_args(args, namespace)

    def _own_spelling(self, arg: str) -> str:
        """--some_flag[=v] -> --some-flag[=v] where that is a flag here and the underscore spelling is not."""
        if not arg.startswith("--") or "_" not in arg.partition("=")[0]:
            return arg
        name, eq, value = arg.partition("=")
        dashed = name.replace("_", "-")
        if name not in self._option_string_actions and dashed in self._option_string_actions:
            return dashed + eq + value
        return arg

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings]
            meant = {w: difflib.get_close_matches(w.split("=")[0].replace("_", "-"), known, n=1)
                     for w in message.split(":", 1)[1].split() if w.startswith("--")}
            hints = [f"{w} -> {m[0]}" for w, m in meant.items() if m]
            if hints:
                message += f" (did you mean: {', '.join(hints)}?)"
        super().error(message)
