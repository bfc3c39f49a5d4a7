"Smoke tests of the bench/ scripts: each runs with --quick in a subprocess and writes its JSON record."
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, out_dir, limit_s=90):
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *args, '--out', str(out_dir)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=4 * limit_s)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, f"{args[0]} failed (exit {p.returncode}):\n{p.stderr[-3000:]}"
    assert wall < limit_s, f"{args[0]} --quick took {wall:.0f} s, more than the {limit_s} s a smoke run may take"
    return p


def test_memory_quick(tmp_path):
    p = _run(['bench/memory.py', '--quick', '--configs', 'lora,snell'], tmp_path)
    rec = json.loads((tmp_path/'memory_quick.json').read_text())
    assert (tmp_path/'memory_quick.md').is_file()
    assert rec['machine']['cpu_count'] and rec['versions']['torch'] and rec['meta']['seed'] == 0
    raw = rec['meta']['raw']
    assert set(raw) == {'lora', 'snell'}
    for cfg, runs in raw.items():
        for r in runs:
            assert r['increment_mb'] > 0 and r['peak_mb'] >= r['base_mb'] > 0, (cfg, r)
            assert r['step_s'] > 0 and r['trainable_params'] < r['total_params']
    assert [row['config'] for row in rec['rows']] == ['LoRA-8', 'SNELL-8']
    assert any(r['ratio'] == 'SNELL-8 / LoRA-8' and r['verdict'] in ('OK', 'MISSED') for r in rec['meta']['ratios'])
    assert '| SNELL-8 |' in p.stdout


def test_memory_rejects_unknown_config(tmp_path):
    p = subprocess.run([sys.executable, 'bench/memory.py', '--quick', '--configs', 'lora,nope', '--out', str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and 'nope' in p.stderr


def test_train_overhead_quick(tmp_path):
    _run(['bench/train_overhead.py', '--quick'], tmp_path)
    rec = json.loads((tmp_path/'train_overhead.json').read_text())
    assert {r['loop'] for r in rec['rows']} == {'minimal loop', 'snella_nb Trainer'}
    assert all(r['ms_per_step'] > 0 for r in rec['rows'])


def test_transfer_quick_documented_command(tmp_path):
    "The README's `bench/transfer.py --quick`: every task x full/linear/LoRA x 2 seeds, table + files, within the issue's 5 minutes."
    p = _run(['bench/transfer.py', '--quick'], tmp_path, limit_s=300)
    rec = json.loads((tmp_path/'transfer_quick.json').read_text())
    runs = rec['meta']['runs']
    assert {(r['task'], r['method'], r['seed']) for r in runs} == {
        (t, m, s) for t in ('digits', 'photo_crops', 'dsprites_loc', 'dsprites_ori', 'counting', 'distance', 'topics')
        for m in ('full', 'linear', 'lora') for s in (0, 1)}
    assert all(0 <= r['test_acc'] <= 1 and r['budget']['steps'] == 12 for r in runs)
    assert '| task | group | n_seeds | full | linear | lora |' in p.stdout and '| mean |' in p.stdout
    assert {f.name for f in tmp_path.iterdir()} >= {'transfer_quick.json', 'transfer_quick.md', 'transfer_quick.png'}
