"Tests for snella_nb.snell.alloc: exact capped allocation, cubic schedule, importance EMAs, callback, resume."
import copy, io, math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck

from snella_nb.snell.alloc import (SnellaAllocator, allocate_budget, budget_from_sparsity, cubic_budget,
                                   find_snell_layers, normalise_scores, update_importance_, layer_score)


class ToySnell(nn.Module):
    "Minimal layer meeting the SNELL contract: linear-kernel merge with a hard top-k mask."
    is_snell_layer = True

    def __init__(self, d_in, d_out, r=4, H=2, sparsity=0.0):
        super().__init__()
        k = r // H
        self.A = nn.Parameter(torch.randn(H, d_in, k) / math.sqrt(d_in * k))
        self.B = nn.Parameter(torch.randn(H, d_out, k) / math.sqrt(d_out * k))
        self.sparsity, self.n_weights = float(sparsity), d_in * d_out

    def forward(self, x):
        K = torch.einsum('hik,hjk->ij', self.A, self.B)
        keep = self.n_weights - math.floor(self.sparsity * self.n_weights + 0.5)
        if keep >= self.n_weights:
            return x @ K
        tau = K.detach().abs().flatten().kthvalue(self.n_weights - keep).values
        return x @ (K * (K.detach().abs() > tau))


class ToyNet(nn.Module):
    def __init__(self, shapes, sparsity=0.0):
        super().__init__()
        self.shapes = shapes
        self.layers = nn.ModuleList([ToySnell(i, o, sparsity=sparsity) for i, o in shapes])

    def forward(self, x):
        xs = x.split([i for i, _ in self.shapes], dim=-1)
        return torch.cat([l(xi) for l, xi in zip(self.layers, xs)], dim=-1)


def n_keep(n, s):  # keep rule of snella_nb.snell.sparse.n_keep
    return n - math.floor(s * n + 0.5)


def train(net, al, steps, seed, lr=0.05, trainer=None):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    d, dout = sum(i for i, _ in net.shapes), sum(o for _, o in net.shapes)
    W = torch.randn(d, dout, generator=torch.Generator().manual_seed(123)) / math.sqrt(d)
    for _ in range(steps):
        x = torch.randn(8, d, generator=g)
        opt.zero_grad()
        (net(x) - torch.tanh(x @ W)).pow(2).mean().backward()
        opt.step()
        al.after_step(trainer)


def real_limit(scores, caps, budget):
    "Float water filling x = min(caps, λπ), Σx = budget, via the official proportional loop without truncation."
    pi = scores / scores.sum()
    v = torch.minimum(caps, budget * pi)
    for _ in range(10 * len(caps) + 10):
        d = budget - v.sum()
        if d <= 1e-9 * max(budget, 1): break
        i = (caps - v) > 1e-12
        v[i] += torch.minimum(d * pi[i] / pi[i].sum(), (caps - v)[i])
    return v


# ---------------------------------------------------------------------------------------------- allocation
@st.composite
def alloc_case(draw):
    L = draw(st.integers(1, 16))
    caps = draw(st.lists(st.integers(1, 5000), min_size=L, max_size=L))
    kind = draw(st.sampled_from(['random', 'zeros', 'dominant', 'all_zero', 'tiny']))
    sc = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=L, max_size=L))
    if kind == 'zeros':
        sc = [s if draw(st.booleans()) else 0.0 for s in sc]
    elif kind == 'dominant':
        sc[draw(st.integers(0, L - 1))] = 1e6
    elif kind == 'all_zero':
        sc = [0.0] * L
    elif kind == 'tiny':
        sc = [s * 1e-30 for s in sc]
    min_keep = draw(st.integers(0, min(caps)))
    budget = draw(st.integers(min_keep * L, sum(caps)))
    return torch.tensor(sc, dtype=torch.float64), caps, budget, min_keep


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alloc_case())
def test_allocation_exact_sum_and_caps(case):
    sc, caps, budget, min_keep = case
    v = allocate_budget(sc, caps, budget, min_keep)
    assert v.dtype == torch.int64
    assert int(v.sum()) == budget
    assert all(min_keep <= int(x) <= c for x, c in zip(v, caps))
    # deterministic
    assert torch.equal(v, allocate_budget(sc, caps, budget, min_keep))
    # positive scores and no reserve: each layer is the floor or ceil of the real proportional-capped limit
    pi = normalise_scores(sc)
    if min_keep == 0 and (pi > 0).all():
        x = real_limit(pi.clone(), torch.tensor(caps, dtype=torch.float64), float(budget))
        assert ((v.double() - x).abs() < 1 + 1e-6).all(), (v, x)
    # written sparsities give back exactly v kept weights with the n_keep rule
    assert [n_keep(n, 1 - int(x) / n) for x, n in zip(v, caps)] == v.tolist()


def test_allocation_examples():
    assert allocate_budget(torch.tensor([1., 1, 0]), [10, 10, 10], 25).tolist() == [10, 10, 5]
    assert allocate_budget(torch.tensor([0., 1, 0]), [10, 10, 10], 12, min_keep=1).tolist() == [1, 10, 1]
    assert allocate_budget(torch.zeros(3), [6, 6, 6], 7).tolist() == [3, 2, 2]
    assert allocate_budget(torch.tensor([3., 1.]), [100, 100], 40).tolist() == [30, 10]
    # dominant layer capped, the rest split by score
    assert allocate_budget(torch.tensor([100., 1., 3.]), [10, 100, 100], 50).tolist() == [10, 10, 30]
    assert allocate_budget(torch.tensor([float('nan'), 1.]), [10, 10], 5).tolist() == [0, 5]


def test_allocation_bad_input():
    with pytest.raises(ValueError, match='outside'):
        allocate_budget(torch.ones(2), [5, 5], 11)
    with pytest.raises(ValueError, match='outside'):
        allocate_budget(torch.ones(2), [5, 5], 1, min_keep=1)
    with pytest.raises(ValueError, match='scores for'):
        allocate_budget(torch.ones(3), [5, 5], 4)
    with pytest.raises(ValueError, match='min_keep'):
        allocate_budget(torch.ones(2), [5, 1], 4, min_keep=2)


# ---------------------------------------------------------------------------------------------- schedule
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(0, 300), st.integers(0, 300), st.integers(1, 50),
       st.integers(0, 10**9), st.integers(0, 10**9))
def test_cubic_schedule(T, ti, tf, iv, x, y):
    if ti + tf >= T:
        with pytest.raises(ValueError, match='must be < total'):
            cubic_budget(0, 1, 0, T, ti, tf, iv)
        return
    b0, bT = max(x, y), min(x, y)
    bs = [cubic_budget(t, b0, bT, T, ti, tf, iv) for t in range(T + 3)]
    assert all(b == b0 and not r for b, r in bs[:ti + 1])
    assert all(b == bT and r for b, r in bs[T - tf + 1:])
    assert bs[T - tf][0] == bT
    assert all(p[0] >= q[0] for p, q in zip(bs, bs[1:]))
    assert all(bT <= b <= b0 for b, _ in bs)
    for t in range(ti + 1, T - tf + 1):
        assert bs[t][1] == (t % iv == 0)


def test_budget_from_sparsity():
    assert budget_from_sparsity([100, 100], 0.9) == 20
    assert budget_from_sparsity([10, 30], [0.5, 0.1]) == 32
    assert budget_from_sparsity([768 * 768] * 3, 0.0) == 3 * 768 * 768
    with pytest.raises(ValueError):
        budget_from_sparsity([1, 2], [0.1])


# ---------------------------------------------------------------------------------------------- importance
def test_importance_emas_against_hand_computation():
    torch.manual_seed(0)
    net = ToyNet([(6, 5), (4, 7)])
    al = SnellaAllocator(net, 0.5, 0.0, total_steps=100)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 10), torch.randn(16, 12)
    I = {}
    for step in range(2):
        opt.zero_grad(); ((net(x) - y) ** 2).mean().backward(); opt.step()
        for i, l in enumerate(net.layers):
            for p in 'AB':
                P = getattr(l, p)
                I[i, p, step] = (P.detach().double() * P.grad.double()).abs()
        al.after_step(None)
    b1 = b2 = 0.85
    sig = []
    for i in range(2):
        s = 0.
        for p in 'AB':
            I1, I2 = I[i, p, 0], I[i, p, 1]
            ipt1 = (1 - b1) * I1
            unc1 = (1 - b2) * (I1 - ipt1).abs()
            ipt2 = b1 * ipt1 + (1 - b1) * I2
            unc2 = b2 * unc1 + (1 - b2) * (I2 - ipt2).abs()
            key = f'layers.{i}.{p}'
            torch.testing.assert_close(al.exp_ipt[key].double(), ipt2, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(al.exp_unc[key].double(), unc2, rtol=1e-5, atol=1e-9)
            s += (ipt2 * unc2).mean().item()
        sig.append(s)
    torch.testing.assert_close(al.scores(), torch.tensor(sig, dtype=torch.float64), rtol=1e-5, atol=0)
    # the allocation at t=2 used those scores
    torch.testing.assert_close(torch.tensor(al.last_scores), torch.tensor(sig) / sum(sig), rtol=1e-5, atol=0,
                               check_dtype=False)


def test_importance_nan_inf_and_missing_grad():
    p = torch.tensor([1., 2., 3., 4.])
    g = torch.tensor([float('nan'), float('inf'), -2., 0.5])
    ipt, unc = torch.zeros(4), torch.zeros(4)
    update_importance_(p, g, ipt, unc, 0.5, 0.5)
    torch.testing.assert_close(ipt, torch.tensor([0., 0., 3., 1.]))
    torch.testing.assert_close(unc, torch.tensor([0., 0., 1.5, 0.5]))
    update_importance_(p, None, ipt, unc, 0.5, 0.5)
    torch.testing.assert_close(ipt, torch.tensor([0., 0., 1.5, .5]))
    assert layer_score(torch.full((2,), float('nan')), torch.ones(2), torch.ones(2), torch.ones(2)) == 0.0
    assert normalise_scores(torch.zeros(4)).tolist() == [0.25] * 4


def test_zero_gradient_layer_gets_least_budget():
    torch.manual_seed(1)
    net = ToyNet([(8, 8), (8, 8), (8, 8), (8, 8)])
    al = SnellaAllocator(net, 0.6, 0.0, total_steps=20)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        out = net(torch.randn(4, 32))
        (out[:, :24].pow(2).sum() + 0 * out[:, 24:].sum()).backward()
        opt.step(); al.after_step(None)
    v = al.last_alloc
    assert v[3] == 1 and v[3] < min(v[:3])
    assert net.layers[3].sparsity == max(l.sparsity for l in net.layers) < 1
    assert sum(v) == al.budget(al.t)[0]


# ---------------------------------------------------------------------------------------------- allocator
def test_allocator_step_mode_budget_and_layers():
    torch.manual_seed(2)
    net = ToyNet([(8, 8), (8, 16), (16, 8)])
    T = 30
    al = SnellaAllocator(net, 0.8, 0.3, T, init_warmup=4, final_warmup=6, interval=3)
    assert [l.sparsity for l in net.layers] == [0.3] * 3
    assert al.b0 == budget_from_sparsity(al.n_weights, 0.3) and al.bT == budget_from_sparsity(al.n_weights, 0.8)
    train(net, al, T, seed=0)
    ts = [h[0] for h in al.history]
    expect = [0] + [t for t in range(1, T) if cubic_budget(t, al.b0, al.bT, T, 4, 6, 3)[1]]
    assert ts == expect            # allocations exactly when the schedule says, and only for t < T
    for t, b, s in al.history[1:]:
        assert b == cubic_budget(t, al.b0, al.bT, T, 4, 6, 3)[0]
        assert sum(n_keep(n, si) for si, n in zip(s, al.n_weights)) == b
    assert al.history[-1][1] == al.bT
    assert [l.sparsity for l in net.layers] == al.sparsity
    assert all(0 <= s < 1 for s in al.sparsity)


def test_allocator_epoch_mode_matches_released_scripts():
    torch.manual_seed(3)
    net = ToyNet([(8, 8), (8, 8)])
    E = 5
    al = SnellaAllocator(net, 0.7, 0.01, E, mode='epoch')
    for e in range(E):
        train(net, al, 3, seed=e)                  # importance every step, no reallocation inside the epoch
        assert al.t == e and len(al.history) == 1 + e
        al.after_epoch(None)
    assert [h[0] for h in al.history] == [0, 1, 2, 3, 4]   # before epochs 1..T-1, as allocator.update(model, epoch)
    assert al.history[-1][1] == cubic_budget(4, al.b0, al.bT, E)[0] >= al.bT


def test_ema_sync():
    class Ema(nn.Module):  # timm ModelEma-style wrapper: the copy lives under .module
        def __init__(self, m):
            super().__init__(); self.module = copy.deepcopy(m)

    for sync in (True, False):
        torch.manual_seed(4)
        net = ToyNet([(8, 8), (8, 16)])
        ema = Ema(net)
        tr = SimpleNamespace(ema_model=ema, model=net)
        al = SnellaAllocator(net, 0.8, 0.2, 10, sync_ema=sync)
        al.before_fit(tr)
        train(net, al, 4, seed=0, trainer=tr)
        got = [l.sparsity for l in ema.module.layers]
        if sync:
            assert got == al.sparsity and got != [0.2, 0.2]
        else:
            assert got == [0.0, 0.0]
    with pytest.raises(ValueError, match='same model'):
        al.write_to(ToyNet([(4, 4)]))


def test_state_dict_round_trip_reproduces_next_allocation():
    torch.manual_seed(5)
    netA = ToyNet([(8, 8), (8, 12), (12, 8)])
    alA = SnellaAllocator(netA, 0.8, 0.2, 40, interval=3)
    train(netA, alA, 7, seed=0)
    buf = io.BytesIO(); torch.save(alA.state_dict(), buf); buf.seek(0)
    netB = copy.deepcopy(netA)
    for l in netB.layers:
        l.sparsity = 0.2
    alB = SnellaAllocator(netB, 0.8, 0.2, 40, interval=3)
    alB.load_state_dict(torch.load(buf, weights_only=False))
    assert [l.sparsity for l in netB.layers] == alA.sparsity
    assert alB.t == alA.t == 7
    train(netA, alA, 3, seed=1); train(netB, alB, 3, seed=1)
    assert alA.history == alB.history and alA.last_alloc == alB.last_alloc
    assert alA.history[-1][0] == 9
    for k in alA.exp_ipt:
        assert torch.equal(alA.exp_ipt[k], alB.exp_ipt[k]) and torch.equal(alA.exp_unc[k], alB.exp_unc[k])
    other = SnellaAllocator(ToyNet([(8, 8)]), 0.8, 0.2, 40)
    with pytest.raises(ValueError, match='same model'):
        other.load_state_dict(alA.state_dict())


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('kw, msg', [
    (dict(target_sparsity=1.0), r'target_sparsity must be in \[0, 1\)'),
    (dict(target_sparsity=-0.1), r'target_sparsity must be in \[0, 1\)'),
    (dict(init_sparsity=1.0), 'init_sparsity'),
    (dict(init_warmup=5, final_warmup=5), 'must be < total_steps'),
    (dict(init_warmup=11), 'must be < total_steps'),
    (dict(total_steps=0), 'total_steps must be a positive int'),
    (dict(total_steps=None), 'total_steps must be a positive int'),
    (dict(interval=0), 'interval'),
    (dict(beta1=1.0), 'beta1'),
    (dict(mode='iter'), "'step' or 'epoch'"),
    (dict(min_keep=100), 'min_keep'),
])
def test_bad_input(kw, msg):
    args = dict(model=ToyNet([(4, 4)]), target_sparsity=0.5, init_sparsity=0.0, total_steps=10)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        SnellaAllocator(**args)


def test_no_snell_layers():
    with pytest.raises(ValueError, match='get_snell_model'):
        SnellaAllocator(nn.Sequential(nn.Linear(3, 3)), 0.5, 0.0, 10)
    with pytest.raises(TypeError):
        find_snell_layers('not a model')
    bad = ToyNet([(4, 4)]); bad.layers[0].n_weights = 16.0
    with pytest.raises(ValueError, match='n_weights'):
        find_snell_layers(bad)


# ---------------------------------------------------------------------------------------------- with the Trainer
def _trainer_run(ckpt=None, stop=None, steps=16, mode='step'):
    from torch.utils.data import DataLoader, TensorDataset
    from snella_nb.train import Trainer, TrainConfig, Callback

    class StopAt(Callback):
        def after_step(self, tr): tr.should_stop = tr.step >= stop

    torch.manual_seed(0)
    net = ToyNet([(8, 4), (8, 6)])
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 10, (64,), generator=g))
    T = steps if mode == 'step' else steps // 8
    al = SnellaAllocator(net, 0.7, 0.1, T, init_warmup=2 if mode == 'step' else 0,
                         final_warmup=4 if mode == 'step' else 0, interval=2 if mode == 'step' else 1, mode=mode)
    cbs = [al] + ([StopAt()] if stop else [])
    tr = Trainer(net, DataLoader(ds, batch_size=8), config=TrainConfig(lr=5e-2, max_steps=steps, ema_decay=0.9,
                 progress=False, log_every=4), callbacks=cbs, num_classes=10)
    if ckpt is not None and stop is None:
        tr.load_checkpoint(ckpt)
    tr.fit()
    if ckpt is not None and stop is not None:
        tr.save_checkpoint(ckpt)
    return tr, al


@pytest.mark.parametrize('mode', ['step', 'epoch'])
def test_trainer_resume_and_ema(tmp_path, mode):
    from snella_nb.train import Callback
    ck = tmp_path / 'half.pt'
    steps = 16 if mode == 'step' else 32          # epoch mode: 8 batches per epoch, 4 epochs
    tr_full, al_full = _trainer_run(steps=steps, mode=mode)
    assert isinstance(al_full, Callback)
    assert len(al_full.history) > 2
    _trainer_run(ck, stop=7 if mode == 'step' else 12, steps=steps, mode=mode)
    tr_res, al_res = _trainer_run(ck, steps=steps, mode=mode)
    assert al_res.history == al_full.history
    assert al_res.sparsity == al_full.sparsity
    assert [l.sparsity for l in tr_res.ema_model.module.layers] == al_full.sparsity
    assert tr_res.history['train'] == tr_full.history['train']


def test_with_real_tuner_tiny_vit():
    timm = pytest.importorskip('timm')
    from torch.utils.data import DataLoader, TensorDataset
    from snella_nb.snell.tuner import get_snell_model, SnellConfig
    from snella_nb.snell.sparse import n_keep as sparse_n_keep
    from snella_nb.train import Trainer, TrainConfig
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                                           num_heads=2, num_classes=4)
    model = get_snell_model(vit, SnellConfig(r=4, kernel='mixed', sparsity=0.0, dense_at_zero=False, init_seed=0))
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(32, 3, 16, 16, generator=g), torch.randint(0, 4, (32,), generator=g))
    al = SnellaAllocator(model, 0.7, 0.0, total_steps=4)
    assert len(al.layer_names) == 6 and al.layer_names[0].endswith('attn.qkv.q')
    tr = Trainer(model, DataLoader(ds, batch_size=8), config=TrainConfig(lr=1e-2, max_steps=4, ema_decay=0.9,
                 progress=False), callbacks=[al], num_classes=4)
    tr.fit()
    layers = [m for _, m in model.named_modules() if getattr(m, 'is_snell_layer', False)]
    assert [m.sparsity for m in layers] == al.sparsity
    assert sum(sparse_n_keep(m.n_weights, m.sparsity) for m in layers) == al.history[-1][1]
    assert [h[0] for h in al.history] == [0, 1, 2, 3]
    ema_layers = [m for _, m in tr.ema_model.module.named_modules() if getattr(m, 'is_snell_layer', False)]
    assert [m.sparsity for m in ema_layers] == al.sparsity
    # SNELL(s=0) switches to S=K when dense_at_zero=True: the allocator warns about it
    vit2 = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                                            num_heads=2, num_classes=4)
    model2 = get_snell_model(vit2, SnellConfig(r=4, kernel='mixed', sparsity=0.0, init_seed=0))
    with pytest.warns(UserWarning, match='dense_at_zero'):
        SnellaAllocator(model2, 0.7, 0.0, total_steps=4)
