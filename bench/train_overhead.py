"""Overhead of snella_nb's Trainer against a minimal hand-written PyTorch loop (target: <= 1.05x time per step).

Both loops train the same model (a small timm ViT) on the same batches with AdamW + the same warm-up/cosine schedule,
in the same process, alternating repeats so that machine noise hits both alike. Both timed regions include building
the optimizer and schedule (the Trainer builds its own). Reports the median time per step.

    python bench/train_overhead.py            # full run
    python bench/train_overhead.py --quick    # smoke run
"""
import copy, time
import torch, timm
from torch import nn
from snella_nb.core import seed_everything
from snella_nb.benchmark import bench_argparser, markdown_table, write_results, median_time
from snella_nb.train import Trainer, TrainConfig, param_groups, make_scheduler


def build(seed, img_size, depth, n_batches, batch_size):
    seed_everything(seed)
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=img_size, patch_size=8,
                              num_classes=10, depth=depth)
    g = torch.Generator().manual_seed(seed)
    n = n_batches * batch_size
    ds = torch.utils.data.TensorDataset(torch.randn(n, 3, img_size, img_size, generator=g), torch.randint(0, 10, (n,), generator=g))
    return model, torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


def minimal_loop(model, batches, cfg, steps):
    "The baseline: build AdamW + schedule, then forward, loss, backward, step, scheduler step, zero_grad."
    def run():
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        sched = make_scheduler(opt, cfg, steps)
        model.train()
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward(); opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    return run


def trainer_loop(model, batches, cfg, steps):
    cfg = copy.deepcopy(cfg); cfg.max_steps = steps
    def run():
        Trainer(model, batches, config=cfg).fit()
    return run


def main():
    p = bench_argparser(__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=None)
    a = p.parse_args()
    steps = a.steps or (5 if a.quick else 20)
    repeats = a.repeats or (3 if a.quick else 7)
    img, depth, bs = (32, 2, 16) if a.quick else (64, 6, 32)
    cfg = TrainConfig(lr=1e-3, weight_decay=0.05, epochs=1, warmup_steps=2, progress=False, seed=a.seed)
    model, batches = build(a.seed, img, depth, steps, bs)
    runs = {'minimal loop': minimal_loop(copy.deepcopy(model), batches, cfg, steps),
            'snella_nb Trainer': trainer_loop(copy.deepcopy(model), batches, cfg, steps)}
    times = {k: [] for k in runs}
    for k, fn in runs.items(): fn()  # warm-up both
    for _ in range(repeats):  # alternate so drift hits both
        for k, fn in runs.items():
            t, _ = median_time(fn, repeats=1, warmup=0); times[k].append(t / steps)
    med = {k: sorted(v)[len(v)//2] for k, v in times.items()}
    base = med['minimal loop']
    rows = [dict(loop=k, ms_per_step=1e3*v, ratio=v/base) for k, v in med.items()]
    print(markdown_table(rows, floatfmt='.3f'))
    ratio = med['snella_nb Trainer'] / base
    print(f'\nTrainer / minimal loop = {ratio:.3f} (target <= 1.05): {"OK" if ratio <= 1.05 else "MISSED"}')
    path = write_results('train_overhead', rows, out_dir=a.out,
                         meta=dict(seed=a.seed, steps=steps, repeats=repeats, img_size=img, depth=depth, batch_size=bs,
                                   target_ratio=1.05, ratio=ratio, all_times_s_per_step=times))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
