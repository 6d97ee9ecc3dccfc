"""Load benchmark of the composition service (loopback only, bounded in time).

Starts an in-process ``CompositionServer`` over a temporary pool of ``--sources`` prompts,
then runs ``--clients`` concurrent client threads in a separate process (so client and server
do not share a GIL) for ``--seconds``; every request carries ``--images-per-request`` PNG
images and composes all the sources. Reports throughput, p50/p99 latency, errors, the mean
batch the server formed, and served images/s relative to the raw backbone
(``forward_features``) measured in the same process and in a worker thread like the server's, at
``--max-batch``, before and after the load (the mean is used, as the machine may be shared).
It also reports CPU time per image (server process vs. baseline loop), which other processes
on a shared machine disturb much less than wall-clock rates.

    python benchmarks/bench_service.py            # 8 clients x 10 s, vit_tiny_patch16_224 at 224 px, random init
    python benchmarks/bench_service.py --quick    # 2 s
    python benchmarks/bench_service.py --checkpoint ~/.alacarte/...  # DINOv2 ViT-S/14 at 112 px

The table is written to ``--out`` (default ``./results/bench_service.md`` under the working
directory; the repository's record is ``benchmarks/results_service.md``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path("results") / "bench_service.md"  # relative: under the working directory
NUM_CLASSES = 10


@dataclass(frozen=True)
class LoadResult:
    """What the client process measured, times relative to the start of the window."""

    calls: list[tuple[float, float]]  # (start, end) of every successful request
    errors: dict[str, int]  # status code name -> count
    seconds: float  # window length

    def requests_in_window(self) -> float:
        """Successful requests served in the window; one ending after it counts for its share inside.

        Far less quantised than counting completions when the window holds only a few request
        latencies (a slow or shared machine).
        """
        return sum((min(end, self.seconds) - start) / (end - start) for start, end in self.calls)


def parse_args() -> argparse.Namespace:
    from common.prompt import DEFAULT_N_MEMORY, DEFAULT_N_PROMPT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="2 s of load and short baselines")
    parser.add_argument("--sources", type=int, default=8, help="prompts composed per request, k (default: %(default)s)")
    parser.add_argument("--n-prompt", type=int, default=DEFAULT_N_PROMPT,
                        help="prompt tokens per source (default: the Flower app's, %(default)s)")
    parser.add_argument("--n-memory", type=int, default=DEFAULT_N_MEMORY,
                        help="memory tokens per layer (default: the Flower app's, %(default)s)")
    parser.add_argument("--images-per-request", type=int, default=4,
                        help="PNG images per request (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=32, help="server images per pass (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="server batch wait (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the server and the baselines (default: torch's choice)")
    parser.add_argument("--checkpoint", default=None,
                        help="DINOv2 ViT-S/14 weights: benchmark vit_small_patch14_dinov2 at 112 px instead")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file (default: %(default)s)")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 2.0
    return args


@dataclass(frozen=True)
class Rate:
    """Images per wall-clock second, and this process's CPU milliseconds per image."""

    images_per_s: float
    cpu_ms_per_image: float


def main() -> None:
    args = parse_args()
    load_average = os.getloadavg()[0]
    import torch

    from common.data import backbone_transform
    from common.model import APTViT, load_backbone
    from server.service import CompositionServer, ServiceConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    name, img_size = ("vit_small_patch14_dinov2", 112) if args.checkpoint else ("vit_tiny_patch16_224", 224)
    model = APTViT(load_backbone(name, checkpoint=args.checkpoint, pretrained=False, img_size=img_size, device="cpu"))
    budget = 1.0 if args.quick else 3.0

    def raw_rate() -> Rate:
        return measure_rate(model.backbone.forward_features, args.max_batch, img_size, budget)

    raw_before = raw_rate()
    with tempfile.TemporaryDirectory() as tmp:
        pool = make_pool(Path(tmp), model, args.sources, args.n_prompt, args.n_memory)
        prompts = list(pool.latest(model).values())
        apt = measure_rate(lambda x: model.compose(x, prompts), args.max_batch, img_size, budget)
        config = ServiceConfig(port=0, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000)
        server = CompositionServer(model, pool, config, backbone_transform(model.backbone))
        try:
            cpu = time.process_time()
            load = run_clients(server.address, args, img_size)
            cpu = time.process_time() - cpu
            server_cpu_ms = 1000 * cpu / max(server.batcher.items, 1)
            batch = server.batcher.items / max(server.batcher.batches, 1)
        finally:
            server.stop(grace=1)
    raw_after = raw_rate()  # bracket the load: the machine may be shared
    raw = Rate((raw_before.images_per_s + raw_after.images_per_s) / 2,
               (raw_before.cpu_ms_per_image + raw_after.cpu_ms_per_image) / 2)
    rows = summarize(args, name, img_size, raw, apt, load, batch, server_cpu_ms)
    report = render(args, torch.get_num_threads(), load_average, rows)
    args.out.write_text(report)
    print(report)


def make_pool(root: Path, model, k: int, n_prompt: int, n_memory: int):
    """A pool of ``k`` sources with random prompts (heads included) of the given shape on ``model``."""
    import torch

    from common.prompt import Prompt
    from server.pool import PromptPool

    pool = PromptPool(root / "pool")
    for i in range(k):
        prompt = Prompt.init(model, NUM_CLASSES, n_prompt=n_prompt, n_memory=n_memory, seed=i)
        with torch.no_grad():
            prompt.head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
        pool.add(f"source-{i}", prompt)
    return pool


def measure_rate(fn, batch: int, img_size: int, budget: float) -> Rate:
    """Throughput of ``fn`` on random ``[batch, 3, S, S]`` inputs (one warm-up call, then ``budget`` s).

    Runs in a fresh thread, as the server's batch worker does: on a busy machine torch was
    measured up to 2x slower in the main thread than in other threads.
    """
    import torch

    x = torch.randn(batch, 3, img_size, img_size)
    rate: list[Rate] = []

    def measure() -> None:
        with torch.inference_mode():
            fn(x)
            calls, start, cpu = 0, time.perf_counter(), time.process_time()
            while calls < 2 or time.perf_counter() - start < budget:
                fn(x)
                calls += 1
        images = calls * batch
        rate.append(Rate(images / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / images))

    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()
    return rate[0]


def run_clients(address: str, args: argparse.Namespace, img_size: int) -> LoadResult:
    """Run the client threads in a fresh process and collect their measurements."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as procs:
        return procs.apply(client_process, (address, args.clients, args.seconds, args.sources,
                                            args.images_per_request, img_size))


def client_process(address: str, clients: int, seconds: float, k: int, per_request: int,
                   img_size: int) -> LoadResult:
    """``clients`` threads sending Predict requests in a closed loop for ``seconds``."""
    import io

    import grpc
    import numpy as np
    from PIL import Image

    from server.query import CompositionClient

    rng = np.random.default_rng(0)
    images = []
    for _ in range(per_request):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (img_size, img_size, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    sources = [f"source-{i}" for i in range(k)]
    calls: list[tuple[float, float]] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    begin: list[float] = []  # start of the measured window, set once every client is warm
    barrier = threading.Barrier(clients, action=lambda: begin.append(time.perf_counter()))

    def loop() -> None:
        with CompositionClient(address, timeout=60) as client:
            client.predict(images, sources)  # warm-up: connection, first batch
            barrier.wait()
            while time.perf_counter() < begin[0] + seconds:
                start = time.perf_counter()
                try:
                    client.predict(images, sources)
                    with lock:
                        calls.append((start - begin[0], time.perf_counter() - begin[0]))
                except grpc.RpcError as err:
                    with lock:
                        errors[err.code().name] = errors.get(err.code().name, 0) + 1

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadResult(calls, errors, seconds)


def summarize(args: argparse.Namespace, name: str, img_size: int, raw: Rate, apt: Rate, load: LoadResult,
              batch: float, server_cpu_ms: float) -> dict[str, str]:
    requests = load.requests_in_window() / load.seconds
    served = requests * args.images_per_request
    ms = sorted(1000 * (end - start) for start, end in load.calls) or [float("nan")]
    return {
        "backbone": f"{name} @ {img_size} px",
        "clients x duration": f"{args.clients} x {args.seconds:g} s",
        "sources per request (k)": str(args.sources),
        "prompt shape": f"{args.n_prompt} tokens, {args.n_memory} memory tokens per layer",
        "images per request": str(args.images_per_request),
        "requests/s": f"{requests:.2f}",
        "served images/s": f"{served:.1f}",
        "latency p50 / p99": f"{statistics.median(ms):.0f} / {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:.0f} ms",
        "errors": ", ".join(f"{c}: {n}" for c, n in load.errors.items()) or "0",
        "mean server batch": f"{batch:.1f} images",
        f"raw forward_features images/s (batch {args.max_batch}, mean before/after)": f"{raw.images_per_s:.1f}",
        f"raw APT compose k={args.sources} images/s (no serving)": f"{apt.images_per_s:.1f}",
        "**served / raw forward_features images/s**": f"**{served / raw.images_per_s:.2f}x**",
        "CPU ms per image: raw forward_features / APT compose / served (whole server)":
            f"{raw.cpu_ms_per_image:.0f} / {apt.cpu_ms_per_image:.0f} / {server_cpu_ms:.0f}",
        "CPU efficiency: raw / served CPU per image": f"{raw.cpu_ms_per_image / server_cpu_ms:.2f}x",
    }


def render(args: argparse.Namespace, threads: int, load_average: float, rows: dict[str, str]) -> str:
    head = (f"# Composition service load benchmark\n\n"
            f"`python benchmarks/bench_service.py{' --quick' if args.quick else ''}"
            f"{f' --threads {args.threads}' if args.threads else ''}` on "
            f"{platform.machine()} with {multiprocessing.cpu_count()} CPU(s) (1-min load average "
            f"{load_average:.1f} at start), {threads} torch thread(s), "
            f"{time.strftime('%Y-%m-%d')}; loopback, plaintext, no auth, server max-batch {args.max_batch}, "
            f"max-wait {args.max_wait_ms:g} ms. Goal: served / raw >= 0.7x at 8 clients, k=8.\n\n"
            "Wall-clock rates swing with other processes on a shared machine; the CPU time per image "
            "(this process only: the server, or the baseline loop) is the steadier comparison.\n\n")
    table = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows.items())
    return head + table


if __name__ == "__main__":
    main()
