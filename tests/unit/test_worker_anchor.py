"""The anchor's outer step: DiLoCo's Nesterov SGD on the pseudo-gradient, exactly."""

from __future__ import annotations

import torch

from cheapspot_worker.anchor import average, outer_step


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(2, generator=g)}


def test_outer_step_is_torch_sgd_nesterov_on_the_pseudo_gradient() -> None:
    g = _adapter(0)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in g.items()}
    sgd = torch.optim.SGD(list(params.values()), lr=0.7, momentum=0.9, nesterov=True)
    momentum = None
    for r in range(3):
        avg = average([_adapter(10 * r + 1), _adapter(10 * r + 2)])
        for k, p in params.items():
            p.grad = p.detach() - avg[k]
        sgd.step()
        g, momentum = outer_step(g, avg, momentum, lr=0.7, mu=0.9)
        for k, p in params.items():
            torch.testing.assert_close(g[k], p.detach(), rtol=0, atol=1e-6)


def test_average_is_in_the_given_order_and_exact_for_one() -> None:
    one = _adapter(3)
    assert all(torch.equal(average([one])[k], one[k]) for k in one)
    a, b = _adapter(1), _adapter(2)
    assert all(torch.equal(average([a, b])[k], (a[k] + b[k]) / 2) for k in a)
