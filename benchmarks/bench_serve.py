"""Concurrent load on ``falip serve`` over loopback: requests, failures, latency percentiles.

    python benchmarks/bench_serve.py                         # 64 requests, 16 at a time, falip-toy on CPU
    python benchmarks/bench_serve.py --requests 128 --concurrency 32 --methods falip,crop --output out.json

Starts the real command (``python -m falip serve --port 0``) on 127.0.0.1 in a subprocess, waits
for ``/api/health``, then sends ``POST /api/score`` requests (a generated 256×256 scene, its 3
object boxes, one expression per object) from ``--concurrency`` client threads, cycling through
``--methods`` and 4 box sets. Every answer is checked against the solo answer of the same request
(sent once, one at a time, before the load). Latency is per request, client side, in ms. Bounded:
at most ``--requests`` requests (≤ 1024), each with a ``--timeout``; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from falip.synthetic import make_scene


def start_server(model: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    out = workdir / "server.log"
    cmd = [sys.executable, "-m", "falip", "serve", "--model", model, "--host", "127.0.0.1", "--port", "0"]
    with open(out, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"falip serve exited: {out.read_text()}")
        for line in out.read_text().splitlines():
            if line.startswith("falip serve:") and "open http://" in line:
                url = line.split("open ")[1].split()[0]
                while time.monotonic() < deadline:
                    try:
                        if httpx.get(url + "api/health", timeout=5).status_code == 200:
                            return proc, url
                    except httpx.TransportError:
                        time.sleep(0.1)
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("falip serve did not start within 180 s")


def make_requests(n_variants: int, methods: list[str]) -> list[dict]:
    scene = make_scene(np.random.default_rng(7), 3, 256)
    buf = io.BytesIO()
    scene.image.save(buf, format="PNG")
    texts = [f"the {o.name}" for o in scene.objects]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_variants):
        jitter = rng.uniform(-4, 4, size=(3, 4)) if i else np.zeros((3, 4))
        boxes = [[float(v) for v in np.add(o.box, d)] for o, d in zip(scene.objects, jitter)]
        for method in methods:
            out.append(dict(boxes=json.dumps(boxes), texts=json.dumps(texts), method=method))
    return [dict(image=buf.getvalue(), data=d) for d in out]


def send(client: httpx.Client, request: dict) -> tuple[float, int, dict]:
    t0 = time.perf_counter()
    r = client.post("/api/score", files={"image": ("scene.png", request["image"], "image/png")}, data=request["data"])
    ms = (time.perf_counter() - t0) * 1000
    return ms, r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json") else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="falip-toy")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--methods", default="falip", help="comma-separated methods to cycle through (default falip)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args()
    if not 1 <= args.requests <= 1024 or not 1 <= args.concurrency <= 64:
        raise SystemExit("--requests must be in 1..1024 and --concurrency in 1..64")

    requests = make_requests(4, [m.strip() for m in args.methods.split(",") if m.strip()])
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.model, Path(tmp))
        try:
            with httpx.Client(base_url=url, timeout=args.timeout) as c:
                solo = [send(c, r) for r in requests]
            solo_ms = [ms for ms, _, _ in solo]
            local = threading.local()

            def one(i: int):
                if not hasattr(local, "client"):
                    local.client = httpx.Client(base_url=url, timeout=args.timeout)
                try:
                    ms, status, body = send(local.client, requests[i % len(requests)])
                except httpx.HTTPError as exc:
                    return i, None, 0, {"error": str(exc)}
                return i, ms, status, body

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    failures, wrong, latencies = 0, 0, []
    for i, ms, status, body in results:
        if status != 200:
            failures += 1
            continue
        latencies.append(ms)
        expected = solo[i % len(requests)][2]
        if not np.allclose(body["scores"], expected["scores"], rtol=0, atol=1e-6) or body["best"] != expected["best"]:
            wrong += 1
    lat = np.array(latencies) if latencies else np.array([np.nan])
    figures = dict(
        model=args.model,
        methods=args.methods,
        requests=args.requests,
        concurrency=args.concurrency,
        failures=failures,
        wrong_answers=wrong,
        p50_ms=float(np.percentile(lat, 50)),
        p95_ms=float(np.percentile(lat, 95)),
        max_ms=float(lat.max()),
        solo_p50_ms=float(np.percentile(solo_ms, 50)),
        requests_per_s=args.requests / wall,
        wall_s=wall,
        cpu_count=os.cpu_count(),
    )
    print(json.dumps(figures, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
