"""Model building and loading: the weights' own input normalisation, strict timm files, custom
architecture names, trained runs that load without their pretrained weights (CPU, no downloads)."""

import numpy as np
import pytest
import torch
from PIL import Image

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("open_clip")

import open_clip  # noqa: E402
import open_clip.factory  # noqa: E402
import open_clip.pretrained  # noqa: E402

from unicom import atomic, config, evaluate, features  # noqa: E402
from unicom.demo import TINY_CLIP, TINY_NAME  # noqa: E402
from unicom.model import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    ModelError,
    build_model,
    load_clip,
    pretrained_preprocess,
    register_open_clip_config,
)
from unicom.train import TrainConfig, load_trained, train  # noqa: E402

SIGLIP = (0.5, 0.5, 0.5)
TAG = "unicom_test_siglip"  # a SigLIP-style tag of the tiny architecture, "downloaded" from a local file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with the tiny architecture's JSON, a weights file of it and 16 small images."""
    root = tmp_path_factory.mktemp("model")
    atomic.write_json(root / f"{TINY_NAME}.json", TINY_CLIP)
    register_open_clip_config(root / f"{TINY_NAME}.json")
    torch.manual_seed(3)
    torch.save(open_clip.create_model(TINY_NAME).state_dict(), root / "tiny.bin")
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(8):
            path = root / "imgs" / f"c{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (10 + i, 12, 3), dtype=np.uint8)).save(path)
    return root


def _fake_tag(monkeypatch, weights, download: bool = True) -> None:
    """Make ``TAG`` a SigLIP-style tag (mean/std 0.5) of the tiny architecture whose download is ``weights``."""
    cfg = open_clip.pretrained._slpcfg(url="file:///nowhere/unicom-test-never-cached.bin")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_NAME, {TAG: cfg})
    if download:
        monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: str(weights))


def _images(root, transform) -> torch.Tensor:
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted((root / "imgs").rglob("*.png"))])


def test_open_clip_callers_use_the_weights_normalisation(tiny, monkeypatch):
    _fake_tag(monkeypatch, tiny / "tiny.bin")
    arch_json, device = str(tiny / f"{TINY_NAME}.json"), torch.device("cpu")
    rows = []
    for pretrained in (TAG, str(tiny / "tiny.bin")):  # the tag, and its weights as a local file
        model = build_model(f"open_clip:{TINY_NAME}", 8, pretrained, arch_json)
        assert (model.mean, model.std) == (SIGLIP, SIGLIP), pretrained
        cfg = features.FeaturesConfig(model=TINY_NAME, model_config=arch_json, pretrained=pretrained)
        assert features._Encoder(cfg, device).transform.mean == list(SIGLIP), pretrained
        ecfg = evaluate.EvaluateConfig(
            method="clip", clip_model=TINY_NAME, model_config=arch_json, pretrained=pretrained
        )
        clip, transform = evaluate._encoder(ecfg, device)
        assert transform.mean == list(SIGLIP) == transform.std, pretrained
        with torch.no_grad():
            rows.append(clip(_images(tiny, transform)))
    torch.testing.assert_close(rows[0], rows[1], rtol=0, atol=0)  # tag or file: the same features


def test_default_clip_models_keep_clip_normalisation(tiny):
    clip = {"mean": CLIP_MEAN, "std": CLIP_STD}
    assert pretrained_preprocess("ViT-B-32", "openai") == clip
    assert pretrained_preprocess("ViT-B-32", str(tiny / "tiny.bin")) == clip  # every ViT-B-32 tag is CLIP's
    assert pretrained_preprocess("ViT-L-14", str(tiny / "tiny.bin")) == {}  # tags disagree: open_clip's default
    assert pretrained_preprocess("ViT-B-32", None) == {}
    assert pretrained_preprocess("ViT-SO400M-14-SigLIP", "/some/file.bin") == {"mean": SIGLIP, "std": SIGLIP}
    model = build_model(f"open_clip:{TINY_NAME}", 8, str(tiny / "tiny.bin"), str(tiny / f"{TINY_NAME}.json"))
    assert (model.mean, model.std) == (CLIP_MEAN, CLIP_STD)  # an architecture without tags


def test_timm_files_of_another_architecture_or_with_junk_are_refused(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False).state_dict()  # with its ImageNet classifier fc.*
    torch.save(full, tmp_path / "r18.pth")
    model = build_model("timm:resnet18", 8, str(tmp_path / "r18.pth"))
    assert all(torch.equal(v, full[k]) for k, v in model.backbone.state_dict().items())
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ModelError, match=r"r34\.pth.*timm:resnet18.*unexpected keys.*layer1\.2"):
        build_model("timm:resnet18", 8, str(tmp_path / "r34.pth"))
    torch.save({**full, "not_a_weight.foo": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(ModelError, match=r"1 unexpected keys.*not_a_weight\.foo"):
        build_model("timm:resnet18", 8, str(tmp_path / "junk.pth"))


def test_timm_vit_file_is_resampled_to_image_size(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # 14x14 patches, with its head.*
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    net = build_model("timm:vit_tiny_patch16_224", 8, str(tmp_path / "vit.pth"), image_size=64)  # 4x4 patches
    loaded = net.backbone.state_dict()
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(loaded["pos_embed"], expected)
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in loaded.items() if k != "pos_embed")
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 8)


def test_timm_head_takes_the_pooled_width():
    pytest.importorskip("timm")
    model = build_model("timm:mobilenetv3_small_050", 8)  # pooled 1024 wide, num_features 288
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 8)


def test_model_config_of_another_name_is_refused(tiny, tmp_path):
    other = tmp_path / "my-vit.json"
    atomic.write_json(other, TINY_CLIP)
    with pytest.raises(ModelError, match=r"my-vit\.json defines .*'my-vit'.*'RN50'.*open_clip:my-vit"):
        build_model("open_clip:RN50", 8, model_config=str(other))
    with pytest.raises(ModelError, match=r"'my-vit'.*'RN50'"):
        load_clip("RN50", None, str(other))


def _train(root, out, pretrained):
    cfg = dict(data=str(root / "imgs"), output_dir=str(out), arch=f"open_clip:{TINY_NAME}", pretrained=pretrained,
               model_config=str(root / f"{TINY_NAME}.json"), embedding_dim=8, batch_size=4, max_steps=2,
               warmup_steps=1, class_sample_rate=1.0, num_workers=0, device="cpu", progress=False)  # fmt: skip
    train(config.make(TrainConfig, cfg))
    return torch.load(out / "final.pt", weights_only=True)["model"]


def test_load_trained_needs_no_pretrained_file(tiny, tmp_path, one_thread):
    weights = tmp_path / "pre.bin"
    weights.write_bytes((tiny / "tiny.bin").read_bytes())
    saved = _train(tiny, tmp_path / "run", str(weights))
    weights.unlink()
    model = load_trained(tmp_path / "run")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert (model.mean, model.std) == (CLIP_MEAN, CLIP_STD)
    with pytest.raises(ModelError, match="pre.bin"):  # the run's initial weights are that file
        load_trained(tmp_path / "run", weights=False)


def test_load_trained_needs_no_download_of_its_tag(tiny, tmp_path, monkeypatch, one_thread):
    with pytest.MonkeyPatch.context() as online:
        _fake_tag(online, tiny / "tiny.bin")
        saved = _train(tiny, tmp_path / "run", TAG)
    _fake_tag(monkeypatch, None, download=False)  # the tag is known, its weights are not cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_trained(tmp_path / "run")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert (model.mean, model.std) == (SIGLIP, SIGLIP)  # the tag's normalisation, as in training
    with pytest.raises(ModelError, match="offline"):
        load_trained(tmp_path / "run", weights=False)


def test_load_trained_of_a_run_that_ignored_a_renamed_architecture(tiny, tmp_path, one_thread):
    saved = _train(tiny, tmp_path / "run", None)
    state = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    state["custom_arch"] = {**state["custom_arch"], "name": "renamed-arch"}  # older runs built arch regardless
    torch.save(state, tmp_path / "old.pt")
    model = load_trained(tmp_path / "old.pt")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
