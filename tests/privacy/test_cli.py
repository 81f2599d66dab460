"""``veil privacy epsilon`` and ``veil privacy calibrate`` (the typer sub-app)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from veil.commands.privacy import app
from veil.privacy import dpsgd_epsilon

runner = CliRunner()
BASE = ["--sample-rate", "0.02", "--steps", "300", "--delta", "1e-5"]


def test_epsilon_json_holds_the_answer_and_inputs() -> None:
    args = ["epsilon", "--noise-multiplier", "1.2", *BASE, "--accountant", "rdp"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["epsilon"] == dpsgd_epsilon(1.2, 0.02, 300, 1e-5, "rdp")
    assert out["noise_multiplier"] == 1.2 and out["steps"] == 300
    assert (out["accountant"], out["relation"]) == ("rdp", "add_or_remove_one")


def test_epsilon_text_and_infinite_json() -> None:
    text = runner.invoke(app, ["epsilon", "--noise-multiplier", "1.2", *BASE])
    assert text.exit_code == 0
    assert text.stdout.startswith("epsilon = ") and "accountant=pld" in text.stdout
    none = runner.invoke(app, ["epsilon", "--noise-multiplier", "0", *BASE, "--json"])
    assert json.loads(none.stdout)["epsilon"] is None


def test_calibrate_json_meets_the_target() -> None:
    args = ["calibrate", "--target-epsilon", "2", *BASE, "--accountant", "rdp"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["target_epsilon"] == 2.0
    z = out["noise_multiplier"]
    assert dpsgd_epsilon(z, 0.02, 300, 1e-5, "rdp") == out["epsilon"] <= 2.0


def test_bad_input_exits_2_with_a_clear_message() -> None:
    args = ["epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5"]
    result = runner.invoke(app, [*args, "--steps", "3", "--delta", "1e-5"])
    assert result.exit_code == 2
    assert "sample_rate must be in (0, 1], got 1.5" in result.stderr
    unknown = runner.invoke(app, ["epsilon", "--accountant", "moments", *BASE])
    assert unknown.exit_code == 2


def test_privacy_commands_are_part_of_the_veil_command() -> None:
    from veil.cli import app as veil_app

    args = ["privacy", "epsilon", "--noise-multiplier", "1.1", *BASE, "--json"]
    result = runner.invoke(veil_app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["epsilon"] > 0
