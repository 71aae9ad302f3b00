"""`hpo export --quantize int8` on the shared finished study: the int8 ONNX file is really int8,
its test accuracy (recomputed here with ONNX Runtime, independently of the export's own check)
is the one printed and stored beside fp32's, within the allowed drop; both file sizes are stated;
both serve commands answer with it over HTTP; bad requests exit 2 and write nothing; a model that
loses too much accuracy is refused."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.helpers import hpo, hpo_env
from tests.serve.helpers import digit_image, encode, get_json, predict, run_module, start_server
from trainer.bundle import load_export
from trainer.config import ConfigError, TrainConfig
from trainer.predict import to_input
from trainer.quantize import check, labelled
from trainer.saved_model import saved_config


@pytest.fixture(scope="module")
def int8_export(finished_study: tuple[str, Path]) -> tuple[Path, str]:
    url, cwd = finished_study
    out = cwd / "export-int8"
    run = hpo("export", "done", "--out", str(out), "--quantize", "int8", url=url, cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout


def _cfg(folder: Path) -> TrainConfig:
    return saved_config(torch.load(folder / "best.pt", weights_only=True))


def test_the_int8_file_is_int8_and_its_accuracy_is_the_one_reported(
    int8_export: tuple[Path, str]
) -> None:
    folder, stdout = int8_export
    fp32_file, int8_file = folder / "model.onnx", folder / "model.int8.onnx"
    assert fp32_file.is_file() and int8_file.is_file()  # --quantize implies the fp32 ONNX file
    model = onnx.load(str(int8_file))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    conv_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert conv_weights, "no int8 weights"

    info = json.loads((folder / "config.json").read_text())["exports"]["int8"]
    assert info["fp32_bytes"] == fp32_file.stat().st_size
    assert info["int8_bytes"] == int8_file.stat().st_size < info["fp32_bytes"]

    images, labels = labelled(_cfg(folder), "test")
    assert len(images) == info["images"] == 360  # digits: 20% of 1797 images
    accuracy = {}
    for name, path in (("fp32", fp32_file), ("int8", int8_file)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        log_probs = session.run(None, {"pixels": to_input(images).numpy()})[0]
        accuracy[name] = float((np.argmax(log_probs, 1) == labels.numpy()).mean())
        assert accuracy[name] == pytest.approx(info[f"{name}_test_accuracy"], abs=1e-9)
    assert accuracy["fp32"] - accuracy["int8"] <= info["max_drop"] == 0.01
    assert f"test accuracy {100 * accuracy['int8']:.2f}% int8 against" in stdout, stdout
    assert f"{100 * accuracy['fp32']:.2f}% fp32 on 360 test images" in stdout
    assert f"{info['int8_bytes'] / 1e6:.2f} MB against {info['fp32_bytes'] / 1e6:.2f} MB" \
        in stdout


def test_both_serve_commands_answer_with_the_int8_model(
    finished_study: tuple[str, Path], int8_export: tuple[Path, str],
    tmp_path_factory: pytest.TempPathFactory
) -> None:
    url, cwd = finished_study
    folder, _ = int8_export
    log = tmp_path_factory.mktemp("int8-server")
    data = encode(digit_image(3), "png-gray")
    answers = []
    for name, cmd, env in (
            ("export", [sys.executable, "-m", "trainer.serve", str(folder), "--runtime", "int8"],
             None),
            ("study", [sys.executable, "-m", "search.cli", "serve", "done", "--runtime", "int8"],
             hpo_env(url))):
        server = start_server(cmd, cwd=cwd, log=log / f"{name}.log", env=env)
        try:
            health = get_json(f"{server.base}/health")
            assert health["runtime"] == "int8", health
            status, body = predict(server.base, data)
            assert status == 200, body
            answers.append(body["predictions"])
        finally:
            assert server.stop() == 0
    # Both quantize the same model on the same calibration images: the same answer.
    assert [p["name"] for p in answers[0]] == [p["name"] for p in answers[1]]
    assert answers[0][0]["probability"] == pytest.approx(answers[1][0]["probability"], abs=1e-6)
    assert "quantized to int8 on 512 train images" in (log / "study.log").read_text()


def test_bad_int8_requests_exit_2_and_write_nothing(
    finished_study: tuple[str, Path], exports: dict[str, Path], tmp_path: Path
) -> None:
    url, cwd = finished_study
    for args, words in ((["--quantize", "int4"], "invalid choice: 'int4'"),
                        (["--quantize", "int8", "--max-accuracy-drop", "1.5"],
                         "--max-accuracy-drop must be between 0 and 1")):
        out = tmp_path / "out"
        run = hpo("export", "done", "--out", str(out), *args, url=url, cwd=cwd)
        assert run.returncode == 2, (args, run.stderr[-2000:])
        assert words in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert not out.exists()
    # An export made without --quantize has no int8 file to serve: said, not converted.
    run = run_module(["trainer.serve", str(exports["ensemble"]), "--runtime", "int8"], cwd=cwd)
    assert run.returncode == 2 and "has no model.int8.onnx" in run.stderr, run.stderr[-2000:]
    assert "--quantize int8" in run.stderr


def test_an_int8_model_that_loses_too_much_accuracy_is_refused(
    int8_export: tuple[Path, str]
) -> None:
    folder, _ = int8_export
    fp32 = (folder / "model.onnx").read_bytes()
    # A stand-in for a quantization gone wrong: the classifier's weights negated, which turns
    # the most likely class into the least likely one.
    broken = onnx.load_from_string(fp32)
    gemm = next(n for n in broken.graph.node if n.op_type == "Gemm")
    weight = next(i for i in broken.graph.initializer if i.name == gemm.input[1])
    array = -onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    bundle, cfg = load_export(folder), _cfg(folder)
    with pytest.raises(ConfigError, match=r"loses .* points of test accuracy.*nothing was"):
        check(bundle, fp32, broken.SerializeToString(), cfg, max_drop=0.01)
    # The same model, allowed to lose everything, passes and says what it lost.
    result = check(bundle, fp32, broken.SerializeToString(), cfg, max_drop=1.0)
    assert result["int8_test_accuracy"] < result["fp32_test_accuracy"]


def test_calibration_sees_every_class_of_a_class_sorted_image_folder(tmp_path: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in (0, 1, 2):  # 150 images a class, ~90 of each in the train split
        (tmp_path / f"digit{digit}").mkdir()
        for i, image in enumerate(digits.images[digits.target == digit][:150]):
            pixels = (image * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(pixels, "L").save(tmp_path / f"digit{digit}" / f"{i:03d}.png")
    cfg = TrainConfig(dataset=f"imagefolder:{tmp_path}", image_size=8, device="cpu")
    _, in_order = labelled(cfg, "test")
    # A plain pass over a split goes class by class, so its first images are of one class.
    assert in_order.tolist() == sorted(in_order.tolist()) and len(set(in_order.tolist())) == 3
    _, calibration = labelled(cfg, "train", 64)
    counts = torch.bincount(calibration, minlength=3)
    assert len(calibration) == 64 and bool((counts > 0).all()), counts
