"""Load on the federated server: N concurrent devices uploading 100,000-parameter
updates over loopback HTTP.

Three kinds of process, so that the load generator's CPU is never counted as the
server's:

- the server (``veil.network``: FedAvg over a 100,000-parameter float32 model, every
  client picked every round, state in SQLite) under uvicorn, in its own process;
- ``--workers`` load-generator processes (default 2), each running its share of the
  devices as asyncio tasks with one HTTP connection each: aiohttp when installed
  (``pip install -e '.[loadgen]'``; its C parser makes a device cost the
  generators about a quarter of the CPU httpx does), else httpx;
- this process, which starts the others, says go, and collects the numbers.

The machine may have fewer cores than processes (the project's has 2): then the
server and the load generators share the cores, and the time the generators take
is time the server does not get. So besides wall-clock rates the benchmark reads
the CPU time each side used (``/proc/PID/stat`` for the server, ``getrusage`` in
each worker) and prints the server's CPU time per upload, which does not depend on
how many cores the generators (or other jobs) left it. Wall-clock rates on a shared
machine depend on its load, printed with each measurement.

Every round each device asks for its task as ``veil join`` does (a long poll,
``GET /v1/task?wait=10``, held by the server until a round opens; backing off
0.1 s doubling to 2 s only after an empty answer that came at once), downloads the
model and uploads its update
(a fixed random update, so device compute is not measured); the server checks each
upload completely (token, round, names, shapes, dtypes, finite values, norm),
stores it durably, and aggregates when all are in.

Printed per server: uploads per second over the whole run (enrolment, downloads,
aggregation and checkpoints included) and while rounds collect (first to last
upload of each round), p50 and p99 latency of an upload, the server's peak memory
(VmHWM), the CPU seconds of the server and of the load generators; and, measured in
the same run as the baseline, the same devices uploading the same bytes (and
nothing else) to a bare FastAPI endpoint that only reads the body, with the ratio.

    python benchmarks/server_load.py --devices 100 --rounds 10 --json out.json

Profile the server: ``SERVER_LOAD_PROFILE=server.prof`` runs it under cProfile, or
attach ``py-spy record --gil -p PID`` to the ``--serve`` process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # at module level: the sink's annotations

PARAMETERS = 100_000
# Seconds a device's idle task request may be held: veil.network.device.TASK_WAIT.
TASK_WAIT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the server process -----------------------------------------------------------
def serve(port: int, devices: int, rounds: int, state: str, bare: bool) -> None:
    import uvicorn

    if bare:
        app = FastAPI()

        @app.post("/sink")
        async def sink(request: Request) -> dict[str, int]:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
            return {"bytes": size}

    else:
        import threading

        import torch

        from veil.learning import FedAvg, SGDTrainer
        from veil.network import (
            FederatedServer,
            ServerSettings,
            StateStore,
            create_app,
        )

        torch.set_num_threads(1)
        algorithm = FedAvg(
            {"w": torch.zeros(PARAMETERS)}, devices, 1.0, SGDTrainer(0.1)
        )
        settings = ServerSettings(round_timeout=600, max_update_norm=1e6)
        server = FederatedServer(algorithm, StateStore(state), devices, settings)
        threading.Thread(target=server.run, args=(rounds,), daemon=True).start()
        app = create_app(server)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the load generators ----------------------------------------------------------
class Http:
    """One device's HTTP connection: aiohttp (its C parser keeps the load
    generators' CPU low) when installed, else httpx."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            import aiohttp
        except ImportError:
            import httpx

            self._httpx: Any = httpx.AsyncClient(base_url=url, timeout=600)
            self._aiohttp: Any = None
        else:
            self._httpx = None
            self._aiohttp = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1),
                timeout=aiohttp.ClientTimeout(total=600),
            )

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        if self._aiohttp is None:
            r = await self._httpx.request(method, path, headers=headers, content=body)
            return r.status_code, r.content
        async with self._aiohttp.request(
            method, self.url + path, headers=headers, data=body or None
        ) as r:
            return r.status, await r.read()

    async def close(self) -> None:
        if self._aiohttp is None:
            await self._httpx.aclose()
        else:
            await self._aiohttp.close()


def client_library() -> str:
    try:
        import aiohttp
    except ImportError:
        import httpx

        return f"httpx {httpx.__version__}"
    return f"aiohttp {aiohttp.__version__}"


async def device(
    url: str,
    client_id: int,
    body: bytes,
    latencies: list[float],
    spans: list[tuple[int, float, float]],
    requests: dict[str, int],
) -> int:
    meta = json.dumps({"num_examples": 10, "loss": 1.0, "metrics": {}})
    http = Http(url)
    try:
        json_body = json.dumps({"client_id": client_id}).encode()
        status, answer = await http.request(
            "POST", "/v1/enrol", {"Content-Type": "application/json"}, json_body
        )
        auth = {"Authorization": f"Bearer {json.loads(answer)['token']}"}
        sent, pause = 0, 0.0
        while True:
            asked = time.monotonic()
            status, answer = await http.request(
                "GET", f"/v1/task?wait={TASK_WAIT:g}", auth
            )
            requests[str(status)] = requests.get(str(status), 0) + 1
            if status == 410:
                return sent
            if status == 204:  # as veil join: at once after a held long poll,
                # else back off 0.1 s doubling to 2 s
                if time.monotonic() - asked >= min(TASK_WAIT, 1.0) / 2:
                    pause = 0.0
                    continue
                pause = min(max(2 * pause, 0.1), 2.0)
                await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                continue
            pause = 0.0
            rnd = json.loads(answer)["round"]
            await http.request("GET", f"/v1/rounds/{rnd}/model", auth)
            start = time.monotonic()
            status, answer = await http.request(
                "POST",
                f"/v1/rounds/{rnd}/update",
                {**auth, "X-Veil-Result": meta},
                body,
            )
            end = time.monotonic()
            latencies.append(end - start)
            spans.append((rnd, start, end))
            if status != 201:
                raise RuntimeError(f"upload refused: {status} {answer[:200]!r}")
            sent += 1
    finally:
        await http.close()


async def bare_device(
    url: str,
    body: bytes,
    count: int,
    latencies: list[float],
    spans: list[tuple[int, float, float]],
) -> int:
    http = Http(url)
    try:
        for _ in range(count):
            start = time.monotonic()
            status, _ = await http.request("POST", "/sink", {}, body)
            end = time.monotonic()
            latencies.append(end - start)
            spans.append((0, start, end))
            if status != 200:
                raise RuntimeError(f"the bare endpoint answered {status}")
    finally:
        await http.close()
    return count


def drive(url: str, ids: list[int], rounds: int, bare: bool) -> None:
    """A load-generator process: say ready, wait for go, run the devices ``ids``,
    print what was measured as one JSON line."""
    body = update_bytes()
    client_library()  # imported before the clock starts
    latencies: list[float] = []
    spans: list[tuple[int, float, float]] = []
    requests: dict[str, int] = {}
    print("ready", flush=True)
    sys.stdin.readline()
    before = resource.getrusage(resource.RUSAGE_SELF)

    async def everyone() -> list[int]:
        if bare:
            jobs = [bare_device(url, body, rounds, latencies, spans) for _ in ids]
        else:
            jobs = [device(url, k, body, latencies, spans, requests) for k in ids]
        return await asyncio.gather(*jobs)

    sent = sum(asyncio.run(everyone()))
    finished = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {
        "tasks": requests,
        "sent": sent,
        "latencies": latencies,
        "spans": spans,
        "cpu": cpu,
        "finished": finished,
    }
    print(json.dumps(result), flush=True)


def update_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    return save({"w": 1e-3 * torch.randn(PARAMETERS, generator=g)})


# --- the conductor ----------------------------------------------------------------
def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def wait_up(port: int, process: subprocess.Popen[bytes]) -> None:
    while True:
        if process.poll() is not None:
            raise RuntimeError("the server process exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)


def start_server(role: list[str], port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--serve", "--port", str(port), *role]
    profile = os.environ.get("SERVER_LOAD_PROFILE")  # cProfile the server into it
    if profile:
        command[1:1] = ["-m", "cProfile", "-o", profile]
    process = subprocess.Popen(command)
    wait_up(port, process)
    return process


def start_workers(
    args: argparse.Namespace, url: str, bare: bool
) -> list[subprocess.Popen[str]]:
    workers = []
    for w in range(args.workers):
        ids = list(range(w, args.devices, args.workers))
        command = [sys.executable, __file__, "--drive", url, "--ids", json.dumps(ids)]
        command += ["--rounds", str(args.rounds)] + (["--bare"] if bare else [])
        workers.append(
            subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        )
    for p in workers:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("a load-generator process failed to start")
    return workers


def measure(args: argparse.Namespace, bare: bool) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as state:
        role = ["--devices", str(args.devices), "--rounds", str(args.rounds)]
        role += ["--state", state] + (["--bare"] if bare else [])
        server = start_server(role, port)
        try:
            workers = start_workers(args, url, bare)
            load = os.getloadavg()[0]
            cpu_before = cpu_seconds(server.pid)
            begin = time.monotonic()
            for p in workers:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            results = []
            for p in workers:
                out, _ = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError("a load-generator process failed")
                results.append(json.loads(out.strip().splitlines()[-1]))
            # From go to the last device done (CLOCK_MONOTONIC is system-wide),
            # not to the processes' exit.
            seconds = max(r["finished"] for r in results) - begin
            cpu_after = cpu_seconds(server.pid)
            memory = peak_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait()
    sent = sum(r["sent"] for r in results)
    user, system = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
    server_cpu = user + system
    ms = np.array([x for r in results for x in r["latencies"]]) * 1000
    spans = [tuple(s) for r in results for s in r["spans"]]
    busy = sum(
        max(e for q, _, e in spans if q == rnd)
        - min(b for q, b, _ in spans if q == rnd)
        for rnd in {s[0] for s in spans}
    )
    return {
        "uploads": sent,
        "seconds": seconds,
        "uploads_per_s": sent / seconds,
        "collecting_per_s": sent / busy,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "server_peak_mb": memory,
        "server_cpu_s": server_cpu,
        "server_system_cpu_s": system,
        "server_cpu_ms_per_upload": 1000 * server_cpu / sent,
        "client_cpu_s": sum(r["cpu"] for r in results),
        "load_average": load,
        "task_answers": {
            k: sum(r.get("tasks", {}).get(k, 0) for r in results)
            for k in ("200", "204", "410")
        },
    }


def http_stack() -> str:
    """Which HTTP parser and event loop uvicorn picks here (``auto``)."""
    names = []
    for module, fast, slow in (
        ("httptools", "httptools", "h11"),
        ("uvloop", "uvloop", "asyncio"),
    ):
        try:
            __import__(module)
            names.append(fast)
        except ImportError:
            names.append(slow)
    return " + ".join(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--workers", type=int, default=2, help="load-generator processes"
    )
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--drive", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ids", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--state", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.devices, args.rounds, args.state, args.bare)
        return
    if args.drive:
        drive(args.drive, json.loads(args.ids), args.rounds, args.bare)
        return
    if not 1 <= args.workers <= args.devices:
        parser.error(f"--workers must be in [1, --devices], got {args.workers}")
    print(
        f"{args.devices} devices in {args.workers} load-generator processes, "
        f"{args.rounds} rounds, {PARAMETERS} float32 parameters an update; "
        f"uvicorn with {http_stack()}, devices on {client_library()}; "
        f"{os.cpu_count()} cpus shared by all"
    )
    veil = measure(args, bare=False)
    bare = measure(args, bare=True)
    for name, m in (("veil server", veil), ("bare endpoint", bare)):
        print(
            f"{name:13s} load {m['load_average']:.1f}: {m['uploads']} uploads in "
            f"{m['seconds']:.2f} s, {m['uploads_per_s']:.0f}/s whole run, "
            f"{m['collecting_per_s']:.0f}/s while rounds collect, "
            f"p50 {m['p50_ms']:.0f} ms, p99 {m['p99_ms']:.0f} ms, "
            f"server peak {m['server_peak_mb']:.0f} MB, "
            f"server CPU {m['server_cpu_s']:.1f} s "
            f"({m['server_cpu_ms_per_upload']:.1f} ms an upload), "
            f"load generators' CPU {m['client_cpu_s']:.1f} s"
        )
    print(
        "veil / bare uploads per second: "
        f"{veil['uploads_per_s'] / bare['uploads_per_s']:.2f} whole run, "
        f"{veil['collecting_per_s'] / bare['collecting_per_s']:.2f} while collecting"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"veil": veil, "bare": bare}, indent=1))


if __name__ == "__main__":
    main()
