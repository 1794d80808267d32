"""Peak memory of Shampoo's root refresh on a GPT-2-small-shaped model (124M parameters).

The model is built from plain ``nn.Embedding`` / ``nn.Linear`` / ``nn.LayerNorm`` modules with
GPT-2 small's shapes (vocabulary 50257, width 768, 12 layers, 1024 positions, tied output
embedding); nothing is downloaded and no forward pass is run: every parameter gets a fixed
random gradient, and one optimizer step with ``start_preconditioning_step=1`` creates the
state and computes every root (the refresh that used to spike).

Each configuration runs in a fresh process; it reports the bytes of model (parameters plus
gradients), optimizer state (``state_bytes()``), and the process's peak resident set
(``VmHWM`` from ``/proc/self/status``) above its resident set before the model was built.
The target is ``peak <= 1.25 * (state + model)``.

    OMP_NUM_THREADS=2 python benchmarks/bench_memory.py               # all configurations
    OMP_NUM_THREADS=2 python benchmarks/bench_memory.py --src OLD/src  # another checkout
    python benchmarks/bench_memory.py --state-only   # state sizes only (no step): seconds
    python benchmarks/bench_memory.py --accuracy     # bf16 root store vs float64 roots

``--accuracy`` measures, on a 1024 x 768 block with GPT-like statistics, how far the
preconditioned direction computed with roots stored in bfloat16 (``matmul_dtype``) is from
the float64 one, next to float32 roots.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "adamw": None,
    "shampoo": dict(),
    "shampoo-unbounded": dict(root_memory_budget=None),
    "shampoo-compact": dict(packed_statistics=True, matmul_dtype="bfloat16"),
}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def gpt2_small(n_layer: int = 12):
    from torch import nn

    v, d, n_pos = 50257, 768, 1024
    layers = [nn.Embedding(v, d), nn.Embedding(n_pos, d)]
    for _ in range(n_layer):
        layers += [
            nn.LayerNorm(d),
            nn.Linear(d, 3 * d),  # attention q, k, v
            nn.Linear(d, d),  # attention output
            nn.LayerNorm(d),
            nn.Linear(d, 4 * d),  # MLP in
            nn.Linear(4 * d, d),  # MLP out
        ]
    layers.append(nn.LayerNorm(d))
    return nn.ModuleList(layers)  # the output projection is tied to the token embedding


def run_one(name: str, block_size: int, state_only: bool = False, layers: int = 12) -> dict:
    import torch

    torch.manual_seed(0)
    rss0 = _status("VmRSS")
    model = gpt2_small(layers)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-2)
    n = sum(p.numel() for p in params)
    model_bytes = 2 * sum(p.numel() * p.element_size() for p in params)
    hp = CONFIGS[name]
    if hp is None:
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        from secondorder import Shampoo

        hp = dict(hp)
        if hp.get("matmul_dtype") == "bfloat16":
            hp["matmul_dtype"] = torch.bfloat16
        opt = Shampoo(
            params,
            lr=1e-4,
            block_size=block_size,
            precondition_frequency=10,
            start_preconditioning_step=1,
            **hp,
        )
    t0 = time.perf_counter()
    if state_only and hp is not None:  # allocate the state without stepping (no roots)
        for p in params:
            st = opt._init_state(p, opt.param_groups[0])
            if st is not opt.state[p]:
                opt.state[p] = st
    else:
        opt.step()
    seconds = time.perf_counter() - t0
    if hasattr(opt, "state_bytes"):
        state = opt.state_bytes()
    else:
        state = sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor)
        )
    out = dict(
        config=name,
        params=n,
        block_size=block_size,
        state_only=state_only,
        layers=layers,
        model_bytes=model_bytes,
        state_bytes=state,
        peak_rss_bytes=_status("VmHWM") - rss0,
        step_seconds=seconds,
        threads=torch.get_num_threads(),
    )
    if hasattr(opt, "memory_diagnostics"):
        md = opt.memory_diagnostics()
        out.update(
            {k: md[k] for k in ("statistics", "roots", "moments", "peak_root_workspace_bytes")}
        )
    out["peak_over_state_plus_model"] = out["peak_rss_bytes"] / (state + model_bytes)
    return out


def accuracy() -> dict:
    """Relative error of the preconditioned direction vs float64 roots, for fp32/bf16 roots."""
    import torch

    from secondorder.kernels import kron
    from secondorder.kernels.roots import inverse_root

    gen = torch.Generator().manual_seed(0)
    m, n, steps = 1024, 768, 30
    # gradients with a decaying spectrum (as in trained networks) plus noise
    u = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    w = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    sv = torch.logspace(0, -4, n, dtype=torch.float64)
    stats = [torch.zeros(1, m, m, dtype=torch.float64), torch.zeros(1, n, n, dtype=torch.float64)]
    for _ in range(steps):
        g = (u[:, :n] * sv) @ (w * torch.randn(n, 1, generator=gen, dtype=torch.float64)).T
        kron.update_statistics(stats, g.unsqueeze(0), 0.999)
    x = torch.randn(1, m, n, generator=gen, dtype=torch.float64)
    r64 = [inverse_root(s, 4, method="eigh", ridge_epsilon=1e-6).root for s in stats]
    ref = kron.precondition(x, r64)
    out = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        r = [inverse_root(s.float(), 4, method="eigh", ridge_epsilon=1e-6).root for s in stats]
        d = kron.precondition(x.to(dt), [q.to(dt) for q in r]).double()
        out[name] = (torch.linalg.norm(d - ref) / torch.linalg.norm(ref)).item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="run one configuration (internal)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--layers", type=int, default=12, help="transformer layers (GPT-2: 12)")
    ap.add_argument(
        "--state-only",
        action="store_true",
        help="only allocate the optimizer state (no step, no roots): state sizes in seconds",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.accuracy:
        print(json.dumps(accuracy(), indent=1))
        return
    if args.run:
        print(json.dumps(run_one(args.run, args.block_size, args.state_only, args.layers)))
        return
    results = []
    env = dict(os.environ, PYTHONPATH=args.src)
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--run", name, "--block-size", str(args.block_size)]
        cmd += ["--state-only"] if args.state_only else []
        cmd += ["--layers", str(args.layers)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"{name:18s} state {r['state_bytes'] / 2**30:6.2f} GiB  model "
            f"{r['model_bytes'] / 2**30:5.2f} GiB  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB"
            f"  peak/(state+model) {r['peak_over_state_plus_model']:5.2f}"
            f"  step {r['step_seconds']:6.1f} s",
            flush=True,
        )
    adamw = next((r["state_bytes"] for r in results if r["config"] == "adamw"), None)
    if adamw:
        for r in results:
            r["state_over_adamw"] = r["state_bytes"] / adamw
            print(f"{r['config']:18s} state / AdamW state {r['state_over_adamw']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
