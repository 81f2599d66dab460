"""Config validation: every error names the key, what is allowed and what was found."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.errors import ConfigError
from veil.experiment import load_config, parse_config
from veil.experiment.config import METHOD_NAMES, dump_config
from veil.experiment.runner import METHODS


def test_defaults_and_round_trip(tmp_path: Path) -> None:
    config = parse_config({})
    assert config.data.partition == "iid" and config.local.batch_size == 10
    (tmp_path / "c.toml").write_text(dump_config(config))
    assert load_config(tmp_path / "c.toml") == config


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"fedavg": {"round": 5}})
    message = str(info.value)
    assert "fedavg.round" in message and "'rounds'" in message
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        parse_config({"colour": "red"})


@pytest.mark.parametrize(
    ("raw", "key", "found"),
    [
        ({"fedavg": {"client_fraction": 1.5}}, "fedavg.client_fraction", "1.5"),
        ({"local": {"lr": -0.1}}, "local.lr", "-0.1"),
        ({"data": {"partition": "random"}}, "data.partition", "'random'"),
        ({"data": {"dataset": "cifar"}}, "data.dataset", "'cifar'"),
        ({"model": {"name": "resnet"}}, "model.name", "'resnet'"),
        ({"methods": ["fedsgd"]}, "methods", "['fedsgd']"),
        ({"methods": []}, "methods", "[]"),
        ({"data": {"num_clients": "many"}}, "data.num_clients", "'many'"),
        ({"seed": -5}, "seed", "-5"),
        ({"fedavg": {"rounds": True}}, "fedavg.rounds", "True"),
    ],
)
def test_bad_values_name_key_and_value(raw: dict, key: str, found: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    message = str(info.value)
    assert f"'{key}'" in message and f"found {found}" in message


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    (tmp_path / "image.toml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(tmp_path / "image.toml")


def test_every_method_name_has_a_runner() -> None:
    assert set(METHOD_NAMES) == set(METHODS)


def test_bundled_configs_are_valid(repo_root: Path) -> None:
    paths = [
        *(repo_root / "experiments").glob("*.toml"),
        repo_root / "src/veil/experiment/configs/demo.toml",
    ]
    for path in paths:
        load_config(path)
