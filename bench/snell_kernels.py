"""Fused SNELL kernels (snella_nb.kernels.snell) vs the unfused PyTorch reference vs peft LoRA-8: peak memory and time.

On a GPU (one command: `python bench/snell_kernels.py`):
  * one adapted layer, forward + backward, at ViT-B/L/H shapes 768x768, 768x3072, 1024x4096, 1280x5120 with the tokens
    of a batch of 8 (8 x 197): peak allocated memory above the inputs and median time, for the fused kernels, the
    reference `snell_matmul` (checkpointed, S rebuilt in backward) and a LoRA-8 branch; the FLOPs and bytes of the
    three GEMMs (y, dx, G) and the time floor they imply on this GPU are printed beside each time;
  * a ViT-B/16 training step (forward, backward, AdamW) at batch 8 and 64: SNELL-8 fused, SNELL-8 reference, peft LoRA-8.
On a CPU (no GPU): the peak RSS of one layer's forward + backward at ViT-B shapes, each configuration in a fresh
subprocess (snella_nb.core.measure_peak_memory): the reference without chunking vs the chunked reference
(`chunk_rows`), i.e. the memory the fused kernels remove, bounded from the CPU side.

    python bench/snell_kernels.py            # full run
    python bench/snell_kernels.py --quick    # smoke run (small batch, fewer repeats)
"""
import os, sys, time
import torch
from snella_nb.benchmark import bench_argparser, markdown_table, write_results, median_time
from snella_nb.core import measure_peak_memory, seed_everything

LAYERS = [(768, 768), (768, 3072), (1024, 4096), (1280, 5120)]
TOKENS_PER_IMAGE = 197
R, SPARSITY = 8, 0.9


# ---------------------------------------------------------------- CPU: one layer in a fresh process per configuration
def cpu_layer(probe, d_in, d_out, tokens, chunk_rows=None, seed=0, lora=False):
    "Forward + backward of one SNELL branch (reference path) or a LoRA-8 branch on CPU; run in a subprocess."
    from snella_nb.snell.kernel import SnellKernel, init_factors
    from snella_nb.snell.sparse import snell_matmul
    g = torch.Generator().manual_seed(seed)
    A, B = (t.requires_grad_() for t in init_factors(d_in, d_out, R, generator=g))
    x = torch.randn(tokens, d_in, generator=g)
    kern = SnellKernel('distance')
    la, lb = (torch.randn(d_in, R, generator=g) / d_in**0.5).requires_grad_(), torch.zeros(R, d_out, requires_grad=True)
    probe.mark()
    y = (x @ la) @ lb if lora else snell_matmul(x, A, B, kern, SPARSITY, chunk_rows=chunk_rows)
    y.square().mean().backward()
    return dict(grad_norm=float((la if lora else A).grad.norm()))


def cpu_main(a):
    tokens = 2 * TOKENS_PER_IMAGE if a.quick else 8 * TOKENS_PER_IMAGE
    layers = LAYERS[:2] if a.quick else LAYERS
    here = os.path.abspath(__file__)
    rows = []
    for d_in, d_out in layers:
        n_mb = d_in * d_out * 4 / 2**20
        for label, chunk, is_lora in (('LoRA-8 branch', None, True), ('SNELL reference (unchunked)', None, False),
                                      ('SNELL reference chunk_rows=64', 64, False)):
            r = measure_peak_memory(f'{here}:cpu_layer', dict(d_in=d_in, d_out=d_out, tokens=tokens, chunk_rows=chunk,
                                                               seed=a.seed, lora=is_lora), device='cpu')
            rows.append(dict(layer=f'{d_in}x{d_out}', method=label, tokens=tokens, increment_mb=r['increment_mb'],
                             per_matrix=r['increment_mb'] / n_mb, matrix_mb=n_mb))
            print(rows[-1], flush=True)
    print(markdown_table(rows, floatfmt='.1f'))
    print('\nper_matrix = peak increment in units of one float32 d_in x d_out matrix. The fused kernels hold no such '
          'matrix (one tile per program); their peak needs a GPU run (python bench/snell_kernels.py on a CUDA machine).')
    print(f"wrote {write_results('kernels_cpu', rows, meta=dict(seed=a.seed, r=R, sparsity=SPARSITY, tokens=tokens), out_dir=a.out)}")


# ---------------------------------------------------------------- GPU
def _peak(fn):
    "Peak allocated memory (MB) above what was allocated before `fn()`."
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    fn(); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def gpu_layers(a, rows):
    from snella_nb.kernels.snell import fused_snell_matmul
    from snella_nb.snell.kernel import SnellKernel, init_factors
    from snella_nb.snell.sparse import snell_matmul
    tokens = 8 * TOKENS_PER_IMAGE
    peak_tflops, peak_gbs = a.peak_tflops, a.peak_gbs
    for d_in, d_out in (LAYERS[:2] if a.quick else LAYERS):
        g = torch.Generator().manual_seed(a.seed)
        A, B = (t.cuda().requires_grad_() for t in init_factors(d_in, d_out, R, generator=g))
        x = torch.randn(tokens, d_in, device='cuda', requires_grad=True)
        kern = SnellKernel('distance').cuda()
        la = (torch.randn(d_in, R, device='cuda') / d_in**0.5).requires_grad_()
        lb = torch.zeros(R, d_out, device='cuda', requires_grad=True)
        methods = {
            'SNELL fused': lambda: fused_snell_matmul(x, A, B, kern, SPARSITY, backend='triton'),
            'SNELL reference': lambda: snell_matmul(x, A, B, kern, SPARSITY),
            'LoRA-8 branch': lambda: (x @ la) @ lb,
        }
        flops = 3 * 2 * tokens * d_in * d_out                      # y, dx and G (= xᵀdY) GEMMs
        nbytes = 4 * (3 * tokens * (d_in + d_out))                 # read x, dY; write y, dx (once each, fp32)
        floor_ms = 1e3 * max(flops / (peak_tflops * 1e12), nbytes / (peak_gbs * 1e9))
        for name, f in methods.items():
            def step(): f().square().mean().backward()
            t, _ = median_time(step, repeats=a.repeats or (3 if a.quick else 20), warmup=2)
            rows.append(dict(case=f'layer {d_in}x{d_out} T={tokens}', method=name, ms=1e3 * t,
                             peak_mb=_peak(step), gflops=flops / 1e9, mbytes=nbytes / 2**20, floor_ms=floor_ms))
            print(rows[-1], flush=True)


def gpu_vit(a, rows):
    import timm
    import snella_nb.snell.tuner as tuner
    from snella_nb.kernels.snell import fused_snell_matmul
    from snella_nb.snell.sparse import snell_matmul
    from snella_nb.snell.tuner import SnellConfig, get_snell_model
    from snella_nb.snell.baselines import lora
    for bs in ((8,) if a.quick else (8, 64)):
        for name in ('SNELL-8 fused', 'SNELL-8 reference', 'peft LoRA-8'):
            seed_everything(a.seed)
            model = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=100)
            if name.startswith('SNELL'):
                model = get_snell_model(model, SnellConfig(r=8, sparsity=SPARSITY))
                tuner.snell_matmul = fused_snell_matmul if 'fused' in name else snell_matmul   # the tuner's hook
            else: model = lora(model, r=8)
            model.cuda().train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            xb, yb = torch.randn(bs, 3, 224, 224, device='cuda'), torch.randint(0, 100, (bs,), device='cuda')
            def step():
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            step()
            t, _ = median_time(step, repeats=a.repeats or (3 if a.quick else 10), warmup=1)
            rows.append(dict(case=f'ViT-B/16 step bs={bs}', method=name, ms=1e3 * t, peak_mb=_peak(step)))
            print(rows[-1], flush=True)
            del model, opt; torch.cuda.empty_cache()
    tuner.snell_matmul = snell_matmul


def gpu_main(a):
    rows = []
    gpu_layers(a, rows)
    gpu_vit(a, rows)
    print(markdown_table(rows, ['case', 'method', 'ms', 'floor_ms', 'peak_mb', 'gflops', 'mbytes'], floatfmt='.3g'))
    print(f'floor_ms = max(GEMM FLOPs / {a.peak_tflops} TFLOP/s, bytes / {a.peak_gbs} GB/s) for the three GEMMs of '
          'the layer (the reference and the fused kernels also rebuild K: ~n(2r+10) FLOPs per rebuild).')
    print(f"wrote {write_results('kernels_gpu', rows, meta=dict(seed=a.seed, r=R, sparsity=SPARSITY, peak_tflops=a.peak_tflops, peak_gbs=a.peak_gbs), out_dir=a.out)}")


def main():
    p = bench_argparser(__doc__.splitlines()[0])
    p.add_argument('--peak-tflops', type=float, default=60.0, help='fp32 (IEEE) peak of the GPU, for the floor column')
    p.add_argument('--peak-gbs', type=float, default=4800.0, help='memory bandwidth of the GPU in GB/s')
    p.add_argument('--cpu', action='store_true', help='run the CPU part even if a GPU is present')
    a = p.parse_args()
    if torch.cuda.is_available() and not a.cpu: gpu_main(a)
    else: cpu_main(a)


if __name__ == '__main__':
    main()
