"""transformers adapter: real Trainer runs of a tiny ViT (CPU, a few steps), checkpoint and resume."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _fake_generators import FakeGenerator  # noqa: E402
from hardneg import HardNegConfig  # noqa: E402
from hardneg.data import from_tensors  # noqa: E402
from hardneg.integrations.transformers import (  # noqa: E402
    STATE_FILE, HardNegTrainer, HardNegTrainerCallback, WithSampleIds,
)
from hardneg.plugin import HardNegError  # noqa: E402

K = 4


class DictImages(torch.utils.data.Dataset):
    """Items as an image-classification pipeline gives them: {"pixel_values", "labels"}."""

    def __init__(self, n_per_class=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(K).repeat_interleave(n_per_class)
        x = torch.rand(len(y), 1, 8, 8, generator=g) * 0.3
        for c in range(K):
            x[y == c, :, c : c + 2, :] += 0.7
        self.data = from_tensors(x.clamp(0, 1), y)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"pixel_values": self.data.images[i], "labels": int(self.data.labels[i])}


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 num_labels=K,
                                 id2label={i: f"c{i}" for i in range(K)},
                                 label2id={f"c{i}": i for i in range(K)})
    return transformers.ViTForImageClassification(cfg)


def _args(out, **kw):
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=8, max_steps=8,
                save_strategy="steps", save_steps=4, logging_steps=100, disable_tqdm=True, seed=0,
                learning_rate=1e-3, dataloader_num_workers=0, save_only_model=False)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _cfg(**kw):
    base = dict(num_classes=K, refresh_every=2, top_pairs=2, knn_k=4, sources_per_pair=4,
                images_per_refresh=8,
                generation_batch=4, buffer_size=64, synthetic_fraction=0.25, seed=0)
    base.update(kw)
    return HardNegConfig(**base)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One 12-step HardNegTrainer run that checkpoints at steps 6 and 12 (shared to keep the suite fast)."""
    out = tmp_path_factory.mktemp("hf")
    train = WithSampleIds(DictImages())
    trainer = HardNegTrainer(model=_model(), args=_args(out, max_steps=12, save_steps=6), train_dataset=train,
                             eval_dataset=train,
                             hardneg=HardNegTrainerCallback(_cfg(synthetic_weight=0.5, deterministic=True),
                                                            generator=FakeGenerator()))
    sizes = []
    trainer.model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["pixel_values"].shape[0])
                                            if m.training else None, with_kwargs=True)
    trainer.train()
    return trainer, out, sizes


def test_trainer_run_mixes_observes_and_checkpoints(first_run):
    trainer, out, sizes = first_run
    engine = trainer.hardneg
    s = engine.stats()
    assert s["step"] == 12  # one observation per training batch
    assert s["bank_size"] == 64  # remove_unused_columns kept the id column: every sample has its id
    assert s["refreshes"] >= 1
    assert engine.class_names == ["c0", "c1", "c2", "c3"]  # from the model's id2label
    assert s["worker"]["alive"] is False  # on_train_end stopped the worker
    assert s["synthetic_used"] > 0
    assert s["synthetic_feedback"] == s["synthetic_used"]  # synthetic rows were recognised in observe
    assert max(sizes) == 8 + 2  # appended hard negatives reached the model
    for step in (6, 12):
        assert os.path.isfile(out / f"checkpoint-{step}" / STATE_FILE)


def test_evaluation_drops_the_id_column(first_run):
    trainer, _, _ = first_run
    metrics = trainer.evaluate()  # eval items carry sample_id too; the model must not receive it
    assert metrics["eval_loss"] > 0


def test_resume_from_checkpoint_restores_the_engine(first_run):
    _, out, _ = first_run
    saved = torch.load(out / "checkpoint-12" / STATE_FILE, weights_only=True)
    assert saved["step"] == 12

    seen = {}

    class Probe(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen["step"] = second.hardneg.step
            seen["bank"] = len(second.hardneg.bank)
            seen["buffer"] = len(second.hardneg.buffer)

    second = HardNegTrainer(model=_model(), args=_args(out, max_steps=14, save_steps=100),
                            train_dataset=WithSampleIds(DictImages()), hardneg=_cfg())
    second.add_callback(Probe())
    second.train(resume_from_checkpoint=True)
    assert second.hardneg_callback.restored_from == str(out / "checkpoint-12" / STATE_FILE)
    assert seen == {"step": 12, "bank": len(saved["bank"]["ids"]),
                    "buffer": int(saved["buffer"]["valid"].sum())}
    assert second.hardneg.step == 14


def test_missing_id_column_fails_with_advice(tmp_path):
    trainer = HardNegTrainer(model=_model(), args=_args(tmp_path, max_steps=1, save_strategy="no"),
                             train_dataset=DictImages(), hardneg=_cfg())
    with pytest.raises(HardNegError, match="sample ids"):
        trainer.train()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_synthetic_labels_reach_the_loss_and_observe_gets_class_ids(tmp_path, smoothing):
    from types import SimpleNamespace

    import torch.nn.functional as F

    from _engine_generators import make_result, spy_observe
    from hardneg.mixing import weighted_loss

    train = WithSampleIds(DictImages())
    cb = HardNegTrainerCallback(_cfg(label_mode="soft-r", label_gamma=2.0, synthetic_weight=0.5))
    trainer = HardNegTrainer(model=_model(), args=_args(tmp_path, label_smoothing_factor=smoothing),
                             train_dataset=train, hardneg=cb)
    model = trainer.model
    cb.on_train_begin(trainer.args, SimpleNamespace(global_step=0), None, model=model)
    engine = cb.engine
    engine._accept([make_result(train.dataset.data.images[:2], (0, 1), 0.5)])
    mixed = []
    mix = engine.mix_batch
    engine.mix_batch = lambda x, y: mixed.append(mix(x, y)) or mixed[-1]
    seen = spy_observe(engine)
    items = [train[i] for i in range(0, 64, 8)]
    inputs = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
              "labels": torch.tensor([it["labels"] for it in items]),
              "sample_id": torch.tensor([it["sample_id"] for it in items])}
    model.train()
    loss = trainer.compute_loss(model, inputs)
    cb.flush()  # what training_step does once backward has run
    m, = mixed
    assert m.y.shape == (10, K)  # 8 real rows + round(0.25 * 8) generated ones, soft targets
    torch.testing.assert_close(m.y[8:], torch.tensor([[0.75, 0.25, 0.0, 0.0]] * 2))
    logits = model(pixel_values=m.x).logits.float()
    per_sample = F.cross_entropy(logits, m.y, reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(loss, weighted_loss(per_sample, m.weights, m.synthetic_mask))
    assert seen[0].dtype == torch.int64 and seen[0][8:].tolist() == [1, 1]
    assert engine.stats()["synthetic_feedback"] == 2
    cb.close()


def test_generated_rows_never_enter_or_overwrite_the_bank(tmp_path):
    from types import SimpleNamespace

    from _bank_checks import assert_bank_holds_only_real_rows, record_head_inputs
    from _engine_generators import make_result

    train = WithSampleIds(DictImages())
    cb = HardNegTrainerCallback(_cfg(label_mode="hard", refresh_every=1000))
    trainer = HardNegTrainer(model=_model(), args=_args(tmp_path), train_dataset=train, hardneg=cb)
    model = trainer.model
    cb.on_train_begin(trainer.args, SimpleNamespace(global_step=0), None, model=model)
    images = train.dataset.data.images
    cb.engine._accept([make_result(1 - images[:2], (0, 1), 0.5)])  # unlike any real image; source ids 0-1
    seen, handle = record_head_inputs(model.classifier)
    model.train()
    all_ids = []
    for start in (0, 1):  # two mixed steps; id 0 among the real rows
        items = [train[i] for i in range(start, 64, 8)]
        inputs = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
                  "labels": torch.tensor([it["labels"] for it in items]),
                  "sample_id": torch.tensor([it["sample_id"] for it in items])}
        all_ids.append(inputs["sample_id"])
        trainer.compute_loss(model, inputs)
        cb.flush()  # what training_step does once backward has run
        assert seen[-1].shape[0] == 10  # 8 real rows + 2 generated ones
    handle.remove()
    ids = torch.cat(all_ids)
    assert_bank_holds_only_real_rows(cb.engine.bank, ids, torch.cat([e[:8] for e in seen]),
                                     train.dataset.data.labels[ids])
    assert cb.engine.stats()["synthetic_feedback"] == 4
    cb.close()


def _resnet(seed=0):
    """A tiny ResNet: unlike ViT, its checkpoint keys need no renaming, so the Trainer's own resume
    restores its weights (this transformers version's Trainer loads ViT checkpoints with missing keys)."""
    torch.manual_seed(seed)
    cfg = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=K,
                                    id2label={i: f"c{i}" for i in range(K)}, label2id={f"c{i}": i for i in range(K)})
    return transformers.ResNetForImageClassification(cfg)


def test_resume_from_a_mid_run_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    """deterministic=True: 12 steps equal 6 steps + ``train(resume_from_checkpoint=...)`` to 12
    (model weights, optimiser state, engine state at step 12)."""
    import shutil

    from _state_compare import state_differences

    def trainer(out):
        return HardNegTrainer(model=_resnet(), args=_args(out, max_steps=12, save_steps=6),
                              train_dataset=WithSampleIds(DictImages()),
                              hardneg=HardNegTrainerCallback(_cfg(deterministic=True), generator=FakeGenerator()))

    whole = trainer(tmp_path / "whole")
    whole.train()
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    second = trainer(tmp_path / "resumed")
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-6"))
    assert second.state.global_step == 12 and second.hardneg.step == 12
    assert state_differences(whole.model.state_dict(), second.model.state_dict()) == []
    assert state_differences(whole.optimizer.state_dict(), second.optimizer.state_dict()) == []
    a = torch.load(tmp_path / "whole" / "checkpoint-12" / STATE_FILE, weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint-12" / STATE_FILE, weights_only=True)
    assert a["counters"]["synthetic_used"] > 0
    assert state_differences(a, b) == []  # bank, confusion, curriculum, buffer with provenance, counters


def test_training_step_observes_after_backward(tmp_path):
    """The engine observes once the gradients exist (its one device read never stalls backward)."""
    from types import SimpleNamespace

    train = WithSampleIds(DictImages())
    cb = HardNegTrainerCallback(_cfg())
    trainer = HardNegTrainer(model=_model(), args=_args(tmp_path), train_dataset=train, hardneg=cb)
    model = trainer.model
    cb.on_train_begin(trainer.args, SimpleNamespace(global_step=0), None, model=model)
    grads_at_observe = []
    inner = cb.engine.observe

    def observe(*args, **kwargs):
        grads_at_observe.append(all(p.grad is not None for p in model.parameters() if p.requires_grad))
        return inner(*args, **kwargs)

    cb.engine.observe = observe
    items = [train[i] for i in range(0, 64, 8)]
    inputs = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
              "labels": torch.tensor([it["labels"] for it in items]),
              "sample_id": torch.tensor([it["sample_id"] for it in items])}
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's own loop before each step
    trainer.training_step(model, inputs)
    assert grads_at_observe == [True] and cb.engine.step == 1
    cb.close()
