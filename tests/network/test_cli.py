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


def test_certs_keeps_an_existing_pair_unless_forced(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["certs", "--out", str(tmp_path)]).exit_code == 0
    key = (tmp_path / "key.pem").read_bytes()
    cert = (tmp_path / "cert.pem").read_bytes()

    again = runner.invoke(app, ["certs", "--out", str(tmp_path)])
    assert again.exit_code != 0
    assert "already holds cert.pem and key.pem" in again.output
    assert "--force" in again.output
    assert (tmp_path / "key.pem").read_bytes() == key
    assert (tmp_path / "cert.pem").read_bytes() == cert

    forced = runner.invoke(app, ["certs", "--out", str(tmp_path), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "key.pem").read_bytes() != key


def test_client_ranges() -> None:
    assert parse_clients("0-2,5, 7") == [0, 1, 2, 5, 7]
    for bad in ("", "a-b", "-3", "5-2"):
        with pytest.raises(ConfigError, match="--clients"):
            parse_clients(bad)


def test_a_bad_token_file_is_refused_before_anything_is_enrolled(
    tmp_path: Path,
) -> None:
    # Refused before the device contacts the server: an enrolled client whose
    # token could not be kept would be lost for good.
    from veil.experiment._network import join

    unreachable = "http://127.0.0.1:1"
    with pytest.raises(ConfigError, match="does not exist"):
        join(unreachable, [0], token_file=tmp_path / "nope" / "t.json")
    garbage = tmp_path / "t.json"
    garbage.write_text("not json")
    with pytest.raises(ConfigError, match="not a token file"):
        join(unreachable, [0], token_file=garbage)
    garbage.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        join(unreachable, [0], token_file=garbage)


def test_serve_refuses_what_would_stop_it_from_starting(tmp_path: Path) -> None:
    import socket

    from veil.commands.network import _check_serving

    state_file = tmp_path / "state"
    state_file.write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        _check_serving(state_file, "127.0.0.1", 0, None, None)
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    with pytest.raises(ConfigError, match="go together"):
        _check_serving(tmp_path / "s", "127.0.0.1", 0, cert, None)
    with pytest.raises(ConfigError, match="do not load"):
        _check_serving(tmp_path / "s", "127.0.0.1", 0, cert, cert)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen"):
            _check_serving(tmp_path / "s", "127.0.0.1", port, None, None)


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
