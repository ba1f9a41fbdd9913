"""scalablevit.checkpoint: one reader and one mismatch message for every loader of the project."""
import re

import pytest
import torch
import torch.nn as nn

from scalablevit.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    check_state_dict,
    describe_mismatch,
    load_checkpoint,
    load_state_dict_strict,
)


def _model():
    return nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))


def test_fitting_state_dict_loads_and_copies_values():
    src, dst = _model(), _model()
    load_state_dict_strict(dst, src.state_dict(), 'src')
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)


def test_mismatch_is_one_line_naming_every_kind_and_loads_nothing():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    sd.pop('1.bias')
    sd['fc.weight'] = torch.zeros(1)
    sd['0.weight'] = torch.zeros(5, 2)
    with pytest.raises(CheckpointMismatchError) as e:
        load_state_dict_strict(model, sd, 'ckpt.pth')
    msg = str(e.value)
    assert '\n' not in msg
    assert msg.startswith('checkpoint ckpt.pth does not fit Sequential: ')
    assert '1 missing (1.bias)' in msg
    assert '1 unexpected (fc.weight)' in msg
    assert '1 of another shape (0.weight: checkpoint (5, 2) vs model (3, 2))' in msg
    for k, v in model.state_dict().items():  # nothing half-loaded
        assert torch.equal(v, before[k])


def test_allowed_prefixes_and_long_listings():
    own = {f'blocks.{i}.w': torch.zeros(1) for i in range(12)}
    assert describe_mismatch(own, {}, allow_missing=['blocks.']) is None
    assert describe_mismatch(own, {}, allow_missing=['blocks']) is not None  # a prefix needs its dot
    msg = describe_mismatch(own, {})
    assert msg.startswith('12 missing (') and msg.endswith('... (12 in all))')
    assert len(re.findall(r'blocks\.\d+\.w', msg)) == 5
    assert describe_mismatch({}, {'x': torch.zeros(1)}, allow_unexpected=['x']) is None


def test_allowed_missing_keys_keep_their_values():
    src, dst = _model(), _model()
    keep = dst.state_dict()['1.bias'].clone()
    sd = {k: v for k, v in src.state_dict().items() if k != '1.bias'}
    load_state_dict_strict(dst, sd, 'src', allow_missing=['1.bias'])
    assert torch.equal(dst.state_dict()['1.bias'], keep)
    assert torch.equal(dst.state_dict()['0.weight'], src.state_dict()['0.weight'])


def test_check_state_dict_takes_a_state_dict_and_a_hint():
    with pytest.raises(CheckpointMismatchError, match=r'does not fit the model: 1 missing \(a\); is it the S size\?'):
        check_state_dict({'a': torch.zeros(1)}, {}, 'x.pth', hint='is it the S size?')


def test_load_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=r'^checkpoint not found: .*nope\.pth$'):
        load_checkpoint(tmp_path / 'nope.pth')
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    (tmp_path / 'empty.pth').write_bytes(b'')
    for name in ('text.pth', 'empty.pth'):
        with pytest.raises(CheckpointError, match=r'not a PyTorch checkpoint \(or a truncated one\)$'):
            load_checkpoint(tmp_path / name)
    torch.save({'module': nn.Linear(2, 2)}, tmp_path / 'pickled.pth')
    with pytest.raises(CheckpointError,
                       match=r'it needs the Python object torch\.nn\.modules\.linear\.Linear, which a weights-only'):
        load_checkpoint(tmp_path / 'pickled.pth')
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match=r'holds a list, expected a dict of weights'):
        load_checkpoint(tmp_path / 'list.pth')


def test_load_checkpoint_reads_deit_style_namespace_args(tmp_path):
    import argparse
    torch.save({'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=1.0)}, tmp_path / 'deit.pth')
    ckpt = load_checkpoint(tmp_path / 'deit.pth')
    assert ckpt['args'].lr == 1.0 and torch.equal(ckpt['model']['w'], torch.ones(2))
    # the allowance is for that load only
    with pytest.raises(Exception):
        torch.load(tmp_path / 'deit.pth', weights_only=True)


def test_load_checkpoint_keeps_a_process_wide_allow_list(tmp_path):
    """A class allowed for the whole process (mmengine's, in scalablevit.mm.compat) is still allowed after our load."""
    import argparse
    import collections
    torch.save({'args': argparse.Namespace(a=1), 'd': collections.Counter(a=1)}, tmp_path / 'c.pth')
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace, collections.Counter])
    try:
        assert load_checkpoint(tmp_path / 'c.pth', safe_globals=[collections.Counter])['d']['a'] == 1
        assert argparse.Namespace in torch.serialization.get_safe_globals()
        assert collections.Counter in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
