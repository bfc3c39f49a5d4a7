"""Offline transfer benchmark: PEFT methods x downstream tasks x seeds on self-pretrained / shipped backbones.

    python bench/transfer.py            # full table: synthvit (pretrained once, cached) + MiniLM, 3 seeds
    python bench/transfer.py --quick    # smoke run: tiny backbone, short budget, 2 seeds
    python bench/transfer.py --backbone timm:vit_base_patch16_224 --checkpoint vit.safetensors \\
        --tasks folder:/data/vtab-1k/cifar    # real weights + ImageFolder data (train/val/test folders)

Prints a markdown table (test accuracy at the best-validation checkpoint, mean +- sd over seeds) and writes
bench/results/transfer[_quick].{json,md,png,jsonl}. See nbs/05_bench.ipynb.
"""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
from snella_nb.bench import main

if __name__ == '__main__':
    main()
