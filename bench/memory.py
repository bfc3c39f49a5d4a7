"""Training memory and step time of SNELL-8 and SNELLA-8 against full fine-tuning, LoRA-8 and two-stage sparse tuning (issues 4, 5).

Every configuration trains the same timm ViT (random init) on the same random batch, fp32, AdamW, in a FRESH Python
process (`snella_nb.core.measure_peak_memory`), so that one configuration's freed memory never hides another's peak.
Memory is the whole-process peak RSS on a CPU (CUDA `max_memory_allocated` with --device cuda) after `probe.mark()`,
which is called right before the first training step: after the model, the adapters, the optimizer and (for sparse
tuning) the gradient-locating stage 1 are built. `increment` = peak - memory at mark, i.e. what training itself adds
(gradients, AdamW moments, activations, SNELL's transient S). Step time = median over the timed steps of one
forward + backward + AdamW step (+ SNELLA's importance update and reallocation), after untimed warm-up steps.
On a CPU, glibc keeps freed heap pages and reuses them, so the peak RSS depends on each method's allocation pattern
as much as on its live tensors; by default (--malloc tight) the children run with MALLOC_MMAP_THRESHOLD_=65536 so
that every large tensor is returned to the OS when freed and the RSS follows the live memory (--malloc glibc: defaults).

Targets (spec snell_snella.md §7-8): SNELL/LoRA <= 1.10, SNELL/sparse <= 0.70, SNELLA/sparse <= 0.65,
SNELLA/LoRA <= 1.10 in memory; SNELL/LoRA step time: the paper measured 1.26 (Table A14, RTX 4090).

    python bench/memory.py                                   # ViT-B/16, batch 8, 224 px, all configurations
    python bench/memory.py --model vit_large_patch16_224     # the ViT-L repeat
    python bench/memory.py --quick                           # ViT-tiny smoke run (< 2 min)
    python bench/memory.py --configs lora,snell --rounds 2   # a subset, alternated twice (noisy machines)
"""
from __future__ import annotations
import statistics, sys, time
from pathlib import Path


CONFIGS = {  # name -> what it is
    'full': 'full fine-tuning (every parameter, AdamW)',
    'lora': 'LoRA-8 via peft on qkv/proj/fc1/fc2, head + cls_token trainable',
    'sparse': 'two-stage sparse tuning: gradient-located 10% of qkv/proj/fc1/fc2 (s=0.9), dense grads masked',
    'snell': 'SNELL-8, distance kernel, s=0.9, checkpointed S',
    'snella': "SNELLA-8, mixed kernel, dense_at_zero=False, SnellaAllocator after each step (target s=0.9)",
    'snell_chunk': 'SNELL-8 as snell, S built in blocks of chunk_rows input rows',
}
# (numerator, denominator, target ratio): memory targets of issues 4 and 5
MEMORY_TARGETS = [('snell', 'lora', 1.10), ('snell', 'sparse', 0.70), ('snella', 'sparse', 0.65), ('snella', 'lora', 1.10)]
TIME_TARGETS = [('snell', 'lora', 1.26)]  # the paper's 0.557 / 0.443 s per image
LABELS = {'full': 'Full FT', 'lora': 'LoRA-8', 'sparse': 'Sparse (2-stage)', 'snell': 'SNELL-8', 'snella': 'SNELLA-8',
          'snell_chunk': 'SNELL-8 chunked'}


def _rss_mb()->float:
    from snella_nb.core import _rss_mb
    return _rss_mb()


def _release_free_memory()->bool:
    "gc, then glibc `malloc_trim(0)`: hand freed heap pages back to the OS so the RSS at mark() is the live memory."
    import gc, ctypes, ctypes.util
    gc.collect()
    try: return bool(ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim(0))
    except (OSError, AttributeError): return False  # not glibc: freed pages may stay in the RSS


def one_config(probe, config:str='snell', model_name:str='vit_base_patch16_224', batch_size:int=8, img_size:int=224,
               num_classes:int=100, steps:int=5, warmup:int=2, seed:int=0, chunk_rows:int=256, threads:int|None=None,
               snella_init_sparsity:float=0.01)->dict:
    "Build one configuration, `probe.mark()`, train `warmup + steps` steps; return times and sizes (child process side)."
    import torch, timm
    from torch import nn
    from snella_nb.core import seed_everything, count_parameters
    from snella_nb.train import param_groups
    if config not in CONFIGS: raise ValueError(f"unknown config {config!r}; choose from {list(CONFIGS)}")
    if threads: torch.set_num_threads(threads)
    dev = probe.device
    rss_start = _rss_mb()
    seed_everything(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size)
    n_backbone = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, img_size, img_size, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)
    model = model.to(dev)
    rss_model = _rss_mb()
    no_decay, allocator, extra = ('cls_token', 'pos_embed'), None, {}
    if config == 'full':
        from snella_nb.snell.baselines import full_finetune
        model = full_finetune(model)
    elif config == 'lora':
        from snella_nb.snell.baselines import lora
        model = lora(model, r=8)
    elif config == 'sparse':
        from snella_nb.snell.baselines import VIT_TARGETS, match_modules, locate_by_gradient, sparse_tune
        targets = match_modules(model, VIT_TARGETS)
        t0 = time.perf_counter()
        masks = locate_by_gradient(model, [(x, y)], targets, sparsity=0.9)  # stage 1 precedes training
        extra['locate_s'] = time.perf_counter() - t0
        model, masked = sparse_tune(model, masks)
        del masks
        no_decay = no_decay + tuple(masked)
        extra['tuned_entries'] = sum(int(m.sparse_mask.sum()) for n, m in model.named_modules() if hasattr(m, 'sparse_mask'))
    else:
        from snella_nb.snell.tuner import SnellConfig, get_snell_model
        if config == 'snella':
            cfg = SnellConfig(r=8, kernel='mixed', dense_at_zero=False, sparsity=snella_init_sparsity, init_seed=seed)
        else:
            cfg = SnellConfig(r=8, kernel='distance', sparsity=0.9, init_seed=seed,
                              chunk_rows=chunk_rows if config == 'snell_chunk' else None)
        model = get_snell_model(model, cfg)
        if config == 'snella':
            from types import SimpleNamespace
            from snella_nb.snell.alloc import SnellaAllocator
            # the whole cubic schedule s_init -> 0.9 runs inside the measured steps, so reallocation is exercised
            allocator = SnellaAllocator(model, target_sparsity=0.9, total_steps=warmup + steps + 1)
            allocator.before_fit(SimpleNamespace(ema_model=None))
    trainable, total = count_parameters(model)
    # the optimizer (and its first import, ~150 MB of code) exists before mark(); its moments are allocated lazily in
    # the first step, so they count in the increment, as gradients and activations do
    opt = torch.optim.AdamW(param_groups(model, 0.05, no_decay), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)
    times = []
    rss_before_trim = _rss_mb()
    # without this, pages freed before mark() (stage 1 of sparse tuning, temporaries of the set-up) stay in the RSS
    # and are silently reused by training, so the increment would undercount; applied to every configuration alike
    trimmed = _release_free_memory()
    extra.update(rss_before_trim_mb=round(rss_before_trim, 1), malloc_trim=trimmed)
    probe.mark()
    for i in range(warmup + steps):
        sync(); t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if allocator is not None: allocator.after_step(None)  # importance from this step's grads, then reallocation
        opt.zero_grad(set_to_none=True)
        sync(); times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss): raise FloatingPointError(f"{config}: non-finite loss {loss.item()}")
    if allocator is not None:
        ns = allocator.n_weights
        extra['snella_final_mean_sparsity'] = sum(s * n for s, n in zip(allocator.sparsity, ns)) / sum(ns)
        extra['snella_sparsity_range'] = [min(allocator.sparsity), max(allocator.sparsity)]
        extra['snella_reallocations'] = len(allocator.history) - 1
    timed = times[warmup:]
    return dict(config=config, model=model_name, trainable_params=trainable, total_params=total,
                backbone_params=n_backbone, rss_start_mb=round(rss_start, 1), rss_model_mb=round(rss_model, 1),
                step_s=statistics.median(timed), step_times_s=times, final_loss=loss.item(), **extra)


def _ratio_rows(res:dict, key:str, targets)->list[dict]:
    rows = []
    for a, b, tgt in targets:
        if a not in res or b not in res: continue
        r = res[a][key] / res[b][key]
        rows.append(dict(ratio=f'{LABELS[a]} / {LABELS[b]}', target=tgt, measured=r, verdict='OK' if r <= tgt else 'MISSED'))
    return rows


def main(argv=None):
    import os
    from snella_nb.core import measure_peak_memory
    from snella_nb.benchmark import bench_argparser, markdown_table, write_results
    p = bench_argparser(__doc__.splitlines()[0])
    p.add_argument('--model', default=None, help="timm model name (default vit_base_patch16_224; --quick: vit_tiny_patch16_224)")
    p.add_argument('--batch-size', type=int, default=None, help='images per step (default 8; --quick: 4)')
    p.add_argument('--img-size', type=int, default=224, help='image side in pixels')
    p.add_argument('--num-classes', type=int, default=100, help='classifier outputs')
    p.add_argument('--steps', type=int, default=None, help='timed steps per configuration (default 5; --quick: 2)')
    p.add_argument('--warmup', type=int, default=None, help='untimed first steps (default 2; --quick: 1)')
    p.add_argument('--configs', default=','.join(CONFIGS), help=f'comma-separated subset of {",".join(CONFIGS)}')
    p.add_argument('--rounds', type=int, default=1, help='run every configuration this many times, alternating (medians reported)')
    p.add_argument('--chunk-rows', type=int, default=256, help='rows of S per block for snell_chunk')
    p.add_argument('--threads', type=int, default=1, help='torch threads in each child (1: steadier timing on a shared machine; 0: torch default)')
    p.add_argument('--device', default='cpu', help="'cpu' (peak RSS) or 'cuda' (max_memory_allocated)")
    p.add_argument('--malloc', choices=['tight', 'glibc'], default='tight',
                   help="tight: children run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS at once "
                        "(RSS tracks live memory, like CUDA's max_memory_allocated); glibc: the allocator's defaults "
                        "(freed heap pages are kept and reused, which inflates the peak in a method-dependent way)")
    p.add_argument('--timeout', type=float, default=3600, help='seconds before a configuration is killed')
    p.add_argument('--name', default=None, help='result file stem (default memory, memory_quick or memory_<model>)')
    a = p.parse_args(argv)
    configs = [c.strip() for c in a.configs.split(',') if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs: p.error(f'unknown --configs {bad}; choose from {",".join(CONFIGS)}')
    if a.repeats is not None: a.rounds = a.repeats  # the shared --repeats option means rounds here
    model = a.model or ('vit_tiny_patch16_224' if a.quick else 'vit_base_patch16_224')
    bs = a.batch_size or (4 if a.quick else 8)
    steps, warmup = a.steps or (2 if a.quick else 5), a.warmup if a.warmup is not None else (1 if a.quick else 2)
    name = a.name or ('memory_quick' if a.quick else 'memory' if model == 'vit_base_patch16_224' else f'memory_{model}')
    if a.malloc == 'glibc' and not a.name: name += '_glibc'
    if a.malloc == 'tight': os.environ['MALLOC_MMAP_THRESHOLD_'] = '65536'  # inherited by the children only
    else: os.environ.pop('MALLOC_MMAP_THRESHOLD_', None)
    kw = dict(model_name=model, batch_size=bs, img_size=a.img_size, num_classes=a.num_classes, steps=steps,
              warmup=warmup, seed=a.seed, chunk_rows=a.chunk_rows, threads=a.threads or None)
    target = f'{Path(__file__).resolve()}:one_config'
    runs = {c: [] for c in configs}
    t_all = time.perf_counter()
    for rnd in range(a.rounds):  # alternate configurations so that machine load drifts hit all of them alike
        for c in configs:
            t0 = time.perf_counter()
            r = measure_peak_memory(target, dict(kw, config=c), device=a.device, timeout=a.timeout)
            runs[c].append(r)
            print(f'[round {rnd + 1}/{a.rounds}] {c:12s} peak {r["peak_mb"]:8.1f} MB  increment {r["increment_mb"]:8.1f} MB  '
                  f'step {r["step_s"]:.3f} s  ({time.perf_counter() - t0:.0f} s)', flush=True)
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    res = {c: dict(peak_mb=med(rs, 'peak_mb'), increment_mb=med(rs, 'increment_mb'), base_mb=med(rs, 'base_mb'),
                   step_s=med(rs, 'step_s'), trainable_params=rs[0]['trainable_params'], total_params=rs[0]['total_params'])
           for c, rs in runs.items()}
    ref = res.get('lora')
    rows = [dict(config=LABELS[c], trainable_M=v['trainable_params'] / 1e6, base_MB=v['base_mb'], peak_MB=v['peak_mb'],
                 increment_MB=v['increment_mb'], step_s=v['step_s'],
                 incr_vs_LoRA=v['increment_mb'] / ref['increment_mb'] if ref else None,
                 peak_vs_LoRA=v['peak_mb'] / ref['peak_mb'] if ref else None) for c, v in res.items()]
    mem_inc, mem_peak = _ratio_rows(res, 'increment_mb', MEMORY_TARGETS), _ratio_rows(res, 'peak_mb', MEMORY_TARGETS)
    tim = _ratio_rows(res, 'step_s', TIME_TARGETS)
    ratios = ([dict(r, measure='memory: training increment') for r in mem_inc] +
              [dict(r, measure='memory: whole-process peak') for r in mem_peak] +
              [dict(r, measure='step time (median)') for r in tim])
    dev = a.device
    print(f'\n## Training memory and step time: {model}, batch {bs}, {a.img_size} px, fp32, {dev}, malloc={a.malloc}, '
          f'{steps} timed steps after {warmup} warm-up, {a.rounds} round(s)\n')
    print(markdown_table(rows, floatfmt='.4g'))
    if ratios:
        print('\n' + markdown_table(ratios, ['measure', 'ratio', 'measured', 'target', 'verdict'], floatfmt='.3f'))
        print('\n(step-time target = the paper\'s SNELL-8/LoRA-8 ratio, Table A14; CPU timing on a shared machine is noisy)')
    meta = dict(seed=a.seed, model=model, batch_size=bs, img_size=a.img_size, num_classes=a.num_classes, dtype='float32',
                device=dev, steps=steps, warmup=warmup, rounds=a.rounds, chunk_rows=a.chunk_rows, threads=a.threads,
                quick=a.quick, malloc=a.malloc, configs={c: CONFIGS[c] for c in configs}, ratios=ratios,
                memory_method=next(iter(runs.values()))[0]['method'], raw=runs,
                wall_s=round(time.perf_counter() - t_all, 1))
    path = write_results(name, rows, meta=meta, out_dir=a.out)
    if ratios:  # the ratio table goes into the .md too
        md = path.with_suffix('.md')
        md.write_text(md.read_text() + '\n' + markdown_table(ratios, ['measure', 'ratio', 'measured', 'target', 'verdict'],
                                                            floatfmt='.3f') + '\n')
    print(f'\nwrote {path}')
    return path


if __name__ == '__main__':
    main()
