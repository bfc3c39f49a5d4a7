"""Run nbdev's docs pre-processing (`nbdev_proc_nbs`) where Quarto is absent; fail on any error.

`nbdev_proc_nbs` starts by installing Quarto if it is missing. Quarto has no package in the registries our machines
reach, so this script skips only that step and runs the rest exactly as nbdev does. With Quarto installed, run plain
`nbdev_proc_nbs` or `nbdev_docs` instead.
"""
import shutil
import nbdev.quarto as q

if __name__ == '__main__':
    if not shutil.which('quarto'): q._ensure_quarto = lambda: None
    q.nbdev_proc_nbs.__wrapped__()
    cfg = q.get_config()
    procd = cfg.config_path/'_proc'
    n = len(list(procd.rglob('*.ipynb')))
    if n == 0: raise SystemExit('nbdev_proc_nbs produced no processed notebooks in _proc/')
    print(f'nbdev_proc_nbs: {n} notebooks processed into {procd.name}/')
