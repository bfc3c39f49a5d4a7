"""Launched by tests/test_train.py as `torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT BATCH STEPS`.

Trains a tiny MLP with `Trainer` under DDP (gloo on CPU); rank 0 saves the final weights and history to OUT.
`make_data`/`make_model`/`make_config` are shared with the single-process reference in the test.
"""
import os, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from snella_nb.train import Trainer, TrainConfig

def make_data(n=64, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 2
    y = torch.randint(0, k, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, d, generator=g), y)

def make_model(seed=0):  # no dropout: both runs must compute the same function
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

def make_config(steps):
    return TrainConfig(lr=1e-2, max_steps=steps, warmup_steps=1, weight_decay=0.05, clip_grad=1.0, ema_decay=0.5,
                       log_every=1, progress=False)

def main(out, batch, steps):
    model = make_model()
    loader = DataLoader(make_data(), batch_size=batch, shuffle=True)  # order is reproducible: seed + epoch
    tr = Trainer(model, loader, config=make_config(steps), device='cpu')
    assert tr.world_size == int(os.environ['WORLD_SIZE']) == 2, tr.world_size
    hist = tr.fit()
    if tr.is_main:  # evaluate has no collective call, so rank 0 may run it alone
        ev = tr.evaluate(DataLoader(make_data(), batch_size=16))
        torch.save(dict(eval=ev, params={k: v.detach().clone() for k, v in tr.model.state_dict().items()},
                        ema={k: v.detach().clone() for k, v in tr.ema_model.module.state_dict().items()},
                        history=hist, world_size=tr.world_size), out)
    # wait for rank 0 before tearing down: a rank that destroys the gloo group while the other still runs can abort
    # ("terminate called without an active exception", seen once in CI)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
