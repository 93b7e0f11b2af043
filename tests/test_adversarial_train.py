"""Training and evaluation under hostile input: existing runs, damaged checkpoints, bad options and files."""

import dataclasses
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("open_clip")
pytest.importorskip("faiss")

from test_adversarial_pipeline import wds_members, write_tar  # noqa: E402
from test_pipeline_train import dataset, make_cfg  # noqa: E402, F401

from unicom import atomic, config  # noqa: E402
from unicom.data import DataError  # noqa: E402
from unicom.demo import TINY_CLIP, TINY_NAME  # noqa: E402
from unicom.evaluate import EvaluateConfig, evaluate  # noqa: E402
from unicom.evaluate import main as evaluate_main  # noqa: E402
from unicom.model import ModelError, build_model  # noqa: E402
from unicom.train import TrainConfig, load_trained, read_metrics, train  # noqa: E402
from unicom.train import main as train_main  # noqa: E402


def cli_error(main, argv, capsys) -> str:
    """The one-line ``prog: error: ...`` a CLI exits with (status 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ": error: " in err.strip().splitlines()[-1], err
    return err.strip().splitlines()[-1]


def checkpoint_file(out, step):
    return out / "checkpoints" / f"step_{step:07d}" / "rank00000.pt"


def test_existing_run_is_refused_unless_resume_or_overwrite(dataset, tmp_path, one_thread):  # noqa: F811
    out = tmp_path / "run"
    train(make_cfg(dataset, out, max_steps=3, checkpoint_every=3))
    metrics = (out / "metrics.csv").read_text()
    with pytest.raises(config.ConfigError, match="--resume.*--overwrite"):
        train(make_cfg(dataset, out, max_steps=3))
    assert (out / "metrics.csv").read_text() == metrics
    assert config.parse(TrainConfig, "train", ["--data", "d", "--output-dir", "o", "--overwrite"], "t").overwrite
    with pytest.raises(config.ConfigError, match="resume.*overwrite"):
        make_cfg(dataset, out, resume=True, overwrite=True)
    train(make_cfg(dataset, out, max_steps=2, checkpoint_every=2, overwrite=True))
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_0000002"]
    assert list(read_metrics(out)["step"]) == [1, 2]
    assert torch.load(out / "final.pt", weights_only=True)["step"] == 2


def test_resume_falls_back_to_the_newest_intact_checkpoint(dataset, tmp_path, one_thread, capsys):  # noqa: F811
    train(make_cfg(dataset, tmp_path / "a", max_steps=6))
    interrupted = make_cfg(dataset, tmp_path / "b", max_steps=6, checkpoint_every=2, keep_checkpoints=3, stop_after=4)
    train(interrupted)
    bad = checkpoint_file(tmp_path / "b", 4)
    bad.write_bytes(bad.read_bytes()[:1000])
    capsys.readouterr()
    resume = config.make(TrainConfig, {**vars(interrupted), "stop_after": None, "resume": True})
    train(resume)
    err = capsys.readouterr().err
    assert str(bad) in err and "step_0000002" in err
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for step in (2, 4, 6):
        checkpoint_file(tmp_path / "b", step).write_bytes(b"garbage")
    with pytest.raises(config.UserError, match="no intact checkpoint.*step_0000006/rank00000.pt"):
        train(resume)


@pytest.mark.parametrize(
    "args, option",
    [
        (["--class-sample-rate", "0"], "class_sample_rate"),
        (["--class-sample-rate", "1.5"], "class_sample_rate"),
        (["--num-dims", "1000"], "num_dims"),
        (["--scale", "-1"], "scale"),
        (["--loss-backend", "cuda"], "loss_backend"),
        (["--device", "gpu0"], "device"),
        (["--device", "cuda:99"], "device"),
        (["--lr", "nan"], "lr"),
        (["--clip-grad-norm", "inf"], "clip_grad_norm"),
        (["--margin", "3"], "margin"),
        (["--margin", "28.6"], "margin"),  # degrees, as another library takes it
    ],
)
def test_options_are_checked_before_any_work(tmp_path, capsys, args, option):
    out = tmp_path / "out"
    error = cli_error(train_main, ["--data", str(tmp_path / "no-data"), "--output-dir", str(out), *args], capsys)
    assert error.startswith("unicom-train: error:") and f"'{option}'" in error
    assert not out.exists()


def test_damaged_checkpoints_are_named_by_evaluate(dataset, tmp_path, one_thread, capsys):  # noqa: F811
    train(make_cfg(dataset, tmp_path / "run", max_steps=1))
    good = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    other = dict(good, config={**good["config"], "embedding_dim": 8})
    edited = dict(good, config={**good["config"], "embedding_dim": "wide"})
    cases = {
        "garbage.pt": b"\x80\x04 these are not the bytes of a checkpoint",
        "truncated.pt": (tmp_path / "run" / "final.pt").read_bytes()[:2000],
        "state_dict.pt": good["model"],
        "incomplete.pt": {"model": good["model"]},
        "other_size.pt": other,
        "edited.pt": edited,
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        argv = ["--data", str(dataset / "imgs"), "--checkpoint", str(path), "--num-workers", "0", "--device", "cpu"]
        assert str(path) in cli_error(evaluate_main, argv, capsys), name


def test_output_under_a_file_fails_at_validation(dataset, tmp_path):  # noqa: F811
    (tmp_path / "file").write_text("x")
    with pytest.raises(config.ConfigError, match="output_dir"):
        make_cfg(dataset, tmp_path / "file" / "run")
    with pytest.raises(config.ConfigError, match="output"):
        config.make(EvaluateConfig, dict(data="d", method="pixels", output=str(tmp_path / "file" / "m.json")))


def test_garbage_pretrained_file_is_named(tmp_path):
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"\x80\x04 not weights")
    atomic.write_json(tmp_path / f"{TINY_NAME}.json", TINY_CLIP)
    with pytest.raises(ModelError, match="weights.bin"):
        build_model(f"open_clip:{TINY_NAME}", 16, str(garbage), str(tmp_path / f"{TINY_NAME}.json"))
    pytest.importorskip("timm")
    with pytest.raises(ModelError, match="weights.bin"):
        build_model("timm:vit_tiny_patch16_224", 16, str(garbage), image_size=32)


def test_yaml_numbers_written_as_exponents(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  data: d\n  output_dir: o\n  lr: 1e-3\n  max_steps: 1e3\n  batch_size: 8.0\n")
    cfg = config.parse(TrainConfig, "train", ["--config", str(path)], "t")
    assert cfg.lr == 1e-3 and cfg.max_steps == 1000 and cfg.batch_size == 8
    assert isinstance(cfg.max_steps, int) and isinstance(cfg.batch_size, int)
    for text, match in (
        ("warmup_steps: 2.5", "'warmup_steps' must be an integer"),
        ("lr: 1e-3x", "'lr' must be a number"),
    ):
        path.write_text(f"train:\n  {text}\n")
        with pytest.raises(config.ConfigError, match=match):
            config.parse(TrainConfig, "train", ["--config", str(path)], "t")


def test_checkpoints_carry_their_architecture(dataset, tmp_path, one_thread, monkeypatch):  # noqa: F811
    # An architecture of its own name, given by a relative path, then evaluated from elsewhere.
    name = "unicom-adversarial-arch"
    arch = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "width": 32, "layers": 1}}
    (tmp_path / "work").mkdir()
    atomic.write_json(tmp_path / "work" / f"{name}.json", arch)
    monkeypatch.chdir(tmp_path / "work")
    train(make_cfg(dataset, tmp_path / "run", arch=f"open_clip:{name}", model_config=f"{name}.json", max_steps=2,
                   checkpoint_every=2))  # fmt: skip
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_0000002" / "rank00000.pt"):
        model = load_trained(path)
        assert model.backbone.transformer.width == 32
    metrics = evaluate(
        EvaluateConfig(data=str(dataset / "imgs"), checkpoint=str(tmp_path / "run"), num_workers=0, device="cpu"),
        progress=False,
    )
    assert metrics["queries"] == 48


def test_no_scorable_query_is_an_error(tmp_path, capsys):
    for c in range(3):  # one image per class: leave-one-out finds no relevant item for any query
        path = tmp_path / "imgs" / f"class{c}" / "0.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 80 * c, np.uint8), mode="L").save(path)
    argv = ["--data", str(tmp_path / "imgs"), "--method", "pixels", "--pixel-size", "8", "--num-workers", "0"]
    error = cli_error(evaluate_main, [*argv, "--output", str(tmp_path / "m.json")], capsys)
    assert "no query" in error and "nan" not in error.lower()
    assert not (tmp_path / "m.json").exists()


def test_metrics_after_resume_equal_an_uninterrupted_run(dataset, tmp_path, one_thread):  # noqa: F811
    # Rows every 3 steps; the interrupted run stops (and checkpoints) at step 4, inside a row's window.
    train(make_cfg(dataset, tmp_path / "a", max_steps=8, log_every=3))
    interrupted = make_cfg(dataset, tmp_path / "b", max_steps=8, log_every=3, checkpoint_every=4, stop_after=4)
    train(interrupted)
    train(config.make(TrainConfig, {**vars(interrupted), "stop_after": None, "resume": True}))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert list(a["step"]) == [3, 6, 8]
    for column in ("step", "epoch", "loss", "lr", "grad_norm", "skipped"):  # images_per_s is measured time
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)


def test_a_metrics_row_cut_short_does_not_stop_the_resume(dataset, tmp_path, one_thread):  # noqa: F811
    """A process killed inside a row's write leaves its start behind ("1" of "12,..."); the resume
    read it as a row of step 1 with empty fields and failed to rewrite the file."""
    interrupted = make_cfg(dataset, tmp_path / "b", max_steps=8, log_every=3, checkpoint_every=4, stop_after=4)
    train(interrupted)
    with open(tmp_path / "b" / "metrics.csv", "a") as handle:
        handle.write("1")
    train(config.make(TrainConfig, {**vars(interrupted), "stop_after": None, "resume": True}))
    assert list(read_metrics(tmp_path / "b")["step"]) == [3, 6, 8]


def test_negative_margins_are_a_valid_setting(tmp_path):
    cfg = config.make(TrainConfig, dict(data="d", output_dir=str(tmp_path / "o"), margin=-0.2))
    assert cfg.margin == -0.2


def test_skip_bad_keeps_the_intact_samples_of_a_truncated_shard(tmp_path, one_thread):  # noqa: F811
    """train and evaluate index webdataset shards with --skip-bad like the features step."""
    shard = write_tar(tmp_path / "shard-000.tar", wds_members(8, cls=lambda i: str(i % 2)))
    with tarfile.open(shard) as tar:
        cut = tar.getmember("k7.png").offset_data + 10  # inside the last image
    shard.write_bytes(shard.read_bytes()[:cut])
    atomic.write_json(tmp_path / f"{TINY_NAME}.json", TINY_CLIP)
    cfg = make_cfg(tmp_path, tmp_path / "run", data=str(shard), max_steps=2, batch_size=4)
    with pytest.raises(DataError, match="truncated"):
        train(cfg)
    train(dataclasses.replace(cfg, skip_bad=True))
    ecfg = dict(data=str(shard), checkpoint=str(tmp_path / "run"), num_workers=0, device="cpu", ks=[1])
    with pytest.raises(DataError, match="truncated"):
        evaluate(config.make(EvaluateConfig, ecfg), progress=False)
    result = evaluate(config.make(EvaluateConfig, dict(ecfg, skip_bad=True)), progress=False)
    assert result["queries"] == 7
