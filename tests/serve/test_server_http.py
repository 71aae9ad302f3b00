"""The prediction service as a real process over real HTTP: `python -m trainer.serve EXPORT` and
`hpo serve STUDY`. Every kind of image is answered like the model in-process; every bad upload gets
a 4xx with one sentence, leaves nothing on disk, and the server keeps serving; a concurrent burst
is answered in full; a restart (SIGTERM, start again) answers the same."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import hpo, hpo_env
from tests.serve.helpers import (
    Server,
    bomb_png,
    digit_image,
    encode,
    free_port,
    get_json,
    large_jpeg,
    noise_png,
    post,
    predict,
    run_module,
    start_server,
)

LOSSLESS = ("png-gray", "png-rgb", "png-rgba", "png-palette", "png-16bit")
KINDS = (*LOSSLESS, "jpeg")
UPLOAD_MB = 1


@pytest.fixture(scope="module")
def tmpdir_of_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="module")
def server(exports: dict[str, Path], tmpdir_of_server: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The single best model's export, served with a 1 MiB upload limit; its temporary folder
    is its own, so a test can see that nothing was left there."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "TMPDIR": str(tmpdir_of_server)}
    s = start_server([sys.executable, "-m", "trainer.serve", str(exports["single"]),
                      "--max-upload-mb", str(UPLOAD_MB), "--max-pixels", "4000000"],
                     cwd=exports["single"].parent, log=log, env=env)
    yield s
    s.stop()


def in_process(export: Path, data: bytes, runtime: str = "torch") -> list[dict]:
    from trainer.bundle import load_export
    from trainer.predict import Predictor

    onnx = export / "model.onnx"
    model = onnx.read_bytes() if runtime == "onnx" and onnx.is_file() else None
    return Predictor(load_export(export), runtime, onnx_model=model).predict(data, 3)


def same_answer(got: list[dict], want: list[dict], tol: float = 1e-5) -> bool:
    return [p["name"] for p in got] == [p["name"] for p in want] and all(
        abs(g["probability"] - w["probability"]) <= tol for g, w in zip(got, want, strict=True))


def test_every_kind_of_image_is_answered_like_the_model_in_process(
    server: Server, exports: dict[str, Path]
) -> None:
    model = get_json(f"{server.base}/model")
    assert model["classes"] == [str(d) for d in range(10)]
    assert model["input"] == {"channels": 1, "height": 8, "width": 8}
    assert model["study"] == "done" and isinstance(model["trial"], int)
    pixels = digit_image(5)
    tops = {}
    for kind in KINDS:
        data = encode(pixels, kind)
        status, answer = predict(server.base, data)
        assert status == 200, (kind, answer)
        preds = answer["predictions"]
        assert len(preds) == 3 and all(p["name"] in model["classes"] for p in preds)
        assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds),
                                                           reverse=True)
        assert same_answer(preds, in_process(exports["single"], data)), kind
        assert answer["unknown"] == (preds[0]["probability"] < answer["threshold"])
        assert answer["label"] == ("unknown" if answer["unknown"] else preds[0]["name"])
        tops[kind] = preds
    # The same picture in every lossless encoding is the same input to the model.
    for kind in LOSSLESS[1:]:
        assert same_answer(tops[kind], tops[LOSSLESS[0]]), kind
    # Any size: a large colour photo-like image is resized as in training.
    status, answer = predict(server.base, large_jpeg(pixels))
    assert status == 200 and len(answer["predictions"]) == 3, answer
    # top_k and threshold from the query; threshold 0 never answers "unknown".
    status, answer = predict(server.base, encode(pixels, "png-gray"), "?top_k=5&threshold=0")
    assert status == 200 and len(answer["predictions"]) == 5 and not answer["unknown"]
    status, answer = predict(server.base, encode(pixels, "png-gray"), "?threshold=1")
    assert status == 200 and answer["unknown"] and answer["label"] == "unknown"
    # A raw image body (curl --data-binary) works as well as multipart.
    status, answer = post(f"{server.base}/predict", encode(pixels, "png-gray"), "image/png")
    assert status == 200 and answer["predictions"] == tops["png-gray"]


def test_bad_uploads_get_one_sentence_and_the_server_keeps_serving(
    server: Server, exports: dict[str, Path], tmpdir_of_server: Path
) -> None:
    cwd = exports["single"].parent
    before = sorted(p.name for p in cwd.rglob("*"))
    # What the process itself made at start-up (torch's cache folders) may be there already.
    tmp_before = sorted(p.name for p in tmpdir_of_server.rglob("*"))
    whole = noise_png(300, 300)
    cases = {
        "not an image": (predict, b"hello, this is text\n" * 10, 415, "not an image"),
        "truncated": (predict, whole[: len(whole) // 2], 422, "truncated"),
        "decompression bomb": (predict, bomb_png(), 413, "pixels"),
        "over the size limit": (predict, b"\x89PNG" + os.urandom(UPLOAD_MB * 2**20 + 10), 413,
                                "limit"),
        "empty file": (predict, b"", 400, "empty"),
    }
    for name, (send, data, status, words) in cases.items():
        got, answer = send(server.base, data)
        assert got == status, (name, got, answer)
        error = answer["error"]
        assert words in error and "\n" not in error and "Traceback" not in error, (name, error)
        assert get_json(f"{server.base}/health")["status"] == "ok", name
    got, answer = post(f"{server.base}/predict", b"", "image/png")
    assert got == 400 and "empty" in answer["error"]
    body = (b"--b\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--b--\r\n")
    got, answer = post(f"{server.base}/predict", body, "multipart/form-data; boundary=b")
    assert got == 400 and "'file'" in answer["error"], answer
    got, answer = predict(server.base, encode(digit_image(1), "png-gray"), "?threshold=2")
    assert got == 400 and "threshold" in answer["error"]
    got, answer = predict(server.base, encode(digit_image(1), "png-gray"), "?top_k=x")
    assert got == 400 and "top_k" in answer["error"]
    # Still serving, and nothing was written: not in the temporary folder, not beside the model.
    status, _ = predict(server.base, encode(digit_image(1), "png-gray"))
    assert status == 200
    assert sorted(p.name for p in tmpdir_of_server.rglob("*")) == tmp_before
    assert sorted(p.name for p in cwd.rglob("*")) == before
    assert server.proc.poll() is None


def test_a_concurrent_burst_is_answered_in_full(server: Server) -> None:
    images = [encode(digit_image(i), KINDS[i % len(KINDS)]) for i in range(12)]
    alone = [predict(server.base, data)[1]["predictions"] for data in images]
    with ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda i: predict(server.base, images[i % 12]), range(48)))
    assert all(status == 200 for status, _ in burst)
    for i, (_, answer) in enumerate(burst):
        assert same_answer(answer["predictions"], alone[i % 12]), i


def test_requests_that_arrive_together_share_a_forward_pass(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    # A batch of 4 waits up to 10 s for its last image, and leaves as soon as it is full: the 4
    # concurrent requests make one pass, however fast this machine is.
    images = [encode(digit_image(i), "png-gray") for i in range(4)]
    server = start_server([sys.executable, "-m", "trainer.serve", str(exports["single"]),
                           "--max-batch", "4", "--batch-wait-ms", "10000"], cwd=tmp_path,
                          log=tmp_path / "batched.log")
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda data: predict(server.base, data), images))
        batching = get_json(f"{server.base}/health")["batching"]
    finally:
        server.stop()
    assert batching == {"max_batch": 4, "wait_ms": 10000, "batches": 1, "images": 4,
                        "largest": 4}
    for data, (status, answer) in zip(images, answers, strict=True):
        assert status == 200
        assert same_answer(answer["predictions"], in_process(exports["single"], data))


def test_a_restarted_server_answers_the_same(exports: dict[str, Path], tmp_path: Path) -> None:
    data = encode(digit_image(7), "png-rgb")
    cmd = [sys.executable, "-m", "trainer.serve", str(exports["single"])]
    port = free_port()
    first = start_server(cmd, cwd=tmp_path, log=tmp_path / "first.log", port=port)
    before = predict(first.base, data)
    assert first.stop() == 0, first.log.read_text()[-2000:]  # SIGTERM is a clean stop
    second = start_server(cmd, cwd=tmp_path, log=tmp_path / "second.log", port=port)
    try:
        after = predict(second.base, data)
    finally:
        second.stop()
    assert before[0] == after[0] == 200
    assert before[1] == after[1]


def test_hpo_serve_serves_the_studys_winner_and_its_ensemble_on_onnx(
    finished_study: tuple[str, Path], exports: dict[str, Path], tmp_path: Path
) -> None:
    url, cwd = finished_study
    data = encode(digit_image(3), "png-gray")
    cmd = [sys.executable, "-m", "search.cli", "serve", "done"]
    single = start_server(cmd, cwd=cwd, log=tmp_path / "single.log", env=hpo_env(url))
    try:
        model = get_json(f"{single.base}/model")
        status, answer = predict(single.base, data)
    finally:
        single.stop()
    exported = get_json_file(exports["single"] / "config.json")
    assert (model["study"], model["stage"], model["trial"]) == (
        "done", exported["stage"], exported["trial"])
    assert status == 200 and same_answer(answer["predictions"], in_process(exports["single"],
                                                                           data))
    ensemble = start_server([*cmd, "--top", "3", "--runtime", "onnx"], cwd=cwd,
                            log=tmp_path / "ensemble.log", env=hpo_env(url))
    try:
        model = get_json(f"{ensemble.base}/model")
        status, answer = predict(ensemble.base, data)
    finally:
        ensemble.stop()
    assert model["kind"] == "ensemble" and len(model["members"]) == 3
    assert model["runtime"] == "onnx"
    assert status == 200
    assert same_answer(answer["predictions"], in_process(exports["ensemble"], data), tol=1e-4)


def get_json_file(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_bad_flags_are_one_line_and_exit_2(finished_study: tuple[str, Path],
                                           tmp_path: Path) -> None:
    url, cwd = finished_study
    missing = run_module(["trainer.serve", str(tmp_path / "nothing")], cwd=tmp_path)
    assert missing.returncode == 2 and "no config.json" in missing.stderr, missing.stderr
    for args, words in ((["serve", "done", "--threshold", "2"], "--threshold"),
                        (["serve", "nosuch"], "nosuch"),
                        (["serve", "done", "--top", "99"], "--top 99"),
                        (["serve", "done", "--max-batch", "0"], "--max-batch"),
                        (["serve", "done", "--batch-wait-ms", "-1"], "--batch-wait-ms")):
        run = hpo(*args, url=url, cwd=cwd, timeout=300)
        assert run.returncode == 2, (args, run.stderr[-2000:])
        assert words in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_an_exported_ensemble_is_served_from_its_checked_onnx_file(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    data = encode(digit_image(9), "jpeg")
    server = start_server([sys.executable, "-m", "trainer.serve", str(exports["ensemble"]),
                           "--runtime", "onnx", "--threshold", "0.6"], cwd=tmp_path,
                          log=tmp_path / "ensemble.log")
    try:
        model = get_json(f"{server.base}/model")
        status, answer = predict(server.base, data)
    finally:
        server.stop()
    assert (model["kind"], model["runtime"], model["threshold"]) == ("ensemble", "onnx", 0.6)
    assert [m["trial"] for m in model["members"]] == [
        m["trial"] for m in get_json_file(exports["ensemble"] / "config.json")["members"]]
    assert status == 200
    assert same_answer(answer["predictions"], in_process(exports["ensemble"], data, "onnx"))
