"""HardNegConfig: one dataclass holding every knob of the engine, validated on construction.

Each invalid value raises :class:`ConfigError` naming the field, the value it got and the
allowed range, so a typo in a training script fails at start-up instead of hours later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

Metric = Literal["cosine", "l2"]
IndexKind = Literal["auto", "flat", "ivf", "ivfpq", "hnsw"]
WorkerBackend = Literal["thread", "process"]
MixMode = Literal["append", "substitute"]
Schedule = Literal["constant", "linear", "cosine", "step", "adaptive", "ada", "band"]
LabelMode = Literal["hard", "soft-r", "teacher"]
TeacherKind = Literal["none", "ema", "model"]


# refresh_every="auto": refresh about this many times per epoch (steps per epoch from the dataset length
# and the first observed batch), never less often than every AUTO_REFRESH_MAX steps.
AUTO_REFRESHES_PER_EPOCH = 4
AUTO_REFRESH_MAX = 50


class ConfigError(ValueError):
    """A HardNegConfig field holds a value outside its allowed range."""


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
    ivf_threshold: int = 50_000  # "auto" switches from exact flat to IVF past this many vectors
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
    # --- confusion mining -----------------------------------------------------------------
    knn_k: int = 10
    # steps between confusion refreshes (and generation requests); "auto": a quarter epoch, at most 50
    refresh_every: Union[int, Literal["auto"]] = "auto"
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
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
        """Raise :class:`ConfigError` for the first field outside its allowed range."""
        _int_at_least(self, "num_classes", 2)
        if self.embedding_dim is not None:
            _int_at_least(self, "embedding_dim", 1)
        _choice(self, "metric", ("cosine", "l2"))
        _choice(self, "index", ("auto", "flat", "ivf", "ivfpq", "hnsw"))
        _int_at_least(self, "ivf_threshold", 1)
        _int_at_least(self, "nprobe", 1)
        _choice(self, "bank_sharding", ("off", "id-mod"))
        _choice(self, "bank_storage", ("float32", "float16"))
        _int_at_least(self, "bank_pq_bytes", 1)
        _int_at_least(self, "bank_rerank", 0)
        if self.index == "ivfpq" and self.embedding_dim is not None and self.embedding_dim % self.bank_pq_bytes:
            raise ConfigError(f"bank_pq_bytes={self.bank_pq_bytes} must divide embedding_dim={self.embedding_dim} "
                              "(one PQ sub-vector per byte)")
        _int_at_least(self, "knn_k", 1)
        if self.refresh_every != "auto":
            if isinstance(self.refresh_every, str):
                raise ConfigError(f"refresh_every must be 'auto' or an integer >= 1, got {self.refresh_every!r}")
            _int_at_least(self, "refresh_every", 1)
        _in_range(self, "confusion_ema", 0.0, 1.0, low_open=True)
        _in_range(self, "logit_weight", 0.0, 1.0)
        _int_at_least(self, "top_pairs", 1)
        _int_at_least(self, "sources_per_pair", 1)
        _in_range(self, "min_pair_score", 0.0, 1.0)
        _int_at_least(self, "refresh_queries", 1)
        if not isinstance(self.targeting, str) or not self.targeting:
            raise ConfigError(f"targeting must be a policy name (e.g. 'confusion'), got {self.targeting!r}")
        _validate_targeting(self)
        _validate_generator(self)
        _choice(self, "worker_backend", ("thread", "process"))
        _int_at_least(self, "worker_threads", 1)
        _int_at_least(self, "refresh_threads", 0)
        _int_at_least(self, "queue_size", 1)
        _int_at_least(self, "images_per_refresh", 1)
        _int_at_least(self, "generation_batch", 1)
        _int_at_least(self, "max_restarts", 0)
        if self.request_timeout is not None:
            _in_range(self, "request_timeout", 0.0, float("inf"), low_open=True, high_open=True)
        _int_at_least(self, "buffer_size", 1)
        _in_range(self, "synthetic_fraction", 0.0, 1.0, high_open=True)
        _choice(self, "mix_mode", ("append", "substitute"))
        _in_range(self, "synthetic_weight", 0.0, float("inf"))
        _int_at_least(self, "freshness_half_life", 1)
        _int_at_least(self, "max_uses", 1)
        _choice(self, "curriculum", ("constant", "linear", "cosine", "step", "adaptive", "ada", "band"))
        for name in ("r_start", "r_end", "r_min", "r_max"):
            _in_range(self, name, 0.0, 1.0, low_open=True)
        if self.r_min > self.r_max:
            raise ConfigError(f"r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        _int_at_least(self, "total_steps", 1)
        object.__setattr__(self, "step_milestones", tuple(float(m) for m in self.step_milestones))
        for m in self.step_milestones:
            if not 0.0 < m < 1.0:
                raise ConfigError(f"step_milestones entries must lie in (0, 1), got {m}")
        _in_range(self, "adaptive_high", 0.0, 1.0)
        _in_range(self, "adaptive_low", 0.0, 1.0)
        if self.adaptive_low >= self.adaptive_high:
            raise ConfigError(
                f"adaptive_low ({self.adaptive_low}) must be below adaptive_high ({self.adaptive_high})"
            )
        _in_range(self, "adaptive_step", 0.0, 1.0, low_open=True)
        _int_at_least(self, "adaptive_min_samples", 1)
        object.__setattr__(self, "ada_grid", tuple(float(r) for r in self.ada_grid))
        if len(self.ada_grid) < 2 or any(not 0.0 < r <= 1.0 for r in self.ada_grid):
            raise ConfigError(f"ada_grid needs >= 2 ratios in (0, 1], got {self.ada_grid}")
        if list(self.ada_grid) != sorted(self.ada_grid):
            raise ConfigError(f"ada_grid must be increasing, got {self.ada_grid}")
        self._validate_label_trust()
        self._validate_value_space()

    def _validate_value_space(self) -> None:
        for name in ("data_mean", "data_std"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                values = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a sequence of numbers (one per channel), got {value!r}") from None
            if not values or any(v != v or v in (float("inf"), float("-inf")) for v in values):
                raise ConfigError(f"{name} must hold one finite number per channel, got {value!r}")
            setattr(self, name, values)
        mean, std = self.data_mean, self.data_std
        if (mean is None) != (std is None):
            raise ConfigError("data_mean and data_std go together: give both (the pipeline's normalisation) or "
                              "neither (plain pixels)")
        if mean is not None and std is not None:
            if len(mean) != len(std):
                raise ConfigError(f"data_mean has {len(mean)} channel(s) but data_std has {len(std)}")
            if any(v <= 0 for v in std):
                raise ConfigError(f"data_std must be positive, got {std}")
        pr = self.pixel_range
        if (not isinstance(pr, (tuple, list)) or len(pr) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in pr) or not pr[0] < pr[1]):
            raise ConfigError(f"pixel_range must be (low, high) with low < high, got {pr!r}")
        self.pixel_range = (float(pr[0]), float(pr[1]))

    def _validate_label_trust(self) -> None:
        band = tuple(self.difficulty_band) if isinstance(self.difficulty_band, (tuple, list)) else None
        if band is None or len(band) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                 for v in band):
            raise ConfigError(f"difficulty_band must be a (low, high) pair of numbers, got {self.difficulty_band!r}")
        object.__setattr__(self, "difficulty_band", (float(band[0]), float(band[1])))
        low, high = self.difficulty_band
        if not 0.0 <= low < high <= 1.0:
            raise ConfigError(f"difficulty_band must satisfy 0 <= low < high <= 1, got {self.difficulty_band}")
        _choice(self, "label_mode", ("hard", "soft-r", "teacher"))
        _in_range(self, "label_gamma", 0.0, float("inf"), low_open=True, high_open=True)
        _choice(self, "teacher", ("none", "ema", "model"))
        _in_range(self, "teacher_decay", 0.0, 1.0, high_open=True)
        _in_range(self, "teacher_prior_correction", 0.0, 10.0)
        if not isinstance(self.teacher_warmup, bool):
            raise ConfigError(f"teacher_warmup must be True or False, got {self.teacher_warmup!r}")
        for name in ("filter_min_target", "filter_max_target"):
            if getattr(self, name) is not None:
                _in_range(self, name, 0.0, 1.0)
        lo, hi = self.filter_min_target, self.filter_max_target
        if lo is not None and hi is not None and lo >= hi:
            raise ConfigError(f"filter_min_target ({lo}) must be below filter_max_target ({hi}): every image "
                              "would be dropped")
        _in_range(self, "min_pair_share", 0.0, 1.0)
        _int_at_least(self, "score_batch", 1)
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every field (round-trips through :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        d["ada_grid"] = list(self.ada_grid)
        d["difficulty_band"] = list(self.difficulty_band)
        d["pixel_range"] = list(self.pixel_range)
        for key in ("data_mean", "data_std"):
            d[key] = list(d[key]) if d[key] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HardNegConfig":
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown HardNegConfig field(s): {unknown}; known: {sorted(names)}")
        d = dict(d)
        for key in ("step_milestones", "ada_grid", "difficulty_band"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def replace(self, **changes: Any) -> "HardNegConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# --- validation helpers -------------------------------------------------------------------
def _validate_targeting(cfg: HardNegConfig) -> None:
    """An unknown policy name fails here, not at the first refresh (method modules register theirs)."""
    from hardneg.targeting import POLICIES

    if cfg.targeting not in POLICIES:
        try:  # the policies of hardneg.methods register themselves on import
            import hardneg.methods  # noqa: F401
        except ImportError:  # pragma: no cover - an optional dependency of a method module
            pass
    if cfg.targeting not in POLICIES:
        raise ConfigError(f"unknown targeting policy {cfg.targeting!r}; known: {sorted(POLICIES)} (a policy of "
                          "your own: hardneg.targeting.register_policy(name, factory) before making the config)")


_SD_ONLY = ("prompt_template", "prompts", "generator_scheduler", "generator_resolution")


def _validate_generator(cfg: HardNegConfig) -> None:
    """The generator name and the settings the engine hands to the generator it builds."""
    from hardneg.generators import GENERATORS

    if cfg.generator is not None and cfg.generator not in GENERATORS:
        raise ConfigError(f"generator must be one of {list(GENERATORS)} or None (mining only), got "
                          f"{cfg.generator!r}; a generator of your own goes to HardNeg(..., generator=obj_or_factory)")
    if cfg.generator_path is not None and not isinstance(cfg.generator_path, str):
        cfg.generator_path = str(cfg.generator_path)  # a pathlib.Path is fine
    if cfg.generator_steps is not None:
        _int_at_least(cfg, "generator_steps", 1)
    if cfg.guidance_scale is not None:
        _in_range(cfg, "guidance_scale", 0.0, float("inf"), high_open=True)
    if cfg.generator_max_batch is not None:
        _int_at_least(cfg, "generator_max_batch", 1)
    if not isinstance(cfg.generator_compile, bool):
        raise ConfigError(f"generator_compile must be True or False, got {cfg.generator_compile!r}")
    dtypes = ("fp16", "float16", "bf16", "bfloat16", "fp32", "float32")
    if cfg.generator_dtype is not None and cfg.generator_dtype not in dtypes:
        raise ConfigError(f"generator_dtype must be one of {dtypes} or None, got {cfg.generator_dtype!r}")
    if cfg.generator == "class-conditional" and cfg.generator_dtype not in (None, "fp32", "float32"):
        raise ConfigError(f"generator_dtype={cfg.generator_dtype!r}: the class-conditional generator runs in "
                          "float32 (leave generator_dtype None)")
    if cfg.generator == "class-conditional":
        used = [name for name in _SD_ONLY if getattr(cfg, name) is not None]
        if used:
            raise ConfigError(f"{', '.join(used)} only apply to generator='stable-diffusion' (the "
                              "class-conditional generator is conditioned on class ids, not text)")
    if cfg.prompt_template is not None and (not isinstance(cfg.prompt_template, str)
                                            or "{class_name}" not in cfg.prompt_template):
        raise ConfigError(f"prompt_template must be a string with a {{class_name}} field, got {cfg.prompt_template!r}")
    if cfg.prompts is not None:
        if isinstance(cfg.prompts, dict):
            cfg.prompts = dict(cfg.prompts)
        elif isinstance(cfg.prompts, (list, tuple)) and len(cfg.prompts) == cfg.num_classes:
            cfg.prompts = [str(p) for p in cfg.prompts]
        else:
            raise ConfigError(f"prompts must be a list with one prompt per class ({cfg.num_classes}) or a "
                              f"{{class name: prompt}} dict, got {cfg.prompts!r}")
    if cfg.generator_scheduler is not None:
        from hardneg.generators.stable_diffusion import SCHEDULERS

        if cfg.generator_scheduler not in SCHEDULERS:
            raise ConfigError(f"generator_scheduler must be one of {sorted(SCHEDULERS)} or None, got "
                              f"{cfg.generator_scheduler!r}")
    res = cfg.generator_resolution
    if res is not None:
        pair = (res, res) if isinstance(res, int) else tuple(res) if isinstance(res, (list, tuple)) else ()
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 8 for v in pair):
            raise ConfigError(f"generator_resolution must be an int or (height, width) of ints >= 8, got {res!r}")
        cfg.generator_resolution = res if isinstance(res, int) else (int(pair[0]), int(pair[1]))
    if not isinstance(cfg.generator_options, dict):
        raise ConfigError(f"generator_options must be a dict of keyword arguments, got {cfg.generator_options!r}")
    _in_range(cfg, "worker_start_timeout", 0.0, float("inf"), low_open=True, high_open=True)


def _int_at_least(cfg: HardNegConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _in_range(
    cfg: HardNegConfig,
    name: str,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or value != value:
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ConfigError(f"{name} must lie in {lb}{low}, {high}{hb}, got {value!r}")


def _choice(cfg: HardNegConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
