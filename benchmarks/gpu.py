"""GPU check: the CUDA tests, then optimizer step time vs fused AdamW on a >= 100M byte-LM.

    python benchmarks/gpu.py                      # on a CUDA machine: tests + timings
    python benchmarks/gpu.py --dry-run            # anywhere: tiny model on the CPU, 2 steps each
    python benchmarks/gpu.py --skip-tests --json gpu.json

1. Tests: ``pytest -m cuda`` where that marker is registered, otherwise the tests whose names
   mention CUDA (they skip without a device); the summary line and exit code are recorded.
2. Timings: the byte-level transformer of ``secondorder bench``'s ``byte-lm`` workload,
   scaled up (default width 1024, 8 layers, context 512: ~101M parameters), trained on its
   corpus in bfloat16 autocast with float32 parameters. Every optimizer starts from the same
   initial weights and sees the same batches; after ``--warmup`` steps (which include the
   first root / basis computations) ``--steps`` steps are timed with CUDA events around
   zero_grad + forward + backward + step. The median step time and its ratio to
   ``torch.optim.AdamW(fused=True)`` are reported, all in one run, and written to ``--json``.

Optimizers: fused AdamW (baseline), Shampoo with Newton roots on the device, Shampoo with
asynchronous roots on the host, SOAP, Muon and SONew. One missing from this version of
``secondorder`` is skipped with a message (as is one that fails to build).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import secondorder  # noqa: E402
from secondorder.bench.workloads.byte_lm import ByteTransformer, load_corpus  # noqa: E402


# ------------------------------------------------------------------------------ tests
def run_cuda_tests(python: str) -> dict[str, Any]:
    ini = (ROOT / "pyproject.toml").read_text()
    select = ["-m", "cuda"] if '"cuda:' in ini or "'cuda:" in ini else ["-k", "cuda or CUDA"]
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests", *select]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    summary = lines[-1] if lines else ""
    print(f"CUDA tests: {' '.join(cmd[3:])}\n  {summary}", flush=True)
    # pytest exit code 5: nothing selected
    return dict(command=cmd, returncode=proc.returncode, summary=summary,
                seconds=time.perf_counter() - t0, tail=lines[-30:])  # fmt: skip


# ------------------------------------------------------------------------- optimizers
def optimizer_factories(args) -> dict[str, Any]:
    """name -> (callable(model) -> optimizer) or a string saying why it is skipped."""
    lr = args.lr
    common = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    out: dict[str, Any] = {
        "adamw_fused": lambda m: _fused_adamw(m, lr),
    }

    def lib(name: str, **kw):
        cls = getattr(secondorder, name, None)
        if cls is None:
            return f"secondorder.{name} does not exist in this version"
        if isinstance(inspect.getattr_static(cls, "from_model", None), classmethod):
            return lambda m: cls.from_model(m, **kw)
        return lambda m: cls(m.parameters(), **kw)

    freq = args.precondition_frequency
    out["shampoo_newton"] = lib("Shampoo", **common, block_size=args.block_size,
                                precondition_frequency=freq, root_method="newton")  # fmt: skip
    out["shampoo_async_host"] = lib("Shampoo", **common, block_size=args.block_size,
                                    precondition_frequency=freq, async_roots=True)  # fmt: skip
    out["soap"] = lib("SOAP", **common, block_size=args.block_size, precondition_frequency=freq)
    out["muon"] = lib("Muon", lr=args.muon_lr)
    out["sonew"] = lib("SONew", **common)
    if args.only:
        out = {k: v for k, v in out.items() if k in args.only or k == "adamw_fused"}
    return out


def _fused_adamw(model, lr):
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                                 fused=True)  # fmt: skip
    except (RuntimeError, TypeError) as exc:  # fused unsupported on this device / version
        print(f"  fused AdamW unavailable ({exc}); using foreach", flush=True)
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


# ------------------------------------------------------------------------------ timing
def batches(corpus: torch.Tensor, n: int, batch: int, context: int, device, seed: int):
    span = context + 1
    windows = corpus[: len(corpus) // span * span].view(-1, span)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, windows.shape[0], (n, batch), generator=g)
    return [windows[i].to(device) for i in idx]


def time_optimizer(make, init_model, data, device, args) -> dict[str, Any]:
    model = copy.deepcopy(init_model).to(device)
    opt = make(model)
    use_cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast)
    times, losses = [], []
    for k, tokens in enumerate(data):
        if use_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, 256), tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        if use_cuda:
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            dt = time.perf_counter() - t0
        if k >= args.warmup:
            times.append(dt)
        losses.append(float(loss.detach()))
    out = dict(median_step_s=statistics.median(times), mean_step_s=statistics.fmean(times),
               first_loss=losses[0], last_loss=losses[-1],
               finite=all(l == l and abs(l) != float("inf") for l in losses))  # fmt: skip
    if hasattr(opt, "state_bytes"):
        out["state_bytes"] = opt.state_bytes()
    if hasattr(opt, "close"):
        opt.close()
    del opt, model
    if use_cuda:
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


# -------------------------------------------------------------------------------- main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny model on the CPU, 2 steps per optimizer, no tests")  # fmt: skip
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=12, help="untimed steps (>= first refresh)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--muon-lr", type=float, default=0.02)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--precondition-frequency", type=int, default=10)
    ap.add_argument("--min-params", type=float, default=100e6, help="refuse smaller models")
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--only", nargs="+", help="optimizer names to time (AdamW always runs)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="gpu-results.json")
    args = ap.parse_args(argv)
    for name in ("width", "layers", "heads", "context", "batch", "steps", "block_size",
                 "precondition_frequency"):  # fmt: skip
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.width % args.heads:
        ap.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads})")
    if args.dry_run:
        args.width, args.layers, args.heads, args.context, args.batch = 32, 2, 4, 16, 2
        args.warmup, args.steps, args.min_params, args.skip_tests = 1, 1, 0, True
        args.block_size, args.precondition_frequency = 16, 1
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    result: dict[str, Any] = dict(args=vars(args), device=str(device), torch=torch.__version__)
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    if not args.skip_tests:
        result["tests"] = run_cuda_tests(sys.executable)
    torch.manual_seed(args.seed)
    model = ByteTransformer(args.context, args.width, args.heads, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params < args.min_params:
        print(f"model has {n_params / 1e6:.1f}M parameters < --min-params", file=sys.stderr)
        return 2
    corpus = torch.frombuffer(bytearray(load_corpus()[0]), dtype=torch.uint8).long()
    data = batches(corpus, args.warmup + args.steps, args.batch, args.context, device, args.seed)
    result["model"] = dict(params=n_params, width=args.width, layers=args.layers,
                           heads=args.heads, context=args.context, batch=args.batch)  # fmt: skip
    print(f"byte-LM {n_params / 1e6:.1f}M params on {device}, batch {args.batch}x{args.context}, "
          f"bf16 autocast={not args.no_autocast}", flush=True)  # fmt: skip
    timings: dict[str, Any] = {}
    for name, make in optimizer_factories(args).items():
        if isinstance(make, str):
            print(f"  {name:<20} skipped: {make}", flush=True)
            timings[name] = dict(skipped=make)
            continue
        try:
            timings[name] = time_optimizer(make, model, data, device, args)
        except Exception as exc:  # one broken optimizer must not lose the others' figures
            msg = f"{type(exc).__name__}: {exc}"
            print(f"  {name:<20} failed: {msg}", flush=True)
            timings[name] = dict(skipped=f"failed: {msg}")
            continue
        base = timings.get("adamw_fused", {}).get("median_step_s")
        r = timings[name]
        r["ratio_to_adamw_fused"] = r["median_step_s"] / base if base else None
        print(f"  {name:<20} median step {r['median_step_s'] * 1e3:9.2f} ms  "
              f"ratio {r['ratio_to_adamw_fused']:.3f}  loss {r['first_loss']:.3f} -> "
              f"{r['last_loss']:.3f}", flush=True)  # fmt: skip
    result["timings"] = timings
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"written {args.json}")
    tests_ok = result.get("tests", {}).get("returncode", 0) in (0, 5)
    return 0 if tests_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
