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
