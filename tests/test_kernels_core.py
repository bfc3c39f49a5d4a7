"""Tests for snella_nb.kernels.core: Triton availability, interpreter mode, dispatch, and the example fused kernel.

The Triton kernel runs on CPU through Triton's interpreter, which must be switched on before triton is imported.
"""
import os
os.environ['TRITON_INTERPRET'] = '1'  # before anything imports triton
import subprocess, sys, textwrap

import pytest
import torch

import snella_nb.kernels.core as kc
from snella_nb.kernels.core import (ENV_KERNELS, kernel_backend, kernel_launches, interpreter_mode, is_interpreted,
                                    scaled_residual_add, triton_available)

SHAPES = [(3, 37), (1, 1), (5, 7, 129)]    # none a multiple of the interpreter's block (64)
# worst error relative to max|reference|: float32 rounds the product and the sum; bfloat16 rounds once, but the
# interpreter converts float32 -> bfloat16 by truncation (a whole unit in the last place)
TOL = {torch.float32: 2**-22, torch.bfloat16: 2**-7}


def _run(code: str, **env) -> subprocess.CompletedProcess:
    "Run `code` in a fresh interpreter with extra environment variables (None removes one)."
    e = {**os.environ}
    for k, v in env.items():
        if v is None: e.pop(k, None)
        else: e[k] = v
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=e, capture_output=True, text=True,
                          timeout=120)


def _launches(): return kernel_launches['scaled_residual_add']


def _alphas(C, dtype, gen):
    "The three kinds of alpha: a number, a 0-d learnable tensor, a per-channel learnable vector."
    return {'float': -0.75,
            'scalar': torch.randn((), generator=gen).to(dtype).requires_grad_(),
            'channel': torch.randn(C, generator=gen).to(dtype).requires_grad_()}


def _rel_err(u, v): return ((u.double() - v).abs().max() / v.abs().max().clamp_min(1)).item()


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(ENV_KERNELS, raising=False)


# --- availability, interpreter ------------------------------------------------------------------------------------

def test_import_without_triton():
    r = _run('''
        import sys
        sys.modules['triton'] = None            # makes `import triton` raise ImportError
        import torch, snella_nb, snella_nb.kernels.core as kc
        assert not kc.triton_available()
        x, y = torch.randn(3, 5), torch.randn(3, 5)
        assert kc.kernel_backend(x) == 'reference'
        assert torch.allclose(kc.scaled_residual_add(x, y, 0.5), x + 0.5 * y)
        try: kc.scaled_residual_add(x, y, 0.5, backend='triton')
        except RuntimeError as e: assert 'cannot be imported' in str(e) and "backend='reference'" in str(e); print('ok')
    ''')
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr


def test_module_import_does_not_import_triton():
    r = _run('import sys, snella_nb.kernels.core; assert "triton" not in sys.modules; print("ok")')
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr


def test_available_and_interpreter():
    assert triton_available() and interpreter_mode()


def test_interpreter_mode_reads_env(monkeypatch):
    for v, on in [('1', True), ('true', True), ('0', False), ('', False)]:
        monkeypatch.setenv('TRITON_INTERPRET', v)
        assert interpreter_mode() is on


def test_warns_when_triton_imported_before_interpreter():
    r = _run('''
        import warnings, triton                 # imported with the interpreter off
        import snella_nb.kernels.core as kc
        import os; os.environ['TRITON_INTERPRET'] = '1'
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            assert kc.interpreter_mode()
        assert any('before anything imports triton' in str(x.message) for x in w), [str(x.message) for x in w]
        print('ok')
    ''', TRITON_INTERPRET=None)
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr


def test_kernel_built_compiled_errors_on_cpu():
    r = _run('''
        import os, torch
        import snella_nb.kernels.core as kc
        kc._scaled_residual_add_kernel()        # built with the interpreter off: a compiled JITFunction
        os.environ['TRITON_INTERPRET'] = '1'    # too late for that kernel
        x = torch.randn(4)
        try: kc.scaled_residual_add(x, x, 1.0, backend='triton')
        except RuntimeError as e: assert 'Restart the process' in str(e), e; print('ok')
    ''', TRITON_INTERPRET=None)
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr


def test_interpreter_run_is_real():
    x, y = torch.randn(3, 37), torch.randn(3, 37)
    n0 = _launches()
    out = scaled_residual_add(x, y, 0.5, backend='triton')
    assert _launches() == n0 + 1                             # the launcher ran, no silent fallback
    assert is_interpreted(kc._scaled_residual_add_kernel())  # ... through Triton's interpreter
    torch.testing.assert_close(out, x + 0.5 * y)


# --- dispatch -----------------------------------------------------------------------------------------------------

def test_backend_choice(monkeypatch):
    x = torch.randn(3)
    assert kernel_backend(x) == 'reference'                    # auto on CPU never picks the interpreter
    assert kernel_backend(x, backend='triton') == 'triton'
    assert kernel_backend(backend='AUTO') == 'reference'       # no tensors, case-insensitive
    monkeypatch.setenv(ENV_KERNELS, 'triton')
    assert kernel_backend(x) == 'triton'
    assert kernel_backend(x, backend='reference') == 'reference'  # argument beats env var
    monkeypatch.setenv(ENV_KERNELS, 'reference')
    assert kernel_backend(x, backend='triton') == 'triton'


class _OnCuda(torch.Tensor):
    "A CPU tensor that reports a CUDA device: all kernel_backend looks at."
    @property
    def device(self): return torch.device('cuda', 0)


def test_auto_picks_triton_on_cuda_unless_env_forces_reference(monkeypatch):
    t = torch.randn(2).as_subclass(_OnCuda)
    assert kernel_backend(t, 1.0) == 'triton'
    assert kernel_backend(t, torch.randn(2)) == 'reference'          # not all on CUDA
    monkeypatch.setenv(ENV_KERNELS, 'reference')
    assert kernel_backend(t) == 'reference'
    monkeypatch.delenv(ENV_KERNELS)
    monkeypatch.setattr(kc, 'triton_available', lambda: False)
    assert kernel_backend(t) == 'reference'                          # auto falls back when Triton is missing


def test_env_reference_is_respected(monkeypatch):
    x, y = torch.randn(3, 37), torch.randn(3, 37)
    monkeypatch.setenv(ENV_KERNELS, 'reference')
    n0 = _launches()
    out = scaled_residual_add(x, y, 0.25)
    assert _launches() == n0
    torch.testing.assert_close(out, x + 0.25 * y)
    monkeypatch.setenv(ENV_KERNELS, 'triton')
    scaled_residual_add(x, y, 0.25)
    assert _launches() == n0 + 1


def test_backend_errors(monkeypatch):
    x = torch.randn(3)
    with pytest.raises(ValueError, match="'auto', 'reference', 'triton'"): kernel_backend(x, backend='cuda')
    monkeypatch.setenv(ENV_KERNELS, 'fast')
    with pytest.raises(ValueError, match=ENV_KERNELS): kernel_backend(x)
    monkeypatch.delenv(ENV_KERNELS)
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'): kernel_backend(x, backend='triton')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setattr(kc, 'triton_available', lambda: False)
    with pytest.raises(RuntimeError, match='cannot be imported'): kernel_backend(x, backend='triton')


# --- the kernel against float64 -----------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('kind', ['float', 'scalar', 'channel'])
def test_forward_backward_vs_float64(shape, dtype, kind):
    gen = torch.Generator().manual_seed(10 * sum(shape) + ['float', 'scalar', 'channel'].index(kind))
    x, y, g = (torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    alpha = _alphas(shape[-1], dtype, gen)[kind]
    n0 = _launches()
    out = scaled_residual_add(x, y, alpha, backend='triton')
    out.backward(g.detach())
    assert _launches() == n0 + 2                              # forward, and dy = alpha * g in backward
    assert out.dtype == dtype and out.shape == shape
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    a64 = alpha.detach().double().requires_grad_() if torch.is_tensor(alpha) else alpha
    ref = x64 + a64 * y64
    ref.backward(g.detach().double())
    tol = TOL[dtype] * 1.01
    assert _rel_err(out, ref) <= tol
    assert _rel_err(x.grad, x64.grad) == 0
    assert _rel_err(y.grad, y64.grad) <= tol
    if torch.is_tensor(alpha):
        assert alpha.grad.shape == alpha.shape and alpha.grad.dtype == dtype
        assert _rel_err(alpha.grad, a64.grad) <= 4 * TOL[dtype] + 1e-6   # a sum, rounded to alpha's dtype


@pytest.mark.parametrize('shape', SHAPES)
def test_reference_backend_matches_kernel(shape):
    gen = torch.Generator().manual_seed(7)
    x, y, a = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), torch.randn(shape[-1], generator=gen)
    torch.testing.assert_close(scaled_residual_add(x, y, a, backend='triton'),
                               scaled_residual_add(x, y, a, backend='reference'), rtol=1e-6, atol=1e-6)
    xh, yh = x.half(), y.half()     # float16: both round the float32 result once, to nearest
    torch.testing.assert_close(scaled_residual_add(xh, yh, a, backend='triton'),
                               scaled_residual_add(xh, yh, a, backend='reference'), rtol=0, atol=0)


def test_poisoned_output_fully_overwritten():
    gen = torch.Generator().manual_seed(11)
    for shape in SHAPES + [(130,)]:
        x, y = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        for alpha in [1.5, torch.tensor(-2.0), torch.randn(shape[-1], generator=gen)]:
            out = torch.full(shape, float('nan'))
            res = kc._scaled_residual_add_triton(x, y, alpha, out=out)
            assert res is out and not out.isnan().any()
            a64 = alpha.double() if torch.is_tensor(alpha) else alpha
            torch.testing.assert_close(out.double(), x.double() + a64 * y.double(), rtol=1e-6, atol=1e-6)
            out = torch.full(shape, float('nan'))
            kc._scaled_residual_add_triton(None, y, alpha, out=out)    # the backward form, alpha * y
            torch.testing.assert_close(out.double(), a64 * y.double(), rtol=1e-6, atol=1e-6)


def test_bad_out_buffer():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match='out must be a contiguous'):
        kc._scaled_residual_add_triton(x, x, 1.0, out=torch.empty(5, 3).t())


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 3, generator=gen).t().requires_grad_()          # (3, 37), non-contiguous
    y = torch.randn(3, 74, generator=gen)[:, ::2].requires_grad_()      # (3, 37), strided
    a = torch.randn(37, generator=gen).requires_grad_()
    assert not x.is_contiguous() and not y.is_contiguous()
    out = scaled_residual_add(x, y, a, backend='triton')
    out.sum().backward()
    torch.testing.assert_close(out, x.detach() + a.detach() * y.detach())
    torch.testing.assert_close(y.grad, a.detach().expand(3, 37))
    torch.testing.assert_close(a.grad, y.detach().sum(0))


def test_float64_and_one_element_alpha():
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(4, 6, dtype=torch.float64, generator=gen), torch.randn(4, 6, dtype=torch.float64, generator=gen)
    alpha = 1 / 3    # not representable in float32: the float64 path must keep it exact
    torch.testing.assert_close(scaled_residual_add(x, y, alpha, backend='triton'), x + alpha * y, rtol=1e-15, atol=1e-15)
    a = torch.tensor([[0.3]], dtype=torch.float64, requires_grad=True)  # 1 element, 2-d: must not broadcast x up
    for b in ['reference', 'triton']:
        a.grad = None
        out = scaled_residual_add(x[0], y[0], a, backend=b)
        assert out.shape == (6,)
        out.sum().backward()
        assert a.grad.shape == (1, 1)
        torch.testing.assert_close(a.grad.reshape(()), y[0].sum())


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    for a in [torch.randn((), dtype=torch.float64, generator=gen), torch.randn(5, dtype=torch.float64, generator=gen)]:
        args = (torch.randn(2, 5, dtype=torch.float64, generator=gen).requires_grad_(),
                torch.randn(2, 5, dtype=torch.float64, generator=gen).requires_grad_(), a.requires_grad_())
        assert torch.autograd.gradcheck(lambda *t: scaled_residual_add(*t, backend='triton'), args)


def test_empty_and_no_grad_alpha():
    e = torch.randn(0, 7)
    assert scaled_residual_add(e, e, 2.0, backend='triton').shape == (0, 7)
    x, y = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3)
    out = scaled_residual_add(x, y, torch.tensor(2.0), backend='triton')     # alpha without grad, y without grad
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 3))


# --- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('backend', ['reference', 'triton'])
def test_bad_input(backend):
    x, y = torch.randn(3, 37), torch.randn(3, 37)
    with pytest.raises(ValueError, match=r'x has shape \(3, 37\) but y has shape \(3, 36\)'):
        scaled_residual_add(x, y[:, :36], 1.0, backend=backend)
    with pytest.raises(ValueError, match='must be equal'):
        scaled_residual_add(x, torch.randn(37), 1.0, backend=backend)   # no implicit broadcasting
    with pytest.raises(TypeError, match='cast one of them'): scaled_residual_add(x, y.double(), 1.0, backend=backend)
    with pytest.raises(TypeError, match='floating-point'): scaled_residual_add(x.long(), y.long(), 1, backend=backend)
    with pytest.raises(TypeError, match='must be a torch.Tensor'): scaled_residual_add(x.numpy(), y, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r'per-channel vector of shape \(37,\)'):
        scaled_residual_add(x, y, torch.randn(3), backend=backend)
    with pytest.raises(ValueError, match='per-channel'): scaled_residual_add(x, y, torch.randn(1, 37), backend=backend)
    with pytest.raises(TypeError, match='alpha must be a number'): scaled_residual_add(x, y, True, backend=backend)
    with pytest.raises(TypeError, match='alpha must be a number'): scaled_residual_add(x, y, '0.5', backend=backend)
    with pytest.raises(TypeError, match='floating-point tensor'):
        scaled_residual_add(x, y, torch.tensor(2), backend=backend)
    with pytest.raises(ValueError, match='backend'): scaled_residual_add(x, y, 1.0, backend='gpu')


# --- GPU ----------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_compiled_kernel_on_cuda():
    # a fresh process without the interpreter, so the kernel is compiled
    r = _run('''
        import torch, snella_nb.kernels.core as kc
        torch.manual_seed(0)
        for dtype, tol in [(torch.float32, 2**-22), (torch.bfloat16, 2**-8)]:
            for shape in [(3, 37), (1, 1), (5, 7, 129), (1000, 4097)]:
                x, y, g = (torch.randn(shape, device='cuda', dtype=dtype, requires_grad=True) for _ in range(3))
                a = torch.randn(shape[-1], device='cuda', dtype=dtype, requires_grad=True)
                assert kc.kernel_backend(x, y, a) == 'triton'
                out = kc.scaled_residual_add(x, y, a)
                out.backward(g)
                x64, y64, a64 = (t.detach().double().requires_grad_() for t in (x, y, a))
                ref = x64 + a64 * y64
                ref.backward(g.double())
                err = lambda u, v: ((u.double() - v).abs().max() / v.abs().max().clamp_min(1)).item()
                assert err(out, ref) <= tol * 1.01 and err(y.grad, y64.grad) <= tol * 1.01, (dtype, shape)
                assert err(a.grad, a64.grad) <= 4 * tol, (dtype, shape)
        assert not kc.is_interpreted(kc._scaled_residual_add_kernel())
        print('ok', kc.kernel_launches['scaled_residual_add'])
    ''', TRITON_INTERPRET='0')
    assert r.returncode == 0 and 'ok' in r.stdout, r.stdout + r.stderr
