"""GradCache: same loss and same parameter gradients as the plain (uncached) step."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import Tau
from umarvel.train import losses as L
from umarvel.train.grad_cache import RandContext, grad_cache_step


class TinyEncoder(nn.Module):
    """(b, 6) features -> (b, 4) embeddings, with dropout so the RNG replay matters."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(p), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _data(b=6, k=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 6, generator=g), torch.randn(b, 6, generator=g), torch.randn(k * b, 6, generator=g)


def _chunks(x, size):
    return list(torch.split(x, size))


def _loss(tau):
    def fn(q, c, n):
        return L.info_nce(q, c, tau(), hard_negatives=n)
    return fn


def _grads(*modules):
    return [p.grad.clone() for m in modules for p in m.parameters() if p.requires_grad]


def _plain_step(model, tau, q, c, n, chunk):
    """Reference: chunk-wise forwards with autograd in the same order as pass 1, one backward."""
    torch.manual_seed(123)
    qe = torch.cat([model(x) for x in _chunks(q, chunk)])
    ce = torch.cat([model(x) for x in _chunks(c, chunk)])
    ne = torch.cat([model(x) for x in _chunks(n, chunk)])
    loss = _loss(tau)(qe, ce, ne)
    loss.backward()
    return loss.detach()


def _cached_step(model, tau, q, c, n, chunk, restore_rng=True):
    torch.manual_seed(123)
    return grad_cache_step(model, [_chunks(q, chunk), _chunks(c, chunk), _chunks(n, chunk)], _loss(tau),
                           restore_rng=restore_rng)


@pytest.mark.parametrize("chunk", [1, 4])
def test_grad_cache_matches_plain_step_with_dropout(chunk):
    torch.manual_seed(0)
    model, tau = TinyEncoder(), Tau(0.5, learnable=True)
    q, c, n = _data()
    ref_loss = _plain_step(model, tau, q, c, n, chunk)
    ref = _grads(model, tau)
    model.zero_grad(), tau.zero_grad()
    loss = _cached_step(model, tau, q, c, n, chunk)
    got = _grads(model, tau)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert got[-1].abs().item() > 0  # the temperature got its gradient from pass 1


def test_without_rng_restore_gradients_differ():
    torch.manual_seed(0)
    model, tau = TinyEncoder(p=0.5), Tau(0.5, learnable=True)
    q, c, n = _data()
    _plain_step(model, tau, q, c, n, 2)
    ref = _grads(model)
    model.zero_grad(), tau.zero_grad()
    _cached_step(model, tau, q, c, n, 2, restore_rng=False)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(_grads(model), ref))


def test_grad_cache_without_dropout_equals_full_batch_forward():
    torch.manual_seed(0)
    model, tau = TinyEncoder(p=0.0), Tau(0.05)
    q, c, n = _data()
    loss = L.info_nce(model(q), model(c), tau(), hard_negatives=model(n))
    loss.backward()
    ref = _grads(model)
    model.zero_grad()
    cached = grad_cache_step(model, [_chunks(q, 4), _chunks(c, 5), _chunks(n, 3)], _loss(tau))
    assert cached.item() == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(_grads(model), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6)
    assert tau.temp.grad is None  # frozen tau stays untouched


def test_rand_context_replays_and_restores():
    torch.manual_seed(5)
    ctx = RandContext()
    first = torch.rand(3)
    after = torch.get_rng_state()
    with ctx:
        replay = torch.rand(3)
    assert torch.equal(first, replay)
    assert torch.equal(torch.get_rng_state(), after)


def test_loss_must_be_scalar():
    model = TinyEncoder(p=0.0)
    q, c, _ = _data()
    with pytest.raises(ValueError, match="scalar"):
        grad_cache_step(model, [[q], [c]], lambda a, b: a @ b.T)
