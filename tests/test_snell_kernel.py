"Tests for snella_nb.snell.kernel: kernels vs naive loops, init statistics, gradients, errors."
import math
import pytest
import torch
from snella_nb.snell.kernel import (init_factors, distance_kernel, linear_kernel, rbf_kernel, sigmoid_kernel,
                                    mixed_kernel, SnellKernel, KERNEL_NAMES)

f64 = torch.float64


def rows(P):
    "(H, d, k) -> (d, H*k): the r-vector of each row."
    return P.transpose(0, 1).reshape(P.shape[1], -1)


def naive(A, B, f):
    "K[i, j] = f(i, j) by explicit loops."
    return torch.tensor([[float(f(i, j)) for j in range(B.shape[1])] for i in range(A.shape[1])], dtype=A.dtype)


@pytest.fixture
def AB():
    g = torch.Generator().manual_seed(11)
    return torch.randn(3, 7, 2, generator=g, dtype=f64), torch.randn(3, 5, 2, generator=g, dtype=f64)


def test_init_factors_shapes_and_bound():
    A, B = init_factors(96, 160, r=16, H=2, generator=torch.Generator().manual_seed(0))
    assert A.shape == (2, 96, 8) and B.shape == (2, 160, 8) and A.dtype == torch.float32
    ba, bb = 1 / math.sqrt(96 * 8), 1 / math.sqrt(160 * 8)
    assert A.abs().max() <= ba and B.abs().max() <= bb
    assert A.abs().max() > 0.95 * ba and B.abs().max() > 0.95 * bb          # uniform fills the whole interval
    assert abs(A.var().item() - ba**2 / 3) < 0.1 * ba**2 / 3                 # U(±b) has variance b²/3
    assert abs(B.var().item() - bb**2 / 3) < 0.1 * bb**2 / 3
    assert abs(A.mean().item()) < 0.05 * ba


def test_init_factors_reproducible_and_dtype():
    a1, b1 = init_factors(10, 12, 4, generator=torch.Generator().manual_seed(3), dtype=f64)
    a2, b2 = init_factors(10, 12, 4, generator=torch.Generator().manual_seed(3), dtype=f64)
    assert a1.dtype == f64 and torch.equal(a1, a2) and torch.equal(b1, b2)
    a3, _ = init_factors(10, 12, 4, generator=torch.Generator().manual_seed(4), dtype=f64)
    assert not torch.equal(a1, a3)
    assert init_factors(10, 12, 6, H=3)[0].shape == (3, 10, 2)


@pytest.mark.parametrize('kw,exc,msg', [
    (dict(r=0), ValueError, 'multiple of H'), (dict(r=5), ValueError, 'multiple of H'),
    (dict(r=-2), ValueError, 'multiple of H'), (dict(r=4, H=0), ValueError, 'H'),
    (dict(r=4.0), TypeError, 'int'), (dict(r=4, d_in=0), ValueError, 'positive')])
def test_init_factors_errors(kw, exc, msg):
    args = dict(d_in=8, d_out=8, r=4, H=2) | kw
    with pytest.raises(exc, match=msg): init_factors(**args)


def test_distance_vs_naive_and_cdist(AB):
    A, B = AB
    c = torch.tensor([0.3, -0.2, 0.1], dtype=f64)
    K = distance_kernel(A, B, c)
    ref = naive(A, B, lambda i, j: sum(c[h] * torch.linalg.norm(A[h, i] - B[h, j]) for h in range(3)))
    torch.testing.assert_close(K, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(K, (c[:, None, None] * torch.cdist(A, B)).sum(0))
    torch.testing.assert_close(distance_kernel(A, B, [0.3, -0.2, 0.1]), K)   # coeffs as a list


def test_linear_is_lora(AB):
    A, B = AB
    K = linear_kernel(A, B)
    torch.testing.assert_close(K, rows(A) @ rows(B).T)
    torch.testing.assert_close(K, naive(A, B, lambda i, j: rows(A)[i] @ rows(B)[j]))
    A2, B2 = init_factors(40, 30, r=6, dtype=f64, generator=torch.Generator().manual_seed(1))
    assert torch.linalg.matrix_rank(linear_kernel(A2, B2)) == 6


def test_rbf_sigmoid_vs_naive(AB):
    A, B = AB
    a, b = rows(A), rows(B)
    al, be, ga = 0.8, 0.6, -0.3
    torch.testing.assert_close(rbf_kernel(A, B, al, be, ga),
                               naive(A, B, lambda i, j: al * torch.exp(-be * ((a[i] - b[j])**2).sum()) + ga))
    torch.testing.assert_close(sigmoid_kernel(A, B, al, be, ga),
                               naive(A, B, lambda i, j: al * torch.sigmoid(be * a[i] @ b[j]) + ga))


def test_mixed_vs_naive_and_softmax_rows(AB):
    A, B = AB
    c, al, be, ga = torch.tensor([0.1, -0.1, 0.1], dtype=f64), 1.7, 0.25, 0.5
    K = distance_kernel(A, B, c)
    M = mixed_kernel(A, B, c, al, be, ga)
    ref = naive(A, B, lambda i, j: K[i, j] + al * torch.exp(K[i, j] / ga) / torch.exp(K[i] / ga).sum() + be)
    torch.testing.assert_close(M, ref)
    torch.testing.assert_close((M - K - be).sum(1), torch.full((7,), al, dtype=f64))   # softmax over j sums to 1
    # a block of rows is self-contained (what the chunked path needs)
    torch.testing.assert_close(mixed_kernel(A[:, 2:5], B, c, al, be, ga), M[2:5])


@pytest.mark.parametrize('name', ['distance', 'mixed', 'rbf'])
def test_gradient_finite_at_zero_distance(name, AB):
    A, B = AB
    B = B.clone(); B[:, 3] = A[:, 1]            # row 1 of A == row 3 of B in every piece
    A, B = A.clone().requires_grad_(), B.requires_grad_()
    K = SnellKernel(name, H=3).double()(A, B)
    assert torch.isfinite(K).all()
    (K * torch.randn_like(K)).sum().backward()
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()


def test_distance_eps_changes_forward_little(AB):
    A, B = AB
    B = B.clone(); B[:, 0] = A[:, 0]
    K = distance_kernel(A, B, [1., 1., 1.])
    assert 0 < K[0, 0] <= 3 * 1e-6 + 1e-12


@pytest.mark.parametrize('name', KERNEL_NAMES)
def test_gradcheck_each_kernel(name):
    A, B = init_factors(5, 4, r=4, dtype=f64, generator=torch.Generator().manual_seed(2))
    kern = SnellKernel(name, learnable_coeffs=True).double()
    names = [n for n, _ in kern.named_parameters()]
    f = lambda A, B, *ps: torch.func.functional_call(kern, dict(zip(names, ps)), (A, B))
    inputs = (A.requires_grad_(), B.requires_grad_(), *[p.detach().clone().requires_grad_() for p in kern.parameters()])
    assert torch.autograd.gradcheck(f, inputs)


def test_snell_kernel_parameters_and_buffers():
    assert list(SnellKernel('distance').parameters()) == []
    assert [n for n, _ in SnellKernel('distance').named_buffers()] == ['coeffs']
    assert [n for n, _ in SnellKernel('distance', learnable_coeffs=True).named_parameters()] == ['coeffs']
    assert list(SnellKernel('linear').parameters()) == []
    m = SnellKernel('mixed')
    assert (m.alpha.item(), m.beta.item(), m.gamma.item()) == (1.0, 0.0, 1.0)
    assert sorted(n for n, _ in m.named_parameters()) == ['alpha', 'beta', 'gamma']
    assert all(p.requires_grad for p in SnellKernel('rbf').parameters())
    torch.testing.assert_close(SnellKernel('distance', H=3, coeff=0.5).coeffs, torch.tensor([0.5, -0.5, 0.5]))
    assert 'coeffs' in SnellKernel('distance').state_dict()


@pytest.mark.parametrize('name', KERNEL_NAMES)
def test_snell_kernel_matches_pure_function(name, AB):
    A, B = AB[0][:2], AB[1][:2]
    m = SnellKernel(name).double()
    c = m.coeffs if hasattr(m, 'coeffs') else None
    p = (m.alpha, m.beta, m.gamma) if hasattr(m, 'alpha') else ()
    ref = dict(distance=lambda: distance_kernel(A, B, c), linear=lambda: linear_kernel(A, B),
               rbf=lambda: rbf_kernel(A, B, *p), sigmoid=lambda: sigmoid_kernel(A, B, *p),
               mixed=lambda: mixed_kernel(A, B, c, *p))[name]()
    torch.testing.assert_close(m(A, B), ref)


def test_kernels_ignore_autocast():
    A, B = init_factors(32, 24, r=8, generator=torch.Generator().manual_seed(0))
    ref = SnellKernel()(A, B)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        K = SnellKernel()(A, B)
    assert K.dtype == torch.float32
    torch.testing.assert_close(K, ref)


def test_errors(AB):
    A, B = AB
    with pytest.raises(ValueError, match='unknown kernel'): SnellKernel('cosine')
    with pytest.raises(ValueError, match='H must be'): SnellKernel(H=0)
    with pytest.raises(ValueError, match='piece width'): SnellKernel(H=3).double()(A, B[..., :1])
    with pytest.raises(ValueError, match='number of pieces'): distance_kernel(A, B[:2], [1., 1., 1.])
    with pytest.raises(ValueError, match='built for H=2'): SnellKernel().double()(A, B)
    with pytest.raises(ValueError, match=r'\(H, d_in, k\)'): linear_kernel(A[0], B[0])
    with pytest.raises(ValueError, match='one entry per piece'): distance_kernel(A, B, [1., 1.])
    with pytest.raises(ValueError, match='dtype'): linear_kernel(A, B.float())
    with pytest.raises(TypeError, match='tensors'): linear_kernel(A.numpy(), B)


def test_full_rank_distance_vs_rank_r_linear():
    A, B = init_factors(64, 64, r=8, dtype=f64, generator=torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_rank(SnellKernel('distance').double()(A, B)) == 64
    assert torch.linalg.matrix_rank(SnellKernel('linear')(A, B)) == 8
