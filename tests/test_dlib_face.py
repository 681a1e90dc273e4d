"""dlib's face-recognition ResNet read from the face_recognition_models package: the converted
Keras network against dlib's own descriptors (tests/data, written by bench/dlib_reference.py),
its use as Model B's backbone, and the reader's refusals. Offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from training.catalog import BACKBONES
from training.dlib_face import MIN_INPUT_SIDE, default_weights_path, make_dlib_face_resnet, read_dlib_network

REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((REPO / "tests" / "data" / "dlib_face_reference.json").read_text())
sys.path.insert(0, str(REPO / "bench"))
from dlib_reference import crop  # noqa: E402  (the same crops the reference was computed on)


@pytest.fixture(scope="module")
def descriptor_model():
    return make_dlib_face_resnet(weights="dlib")


def test_converted_network_gives_dlibs_own_descriptors(descriptor_model):
    names = list(REFERENCE["descriptors"])
    images = np.stack([crop(name) for name in names]).astype(np.float32)
    ours = descriptor_model.predict(images, verbose=0)
    theirs = np.array([REFERENCE["descriptors"][name] for name in names])
    assert ours.shape == theirs.shape == (3, 128)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)  # descriptors are ~0.1 in size


def test_reader_sees_the_whole_wiring():
    network = read_dlib_network(default_weights_path())
    kinds = [layer["kind"] for layer in network["layers"]]
    assert network["size"] == (150, 150)
    np.testing.assert_allclose(network["mean"], [122.782, 117.001, 104.298], atol=1e-3)
    # stem 4 layers, 10 plain residual blocks of 7, 4 downsampling blocks of 8, pooling + fc
    assert len(kinds) == 4 + 10 * 7 + 4 * 8 + 2
    assert kinds.count("con_4") == 1 + 14 * 2 and kinds[-1] == "fc_2"
    stem = network["layers"][0]
    assert stem["kernel"].shape == (7, 7, 3, 32) and stem["strides"] == (2, 2) and stem["padding"] == (0, 0)


def test_backbone_feature_map_and_minimum_size():
    from training.models import make_backbone

    backbone = make_backbone("dlib_face_resnet", (150, 150), "imagenet")
    assert backbone.output_shape == (None, 2, 2, 256)
    assert make_dlib_face_resnet((MIN_INPUT_SIDE, MIN_INPUT_SIDE, 3), include_top=False).output_shape[1] == 1
    assert BACKBONES["dlib_face_resnet"].min_size == MIN_INPUT_SIDE  # the catalogue's copy for the CLI
    with pytest.raises(ValueError, match=f"at least {MIN_INPUT_SIDE} px"):
        make_dlib_face_resnet((MIN_INPUT_SIDE - 1, MIN_INPUT_SIDE - 1, 3), include_top=False)


def test_cli_refuses_a_too_small_image_size_before_decoding(synthetic_dir, tmp_path):
    from training.cli import main

    with pytest.raises(SystemExit, match=f"at least {MIN_INPUT_SIDE} pixels for dlib_face_resnet"):
        main(["--data", str(synthetic_dir), "--out", str(tmp_path), "--model", "B", "--backbone",
              "dlib_face_resnet", "--image-size", "64"])
    assert not list(tmp_path.iterdir())


def test_model_b_with_the_dlib_backbone_trains_saves_and_maps(synthetic_dir, tmp_path):
    import keras

    from analysis.models import load_model
    from training.cli import main

    assert main(["--data", str(synthetic_dir), "--out", str(tmp_path), "--model", "B", "--backbone",
                 "dlib_face_resnet", "--image-size", str(MIN_INPUT_SIDE), "--epochs", "2", "--head-epochs", "1",
                 "--batch-size", "16", "--no-cache", "--fine-tune-fraction", "0.5"]) == 0
    path = tmp_path / "age_gender_B.keras"
    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    backbone = model.get_layer("dlib_face_resnet")
    network = read_dlib_network(default_weights_path())
    # phase 2 unfroze the top half: the stem keeps dlib's weights exactly, the last block moved
    np.testing.assert_array_equal(backbone.get_layer("stem_conv").get_weights()[0], network["layers"][0]["kernel"])
    last_conv = [layer for layer in network["layers"] if layer["kind"] == "con_4"][-1]
    assert not np.allclose(backbone.get_layer("level4_block0_2_conv").get_weights()[0], last_conv["kernel"])
    loaded = load_model(path)  # the analysis loader, no hints
    assert loaded.preprocessing_inside and loaded.preprocessing == "rgb_0_255"
    assert tuple(loaded.input_size) == (MIN_INPUT_SIDE, MIN_INPUT_SIDE)
    assert loaded.mapping.output_names[loaded.mapping.age_output] == "age"
    assert loaded.mapping.output_names[loaded.mapping.gender_output] == "gender"
    assert not loaded.user_settings
    images = np.random.default_rng(0).integers(0, 256, (2, MIN_INPUT_SIDE, MIN_INPUT_SIDE, 3), dtype=np.uint8)
    reference = model.predict(images.astype(np.float32), verbose=0)
    age, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(np.ravel(age), reference[0].ravel(), rtol=1e-4)
    np.testing.assert_allclose(np.ravel(p_female), reference[1].ravel(), rtol=1e-4)


def test_reader_refuses_other_and_broken_files(tmp_path):
    real = default_weights_path().read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(real[:200_000])
    with pytest.raises(ValueError, match="truncated.dat.*ends early"):
        read_dlib_network(truncated)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x80\x02}q\x00" + bytes(range(256)) * 40)  # the start of a pickle
    with pytest.raises(ValueError, match="junk.dat as dlib's face-recognition network.*takes "
                                         "dlib_face_recognition_resnet_model_v1.dat"):  # names the file it wants
        read_dlib_network(junk)
    # hostile numbers: a float beyond float64's range, a tensor claiming 2^62 values
    start = b"\x01\x01\x01\x0dloss_metric_2"
    overflow = tmp_path / "overflow.dat"
    overflow.write_bytes(start + b"\x08" + b"\xff" * 8 + b"\x02" + (1990).to_bytes(2, "little"))
    with pytest.raises(ValueError, match="overflow.dat.*out of range"):
        read_dlib_network(overflow)
    marker = real.index(b"\x05con_4") + 6  # the first convolution's parameter tensor
    giant = tmp_path / "giant.dat"
    giant.write_bytes(real[:marker] + b"\x01\x02" + b"\x08" + (2**62).to_bytes(8, "little") + b"\x01\x01" * 3 + real[marker:])
    with pytest.raises(ValueError, match="giant.dat.*ends early"):
        read_dlib_network(giant)
    huge = tmp_path / "huge.dat"
    with open(huge, "wb") as handle:
        handle.truncate(65 * 2**20)  # sparse: no disk used
    with pytest.raises(ValueError, match="larger than 64 MB"):
        read_dlib_network(huge)
    with pytest.raises(ValueError, match="not found"):
        read_dlib_network(tmp_path / "missing.dat")


def test_weights_of_another_network_are_refused():
    from training.lite import default_weights_path as lite_weights
    from training.models import make_backbone

    with pytest.raises(ValueError, match="not dlib's face-recognition network|as dlib's face-recognition network"):
        make_backbone("dlib_face_resnet", (150, 150), str(lite_weights(0)))


def test_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match="pip install face_recognition_models.*--weights PATH"):
        default_weights_path()
