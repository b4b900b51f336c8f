"""Tests for switch_sae.cli.args: argparse options derived from config dataclasses."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from switch_sae.cli.args import add_dataclass_arguments, dataclass_from_args, field_docs


@dataclass
class Inner:
    """Inner block."""

    k: int = 4
    """Active features per token."""
    act: Literal["relu", "gelu"] = "relu"
    """Activation function."""


@dataclass
class Outer:
    """Outer config."""

    d_in: int
    """Width of the input."""
    lr: float | None = None
    """Learning rate; None means automatic."""
    use_bias: bool = True
    """Whether to add a bias."""
    widths: tuple[int, ...] = (1, 2)
    """Widths to sweep."""
    name: str = ""
    """A name."""
    inner: Inner = field(default_factory=Inner)
    """Nested options."""

    def __post_init__(self) -> None:
        if self.d_in < 1:
            raise ValueError(f"d_in must be positive, got {self.d_in}")


def make_parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t", exit_on_error=True)
    add_dataclass_arguments(parser, Outer, **kwargs)
    return parser


def test_field_docs_reads_the_string_under_each_field():
    docs = field_docs(Outer)
    assert docs["d_in"] == "Width of the input."
    assert docs["lr"] == "Learning rate; None means automatic."
    assert "k" not in docs  # nested fields belong to Inner
    assert field_docs(Inner)["k"] == "Active features per token."


def test_help_documents_every_field_with_its_default():
    text = make_parser().format_help()
    for flag in ("--d-in", "--lr", "--use-bias", "--no-use-bias", "--widths", "--name", "--inner-k", "--inner-act"):
        assert flag in text
    assert "Width of the input. (required)" in text
    assert "Active features per token. (default: 4)" in text
    assert "Widths to sweep. (default: 1 2)" in text


def test_defaults_apply_when_options_are_absent():
    cfg = dataclass_from_args(Outer, make_parser().parse_args(["--d-in", "8"]))
    assert cfg == Outer(d_in=8)


def test_every_kind_of_option_parses():
    argv = ["--d-in", "8", "--lr", "0.5", "--no-use-bias", "--widths", "3", "5", "--name", "x",
            "--inner-k", "7", "--inner-act", "gelu"]
    cfg = dataclass_from_args(Outer, make_parser().parse_args(argv))
    assert cfg == Outer(d_in=8, lr=0.5, use_bias=False, widths=(3, 5), name="x", inner=Inner(k=7, act="gelu"))
    assert isinstance(cfg.widths, tuple)


def test_optional_accepts_none():
    cfg = dataclass_from_args(Outer, make_parser().parse_args(["--d-in", "8", "--lr", "none"]))
    assert cfg.lr is None


def test_given_values_fill_excluded_fields():
    parser = make_parser(exclude=("d_in",))
    assert "--d-in" not in parser.format_help()
    cfg = dataclass_from_args(Outer, parser.parse_args(["--inner-k", "2"]), d_in=16)
    assert cfg.d_in == 16 and cfg.inner.k == 2


def test_options_the_user_passed_win_over_given_values():
    args = make_parser().parse_args(["--d-in", "8", "--name", "mine"])
    cfg = dataclass_from_args(Outer, args, name="command's", lr=0.1)
    assert (cfg.name, cfg.lr, cfg.d_in) == ("mine", 0.1, 8)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--d-in", "eight"], "expected int, got 'eight'"),
        (["--d-in", "8", "--inner-act", "tanh"], "invalid choice"),
        ([], "required: --d-in"),
    ],
)
def test_bad_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_validation_stays_in_the_dataclass():
    with pytest.raises(ValueError, match="d_in must be positive"):
        dataclass_from_args(Outer, make_parser().parse_args(["--d-in", "0"]))


def test_unsupported_field_type_is_rejected_when_building_the_parser():
    @dataclass
    class Bad:
        mapping: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="Bad.mapping"):
        add_dataclass_arguments(argparse.ArgumentParser(), Bad)
