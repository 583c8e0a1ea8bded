"""SyntheticBuffer: a bounded replay store of generated hard negatives with their provenance.

Every stored image keeps where it came from (dataset id and class of its source, the target class
it is labelled with, the noise ratio r, the steps it was requested and added at), its label
distribution (``target_weight`` w: the label is ``w * target + (1 - w) * source``), how hard it
was when it arrived (``teacher_p_target``, ``model_p_target``; NaN where not scored) and how often
training has used it. :meth:`SyntheticBuffer.sample` favours the class pairs the engine currently
cares about and fresh samples (a sample's weight halves every ``freshness_half_life`` steps);
samples used ``max_uses`` times are only drawn when nothing else is left and are evicted first.
Everything, images included, is in :meth:`SyntheticBuffer.state_dict`, so a resumed run draws
exactly what an uninterrupted one would.

Serves arrival (``add``, from :meth:`hardneg.HardNeg.collect`) and ``mix`` (``sample``); options:
:class:`BufferOptions` (buffer and mixing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hardneg.worker import GenerationResult

Pair = tuple[int, int]
_FIELDS = (
    "source_ids", "source_labels", "target_labels", "ratios", "step_added", "step_requested", "uses", "seq",
)
# Label distribution and difficulty at arrival: filled by the engine's arrival scoring.
SCORE_FIELDS = ("teacher_p_target", "model_p_target")
LABEL_FIELDS = ("target_weight", *SCORE_FIELDS)
_DEFAULTS = {"target_weight": 1.0, "teacher_p_target": float("nan"), "model_p_target": float("nan")}


@dataclass
class SyntheticSample:
    """A draw from the buffer: images labelled with their *target* class plus provenance.

    ``pairs`` is ``(k, 2)`` int64 (source class, target class); ``slots`` are buffer slot ids;
    ``target_weights`` (float32 ``(k,)``, None = all 1) is each row's weight on its target class,
    the rest of its label going to the source class.
    """

    images: Tensor
    labels: Tensor
    source_labels: Tensor
    ratios: Tensor
    pairs: Tensor
    slots: Tensor
    source_ids: Tensor
    steps: Tensor
    target_weights: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class SyntheticBuffer:
    """Fixed-capacity store of generated images; eviction drops exhausted, then oldest samples.

    Args:
        capacity: maximum number of stored images.
        seed: seeds the sampling generator (same seed + same calls = same draws).
        freshness_half_life: steps after which a sample's sampling weight halves.
        max_uses: uses after which a sample counts as exhausted (drawn last, evicted first).
        arrival_scores: list ``teacher_p_target`` / ``model_p_target`` in :meth:`provenance` (the
            engine sets it when a teacher scores arrivals; they are stored either way).
    """

    def __init__(
        self, capacity: int, seed: int = 0, freshness_half_life: float = 200, max_uses: int = 8,
        arrival_scores: bool = False,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if not freshness_half_life > 0:
            raise ValueError(f"freshness_half_life must be > 0, got {freshness_half_life!r}")
        if isinstance(max_uses, bool) or not isinstance(max_uses, int) or max_uses < 1:
            raise ValueError(f"max_uses must be an integer >= 1, got {max_uses!r}")
        self.capacity = capacity
        self.seed = int(seed)
        self.freshness_half_life = float(freshness_half_life)
        self.max_uses = max_uses
        self.arrival_scores = bool(arrival_scores)
        self._rng = torch.Generator().manual_seed(self.seed)
        self._images: Optional[Tensor] = None  # (capacity, C, H, W), allocated on the first add
        self._valid = torch.zeros(capacity, dtype=torch.bool)
        self._n_valid: Optional[int] = 0  # len(self), kept with _valid (None: count again); read every step
        self._meta: dict[str, Tensor] = {
            "source_ids": torch.zeros(capacity, dtype=torch.int64),
            "source_labels": torch.zeros(capacity, dtype=torch.int64),
            "target_labels": torch.zeros(capacity, dtype=torch.int64),
            "ratios": torch.zeros(capacity, dtype=torch.float32),
            "step_added": torch.zeros(capacity, dtype=torch.int64),
            "step_requested": torch.zeros(capacity, dtype=torch.int64),
            "uses": torch.zeros(capacity, dtype=torch.int64),
            "seq": torch.zeros(capacity, dtype=torch.int64),  # insertion order, for "oldest"
            **{key: torch.full((capacity,), _DEFAULTS[key], dtype=torch.float32) for key in LABEL_FIELDS},
        }
        self._next_seq = 0
        self._counts = {"added": 0, "rejected": 0, "evicted": 0, "drawn": 0}

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        if self._n_valid is None:
            self._n_valid = int(self._valid.sum())
        return self._n_valid

    def reseed(self, seed: int) -> None:
        """Restart the sampling generator from ``seed`` (e.g. a per-rank stream); stored images stay."""
        self._rng.manual_seed(int(seed))

    @property
    def version(self) -> tuple[int, int]:
        """Changes whenever images are added or the whole state is replaced (``load_state_dict``);
        a draw can be taken back exactly (:meth:`undo_draw`) while it is unchanged."""
        return int(self._next_seq), id(self._meta)

    def rng_state(self) -> Tensor:
        """The sampling generator's state; taken before a draw, it lets :meth:`undo_draw` restore it."""
        return self._rng.get_state()

    def undo_draw(self, sample: SyntheticSample, rng_state: Tensor) -> None:
        """Take back the draw ``sample`` (its uses, the ``drawn`` counter, the sampling generator's
        ``rng_state`` from before it), as if it never happened: a prefetched draw that went unused.
        Only exact while :attr:`version` is the one the draw saw (the caller checks)."""
        self._meta["uses"][sample.slots] -= 1
        self._counts["drawn"] -= len(sample)
        self._rng.set_state(rng_state)

    @property
    def image_shape(self) -> Optional[tuple[int, ...]]:
        """``(C, H, W)`` of the stored images, or None before the first add."""
        return None if self._images is None else tuple(self._images.shape[1:])

    # ------------------------------------------------------------------ add / evict
    def add(self, result: "GenerationResult", step: int, target_weight: Optional[Tensor] = None,
            teacher_p_target: Optional[Tensor] = None, model_p_target: Optional[Tensor] = None) -> int:
        """Store a worker result's images at training ``step``; returns how many were stored.

        ``target_weight`` (default 1), ``teacher_p_target`` and ``model_p_target`` (default NaN) are
        per-row label weight and arrival scores. Rows with NaN/inf images or a non-finite target
        weight are rejected (counted in ``stats()["rejected"]``). When the buffer is full,
        exhausted samples go first (most used first), then the oldest.
        """
        images = result.images
        if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"result images must be a float (N, C, H, W) tensor, got {getattr(images, 'shape', images)}"
            )
        n = images.shape[0]
        if n == 0:
            return 0
        meta = {
            "source_ids": result.source_ids, "source_labels": result.source_labels,
            "target_labels": result.target_labels, "ratios": result.ratios,
        }
        given = {"target_weight": target_weight, "teacher_p_target": teacher_p_target,
                 "model_p_target": model_p_target}
        scores = {key: (torch.full((n,), _DEFAULTS[key]) if v is None else torch.as_tensor(v).reshape(-1))
                  for key, v in given.items()}
        for key, value in {**meta, **scores}.items():
            if value.shape[0] != n:
                raise ValueError(f"result has {n} images but {value.shape[0]} {key}")
        if self._images is not None and tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"result images have shape (C, H, W) = {tuple(images.shape[1:])} but this buffer stores "
                f"{self.image_shape}; every generated image must match the training data"
            )
        images = images.detach().to("cpu")
        finite = torch.isfinite(images).flatten(1).all(1) & torch.isfinite(scores["target_weight"].cpu())
        keep = finite.nonzero().flatten()
        self._counts["rejected"] += int(n - keep.numel())
        if keep.numel() > self.capacity:  # one oversized result: keep its first `capacity` rows
            keep = keep[: self.capacity]
        k = int(keep.numel())
        if k == 0:
            return 0
        if self._images is None:
            # empty, not zeros: the OS commits memory only as slots fill (large images add up)
            self._images = torch.empty((self.capacity, *images.shape[1:]), dtype=images.dtype)
        slots = self._free_slots(k)
        self._images[slots] = images[keep].to(self._images.dtype)
        m = self._meta
        m["source_ids"][slots] = meta["source_ids"].to("cpu", torch.int64)[keep]
        m["source_labels"][slots] = meta["source_labels"].to("cpu", torch.int64)[keep]
        m["target_labels"][slots] = meta["target_labels"].to("cpu", torch.int64)[keep]
        m["ratios"][slots] = meta["ratios"].to("cpu", torch.float32)[keep]
        for key, value in scores.items():
            m[key][slots] = value.to("cpu", torch.float32)[keep]
        m["step_added"][slots] = int(step)
        m["step_requested"][slots] = int(result.step)
        m["uses"][slots] = 0
        m["seq"][slots] = torch.arange(self._next_seq, self._next_seq + k)
        self._next_seq += k
        self._valid[slots] = True
        self._n_valid = None
        self._counts["added"] += k
        return k

    def _free_slots(self, k: int) -> Tensor:
        """``k`` slots to write: empty ones first, then evicted ones in :meth:`eviction_order`."""
        free = (~self._valid).nonzero().flatten()[:k]
        missing = k - free.numel()
        if missing <= 0:
            return free
        victims = self.eviction_order()[:missing]
        self._valid[victims] = False
        self._n_valid = None
        self._counts["evicted"] += int(victims.numel())
        return torch.cat([free, victims])

    def eviction_order(self) -> Tensor:
        """Occupied slots in the order they would be evicted: exhausted (most used first), then oldest."""
        slots = self._valid.nonzero().flatten()
        uses = self._meta["uses"][slots]
        seq = self._meta["seq"][slots]
        exhausted = uses >= self.max_uses
        # Stable sorts from the least to the most significant key.
        order = torch.argsort(seq, stable=True)
        key2 = torch.where(exhausted, -uses, torch.zeros_like(uses))[order]
        order = order[torch.argsort(key2, stable=True)]
        key1 = (~exhausted).to(torch.int64)[order]
        order = order[torch.argsort(key1, stable=True)]
        return slots[order]

    # ------------------------------------------------------------------ sample
    def sampling_weights(
        self, step: int, pair_weights: Optional[Mapping[Pair, float]] = None, unlisted_weight: float = 0.05
    ) -> Tensor:
        """Unnormalised draw weight of every slot (0 for empty slots) at training ``step``.

        freshness ``0.5 ** (age / half_life)`` times the pair's weight; with ``pair_weights``
        the listed pairs are scaled so the largest is 1 and unlisted pairs get ``unlisted_weight``.
        """
        slots = self._valid.nonzero().flatten()
        w = torch.zeros(self.capacity, dtype=torch.float64)
        if slots.numel() == 0:
            return w
        age = (int(step) - self._meta["step_added"][slots]).clamp_min(0).to(torch.float64)
        log_w = -age / self.freshness_half_life * math.log(2.0)
        if pair_weights:
            top = max(max(float(v), 0.0) for v in pair_weights.values())
            src = self._meta["source_labels"][slots]
            tgt = self._meta["target_labels"][slots]
            # one (K, K) table of factors looked up per slot: O(pairs) Python, not O(slots) (this runs on
            # the prefetch thread, where every Python line holds the GIL the training step waits for)
            k = 1 + max(int(src.max()), int(tgt.max()), *(max(int(a), int(b)) for a, b in pair_weights))
            table = torch.full((k, k), float(unlisted_weight), dtype=torch.float64)
            for (a, b), v in pair_weights.items():
                if a >= 0 and b >= 0:
                    table[a, b] = max(float(v), 0.0) / top if top > 0 else 0.0
            factor = table[src, tgt]
            if bool((factor > 0).any()):  # favour, never starve: all-zero factors fall back to freshness
                log_w = log_w + torch.log(factor)
        # Relative to the best sample so old samples never underflow to exactly 0; a floor keeps
        # every stored sample drawable once the favoured ones run out.
        rel = torch.exp(log_w - log_w.max())
        w[slots] = rel.clamp_min(1e-12)
        return w

    def sample(
        self,
        n: int,
        step: int,
        pair_weights: Optional[Mapping[Pair, float]] = None,
        unlisted_weight: float = 0.05,
    ) -> Optional[SyntheticSample]:
        """Draw up to ``n`` distinct samples (None when empty) and count one use for each.

        Probability follows :meth:`sampling_weights`; samples used ``max_uses`` times are only
        drawn when not enough others are stored.
        """
        n = int(n)
        count = len(self)
        if n <= 0 or count == 0 or self._images is None:
            return None
        k = min(n, count)
        w = self.sampling_weights(step, pair_weights, unlisted_weight)
        exhausted = self._valid & (self._meta["uses"] >= self.max_uses)
        fresh_w = torch.where(exhausted, torch.zeros_like(w), w)
        n_fresh = int((fresh_w > 0).sum())
        if n_fresh >= k:
            slots = torch.multinomial(fresh_w, k, replacement=False, generator=self._rng)
        else:
            first = (fresh_w > 0).nonzero().flatten()
            rest_w = torch.where(exhausted, w, torch.zeros_like(w))
            rest = torch.multinomial(rest_w, k - n_fresh, replacement=False, generator=self._rng)
            slots = torch.cat([first, rest])
        m = self._meta
        m["uses"][slots] += 1
        self._counts["drawn"] += k
        src, tgt = m["source_labels"][slots], m["target_labels"][slots]
        weights = m["target_weight"][slots].clone()
        return SyntheticSample(
            images=self._images[slots],
            labels=tgt.clone(),
            source_labels=src.clone(),
            ratios=m["ratios"][slots].clone(),
            pairs=torch.stack([src, tgt], dim=1),
            slots=slots,
            source_ids=m["source_ids"][slots].clone(),
            steps=m["step_added"][slots].clone(),
            target_weights=None if bool((weights == 1).all()) else weights,
        )

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        """Size, per-pair counts (``"a->b"`` keys), mean r and uses, lifetime counters."""
        slots = self._valid.nonzero().flatten()
        m = self._meta
        pairs: dict[str, int] = {}
        for a, b in zip(m["source_labels"][slots].tolist(), m["target_labels"][slots].tolist()):
            key = f"{a}->{b}"
            pairs[key] = pairs.get(key, 0) + 1
        uses = m["uses"][slots].to(torch.float64)
        return {
            "size": int(slots.numel()),
            "capacity": self.capacity,
            "pairs": dict(sorted(pairs.items(), key=lambda kv: -kv[1])),
            "mean_r": float(m["ratios"][slots].double().mean()) if slots.numel() else None,
            "mean_target_weight": float(m["target_weight"][slots].double().mean()) if slots.numel() else None,
            "mean_uses": float(uses.mean()) if slots.numel() else 0.0,
            "max_uses": int(uses.max()) if slots.numel() else 0,
            "exhausted": int((uses >= self.max_uses).sum()),
            **self._counts,
        }

    def provenance(self) -> dict[str, Tensor]:
        """Per stored sample: slot, source id / class, target class, r, steps, uses, target weight
        (CPU tensors); with ``arrival_scores`` also ``teacher_p_target`` (the teacher's
        ``p_t / (p_s + p_t)`` at arrival) and ``model_p_target`` (the classifier's softmax
        probability of the target at arrival), NaN where not scored."""
        slots = self._valid.nonzero().flatten()
        out = {"slots": slots}
        keys = (*_FIELDS, "target_weight", *(SCORE_FIELDS if self.arrival_scores else ()))
        out.update({key: self._meta[key][slots].clone() for key in keys})
        return out

    def snapshot(self) -> Optional[SyntheticSample]:
        """Every stored sample as one :class:`SyntheticSample` (None when empty), read-only.

        Rows are in slot order, the order of :meth:`provenance` (row ``i`` is sample
        ``provenance()["slots"][i]``); ``images`` are a copy, ``target_weights`` are always given.
        Unlike :meth:`sample` it counts no use and leaves the sampling RNG alone, so reading the
        buffer (a report, a grid of negatives) never changes what training draws next.
        """
        slots = self._valid.nonzero().flatten()
        if slots.numel() == 0 or self._images is None:
            return None
        m = self._meta
        src, tgt = m["source_labels"][slots], m["target_labels"][slots]
        return SyntheticSample(
            images=self._images[slots].clone(),
            labels=tgt.clone(),
            source_labels=src.clone(),
            ratios=m["ratios"][slots].clone(),
            pairs=torch.stack([src, tgt], dim=1),
            slots=slots,
            source_ids=m["source_ids"][slots].clone(),
            steps=m["step_added"][slots].clone(),
            target_weights=m["target_weight"][slots].clone(),
        )

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything, images and sampling RNG included, as tensors and plain Python values.

        Only occupied slots' images are saved (``images[i]`` belongs to ``slots[i]``).
        """
        slots = self._valid.nonzero().flatten()
        return {
            "capacity": self.capacity,
            "freshness_half_life": self.freshness_half_life,
            "max_uses": self.max_uses,
            "seed": self.seed,
            "image_shape": None if self._images is None else list(self._images.shape[1:]),
            "image_dtype": None if self._images is None else str(self._images.dtype).replace("torch.", ""),
            "slots": slots,
            "images": None if self._images is None else self._images[slots].clone(),
            "valid": self._valid.clone(),
            "meta": {key: value.clone() for key, value in self._meta.items()},
            "next_seq": self._next_seq,
            "counts": dict(self._counts),
            "rng_state": self._rng.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the capacity must match."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"state has capacity {state['capacity']}, this buffer {self.capacity}")
        missing = set(_FIELDS) - set(state["meta"])
        if missing:
            raise ValueError(f"buffer state lacks fields {sorted(missing)}")
        self.freshness_half_life = float(state["freshness_half_life"])
        self.max_uses = int(state["max_uses"])
        self.seed = int(state["seed"])
        self._valid = state["valid"].to("cpu", torch.bool).clone()
        self._n_valid = None
        if state["image_shape"] is None:
            self._images = None
        else:
            dtype = getattr(torch, state["image_dtype"])
            self._images = torch.empty((self.capacity, *state["image_shape"]), dtype=dtype)
            slots = state["slots"].to("cpu", torch.int64)
            if not torch.equal(slots, self._valid.nonzero().flatten()):
                raise ValueError("buffer state is inconsistent: saved slots do not match the valid mask")
            self._images[slots] = state["images"].detach().to("cpu", dtype)
        self._meta = {key: state["meta"][key].to("cpu").clone() for key in _FIELDS}
        for key in LABEL_FIELDS:  # states saved before label distributions existed: hard labels, unscored
            saved = state["meta"].get(key)
            self._meta[key] = (saved.to("cpu", torch.float32).clone() if saved is not None
                               else torch.full((self.capacity,), _DEFAULTS[key], dtype=torch.float32))
        self._next_seq = int(state["next_seq"])
        self._counts = {key: int(v) for key, v in state["counts"].items()}
        self._rng.set_state(state["rng_state"].to("cpu"))


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class BufferOptions:
    """The synthetic buffer's and the mixing's settings (``HardNegConfig`` fields of the same names;
    ``buffer_options``)."""

    buffer_size: int = 2048
    synthetic_fraction: float = 0.25
    mix_mode: str = "append"  # "append" | "substitute" (hardneg.mixing.mix_batch)
    synthetic_weight: float = 1.0
    freshness_half_life: int = 200  # steps after which a sample's sampling weight halves
    max_uses: int = 8  # a synthetic sample used this often is evicted first
    separate_synthetic_loss: bool = False

    def __post_init__(self) -> None:
        from hardneg._checks import choice, in_range, int_at_least

        int_at_least(self, "buffer_size", 1)
        in_range(self, "synthetic_fraction", 0.0, 1.0, high_open=True)
        choice(self, "mix_mode", ("append", "substitute"))
        in_range(self, "synthetic_weight", 0.0, float("inf"))
        int_at_least(self, "freshness_half_life", 1)
        int_at_least(self, "max_uses", 1)
