"""SNELLA end to end on the real pretrained MiniLM text encoder: mixed kernel + bi-level allocation in the shared loop."""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
import math, re, pytest, torch
from snella_nb.core import seed_everything
from snella_nb.data import make_loader
from snella_nb.snell.tuner import SnellConfig, get_snell_model
from snella_nb.snell.alloc import SnellaAllocator
from snella_nb.snell.sparse import n_keep
from snella_nb.train import Trainer, TrainConfig


def _minilm_topics():
    from snella_nb.bench import build_backbone, get_task
    task = get_task('topics', n_test=64)
    model, info = build_backbone('minilm', task.num_classes, seed=0)
    return task, model


def test_snella_trains_minilm_with_allocation():
    torch.manual_seed(0)
    task, model = _minilm_topics()
    frozen0 = {k: v.detach().clone() for k, v in model.state_dict().items() if 'encoder' in k}
    seed_everything(0)
    sm = get_snell_model(model, SnellConfig(r=8, kernel='mixed', dense_at_zero=False, sparsity=0.5,
                                            target_modules=r'attention\.self\.(query|value)', modules_to_save=['head'],
                                            init_seed=0))
    layers = list(sm.snell_layers())
    assert len(layers) == 12  # query and value in each of the 6 blocks (the 'bert' preset adapts 36 linears)
    steps = 6
    alloc = SnellaAllocator(sm, target_sparsity=0.9, init_sparsity=0.5, total_steps=steps)
    small = torch.utils.data.Subset(task.train, range(96))
    tr = Trainer(sm, make_loader(small, 16, shuffle=True, seed=0), None,
                 TrainConfig(lr=1e-3, max_steps=steps, warmup_steps=1, progress=False, seed=0), callbacks=[alloc],
                 batch_fn=lambda b: ((b['input_ids'], b['attention_mask']), b['labels']),
                 forward_fn=lambda m, x: m(*x))
    tr.fit()
    assert math.isfinite(tr.last_loss)
    # the allocation moved away from uniform, and the kept counts add up to the scheduled budget exactly
    s = [l.sparsity for _, l in layers]
    assert max(s) - min(s) > 0.05, s
    t, budget, hist_s = alloc.history[-1]
    assert sum(n_keep(l.n_weights, l.sparsity) for _, l in layers) == budget
    assert budget < alloc.b0  # the budget decreased along the cubic schedule
    # each layer's forward keeps exactly its allocated number of nonzeros (in-layer competition)
    for name, l in layers[:3]:
        dw = l.get_delta_weight()
        assert int((dw != 0).sum()) == n_keep(l.n_weights, l.sparsity), name
    # the pretrained encoder weights did not move (only adapters, kernel scalars and the head train)
    after = {re.sub(r'\.base_layer', '', k): v for k, v in sm.state_dict().items()}
    checked = 0
    for k, v0 in frozen0.items():
        match = [a for a in after if a == k or a.endswith('.' + k)]
        assert len(match) == 1, (k, match)
        assert torch.equal(after[match[0]], v0), k
        checked += 1
    assert checked == len(frozen0) > 50
