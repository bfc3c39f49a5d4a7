"""The README's usage example must run as written."""
import os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_usage_example_runs(tmp_path):
    text = (ROOT/'README.md').read_text()
    usage = text.split('## Usage', 1)[1]
    code = re.search(r'```python\n(.*?)```', usage, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20, 'keep the README example short'
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', MPLBACKEND='Agg')
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'trainable params:' in r.stdout
    assert (tmp_path/'snell_adapter'/'snell_config.json').exists()
    assert (tmp_path/'snell_adapter'/'adapter_model.safetensors').exists()
