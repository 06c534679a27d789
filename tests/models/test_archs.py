"""The per-architecture module maps select exactly the right LoRA targets."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from visiontune.models.archs import REGISTRY, UnsupportedArchitectureError, get_spec
from visiontune.testing import ARCHITECTURES

FLAG_COMBOS = [c for c in itertools.product([True, False], repeat=4) if (c[0] or c[1]) and (c[2] or c[3])]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_model(request, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    return request.param, AutoModelForImageTextToText.from_pretrained(tiny_model_dir(request.param))


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_registry_covers_all_supported_architectures():
    assert set(REGISTRY) == set(ARCHITECTURES)


def test_everything_per_architecture_derives_from_the_registry():
    assert ARCHITECTURES == tuple(REGISTRY)
    assert {t for t, s in REGISTRY.items() if s.padding_free} == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mistral3"}


@pytest.mark.parametrize("arch", list(REGISTRY))
def test_image_tokens_are_special_tokens_of_the_tiny_tokenizer(arch):
    spec = REGISTRY[arch]
    assert spec.image_tokens.strings and set(spec.image_tokens.strings) <= set(spec.tiny.special_tokens)


def test_every_linear_layer_is_classified(arch_model):
    arch, model = arch_model
    spec = get_spec(model)
    kinds = {n: spec.classify(n) for n in _linears(model)}
    assert None not in kinds.values(), [n for n, k in kinds.items() if k is None]
    # each of the four groups is non-empty, and lm_head is a never-target
    for kind in ("vision_attention", "vision_mlp", "language_attention", "language_mlp"):
        assert kind in kinds.values(), (arch, kind)
    assert kinds["lm_head"] == "never"


@pytest.mark.parametrize("flags", FLAG_COMBOS)
def test_flag_pattern_selects_exactly_the_groups(arch_model, flags):
    arch, model = arch_model
    vision, language, attention, mlp = flags
    spec = get_spec(model)
    pattern = spec.pattern(vision, language, attention, mlp)
    selected = {n for n in _linears(model) if re.fullmatch(pattern, n)}
    expected = {
        n for n in _linears(model)
        if (k := spec.classify(n)) != "never"
        and ((vision and k.startswith("vision")) or (language and k.startswith("language")))
        and ((attention and k.endswith("attention")) or (mlp and k.endswith("mlp")))
    }
    assert selected == expected
    assert not any(spec.classify(n) == "never" for n in selected)


def test_all_flags_off_is_a_clear_error():
    spec = REGISTRY["qwen2_5_vl"]
    with pytest.raises(ValueError, match="no LoRA targets selected"):
        spec.pattern(False, False, True, True)
    with pytest.raises(ValueError, match="finetune_attention_modules"):
        spec.pattern(True, True, False, False)


def test_unsupported_architecture_error_lists_supported_and_the_fix():
    class Cfg:
        model_type = "llava_next"

    with pytest.raises(UnsupportedArchitectureError) as e:
        get_spec(Cfg())
    msg = str(e.value)
    assert "llava_next" in msg and "Qwen2.5-VL" in msg and "Gemma 3" in msg and "target_modules" in msg


@pytest.mark.parametrize("arch,expected", [("qwen2_vl", 28), ("qwen2_5_vl", 28), ("qwen3_vl", 32), ("mistral3", 28),
                                           ("mllama", 14), ("gemma3", 7)])
def test_patch_multiple(tiny_model_dir, arch, expected):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_dir(arch))
    assert get_spec(cfg).patch_multiple(cfg) == expected
