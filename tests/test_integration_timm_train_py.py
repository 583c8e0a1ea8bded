"""timm adapter with timm's own train.py building blocks: create_dataset / create_loader on an image
folder, resolve_data_config, ClassificationTask, and the loop of train_one_epoch with the edits
docs/integrations.md lists; the prefetcher fails with an error saying to turn it off."""

import pytest
import torch

timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402
from timm.data import create_dataset, create_loader, resolve_data_config  # noqa: E402
from timm.task import ClassificationTask  # noqa: E402

from _fake_generators import PixelIdentityGenerator  # noqa: E402
from hardneg import HardNeg, HardNegConfig, normalization_from  # noqa: E402
from hardneg.integrations.timm import HardNegTimm, IndexedDataset  # noqa: E402
from hardneg.plugin import HardNegError  # noqa: E402

K = 4
COLOURS = [(230, 30, 40), (30, 200, 60), (40, 60, 230), (200, 190, 20)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """data/train/<class>/<i>.png: 8 RGB 16x16 images per class, a class colour plus noise."""
    root = tmp_path_factory.mktemp("timm") / "data"
    g = torch.Generator().manual_seed(0)
    for c, colour in enumerate(COLOURS):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(8):
            noise = torch.randint(-12, 13, (16, 16, 3), generator=g)
            pixels = (torch.tensor(colour).view(1, 1, 3) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _model():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=K)


def _loader(dataset, data_config, prefetcher):
    return create_loader(dataset, input_size=data_config["input_size"], batch_size=8, is_training=True,
                         no_aug=True, mean=data_config["mean"], std=data_config["std"], num_workers=0,
                         use_prefetcher=prefetcher, device=torch.device("cpu"))


def test_train_py_loop_with_timm_loader_and_task_mixes_normalised_hard_negatives(image_folder):
    model = _model()
    data_config = resolve_data_config({"input_size": (3, 16, 16)}, model=model)
    # train.py, after create_dataset(...):
    dataset_train = IndexedDataset(create_dataset("", root=str(image_folder), split="train", is_training=True))
    loader_train = _loader(dataset_train, data_config, prefetcher=False)  # --no-prefetcher
    mixup_fn = None  # no --mixup / --cutmix
    # train.py, right after create_loader(...):
    cfg = HardNegConfig(num_classes=K, top_pairs=2, knn_k=4, sources_per_pair=4, images_per_refresh=8,
                        generation_batch=4, synthetic_fraction=0.5, label_mode="hard", async_refresh=False,
                        seed=0, **normalization_from(data_config))
    engine = HardNeg(cfg, model=model, dataset=dataset_train, generator=PixelIdentityGenerator(K))
    mixup_fn = HardNegTimm(engine, mixup_fn)
    train_loss_fn = mixup_fn.soft_loss  # --smoothing's LabelSmoothingCrossEntropy takes no soft targets
    task = ClassificationTask(model=model, criterion=train_loss_fn, device=torch.device("cpu"), verbose=False)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
    device, args_prefetcher = torch.device("cpu"), False

    mixed_batches = []
    for epoch in range(4):  # train_one_epoch, edited as docs/integrations.md says
        task.get_trainable_module().train()
        for batch_idx, (input, target, ids) in enumerate(loader_train):
            if not args_prefetcher:
                input, target = input.to(device=device), target.to(device=device)
                if mixup_fn is not None:
                    input, target = mixup_fn(input, target)

            def _forward():
                result = task(input, target)
                mixup_fn.after_forward(result["output"], target, ids)
                return result["loss"], result

            loss, result = _forward()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if input.shape[0] > 8:
                mixed_batches.append((input.detach(), engine.last_mix_pairs))
        if engine.wait_for_generation(timeout=60) and mixed_batches:
            break
    mixup_fn.flush()  # the last step is observed after its backward: at the next call, flush() or close()
    s = engine.stats()
    mixup_fn.close()
    assert s["bank_size"] == 32 and s["step"] >= 4  # ids reached the bank through timm's loader
    assert s["worker"]["failures"] == 0  # the generator saw [0, 1] pixels only
    assert mixed_batches, "no batch carried hard negatives"
    x, pairs = mixed_batches[-1]
    syn = x[8:]
    real = torch.stack([dataset_train[i][0] for i in range(len(dataset_train))])
    labels = torch.tensor([dataset_train[i][1] for i in range(len(dataset_train))])
    for a in sorted({p[0] for p in pairs}):  # generated rows share their source class's normalised statistics
        rows = syn[torch.tensor([p[0] == a for p in pairs])]
        torch.testing.assert_close(rows.mean((0, 2, 3)), real[labels == a].mean((0, 2, 3)), atol=0.25, rtol=0)


def test_prefetcher_fails_with_an_error_saying_to_turn_it_off(image_folder):
    model = _model()
    data_config = resolve_data_config({"input_size": (3, 16, 16)}, model=model)
    dataset_train = IndexedDataset(create_dataset("", root=str(image_folder), split="train", is_training=True))
    loader_train = _loader(dataset_train, data_config, prefetcher=True)  # train.py's default
    with pytest.raises(HardNegError, match="--no-prefetcher"):
        for batch_idx, (input, target, ids) in enumerate(loader_train):
            pass
