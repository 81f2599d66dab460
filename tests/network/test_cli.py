"""`veil certs` and the small parsing of `veil join`."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from veil.cli import app
from veil.commands.network import parse_clients
from veil.errors import ConfigError


def test_certs_writes_a_usable_pair_with_a_private_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["certs", "--out", str(tmp_path), "--host", "127.0.0.1"]
    )
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(
        x509.IPAddress
    )
    mode = stat.S_IMODE((tmp_path / "key.pem").stat().st_mode)
    assert mode == 0o600


def test_client_ranges() -> None:
    assert parse_clients("0-2,5, 7") == [0, 1, 2, 5, 7]
    for bad in ("", "a-b", "-3"):
        with pytest.raises(ConfigError, match="--clients"):
            parse_clients(bad)


def test_serve_refuses_an_unsupported_method(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'methods = ["fedavg"]\n[fedavg]\nlocal_dp = true\n[dp]\nepsilon = 1.0\n'
    )
    result = CliRunner().invoke(
        app, ["serve", str(config), "--state", str(tmp_path / "s")]
    )
    assert result.exit_code == 2
    assert "local_dp" in result.output
