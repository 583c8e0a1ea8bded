"""timm's training loop on the built-in digits with online GeNIe hard negatives.

    python examples/timm_digits.py --max-steps 150                   # timm's test_resnet
    python examples/timm_digits.py --model resnet10t --mixup 0.2      # any timm model, with Mixup

The loop below has the shape of ``train_one_epoch`` in timm's ``train.py`` (timm model, optimizer
and scheduler factories, ``Mixup``, ``SoftTargetCrossEntropy``, ``lr_scheduler.step_update``) plus
the two hardneg lines: ``mixup_fn = HardNegTimm(engine, mixup_fn)`` and
``mixup_fn.after_forward(output, target, ids)``. timm datasets yield ``(input, target)``;
``IndexedDataset`` adds the sample id hardneg keys its bank by.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from hardneg.integrations.timm import HardNegTimm, IndexedDataset  # noqa: E402
from hardneg.plugin import HardNeg  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--model", default="test_resnet", help="timm model name (built from config, no download)")
    p.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (0: off)")
    p.add_argument("--smoothing", type=float, default=0.1)
    args = p.parse_args(argv)
    started = time.perf_counter()
    train, test = _common.digits(args)
    model = timm.create_model(args.model, pretrained=False, num_classes=train.num_classes, in_chans=1)
    mixup_fn = None
    if args.mixup > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=0.0, label_smoothing=args.smoothing,
                         num_classes=train.num_classes)
        loss_fn: torch.nn.Module = SoftTargetCrossEntropy()
    else:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=0.05)
    lr_scheduler = CosineLRScheduler(optimizer, t_initial=args.max_steps,
                                     warmup_t=min(10, args.max_steps // 10), warmup_lr_init=args.lr / 10,
                                     t_in_epochs=False)
    gen = _common.generator(args, train)
    engine = HardNeg(_common.config(args, train.num_classes, gen), model=model, class_names=train.class_names,
                     dataset=train, generator=gen)
    mixup_fn = HardNegTimm(engine, mixup_fn)                                  # hardneg line 1

    dataset_train = IndexedDataset(TensorDataset(train.images, train.labels))  # (input, target) -> + index
    loader = DataLoader(dataset_train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    model.train()
    num_updates = 0
    try:
        while num_updates < args.max_steps:
            for batch_idx, (input, target, ids) in enumerate(loader):
                if mixup_fn is not None:
                    input, target = mixup_fn(input, target)
                output = model(input)
                loss = loss_fn(output, target)
                mixup_fn.after_forward(output, target, ids)                   # hardneg line 2
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                num_updates += 1
                lr_scheduler.step_update(num_updates=num_updates)
                if num_updates >= args.max_steps:
                    break
        mixup_fn.flush()  # the last step's observe (each one runs after its backward, at the next call)
        return _common.summary("timm", engine, model, test, started, model_name=args.model)
    finally:
        mixup_fn.close()


if __name__ == "__main__":
    main()
