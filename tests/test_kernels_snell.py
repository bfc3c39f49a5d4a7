"""Tests for snella_nb.kernels.snell: the fused SNELL kernels against float64 PyTorch references.

The Triton kernels run on CPU through Triton's interpreter, which must be switched on before triton is imported.
Shapes are small and not multiples of the interpreter's blocks (16).
"""
import os
os.environ['TRITON_INTERPRET'] = '1'  # before anything imports triton
import warnings

import pytest
import torch

from snella_nb.kernels.core import ENV_KERNELS, kernel_launches
from snella_nb.kernels import snell as ks
from snella_nb.kernels.snell import fused_snell_matmul
from snella_nb.snell.kernel import SnellKernel, distance_kernel, init_factors, mixed_kernel
from snella_nb.snell.sparse import magnitude_threshold, n_keep, snell_matmul, sparsify

D_IN, D_OUT, T = 37, 45, 19


def _factors(seed, r=4, d_in=D_IN, d_out=D_OUT):
    g = torch.Generator().manual_seed(seed)
    A, B = init_factors(d_in, d_out, r, generator=g)
    return A, B, torch.tensor([0.1, -0.1]), g


def _close(got, want, rel):
    "Max error relative to the reference's largest magnitude."
    err = (got.double() - want).abs().max().item()
    assert err <= rel * max(want.abs().max().item(), 1e-30), f"error {err:.3g} vs scale {want.abs().max().item():.3g}"


def _ref_S(A64, B64, c64, A, B, c, tau, mode):
    """Float64 S with the mask of the kernels' own float32 K: the (keep+1)-th entry equals τ exactly in float32 but may
    land on either side of it in float64, which would flip one mask bit (and a gradient entry) by rounding alone."""
    K64 = distance_kernel(A64, B64, c64)
    if mode == 'dense': return K64
    M = (ks._snell_dense_triton(A, B, c).abs() > tau).double()
    t = tau.double()
    return K64 * K64.abs().detach() * M if mode == 'official' else K64 * (K64.abs() - t) * M


@pytest.mark.parametrize('r', [4, 8])
def test_threshold_exact_topk(r):
    A, B, c, _ = _factors(10 + r, r)
    K = ks._snell_dense_triton(A, B, c)                         # the values the kernels see
    _close(K, distance_kernel(A.double(), B.double(), c.double()), 1e-6)
    n = K.numel()
    n0, s0 = kernel_launches['snell_hist'], kernel_launches['snell_select']
    for s in (0.5, 0.9, (n - 1) / n):
        keep = n_keep(n, s)
        tau = ks._snell_threshold_triton(A, B, c, keep)
        assert tau == torch.kthvalue(K.abs().flatten(), n - keep).values
        assert tau == magnitude_threshold(K, s)
        assert int((K.abs() > tau).sum()) == keep
    assert kernel_launches['snell_hist'] - n0 == 12              # 4 radix passes each: the interpreter ran the kernel
    assert kernel_launches['snell_select'] - s0 == 12            # each digit picked on the device
    assert ks._snell_threshold_triton(A, B, c, n) == 0           # keep everything


@pytest.mark.parametrize('mode,s', [('official', 0.7), ('paper', 0.6), ('dense', 0.0)])
def test_mm_and_grads_vs_float64(mode, s):
    A, B, c, g = _factors(1)
    x, dy = torch.randn(T, D_IN, generator=g), torch.randn(T, D_OUT, generator=g)
    tau = ks._snell_threshold_triton(A, B, c, n_keep(D_IN * D_OUT, s)) if mode != 'dense' else torch.zeros(())
    A64, B64, c64, x64 = (t.double().requires_grad_() for t in (A, B, c, x))
    y64 = x64 @ _ref_S(A64, B64, c64, A, B, c, tau, mode)
    want = torch.autograd.grad(y64, (x64, A64, B64, c64), dy.double())
    n0 = dict(kernel_launches)
    y = ks._snell_mm_triton(x, A, B, c, tau, mode, out=torch.full((T, D_OUT), float('nan')))
    dx = ks._snell_mm_triton(dy, A, B, c, tau, mode, trans=True, out=torch.full((T, D_IN), float('nan')))
    dA, dB, dc, dp = ks._snell_bwd_triton(x, dy, A, B, c, tau, mode, need_coeffs=True)
    assert dp is None                                             # no α, β, γ for the distance kernel
    assert kernel_launches['snell_mm'] - n0.get('snell_mm', 0) == 2 and kernel_launches['snell_bwd'] - n0.get('snell_bwd', 0) == 1
    _close(y, y64.detach(), 1e-5)
    for got, w in zip((dx, dA, dB, dc), want): _close(got, w, 2e-5)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()  # NaN-poisoned buffers fully overwritten


@pytest.mark.parametrize('mode,s,daz,r', [('official', 0.8, True, 8), ('paper', 0.5, True, 4), ('official', 0.0, False, 4)])
def test_public_autograd_vs_snell_matmul(mode, s, daz, r):
    A, B, c, g = _factors(2, r)
    A.requires_grad_(); B.requires_grad_()
    kern = SnellKernel('distance', learnable_coeffs=True)
    x = torch.randn(3, 7, D_IN, generator=g, requires_grad=True)     # leading dims: 21 tokens
    dy = torch.randn(3, 7, D_OUT, generator=g)
    n0 = kernel_launches['snell_bwd']
    y = fused_snell_matmul(x, A, B, kern, s, mode, daz, backend='triton')
    got = (y, *torch.autograd.grad(y, (x, A, B, kern.coeffs), dy))
    assert kernel_launches['snell_bwd'] - n0 == 1
    xd, Ad, Bd, cd = (t.detach().double().requires_grad_() for t in (x, A, B, kern.coeffs))
    fmode = 'dense' if s == 0 and daz else mode
    tau = ks._snell_threshold_triton(A.detach(), B.detach(), c, n_keep(D_IN * D_OUT, s))
    y64 = xd @ _ref_S(Ad, Bd, cd, A.detach(), B.detach(), c, tau, fmode)
    want = (y64, *torch.autograd.grad(y64, (xd, Ad, Bd, cd), dy.double()))
    torch.testing.assert_close(y.double(), snell_matmul(xd, Ad, Bd, kern.double(), s, mode, daz), rtol=0, atol=1e-4 * y64.abs().max().item())
    for a, b in zip(got, want): _close(a, b.detach(), 2e-5)


def test_bf16_inputs():
    A, B, c, g = _factors(3, 8)
    A.requires_grad_()
    kern = SnellKernel('distance')
    x = torch.randn(T, D_IN, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(T, D_OUT, generator=g).bfloat16()
    y = fused_snell_matmul(x, A, B, kern, 0.8, backend='triton')
    assert y.dtype == torch.bfloat16
    gx, gA = torch.autograd.grad(y, (x, A), dy)
    assert gx.dtype == torch.bfloat16 and gA.dtype == torch.float32
    xd, Ad = x.detach().double().requires_grad_(), A.detach().double().requires_grad_()
    tau = ks._snell_threshold_triton(A.detach(), B, c, n_keep(D_IN * D_OUT, 0.8))
    y64 = xd @ _ref_S(Ad, B.double(), c.double(), A.detach(), B, c, tau, 'official').to(torch.bfloat16).double()
    want = torch.autograd.grad(y64, (xd, Ad), dy.double())
    _close(y, y64.detach(), 2**-6)
    for a, b in zip((gx, gA), want): _close(a, b, 2**-5)


def test_dispatch_and_fallbacks(monkeypatch):
    A, B, c, g = _factors(4)
    x = torch.randn(5, D_IN, generator=g)
    kern = SnellKernel('distance')
    want = snell_matmul(x, A, B, kern, 0.8)
    n0 = kernel_launches['snell_mm']
    torch.testing.assert_close(fused_snell_matmul(x, A, B, kern, 0.8), want)     # auto on CPU: reference
    torch.testing.assert_close(fused_snell_matmul(x, A, B, kern, 0.8, backend='reference'), want)
    monkeypatch.setenv(ENV_KERNELS, 'reference')
    torch.testing.assert_close(fused_snell_matmul(x, A, B, kern, 0.8), want)
    assert kernel_launches['snell_mm'] == n0                                         # none of these ran Triton
    monkeypatch.delenv(ENV_KERNELS)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        ym = fused_snell_matmul(x, A, B, SnellKernel('rbf'), 0.8, backend='triton')   # no fused version: reference
    assert any('reference' in str(m.message) for m in w)
    torch.testing.assert_close(ym, snell_matmul(x, A, B, SnellKernel('rbf'), 0.8))
    assert kernel_launches['snell_mm'] == n0
    torch.testing.assert_close(fused_snell_matmul(x.double(), A.double(), B.double(), kern.double(), 0.8, backend='triton'),
                               snell_matmul(x.double(), A.double(), B.double(), kern, 0.8))


def test_bad_input():
    A, B, c, g = _factors(5)
    kern = SnellKernel('distance')
    with pytest.raises(ValueError, match='d_in'): fused_snell_matmul(torch.randn(3, D_IN + 1), A, B, kern, 0.5)
    with pytest.raises(ValueError, match='sparsity'): fused_snell_matmul(torch.randn(3, D_IN), A, B, kern, 1.0)
    with pytest.raises(ValueError, match='mode'): fused_snell_matmul(torch.randn(3, D_IN), A, B, kern, 0.5, mode='soft')
    with pytest.raises(TypeError, match='x must be a tensor'): fused_snell_matmul([1.0], A, B, kern, 0.5)
    bad = A.clone(); bad[0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'): fused_snell_matmul(torch.randn(3, D_IN), bad, B, kern, 0.5, backend='triton')
    with pytest.raises(ValueError, match='contiguous'): ks._snell_mm_triton(torch.randn(D_IN, 4).T, A, B, c, torch.zeros(()), 'dense')


# ---- SNELLA's mixed kernel M = K + α softmax_j(K/γ) + β --------------------------------------------------------------

def _mixed_kernel_module(alpha=0.8, beta=-0.02, gamma=0.004, learnable_coeffs=True):
    "A mixed kernel away from its init (α=1, β=0, γ=1): peaked softmax (γ ~ |K|/5) and a threshold shifted by β."
    kern = SnellKernel('mixed', learnable_coeffs=learnable_coeffs)
    with torch.no_grad(): kern.alpha.fill_(alpha); kern.beta.fill_(beta); kern.gamma.fill_(gamma)
    return kern


def test_mixed_rowstats_merged_matrix_and_threshold():
    A, B, c, _ = _factors(20, 8)
    abg = torch.tensor([0.8, -0.02, 0.004])
    n0 = kernel_launches['snell_rowstats']
    stats = ks._snell_rowstats_triton(A, B, c, abg)
    assert kernel_launches['snell_rowstats'] - n0 == 1 and stats.shape == (2, D_IN)
    Z = distance_kernel(A.double(), B.double(), c.double()) / 0.004
    _close(stats[0], Z.amax(1), 1e-5)
    _close(stats[0] + stats[1].log(), torch.logsumexp(Z, 1), 1e-5)
    M = ks._snell_dense_triton(A, B, c, mix=(stats, abg))       # the merged matrix the kernels see
    _close(M, mixed_kernel(A.double(), B.double(), c.double(), 0.8, -0.02, 0.004), 1e-6)
    n = M.numel()
    for s in (0.5, 0.9, (n - 1) / n):
        keep = n_keep(n, s)
        tau = ks._snell_threshold_triton(A, B, c, keep, mix=(stats, abg))
        assert tau == magnitude_threshold(M, s) and int((M.abs() > tau).sum()) == keep


@pytest.mark.parametrize('mode,s,daz', [('official', 0.8, False), ('paper', 0.5, True), ('official', 0.0, False),
                                        ('official', 0.0, True)])
def test_mixed_public_autograd_vs_float64(mode, s, daz):
    A, B, _, g = _factors(21, 8)
    A.requires_grad_(); B.requires_grad_()
    kern = _mixed_kernel_module()
    x = torch.randn(3, 7, D_IN, generator=g, requires_grad=True)
    dy = torch.randn(3, 7, D_OUT, generator=g)
    params = (x, A, B, kern.coeffs, kern.alpha, kern.beta, kern.gamma)
    n0 = dict(kernel_launches)
    y = fused_snell_matmul(x, A, B, kern, s, mode, daz, backend='triton')
    got = (y, *torch.autograd.grad(y, params, dy))
    for op, cnt in (('snell_rowstats', 1), ('snell_bwd', 1), ('snell_bwd_softmax', 1), ('snell_mm', 2)):
        assert kernel_launches[op] - n0.get(op, 0) == cnt, op
    k64 = SnellKernel('mixed', learnable_coeffs=True).double()
    k64.load_state_dict(kern.state_dict())
    p64 = [t.detach().double().requires_grad_() for t in (x, A, B)] + [k64.coeffs, k64.alpha, k64.beta, k64.gamma]
    y64 = snell_matmul(*p64[:3], k64, s, mode, daz, checkpoint=False)
    want = (y64, *torch.autograd.grad(y64, p64, dy.double()))
    # the kernels keep exactly n_keep entries, the same ones as the float64 reference (so the comparison is exact-mask)
    mix = (ks._snell_rowstats_triton(A.detach(), B.detach(), kern.coeffs.detach(), torch.tensor([0.8, -0.02, 0.004])),
           torch.tensor([0.8, -0.02, 0.004]))
    M = ks._snell_dense_triton(A.detach(), B.detach(), kern.coeffs.detach(), mix=mix)
    M64 = mixed_kernel(*(t.detach() for t in p64[1:3]), *(t.detach() for t in p64[3:]))
    keep = n_keep(M.numel(), s)
    tau = ks._snell_threshold_triton(A.detach(), B.detach(), kern.coeffs.detach(), keep, mix=mix)
    assert int((M.abs() > tau).sum()) == keep
    assert torch.equal(M.abs() > tau, M64.abs() > magnitude_threshold(M64, s))
    for name, a, b in zip(('y', 'x', 'A', 'B', 'coeffs'), got, want): _close(a, b.detach(), 2e-5)
    for name, a, b in zip(('alpha', 'beta', 'gamma'), got[5:], want[5:]):   # float32 sums over all n entries
        assert abs(a.item() - b.item()) <= 1e-4 * abs(b.item()), (name, a.item(), b.item())


def test_mixed_frozen_scalars_and_no_x_grad():
    "Only A needs a gradient (x, B, α, β, γ frozen): the fused backward skips the rest and matches the reference."
    # r = 8 (k = 4 per piece): with k = 2 some seeds give a pair at distance ~3e-4, where float32's ‖a‖²+‖b‖²−2ab
    # loses digits (a limit of the distance kernel's tile form, not of the mixed kernel)
    A, B, c, g = _factors(22, 8)
    A.requires_grad_()
    kern = _mixed_kernel_module(learnable_coeffs=False).requires_grad_(False)
    x = torch.randn(T, D_IN, generator=g)
    y = fused_snell_matmul(x, A, B, kern, 0.7, backend='triton')
    (gA,) = torch.autograd.grad(y.square().sum(), (A,))
    Ad = A.detach().double().requires_grad_()
    y64 = snell_matmul(x.double(), Ad, B.double(), kern.double(), 0.7, checkpoint=False)
    (wA,) = torch.autograd.grad(y64.square().sum(), (Ad,))
    _close(y, y64.detach(), 1e-5)
    _close(gA, wA, 2e-5)


def test_mixed_bad_gamma():
    A, B, c, g = _factors(23)
    kern = _mixed_kernel_module(gamma=0.0)
    with pytest.raises(ValueError, match='NaN'):
        fused_snell_matmul(torch.randn(3, D_IN, generator=g), A, B, kern, 0.5, backend='triton')


def test_tuner_mixed_kernel_dispatches_to_triton(monkeypatch):
    "get_snell_model with kernel='mixed' and SNELLA_NB_KERNELS=triton runs the fused kernels and gives the reference."
    from torch import nn
    from snella_nb.snell.tuner import SnellConfig, get_snell_model
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, D_OUT), nn.GELU(), nn.Linear(D_OUT, 5))
    cfg = SnellConfig(r=8, kernel='mixed', sparsity=0.7, dense_at_zero=False, dropout=0.0, drop_path=0.0,
                      target_modules=['0'], modules_to_save=[], init_seed=3)
    model = get_snell_model(base, cfg)
    layer = next(l for _, l in model.snell_layers())
    with torch.no_grad(): layer.kernel.alpha.fill_(0.8); layer.kernel.beta.fill_(-0.02); layer.kernel.gamma.fill_(0.004)
    x = torch.randn(11, D_IN, generator=torch.Generator().manual_seed(9))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p is layer.kernel.gamma for p in trainable)
    outs = {}
    for backend in ('reference', 'triton'):
        monkeypatch.setenv(ENV_KERNELS, backend)
        n0 = kernel_launches['snell_rowstats']
        y = model(x)
        outs[backend] = (y, *torch.autograd.grad(y.square().sum(), trainable))
        assert kernel_launches['snell_rowstats'] - n0 == (backend == 'triton')
    for a, b in zip(outs['triton'], outs['reference']):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
