import pytest
import yaml

from transfuse.config import ConfigError, apply_overrides, config_from_dict, load_config


def _write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_config_and_resolved_defaults(base_config, tmp_path):
    cfg = load_config(_write(tmp_path, base_config))
    terms = cfg.distill.resolved_terms()
    assert [(t.loss, t.weight) for t in terms] == [("ce", 0.1), ("kd", None)]
    # The resolved YAML validates again to the same config.
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_typo_in_field_names_path_and_valid_fields(base_config, tmp_path):
    base_config["train"]["stpes"] = 10
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, base_config))
    msg = str(err.value)
    assert "train.stpes: unknown field" in msg and "steps" in msg and "c.yaml" in msg


def test_wrong_type_names_field(base_config):
    base_config["train"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"train\.steps: .*integer.*'many'"):
        config_from_dict(base_config)


def test_unknown_method_lists_valid(base_config):
    base_config["distill"]["method"] = "kdd"
    with pytest.raises(ConfigError, match=r"distill: unknown method 'kdd'\. Did you mean 'kd'\?.*dkd"):
        config_from_dict(base_config)


def test_unknown_loss_option(base_config):
    base_config["distill"]["options"] = {"temprature": 2}
    with pytest.raises(ConfigError, match=r"no option\(s\) 'temprature'.*temperature"):
        config_from_dict(base_config)


def test_unknown_model_and_model_option(base_config):
    base_config["student"]["name"] = "mlpp"
    with pytest.raises(ConfigError, match=r"student: unknown model 'mlpp'"):
        config_from_dict(base_config)
    base_config["student"] = {"name": "mlp", "options": {"hiden": [3]}}
    with pytest.raises(ConfigError, match=r"student: options: model 'mlp' has no option\(s\) 'hiden'"):
        config_from_dict(base_config)


def test_teacher_required_for_kd(base_config):
    del base_config["teacher"]
    with pytest.raises(ConfigError, match="no `teacher:` section"):
        config_from_dict(base_config)
    base_config["distill"] = {"method": "none"}
    assert config_from_dict(base_config).teacher is None


def test_method_and_terms_are_exclusive(base_config):
    base_config["distill"] = {"method": "kd", "terms": [{"loss": "ce"}]}
    with pytest.raises(ConfigError, match="either `method`"):
        config_from_dict(base_config)


def test_overrides_parse_yaml_values_and_create_sections(base_config, tmp_path):
    path = _write(tmp_path, base_config)
    cfg = load_config(path, ["train.steps=7", "distill.options.temperature=2.5", "optim.name=sgd", "data.label_subset=100"])
    assert cfg.train.steps == 7 and cfg.distill.options == {"temperature": 2.5}
    assert cfg.optim.name == "sgd" and cfg.data.label_subset == 100
    data = apply_overrides({"distill": {"terms": [{"loss": "ce"}, {"loss": "kd"}]}}, ["distill.terms.1.weight=3"])
    assert data["distill"]["terms"][1]["weight"] == 3
    with pytest.raises(ConfigError, match="list index"):
        apply_overrides({"a": [1]}, ["a.5=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.steps"])


def test_yaml_tags_cannot_run_code(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_schedule_and_terms_long_form(base_config):
    base_config["distill"] = {
        "terms": [
            {"loss": "ce", "weight": 1.0},
            {"loss": "dkd", "options": {"beta": 2.0}, "schedule": {"kind": "warmup", "options": {"steps": 5}}},
        ]
    }
    cfg = config_from_dict(base_config)
    assert cfg.distill.resolved_terms()[1].schedule.options == {"steps": 5}
    base_config["distill"]["terms"][1]["schedule"]["kind"] = "warmpu"
    with pytest.raises(ConfigError, match="unknown schedule 'warmpu'"):
        config_from_dict(base_config)
