"""Bop and HybridOptimizer, checked against hand computation and an independent float64 reference."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lightning_effnets.optim import Bop, HybridOptimizer, check_partition, split_binary_parameters


def _binary(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.where(torch.randn(*shape, generator=g) >= 0, 1.0, -1.0).to(dtype))


def _reference_bop(w, grads, gamma, tau):
    """Paper rule in float64 numpy, one weight at a time: m <- m + gamma (g - m); flip where w m > tau."""
    w = np.array(w, dtype=np.float64)
    m = np.zeros_like(w)
    for g in grads:
        for i in range(w.size):
            m.flat[i] = m.flat[i] + gamma * (g.flat[i] - m.flat[i])
            if w.flat[i] * m.flat[i] > tau:
                w.flat[i] = -w.flat[i]
    return w, m


@pytest.mark.parametrize("foreach", [True, False])
def test_acceptance_example(foreach):
    w = nn.Parameter(torch.tensor([1.0, 1.0, -1.0, -1.0]))
    w.grad = torch.tensor([0.5, -0.5, 0.5, -0.5])
    Bop([w], gamma=1.0, threshold=0.0, foreach=foreach).step()
    assert w.tolist() == [-1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("tau", [0.0, 1e-25, 0.05])
def test_update_matches_float64_reference(foreach, tau):
    gen = torch.Generator().manual_seed(1)
    w = _binary(7, 5, seed=2)
    grads = [torch.randn(7, 5, generator=gen) for _ in range(6)]
    opt = Bop([w], gamma=0.3, threshold=tau, foreach=foreach)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    w_ref, m_ref = _reference_bop(_binary(7, 5, seed=2).detach().numpy(), [g.numpy() for g in grads], 0.3, tau)
    np.testing.assert_array_equal(w.detach().numpy(), w_ref)
    np.testing.assert_allclose(opt.momentum(w).numpy(), m_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("foreach", [True, False])
def test_flips_exactly_where_wm_exceeds_threshold_and_ties_keep(foreach):
    tau = 0.25  # a power of two: w * m == tau is an exact tie
    w = nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0]))
    m = torch.tensor([0.5, 0.25, 0.125, -0.5, -0.5, -0.25, -0.125, 0.5, 0.2500001, -0.2500001])
    w.grad = m.clone()  # gamma = 1: the updated m is the gradient
    Bop([w], gamma=1.0, threshold=tau, foreach=foreach).step()
    expected = [-1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0]
    assert w.tolist() == expected
    # threshold 0: zero momentum is a tie too and keeps either sign
    w0 = nn.Parameter(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    w0.grad = torch.tensor([0.0, 0.0, 1e-42, -1e-42])  # subnormal momenta still count as positive/negative
    Bop([w0], gamma=1.0, threshold=0.0, foreach=foreach).step()
    assert w0.tolist() == [1.0, -1.0, -1.0, 1.0]


def test_high_threshold_never_flips():
    w = _binary(64, 9)
    before = w.detach().clone()
    opt = Bop([w], gamma=0.5, threshold=1e6)
    for _ in range(20):
        w.grad = torch.randn_like(w) * 100
        opt.step()
    assert torch.equal(w, before)


def _many_params():
    shapes = [(16, 8, 3, 3), (16,), (33, 5), (1,), (4, 4, 1, 1), (200,)]
    params = [_binary(*s, seed=i) for i, s in enumerate(shapes)]
    params += [_binary(6, 3, seed=10, dtype=torch.float64), _binary(9, seed=11, dtype=torch.bfloat16)]
    return params


def test_vectorised_path_equals_per_tensor_loop_bitwise():
    fast, slow = _many_params(), _many_params()
    groups = lambda ps: [{"params": ps[:3]}, {"params": ps[3:6], "gamma": 0.2, "threshold": 0.0},  # noqa: E731
                         {"params": ps[6:], "threshold": 1e-25}]  # the tiny threshold uses the unscaled path
    opt_fast = Bop(groups(fast), gamma=0.05, threshold=1e-3, foreach=True, track_flips=True)
    opt_slow = Bop(groups(slow), gamma=0.05, threshold=1e-3, foreach=False, track_flips=True)
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        for i, (a, b) in enumerate(zip(fast, slow)):
            if (step + i) % 5 == 0:
                a.grad = b.grad = None  # parameters without gradient are skipped
                continue
            g = (torch.randn(a.shape, generator=gen) * 0.1).to(a.dtype)
            a.grad, b.grad = g.clone(), g.clone()
        if step == 6:  # schedule both hyper-parameters of the first group
            for opt in (opt_fast, opt_slow):
                opt.param_groups[0]["threshold"] = 2e-3
                opt.param_groups[0]["gamma"] = 0.1
        opt_fast.step()
        opt_slow.step()
        assert opt_fast.last_flips.item() == opt_slow.last_flips.item()
        for a, b in zip(fast, slow):
            assert torch.equal(a, b)
            assert torch.equal(opt_fast.momentum(a), opt_slow.momentum(b))
    assert all(set(p.unique().tolist()) <= {-1.0, 1.0} for p in fast)


def test_flip_count_matches_sign_changes():
    params = _many_params()
    opt = Bop(params, gamma=0.5, threshold=1e-4, track_flips=True)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    changed = sum(int((a != b).sum()) for a, b in zip(before, params))
    assert changed > 0
    assert opt.last_flips.item() == changed
    assert opt.last_flip_ratio.item() == pytest.approx(changed / sum(p.numel() for p in params))
    opt.track_flips = False
    opt.step()
    assert opt.last_flips is None


def test_threshold_change_keeps_momentum_continuous():
    w = _binary(50)
    opt = Bop([w], gamma=0.1, threshold=1e-3)
    w.grad = torch.randn_like(w) * 1e-3
    opt.step()
    m = opt.momentum(w).clone()
    opt.param_groups[0]["threshold"] = 0.0
    w.grad = torch.zeros_like(w)
    opt.step()  # m <- 0.9 m under the new threshold
    torch.testing.assert_close(opt.momentum(w), 0.9 * m, rtol=1e-6, atol=0)


def test_state_dict_round_trip_continues_identically():
    params = _many_params()
    opt = Bop(params, gamma=0.1, threshold=1e-3)
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01 for p in params] for _ in range(6)]
    for gs in grads[:3]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    clone = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Bop(clone, gamma=0.7, threshold=0.5)  # hyper-parameters come back from the state dict
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["gamma"] == 0.1 and opt2.param_groups[0]["threshold"] == 1e-3
    for gs in grads[3:]:
        for p, q, g in zip(params, clone, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, clone):
        assert torch.equal(p, q)
    # the momentum of bfloat16 weights stays float32 (1 - gamma is not representable in bfloat16)
    assert opt2.state[clone[-1]]["scaled_momentum"].dtype == torch.float32
    assert torch.equal(opt2.momentum(clone[-1]), opt.momentum(params[-1]))


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"only binary \(±1\) parameters.*parameter 1 of group 0"):
        Bop([_binary(3), nn.Parameter(torch.tensor([1.0, 0.5, -1.0]))])
    with pytest.raises(ValueError, match="weight decay"):
        Bop([{"params": [_binary(3)], "weight_decay": 1e-4}])
    with pytest.raises(ValueError, match="gamma"):
        Bop([_binary(3)], gamma=0.0)
    with pytest.raises(ValueError, match="threshold"):
        Bop([_binary(3)], threshold=-1.0)
    w = _binary(3)
    opt = Bop([w])
    opt.param_groups[0]["gamma"] = 2.0
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match="gamma"):
        opt.step()


# ---------------------------------------------------------------------- HybridOptimizer
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        from lightning_effnets.layers import BinaryLinear

        self.inp = nn.Linear(6, 8)
        self.bin = BinaryLinear(8, 8, activation="ste")
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.norm(self.bin(self.inp(x))))


def test_hybrid_real_params_follow_the_real_optimizer_exactly():
    torch.manual_seed(0)
    model = _Tiny()
    reference = copy.deepcopy(model)
    binary, real = split_binary_parameters(model)
    assert [id(p) for p in binary] == [id(model.bin.weight)]
    hybrid = HybridOptimizer(torch.optim.Adam(real, lr=0.01), Bop(binary, gamma=0.5, threshold=1e-6))
    ref_binary, ref_real = split_binary_parameters(reference)
    adam_alone = torch.optim.Adam(ref_real, lr=0.01)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    flips = 0
    for _ in range(4):
        with torch.no_grad():  # the reference sees the binary weights Bop produced
            ref_binary[0].copy_(model.bin.weight)
        before = model.bin.weight.detach().clone()
        hybrid.zero_grad()
        assert model.inp.weight.grad is None and model.bin.weight.grad is None
        loss = hybrid.step(closure)
        flips += int((before != model.bin.weight).sum())
        adam_alone.zero_grad()
        ref_loss = nn.functional.cross_entropy(reference(x), y)
        ref_loss.backward()
        adam_alone.step()
        assert loss.item() == ref_loss.item()
        for p, q in zip(real, ref_real):
            assert torch.equal(p, q)
    assert flips > 0
    assert hybrid.param_groups is hybrid.real.param_groups
    assert set(model.bin.weight.unique().tolist()) <= {-1.0, 1.0}


def test_hybrid_state_dict_round_trip_and_errors():
    model = _Tiny()
    binary, real = split_binary_parameters(model)
    hybrid = HybridOptimizer(torch.optim.SGD(real, lr=0.1, momentum=0.9), Bop(binary, gamma=0.5))
    x = torch.randn(8, 6)
    hybrid.step(lambda: model(x).sum().backward())
    state = copy.deepcopy(hybrid.state_dict())
    assert set(state) == {"real", "binary"}
    other = copy.deepcopy(model)
    b2, r2 = split_binary_parameters(other)
    hybrid2 = HybridOptimizer(torch.optim.SGD(r2, lr=0.1, momentum=0.9), Bop(b2, gamma=0.5))
    hybrid2.load_state_dict(state)
    torch.testing.assert_close(hybrid2.binary.momentum(b2[0]), hybrid.binary.momentum(binary[0]), rtol=0, atol=0)
    assert len(list(hybrid2.state.items())) == len(real) + len(binary)
    assert len(hybrid2.real.state) == len(real)  # reading the merged state never adds entries
    with pytest.raises(ValueError, match="saved without"):
        hybrid2.load_state_dict(torch.optim.SGD(r2, lr=0.1).state_dict())
    with pytest.raises(ValueError, match="claimed by both"):
        HybridOptimizer(torch.optim.Adam(model.parameters()), Bop(binary))
    with pytest.raises(ValueError, match="claimed by two optimizers: bin.weight"):
        check_partition(model, {"Adam": torch.optim.Adam(model.parameters()), "Bop": Bop(binary)})
    with pytest.raises(ValueError, match="claimed by no optimizer: inp.bias, norm.weight, norm.bias"):
        check_partition(model, {"Adam": torch.optim.Adam([p for p in real if p.ndim != 1] + [model.out.bias]),
                                "Bop": Bop(binary)})
