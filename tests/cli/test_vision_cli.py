"""``lowbit export onnx W.pth --arch A --calib-images DIR`` and ``lowbit eval M.onnx --images DIR``; the checks on
weights files and image folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.errors import LowbitError
from lowbit.io.images import image_files, load_images
from lowbit.model.vision import build_vision, load_vision
from tests.cli.conftest import run


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    m = build_vision("mobilenet_v2")
    f = tmp_path_factory.mktemp("w") / "mnv2.pth"
    torch.save(m.state_dict(), f)
    return f


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


def test_export_then_eval_a_vision_model(capsys, tmp_path, weights, images):
    out = tmp_path / "m.onnx"
    code, stdout, err = run(capsys, "export", "onnx", weights, "--arch", "mobilenet_v2", "--calib-images", images,
                            "--image-size", 32, "--method", "rtn", "-o", out)
    assert code == 0, err
    assert "53 layers int8 per channel (rtn), 65 activation points uint8" in stdout and out.is_file()
    code, stdout, err = run(capsys, "eval", out, "--images", images, "--reference", weights, "--arch",
                            "mobilenet_v2", "--image-size", 32, "--no-speed", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["n_images"] == 6 and 0 <= r["top1_agreement"] <= 1 and r["model_bytes"] < 0.3 * r["reference_bytes"]
    code, _, err = run(capsys, "export", "onnx", weights, "--arch", "mobilenet_v2", "--calib-images", images,
                       "-o", out)
    assert code == 2 and "exists" in err


def test_export_a_vision_model_with_qat(capsys, tmp_path, weights, images):
    out = tmp_path / "q.onnx"
    code, stdout, err = run(capsys, "export", "onnx", weights, "--arch", "mobilenet_v2", "--calib-images", images,
                            "--image-size", 32, "--method", "qat", "--option", "steps=2", "--option", "batch=2",
                            "--option", "val_images=2", "--option", "init=rtn", "-o", out)
    assert code == 0, err
    assert "53 layers int8 per channel (qat from rtn)" in stdout and out.is_file()
    assert not (tmp_path / ".q.onnx.resume").exists()  # the training checkpoints go once the file is written
    assert "qat: 2 steps on 5 images (53 layers, 65 activation scales), held-out KL" in stdout
    code, stdout, err = run(capsys, "export", "onnx", weights, "--arch", "mobilenet_v2", "--calib-images", images,
                            "--image-size", 32, "--method", "qat", "--option", "steps=1", "--option", "batch=2",
                            "-o", out, "--force", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["method"] == "qat" and r["qat"]["steps"] == 1
    assert r["qat"]["train_images"] == 5  # one of the 6 held out (at most a quarter)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet9"], "--arch resnet9: unknown (known: mobilenet_v2)"),
    (["--arch", "mobilenet_v2", "--calib-images", "IMG", "--method", "qat", "--option", "stepz=3"],
     "qat: unknown option(s) stepz"),
    (["--arch", "mobilenet_v2", "--calib-images", "IMG", "--method", "qat", "--option", "init=hqq"],
     "option 'init' must be gptq or rtn"),
    (["--arch", "mobilenet_v2", "--calib-images", "IMG", "--option", "steps=3"], "--option steps=3: a vision"),
    (["--arch", "mobilenet_v2"], "--calib-images"),
    (["--arch", "mobilenet_v2", "--calib-images", "NOPE"], "NOPE: no such image folder"),
    (["--arch", "mobilenet_v2", "--calib-images", "IMG", "--method", "hqq"], "--method hqq"),
    (["--arch", "mobilenet_v2", "--calib-images", "IMG", "--act-observer", "entropy"], "entropy"),
    (["--arch", "mobilenet_v2", "--calib-images", "IMG", "--scheme", "int4-g32"], "--scheme int4-g32"),
])
def test_export_vision_bad_flags_are_one_line_errors(capsys, tmp_path, weights, images, argv, message):
    argv = [str(images) if a == "IMG" else a for a in argv]
    code, _, err = run(capsys, "export", "onnx", weights, *argv, "-o", tmp_path / "x.onnx")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_weights_files_are_checked(tmp_path, weights):
    sd = torch.load(weights, weights_only=True)
    bad = dict(sd)
    bad.pop("classifier.1.bias")
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(LowbitError, match="missing classifier.1.bias"):
        load_vision(tmp_path / "missing.pth", "mobilenet_v2")
    bad = dict(sd)
    bad["classifier.1.weight"] = torch.zeros(10, 1280)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(LowbitError, match=r"classifier.1.weight has shape \(10, 1280\)"):
        load_vision(tmp_path / "shape.pth", "mobilenet_v2")
    bad = dict(sd)
    bad["features.0.0.weight"] = torch.full_like(sd["features.0.0.weight"], float("nan"))
    torch.save(bad, tmp_path / "nan.pth")
    with pytest.raises(LowbitError, match="NaN"):
        load_vision(tmp_path / "nan.pth", "mobilenet_v2")
    data = weights.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match="not a readable torch state dict"):
        load_vision(tmp_path / "cut.pth", "mobilenet_v2")


def test_image_folders_and_files_are_checked(tmp_path, images):
    assert [p.name for p in image_files(images)] == [f"im{i}.png" for i in range(6)]
    x = load_images(images)
    assert x.shape == (6, 3, 224, 224)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LowbitError, match="no images"):
        image_files(tmp_path / "empty")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(LowbitError, match="broken.png: not a readable image"):
        load_images([tmp_path / "broken.png"])


def test_export_onnx_of_a_quantized_transformer(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "tiny.onnx"
    code, stdout, err = run(capsys, "export", "onnx", tiny_llama_dir, "--scheme", "int4-g32", "-o", out, "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["format"] == "onnx" and r["layers"]["matmulnbits-4bit"] == 14 and out.is_file()
