"""Load on the federated server: N concurrent devices uploading 100,000-parameter
updates over loopback HTTP.

The server (``veil.network``: FedAvg over a 100,000-parameter float32 model, every
client picked every round, state in SQLite) runs in its own process under uvicorn;
the devices are asyncio tasks with one ``httpx.AsyncClient`` each, in this process.
Every round each device asks for its task, downloads the model and uploads its
update (a fixed random update, so device compute is not measured); the server checks
each upload completely (token, round, names, shapes, dtypes, finite values, norm),
stores it in one SQLite transaction, and aggregates when all are in.

Printed: uploads per second over the whole run (enrolment, downloads, aggregation
and checkpoints included) and while rounds collect (first to last upload of each
round), p50 and p99 latency of an upload, and the server's peak memory (VmHWM);
and, as the baseline measured in the same run, the same uploads to a bare FastAPI
endpoint that reads the body and does nothing else, with the ratio.

    python benchmarks/server_load.py --devices 100 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request

PARAMETERS = 100_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the server process -----------------------------------------------------------
def serve(port: int, devices: int, rounds: int, state: str, bare: bool) -> None:
    import torch
    import uvicorn

    if bare:
        app = FastAPI()

        @app.post("/sink")
        async def sink(request: Request) -> dict[str, int]:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
            return {"bytes": size}

        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
        return

    import threading

    from veil.learning import FedAvg, SGDTrainer
    from veil.network import FederatedServer, ServerSettings, StateStore, create_app

    torch.set_num_threads(1)
    algorithm = FedAvg({"w": torch.zeros(PARAMETERS)}, devices, 1.0, SGDTrainer(0.1))
    settings = ServerSettings(round_timeout=600, max_update_norm=1e6)
    server = FederatedServer(algorithm, StateStore(state), devices, settings)
    threading.Thread(target=server.run, args=(rounds,), daemon=True).start()
    uvicorn.run(
        create_app(server),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
    )


# --- the devices ----------------------------------------------------------------
async def device(
    url: str,
    client_id: int,
    body: bytes,
    latencies: list[float],
    spans: list[tuple[int, float, float]],
) -> int:
    import httpx

    meta = json.dumps({"num_examples": 10, "loss": 1.0, "metrics": {}})
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        r = await http.post("/v1/enrol", json={"client_id": client_id})
        token = r.json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        sent, wait = 0, 0.0
        while True:
            r = await http.get("/v1/task", headers=auth)
            if r.status_code == 410:
                return sent
            if r.status_code == 204:  # back off as veil join does
                wait = min(max(2 * wait, 0.05), 1.0)
                await asyncio.sleep(wait * random.uniform(0.5, 1.0))
                continue
            wait = 0.0
            rnd = r.json()["round"]
            await http.get(f"/v1/rounds/{rnd}/model", headers=auth)
            start = time.perf_counter()
            r = await http.post(
                f"/v1/rounds/{rnd}/update",
                content=body,
                headers={**auth, "X-Veil-Result": meta},
            )
            latencies.append(time.perf_counter() - start)
            spans.append((rnd, start, time.perf_counter()))
            if r.status_code != 201:
                raise RuntimeError(f"upload refused: {r.status_code} {r.text}")
            sent += 1


async def bare_device(url: str, body: bytes, count: int, latencies: list[float]) -> int:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for _ in range(count):
            start = time.perf_counter()
            r = await http.post("/sink", content=body)
            latencies.append(time.perf_counter() - start)
            r.raise_for_status()
    return count


def update_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    return save({"w": 1e-3 * torch.randn(PARAMETERS, generator=g)})


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_up(port: int, process: subprocess.Popen[bytes]) -> None:
    while True:
        if process.poll() is not None:
            raise RuntimeError("the server process exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)


def start(role: list[str], port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--serve", "--port", str(port), *role]
    profile = os.environ.get("SERVER_LOAD_PROFILE")  # cProfile the server into it
    if profile:
        command[1:1] = ["-m", "cProfile", "-o", profile]
    process = subprocess.Popen(command)
    wait_up(port, process)
    return process


def measure(args: argparse.Namespace, bare: bool) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = update_bytes()
    latencies: list[float] = []
    spans: list[tuple[int, float, float]] = []
    with tempfile.TemporaryDirectory() as state:
        role = ["--devices", str(args.devices), "--rounds", str(args.rounds)]
        role += ["--state", state] + (["--bare"] if bare else [])
        process = start(role, port)
        try:
            begin = time.perf_counter()

            async def everyone() -> list[int]:
                if bare:
                    jobs = [
                        bare_device(url, body, args.rounds, latencies)
                        for _ in range(args.devices)
                    ]
                else:
                    jobs = [
                        device(url, k, body, latencies, spans)
                        for k in range(args.devices)
                    ]
                return await asyncio.gather(*jobs)

            sent = sum(asyncio.run(everyone()))
            seconds = time.perf_counter() - begin
            memory = peak_rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait()
    ms = np.array(latencies) * 1000
    busy = seconds  # the bare endpoint has no rounds
    if spans:
        rounds = {r for r, _, _ in spans}
        busy = sum(
            max(e for q, _, e in spans if q == r)
            - min(b for q, b, _ in spans if q == r)
            for r in rounds
        )
    return {
        "upload_phase_per_s": sent / busy,
        "uploads": sent,
        "seconds": seconds,
        "uploads_per_s": sent / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "server_peak_mb": memory,
        "upload_bytes": len(body),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--state", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.devices, args.rounds, args.state, args.bare)
        return
    print(f"{args.devices} devices, {args.rounds} rounds, {PARAMETERS} parameters")
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()}")
    veil = measure(args, bare=False)
    bare = measure(args, bare=True)
    for name, m in (("veil server", veil), ("bare endpoint", bare)):
        print(
            f"{name:14s} {m['uploads']:5d} uploads of {m['upload_bytes']} B in "
            f"{m['seconds']:.2f} s: {m['uploads_per_s']:.0f} uploads/s "
            f"({m['upload_phase_per_s']:.0f}/s while rounds collect), "
            f"p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms, "
            f"server peak {m['server_peak_mb']:.0f} MB"
        )
    ratio = veil["uploads_per_s"] / bare["uploads_per_s"]
    print(f"veil / bare uploads per second: {ratio:.2f}")


if __name__ == "__main__":
    main()
