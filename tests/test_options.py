"""HardNegConfig composes the typed options of its components; flat keywords stay the shorthand."""

import dataclasses

import pytest

from hardneg import HardNegConfig
from hardneg.bank import DEFAULT_IVF_THRESHOLD, BankOptions, EmbeddingBank
from hardneg.buffer import BufferOptions
from hardneg.config import ConfigError
from hardneg.confusion import ConfusionOptions
from hardneg.curriculum import CURRICULA, CurriculumOptions, make_curriculum
from hardneg.generators import GENERATORS
from hardneg.generators.from_config import GenerationOptions
from hardneg.labels import LabelOptions
from hardneg.methods.long_tail import LongTailOptions
from hardneg.registry import Registry
from hardneg.targeting import POLICIES, ConfusionPolicyOptions, SameClassOptions
from hardneg.value_space import ValueSpaceOptions

GROUPS = {"bank_options": BankOptions, "confusion_options": ConfusionOptions,
          "generation_options": GenerationOptions, "buffer_options": BufferOptions,
          "curriculum_options": CurriculumOptions, "label_options": LabelOptions,
          "value_space_options": ValueSpaceOptions}


def test_flat_keywords_set_the_typed_options_and_replace_keeps_them():
    cfg = HardNegConfig(num_classes=5, knn_k=7, refresh_every=3, curriculum="linear", buffer_size=99,
                        ivf_threshold=123, label_gamma=0.7, generation_batch=4, pixel_range=[0, 255])
    assert cfg.confusion_options.knn_k == 7 and cfg.confusion_options.refresh_every == 3
    assert cfg.curriculum_options.curriculum == "linear" and cfg.buffer_options.buffer_size == 99
    assert cfg.bank_options.ivf_threshold == 123 and cfg.label_options.label_gamma == 0.7
    assert cfg.generation_options.generation_batch == 4
    assert cfg.value_space_options.pixel_range == (0.0, 255.0) == cfg.pixel_range  # normalised once, both views
    other = cfg.replace(knn_k=9)
    assert other.confusion_options.knn_k == 9 and other.curriculum == "linear" and cfg.knn_k == 7
    assert isinstance(make_curriculum(cfg), type(make_curriculum(cfg.curriculum_options)))


def test_compose_from_typed_options_equals_the_flat_config():
    typed = HardNegConfig.compose(4, BankOptions(metric="l2", nprobe=4), CurriculumOptions(curriculum="ada"),
                                  ConfusionPolicyOptions(direction="as-mined"), seed=3)
    flat = HardNegConfig(num_classes=4, metric="l2", nprobe=4, curriculum="ada", confusion_direction="as-mined",
                         seed=3)
    assert typed == flat and typed.policy_options == ConfusionPolicyOptions(direction="as-mined")
    swapped = flat.replace(bank_options=BankOptions(index="flat"))
    assert swapped.index == "flat" and swapped.metric == "cosine"  # the whole bank group replaced
    with pytest.raises(ConfigError, match="nprobe given twice"):
        HardNegConfig.compose(4, BankOptions(nprobe=4), nprobe=8)


def test_every_flat_default_is_its_options_default():
    """One default per setting: the flat field and its options dataclass agree (ivf_threshold included)."""
    cfg = HardNegConfig(num_classes=3)
    for group, cls in GROUPS.items():
        assert getattr(cfg, group) == cls(), group
    for cls in (ConfusionPolicyOptions, SameClassOptions, LongTailOptions):
        assert cfg.options_of(cls) == cls(), cls
    assert cfg.ivf_threshold == DEFAULT_IVF_THRESHOLD == EmbeddingBank(4, 3).ivf_threshold
    grouped = [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)]
    flat_policy = [n for cls in (ConfusionPolicyOptions, SameClassOptions, LongTailOptions) for n in cls.FLAT.values()]
    engine_level = ["num_classes", "deterministic", "targeting", "seed"]
    names = [f.name for f in dataclasses.fields(HardNegConfig)]
    assert set(grouped + flat_policy + engine_level) <= set(names)  # every option has its flat keyword
    assert len(set(grouped)) == len(grouped)  # and belongs to one component


@pytest.mark.parametrize("key,value,replacement", [
    ("confusion_direction", "as-mined", "ConfusionPolicyOptions.direction"),
    ("same_class_strength", None, "SameClassOptions.strength"),
    ("long_tail_ratio", 0.3, "LongTailOptions.ratio"),
    ("long_tail_head_fraction", 0.25, "LongTailOptions.head_fraction"),
    ("long_tail_search_k", 32, "LongTailOptions.search_k"),
])
def test_extra_is_gone_and_its_error_names_the_typed_option(key, value, replacement):
    with pytest.raises(ConfigError, match=replacement):
        HardNegConfig(num_classes=3, extra={key: value})
    with pytest.raises(ConfigError, match=replacement):
        HardNegConfig(num_classes=3).replace(extra={key: value})
    # a dict (or checkpoint) written with the old flat format + extra still loads, onto the typed field
    old = {**HardNegConfig(num_classes=3).to_dict(), "extra": {key: value}}
    old.pop(key)
    assert getattr(HardNegConfig.from_dict(old), key) == value


def test_old_dicts_load_and_an_unknown_extra_key_is_an_error():
    old = HardNegConfig(num_classes=3).to_dict()
    for key in ("confusion_direction", "same_class_strength", "long_tail_head_fraction", "long_tail_ratio",
                "long_tail_search_k"):
        old.pop(key)
    assert HardNegConfig.from_dict({**old, "extra": {}}) == HardNegConfig(num_classes=3)
    with pytest.raises(ConfigError, match="not settings of hardneg"):
        HardNegConfig.from_dict({**old, "extra": {"confusion_directoin": "as-mined"}})
    cfg = HardNegConfig(num_classes=3, long_tail_ratio=0.4, confusion_direction="to-rarer")
    assert "extra" not in cfg.to_dict() and HardNegConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field,value,message", [
    ("confusion_direction", "sideways", "confusion_direction must be one of"),
    ("same_class_strength", 0.0, r"same_class_strength must lie in \(0, 1\]"),
    ("long_tail_ratio", 1.5, r"long_tail_ratio must lie in \(0, 1\]"),
    ("long_tail_head_fraction", 1.0, r"long_tail_head_fraction must lie in \(0, 1\)"),
    ("long_tail_search_k", 0, "long_tail_search_k must be an integer >= 1"),
    ("min_pair_share", 2.0, r"min_pair_share must lie in \[0.0, 1.0\]"),
])
def test_policy_options_are_validated_whichever_policy_is_chosen(field, value, message):
    """A typo in another policy's option fails too (it used to be read with .get and ignored)."""
    with pytest.raises(ConfigError, match=message):
        HardNegConfig(num_classes=3, targeting="random-pairs", **{field: value})


def test_unknown_names_fail_at_config_time_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"curriculum must be one of \('constant', 'linear', 'cosine', 'step', "
                                          r"'adaptive', 'ada', 'band'\)"):
        HardNegConfig(num_classes=3, curriculum="fast")
    with pytest.raises(ConfigError, match="unknown targeting policy 'nope'.*long-tail"):
        HardNegConfig(num_classes=3, targeting="nope")
    with pytest.raises(ConfigError, match="generator must be one of"):
        HardNegConfig(num_classes=3, generator="gan")
    assert list(GENERATORS) == ["class-conditional", "stable-diffusion"]
    assert set(POLICIES) >= {"confusion", "same-class", "random-pairs", "long-tail"}


def test_a_new_curriculum_is_one_registration():
    from hardneg.curriculum import ConstantCurriculum

    CURRICULA.register("test-fixed", lambda o: ConstantCurriculum(0.42, 0.42, o.total_steps))
    try:
        cfg = HardNegConfig(num_classes=3, curriculum="test-fixed")
        assert make_curriculum(cfg).ratio((0, 1), 5) == 0.42
    finally:
        CURRICULA._entries.pop("test-fixed")
    with pytest.raises(ConfigError, match="curriculum must be one of"):
        HardNegConfig(num_classes=3, curriculum="test-fixed")


def test_registry_lists_names_in_order_and_says_what_is_known():
    reg: Registry[int] = Registry("widget")
    reg.register("b", lambda: 2)
    reg.register("a", lambda: 1)
    assert list(reg) == ["b", "a"] and "a" in reg and reg.build("a") == 1
    with pytest.raises(ValueError, match=r"unknown widget 'c'; known: \['a', 'b'\]"):
        reg.get("c")
