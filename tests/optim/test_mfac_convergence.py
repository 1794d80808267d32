"""M-FAC reaches a target loss in fewer steps than AdamW where curvature matters.

The problem: logistic regression, well specified (labels drawn from the model), with
correlated features whose covariance has condition number 1000 in a random rotation (not
axis-aligned, so a diagonal preconditioner cannot undo it), trained with mini-batches.
Near the optimum the expected outer product of per-example gradients equals the Hessian
(the Fisher identity of a well-specified model), so the window of recent mini-batch
gradients is a (scaled, noisy) estimate of the curvature and M-FAC's step is close to a
Newton step; AdamW's per-coordinate scaling leaves the rotated ill-conditioning in place.

Each optimizer runs at every learning rate of a small grid (same seeds, same batches);
the count is the first step at which the mean full-data loss over the last 20 steps is
within ``GAP`` of the optimum (computed by Newton's method in float64). Measured on this
problem: M-FAC 73 steps (lr 1e-2), AdamW 358 steps (lr 0.3, its only grid point that gets
there within 400 steps); other data seeds gave 50-64 vs 223-317.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from secondorder import MFAC

D, N, COND, BATCH, BUDGET, GAP, WINDOW = 20, 4000, 1e3, 32, 400, 0.04, 20


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -math.log10(COND) / 2, D, dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * scales @ q.T
    w_true = q @ (torch.randn(D, generator=g, dtype=torch.float64) / scales) * 0.5
    y = torch.bernoulli(torch.sigmoid(x @ w_true), generator=g)
    return x, y


def _loss(w, x, y):
    return F.binary_cross_entropy_with_logits(x @ w, y)


def _optimum(x, y):
    """Minimum loss and the Hessian there, by Newton's method in float64 (closed-form
    gradient and Hessian of the logistic loss)."""
    w = torch.zeros(D, dtype=torch.float64)
    for _ in range(40):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) / N
        hess = (x * (p * (1 - p))[:, None]).T @ x / N
        w = w - torch.linalg.solve(hess, grad)
    return _loss(w, x, y).item(), hess


def _steps_to_target(make, x32, y32, target, seed=1):
    w = torch.nn.Parameter(torch.zeros(D))
    opt = make([w])
    gen = torch.Generator().manual_seed(seed)
    recent = []
    for t in range(1, BUDGET + 1):
        idx = torch.randint(0, N, (BATCH,), generator=gen)
        opt.zero_grad()
        _loss(w, x32[idx], y32[idx]).backward()
        opt.step()
        with torch.no_grad():
            recent.append(_loss(w, x32, y32).item())
        recent = recent[-WINDOW:]
        if len(recent) == WINDOW and sum(recent) / WINDOW <= target:
            return t
        if not math.isfinite(recent[-1]):
            return None
    return None


@pytest.mark.slow
def test_mfac_reaches_the_target_in_fewer_steps_than_adamw():
    x, y = _problem()
    fstar, hess = _optimum(x, y)
    ev = torch.linalg.eigvalsh(hess)
    assert ev[-1] / ev[0] > 300  # the premise: curvature is ill-conditioned
    x32, y32 = x.float(), y.float()
    target = fstar + GAP
    start = _loss(torch.zeros(D, dtype=torch.float64), x, y).item()
    assert start - fstar > 4 * GAP  # the target is far from the starting point

    def best(make, lrs):
        counts = {
            lr: _steps_to_target(lambda ps, lr=lr: make(ps, lr), x32, y32, target) for lr in lrs
        }
        reached = [c for c in counts.values() if c is not None]
        return (min(reached) if reached else None), counts

    adamw, adamw_counts = best(
        lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0), [0.03, 0.1, 0.3, 1.0]
    )
    mfac, mfac_counts = best(
        lambda ps, lr: MFAC(ps, lr=lr, num_grads=64, damp=1e-4), [1e-3, 3e-3, 1e-2]
    )
    assert mfac is not None, f"M-FAC never reached the target: {mfac_counts}"
    # a clear margin: at most half of AdamW's steps (AdamW may not get there at all)
    adamw_steps = adamw if adamw is not None else BUDGET + 1
    assert 2 * mfac <= adamw_steps, (mfac_counts, adamw_counts)
