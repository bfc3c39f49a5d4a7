"Tests for the `snella-train` console script (snella_nb.cli): --help, one tiny run per method, ImageFolder, errors."
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from snella_nb.cli import build_parser, main, task_datasets, METHODS, TASKS
from snella_nb.data import load_state_dict_file, save_state_dict_file

os.environ.setdefault('HF_HUB_OFFLINE', '1')
TINY = ['--model', 'vit_tiny_patch16_224', '--img-size', '32', '--patch-size', '8', '--depth', '2']
SIZES = dict(n_train=200, n_val=50, n_test=50)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "The models are tiny: one thread is much faster than several on a busy machine."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(classes=10, seed=1):
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=classes)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    "A 'pretrained' tiny ViT checkpoint with 10 classes (a .safetensors file)."
    p = tmp_path_factory.mktemp('ckpt') / 'vit.safetensors'
    save_state_dict_file(tiny().state_dict(), p)
    return p


def run_cli(out, *extra):
    argv = [*TINY, *extra, '--out', str(out), '--no-progress', '--batch-size', '50']
    assert main(argv) == 0
    return json.loads((Path(out) / 'metrics.json').read_text())


def digits_test_set():
    _, _, te, _ = task_datasets('digits', SIZES['n_train'], SIZES['n_val'], SIZES['n_test'], img_size=32, seed=0)
    return map(torch.stack, zip(*[te[i] for i in range(len(te))]))


def check_reproduces(model, metrics):
    x, y = digits_test_set()
    model.eval()
    with torch.no_grad(): logits = model(x)
    assert float((logits.argmax(1) == y).float().mean()) == pytest.approx(metrics['test']['acc'], abs=1e-6)
    assert float(F.cross_entropy(logits, y)) == pytest.approx(metrics['test']['loss'], abs=1e-4)


# --- --help -----------------------------------------------------------------------------------------------------
def test_help_lists_every_option():
    exe = Path(sys.executable).with_name('snella-train')
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-c', 'import sys; from snella_nb.cli import main; sys.exit(main())']
    res = subprocess.run(cmd + ['--help'], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    opts = [a for a in build_parser()._actions if a.option_strings]
    for a in opts:
        assert a.option_strings[0] in res.stdout, a.option_strings[0]
        assert (a.help or '').strip(), f'{a.option_strings[0]} has no help'
    for o in ['--model', '--checkpoint', '--img-size', '--patch-size', '--depth', '--data', '--task', '--n-train',
              '--n-val', '--n-test', '--seed', '--method', '--r', '--kernel', '--sparsity', '--mode', '--epochs', '--lr',
              '--weight-decay', '--batch-size', '--warmup-frac', '--amp', '--ema-decay', '--grad-checkpointing',
              '--out', '--device', '--no-progress', '--overwrite']:
        assert o in res.stdout, o
    for t in TASKS: assert t in res.stdout
    for m in METHODS: assert m in res.stdout


# --- one tiny run per method ----------------------------------------------------------------------------------------
ADAPTER_FILES = dict(snell={'snell_config.json', 'adapter_model.safetensors'},
                     snella={'snell_config.json', 'adapter_model.safetensors'},
                     lora={'adapter_config.json', 'adapter_model.safetensors'},
                     full={'trainable.safetensors'}, linear={'trainable.safetensors'},
                     sparse={'trainable.safetensors', 'sparse_masks.safetensors'})


@pytest.mark.parametrize('method', METHODS)
def test_tiny_run(method, ckpt, tmp_path):
    out = tmp_path / 'run'
    m = run_cli(out, '--checkpoint', str(ckpt), '--task', 'digits', '--n-train', '200', '--n-val', '50', '--n-test', '50',
                '--method', method, '--epochs', '1', '--lr', '3e-3', '--sparsity', '0.8')
    assert {p.name for p in (out / 'adapter').iterdir()} >= ADAPTER_FILES[method]
    log = (out / 'train.log').read_text()
    assert 'trainable params:' in log and 'test: loss' in log and 'epoch 1/1' in log
    assert m['method'] == method and m['num_classes'] == 10 and len(m['epochs']) == 1
    assert m['data'] == dict(source='digits', n_train=200, n_val=50, n_test=50)
    assert m['checkpoint']['dropped_head'] == [] and m['checkpoint']['missing'] == []
    assert 0 <= m['test']['acc'] <= 1 and m['selected']['epoch'] == 0 and m['wall_time_s'] > 0
    assert 0 < m['trainable_params'] <= m['total_params']
    assert m['train_config']['lr'] == 3e-3 and m['args']['method'] == method

    base = tiny(seed=99)  # a different init: everything must come from the checkpoint + the adapter
    base.load_state_dict(load_state_dict_file(ckpt))
    if method in ('snell', 'snella'):
        from snella_nb.snell.tuner import SnellModel
        check_reproduces(SnellModel.from_pretrained(base, out / 'adapter'), m)
        if method == 'snella':
            s = m['snell_sparsity']
            assert len(s) == 12 and all(0 <= v < 1 for v in s.values())
            saved = json.loads((out / 'adapter' / 'snell_config.json').read_text())
            assert saved['kernel'] == 'mixed' and saved['dense_at_zero'] is False
    elif method == 'lora':
        cfg = json.loads((out / 'adapter' / 'adapter_config.json').read_text())
        assert cfg['r'] == 8
    else:
        sd = load_state_dict_file(out / 'adapter' / 'trainable.safetensors')
        if method == 'linear': assert set(sd) == {'head.weight', 'head.bias'}
        if method == 'full': assert set(base.state_dict()) <= set(sd)
        if method == 'sparse':  # planted truth: only located entries of the target matrices moved
            masks = load_state_dict_file(out / 'adapter' / 'sparse_masks.safetensors')
            assert len(masks) == 8
            ref = base.state_dict()
            for k, mk in masks.items():
                moved = sd[k] != ref[k]
                assert not (moved & ~mk.bool()).any(), k
                assert int(mk.sum()) == mk.numel() - int(0.8 * mk.numel() + 0.5)
        res = base.load_state_dict(sd, strict=False)
        assert res.unexpected_keys == []
        check_reproduces(base, m)


# --- ImageFolder with a local .pth checkpoint -----------------------------------------------------------------------
def write_folder(root, per_split=dict(train=4, val=2, test=2), classes=('cat', 'dog'), seed=0):
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for ci, c in enumerate(classes):
            d = root / split / c; d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8); a[..., ci] += 150  # class = dominant channel
                Image.fromarray(a).save(d / f'{i}.png')


def test_image_folder_run(tmp_path):
    write_folder(tmp_path / 'data')
    ck = tmp_path / 'vit.pth'
    torch.save({'state_dict': tiny().state_dict()}, ck)   # nested, as many training scripts save it
    m = run_cli(tmp_path / 'run', '--checkpoint', str(ck), '--data', str(tmp_path / 'data'), '--method', 'linear',
                '--epochs', '2', '--lr', '1e-2')
    assert m['classes'] == ['cat', 'dog'] and m['num_classes'] == 2
    assert m['data']['n_train'] == 8 and m['data']['n_val'] == 4 and m['data']['n_test'] == 4
    assert sorted(m['checkpoint']['dropped_head']) == ['head.bias', 'head.weight']
    assert len(m['epochs']) == 2 and m['test'] is not None
    assert (tmp_path / 'run' / 'adapter' / 'trainable.safetensors').is_file()


# --- errors --------------------------------------------------------------------------------------------------------
def fails(capsys, *argv):
    with pytest.raises(SystemExit) as e: main([*TINY, *argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_missing_checkpoint(tmp_path, capsys):
    err = fails(capsys, '--checkpoint', str(tmp_path / 'nope.safetensors'), '--task', 'digits', '--method', 'snell',
                '--out', str(tmp_path / 'run'))
    assert 'nope.safetensors does not exist' in err
    assert not (tmp_path / 'run').exists()          # nothing written for a bad command line


def test_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / 'bad.safetensors').write_bytes(b'\x01' * 64)
    err = fails(capsys, '--checkpoint', str(tmp_path / 'bad.safetensors'), '--task', 'digits', '--method', 'linear',
                '--n-train', '20', '--n-val', '10', '--n-test', '0', '--out', str(tmp_path / 'run'), '--no-progress')
    assert 'bad.safetensors' in err and 'truncated' in err
    assert 'truncated' in (tmp_path / 'run' / 'train.log').read_text()


def test_unknown_task_and_method(tmp_path, capsys):
    err = fails(capsys, '--task', 'mnist', '--method', 'snell', '--out', str(tmp_path / 'r'))
    assert "invalid choice: 'mnist'" in err
    err = fails(capsys, '--task', 'digits', '--method', 'dora', '--out', str(tmp_path / 'r'))
    assert "invalid choice: 'dora'" in err


def test_bad_values(tmp_path, capsys):
    base = ['--task', 'digits', '--out', str(tmp_path / 'r')]
    assert '--sparsity must be in [0, 1)' in fails(capsys, *base, '--method', 'snella', '--sparsity', '1.2')
    assert 'does not exist' in fails(capsys, '--data', str(tmp_path / 'nodata'), '--method', 'full', '--out', str(tmp_path / 'r'))
    (tmp_path / 'd' / 'train').mkdir(parents=True)
    assert "no 'val' sub-folder" in fails(capsys, '--data', str(tmp_path / 'd'), '--method', 'full', '--out', str(tmp_path / 'r'))
    assert 'must be even' in fails(capsys, *base, '--method', 'snell', '--r', '3')
    assert not (tmp_path / 'r').exists()


def test_non_empty_out_and_overwrite(tmp_path, capsys):
    out = tmp_path / 'run'; out.mkdir()
    (out / 'metrics.json').write_text('{"old": 1}'); (out / 'notes.txt').write_text('keep me')
    argv = ['--task', 'digits', '--n-train', '100', '--n-val', '50', '--n-test', '0', '--method', 'linear',
            '--epochs', '1', '--out', str(out), '--no-progress']
    err = fails(capsys, *argv)
    assert 'is not empty' in err and '--overwrite' in err
    assert json.loads((out / 'metrics.json').read_text()) == {'old': 1}      # nothing already saved is lost
    assert main([*TINY, *argv, '--overwrite']) == 0
    m = json.loads((out / 'metrics.json').read_text())
    assert m['method'] == 'linear' and m['test'] is None
    assert (out / 'notes.txt').read_text() == 'keep me'
    assert not [p for p in out.iterdir() if p.name.startswith('.')]         # no temporary leftovers
