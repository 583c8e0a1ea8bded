"""Related methods as documented options of the same hardneg engine (see ``docs/methods.md``).

* :mod:`hardneg.methods.da_fusion` — DA-Fusion same-class augmentation (``da_fusion_config``).
* :mod:`hardneg.methods.auggen` — AugGen mixed class conditions (new labels or soft labels).
* :mod:`hardneg.methods.long_tail` — the ``"long-tail"`` targeting policy and CAM-guided fusion.
* :mod:`hardneg.methods.embedding_negatives` — GCA-HNG embedding-space hard negatives for metric learning.
* :mod:`hardneg.methods.fake_to_real` — From Fake to Real: synthetic-only pretraining, real fine-tuning.

Importing this package registers the targeting policies that live here, so
``HardNegConfig(targeting="long-tail")`` works (``hardneg.targeting.make_policy`` imports it on demand).
Nothing here imports diffusers until a function that needs it is called.
"""

from __future__ import annotations

from hardneg.methods import long_tail  # noqa: F401  (registers "long-tail")
from hardneg.methods.da_fusion import da_fusion_config

__all__ = ["da_fusion_config", "long_tail"]
