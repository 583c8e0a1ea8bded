"""🤗 transformers Trainer on the built-in digits with online GeNIe hard negatives.

    python examples/transformers_digits.py --max-steps 150
    python examples/transformers_digits.py --max-steps 200 --resume    # continue from the last checkpoint

``HardNegTrainer`` is ``transformers.Trainer`` with the engine in ``compute_loss``: it takes the
``sample_id`` column out of each batch, mixes ready hard negatives into ``pixel_values``/``labels``,
observes the classifier's input embedding, the logits and the ids, and returns the weighted
cross-entropy. ``HardNegTrainerCallback`` writes the engine state into every checkpoint folder
(``hardneg_state.pt``) and restores it on ``resume_from_checkpoint``. The model is a small
``ResNetForImageClassification`` built from its config (no download).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional, Sequence

import torch
import transformers
from torch.utils.data import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from hardneg.data import ImageDataset  # noqa: E402
from hardneg.integrations.transformers import (  # noqa: E402
    HardNegTrainer, HardNegTrainerCallback, WithSampleIds,
)


class DigitsAsDicts(Dataset):
    """Items the way image-classification pipelines give them: ``{"pixel_values", "labels"}``."""

    def __init__(self, data: ImageDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.data.images[i], "labels": int(self.data.labels[i])}


def make_model(num_classes: int, names: Sequence[str]) -> Any:
    cfg = transformers.ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                    layer_type="basic", num_labels=num_classes,
                                    id2label=dict(enumerate(names)),
                                    label2id={n: i for i, n in enumerate(names)})
    return transformers.ResNetForImageClassification(cfg)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in OUT/transformers")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps")
    args = p.parse_args(argv)
    started = time.perf_counter()
    train, test = _common.digits(args)
    gen = _common.generator(args, train)
    train_set = WithSampleIds(DigitsAsDicts(train))              # adds the "sample_id" column
    model = make_model(train.num_classes, train.class_names)
    out = os.path.join(args.out, "transformers")
    targs = transformers.TrainingArguments(
        output_dir=out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, use_cpu=True, report_to=[], save_strategy="steps", save_steps=args.ckpt_every,
        logging_steps=max(args.max_steps // 4, 1), disable_tqdm=True, seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = HardNegTrainer(
        model=model, args=targs, train_dataset=train_set,
        hardneg=HardNegTrainerCallback(_common.config(args, train.num_classes, gen), dataset=train_set,
                                       generator=gen),
    )
    resume = args.resume and transformers.trainer_utils.get_last_checkpoint(out) is not None
    trainer.train(resume_from_checkpoint=True if resume else None)
    return _common.summary("transformers", trainer.hardneg, model, test, started,
                           restored_from=trainer.hardneg_callback.restored_from)


if __name__ == "__main__":
    main()
