"""The teacher that scores arriving images: EMA updates, kept away from the optimizer and from the
engine's capture hooks, a user's teacher left untouched, configuration errors, persistence."""

import pytest
import torch

from hardneg import HardNeg, HardNegConfig
from hardneg.config import ConfigError
from hardneg.plugin import HardNegError
from hardneg.teacher import Teacher, strip_hardneg_hooks

from _engine_generators import MarkerTeacher
from test_labels import _result
from test_plugin import TinyNet, _cfg, _toy_data


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _observe(engine, model, data, ids):
    logits = model(data.images[ids])
    engine.observe(labels=data.labels[ids], logits=logits, ids=ids)


def test_ema_teacher_moves_towards_the_model_at_each_observed_step():
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    engine = HardNeg(_cfg(teacher="ema", teacher_decay=0.5, teacher_warmup=False, refresh_every=100), model=model)
    teacher = engine.teacher.module
    assert torch.equal(_flat(teacher), _flat(model))  # starts as a copy
    ids = torch.arange(16)
    _observe(engine, model, data, ids)  # timm's first update copies the model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    gap_before = (_flat(model) - _flat(teacher)).abs()
    assert bool((gap_before > 0.99).all())
    _observe(engine, model, data, ids)  # decay 0.5: halfway to the model
    torch.testing.assert_close((_flat(model) - _flat(teacher)).abs(), gap_before * 0.5, rtol=0, atol=1e-6)
    for _ in range(20):
        _observe(engine, model, data, ids)
    assert float((_flat(model) - _flat(teacher)).abs().max()) < 1e-5
    assert engine.teacher.updates == 22
    engine.close()


def test_ema_teacher_is_outside_the_optimizer_and_frozen():
    model = TinyNet()
    engine = HardNeg(_cfg(teacher="ema"), model=model)
    teacher = engine.teacher.module
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) not in model_params for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(m is not teacher for m in model.modules())
    assert not teacher.training
    # a training step's gradients never reach it
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = _flat(teacher).clone()
    model(torch.rand(4, 1, 8, 8)).sum().backward()
    opt.step()
    assert torch.equal(_flat(teacher), before) and all(p.grad is None for p in teacher.parameters())
    engine.close()


def test_teacher_forwards_fire_no_capture_hooks():
    torch.manual_seed(0)
    model = TinyNet()
    other = HardNeg(_cfg(), model=model)  # another engine's hooks are already on the model
    user_calls = []
    model.head.register_forward_hook(lambda m, i, o: user_calls.append(1))  # the user's own hook: kept
    engine = HardNeg(_cfg(teacher="ema"), model=model)
    teacher = engine.teacher.module
    model.train()
    x = torch.rand(5, 1, 8, 8)
    teacher(x)
    teacher.train()
    teacher(x)  # even in training mode
    assert other._captured_embeddings is None and other._captured_logits is None
    assert engine._captured_embeddings is None and engine._captured_logits is None
    assert len(user_calls) == 2  # the user's hook was copied and ran
    assert strip_hardneg_hooks(teacher) == 0  # nothing of hardneg's left on the copy
    model(x)  # the engines' hooks on the real model still capture
    assert engine._captured_embeddings.shape == (5, 16) and other._captured_logits.shape == (5, 4)
    engine.close()
    other.close()


def test_arrival_scoring_silences_the_capture_and_restores_train_mode():
    data = _toy_data()
    model = TinyNet()
    engine = HardNeg(_cfg(teacher="ema"), model=model, dataset=data)
    model.train()
    model(data.images[:16])  # the training forward's capture, waiting for observe()
    captured = engine._captured_embeddings
    assert engine._accept([_result([0.5] * 6)]) == 6
    assert engine._captured_embeddings is captured and model.training
    prov = engine.buffer.provenance()
    assert bool(torch.isfinite(prov["teacher_p_target"]).all() & torch.isfinite(prov["model_p_target"]).all())
    assert torch.equal(prov["target_weight"], torch.ones(6))  # label_mode "hard": scored, labels untouched
    engine.close()


def test_users_teacher_scores_and_is_never_changed():
    data = _toy_data()
    model = TinyNet()
    teacher = MarkerTeacher()
    teacher.train()
    before = _flat(teacher).clone()
    engine = HardNeg(_cfg(teacher="model"), model=model, dataset=data, teacher_model=teacher)
    _observe(engine, model, data, torch.arange(16))
    engine._accept([_result([0.3, 0.7])])
    assert teacher.calls == 1 and teacher.training and torch.equal(_flat(teacher), before)
    torch.testing.assert_close(engine.buffer.provenance()["teacher_p_target"], torch.tensor([0.3, 0.7]))
    state = engine.state_dict()["teacher"]
    assert state == {"kind": "model", "updates": 0}  # the user owns that model's weights
    engine.close()


def test_missing_teachers_are_clear_errors():
    for kw, field in ((dict(label_mode="teacher"), "label_mode='teacher'"),
                      (dict(filter_min_target=0.5), "filter_min_target"),
                      (dict(filter_max_target=0.9), "filter_max_target"),
                      (dict(curriculum="band"), "curriculum='band'")):
        with pytest.raises(ConfigError, match=f"{field}.*teacher='ema'.*teacher='model'"):
            HardNegConfig(num_classes=4, **kw)
    with pytest.raises(ConfigError, match="filter_min_target .* must be below filter_max_target"):
        HardNegConfig(num_classes=4, teacher="ema", filter_min_target=0.8, filter_max_target=0.5)
    with pytest.raises(ConfigError, match="difficulty_band"):
        HardNegConfig(num_classes=4, difficulty_band=(0.9, 0.6))
    with pytest.raises(ConfigError, match="teacher_decay"):
        HardNegConfig(num_classes=4, teacher_decay=1.0)
    with pytest.raises(ConfigError, match="min_pair_share"):
        HardNegConfig(num_classes=4, min_pair_share=1.5)
    with pytest.raises(HardNegError, match="teacher_model=m"):
        HardNeg(_cfg(teacher="model"), model=TinyNet())
    with pytest.raises(HardNegError, match="set teacher='model'"):
        HardNeg(_cfg(), model=TinyNet(), teacher_model=TinyNet())
    with pytest.raises(HardNegError, match="model="):
        HardNeg(_cfg(teacher="ema"))
    cfg = HardNegConfig(num_classes=4, teacher="ema", curriculum="band", difficulty_band=[0.5, 0.8])
    assert cfg.difficulty_band == (0.5, 0.8) and HardNegConfig.from_dict(cfg.to_dict()) == cfg


def test_teacher_state_round_trips():
    model = TinyNet()
    a = Teacher("ema", model=model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    for _ in range(3):
        a.update(model)
    b = Teacher("ema", model=TinyNet(), decay=0.9)
    b.load_state_dict(a.state_dict())
    assert b.updates == 3 and torch.equal(_flat(b.module), _flat(a.module))
    with pytest.raises(ValueError, match="'model'"):
        b.load_state_dict({"kind": "model", "updates": 0})


def test_ema_teacher_keeps_decay_of_its_own_weights_at_each_step():
    """teacher_decay = 0.8 (at 0.5 a decay applied the wrong way round gives the same weights): after one
    step the teacher has closed 20 % of its gap to the model."""
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    engine = HardNeg(_cfg(teacher="ema", teacher_decay=0.8, teacher_warmup=False, refresh_every=100), model=model)
    teacher = engine.teacher.module
    ids = torch.arange(16)
    _observe(engine, model, data, ids)  # timm's first update copies the model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    gap_before = _flat(model) - _flat(teacher)
    _observe(engine, model, data, ids)
    torch.testing.assert_close(_flat(model) - _flat(teacher), gap_before * 0.8, rtol=0, atol=1e-6)
    engine.close()
