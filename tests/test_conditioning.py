"""fMRI and class conditioners: shapes, padding, null conditions, save/load."""

import torch

from mindvis.models.conditioning import ClassConditioner, Condition, FmriConditioner


def _conditioner(**overrides):
    torch.manual_seed(0)
    kwargs = dict(input_tokens=7, input_dim=6, context_tokens=5, cross_attention_dim=8, pooled_dim=12)
    kwargs.update(overrides)
    return FmriConditioner(**kwargs).eval()


def test_fmri_conditioner_shapes_and_padding_has_no_influence():
    conditioner = _conditioner()
    tokens = torch.randn(3, 7, 6)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, -2:] = False
    condition = conditioner(tokens, mask)
    assert condition.context.shape == (3, 5, 8) and condition.pooled.shape == (3, 12)
    changed = tokens.clone()
    changed[:, -2:] = torch.randn(3, 2, 6) * 100
    again = conditioner(changed, mask)
    torch.testing.assert_close(again.context, condition.context)
    torch.testing.assert_close(again.pooled, condition.pooled)
    # ... while a real token does change the condition.
    changed[:, 1] = torch.randn(3, 6)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(conditioner(changed, mask).context, condition.context)


def test_fmri_conditioner_round_trips_with_save_pretrained(tmp_path):
    conditioner = _conditioner()
    with torch.no_grad():
        conditioner.null_context.normal_()
    conditioner.save_pretrained(tmp_path / "cond")
    loaded = FmriConditioner.from_pretrained(tmp_path / "cond").eval()
    tokens = torch.randn(2, 7, 6)
    torch.testing.assert_close(loaded(tokens).context, conditioner(tokens).context, rtol=0, atol=0)
    torch.testing.assert_close(loaded.null(2).context, conditioner.null(2).context, rtol=0, atol=0)
    weights = loaded.token_weights()
    assert weights.shape == (5, 7)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(5))


def test_class_conditioner_null_label_and_null_initialisation():
    torch.manual_seed(0)
    classes = ClassConditioner(n_classes=3, context_tokens=5, cross_attention_dim=8, pooled_dim=12)
    with torch.no_grad():
        classes.null_context.normal_()
        classes.null_pooled.normal_()
    condition = classes(torch.tensor([2, -1, 0]))
    null = classes.null(1)
    torch.testing.assert_close(condition.context[1], null.context[0])
    torch.testing.assert_close(condition.pooled[1], null.pooled[0])
    torch.testing.assert_close(condition.context[0], classes.context[2])
    assert not torch.allclose(condition.context[0], condition.context[2])
    # The fMRI conditioner starts from the base's null condition (the unconditional branch it learned).
    fmri = _conditioner()
    fmri.init_null_from(classes)
    torch.testing.assert_close(fmri.null(1).context, null.context)
    torch.testing.assert_close(fmri.null(1).pooled, null.pooled)


def test_condition_select_and_cat():
    condition = Condition(torch.arange(24.0).reshape(3, 4, 2), torch.arange(6.0).reshape(3, 2))
    assert len(condition) == 3
    picked = condition.select(torch.tensor([2, 0]))
    torch.testing.assert_close(picked.pooled, torch.tensor([[4.0, 5.0], [0.0, 1.0]]))
    both = Condition.cat([picked, condition])
    assert both.context.shape == (5, 4, 2)


def test_class_conditioner_without_classes_is_unconditional():
    """A stimulus set without classes (NSD) gives a conditioner that only knows the null condition."""
    import pytest

    conditioner = ClassConditioner(n_classes=0, context_tokens=3, cross_attention_dim=4, pooled_dim=5)
    condition = conditioner(torch.tensor([-1, -1]))
    assert condition.context.shape == (2, 3, 4) and condition.pooled.shape == (2, 5)
    torch.testing.assert_close(condition.context, conditioner.null(2).context)
    with pytest.raises(ValueError, match="no classes"):
        conditioner(torch.tensor([0]))


def test_voxel_path_starts_the_condition_from_its_linear_map_alone():
    """With a voxel path, the encoder path is exactly zero at the start: the condition is W @ fmri + b."""
    conditioner = _conditioner(n_voxels=9)
    tokens, fmri = torch.randn(3, 7, 6), torch.randn(3, 9)
    start = conditioner(tokens, fmri=fmri)
    assert torch.count_nonzero(start.context) == 0 and torch.count_nonzero(start.pooled) == 0
    weight, bias = torch.randn(5 * 8 + 12, 9), torch.randn(5 * 8 + 12)
    conditioner.set_voxel_map(weight, bias)
    condition = conditioner(tokens, fmri=fmri)
    expected = fmri @ weight.T + bias
    torch.testing.assert_close(condition.context.flatten(1), expected[:, :40])
    torch.testing.assert_close(condition.pooled, expected[:, 40:])
    # The encoder path still learns: its zeroed first layer gets a gradient.
    conditioner.train()
    conditioner(tokens, fmri=fmri).context.pow(2).sum().backward()
    assert conditioner.width_map.weight.grad.abs().sum() > 0
    import pytest

    with pytest.raises(ValueError, match="voxel path takes 9 voxels"):
        conditioner(tokens)
    with pytest.raises(ValueError, match="no voxel path"):
        _conditioner().set_voxel_map(weight, bias)
