import pytest

from medseg.config import Config, ConfigError, load_config, save_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nmodel:\n  channels: [8, 16]\n  skip_fusion:\n    name: gate\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(p, ["train.epochs=3", "model.block_attention.name=cbam", "data.target_spacing=[1.5,1.5,2]"])
    assert isinstance(cfg, Config)
    assert cfg.model.channels == [8, 16]
    assert cfg.model.skip_fusion.name == "gate"
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.epochs == 3
    assert cfg.model.block_attention.name == "cbam"
    assert cfg.data.target_spacing == [1.5, 1.5, 2.0]


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("model:\n  chanels: [8]\n", [], "model.chanels"),
        ("", ["model.block_attention.nme=se"], "model.block_attention.nme"),
        ("train:\n  epochs: many\n", [], "train.epochs"),
        ("", ["train.channels_last=3"], "train.channels_last"),
        ("", ["model.channels=[8, x]"], "model.channels[1]"),
        ("data: 3\n", [], "data"),
    ],
)
def test_bad_keys_name_the_full_path(tmp_path, text, overrides, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(p, overrides)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.epochs"])


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["model.channels=[4,8,16]", "train.precision=bf16"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == cfg
