"""Asynchronous and distributed Shampoo on the MNIST autoencoder.

    python benchmarks/bench_async_dist.py                     # both parts
    python benchmarks/bench_async_dist.py --part async --rounds 8
    python benchmarks/bench_async_dist.py --part dist --epochs 3

Part ``async`` (one process): mean amortized step time (forward + backward + optimizer step)
of AdamW, synchronous Shampoo and ``async_roots=True`` Shampoo (block 1024, frequency 10,
Adam grafting; also with bf16 per-step matmuls unless ``--no-bf16``). All configurations
train side by side in one process, in round-robin windows of 10 steps (one root period,
starting with the step that refreshes the roots); the async optimizer waits for its job at
the end of each window, so the root work is charged to its own window. Reported: the
median window time / 10 and the median over windows of the ratio to AdamW's window of the
same round -- neighbouring windows see the same machine load, which matters on a shared
machine.

Part ``dist``: throughput (samples/s) of one process against two gloo processes (DDP,
``Shampoo(distributed=True)``, same global batch split in halves), plus two processes that
all compute every block (``distributed=False``: the roots done twice) for comparison, and
the optimizer state bytes each rank holds. Each process is pinned to ``--threads-per-rank``
torch threads; the one-process run uses ``2 x`` that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import secondorder
from _common import (
    DEFAULT_MNIST,
    autoencoder,
    autoencoder_loss,
    busy_note,
    load_mnist_images,
    machine,
    state_bytes,
)

SHAMPOO = dict(block_size=1024, precondition_frequency=10, graft="adam")


def _log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ async part
def bench_async(args, data) -> dict:
    configs = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=args.lr),
        "shampoo_sync": lambda ps: secondorder.Shampoo(ps, lr=args.lr, **SHAMPOO),
        "shampoo_async": lambda ps: secondorder.Shampoo(
            ps, lr=args.lr, async_roots=True, **SHAMPOO
        ),
    }
    if args.bf16:  # bf16 per-step matmuls (statistics, application): AMX / tensor cores
        bf16 = dict(SHAMPOO, matmul_dtype=torch.bfloat16)
        configs["shampoo_sync_bf16"] = lambda ps: secondorder.Shampoo(ps, lr=args.lr, **bf16)
        configs["shampoo_async_bf16"] = lambda ps: secondorder.Shampoo(
            ps, lr=args.lr, async_roots=True, **bf16
        )
    runs = {}
    for name, make in configs.items():
        torch.manual_seed(args.seed)
        model = autoencoder()
        runs[name] = dict(
            model=model,
            opt=make(list(model.parameters())),
            batches=_batches(data, args.batch_size, args.seed),
            windows=[],
            losses=[],
        )
    period = SHAMPOO["precondition_frequency"]
    for r in runs.values():  # warm-up: steps 1 .. period-1 (no roots yet), untimed
        for _ in range(period - 1):
            _train_step(r)
    # Round-robin windows of `period` steps, each starting with the step that (re)computes
    # the roots, so an async job overlaps its own window; at the end of the window the
    # optimizer waits for any job still running (state_dict() does), so that its CPU time is
    # charged to this configuration and not to the next one's window.
    # The first window holds every Shampoo's first roots, computed in the step also with
    # async_roots: it is run but not timed.
    # The batches of a window are fetched before it is timed (as in `secondorder bench`).
    for rnd in range(args.rounds + 1):
        _log(f"[async] round {rnd}/{args.rounds}{' (untimed)' if rnd == 0 else ''}")
        for r in runs.values():
            xbs = [next(r["batches"]) for _ in range(period)]
            steps = []
            t0 = time.perf_counter()
            for xb in xbs:
                _train_step(r, xb)
                steps.append(time.perf_counter() - t0 - sum(steps))
            if getattr(r["opt"], "async_roots", False):
                r["opt"].state_dict()
            if rnd > 0:
                r["windows"].append(time.perf_counter() - t0)
                r.setdefault("steps", []).append(steps)
    out = {}
    base = runs["adamw"]["windows"]
    base_other = [statistics.median(s[1:]) for s in runs["adamw"]["steps"]]
    for name, r in runs.items():
        ratios = [w / b for w, b in zip(r["windows"], base)]
        other = [statistics.median(s[1:]) for s in r["steps"]]
        out[name] = dict(
            mean_step_s=statistics.median(r["windows"]) / period,
            ratio_to_adamw=statistics.median(ratios),
            per_round_ratio=ratios,
            # the window's first step (the root refresh) and the median of the other nine
            refresh_step_s=statistics.median(s[0] for s in r["steps"]),
            other_step_ratio=statistics.median(o / b for o, b in zip(other, base_other)),
            final_loss=torch.stack(r["losses"][-period:]).mean().item(),
            steps=period - 1 + period * (args.rounds + 1),
            async_counters=(
                r["opt"].async_diagnostics() if getattr(r["opt"], "async_roots", False) else None
            ),
        )
        if hasattr(r["opt"], "close"):
            r["opt"].close()
    return out


def _batches(data, batch_size, seed):
    gen = torch.Generator().manual_seed(seed)
    n = data.shape[0]
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield data[perm[i : i + batch_size]]


def _train_step(r, xb=None):
    xb = next(r["batches"]) if xb is None else xb
    r["opt"].zero_grad(set_to_none=True)
    loss = autoencoder_loss(r["model"](xb), xb)
    loss.backward()
    r["opt"].step()
    r["losses"].append(loss.detach())


# ------------------------------------------------------------------------- dist part
def _dist_worker(rank, world, init, data, args, distributed, out_file):
    torch.set_num_threads(args.threads_per_rank * (2 if world == 1 else 1))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.manual_seed(args.seed)
        model = autoencoder()
        ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = secondorder.Shampoo(ddp.parameters(), lr=args.lr, distributed=distributed, **SHAMPOO)
        gen = torch.Generator().manual_seed(args.seed)
        n, bs = data.shape[0], args.batch_size
        shard = bs // world
        times, losses = [], []
        for _ in range(args.epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - bs + 1, bs):
                xb = data[perm[i : i + bs]][rank * shard : (rank + 1) * shard]
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = autoencoder_loss(ddp(xb), xb)
                loss.backward()
                opt.step()
                dist.barrier()
                times.append(time.perf_counter() - t0)
                losses.append(loss.item())
        timed = times[5:]
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        res = dict(
            mean_step_s=statistics.fmean(timed),
            samples_per_s=bs / statistics.fmean(timed),
            final_loss=statistics.fmean(losses[-10:]),
            state_bytes=state_bytes(opt),
            param_checksum=float(flat.double().sum()),
        )
        every = [None] * world
        dist.all_gather_object(every, res)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(every, f)
    finally:
        dist.destroy_process_group()


def bench_dist(args, data) -> dict:
    out = {}
    for label, world, distributed in [
        ("1 process", 1, True),
        ("2 processes, distributed=True", 2, True),
        ("2 processes, distributed=False", 2, False),
    ]:
        _log(f"[dist] {label}")
        with tempfile.TemporaryDirectory() as d:
            res_file = os.path.join(d, "res.json")
            mp.spawn(
                _dist_worker,
                args=(world, os.path.join(d, "init"), data, args, distributed, res_file),
                nprocs=world,
            )
            with open(res_file) as f:
                ranks = json.load(f)
        out[label] = dict(
            world=world,
            distributed=distributed,
            mean_step_s=max(r["mean_step_s"] for r in ranks),
            samples_per_s=min(r["samples_per_s"] for r in ranks),
            final_loss=ranks[0]["final_loss"],
            state_bytes_per_rank=[r["state_bytes"] for r in ranks],
            param_checksums=[r["param_checksum"] for r in ranks],
        )
    base = out["1 process"]["samples_per_s"]
    for r in out.values():
        r["throughput_vs_1_process"] = r["samples_per_s"] / base
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_MNIST))
    ap.add_argument("--part", choices=["async", "dist", "both"], default="both")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6, help="async part: timed windows per run")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the async part (0: leave default). 1 on a 2-core machine "
        "leaves a core to the root worker, as the paper's host CPUs are left to the roots",
    )
    ap.add_argument(
        "--no-bf16", dest="bf16", action="store_false", help="skip the bf16-matmul configs"
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    data = load_mnist_images(args.data_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"args": vars(args), "machine": machine(), "cpus": os.cpu_count()}
    busy_note()
    print(f"MNIST autoencoder, batch {args.batch_size}, block 1024, precondition frequency 10")
    print(f"machine: {machine()}, {os.cpu_count()} CPUs")
    if args.part in ("async", "both"):
        res = bench_async(args, data)
        out["async"] = res
        print(f"\nasync roots (median over {args.rounds} round-robin windows of 10 steps):")
        print(
            f"{'optimizer':<19} {'mean step s':>12} {'ratio/AdamW':>12} {'refresh s':>10} "
            f"{'other/AdamW':>12} {'per window':>32} {'final loss':>11}"
        )
        for name, r in res.items():
            per = ", ".join(f"{x:.2f}" for x in r["per_round_ratio"])
            print(
                f"{name:<19} {r['mean_step_s']:>12.4f} {r['ratio_to_adamw']:>12.3f} "
                f"{r['refresh_step_s']:>10.3f} {r['other_step_ratio']:>12.3f} "
                f"{per:>32} {r['final_loss']:>11.2f}"
            )
        if res["shampoo_async"]["async_counters"]:
            print(f"async counters: {res['shampoo_async']['async_counters']}")
    if args.part in ("dist", "both"):
        res = bench_dist(args, data)
        out["dist"] = res
        print(
            f"\ndistributed ({args.epochs} epochs; gloo, {args.threads_per_rank} thread(s) per "
            f"rank, 1 process: "
            f"{2 * args.threads_per_rank}):"
        )
        print(
            f"{'run':<32} {'step s':>8} {'samples/s':>10} {'vs 1 proc':>10} "
            f"{'state MB per rank':>20}"
        )
        for name, r in res.items():
            mb = ", ".join(f"{b / 2**20:.1f}" for b in r["state_bytes_per_rank"])
            print(
                f"{name:<32} {r['mean_step_s']:>8.3f} {r['samples_per_s']:>10.0f} "
                f"{r['throughput_vs_1_process']:>10.2f} {mb:>20}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
