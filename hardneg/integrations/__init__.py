"""Trainer adapters, each a thin layer over :class:`hardneg.HardNeg`; each imports its trainer lazily.

- :mod:`hardneg.integrations.lightning`: ``HardNegCallback`` (+ ``HardNegLightningMixin``)
- :mod:`hardneg.integrations.transformers`: ``HardNegTrainer`` (``HardNegTrainerMixin``) + its callback
- :mod:`hardneg.integrations.accelerate`: ``HardNegAccelerate`` (one gathered bank on every rank)
- :mod:`hardneg.integrations.timm`: ``HardNegTimm`` (a ``mixup_fn``-shaped callable) + ``IndexedDataset``

Importing this package imports none of them; see ``docs/integrations.md``.
"""
