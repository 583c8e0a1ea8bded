"""From a targeting plan to generation requests: sources, r, GeNIe-Ada grid, seeds.

Serves the refresh event: after a policy planned which pairs get how many images
(:class:`hardneg.targeting.PlannedPair`), :meth:`RequestBuilder.build` yields the worker requests,
in order. Per planned pair it takes the next sources (:class:`hardneg.sources.SourceCursor`), the
noise ratio r from the curriculum (logged there) unless the plan fixes it, fetches the source
images from the user's dataset by sample id, moves them into the generator's pixel space
(:class:`hardneg.value_space.ValueSpace`), repeats each source at every r of ``ada_grid`` when the
curriculum is GeNIe-Ada (the engine picks one per source on arrival), and gives each request a
seed from the config seed and its request id, so a seeded run repeats its images. The caller
(:class:`hardneg.HardNeg`) submits them and counts them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from hardneg.items import item_image
from hardneg.sources import SourceCursor
from hardneg.validation import HardNegError
from hardneg.value_space import ValueSpace, ValueSpaceError
from hardneg.worker import GenerationRequest

if TYPE_CHECKING:  # pragma: no cover
    from hardneg.curriculum import Curriculum
    from hardneg.targeting import PlannedPair

__all__ = ["RequestBuilder", "request_seed"]

SEED_STRIDE = 1_000_003  # request seed = config seed * SEED_STRIDE + request id


def request_seed(seed: int, request_id: int) -> int:
    """The generation seed of request ``request_id`` of a run seeded ``seed``."""
    return seed * SEED_STRIDE + request_id


class RequestBuilder:
    """Turns plans into :class:`~hardneg.worker.GenerationRequest` s; keeps what must persist.

    Args:
        dataset: indexable training set; item ``i`` starts with the image of sample id ``i``.
        value_space: the pipeline's normalisation (sources are un-normalised for the generator).
        seed: the config seed (request seeds derive from it).
        generation_batch: images per request (per request ``generation_batch // len(grid)``
            sources with GeNIe-Ada).
        ada_grid: the r grid of GeNIe-Ada.

    State (``state_dict``): the source cursor, the next request id, the GeNIe-Ada requests still
    out (request id -> grid) and the value range of every source sent (the arrival range check).
    """

    def __init__(self, dataset: Any, value_space: ValueSpace, seed: int, generation_batch: int,
                 ada_grid: Sequence[float]) -> None:
        self.dataset = dataset
        self.value_space = value_space
        self.seed = int(seed)
        self.generation_batch = int(generation_batch)
        self.ada_grid = tuple(float(r) for r in ada_grid)
        self.cursor = SourceCursor()
        self.next_request_id = 0
        self.ada_requests: dict[int, tuple[float, ...]] = {}
        self.source_range: Optional[tuple[float, float]] = None  # value range of every source sent out

    def build(self, plan: "Sequence[PlannedPair]", curriculum: "Curriculum",
              step: int) -> Iterator[GenerationRequest]:
        """Yield the requests of ``plan`` (r from ``curriculum`` unless the plan fixes it)."""
        grid = self.ada_grid if curriculum.uses_ada else None
        for planned in plan:
            if planned.count <= 0 or not planned.source_ids:
                continue
            pair = planned.pair
            if planned.source_labels is not None and len(planned.source_labels) != len(planned.source_ids):
                raise HardNegError("PlannedPair.source_labels must have one label per source id")
            order = self.cursor.take(pair, len(planned.source_ids), planned.count)
            chosen = [planned.source_ids[i] for i in order]
            if planned.source_labels is not None:
                chosen_labels = [int(planned.source_labels[i]) for i in order]
            else:
                chosen_labels = [pair[0]] * len(chosen)
            if planned.ratios is not None:
                ratios_all = [float(r) for r in planned.ratios]
                use_grid = None
            else:
                r = float(curriculum.ratio(pair, step))
                curriculum.record(pair, step, r)
                ratios_all = [r] * len(chosen)
                use_grid = grid
            per_request = self.generation_batch if use_grid is None else max(1, self.generation_batch // len(use_grid))
            label = planned.label if planned.label is not None else pair[1]
            for c0 in range(0, len(chosen), per_request):
                ids = chosen[c0 : c0 + per_request]
                sources = torch.stack([item_image(self.dataset[i]).float().cpu() for i in ids])
                self.note_source_range(sources)  # in the pipeline's space, as generated rows are checked
                sources = self.generator_space(sources, ids)
                m = len(ids)
                ratios = torch.tensor(ratios_all[c0 : c0 + m], dtype=torch.float32)
                src_ids = torch.as_tensor(ids, dtype=torch.long)
                if use_grid is not None:  # GeNIe-Ada: every source at every grid r, chosen on return
                    sources = sources.repeat_interleave(len(use_grid), 0)
                    src_ids = src_ids.repeat_interleave(len(use_grid))
                    ratios = torch.tensor(use_grid, dtype=torch.float32).repeat(m)
                    m = m * len(use_grid)
                src_labels = torch.as_tensor(chosen_labels[c0 : c0 + len(ids)], dtype=torch.long)
                if use_grid is not None:
                    src_labels = src_labels.repeat_interleave(len(use_grid))
                req = GenerationRequest(
                    request_id=self.next_request_id, pair=pair, source_ids=src_ids, sources=sources,
                    source_labels=src_labels,
                    target_labels=torch.full((m,), label, dtype=torch.long), ratios=ratios, step=step,
                    seed=request_seed(self.seed, self.next_request_id),
                )
                if use_grid is not None:
                    self.ada_requests[req.request_id] = use_grid
                self.next_request_id += 1
                yield req

    def generator_space(self, images: Tensor, ids: Sequence[int]) -> Tensor:
        """Dataset (pipeline-space) images -> the generator's pixels; a clear error when out of range."""
        try:
            return self.value_space.to_pixels(images, ids)
        except ValueSpaceError as exc:
            raise HardNegError(str(exc)) from None

    def note_source_range(self, sources: Tensor) -> None:
        lo, hi = float(sources.min()), float(sources.max())
        if self.source_range is not None:
            lo, hi = min(lo, self.source_range[0]), max(hi, self.source_range[1])
        self.source_range = (lo, hi)

    def pop_ada_grid(self, request_id: int) -> Optional[tuple[float, ...]]:
        """The grid of a GeNIe-Ada request (forgotten here), or None for a plain request."""
        return self.ada_requests.pop(request_id, None)
