import pytest
import yaml

from transfuse.config import ConfigError, apply_overrides, config_from_dict, load_config


def _write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_config_and_resolved_defaults(base_config, tmp_path):
    cfg = load_config(_write(tmp_path, base_config))
    terms = cfg.resolved_terms()
    assert [(t.loss, t.weight, t.input, t.target) for t in terms] == [("ce", 0.1, "student", None), ("kd", None, "student", "teacher")]
    # The pre-v2 `student:`/`teacher:` sections become named participants.
    assert cfg.participants["student"].trainable and not cfg.participants["teacher"].trainable
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
    with pytest.raises(ConfigError, match=r"participants.student: unknown model 'mlpp'"):
        config_from_dict(base_config)
    base_config["student"] = {"name": "mlp", "options": {"hiden": [3]}}
    with pytest.raises(ConfigError, match=r"participants.student: options: model 'mlp' has no option\(s\) 'hiden'"):
        config_from_dict(base_config)


def test_teacher_required_for_kd(base_config):
    del base_config["teacher"]
    with pytest.raises(ConfigError, match=r"target 'teacher' names no participant or source \(add a `teacher:` section"):
        config_from_dict(base_config)
    base_config["distill"] = {"method": "none"}
    assert list(config_from_dict(base_config).participants) == ["student"]


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
    assert cfg.resolved_terms()[1].schedule.options == {"steps": 5}
    base_config["distill"]["terms"][1]["schedule"]["kind"] = "warmpu"
    with pytest.raises(ConfigError, match="unknown schedule 'warmpu'"):
        config_from_dict(base_config)


def test_option_values_fail_at_load_naming_the_field(base_config, tmp_path):
    path = _write(tmp_path, base_config)
    for bad in ("distill.options.temperature=0", "distill.options.temperature=.inf"):
        with pytest.raises(ConfigError, match=r"distill.*temperature"):
            load_config(path, [bad])


def test_v2_participants_terms_and_references(base_config):
    v2 = {k: v for k, v in base_config.items() if k not in ("student", "teacher")}
    v2["participants"] = {"student": base_config["student"], "peer": {**base_config["student"], "trainable": True},
                          "teacher": {**base_config["teacher"], "trainable": False}}
    v2["distill"] = {"terms": [{"loss": "ce"}, {"loss": "kd", "input": "student.logits", "target": "peer.logits"},
                               {"loss": "rkd", "input": "peer.feature", "target": "teacher.feature"}]}
    cfg = config_from_dict(v2)
    assert [t.target for t in cfg.resolved_terms()] == [None, "peer.logits", "teacher.feature"]
    v2["distill"]["terms"][1]["target"] = "peeer.logits"
    with pytest.raises(ConfigError, match="target 'peeer.logits' names no participant or source; defined: peer, student, teacher"):
        config_from_dict(v2)
    v2["distill"]["terms"][1] = {"loss": "kd", "input": "teacher.logits", "target": "student.logits"}
    with pytest.raises(ConfigError, match="input 'teacher.logits' is a frozen participant"):
        config_from_dict(v2)


def test_pre_v2_term_sides_migrate_to_references(base_config):
    base_config["distill"] = {"terms": [{"loss": "fitnet", "student": "hint", "teacher": "layers.act1"}, {"loss": "kd"}]}
    terms = config_from_dict(base_config).resolved_terms()
    assert (terms[0].input, terms[0].target) == ("student.hint", "teacher.layers.act1")
    assert (terms[1].input, terms[1].target) == ("student", None)


def test_set_on_a_top_level_section_merges_into_its_participant(base_config, tmp_path):
    v2 = {k: v for k, v in base_config.items() if k not in ("student", "teacher")}
    v2["participants"] = {"student": base_config["student"], "teacher": {**base_config["teacher"], "trainable": False}}
    cfg = load_config(_write(tmp_path, v2), ["teacher.cache=somewhere", "student.options.hidden=[8]"])
    assert cfg.participants["teacher"].cache == "somewhere" and cfg.participants["teacher"].name == "mlp"
    assert cfg.participants["student"].options == {"hidden": [8]}
    with pytest.raises(ConfigError, match="only a frozen participant"):
        load_config(_write(tmp_path, v2), ["student.cache=x"])


def test_schemes_expand_and_check_their_options(base_config):
    dml = {**base_config, "distill": {"method": "dml"}}
    del dml["teacher"]
    with pytest.raises(ConfigError, match="only \\['student'\\] is trainable"):
        config_from_dict(dml)
    dml["participants"] = {"peer": {**base_config["student"], "trainable": True}}
    terms = config_from_dict(dml).resolved_terms()
    assert [(t.name, t.input, t.target, t.weight) for t in terms] == [
        ("ce_peer", "peer.logits", None, 1.0), ("kl_peer_from_student", "peer.logits", "student.logits", 1.0),
        ("ce_student", "student.logits", None, 1.0), ("kl_student_from_peer", "student.logits", "peer.logits", 1.0),
    ]
    dml["distill"]["options"] = {"temperature": -1}
    with pytest.raises(ConfigError, match="scheme 'dml': temperature"):
        config_from_dict(dml)
    mt = {**base_config, "distill": {"method": "multi_teacher", "options": {"weights": [1, 2]}}}
    mt["participants"] = {"teacher_2": {**base_config["teacher"], "trainable": False}}
    cfg = config_from_dict(mt)
    assert cfg.resolved_sources()["teachers"].members == ["teacher_2", "teacher"]
    assert cfg.resolved_terms()[-1].target == "teachers.logits"
    mt["distill"]["options"]["weights"] = [1]
    with pytest.raises(ConfigError, match="expected 2 non-negative numbers"):
        config_from_dict(mt)


def test_alternating_recipe_is_refused_under_ddp(base_config):
    base_config["recipe"] = {"name": "alternating"}
    base_config["fabric"] = {"strategy": "ddp", "devices": 2}
    with pytest.raises(ConfigError, match="recipe: 'alternating'"):
        config_from_dict(base_config)
    base_config["recipe"] = {"name": "alternatng"}
    with pytest.raises(ConfigError, match="unknown recipe 'alternatng'. Did you mean 'alternating'"):
        config_from_dict(base_config)


def test_transforms_are_checked_at_load(base_config):
    base_config["transforms"] = [{"name": "gaussian_noise", "options": {"std": -1}}]
    with pytest.raises(ConfigError, match=r"transforms\.0.*std must be a finite number >= 0"):
        config_from_dict(base_config)
    base_config["transforms"] = [{"name": "gausian_noise"}]
    with pytest.raises(ConfigError, match="unknown transform 'gausian_noise'. Did you mean 'gaussian_noise'"):
        config_from_dict(base_config)
    base_config["transforms"] = [{"name": "gaussian_noise", "options": {"std": 0.05}}]
    assert config_from_dict(base_config).transforms[0].options == {"std": 0.05}
