"""Each knob has one default: what a command passes on when no flag is given equals its options
dataclass's defaults (ConvertOptions, CalibrateOptions with LayerwiseOptions and DistillOptions,
ValidateOptions), so that the CLI and the Python API cannot drift apart."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mlakit.cli import main
from mlakit.core.errors import MlakitError


def passed_options(monkeypatch, module: str, function: str, args: list) -> object:
    """Run a command with only its required arguments and return the options object it builds."""
    captured = {}

    def capture(*a, **kw):
        captured["opts"] = next(x for x in a if hasattr(x, "__dataclass_fields__"))
        raise MlakitError("captured")

    monkeypatch.setattr(f"{module}.{function}", capture)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "opts" in captured, result.output
    return captured["opts"]


def test_convert_defaults_are_the_dataclass_defaults(pico: Path, tmp_path: Path, monkeypatch) -> None:
    from mlakit.convert.pipeline import ConvertOptions

    got = passed_options(monkeypatch, "mlakit.convert.pipeline", "convert", ["convert", pico, tmp_path / "out"])
    assert got == ConvertOptions()


def test_calibrate_defaults_are_the_dataclass_defaults(pico: Path, tmp_path: Path, monkeypatch) -> None:
    from mlakit.calibrate.run import CalibrateOptions

    got = passed_options(monkeypatch, "mlakit.calibrate.run", "calibrate", ["calibrate", pico, tmp_path / "out"])
    assert got == CalibrateOptions()


def test_validate_defaults_are_the_dataclass_defaults(pico: Path, monkeypatch) -> None:
    from mlakit.validate.run import ValidateOptions

    got = passed_options(monkeypatch, "mlakit.validate.run", "validate", ["validate", pico, pico])
    assert got == ValidateOptions()


@pytest.mark.parametrize("command", ["convert", "calibrate", "validate"])
def test_every_option_says_what_it_does(command: str) -> None:
    missing = [p.name for p in main.commands[command].params if isinstance(p, click.Option) and not p.help]
    assert not missing, f"{command}: options without help: {missing}"
