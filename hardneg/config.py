"""HardNegConfig: every knob of the engine, composed of the typed options of its components.

Each component owns a frozen options dataclass in its own file, which validates its fields:
:class:`~hardneg.bank.BankOptions`, :class:`~hardneg.confusion.ConfusionOptions`,
:class:`~hardneg.generators.from_config.GenerationOptions`, :class:`~hardneg.buffer.BufferOptions`
(buffer and mixing), :class:`~hardneg.curriculum.CurriculumOptions`,
:class:`~hardneg.labels.LabelOptions`, :class:`~hardneg.value_space.ValueSpaceOptions`, and each
targeting policy its own (``ConfusionPolicyOptions``, ``SameClassOptions``, ``LongTailOptions``).
``HardNegConfig`` composes them: ``cfg.bank_options`` etc. are the typed views the engine builds its
parts from, and :meth:`HardNegConfig.compose` builds a config from them.

The flat keywords are the documented shorthand and what every script uses:
``HardNegConfig(num_classes=10, knn_k=..., refresh_every=..., curriculum=...)`` and
``cfg.replace(refresh_every=...)`` set the option of the same name (a policy's options have
prefixed flat names: ``confusion_direction``, ``min_pair_share``, ``same_class_strength``,
``long_tail_head_fraction``, ``long_tail_ratio``, ``long_tail_search_k``), and
:meth:`~HardNegConfig.to_dict` writes them flat, so saved configs and checkpoints of earlier
versions load unchanged (an old ``extra`` dict is mapped onto its typed fields).

Each invalid value raises :class:`ConfigError` naming the field, the value it got and the
allowed range, so a typo in a training script fails at start-up instead of hours later. Called by
every entry point (scripts, the CLI, the adapters) before an engine is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from hardneg._checks import ConfigError
from hardneg._checks import int_at_least as _int_at_least

if TYPE_CHECKING:  # pragma: no cover - the options live in their components' modules (loaded on use)
    from hardneg.bank import BankOptions
    from hardneg.buffer import BufferOptions
    from hardneg.confusion import ConfusionOptions
    from hardneg.curriculum import CurriculumOptions
    from hardneg.generators.from_config import GenerationOptions
    from hardneg.labels import LabelOptions
    from hardneg.value_space import ValueSpaceOptions

Metric = Literal["cosine", "l2"]
IndexKind = Literal["auto", "flat", "ivf", "ivfpq", "hnsw"]
WorkerBackend = Literal["thread", "process"]
MixMode = Literal["append", "substitute"]
Schedule = str  # a curriculum name: one of hardneg.curriculum.CURRICULA (the one list)
LabelMode = Literal["hard", "soft-r", "teacher"]
TeacherKind = Literal["none", "ema", "model"]


# refresh_every="auto": refresh about this many times per epoch (steps per epoch from the dataset length
# and the first observed batch), never less often than every AUTO_REFRESH_MAX steps.
AUTO_REFRESHES_PER_EPOCH = 4
AUTO_REFRESH_MAX = 50

# The typed options HardNegConfig composes: (property name, module, class). Each class's fields are
# HardNegConfig fields of the same names.
_GROUPS = (
    ("bank_options", "hardneg.bank", "BankOptions"),
    ("confusion_options", "hardneg.confusion", "ConfusionOptions"),
    ("generation_options", "hardneg.generators.from_config", "GenerationOptions"),
    ("buffer_options", "hardneg.buffer", "BufferOptions"),
    ("curriculum_options", "hardneg.curriculum", "CurriculumOptions"),
    ("label_options", "hardneg.labels", "LabelOptions"),
    ("value_space_options", "hardneg.value_space", "ValueSpaceOptions"),
)

# What each key of the removed ``extra`` dict became.
EXTRA_REPLACED = {
    "confusion_direction": "confusion_direction (ConfusionPolicyOptions.direction)",
    "same_class_strength": "same_class_strength (SameClassOptions.strength)",
    "long_tail_head_fraction": "long_tail_head_fraction (LongTailOptions.head_fraction)",
    "long_tail_ratio": "long_tail_ratio (LongTailOptions.ratio)",
    "long_tail_search_k": "long_tail_search_k (LongTailOptions.search_k)",
}


def _group_class(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(module), name)


def _extra_error(extra: Any) -> ConfigError:
    keys = sorted(extra) if isinstance(extra, dict) else []
    known = [f"{k!r} -> {EXTRA_REPLACED[k]}" for k in keys if k in EXTRA_REPLACED]
    unknown = [k for k in keys if k not in EXTRA_REPLACED]
    msg = "HardNegConfig(extra=...) is gone: every setting is a typed option with a flat keyword"
    if known:
        msg += "; pass " + ", ".join(known) + " instead"
    if unknown:
        msg += f"; {unknown} are not settings of hardneg (known: {sorted(EXTRA_REPLACED)})"
    if not keys:
        msg += f" (the old keys: {sorted(EXTRA_REPLACED)})"
    return ConfigError(msg)


@dataclass
class HardNegConfig:
    """Every setting of a :class:`hardneg.HardNeg` engine.

    Groups: embedding bank (``metric`` .. ``use_gpu_index``), confusion mining (``knn_k`` ..
    ``sources_per_pair``), generation (``generator`` .. ``max_restarts``), synthetic buffer and
    mixing (``buffer_size`` .. ``separate_synthetic_loss``), the noise-ratio curriculum
    (``curriculum`` .. ``difficulty_band``), label trust (``label_mode`` .. ``score_batch``) and the
    value space (``data_mean``, ``data_std``, ``pixel_range``: how the pipeline normalises its
    pixels, so generated images match the real ones; :func:`hardneg.value_space.normalization_from`
    reads them from a timm data config, an image processor or a transform).

    Label trust: every generated image carries a target weight w (its label is
    ``w * onehot(target) + (1 - w) * onehot(source)``): ``label_mode="hard"`` w = 1 (GeNIe as
    published), ``"soft-r"`` (the default: the best label mode measured, benchmarks/README.md,
    accuracy) w = r ** label_gamma, ``"teacher"`` w = the teacher's posterior of
    the target restricted to {source, target}. ``filter_min_target`` / ``filter_max_target`` drop
    arriving images whose teacher posterior is below / above them. The teacher is an EMA copy of
    the classifier (``teacher="ema"``) or a model you pass (``teacher="model"`` with
    ``HardNeg(..., teacher_model=m)``); the teacher label mode, filtering and the ``"band"``
    curriculum need one, and a config asking for them with ``teacher="none"`` is an error (no
    silent default: which teacher judges the labels is a choice worth writing down).

    A config is read-only once constructed (assigning a field raises :class:`ConfigError`): change
    settings with :meth:`replace` (or ``dataclasses.replace``), which validates the copy.
    """

    num_classes: int
    # --- embedding bank -------------------------------------------------------------------
    embedding_dim: Optional[int] = None  # inferred from the first observed batch when None
    metric: Metric = "cosine"
    index: IndexKind = "auto"
    ivf_threshold: int = 50_000  # "auto" switches from exact flat to IVF past this many vectors (= bank default)
    nprobe: int = 16
    use_gpu_index: bool = True  # only used when a FAISS GPU build and a GPU are present
    # "id-mod": in a torch.distributed run each rank stores the vectors of ids with id % world == rank
    # and refreshes collectively (hardneg.sharded_bank); every rank must observe the same gathered
    # batch, as HardNegAccelerate does. "off": every rank holds the whole bank.
    bank_sharding: Literal["off", "id-mod"] = "off"
    # Compressed storage for 10M+ samples: "float16" stores the vectors in half precision;
    # index="ivfpq" searches an IndexIVFPQ of bank_pq_bytes bytes a vector (must divide the
    # dimension), re-scoring bank_rerank * k candidates exactly (0: PQ scores as they are).
    bank_storage: Literal["float32", "float16"] = "float32"
    bank_pq_bytes: int = 32
    bank_rerank: int = 32
    bank_storage_path: Optional[str] = None  # keep the vectors in this file (memory-mapped), not in RAM
    # The confusion refresh's searches only (few queries: a deeper search is cheap there; training-time
    # searches keep bank_rerank / nprobe): 128 x k re-ranked makes an IVF-PQ refresh's neighbours
    # an exact search's (benchmarks/README.md). None: bank_rerank / nprobe.
    bank_refresh_rerank: Optional[int] = 128
    bank_refresh_nprobe: Optional[int] = None
    # the refresh's IVF search: "lists" scores every vector of the probed lists by one matrix product a list
    # (IVF: FAISS's neighbours, faster; IVF-PQ: exactly, bank_refresh_nprobe, None: 64 lists); "rerank":
    # FAISS's IVF search (IVF-PQ: bank_refresh_rerank x k PQ candidates; reads less of the file past ~10M)
    bank_refresh_search: Literal["rerank", "lists"] = "lists"
    bank_opq: bool = False  # index="ivfpq": rotate the vectors by a trained OPQ matrix before PQ (see EmbeddingBank)
    # Slots allocated when the bank is made (e.g. the dataset's length): a bank grown by doubling
    # may hold up to 2x the slots, metadata and id -> slot table it needs; None: grow as samples come.
    bank_reserve: Optional[int] = None
    # --- confusion mining -----------------------------------------------------------------
    knn_k: int = 10
    # steps between confusion refreshes (and generation requests); "auto": a quarter epoch, at most 50
    refresh_every: Union[int, Literal["auto"]] = "auto"
    # refresh after exactly these observed steps instead (a fixed schedule, e.g. equal-budget comparisons);
    # with deterministic=True each such refresh waits for the images it requested, trained on from the next step
    refresh_at: Optional[tuple[int, ...]] = None
    confusion_ema: float = 0.5  # weight of the newest refresh in the exponential moving average
    logit_weight: float = 0.5  # share of softmax confusion vs kNN disagreement in the score
    top_pairs: int = 5
    sources_per_pair: int = 16
    min_pair_score: float = 0.0  # pairs scoring at or below this are never targeted
    refresh_queries: int = 4096  # cap on bank samples used as kNN queries per refresh (stratified)
    async_refresh: bool = True  # mine confusion on a background thread, off the training step
    refresh_threads: int = 1  # FAISS (OpenMP) threads of the background refresh; 0 = FAISS's default (all cores)
    deterministic: bool = False  # sync refresh; hand generated images over only at refresh boundaries
    targeting: str = "confusion"  # which pairs get generated: see hardneg.targeting
    # --- the targeting policies' own options (flat names of their typed options) -----------
    confusion_direction: str = "auto"  # "confusion": generate A -> B as B -> A when B is much more frequent
    same_class_strength: Optional[float] = 0.5  # "same-class": fixed r, or None to draw it per image
    long_tail_head_fraction: float = 0.5  # "long-tail": share of the classes counted as head
    long_tail_ratio: Optional[float] = None  # "long-tail": fixed r (None: the curriculum's)
    long_tail_search_k: int = 64  # "long-tail": first kNN width when finding head sources
    # --- generation -----------------------------------------------------------------------
    generator: Optional[str] = None  # "class-conditional", "stable-diffusion" or None (mining only)
    generator_path: Optional[str] = None  # weights folder / hub id for the generator
    worker_backend: WorkerBackend = "thread"
    worker_threads: int = 1  # torch threads the worker may use (keeps a CPU box responsive)
    worker_device: str = "cpu"
    queue_size: int = 8  # pending generation requests; oldest dropped when full
    images_per_refresh: int = 32  # generated images requested per refresh, split over pairs
    generation_batch: int = 16  # images per generation request
    max_restarts: int = 3
    # settings handed to the generator the engine builds from ``generator`` (None: the backend's default)
    generator_steps: Optional[int] = None  # denoising steps of a full (r = 1) schedule
    guidance_scale: Optional[float] = None  # classifier-free guidance weight (SDXL-turbo: 0)
    generator_dtype: Optional[str] = None  # "fp16" | "bf16" | "fp32"; stable-diffusion default: fp16 on CUDA
    generator_compile: bool = False  # torch.compile the UNet in the worker
    generator_max_batch: Optional[int] = None  # samples per UNet call (bounds the worker's memory)
    prompt_template: Optional[str] = None  # stable-diffusion: e.g. "a photo of a {class_name}."
    prompts: Optional[Any] = None  # stable-diffusion: one prompt per class (list) or {class name: prompt}
    generator_scheduler: Optional[str] = None  # stable-diffusion: "dpm++" (default), "ddim", "euler", ...
    generator_resolution: Optional[Any] = None  # stable-diffusion model input size: int or (height, width)
    generator_options: dict[str, Any] = field(default_factory=dict)  # more keyword arguments for the loader
    worker_start_timeout: float = 600.0  # seconds HardNeg(...) waits for the generator to load
    # the worker's memory share: at most this many samples per generate call (a request is split;
    # any generator, both backends), and the share of the GPU the process backend's child may
    # allocate (torch.cuda.set_per_process_memory_fraction; the thread backend shares the
    # training process's allocator, so there only worker_max_batch bounds it). None: no bound.
    worker_max_batch: Optional[int] = None
    worker_memory_fraction: Optional[float] = None
    worker_warmup: bool = True  # one tiny generation at worker start (loads kernels, compiles)
    # seconds one generation request may run; a request past it fails (reason in worker stats) and the
    # worker is replaced within max_restarts. None: no deadline. Generous: a cold CPU diffusion call is slow.
    request_timeout: Optional[float] = 600.0
    # --- synthetic buffer and mixing ------------------------------------------------------
    buffer_size: int = 2048
    synthetic_fraction: float = 0.25
    mix_mode: MixMode = "append"
    synthetic_weight: float = 1.0
    freshness_half_life: int = 200  # steps after which a sample's sampling weight halves
    max_uses: int = 8  # a synthetic sample used this often is evicted first
    separate_synthetic_loss: bool = False
    # --- curriculum over the noise ratio r ------------------------------------------------
    curriculum: Schedule = "adaptive"
    r_start: float = 0.8
    r_end: float = 0.5
    r_min: float = 0.3
    r_max: float = 0.95
    total_steps: int = 1000  # horizon of the time-based schedules
    step_milestones: tuple[float, ...] = (0.5,)  # fractions of total_steps for the "step" schedule
    adaptive_high: float = 0.8  # pair accuracy on fresh negatives above this: lower r (harder)
    adaptive_low: float = 0.4  # below this: raise r (easier)
    adaptive_step: float = 0.05
    adaptive_min_samples: int = 8  # feedback samples needed before a pair's r moves
    ada_grid: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    # "band": per pair, the mean teacher posterior of fresh images below the band -> raise r, above -> lower r
    difficulty_band: tuple[float, float] = (0.6, 0.9)
    # --- label trust and arrival scoring --------------------------------------------------
    label_mode: LabelMode = "soft-r"  # target weight: 1 | r ** label_gamma (default) | teacher posterior
    label_gamma: float = 0.5  # exponent of r in the "soft-r" target weight (Diff-Mix style)
    teacher: TeacherKind = "none"  # who scores arriving images: an EMA of the classifier or a given model
    teacher_decay: float = 0.99  # EMA decay of teacher="ema" (per observed step)
    teacher_warmup: bool = True  # EMA decay ramps up from 0 over the first steps (timm ModelEmaV3 warmup)
    teacher_prior_correction: float = 1.0  # logit-adjust the teacher posterior by the bank's class prior (0 = off)
    filter_min_target: Optional[float] = None  # drop arriving images whose teacher posterior is below this
    filter_max_target: Optional[float] = None  # ... or above this (too easy)
    min_pair_share: float = 0.0  # pairs scoring below this share of the top pair's score get no images
    score_batch: int = 256  # images per forward when scoring arrivals
    # --- value space (see hardneg.value_space) ---------------------------------------------
    # The pipeline normalises pixels as (x - data_mean) / data_std per channel (None: plain pixels);
    # sources are un-normalised for the generator and its images normalised before mix.
    data_mean: Optional[tuple[float, ...]] = None
    data_std: Optional[tuple[float, ...]] = None
    pixel_range: tuple[float, float] = (0.0, 1.0)  # un-normalised pixels (the generator's space)
    # --- misc -----------------------------------------------------------------------------
    seed: int = 0
    # removed: passing it raises a ConfigError naming the typed option that replaced each old key
    extra: InitVar[Optional[dict[str, Any]]] = None

    def __post_init__(self, extra: Optional[dict[str, Any]] = None) -> None:
        if extra is not None:
            raise _extra_error(extra)
        self.validate()
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        # Frozen once validated: the engine reads fields live and its parts were built from them, so
        # `cfg.refresh_every = 0` would bypass validation (ZeroDivisionError later) or silently not apply.
        if self.__dict__.get("_frozen", False):
            raise ConfigError(
                f"HardNegConfig is read-only after construction (tried to set {name}={value!r}): make a "
                f"validated copy with cfg.replace({name}=...) and build the engine with it")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise ConfigError(f"HardNegConfig is read-only after construction (tried to delete {name})")

    # ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` for the first field outside its allowed range.

        Each component's options validate (and normalise, e.g. lists to tuples) their own fields;
        the checks that span components (a teacher for what needs one, one prompt per class) are here.
        """
        _int_at_least(self, "num_classes", 2)
        options: dict[str, Any] = {}
        for group, module, name in _GROUPS:
            cls = _group_class(module, name)
            opts = cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})
            for f in dataclasses.fields(cls):
                object.__setattr__(self, f.name, getattr(opts, f.name))
            options[group] = opts
            if group == "confusion_options":  # the order of the first error: as the fields are listed
                if not isinstance(self.targeting, str) or not self.targeting:
                    raise ConfigError(f"targeting must be a policy name (e.g. 'confusion'), got {self.targeting!r}")
                _validate_targeting(self)
        options["generation_options"].check_prompts(self.num_classes)
        from hardneg.targeting import POLICIES

        for entry in POLICIES.entries():  # every policy's options, so a typo fails whichever is chosen
            if entry.options is not None:
                options[entry.options] = entry.options.from_config(self)
        object.__setattr__(self, "_options", options)
        self._validate_label_trust()

    def _validate_label_trust(self) -> None:
        lo, hi = self.filter_min_target, self.filter_max_target
        needs = [why for why, on in (
            ("label_mode='teacher'", self.label_mode == "teacher"),
            ("filter_min_target", lo is not None),
            ("filter_max_target", hi is not None),
            ("curriculum='band'", self.curriculum == "band"),
        ) if on]
        if needs and self.teacher == "none":
            raise ConfigError(
                f"{', '.join(needs)} needs a teacher to score arriving images, but teacher='none': set "
                "teacher='ema' (an EMA copy of the classifier kept by the engine) or teacher='model' (pass "
                "HardNeg(..., teacher_model=m))"
            )

    # ------------------------------------------------------------------------------------ typed views
    @property
    def bank_options(self) -> "BankOptions":
        """The embedding bank's options."""
        return self.__dict__["_options"]["bank_options"]

    @property
    def confusion_options(self) -> "ConfusionOptions":
        """Confusion mining's options."""
        return self.__dict__["_options"]["confusion_options"]

    @property
    def generation_options(self) -> "GenerationOptions":
        """The generator's and the worker's options."""
        return self.__dict__["_options"]["generation_options"]

    @property
    def buffer_options(self) -> "BufferOptions":
        """The synthetic buffer's and the mixing's options."""
        return self.__dict__["_options"]["buffer_options"]

    @property
    def curriculum_options(self) -> "CurriculumOptions":
        """The noise-ratio curriculum's options."""
        return self.__dict__["_options"]["curriculum_options"]

    @property
    def label_options(self) -> "LabelOptions":
        """Label trust and arrival scoring options."""
        return self.__dict__["_options"]["label_options"]

    @property
    def value_space_options(self) -> "ValueSpaceOptions":
        """The pipeline's value space."""
        return self.__dict__["_options"]["value_space_options"]

    @property
    def policy_options(self) -> Any:
        """The chosen targeting policy's typed options (None for a policy without options)."""
        from hardneg.targeting import POLICIES

        cls = POLICIES.get(self.targeting).options
        return self.options_of(cls) if cls is not None else None

    def options_of(self, cls: type) -> Any:
        """The options of class ``cls`` (a component's or a policy's) from this config's fields."""
        opts = self.__dict__["_options"]
        if cls in opts:
            return opts[cls]
        for group in opts.values():
            if type(group) is cls:
                return group
        if hasattr(cls, "from_config"):  # a policy registered after this config was built
            return cls.from_config(self)
        raise ConfigError(f"{cls.__name__} are not options of HardNegConfig")

    @classmethod
    def compose(cls, num_classes: int, *options: Any, **flat: Any) -> "HardNegConfig":
        """A config from typed options (any of the component and policy options dataclasses) plus
        flat keywords; a setting given both ways is an error."""
        return cls(num_classes=num_classes, **_merge_options(options, flat))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly flat dict of every field (round-trips through :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        d["ada_grid"] = list(self.ada_grid)
        d["difficulty_band"] = list(self.difficulty_band)
        d["pixel_range"] = list(self.pixel_range)
        d["refresh_at"] = list(self.refresh_at) if self.refresh_at is not None else None
        for key in ("data_mean", "data_std"):
            d[key] = list(d[key]) if d[key] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HardNegConfig":
        """Build a config from :meth:`to_dict` output; unknown keys are an error.

        Dicts written before the typed options (with an ``extra`` dict) load too: each known
        ``extra`` key becomes its typed field; an unknown one is an error.
        """
        d = dict(d)
        extra = d.pop("extra", None)
        if extra:
            unknown = sorted(set(extra) - set(EXTRA_REPLACED))
            if unknown:
                raise _extra_error(extra)
            clash = sorted(k for k in extra if k in d)
            if clash:
                raise ConfigError(f"{clash} given both as fields and in the old extra dict")
            d.update(extra)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown HardNegConfig field(s): {unknown}; known: {sorted(names)}")
        for key in ("step_milestones", "ada_grid", "difficulty_band", "refresh_at"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def replace(self, **changes: Any) -> "HardNegConfig":
        """A validated copy with some fields changed: flat names, or typed options by their view name
        (``bank_options=BankOptions(...)``, ``policy_options=...``)."""
        if "extra" in changes:
            raise _extra_error(changes["extra"])
        typed = [changes.pop(name) for name in [g for g, _, _ in _GROUPS] + ["policy_options"] if name in changes]
        return dataclasses.replace(self, **_merge_options(typed, changes))


def _merge_options(options: Any, flat: dict[str, Any]) -> dict[str, Any]:
    """Flat keywords from typed options objects, merged with ``flat`` (a setting given twice is an error)."""
    out = dict(flat)
    for opts in options:
        if opts is None:
            continue
        if not dataclasses.is_dataclass(opts) or isinstance(opts, type):
            raise ConfigError(f"expected an options dataclass (e.g. BankOptions(...)), got {opts!r}")
        mapping = getattr(type(opts), "FLAT", None) or {f.name: f.name for f in dataclasses.fields(opts)}
        for name, flat_name in mapping.items():
            if flat_name in out:
                raise ConfigError(f"{flat_name} given twice: as a keyword and in {type(opts).__name__}")
            out[flat_name] = getattr(opts, name)
    return out


# --- validation helpers -------------------------------------------------------------------
def _validate_targeting(cfg: HardNegConfig) -> None:
    """An unknown policy name fails here, not at the first refresh (method modules register theirs)."""
    from hardneg.targeting import POLICIES

    if cfg.targeting not in POLICIES:  # looks in hardneg.methods too (its policies register on import)
        raise ConfigError(f"unknown targeting policy {cfg.targeting!r}; known: {sorted(POLICIES)} (a policy of "
                          "your own: hardneg.targeting.register_policy(name, factory, options) before making the "
                          "config)")
