"""Test-session environment, set before any test module imports triton, transformers or matplotlib.

Triton's interpreter (CPU) is on unless the caller set TRITON_INTERPRET (set TRITON_INTERPRET=0 on a GPU machine to
test the compiled kernels); Hugging Face libraries stay offline; matplotlib draws off-screen.
"""
import os

os.environ.setdefault('TRITON_INTERPRET', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
