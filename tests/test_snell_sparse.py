"Tests for snella_nb.snell.sparse: exact thresholds, blockwise radix select, sparsifiers, snell_matmul."
import math
import os
import warnings
import pytest
import torch
import torch.utils.checkpoint as cp
from snella_nb.snell.kernel import init_factors, SnellKernel, KERNEL_NAMES
from snella_nb.snell.sparse import (n_keep, kth_largest_abs, magnitude_threshold, blockwise_threshold, sparsify,
                                    snell_matmul)

f64 = torch.float64


def sort_threshold(K, s):
    "Reference τ by a full sort: the (n_keep+1)-th largest |K|, 0 when all are kept."
    v = K.abs().flatten().sort(descending=True).values
    k = n_keep(v.numel(), s)
    return v[k] if k < v.numel() else torch.zeros((), dtype=K.dtype)


def row_blocks(K, rows):
    return (lambda i: K[i * rows:(i + 1) * rows]), math.ceil(K.shape[0] / rows)


# ---------------------------------------------------------------- n_keep and exact thresholds
def test_n_keep():
    assert [n_keep(10, s) for s in (0, 0.04, 0.05, 0.5, 0.9, 0.96)] == [10, 10, 9, 5, 1, 0]
    assert n_keep(589824, 0.9) == 58982 and n_keep(0, 0.5) == 0
    for bad in (-0.01, 1.0, 1.5, float('nan')):
        with pytest.raises(ValueError, match=r'\[0, 1\)'): n_keep(10, bad)
    with pytest.raises(TypeError, match='number'): n_keep(10, 'high')
    with pytest.raises(ValueError, match='n must'): n_keep(-1, 0.5)


@pytest.mark.parametrize('seed', range(4))
def test_magnitude_threshold_equals_sort_and_keeps_exactly(seed):
    g = torch.Generator().manual_seed(seed)
    for shape, s in [((13, 7), 0.5), ((64, 33), 0.9), ((50, 50), 0.99), ((9, 9), 0.0), ((30, 20), 0.001)]:
        K = torch.randn(shape, generator=g)
        tau = magnitude_threshold(K, s)
        assert tau.item() == sort_threshold(K, s).item()
        assert int((K.abs() > tau).sum()) == n_keep(K.numel(), s)


def test_kth_largest_abs():
    K = torch.tensor([[-5., 1.], [3., -2.]])
    assert [kth_largest_abs(K, k).item() for k in (1, 2, 3, 4)] == [5., 3., 2., 1.]
    for bad in (0, 5, 1.0):
        with pytest.raises(ValueError, match='k must'): kth_largest_abs(K, bad)


# ---------------------------------------------------------------- blockwise radix select
@pytest.mark.parametrize('dtype', [torch.float32, f64, torch.float16, torch.bfloat16])
def test_blockwise_threshold_equals_kthvalue(dtype):
    g = torch.Generator().manual_seed(1)
    for s in (0.0, 0.2, 0.75, 0.9, 0.999):
        for rows in (1, 7, 64, 200):
            K = torch.randn(61, 43, generator=g).to(dtype)
            keep = n_keep(K.numel(), s)
            tau = blockwise_threshold(*row_blocks(K, rows), K.numel(), keep)
            assert tau.dtype == dtype
            assert tau.item() == magnitude_threshold(K, s).item()


def test_blockwise_threshold_ties_zeros_inf():
    g = torch.Generator().manual_seed(2)
    K = torch.randn(40, 30, generator=g).round(decimals=1)           # many exact ties
    K[0] = -0.0; K[1, :15] = 0.0; K[2, :3] = float('inf'); K[3, :3] = -float('inf')
    for keep in (0, 1, 5, 6, 7, 100, 599, 600, 601, 1199, 1200):
        v = K.abs().flatten()
        ref = torch.kthvalue(v, v.numel() - keep).values if keep < v.numel() else torch.tensor(0.)
        tau = blockwise_threshold(*row_blocks(K, 6), K.numel(), keep)
        assert tau.item() == ref.item(), keep
        assert int((K.abs() > tau).sum()) <= keep                     # ties can only lower the count
    # a block_fn returning |K| or K gives the same τ; -0.0 counts as 0
    assert blockwise_threshold(*row_blocks(K.abs(), 6), K.numel(), 700).item() == \
        blockwise_threshold(*row_blocks(K, 6), K.numel(), 700).item()


def test_blockwise_threshold_all_zero_and_single_block():
    K = torch.zeros(5, 5); K[2, 2] = -0.0
    assert blockwise_threshold(lambda i: K, 1, 25, 3).item() == 0.0
    K = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3))
    assert blockwise_threshold(lambda i: K, 1, 1000, 10).item() == magnitude_threshold(K, 0.99).item()


def test_blockwise_threshold_errors():
    K = torch.randn(10, 10)
    with pytest.raises(ValueError, match='n=99'): blockwise_threshold(*row_blocks(K, 3), 99, 10)
    with pytest.raises(ValueError, match='keep must'): blockwise_threshold(*row_blocks(K, 3), 100, 101)
    with pytest.raises(ValueError, match='n_blocks'): blockwise_threshold(lambda i: K, 0, 100, 10)
    with pytest.raises(TypeError, match='floating'): blockwise_threshold(lambda i: K.long(), 1, 100, 10)
    Kn = K.clone(); Kn[5, 5] = float('nan')
    with pytest.raises(ValueError, match='NaN in the merged matrix'): blockwise_threshold(*row_blocks(Kn, 3), 100, 10)


# ---------------------------------------------------------------- sparsify
@pytest.fixture
def K():
    return torch.randn(30, 20, dtype=f64, generator=torch.Generator().manual_seed(4)).requires_grad_()


def test_sparsify_official(K):
    S = sparsify(K, 0.75)
    M = K.abs() > sort_threshold(K.detach(), 0.75)
    assert int((S != 0).sum()) == n_keep(600, 0.75)
    torch.testing.assert_close(S, K.detach() * K.detach().abs() * M)
    G = torch.randn_like(K)
    (gK,) = torch.autograd.grad((S * G).sum(), K)
    torch.testing.assert_close(gK, G * K.detach().abs() * M)      # straight-through with magnitude


def test_sparsify_official_matches_quantile_recipe(K):
    tau = torch.quantile(K.detach().abs().flatten(), 0.75).item()
    ref = K * torch.nn.functional.threshold(K.detach().abs(), tau, 0.)
    torch.testing.assert_close(sparsify(K, 0.75), ref)


def test_sparsify_paper(K):
    tau = sort_threshold(K.detach(), 0.75)
    S = sparsify(K, 0.75, mode='paper')
    torch.testing.assert_close(S, K * (K.abs() - tau).clamp_min(0))
    assert int((S != 0).sum()) == n_keep(600, 0.75)
    # differentiable through |K| (τ detached): gradcheck with τ away from the kink
    v = K.detach().abs().flatten().sort(descending=True).values
    mid = (v[149] + v[150]) / 2
    assert torch.autograd.gradcheck(lambda K: sparsify(K, 0.75, 'paper', tau=mid), (K,))


def test_sparsify_dense_at_zero(K):
    assert sparsify(K, 0.0) is K
    for mode in ('official', 'paper'):
        torch.testing.assert_close(sparsify(K, 0.0, mode, dense_at_zero=False), K * K.abs())


def test_sparsify_explicit_tau(K):
    torch.testing.assert_close(sparsify(K, 0.5, tau=0.3), K * torch.where(K.abs() > 0.3, K.abs(), 0).detach())


def test_sparsify_errors(K):
    with pytest.raises(ValueError, match='NaN in the merged matrix: check learning rate / inputs'):
        sparsify(torch.tensor([[1., float('nan')], [2., 3.]]), 0.5)
    for bad in (-0.1, 1.0, float('nan')):
        with pytest.raises(ValueError, match=r'\[0, 1\)'): sparsify(K, bad)
    with pytest.raises(ValueError, match='mode must be'): sparsify(K, 0.5, mode='hard')


# ---------------------------------------------------------------- snell_matmul
def ref_matmul(x, A, B, kern, s, mode='official', daz=True):
    return x @ sparsify(kern(A, B), s, mode, daz)


@pytest.mark.parametrize('name', KERNEL_NAMES)
@pytest.mark.parametrize('mode,s,daz', [('official', 0.8, True), ('paper', 0.6, True), ('official', 0.0, True),
                                        ('paper', 0.0, False)])
def test_snell_matmul_variants_match_reference(name, mode, s, daz):
    g = torch.Generator().manual_seed(5)
    A0, B0 = init_factors(19, 13, r=4, dtype=f64, generator=g)
    x0, w = torch.randn(2, 3, 19, dtype=f64, generator=g), torch.randn(2, 3, 13, dtype=f64, generator=g)
    kern = SnellKernel(name, learnable_coeffs=True).double()
    results = []
    for kw in (None, dict(), dict(checkpoint=False), dict(chunk_rows=4), dict(chunk_rows=4, checkpoint=False),
               dict(chunk_rows=1), dict(chunk_rows=50)):
        A, B, x = A0.clone().requires_grad_(), B0.clone().requires_grad_(), x0.clone().requires_grad_()
        kern.zero_grad()
        y = ref_matmul(x, A, B, kern, s, mode, daz) if kw is None else snell_matmul(x, A, B, kern, s, mode, daz, **kw)
        (y * w).sum().backward()
        results.append([y, x.grad, A.grad, B.grad] + [p.grad for p in kern.parameters()])
    for r in results[1:]:
        for a, b in zip(results[0], r): torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_snell_matmul_float32_chunked_keeps_exact_count():
    A, B = init_factors(96, 80, r=8, generator=torch.Generator().manual_seed(6))
    x = torch.eye(96)                                     # x @ S = S
    for s in (0.5, 0.9, 0.97):
        S = snell_matmul(x, A, B, SnellKernel(), s, chunk_rows=10)
        assert int((S != 0).sum()) == n_keep(96 * 80, s)
        torch.testing.assert_close(S, snell_matmul(x, A, B, SnellKernel(), s), atol=1e-9, rtol=1e-5)


def test_non_reentrant_checkpoint_gives_factor_grads_without_input_grad():
    A, B = [t.requires_grad_() for t in init_factors(16, 12, r=4, generator=torch.Generator().manual_seed(7))]
    x = torch.randn(5, 16)
    assert not x.requires_grad
    for kw in (dict(), dict(chunk_rows=5)):
        A.grad = B.grad = None
        snell_matmul(x, A, B, SnellKernel(), 0.5, **kw).pow(2).sum().backward()
        assert A.grad is not None and A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0


def test_reentrant_checkpoint_loses_factor_grads():
    "The official code's bug, reproduced: reentrant checkpoint + input without grad -> no path to A, B."
    A, B = [torch.nn.Parameter(t) for t in init_factors(16, 12, r=4, generator=torch.Generator().manual_seed(7))]
    kern, x = SnellKernel(), torch.randn(5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        y = cp.checkpoint(lambda x: x @ sparsify(kern(A, B), 0.5), x, use_reentrant=True)
    assert not y.requires_grad and A.grad is None


def test_snell_matmul_no_grad_and_1d_input():
    A, B = init_factors(8, 6, r=4, generator=torch.Generator().manual_seed(8))
    x = torch.randn(8)
    with torch.no_grad():
        y = snell_matmul(x, A, B, SnellKernel(), 0.5, chunk_rows=3)
    assert y.shape == (6,)
    torch.testing.assert_close(y, x @ sparsify(SnellKernel()(A, B), 0.5))


def test_snell_matmul_casts_to_input_dtype():
    A, B = init_factors(8, 6, r=4, generator=torch.Generator().manual_seed(8))
    y = snell_matmul(torch.randn(3, 8, dtype=torch.bfloat16), A, B, SnellKernel(), 0.5)
    assert y.dtype == torch.bfloat16


def surrogate_grads(x, kern, A0, B0, s, mode, w):
    "Autograd grads of the surrogate (detached pieces frozen at A0, B0) after gradcheck against finite differences."
    with torch.no_grad():
        K0 = kern(A0, B0); mag = K0.abs(); v = mag.flatten().sort(descending=True).values
        keep = n_keep(K0.numel(), s)
        tau, tau_mid = v[keep], (v[keep - 1] + v[keep]) / 2
        W = torch.where(mag > tau, mag, torch.zeros((), dtype=mag.dtype))
    if mode == 'official':
        f = lambda A, B: x @ (kern(A, B) * W)
        g = f
    else:
        f = lambda A, B: x @ sparsify(kern(A, B), s, 'paper', tau=tau_mid)    # away from the relu kink
        g = lambda A, B: x @ sparsify(kern(A, B), s, 'paper', tau=tau)
    assert torch.autograd.gradcheck(f, (A0.clone().requires_grad_(), B0.clone().requires_grad_()))
    A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    return torch.autograd.grad((g(A, B) * w).sum(), (A, B))


@pytest.mark.parametrize('name', KERNEL_NAMES)
@pytest.mark.parametrize('mode', ['official', 'paper'])
def test_gradients_vs_finite_differences(name, mode):
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(3, 6, dtype=f64, generator=g), torch.randn(3, 5, dtype=f64, generator=g)
    A0, B0 = init_factors(6, 5, r=4, dtype=f64, generator=g)
    kern = SnellKernel(name).double()
    rA, rB = surrogate_grads(x, kern, A0, B0, 0.6, mode, w)
    for kw in (dict(), dict(chunk_rows=2)):
        A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
        gA, gB = torch.autograd.grad((snell_matmul(x, A, B, kern, 0.6, mode, **kw) * w).sum(), (A, B))
        torch.testing.assert_close(gA, rA, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(gB, rB, atol=1e-12, rtol=1e-9)


def test_closed_form_gradient_distance_official():
    g = torch.Generator().manual_seed(10)
    x, dY = torch.randn(4, 7, dtype=f64, generator=g), torch.randn(4, 6, dtype=f64, generator=g)
    A0, B0 = init_factors(7, 6, r=6, H=2, dtype=f64, generator=g)
    kern = SnellKernel('distance').double()
    A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    gA, gB = torch.autograd.grad((snell_matmul(x, A, B, kern, 0.7) * dY).sum(), (A, B))
    K = kern(A0, B0); M = (K.abs() > magnitude_threshold(K, 0.7)).double()
    Q = kern.coeffs[:, None, None] * ((x.T @ dY) * K.abs() * M) / torch.cdist(A0, B0)
    torch.testing.assert_close(gA, Q.sum(2, keepdim=True) * A0 - Q @ B0)
    torch.testing.assert_close(gB, Q.sum(1)[..., None] * B0 - Q.transpose(1, 2) @ A0)


def test_snell_matmul_errors():
    A, B = init_factors(8, 6, r=4)
    kern = SnellKernel()
    with pytest.raises(ValueError, match='d_in=8'): snell_matmul(torch.randn(2, 7), A, B, kern, 0.5)
    with pytest.raises(ValueError, match='piece width'): snell_matmul(torch.randn(2, 8), A, B[..., :1], kern, 0.5)
    with pytest.raises(ValueError, match=r'\[0, 1\)'): snell_matmul(torch.randn(2, 8), A, B, kern, 1.0)
    with pytest.raises(ValueError, match=r'\[0, 1\)'): snell_matmul(torch.randn(2, 8), A, B, kern, -0.5)
    with pytest.raises(ValueError, match='mode'): snell_matmul(torch.randn(2, 8), A, B, kern, 0.5, mode='x')
    with pytest.raises(ValueError, match='chunk_rows'): snell_matmul(torch.randn(2, 8), A, B, kern, 0.5, chunk_rows=0)
    with pytest.raises(TypeError, match='tensor'): snell_matmul([1.] * 8, A, B, kern, 0.5)
    for kw in (dict(), dict(chunk_rows=3), dict(checkpoint=False)):
        with pytest.raises(ValueError, match='NaN in the merged matrix'):
            snell_matmul(torch.randn(2, 8), A * float('nan'), B, kern, 0.5, **kw)


@pytest.mark.skipif(not os.environ.get('SNELLA_NB_SLOW'), reason='slow: set SNELLA_NB_SLOW=1 (2^24+1 elements)')
def test_threshold_beyond_2_pow_24():
    K = torch.randn(2**12 + 1, 2**12, generator=torch.Generator().manual_seed(0))
    assert K.numel() > 2**24
    tau = magnitude_threshold(K, 0.9)
    assert int((K.abs() > tau).sum()) == n_keep(K.numel(), 0.9)
    assert blockwise_threshold(*row_blocks(K, 512), K.numel(), n_keep(K.numel(), 0.9)).item() == tau.item()
