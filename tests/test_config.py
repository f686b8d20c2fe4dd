import pytest

from models.config import ConfigError, ExperimentConfig, load_preset, parse_overrides

SPEC = {  # MODEL_SPEC §7, column by column
    "activitynet": dict(
        batch_size=64,
        lr=4.5e-4,
        n_epoch=200,
        max_es_cnt=200,
        hard_negative_start_epoch=20,
        loss_factor=(0.027, 0.045, 0.015),
        neg_factor=(0.2, 32.0),
        max_ctx_l=256,
        n_heads=8,
        input_drop=0.2,
        drop=0.18,
        visual_dim=1024,
        query_dim=1024,
    ),
    "charades": dict(
        batch_size=64,
        lr=3.8e-4,
        n_epoch=400,
        max_es_cnt=10,
        hard_negative_start_epoch=100,
        loss_factor=(0.008, 0.01, 0.005),
        neg_factor=(0.15, 32.0),
        max_ctx_l=1024,
        n_heads=4,
        input_drop=0.15,
        drop=0.3,
        visual_dim=1024,
        query_dim=1024,
    ),
    "tvr": dict(
        batch_size=256,
        lr=4.5e-4,
        n_epoch=200,
        max_es_cnt=200,
        hard_negative_start_epoch=20,
        loss_factor=(0.027, 0.045, 0.015),
        neg_factor=(0.2, 32.0),
        max_ctx_l=512,
        n_heads=8,
        input_drop=0.2,
        drop=0.45,
        visual_dim=3072,
        query_dim=768,
    ),
}
COMMON = dict(
    warmup_proportion=0.01,
    weight_decay=0.01,
    margin=0.2,
    hard_pool_size=20,
    max_desc_l=30,
    map_size=32,
    hidden_size=384,
    initializer_range=0.02,
    eval_query_bsz=50,
    eval_context_bsz=100,
    clip_scale_w=0.7,
    frame_scale_w=0.3,
    seed=9527,
)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_presets_match_spec(name):
    cfg = load_preset(name)
    for key, want in {**SPEC[name], **COMMON}.items():
        section = cfg.model if key in cfg.model.model_fields else cfg.train
        assert getattr(section, key) == want, (name, key)


def test_aliases_and_demo():
    assert load_preset("act") == load_preset("activitynet")
    assert load_preset("demo").model.visual_dim == 1280


def test_overrides_bare_and_dotted():
    cfg = load_preset("tvr", {"lr": 1e-4, "model.drop": 0.3, "use_mamba": False})
    assert (cfg.train.lr, cfg.model.drop, cfg.model.use_mamba) == (1e-4, 0.3, False)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"lr": -1}, "train.lr"),
        ({"drop": 1.5}, "model.drop"),
        ({"n_heads": 7}, "n_heads"),
        ({"bogus": 1}, "bogus"),
        ({"batch_size": "many"}, "train.batch_size"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_preset("charades", overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("kinetics")


def test_yaml_roundtrip_and_preset_base(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("preset: charades\ntrain:\n  lr: 0.001\nmodel:\n  use_fusion: false\n")
    cfg = ExperimentConfig.from_yaml(p)
    assert cfg.name == "charades" and cfg.train.lr == 0.001 and not cfg.model.use_fusion
    q = tmp_path / "full.yaml"
    q.write_text(cfg.to_yaml())
    assert ExperimentConfig.from_yaml(q) == cfg


def test_parse_overrides():
    assert parse_overrides(["lr=1e-4", "use_mamba=false", "loss_factor=[1, 2, 3]"]) == {
        "lr": 1e-4,
        "use_mamba": False,
        "loss_factor": [1, 2, 3],
    }
    with pytest.raises(ConfigError):
        parse_overrides(["lr"])
