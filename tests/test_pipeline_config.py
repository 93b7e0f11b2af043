"""Config files + CLI overrides; bad keys and values are named."""

import pytest

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

from unicom import config  # noqa: E402
from unicom.cluster import ClusterConfig  # noqa: E402
from unicom.cluster import main as cluster_main  # noqa: E402
from unicom.demo import DemoConfig  # noqa: E402
from unicom.demo import main as demo_main  # noqa: E402
from unicom.evaluate import main as evaluate_main  # noqa: E402
from unicom.features import main as features_main  # noqa: E402
from unicom.train import TrainConfig  # noqa: E402
from unicom.train import main as train_main  # noqa: E402


def test_precedence_default_file_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  data: d\n  output_dir: o\n  lr: 0.01\n  batch_size: 8\ncluster:\n  num_clusters: 3\n")
    cfg = config.parse(TrainConfig, "train", ["--config", str(path), "--lr", "0.5", "--no-hflip"], "t")
    assert cfg.lr == 0.5 and cfg.batch_size == 8 and cfg.hflip is False and cfg.scale == 32.0
    assert (
        config.parse(
            ClusterConfig, "cluster", ["--config", str(path), "--features-dir", "f", "--output-dir", "o"], "c"
        ).num_clusters
        == 3
    )
    cfg = config.parse(TrainConfig, "train", ["--data", "d", "--output-dir", "o", "--max-steps", "none"], "t")
    assert cfg.max_steps is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("train:\n  lrate: 1\n", "unknown key 'lrate'"),
        ("train:\n  lr: fast\n", "'lr' must be a number"),
        ("trian:\n  lr: 1\n", "unknown section"),
        ("train:\n  hflip: 3\n", "'hflip' must be true or false"),
    ],
)
def test_bad_config_file(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=match):
        config.parse(TrainConfig, "train", ["--config", str(path)], "t")


def test_config_file_not_utf8_is_one_error_line(tmp_path, capsys):
    """A damaged (or Latin-1) file ends the command with one line naming it and status 2, not a traceback."""
    path = tmp_path / "c.yaml"
    path.write_bytes("cluster:\n  features_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(config.ConfigError, match=r"c\.yaml is damaged or not UTF-8"):
        config.read_section(path, "cluster", ClusterConfig)
    with pytest.raises(SystemExit) as exc:
        cluster_main(["--config", str(path), "--features-dir", "f", "--output-dir", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


def test_config_file_errors_are_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"cluster:\n\tnum_clusters: 3\n")  # a tab: not YAML
    with pytest.raises(config.ConfigError, match="not valid YAML.*line 2") as err:
        config.read_section(path, "cluster", ClusterConfig)
    assert "\n" not in str(err.value)
    with pytest.raises(config.ConfigError, match="is a folder"):
        config.read_section(tmp_path, "cluster", ClusterConfig)


def test_integer_strings_are_read_exactly(tmp_path):
    """A quoted integer beyond 2**53 is not rounded through a float."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  seed: '9007199254740993'\n")
    assert config.read_section(path, "train", TrainConfig) == {"seed": 9007199254740993}


def test_missing_required_and_bad_choice(tmp_path):
    with pytest.raises(config.ConfigError, match="'data' is required"):
        config.parse(TrainConfig, "train", [], "t")
    with pytest.raises(config.ConfigError, match="margin_type"):
        config.parse(TrainConfig, "train", ["--data", "d", "--output-dir", "o", "--margin-type", "sphere"], "t")
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.parse(TrainConfig, "train", ["--config", str(tmp_path / "nope.yaml")], "t")


def test_seed_outside_int64_is_a_config_error(tmp_path):
    """Checked with the rest of the config, before any data is read (the loss samples from 64 bits)."""
    args = ["--data", "d", "--output-dir", str(tmp_path / "o"), "--seed", str(2**64)]
    with pytest.raises(config.ConfigError, match="'seed': seed must fit in int64"):
        config.parse(TrainConfig, "train", args, "t")


def test_demo_seed_outside_the_k_means_range_is_a_config_error(tmp_path):
    """The demo hands its seed to k-means: refused with the other options, not when clustering starts."""
    for seed in (-1, 2**31):
        with pytest.raises(config.ConfigError, match="'seed' must be in"):
            config.parse(DemoConfig, "demo", ["--output-dir", str(tmp_path / "o"), "--seed", str(seed)], "d")


def test_saved_config_round_trips(tmp_path):
    cfg = config.make(TrainConfig, {"data": "d", "output_dir": "o", "lr": 0.1})
    config.save(cfg, tmp_path / "c.yaml", "train")
    assert config.parse(TrainConfig, "train", ["--config", str(tmp_path / "c.yaml")], "t") == cfg


@pytest.mark.parametrize("entry", [features_main, cluster_main, train_main, evaluate_main, demo_main])
def test_help(entry, capsys):
    with pytest.raises(SystemExit) as exc:
        entry(["--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out
