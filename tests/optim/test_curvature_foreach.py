"""Multi-tensor (``torch._foreach_*``) paths of AdaHessian, M-FAC and MKOR against their
one-tensor-at-a-time arithmetic: bit-identical parameters and state (``torch.equal``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder import MFAC, MKOR, AdaHessian
from secondorder.kernels import hutchinson as H

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
    ),
]


def _model(dtype_last=torch.bfloat16, device="cpu"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)
    net[2].to(dtype_last)  # a low-precision layer: per-dtype groups in the update
    return net


def _loss(net, k):
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(10, 6, generator=g), torch.randn(10, 3, generator=g)
    x, y = x.to(net[0].weight.device), y.to(net[0].weight.device)
    h = net[1](net[0](x))
    out = net[2](h.to(net[2].weight.dtype)).float()
    return ((out - y) ** 2).mean()


def _same(a, b):
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)
    for sp, sq in zip(a[1].state.values(), b[1].state.values()):
        for key in sp:
            if isinstance(sp[key], torch.Tensor):
                assert torch.equal(sp[key], sq[key]), key


def _run(make, device, steps=6, create_graph=False):
    runs = []
    for foreach in (True, False):
        net = _model(device=device)
        opt = make(net)
        for group in opt.param_groups:
            group["foreach"] = foreach
        for k in range(steps):
            opt.zero_grad(set_to_none=True)
            _loss(net, k).backward(create_graph=create_graph and opt.create_graph)
            opt.step()
        opt.zero_grad(set_to_none=True)
        runs.append((net, opt))
    _same(*runs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(hessian_power=0.5, weight_decay=0.1, update_every=2, betas=(0.8, 0.9)),
     dict(n_probes=2, spatial_average="row", abs_before_average=False)],
)
def test_adahessian_foreach_equals_per_tensor(kw, device):
    def make(net):
        groups = [{"params": list(net[0].parameters())},
                  {"params": list(net[2].parameters()), "lr": 0.05}]
        return AdaHessian(groups, lr=0.1, **kw)

    _run(make, device, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(momentum=0.9, weight_decay=0.01), dict(block_size=5)])
def test_mfac_foreach_equals_per_tensor(kw, device):
    _run(lambda net: MFAC(net.parameters(), lr=0.01, num_grads=3, damp=1e-2, **kw), device)


def test_the_default_path_follows_the_device():
    """As torch.optim: multi-tensor off the CPU, one tensor at a time on it."""
    p = nn.Parameter(torch.zeros(2))
    for cls in (AdaHessian, MFAC):
        opt = cls([p])
        assert opt._use_foreach(opt.param_groups[0], [p]) is False
        assert cls._use_foreach({"foreach": True}, [p]) is True
        assert cls._use_foreach({"foreach": None}, [p.to("meta")]) is True  # off the CPU
        assert cls([p], foreach=True).param_groups[0]["foreach"] is True
        with pytest.raises(TypeError, match="foreach"):
            cls([p], foreach="yes")


def test_mkor_saturated_grads_equal_the_originals_in_the_ordinary_range():
    """What MKOR hands its base equals the gradients (fallback parameters) bit for bit
    when nothing is near the saturation bound; p.grad itself is never modified."""
    net = _model(torch.float32)
    seen = []

    class Rec(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    with pytest.warns(UserWarning, match="no model"):  # every parameter falls back
        opt = MKOR(net.parameters(), lr=0.01, base=Rec)
    _loss(net, 0).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    ids = [id(p.grad) for p in net.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(seen[0], grads))
    assert [id(p.grad) for p in net.parameters()] == ids
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))


@pytest.mark.parametrize("n_probes", [1, 3])
def test_absolute_hutchinson_equals_abs_of_the_signed_estimate(n_probes):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    params = list(net.parameters())
    loss = net(torch.randn(7, 4)).pow(2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    signed = H.hutchinson_diag(params, grads, n_probes=n_probes, seed=3, retain_graph=True)
    absolute = H.hutchinson_diag(params, grads, n_probes=n_probes, seed=3, absolute=True)
    for s, a in zip(signed, absolute):
        assert torch.equal(s.abs(), a)
        for mode in ("none", "row", 3):
            assert torch.equal(
                H.spatial_average(s, mode), H.spatial_average(a, mode, nonnegative=True)
            )

