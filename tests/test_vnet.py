"""V-Net (src/models/vnet.py): shapes, padding of odd sizes, the CRF head, save/load, errors."""

import keras
import numpy as np
import pytest

from crf_rnn_3d.crf import CrfRnn
from crf_rnn_3d.models.vnet import VNetConfigError, build_vnet, check_config, padding_for

SMALL = {
    "levels": 2,
    "base_channels": 4,
    "convs_per_level": [1, 2],
    "bottom_convs": 2,
    "kernel_size": 3,
    "activation": "prelu",
    "dropout": 0.0,
}
CRF = {"theta_alpha": 8.0, "theta_beta": 1.0, "theta_gamma": 3.0, "num_iterations": 2}


@pytest.mark.parametrize("channels", [1, 4])
def test_output_shape_for_1_and_4_channels(channels):
    model = build_vnet((8, 12, 16, channels), 3, SMALL)
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 16, channels)).astype(np.float32)
    assert tuple(model(x).shape) == (2, 8, 12, 16, 3)


def test_paper_layout_levels_channels_and_kernels():
    cfg = {**SMALL, "levels": 4, "base_channels": 16, "convs_per_level": [1, 2, 3, 3],
           "bottom_convs": 3, "kernel_size": 5}  # fmt: skip
    model = build_vnet((16, 16, 16, 1), 2, cfg)
    convs = {layer.name: layer for layer in model.layers}
    # 16 channels doubling per level, 5x5x5 convolutions, 2x2x2 strided down / transposed up
    for level, n in enumerate([1, 2, 3, 3]):
        for i in range(n):
            conv = convs[f"down{level}_conv{i}"]
            assert conv.filters == 16 * 2**level
            assert tuple(conv.kernel_size) == (5, 5, 5)
        assert convs[f"down{level}_stride"].filters == 32 * 2**level
        assert tuple(convs[f"down{level}_stride"].strides) == (2, 2, 2)
        assert convs[f"up{level}_transpose"].filters == 16 * 2**level
    assert convs["bottom_conv2"].filters == 256
    assert isinstance(convs["down0_out"], keras.layers.PReLU)
    assert convs["logits"].filters == 2 and tuple(convs["logits"].kernel_size) == (1, 1, 1)


def test_padding_for_hand_values():
    assert padding_for([63, 200, 200], 16) == [(0, 1), (4, 4), (4, 4)]
    assert padding_for([64, 7], 8) == [(0, 0), (0, 1)]


def test_odd_sizes_padded_and_cropped_and_do_not_leak():
    """Sizes not divisible by 2**levels: the output has the input's size and equals (same
    weights) a model built for the zero-padded input, cropped back by hand."""
    model = build_vnet((7, 10, 9, 1), 2, SMALL)
    x = np.random.default_rng(1).normal(size=(1, 7, 10, 9, 1)).astype(np.float32)
    y = np.asarray(model(x))
    assert y.shape == (1, 7, 10, 9, 2)
    pads = padding_for((7, 10, 9), 4)
    assert pads == [(0, 1), (1, 1), (1, 2)]
    padded = build_vnet((8, 12, 12, 1), 2, SMALL)
    padded.set_weights(model.get_weights())
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    yp = np.asarray(padded(xp))[:, 0:7, 1:11, 1:10]
    np.testing.assert_allclose(y, yp, rtol=1e-5, atol=1e-5)


def test_relu_and_dropout_options():
    cfg = {**SMALL, "activation": "relu", "dropout": 0.3}
    model = build_vnet((8, 8, 8, 1), 2, cfg)
    names = [layer.name for layer in model.layers]
    assert "down0_dropout" in names and "up0_dropout" in names
    assert isinstance(model.get_layer("down0_out"), keras.layers.ReLU)
    x = np.ones((1, 8, 8, 8, 1), np.float32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))  # inference


def test_crf_head_on_and_off():
    plain = build_vnet((8, 8, 8, 1), 2, SMALL)
    keras.utils.set_random_seed(3)
    headed = build_vnet((8, 8, 8, 1), 2, SMALL, crf=CRF, spacing=(2.0, 1.0, 1.0))
    assert not any(isinstance(layer, CrfRnn) for layer in plain.layers)
    crf = headed.get_layer("crf")
    assert isinstance(crf, CrfRnn) and crf.spacing == [2.0, 1.0, 1.0]
    # the head is fed with the V-Net's logits and the input image
    assert [t.name for t in crf._inbound_nodes[0].input_tensors][1] == headed.inputs[0].name
    # V-Net part with the head's weights removed = the plain model's weights count
    assert len(headed.get_weights()) == len(plain.get_weights()) + 3
    # with the head, the output equals CrfRnn applied to the V-Net's logits
    x = np.random.default_rng(2).normal(size=(1, 8, 8, 8, 1)).astype(np.float32)
    logits = keras.Model(headed.inputs[0], headed.get_layer("logits").output)(x)
    expected = crf([logits, x], training=False)
    np.testing.assert_allclose(np.asarray(headed(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_save_load_keras_file(tmp_path):
    model = build_vnet((8, 8, 8, 1), 2, SMALL, crf=CRF, spacing=(2.0, 1.0, 1.0))
    x = np.random.default_rng(4).normal(size=(1, 8, 8, 8, 1)).astype(np.float32)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"levels": 0}, "model.levels"),
        ({"convs_per_level": [1]}, "model.convs_per_level"),
        ({"kernel_size": 4}, "model.kernel_size"),
        ({"activation": "tanh"}, "model.activation"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"base_channels": 2.5}, "model.base_channels"),
    ],
)
def test_bad_settings_name_the_setting(change, setting):
    with pytest.raises(VNetConfigError, match=setting):
        check_config({**SMALL, **change})


def test_bad_shapes_and_missing_spacing():
    with pytest.raises(VNetConfigError, match="input_shape"):
        build_vnet((8, None, 8, 1), 2, SMALL)
    with pytest.raises(VNetConfigError, match="num_classes"):
        build_vnet((8, 8, 8, 1), 1, SMALL)
    with pytest.raises(VNetConfigError, match="spacing"):
        build_vnet((8, 8, 8, 1), 2, SMALL, crf=CRF)
