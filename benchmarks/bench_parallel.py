"""One process vs 2-rank DDP vs 2-rank FSDP2: per-rank optimizer bytes and throughput.

    python benchmarks/bench_parallel.py                         # adamw, shampoo, sonew
    python benchmarks/bench_parallel.py --opt sonew --steps 20 --json out.json
    python benchmarks/bench_parallel.py --mode ddp --opt shampoo-dist --opt shampoo-zero1

Workload: ``secondorder.bench``'s ``mnist-autoencoder`` (784-1000-500-250-30-250-500-1000-784,
global batch ``--batch``, data from ``--data-dir``). Each mode trains the same model from
the same seed on the same global batches:

* ``single``: one process, ``2 x --threads-per-rank`` torch threads;
* ``ddp``: two gloo processes, ``DistributedDataParallel``, each rank half the batch;
* ``fsdp2``: two gloo processes, ``fully_shard`` on every Linear and on the model, each rank
  half the batch (Shampoo in local mode: blocks cut inside each rank's shard).

Reported per mode: the optimizer state bytes each rank holds (the largest over ranks), the
median step time (forward + backward + optimizer step, after ``--warmup`` untimed steps;
with Shampoo's default ``precondition_frequency=10`` a window of 10 steps includes one
root refresh, so use a multiple of 10 ``--steps``), the throughput in samples per second
and the final training loss. Compare modes only within one run (same machine, same load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import secondorder
from secondorder.bench.workloads import get_workload

DEFAULT_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "shampoo": lambda ps: secondorder.Shampoo(ps, lr=1e-3, block_size=1024),
    # under DDP: blocks owned by ranks; and, ZeRO-1 style, whole parameters and their state
    "shampoo-dist": lambda ps: secondorder.Shampoo(
        ps, lr=1e-3, block_size=1024, distributed=True
    ),
    "shampoo-zero1": lambda ps: secondorder.Shampoo(
        ps, lr=1e-3, block_size=1024, distributed=True, shard_optimizer_state=True
    ),
    "sonew": lambda ps: secondorder.SONew(ps, lr=3e-3),
    "soap": lambda ps: secondorder.SOAP(ps, lr=3e-3),
    "mkor": lambda model: secondorder.MKOR(model, lr=1e-2),  # built from the model (hooks)
}
FROM_MODEL = {"mkor"}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state on this rank (local shards only)."""

    def walk(x):
        if isinstance(x, torch.Tensor):
            x = _local(x)
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return sum(walk(st) for st in opt.state.values())


def run(mode: str, opt_name: str, args, rank: int = 0, world: int = 1) -> dict:
    torch.manual_seed(0)
    workload = get_workload("mnist-autoencoder")(str(args.data_dir))
    setup = workload.setup(torch.device("cpu"), torch.float32)
    model = workload.make_model()
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = OPTIMIZERS[opt_name](model if opt_name in FROM_MODEL else model.parameters())
    per = args.batch // world
    times, loss = [], float("nan")
    for step in range(args.warmup + args.steps):
        start = (step * args.batch) % (setup.num_train - args.batch + 1)
        index = torch.arange(start + rank * per, start + (rank + 1) * per)
        batch = workload.train_batch(index)
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = workload.loss(model, batch)
        out.backward()
        opt.step()
        if world > 1:
            dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        loss = float(out.detach())
    if world > 1:
        sizes = [None] * world
        dist.all_gather_object(sizes, state_bytes(opt))
        losses = [None] * world
        dist.all_gather_object(losses, loss)
        loss = sum(losses) / world
    else:
        sizes = [state_bytes(opt)]
    step_s = statistics.median(times)
    return dict(
        mode=mode,
        optimizer=opt_name,
        ranks=world,
        state_bytes_per_rank=max(sizes),
        state_bytes_all_ranks=sum(sizes),
        median_step_s=step_s,
        samples_per_s=args.batch / step_s,
        final_loss=loss,
    )


def _worker(rank, world, init_file, mode, opt_name, args, out):
    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = run(mode, opt_name, args, rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--opt", action="append", choices=sorted(OPTIMIZERS))
    ap.add_argument("--mode", action="append", choices=("single", "ddp", "fsdp2"))
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_MNIST)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for opt_name in args.opt or ("adamw", "shampoo", "sonew"):
            for mode in args.mode or ("single", "ddp", "fsdp2"):
                if mode == "single":
                    torch.set_num_threads(2 * args.threads_per_rank)
                    res = run(mode, opt_name, args)
                else:
                    out = os.path.join(tmp, f"{opt_name}-{mode}.json")
                    init = os.path.join(tmp, f"init-{opt_name}-{mode}")
                    mp.spawn(_worker, args=(2, init, mode, opt_name, args, out), nprocs=2)
                    res = json.loads(Path(out).read_text())
                results.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
    print("| optimizer | mode | ranks | optimizer MiB per rank | step s | samples/s | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['optimizer']} | {r['mode']} | {r['ranks']} | "
            f"{r['state_bytes_per_rank'] / 2**20:.1f} | {r['median_step_s']:.3f} | "
            f"{r['samples_per_s']:.0f} | {r['final_loss']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
