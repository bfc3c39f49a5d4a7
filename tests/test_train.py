"""Tests for snella_nb.train: config checks, parameter groups, schedule, EMA, accumulation, callbacks, resume, DDP."""
import math, os, socket, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from snella_nb.train import TrainConfig, param_groups, warmup_cosine_lambda, make_scheduler, Callback, Trainer

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "The models here are tiny: one intra-op thread is ~10x faster than several on a busy machine."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blobs(n=256, d=8, k=4, sep=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * sep
    y = torch.randint(0, k, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, d, generator=g), y)


def mlp(seed=0, p=0.0, d=8, k=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Dropout(p), nn.Linear(32, k))


def cfg(**kw):
    kw.setdefault('progress', False)
    return TrainConfig(**kw)


def weights(m):
    return [p.detach().clone() for p in m.parameters()]


class Record(Callback):
    def __init__(self):
        self.calls, self.losses = {}, []
    def _hit(self, k):
        self.calls[k] = self.calls.get(k, 0) + 1
    def before_fit(self, t): self._hit('before_fit')
    def before_step(self, t): self._hit('before_step')
    def after_backward(self, t):
        self._hit('after_backward')
        assert all(p.grad is not None for p in t.model.parameters())
    def after_step(self, t):
        self._hit('after_step'); self.losses.append(t.last_loss)
        assert all(p.grad is not None for p in t.model.parameters())  # grads are kept for after_step
    def after_eval(self, t): self._hit('after_eval')
    def after_epoch(self, t): self._hit('after_epoch')
    def after_fit(self, t): self._hit('after_fit')
    def state_dict(self): return dict(calls=dict(self.calls), losses=list(self.losses))
    def load_state_dict(self, d): self.calls, self.losses = dict(d['calls']), list(d['losses'])


# ---------------------------------------------------------------- config and bad input
@pytest.mark.parametrize('kw, msg', [
    (dict(lr=0), 'lr must be > 0'), (dict(lr=-1.0), 'lr must be > 0'), (dict(lr=float('nan')), 'lr'),
    (dict(grad_accum=0), 'grad_accum'), (dict(grad_accum=2.5), 'grad_accum'),
    (dict(amp='fp8'), 'amp must be'), (dict(amp='float16'), 'amp must be'),
    (dict(ema_decay=0.0), 'ema_decay'), (dict(ema_decay=1.0), 'ema_decay'), (dict(ema_decay=-0.5), 'ema_decay'),
    (dict(epochs=0), 'epochs'), (dict(max_steps=0), 'max_steps'), (dict(warmup_frac=1.0), 'warmup_frac'),
    (dict(min_lr_ratio=1.5), 'min_lr_ratio'), (dict(clip_grad=0), 'clip_grad'), (dict(weight_decay=-1), 'weight_decay'),
    (dict(ckpt_every=3), 'ckpt_dir'), (dict(log_every=0), 'log_every'),
])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_trainer_rejects_bad_input(tmp_path):
    ds = blobs(16)
    with pytest.raises(ValueError, match='empty'):
        Trainer(mlp(), DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4), config=cfg())
    with pytest.raises(ValueError, match='empty'):  # drop_last with a batch larger than the data
        Trainer(mlp(), DataLoader(ds, batch_size=32, drop_last=True), config=cfg())
    with pytest.raises(ValueError, match="fp16"):
        Trainer(mlp(), DataLoader(ds, batch_size=4), config=cfg(amp='fp16'), device='cpu')
    with pytest.raises(TypeError, match='neither set_grad_checkpointing'):
        Trainer(mlp(), DataLoader(ds, batch_size=4), config=cfg(grad_checkpointing=True), device='cpu')
    with pytest.raises(TypeError, match='TrainConfig'):
        Trainer(mlp(), DataLoader(ds, batch_size=4), config=dict(lr=1e-3))
    with pytest.raises(TypeError, match='nn.Module'):
        Trainer(lambda x: x, DataLoader(ds, batch_size=4), config=cfg())
    with pytest.raises(TypeError, match='Callback'):
        Trainer(mlp(), DataLoader(ds, batch_size=4), config=cfg(), callbacks=[object()])
    with pytest.raises(TypeError, match='metrics'):
        Trainer(mlp(), DataLoader(ds, batch_size=4), config=cfg(), metrics='accuracy')
    with pytest.raises(ValueError, match='no trainable parameters'):
        Trainer(mlp().requires_grad_(False), DataLoader(ds, batch_size=4), config=cfg())
    with pytest.raises(ValueError, match='shorter than the run'):
        Trainer(mlp(), DataLoader(ds, batch_size=4), config=cfg(warmup_steps=4))  # 4 steps in all
    t = Trainer(mlp(), DataLoader(ds, batch_size=4), config=cfg(), device='cpu')
    with pytest.raises(ValueError, match='use_ema'):
        t.evaluate(DataLoader(ds, batch_size=4), use_ema=True)
    with pytest.raises(TypeError, match='batch_fn'):
        Trainer(mlp(), DataLoader(list(range(8)), batch_size=4), config=cfg(), device='cpu').fit()


def test_checkpoint_errors(tmp_path):
    ds = blobs(16)
    t = Trainer(mlp(), DataLoader(ds, batch_size=4), config=cfg(), device='cpu')
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        t.load_checkpoint(tmp_path / 'missing.pt')
    bad = tmp_path / 'bad.pt'; bad.write_bytes(b'not a checkpoint at all')
    with pytest.raises(ValueError, match='could not read'):
        t.load_checkpoint(bad)
    other = tmp_path / 'weights.pt'; torch.save(mlp().state_dict(), other)
    with pytest.raises(ValueError, match='not a snella_nb.train checkpoint'):
        t.load_checkpoint(other)
    good = t.save_checkpoint(tmp_path / 'sub' / 'ok.pt')
    trunc = tmp_path / 'trunc.pt'; trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match='could not read'):
        t.load_checkpoint(trunc)
    t_ema = Trainer(mlp(), DataLoader(ds, batch_size=4), config=cfg(ema_decay=0.9), device='cpu')
    with pytest.raises(ValueError, match='EMA'):
        t_ema.load_checkpoint(good)
    assert [p.name for p in good.parent.iterdir()] == ['ok.pt']  # atomic write leaves no temporary file


# ---------------------------------------------------------------- pieces
def test_param_groups():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 2)
            self.frozen = nn.Linear(4, 4).requires_grad_(False)
    m = M()
    groups = param_groups(m, 0.3, no_decay=('cls_token',))
    name = {id(p): n for n, p in m.named_parameters()}
    assert [name[id(p)] for p in groups[0]['params']] == ['conv.weight', 'head.weight']
    assert sorted(name[id(p)] for p in groups[1]['params']) == ['cls_token', 'conv.bias', 'head.bias', 'norm.bias', 'norm.weight']
    assert [g['weight_decay'] for g in groups] == [0.3, 0.0]
    assert len(param_groups(m, 0.3)[0]['params']) == 3  # without no_decay the 3-D cls_token is decayed
    only_bias = nn.Linear(3, 3); only_bias.weight.requires_grad_(False)
    assert [len(g['params']) for g in param_groups(only_bias, 0.1)] == [1] and param_groups(only_bias, 0.1)[0]['weight_decay'] == 0.0


def test_trainer_uses_model_no_weight_decay():
    class M(nn.Sequential):
        def no_weight_decay(self): return {'0.weight'}
    m = M(nn.Linear(8, 8), nn.Linear(8, 4))
    t = Trainer(m, DataLoader(blobs(16), batch_size=4), config=cfg(weight_decay=0.1), device='cpu')
    decayed = {id(p) for g in t.optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert decayed == {id(m[1].weight)}


@pytest.mark.parametrize('w, T, r', [(0, 50, 0.0), (5, 40, 0.1), (10, 11, 0.5)])
def test_schedule_closed_form(w, T, r):
    lr = 0.02
    opt = torch.optim.AdamW([nn.Parameter(torch.ones(2))], lr=lr)
    sched = make_scheduler(opt, cfg(lr=lr, warmup_steps=w, min_lr_ratio=r), T)
    got = []
    for _ in range(T + 3):
        got.append(opt.param_groups[0]['lr']); opt.step(); sched.step()
    for s in [0, max(w - 1, 0), w, (w + T) // 2, T - 1, T, T + 2]:
        want = (s + 1) / (w + 1) if s < w else r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / (T - w))))
        assert got[s] == pytest.approx(lr * want, rel=1e-12, abs=1e-15), s
    f = warmup_cosine_lambda(w, T, r)
    assert f(w) == 1.0 and f(10 * T) == pytest.approx(r)
    with pytest.raises(ValueError, match='shorter'):
        warmup_cosine_lambda(T, T)


def test_warmup_frac_used_when_steps_none():
    opt = torch.optim.AdamW([nn.Parameter(torch.ones(2))], lr=1.0)
    sched = make_scheduler(opt, cfg(warmup_frac=0.2), 50)  # 10 warm-up steps
    assert sched.lr_lambdas[0](9) == pytest.approx(10 / 11) and sched.lr_lambdas[0](10) == 1.0


# ---------------------------------------------------------------- the loop
def test_matches_naive_loop_bitwise():
    ds = blobs(128)
    ref = mlp()
    opt = torch.optim.AdamW(ref.parameters(), lr=5e-3, weight_decay=0.0)
    ref_losses = []
    for _ in range(2):
        for x, y in DataLoader(ds, batch_size=16):
            loss = F.cross_entropy(ref(x), y); loss.backward(); opt.step(); opt.zero_grad(); ref_losses.append(loss.item())
    rec = Record()
    t = Trainer(mlp(), DataLoader(ds, batch_size=16), config=cfg(lr=5e-3, weight_decay=0.0, epochs=2, min_lr_ratio=1.0),
                callbacks=[rec], device='cpu')
    t.fit()
    assert rec.losses == ref_losses
    for p, q in zip(weights(t.model), weights(ref)):
        assert torch.equal(p, q)


def test_learns_separable_task():
    tr, va = blobs(512, seed=1), TensorDataset(*blobs(768, seed=1)[512:])  # held-out points, same centres
    t = Trainer(mlp(p=0.1), DataLoader(tr, batch_size=32, shuffle=True), DataLoader(va, batch_size=128),
                config=cfg(lr=3e-3, epochs=3, warmup_frac=0.1, ema_decay=0.9, clip_grad=1.0, log_every=4), device='cpu')
    hist = t.fit()
    assert hist['val'][-1]['acc'] > 0.95 and hist['val'][-1]['ema_acc'] > 0.95
    assert hist['train'][-1]['loss'] < hist['train'][0]['loss'] / 3
    assert [r['step'] for r in hist['val']] == [16, 32, 48]  # once per epoch
    assert set(t.evaluate(DataLoader(va, batch_size=64))) == {'loss', 'acc'}


def test_bf16_autocast_on_cpu():
    ds = blobs(256)
    t = Trainer(mlp(), DataLoader(ds, batch_size=32, shuffle=True), DataLoader(ds, batch_size=128),
                config=cfg(lr=3e-3, epochs=3, amp='bf16'), device='cpu')
    seen = {}
    def hook(m, i, o): seen['dtype'] = o.dtype
    t.model[0].register_forward_hook(hook)
    hist = t.fit()
    assert seen['dtype'] == torch.bfloat16 and hist['val'][-1]['acc'] > 0.9


def test_grad_accumulation_equals_big_batch():
    ds = blobs(64)
    def run(bs, ga):
        t = Trainer(mlp(), DataLoader(ds, batch_size=bs), config=cfg(lr=1e-2, max_steps=3, grad_accum=ga, warmup_steps=1,
                    clip_grad=0.5), device='cpu')
        t.fit(); return t
    big, acc = run(16, 1), run(4, 4)
    assert acc.step == big.step == 3
    for p, q in zip(weights(big.model), weights(acc.model)):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert acc.history['train'][-1]['loss'] == pytest.approx(big.history['train'][-1]['loss'], rel=1e-5)


def test_partial_accumulation_group():
    # 5 batches, grad_accum 2 -> groups of 2, 2, 1 micro-batches: 3 optimizer steps per epoch
    rec = Record()
    t = Trainer(mlp(), DataLoader(blobs(20), batch_size=4), config=cfg(epochs=2, grad_accum=2), callbacks=[rec], device='cpu')
    t.fit()
    assert t.steps_per_epoch == 3 and t.total_steps == 6 and rec.calls['after_step'] == 6


def test_ema_hand_computation():
    snaps = []
    class Snap(Callback):
        def after_step(self, t): snaps.append(weights(t.model))
    d = 0.8
    t = Trainer(mlp(), DataLoader(blobs(64), batch_size=16), config=cfg(max_steps=2, ema_decay=d), callbacks=[Snap()], device='cpu')
    t.fit()
    for e, w1, w2 in zip(weights(t.ema_model.module), *snaps):
        torch.testing.assert_close(e, d * w1 + (1 - d) * w2, atol=1e-7, rtol=0)
        assert not torch.equal(w1, w2)


def test_callback_counts_and_stop():
    rec = Record()
    ds = blobs(48)
    t = Trainer(mlp(), DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=16), config=cfg(epochs=2, eval_every=4),
                callbacks=[rec], device='cpu')
    t.fit()  # 6 steps/epoch, 12 steps: evals at 4, 8, 12
    assert rec.calls == dict(before_fit=1, before_step=12, after_backward=12, after_step=12, after_eval=3,
                             after_epoch=2, after_fit=1)
    assert [r['step'] for r in t.history['val']] == [4, 8, 12]

    class Stop(Callback):
        def after_step(self, t):
            if t.step == 3: t.should_stop = True
    rec2 = Record()
    t2 = Trainer(mlp(), DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=16), config=cfg(epochs=2),
                 callbacks=[rec2, Stop()], device='cpu')
    t2.fit()
    assert t2.step == 3 and rec2.calls['after_step'] == 3 and rec2.calls['after_eval'] == 1 and 'after_epoch' not in rec2.calls


def test_eval_does_not_change_training():
    ds = blobs(64)
    def run(every):
        t = Trainer(mlp(p=0.3), DataLoader(ds, batch_size=8, shuffle=True), DataLoader(ds, batch_size=32),
                    config=cfg(epochs=2, eval_every=every), device='cpu')
        t.fit(); return weights(t.model)
    for p, q in zip(run(1), run(None)):
        assert torch.equal(p, q)


def test_custom_metrics_batch_and_forward_fns():
    ds = blobs(64)
    dict_loader = DataLoader([{'x': x, 'labels': y} for x, y in ds], batch_size=16)
    class KW(nn.Module):
        def __init__(self): super().__init__(); self.net = mlp()
        def forward(self, x): return (self.net(x),)  # tuple output: logits first
    mc = torchmetrics.MetricCollection({'top2': torchmetrics.classification.MulticlassAccuracy(4, top_k=2),
                                        'f1': torchmetrics.classification.MulticlassF1Score(4)})
    t = Trainer(KW(), dict_loader, dict_loader, config=cfg(epochs=1), metrics=mc, device='cpu')
    res = t.fit()['val'][-1]
    assert {'loss', 'top2', 'f1'} <= set(res)
    # explicit batch_fn / forward_fn, and metrics={} (loss only)
    t2 = Trainer(mlp(), DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=16), config=cfg(), metrics={},
                 batch_fn=lambda b: (b[0] * 2, b[1]), forward_fn=lambda m, x: m(x / 2), device='cpu')
    assert set(t2.fit()['val'][-1]) == {'step', 'epoch', 'loss'}
    # regression: loss_fn + own metric
    reg = TensorDataset(torch.randn(32, 8), torch.randn(32, 4))
    t3 = Trainer(mlp(), DataLoader(reg, batch_size=8), DataLoader(reg, batch_size=8), config=cfg(), loss_fn=F.mse_loss,
                 metrics={'mse': torchmetrics.MeanSquaredError()}, device='cpu')
    r3 = t3.fit()['val'][-1]
    assert r3['mse'] == pytest.approx(r3['loss'], rel=1e-5)


def test_grad_checkpointing_switches():
    timm = pytest.importorskip('timm')
    def vit():
        torch.manual_seed(0)
        return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=16, patch_size=8, depth=2,
                                 embed_dim=32, num_heads=2, num_classes=3)
    ds = TensorDataset(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3)
    runs = []
    for gc in (False, True):
        t = Trainer(vit(), DataLoader(ds, batch_size=4), config=cfg(max_steps=2, grad_checkpointing=gc), device='cpu')
        t.fit(); runs.append(t)
        assert t.model.grad_checkpointing is gc
    assert runs[0].history['train'][-1]['loss'] == pytest.approx(runs[1].history['train'][-1]['loss'], rel=1e-5)
    # the 3-D pos_embed of timm's no_weight_decay() gets no decay
    nd = {id(p) for g in runs[0].optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(runs[0].model.pos_embed) in nd

    class HFLike(nn.Linear):  # Hugging Face's switch
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None): self.kw = gradient_checkpointing_kwargs
    m = HFLike(8, 4)
    Trainer(m, DataLoader(blobs(8), batch_size=4), config=cfg(grad_checkpointing=True), device='cpu')
    assert m.kw == {'use_reentrant': False}


# ---------------------------------------------------------------- checkpoints
def _resumable(seed, cbs, **kw):
    c = cfg(lr=3e-3, epochs=3, grad_accum=2, warmup_steps=2, clip_grad=0.5, ema_decay=0.9, log_every=1, amp='bf16', **kw)
    return Trainer(mlp(seed=seed, p=0.2), DataLoader(blobs(96), batch_size=16, shuffle=True), config=c, callbacks=cbs, device='cpu')


class SaveAt(Callback):
    def __init__(self, step, path): self.at, self.path = step, path
    def after_step(self, t):
        if t.step == self.at: t.save_checkpoint(self.path)


def test_resume_reproduces_next_loss_exactly(tmp_path):
    ck = tmp_path / 'ck.pt'
    ra = Record(); a = _resumable(0, [ra, SaveAt(4, ck)]); a.fit()  # 3 steps/epoch: step 4 is mid epoch 2
    rb = Record(); b = _resumable(1, [rb]).load_checkpoint(ck)
    assert (b.step, b.epoch, len(rb.losses)) == (4, 1, 4)
    b.fit()
    assert rb.losses[4] == ra.losses[4]   # the next step's loss, bitwise
    assert rb.losses == ra.losses and a.history == b.history
    for p, q in zip(weights(a.model) + weights(a.ema_model), weights(b.model) + weights(b.ema_model)):
        assert torch.equal(p, q)
    assert b.scheduler.last_epoch == a.scheduler.last_epoch == 9


def test_auto_checkpoint_and_resume_at_epoch_boundary(tmp_path):
    ra = Record(); a = _resumable(0, [ra], ckpt_dir=str(tmp_path / 'run'))
    a.fit()
    last = tmp_path / 'run' / 'last.pt'
    assert last.is_file() and torch.load(last, weights_only=True)['step'] == 9
    # stop after epoch 1 (ckpt at its end), resume in a new trainer, compare
    class StopAfterEpoch(Callback):
        def after_epoch(self, t): t.should_stop = True
    rc = Record(); c = _resumable(0, [rc, StopAfterEpoch()], ckpt_dir=str(tmp_path / 'run2'))
    c.fit()
    assert c.step == 3
    rd = Record(); d = _resumable(5, [rd], ckpt_dir=str(tmp_path / 'run2')).load_checkpoint(tmp_path / 'run2' / 'last.pt')
    assert (d.step, d.epoch) == (3, 1)
    d.fit()
    assert rd.losses == ra.losses
    for p, q in zip(weights(a.model), weights(d.model)):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- DDP (2 CPU processes, gloo)
def test_ddp_two_processes_match_one_process_double_batch(tmp_path):
    sys.path.insert(0, str(HERE))
    import ddp_worker as w
    b, steps = 8, 6
    out = tmp_path / 'ddp.pt'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join([str(HERE), os.environ.get('PYTHONPATH', '')])}
    env.pop('WORLD_SIZE', None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(HERE / 'ddp_worker.py'), str(out), str(b), str(steps)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got['world_size'] == 2
    ref = Trainer(w.make_model(), DataLoader(w.make_data(), batch_size=2 * b, shuffle=True), config=w.make_config(steps), device='cpu')
    ref.fit()
    ev = ref.evaluate(DataLoader(w.make_data(), batch_size=16))
    assert got['eval']['acc'] == pytest.approx(ev['acc']) and got['eval']['loss'] == pytest.approx(ev['loss'], rel=1e-5)
    assert [h['step'] for h in got['history']['train']] == list(range(1, steps + 1))
    for g, r_ in zip(got['history']['train'], ref.history['train']):
        assert g['loss'] == pytest.approx(r_['loss'], rel=1e-5, abs=1e-6) and g['lr'] == pytest.approx(r_['lr'])
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(got['params'][k], v, atol=1e-5, rtol=1e-5)
    for k, v in ref.ema_model.module.state_dict().items():
        torch.testing.assert_close(got['ema'][k], v, atol=1e-5, rtol=1e-5)
