"""What a newcomer hits first: captionless folders, failed-run leftovers, worker defaults, timm sizes,
logs without a progress bar, offline tags, slow --help, and the plots / tables each step leaves."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("open_clip")

from test_pipeline_train import write_bar_images  # noqa: E402

from unicom import atomic, config, features, model  # noqa: E402
from unicom.demo import TINY_NAME  # noqa: E402
from unicom.evaluate import EvaluateConfig, evaluate  # noqa: E402
from unicom.features import FeaturesConfig, extract  # noqa: E402
from unicom.train import TrainConfig, train  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def folder(tmp_path):
    """8 captionless 8x8 images in 2 class folders + the tiny ViT config."""
    return write_bar_images(tmp_path, 2, 4, bar=3)


def features_cfg(root, **kw):
    values = dict(data=str(root / "imgs"), output_dir=str(root / "feats"), num_workers=0, device="cpu", shard_size=4)
    values.update(kw)
    return config.make(FeaturesConfig, values)


def train_cfg(root, **kw):
    values = dict(
        data=str(root / "imgs"),
        output_dir=str(root / "run"),
        arch=f"open_clip:{TINY_NAME}",
        model_config=str(root / f"{TINY_NAME}.json"),
        embedding_dim=8,
        batch_size=4,
        max_steps=8,
        warmup_steps=1,
        class_sample_rate=1.0,
        num_workers=0,
        log_every=4,
        checkpoint_every=100,
        progress=False,
        device="cpu",
    )
    values.update(kw)
    return config.make(TrainConfig, values)


# -- 6: features of a folder without captions ------------------------------------------------------------------------


def test_captionless_folder_defaults_to_image_mode(folder, one_thread, capsys):
    index = extract(features_cfg(folder, model=TINY_NAME, model_config=str(folder / f"{TINY_NAME}.json")))
    assert index["mode"] == "image" and index["rows"] == 8
    assert "no captions" in capsys.readouterr().err


def test_pixels_implies_image_mode(folder):
    assert extract(features_cfg(folder, model="pixels"), quiet=True)["mode"] == "image"


@pytest.mark.parametrize("mode", ["joint", "text"])
def test_explicit_caption_mode_without_captions_fails_before_loading(folder, monkeypatch, mode):
    monkeypatch.setattr(features, "load_clip", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(config.ConfigError, match=f"mode={mode} needs captions"):
        extract(features_cfg(folder, model=TINY_NAME, mode=mode), quiet=True)
    assert not (folder / "feats" / "meta.json").exists()


# -- 7: a failed features run does not block the corrected command ----------------------------------------------------


def test_failed_features_run_does_not_block_a_retry(folder):
    with pytest.raises(model.ModelError, match="ViT-Nope"):
        extract(features_cfg(folder, model="ViT-Nope", mode="image"), quiet=True)
    assert extract(features_cfg(folder, model="pixels", mode="image"), quiet=True)["rows"] == 8
    # A folder that holds features still refuses other settings.
    with pytest.raises(config.ConfigError, match="different settings"):
        extract(features_cfg(folder, model="pixels", mode="image", pixel_size=4), quiet=True)


# -- 8: worker defaults fit the machine -------------------------------------------------------------------------------


def test_num_workers_default_fits_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert FeaturesConfig().num_workers == TrainConfig().num_workers == EvaluateConfig().num_workers == 2


# -- 9: timm models that take no img_size ---------------------------------------------------------------------------


def test_timm_image_size_for_models_without_img_size(one_thread):
    pytest.importorskip("timm")
    for arch, size in (("timm:resnet18", 64), ("timm:vit_tiny_patch16_224", 32)):
        net = model.build_model(arch, 8, image_size=size).eval()
        assert net.image_size == size
        with torch.no_grad():
            assert net(torch.zeros(1, 3, size, size)).shape == (1, 8)


# -- 10 and 13: progress lines without a bar, loss.png --------------------------------------------------------------


def test_train_logs_lines_without_a_bar_and_plots(folder, one_thread, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    train(train_cfg(folder, stop_after=4))
    err = capsys.readouterr().err
    assert "step 4/8" in err and "loss" in err and "ETA" in err and "images/s" in err
    written = []
    real_write = atomic.write_bytes
    monkeypatch.setattr(atomic, "write_bytes", lambda p, d: written.append(os.fspath(p)) or real_write(p, d))
    train(train_cfg(folder, resume=True))
    err = capsys.readouterr().err
    assert "resumed at step 4" in err and "step 8/8" in err and "wrote" in err and "final.pt" in err
    assert os.fspath(folder / "run" / "loss.png") in written
    assert (folder / "run" / "loss.png").read_bytes()[:8] == PNG


# -- 11: an open_clip tag offline fails at once ----------------------------------------------------------------------


def test_offline_tag_fails_at_once(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(model.ModelError, match="offline.*local"):
        model.load_clip("ViT-B-32", "openai")
    with pytest.raises(model.ModelError, match="offline.*local"):
        model.build_model("open_clip:ViT-B-32", 8, pretrained="openai")
    assert time.perf_counter() - start < 5


# -- 12: --help without heavy imports --------------------------------------------------------------------------------


def test_help_is_quick_and_imports_nothing_heavy():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "unicom.train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "unicom-train" in done.stdout
    assert time.perf_counter() - start < 8  # torch itself takes 2-3 s
    heavy = ("open_clip", "timm", "faiss", "matplotlib", "torchvision", "webdataset", "sklearn")
    code = f"""
import contextlib, io, sys, importlib
for step in ("train", "features", "cluster", "evaluate", "demo"):
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        importlib.import_module(f"unicom.{{step}}").main(["--help"])
print([m for m in {heavy!r} if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- 13: evaluate writes its table as markdown too --------------------------------------------------------------------


def test_evaluate_writes_markdown_beside_json(folder):
    out = folder / "eval" / "pixels.json"
    evaluate(EvaluateConfig(data=str(folder / "imgs"), method="pixels", num_workers=0, output=str(out)), progress=False)
    assert json.loads(out.read_text())["method"] == "pixels"
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| method |") and "Recall@1" in table and "mAP@R" in table and "| pixels |" in table
