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
from snella_nb.snell.kernel import SnellKernel, distance_kernel, init_factors
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
    n0 = kernel_launches['snell_hist']
    for s in (0.5, 0.9, (n - 1) / n):
        keep = n_keep(n, s)
        tau = ks._snell_threshold_triton(A, B, c, keep)
        assert tau == torch.kthvalue(K.abs().flatten(), n - keep).values
        assert tau == magnitude_threshold(K, s)
        assert int((K.abs() > tau).sum()) == keep
    assert kernel_launches['snell_hist'] - n0 == 12              # 4 radix passes each: the interpreter ran the kernel
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
    dA, dB, dc = ks._snell_bwd_triton(x, dy, A, B, c, tau, mode, need_coeffs=True)
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
        ym = fused_snell_matmul(x, A, B, SnellKernel('mixed'), 0.8, backend='triton')
    torch.testing.assert_close(ym, snell_matmul(x, A, B, SnellKernel('mixed'), 0.8))
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
