"""The typed config: params.yaml maps onto it exactly; bad input gets a clear error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from visiontune.config import ConfigError, PipelineConfig, describe, from_dict, load_params, to_yaml
from visiontune.stages import RecordingConfig

REPO = Path(__file__).resolve().parents[1]


def test_every_field_is_documented():
    for sec in dataclasses.fields(PipelineConfig):
        for f in dataclasses.fields(getattr(PipelineConfig(), sec.name)):
            assert f.metadata.get("help"), f"{sec.name}.{f.name} has no help text"


def test_repo_params_yaml_matches_config_exactly():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = PipelineConfig().to_dict()
    assert set(raw) == set(defaults)
    for section, values in defaults.items():
        assert set(raw[section]) == set(values), f"params.yaml section {section} differs from the config"
    load_params(REPO / "params.yaml")  # types check


def test_roundtrip_yaml(tmp_path):
    cfg = PipelineConfig()
    cfg.train.max_steps = 7
    cfg = dataclasses.replace(cfg, images=dataclasses.replace(cfg.images, resize=[64, 32]))
    p = tmp_path / "p.yaml"
    p.write_text(to_yaml(cfg))
    assert load_params(p) == cfg


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['max_step'\] in section 'train'.*max_steps"):
        from_dict({"train": {"max_step": 3}})
    with pytest.raises(ConfigError, match="unknown section"):
        from_dict({"trian": {}})


def test_type_errors_and_coercion():
    with pytest.raises(ConfigError, match="train.max_steps"):
        from_dict({"train": {"max_steps": "ten"}})
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict({"lora": {"r": True}})
    assert from_dict({"train": {"learning_rate": 1}}).train.learning_rate == 1.0
    assert from_dict({"model": {"use_gradient_checkpointing": "offload"}}).model.use_gradient_checkpointing == "offload"
    assert from_dict({"model": {"use_gradient_checkpointing": 0.5}}).model.use_gradient_checkpointing == 0.5


def test_overrides(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  max_steps: 9\n")
    cfg = load_params(params, ["train.max_steps=3", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.max_steps == 3 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(params, ["max_steps=3"])
    # A bad override is blamed on the override, not on the file.
    with pytest.raises(ConfigError, match=r"--set train.max_steps=ten: train.max_steps"):
        load_params(params, ["train.max_steps=ten"])


def test_missing_params_file_is_an_error_even_with_overrides(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml", ["train.max_steps=3"])


def test_image_rule_is_validated_when_the_config_loads():
    with pytest.raises(ConfigError, match="section 'images'.*resize=-64"):
        from_dict({"images": {"resize": -64}})


def test_bad_yaml_is_reported_with_the_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(p)


def test_recording_config_records_reads():
    rec = RecordingConfig(PipelineConfig())
    _ = rec.train.max_steps, rec.normalize.min_px
    assert rec.accessed == {"train.max_steps", "normalize.min_px"}
    with pytest.raises(AttributeError):
        rec.train.max_steps = 3


def test_describe_lists_every_field():
    text = describe()
    for key in PipelineConfig().flat():
        assert key.split(".")[1] in text


# ------------------------------------------------------------------------- ranges (issue 14, hole 7)
@pytest.mark.parametrize("key,value,allowed", [
    ("validate.max_failure_ratio", -1.0, "0 <= value <= 1"),
    ("validate.max_failure_ratio", 1.5, "0 <= value <= 1"),
    ("validate.max_pixels", 0, "value >= 1"),
    ("validate.max_aspect_ratio", 0.5, "value >= 1"),
    ("lora.r", 0, "value >= 1"),
    ("lora.r", -8, "value >= 1"),
    ("lora.lora_dropout", 1.0, "0 <= value < 1"),
    ("train.learning_rate", 0.0, "value > 0"),
    ("train.learning_rate", -3e-4, "value > 0"),
    ("train.learning_rate", float("nan"), "value > 0"),
    ("train.max_steps", -2, "value >= -1"),
    ("train.num_train_epochs", 0.0, "value > 0"),
    ("train.per_device_train_batch_size", 0, "value >= 1"),
    ("train.gradient_accumulation_steps", 0, "value >= 1"),
    ("train.save_steps", 0, "value >= 1"),
    ("train.warmup_steps", -1, "value >= 0"),
    ("model.max_seq_length", 0, "value >= 1"),
    ("eval.max_new_tokens", 0, "value >= 1"),
    ("register.promotion_margin", -0.1, "value >= 0"),
    ("register.max_pixels", 0, "value >= 1"),
    ("normalize.image_format", "gif", "one of 'png', 'jpeg'"),
])
def test_every_setting_is_range_checked_when_the_config_loads(key, value, allowed):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as e:
        from_dict({section: {name: value}}, source="params.yaml")
    assert str(e.value) == f"params.yaml: {key}={value!r} is out of range (allowed: {allowed})"


def test_ranges_between_settings_and_from_overrides(tmp_path):
    with pytest.raises(ConfigError, match=r"normalize.min_px=1200 is above normalize.max_px=1000"):
        from_dict({"normalize": {"min_px": 1200}})
    with pytest.raises(ConfigError, match=r"validate.min_text_chars=10 is above validate.max_text_chars=5"):
        from_dict({"validate": {"min_text_chars": 10, "max_text_chars": 5}})
    with pytest.raises(ConfigError, match=r"validate.max_failure_ratio=-1.0 is out of range"):
        from_dict({"validate": {"max_failure_ratio": -1}})  # YAML's -1 for a float setting
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  max_steps: 9\n")
    with pytest.raises(ConfigError, match=r"--set lora.r=0: lora.r=0 is out of range \(allowed: value >= 1\)"):
        load_params(params, ["lora.r=0"])
    # Optional settings may be null; defaults and bounds themselves pass; the range shows in `visiontune config`.
    assert from_dict({"collator": {"pad_to_multiple_of": None}, "train": {"max_steps": -1, "learning_rate": 1e-9},
                      "validate": {"max_failure_ratio": 1}}).validate.max_failure_ratio == 1.0
    with pytest.raises(ConfigError, match="collator.pad_to_multiple_of=0"):
        from_dict({"collator": {"pad_to_multiple_of": 0}})
    assert any(line.strip().startswith("r: 16") and "[int, value >= 1]" in line for line in describe().splitlines())


def test_float_settings_take_exponent_notation_without_a_dot():
    assert load_params("params.yaml", ["train.learning_rate=5e-4"]).train.learning_rate == 5e-4
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict({"train": {"learning_rate": "fast"}})
