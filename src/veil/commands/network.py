"""``veil serve``, ``veil join`` and ``veil certs``: the network runtime's commands.

Thin wrappers over :mod:`veil.experiment._network` and :mod:`veil.network.certs`:

- ``veil serve CONFIG --state DIR``: the federated server for the config's FedAvg
  or DP-FedAvg, or DSSGD's parameter server, over HTTPS with ``--cert``/``--key``;
  restarted on the same DIR it resumes;
- ``veil join --server URL --clients 0-9``: a device process acting for those
  clients (their data read from the local dataset, as the config splits it);
- ``veil certs --out DIR``: a self-signed certificate and key for trials.

Errors veil raises on purpose print one message and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from veil.errors import ConfigError, VeilError

__all__ = ["certs", "join", "parse_clients", "serve"]


def _fail(exc: VeilError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=2)


def parse_clients(text: str) -> list[int]:
    """Client ids from ``"0-4,7,9"``."""
    ids: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            first, last = int(a), int(b or a)
            if last < first:
                raise ConfigError(
                    f"--clients range {part.strip()!r} runs backwards; write "
                    f"'{last}-{first}'"
                )
            ids.extend(range(first, last + 1))
    except ValueError:
        raise ConfigError(
            f"--clients must be ids or ranges like '0-4,7', got {text!r}"
        ) from None
    if not ids or min(ids) < 0:
        raise ConfigError(f"--clients must name ids >= 0, got {text!r}")
    return sorted(set(ids))


def _default_method(methods: list[str]) -> str:
    """The method ``veil serve`` runs without ``--method``: dp-fedavg, fedavg or
    dssgd, the first of them the config lists (fedavg if none)."""
    for method in ("dp-fedavg", "fedavg", "dssgd"):
        if method in methods:
            return method
    return "fedavg"


def _read_key(path: Path | None) -> str | None:
    return None if path is None else path.read_text().strip()


_EXISTING_FILE: dict[str, Any] = {"exists": True, "dir_okay": False, "readable": True}

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="VEIL_DATA", help="Folder of datasets."),
]
KeyFile = Annotated[
    Path | None,
    typer.Option(
        "--enrolment-key-file",
        help="File holding the enrolment key devices must present to enrol.",
        **_EXISTING_FILE,
    ),
]


def serve(
    config: Annotated[Path, typer.Argument(help="Experiment config (TOML).")],
    state: Annotated[
        Path, typer.Option("--state", help="Folder of the server's state.")
    ] = Path("server-state"),
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="fedavg, dp-fedavg or dssgd (default: from config)."
        ),
    ] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8443,
    cert: Annotated[
        Path | None,
        typer.Option("--cert", help="TLS certificate.", **_EXISTING_FILE),
    ] = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="TLS private key.", **_EXISTING_FILE)
    ] = None,
    enrolment_key_file: KeyFile = None,
    linger: Annotated[
        float, typer.Option("--linger", help="Seconds to keep answering at the end.")
    ] = 10.0,
    data_dir: DataDir = None,
) -> None:
    """Serve CONFIG's FedAvg, DP-FedAvg or DSSGD to devices (`veil join`).

    Restarted on the same --state, the server resumes where it was."""
    from veil.experiment import load_config
    from veil.experiment._network import serve as run_server

    try:
        cfg = load_config(config)
        if method is None:
            method = _default_method(cfg.methods)
        _check_serving(state, host, port, cert, key)
        run_server(
            cfg,
            method,
            state,
            host=host,
            port=port,
            certfile=cert,
            keyfile=key,
            enrolment_key=_read_key(enrolment_key_file),
            linger=linger,
            data_dir=data_dir,
            announce=typer.echo,
        )
    except VeilError as exc:
        raise _fail(exc) from None


def _check_serving(
    state: Path, host: str, port: int, cert: Path | None, key: Path | None
) -> None:
    """Refuse, before anything starts, what would stop the server from starting:
    a state path that is a file, a certificate and key that do not load together,
    an address it cannot listen on."""
    import socket
    import ssl

    if state.exists() and not state.is_dir():
        raise ConfigError(
            f"--state {state} is a file; give a folder (new or the run's)"
        )
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together: give both, or neither")
    if cert is not None and key is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                cert, key
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"--cert {cert} and --key {key} do not load as a certificate and its "
                f"private key (PEM): {exc}; `veil certs` writes a matching pair"
            ) from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another "
            "--host or --port"
        ) from None


def join(
    server: Annotated[str, typer.Option("--server", help="The server's URL.")],
    clients: Annotated[
        str, typer.Option("--clients", help="Client ids to act for: '0-4,7'.")
    ],
    ca_file: Annotated[
        Path | None,
        typer.Option(
            "--ca-file", help="Certificate to trust (e.g. cert.pem).", **_EXISTING_FILE
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="Keep the tokens here (JSON, owner only)."),
    ] = None,
    enrolment_key_file: KeyFile = None,
    max_unreachable: Annotated[
        float,
        typer.Option("--max-unreachable", help="Give up after this many seconds."),
    ] = 120.0,
    task_wait: Annotated[
        float,
        typer.Option(
            "--task-wait",
            min=0.0,
            max=10.0,
            help="Seconds the server may hold an idle task request (a long poll); "
            "0 polls with backoff instead.",
        ),
    ] = 10.0,
    data_dir: DataDir = None,
) -> None:
    """Act as device(s) for CLIENTS: enrol, poll for tasks, train, upload."""
    from veil.experiment._network import join as run_device

    try:
        sent = run_device(
            server,
            parse_clients(clients),
            ca_file=ca_file,
            data_dir=data_dir,
            token_file=token_file,
            enrolment_key=_read_key(enrolment_key_file),
            max_unreachable=max_unreachable,
            task_wait=task_wait,
        )
    except VeilError as exc:
        raise _fail(exc) from None
    typer.echo(f"done: {sent} updates accepted")


def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder to write into.")] = Path(
        "certs"
    ),
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Name or IP the certificate is for (repeat)."),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1)] = 30,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace a cert.pem/key.pem already in --out."),
    ] = False,
) -> None:
    """Write a self-signed certificate (cert.pem) and key (key.pem) for trials."""
    from veil.network.certs import write_self_signed

    if out.exists() and not out.is_dir():
        raise _fail(ConfigError(f"--out {out} is a file; give a folder"))
    try:
        cert, key = write_self_signed(out, host, days, overwrite=force)
    except ConfigError as exc:
        raise _fail(exc) from None
    except ValueError as exc:
        raise _fail(ConfigError(f"--host {host}: {exc}")) from None
    except OSError as exc:
        raise _fail(ConfigError(f"cannot write into {out}: {exc}")) from None
    typer.echo(f"certificate {cert} (devices: --ca-file {cert}), key {key}")
