"""``hardneg ... --help``: every option explained, its default shown once, no Sphinx markup; class pairs by name or index."""

from __future__ import annotations

import argparse
import re

import pytest

from hardneg.cli import build_parser, main
from hardneg.commands._args import UsageError, parse_pair, parse_pairs


def _parsers(parser: argparse.ArgumentParser, path: str = "hardneg"):
    """``(path, parser)`` for the parser and every subparser below it (bench benchmarks included)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


ALL = list(_parsers(build_parser()))


def test_the_walk_reaches_every_subcommand_and_benchmark():
    paths = {p for p, _ in ALL}
    assert {"hardneg demo", "hardneg fit-generator", "hardneg generate", "hardneg bench"} <= paths
    assert {"hardneg bench overhead", "hardneg bench bank", "hardneg bench generator", "hardneg bench accuracy"} <= paths


@pytest.mark.parametrize("path,parser", ALL, ids=[p for p, _ in ALL])
def test_every_option_has_help_and_shows_its_default_once(path, parser):
    problems = []
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings:
            continue
        name = "/".join(action.option_strings)
        if not action.help or action.help == argparse.SUPPRESS:
            problems.append(f"{name}: no help text")
            continue
        text = formatter._expand_help(action)
        shown = len(re.findall(r"\(default\b", text))
        if shown > 1:
            problems.append(f"{name}: default shown {shown} times: {text!r}")
        has_value = action.nargs != 0 and action.default is not None and not action.required
        if has_value and shown != 1:
            problems.append(f"{name}: default {action.default!r} not shown: {text!r}")
    assert not problems, f"{path}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path,parser", ALL, ids=[p for p, _ in ALL])
def test_help_has_no_sphinx_markup(path, parser):
    text = parser.format_help()
    for markup in ("``", ":class:", ":func:", ":mod:", ":meth:", ":attr:"):
        assert markup not in text, f"{path} --help shows {markup!r}:\n{text}"


NAMES = ["cat", "dog", "bird", "fish"]


def test_pairs_take_class_names_and_indices():
    assert parse_pairs("cat:dog,2:3,fish:0", NAMES) == [(0, 1), (2, 3), (3, 0)]
    assert parse_pair("cat,bird", NAMES) == (0, 2)
    assert parse_pair("1,fish", NAMES) == (1, 3)
    assert parse_pair("dog:bird", NAMES) == (1, 2)


@pytest.mark.parametrize("call", [lambda: parse_pairs("cat:eleven", NAMES), lambda: parse_pair("cat,eleven", NAMES),
                                  lambda: parse_pair("cat,7", NAMES)])
def test_an_unknown_class_names_the_known_ones(call):
    with pytest.raises(UsageError, match=r"unknown class .*known classes: \['cat', 'dog', 'bird', 'fish'\]"):
        call()


@pytest.mark.parametrize("argv", [
    ["fit-generator", "--data", "digits", "--pair", "3,eleven", "--steps", "1", "--no-progress"],
    ["generate", "--pairs", "3:eleven", "--per-pair", "1", "--no-progress"],
])
def test_cli_rejects_an_unknown_class_with_one_error_line(tmp_path, capsys, argv):
    rc = main([*argv, "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "unknown class 'eleven'" in err[0], err
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("argv", [["bench", "accuracy"], ["bench", "generator"], ["demo"]],
                         ids=lambda a: " ".join(a))
@pytest.mark.parametrize("bad,why", [("gpu0", "is not a torch device"), ("xla", "unsupported device")])
def test_device_is_checked_when_parsed(argv, bad, why, capsys):
    """A wrong --device fails at once with argparse's one-line error (exit code 2), before any work."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*argv, "--device", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and why in err, err
    assert build_parser().parse_args([*argv, "--device", "cpu"]).device == "cpu"
