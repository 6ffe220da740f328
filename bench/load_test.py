"""Load test for ``deltatune serve``: many clients, many adapters, every answer checked.

Starts the server (a subprocess) with N runs' adapters over one base, sends a fixed number of
requests from M concurrent clients (httpx.AsyncClient), each for a random adapter and a few
random texts, and checks every answer against what that run predicts for the text alone
(label equal, probabilities within 1e-5). Midway it loads one more run while serving, sends it
traffic, and unloads it again. Prints throughput, latency percentiles, errors, wrong answers
and the server's batching counters; the server is stopped with SIGTERM and must exit 0.

    python bench/load_test.py                           # trains 7 short runs on the bundled MiniLM first
    python bench/load_test.py --runs runs/a runs/b --extra runs/c --clients 32 --requests 4000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

METHODS = ["lora", "ia3", "bitfit", "prompt", "prefix", "vera", "adapter"]  # the last one is the extra, loaded midway
WORDS = ["the", "film", "was", "plot", "actors", "really", "quite", "and", "story", "music", "great", "awful",
         "wonderful", "boring", "superb", "dreadful", "long", "short", "funny", "sad"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", help="run folders to serve (default: train short ones)")
    parser.add_argument("--extra", help="a run folder loaded and unloaded during the load (default: trained)")
    parser.add_argument("--workdir", default="runs/load-test", help="where the default runs are trained (kept)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2000, help="requests in all")
    parser.add_argument("--inputs", type=int, default=4, help="the most texts per request (1 to this many)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train_runs(workdir: Path) -> list[Path]:
    """Short runs of each method on the bundled model and data (reused when already there)."""
    from deltatune.env import offline_and_quiet
    from deltatune.train.config import load_config
    from deltatune.train.loop import train

    offline_and_quiet()
    for method in METHODS:
        if not (workdir / method / "adapter").is_dir():
            print(f"training {method} (a few steps on the bundled MiniLM)...", file=sys.stderr)
            train(load_config(None, [f"method={method}", "model.max_length=64", "data.max_train_samples=64",
                                     "data.max_eval_samples=16", "training.max_steps=4", "training.batch_size=16",
                                     "training.warmup_steps=0", "training.learning_rate=5e-3",
                                     f"training.output_dir={workdir / method}", "training.progress=false"]))
    return [workdir / method for method in METHODS]


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(n)]


def expected_answers(runs: dict[str, Path], pool: list[str]) -> dict[str, dict[str, dict]]:
    """adapter name -> text -> what its run predicts for that text alone."""
    from deltatune.train.inference import load_run

    answers = {}
    for name, folder in runs.items():
        _, task, tokenizer, model = load_run(folder)
        answers[name] = {text: task.predict(model, tokenizer, [text])[0] for text in pool}
    return answers


def same(got: dict, want: dict) -> bool:
    return got["label"] == want["label"] and all(
        abs(got["probabilities"][k] - p) <= 1e-5 for k, p in want["probabilities"].items())


def start_server(runs: dict[str, Path], args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    adapters = [f"--adapter={name}={folder}" for name, folder in runs.items()]
    server = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", *adapters, "--port", str(port),
                               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                               "--max-inputs", str(args.inputs)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            if server.poll() is not None:
                sys.exit(f"the server exited with {server.returncode}")
            time.sleep(0.1)
    server.kill()
    sys.exit("the server did not answer /health within 60 s")


@dataclass
class Load:
    """The shared state of one load: what to send, and what came back."""

    url: str
    expected: dict[str, dict[str, dict]]
    active: list[str]  # the adapters clients send to now
    left: int
    inputs: int
    rng: random.Random
    done: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wrong: int = 0
    rows: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)


async def client(load: Load, http: httpx.AsyncClient) -> None:
    pool = list(next(iter(load.expected.values())))
    while load.left > 0:
        load.left -= 1
        name = load.rng.choice(load.active)
        batch = load.rng.sample(pool, load.rng.randint(1, load.inputs))
        load.in_flight[name] = load.in_flight.get(name, 0) + 1
        start = time.perf_counter()
        try:
            reply = await http.post("/v1/predict", json={"adapter": name, "inputs": batch})
        except httpx.HTTPError as error:
            load.errors.append(f"{type(error).__name__}: {error}")
            continue
        finally:
            load.in_flight[name] -= 1
            load.done += 1
        load.latencies.append(time.perf_counter() - start)
        if reply.status_code != 200:
            load.errors.append(f"{reply.status_code} {reply.text}")
            continue
        load.rows += len(batch)
        load.wrong += sum(not same(row, load.expected[name][text]) for row, text in zip(reply.json()["outputs"], batch))


async def cycle_extra(load: Load, http: httpx.AsyncClient, folder: Path, total: int) -> dict[str, float]:
    """Load the extra run a third of the way in, send it traffic, unload it at two thirds."""
    while load.done < total // 3:
        await asyncio.sleep(0.01)
    start = time.perf_counter()
    reply = await http.post("/v1/adapters", json={"name": "extra", "path": str(folder)}, timeout=120)
    if reply.status_code != 201:
        raise SystemExit(f"loading {folder} failed: {reply.text}")
    seconds = {"load_s": time.perf_counter() - start}
    load.active.append("extra")
    while load.done < 2 * total // 3:
        await asyncio.sleep(0.01)
    load.active.remove("extra")
    while load.in_flight.get("extra"):  # requests already sent to it are answered first
        await asyncio.sleep(0.01)
    start = time.perf_counter()
    reply = await http.delete("/v1/adapters/extra", timeout=120)
    if reply.status_code != 200:
        raise SystemExit(f"unloading the extra adapter failed: {reply.text}")
    return {**seconds, "unload_s": time.perf_counter() - start}


async def run_load(load: Load, clients: int, extra: Path) -> tuple[float, dict[str, float], dict]:
    total = load.left
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=load.url, timeout=60, limits=limits) as http:
        start = time.perf_counter()
        cycled, *_ = await asyncio.gather(cycle_extra(load, http, extra, total),
                                          *[client(load, http) for _ in range(clients)])
        seconds = time.perf_counter() - start
        stats = (await http.get("/health")).json()["stats"]
    return seconds, cycled, stats


def report(load: Load, seconds: float, cycled: dict[str, float], stats: dict, args: argparse.Namespace,
           adapters: int) -> None:
    ms = sorted(1000 * t for t in load.latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(f"{adapters} adapters (+1 loaded and unloaded midway), {args.clients} clients, {load.done} requests "
          f"({load.rows} texts), max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end (other processes count too)")
    print(f"  throughput   {load.done / seconds:.1f} requests/s, {load.rows / seconds:.1f} texts/s ({seconds:.1f} s)")
    print(f"  latency      p50 {statistics.median(ms):.0f} ms, p99 {p99:.0f} ms")
    print(f"  errors       {len(load.errors)}" + (f" (first: {load.errors[0]})" if load.errors else ""))
    print(f"  wrong        {load.wrong} of {load.rows} texts differ from their run alone")
    print(f"  extra        loaded in {cycled['load_s']:.2f} s, unloaded in {cycled['unload_s']:.2f} s while serving")
    print(f"  batches      {stats['batches']}, {stats['rows'] / max(stats['batches'], 1):.1f} texts each; "
          f"{stats['multi_adapter_batches']} held several adapters; {stats['forward_passes']} forward passes, "
          f"{stats['multi_adapter_passes']} of them mixed; {stats['failed_passes']} failed")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folders = [Path(p) for p in args.runs] if args.runs else train_runs(Path(args.workdir))
    extra = Path(args.extra) if args.extra else folders.pop()
    runs = {folder.name: folder for folder in folders}
    pool = texts(48, args.seed)
    expected = expected_answers({**runs, "extra": extra}, pool)
    server, url = start_server(runs, args)
    try:
        load = Load(url, expected, list(runs), args.requests, args.inputs, random.Random(args.seed))
        seconds, cycled, stats = asyncio.run(run_load(load, args.clients, extra))
        report(load, seconds, cycled, stats, args, len(runs))
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    print(f"  shutdown     SIGTERM: the server exited with {code}")
    return 0 if code == 0 and not load.errors and not load.wrong else 1


if __name__ == "__main__":
    sys.exit(main())
