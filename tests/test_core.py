"Tests for snella_nb.core: seeding, devices, parameter counts and peak-memory measurement."
import contextlib, io, json, random, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import snella_nb.core as core
from snella_nb.core import (seed_everything, get_device, count_parameters, print_trainable_parameters,
                            MemoryProbe, measure_peak_memory)

MB = 2**20


def test_public_api():
    assert core.__all__ == ['seed_everything', 'get_device', 'count_parameters', 'print_trainable_parameters',
                            'MemoryProbe', 'measure_peak_memory']


# --- seeding ---------------------------------------------------------------------------------------------------
def _draws(): return torch.randn(6), np.random.rand(6), random.random()

def test_seed_everything_reproduces_all_generators():
    seed_everything(42); a = _draws()
    seed_everything(42); b = _draws()
    seed_everything(43); c = _draws()
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0]) and not np.array_equal(a[1], c[1]) and a[2] != c[2]
    torch.manual_seed(42)
    assert torch.equal(torch.randn(6), a[0])  # the same stream as torch's own seeding

def test_seed_everything_deterministic(monkeypatch):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os; assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = was[1:]

@pytest.mark.parametrize('bad, exc', [(1.5, TypeError), (True, TypeError), ('3', TypeError), (-1, ValueError), (2**32, ValueError)])
def test_seed_everything_bad_input(bad, exc):
    with pytest.raises(exc, match='seed must'): seed_everything(bad)


# --- devices ---------------------------------------------------------------------------------------------------
def test_get_device_precedence(monkeypatch):
    monkeypatch.delenv('SNELLA_NB_DEVICE', raising=False)
    assert get_device() == torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    assert get_device('cpu') == torch.device('cpu')
    assert get_device(torch.device('cpu')) == torch.device('cpu')
    monkeypatch.setenv('SNELLA_NB_DEVICE', 'meta')
    assert get_device() == torch.device('meta')          # the environment beats auto-detection
    assert get_device('cpu') == torch.device('cpu')      # an explicit argument beats the environment
    monkeypatch.setenv('SNELLA_NB_DEVICE', '  cpu ')
    assert get_device() == torch.device('cpu')

def test_get_device_bad_input(monkeypatch):
    monkeypatch.setenv('SNELLA_NB_DEVICE', 'gpu0')
    with pytest.raises(ValueError, match='environment variable SNELLA_NB_DEVICE'): get_device()
    with pytest.raises(ValueError, match="the device argument gave device 'tpu'"): get_device('tpu')
    with pytest.raises(TypeError, match='device must be a str'): get_device(0)

@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on CPU-only machines')
def test_get_device_cuda_absent():
    with pytest.raises(RuntimeError, match='torch.cuda.is_available'): get_device('cuda')


# --- parameter counts ------------------------------------------------------------------------------------------
def test_count_parameters_closed_form():
    m = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 3))
    m[1].requires_grad_(False)
    assert count_parameters(m) == (10*5 + 5, 10*5 + 5 + 5*3 + 3)
    assert count_parameters(nn.ReLU()) == (0, 0)

def test_count_parameters_ignores_buffers_and_counts_tied_once():
    tied = nn.Linear(4, 4)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), tied, tied)
    assert count_parameters(m) == (16 + 8 + 20, 16 + 8 + 20)

def test_count_parameters_bad_input():
    with pytest.raises(TypeError, match='needs a torch.nn.Module'): count_parameters([nn.Parameter(torch.ones(2))])

def _printed(f, *args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): f(*args)
    return buf.getvalue()

def test_print_trainable_parameters_format():
    m = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 3))
    m[1].requires_grad_(False)
    assert _printed(print_trainable_parameters, m) == "trainable params: 55 || all params: 73 || trainable%: 75.3425\n"
    assert _printed(print_trainable_parameters, nn.ReLU()) == "trainable params: 0 || all params: 0 || trainable%: 0.0000\n"

def test_print_trainable_parameters_matches_peft():
    peft = pytest.importorskip('peft')
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 10)
        def forward(self, x): return self.fc2(self.act(self.fc1(x)))
    seed_everything(0)
    model = peft.get_peft_model(MLP(), peft.LoraConfig(r=8, target_modules=['fc1', 'fc2']))
    theirs = _printed(model.print_trainable_parameters)
    assert _printed(print_trainable_parameters, model) == theirs
    assert theirs == "trainable params: 8,784 || all params: 47,194 || trainable%: 18.6125\n"
    assert count_parameters(model) == model.get_nb_trainable_parameters()


# --- MemoryProbe (in this process) -----------------------------------------------------------------------------
def test_memory_probe_in_process():
    probe = MemoryProbe('cpu')
    probe.mark()
    x = torch.ones(100 * MB // 4)
    r = probe.report(); del x
    assert set(r) == {'peak_mb', 'base_mb', 'increment_mb', 'device', 'method'}
    assert r['method'] == 'proc_clear_refs' and r['device'] == 'cpu'
    assert 90 < r['increment_mb'] < 130, r
    assert abs(r['peak_mb'] - r['base_mb'] - r['increment_mb']) < 0.02

def test_memory_probe_fallbacks(monkeypatch, tmp_path):
    monkeypatch.setattr(core, '_CLEAR_REFS', str(tmp_path/'clear_refs'))
    p = MemoryProbe('cpu'); p.mark(); r = p.report()
    assert r['method'] == 'vmhwm_no_reset' and r['peak_mb'] >= r['base_mb'] > 0
    monkeypatch.setattr(core, '_PROC_STATUS', str(tmp_path/'status'))
    p = MemoryProbe('cpu'); p.mark(); r = p.report()
    assert r['method'] == 'ru_maxrss' and r['peak_mb'] >= r['base_mb'] > 0

def test_memory_probe_bad_use():
    with pytest.raises(RuntimeError, match='before mark'): MemoryProbe('cpu').report()
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"): MemoryProbe('meta')

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_memory_probe_cuda():
    p = MemoryProbe('cuda'); p.mark()
    y = torch.ones(50 * MB // 4, device='cuda')
    r = p.report(); del y
    assert r['method'] == 'cuda_max_memory_allocated' and 49 <= r['increment_mb'] <= 55, r


# --- measure_peak_memory (fresh subprocesses) -------------------------------------------------------------------
def test_measure_peak_memory_ranks_allocations():
    small = measure_peak_memory('snella_nb.core:_touch_mb', dict(mb=20))
    big = measure_peak_memory('snella_nb.core:_touch_mb', dict(mb=200))
    assert small['increment_mb'] < big['increment_mb'], (small, big)
    assert 150 <= big['increment_mb'] <= 300, big
    assert 10 <= small['increment_mb'] <= 60, small
    assert big['peak_mb'] > small['peak_mb'] and abs(big['base_mb'] - small['base_mb']) < 50
    assert big['allocated_mb'] == 200.0 and big['method'] == 'proc_clear_refs' and big['device'] == 'cpu'

TARGET = '''
import torch
from torch import nn
def train(probe, steps=3, width=128):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, width), torch.randint(0, 10, (32,))
    print("no newline", end="")
    probe.mark()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    return dict(loss=loss.item(), steps=steps)
def no_mark(probe): return None
def crash(probe): probe.mark(); raise ValueError("boom from the child")
def reserved(probe): probe.mark(); return dict(peak_mb=0)
def bad_return(probe): probe.mark(); return [1, 2]
not_a_function = 3
'''

@pytest.fixture
def target_file(tmp_path):
    f = tmp_path/'train_tiny.py'
    f.write_text(textwrap.dedent(TARGET))
    return f

def test_measure_peak_memory_file_target(target_file):
    r = measure_peak_memory(f'{target_file}:train', dict(steps=2))
    assert r['steps'] == 2 and r['loss'] > 0 and r['increment_mb'] >= 0
    assert {'peak_mb', 'base_mb', 'increment_mb', 'device', 'method'} <= set(r)
    json.dumps(r)

@pytest.mark.parametrize('fn, msg', [('nope', "has no function 'nope'"), ('no_mark', 'without calling probe.mark'),
                                     ('crash', 'boom from the child'), ('reserved', 'reserved keys')])
def test_measure_peak_memory_child_errors(target_file, fn, msg):
    with pytest.raises(RuntimeError, match='child process') as e: measure_peak_memory(f'{target_file}:{fn}')
    assert msg in str(e.value)

def test_memory_child_in_process(target_file, capsys, monkeypatch):
    "The child's entry point, run here: one tagged JSON line that round-trips, and clear errors."
    monkeypatch.setattr(sys, 'path', list(sys.path))
    try:
        r = core._memory_child([f'{target_file}:train', json.dumps(dict(steps=1)), 'cpu'])
        lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(core._RESULT_TAG)]
        assert len(lines) == 1 and json.loads(lines[0][len(core._RESULT_TAG):]) == r and r['steps'] == 1
        with pytest.raises(TypeError, match='return a dict or None'): core._memory_child([f'{target_file}:bad_return', '{}', 'cpu'])
        with pytest.raises(TypeError, match='not a function'): core._memory_child([f'{target_file}:not_a_function', '{}', 'cpu'])
        with pytest.raises(FileNotFoundError, match='does not exist'): core._memory_child([f'{target_file}x.py:train', '{}', 'cpu'])
    finally: sys.modules.pop('_snella_nb_target_train_tiny', None)

@pytest.mark.parametrize('target, exc, msg', [
    ('snella_nb.core', ValueError, 'must look like'),
    ('snella_nb.core:2fast', ValueError, 'must look like'),
    (':train', ValueError, 'must look like'),
    ('some/dir:train', ValueError, 'neither a dotted module'),
    ('no_such_file_here.py:train', FileNotFoundError, 'does not exist'),
    ('snella_nb.no_such:f', ModuleNotFoundError, "cannot find module 'snella_nb.no_such'"),
    ('snella_nb.core.seed_everything:f', ModuleNotFoundError, 'cannot find module'),  # not a module
    (42, TypeError, 'target must be a str'),
])
def test_measure_peak_memory_bad_target(target, exc, msg):
    with pytest.raises(exc) as e: measure_peak_memory(target)
    assert msg in str(e.value)

def test_measure_peak_memory_bad_arguments():
    with pytest.raises(TypeError, match='as JSON'): measure_peak_memory('snella_nb.core:_touch_mb', dict(mb=torch.ones(1)))
    with pytest.raises(TypeError, match='kwargs must be a dict'): measure_peak_memory('snella_nb.core:_touch_mb', [1])
    with pytest.raises(ValueError, match='timeout'): measure_peak_memory('snella_nb.core:_touch_mb', timeout=0)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"): measure_peak_memory('snella_nb.core:_touch_mb', device='meta')

def test_measure_peak_memory_timeout(tmp_path):
    f = tmp_path/'slow.py'
    f.write_text('import time\ndef run(probe): probe.mark(); time.sleep(60)\n')
    with pytest.raises(TimeoutError, match='timeout'): measure_peak_memory(f'{f}:run', timeout=3)

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_measure_peak_memory_cuda():
    r = measure_peak_memory('snella_nb.core:_touch_mb', dict(mb=200), device='cuda')
    assert r['method'] == 'cuda_max_memory_allocated' and 199 <= r['increment_mb'] <= 210 and r['base_mb'] < 1, r
