"""What an uploaded picture becomes before the model sees it, and whether its pixels are like the training images'."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attribution_core.data import (
    PIXEL_STATISTICS,
    dataset_from_arrays,
    image_to_input,
    input_conversion,
    input_to_image,
    pixel_statistics,
    typical_pixel_range,
    unlike_training,
)


@pytest.fixture(scope="module")
def gray_set():
    """40 grayscale 28x28 images: a bright square of growing brightness on black, like Fashion-MNIST's centred objects."""
    images = np.zeros((40, 28, 28), dtype=np.uint8)
    for index in range(40):
        images[index, 7:21, 7:21] = 100 + 3 * index
    return dataset_from_arrays(images, np.arange(40) % 2)


def test_a_colour_strip_is_noted_as_made_grayscale_and_squeezed_and_a_grayscale_square_as_nothing(gray_set):
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 900, 3), dtype=np.uint8))
    assert input_conversion(strip, gray_set) == {
        "original_size": (900, 60), "input_size": (28, 28), "resized": True, "original_aspect": 15.0, "input_aspect": 1.0,
        "colour_dropped": True}
    square = Image.fromarray(gray_set.images[3]).convert("RGB")  # three equal channels: no colour to drop
    assert input_conversion(square, gray_set) == {
        "original_size": (28, 28), "input_size": (28, 28), "resized": False, "original_aspect": 1.0, "input_aspect": 1.0,
        "colour_dropped": False}


def test_what_the_model_sees_is_the_input_tensor_as_an_image(gray_set):
    picture = Image.fromarray(np.arange(56 * 56, dtype=np.uint32).reshape(56, 56).astype(np.uint8))
    x = image_to_input(picture, gray_set)
    np.testing.assert_array_equal(input_to_image(x), np.round(x[0, 0].numpy() * 255).astype(np.uint8))
    assert input_to_image(x).shape == (28, 28)
    np.testing.assert_array_equal(input_to_image(gray_set.x[:1]), gray_set.images[0])


def test_pixel_statistics_are_each_inputs_mean_and_standard_deviation():
    x = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    assert PIXEL_STATISTICS == ("mean", "standard deviation")
    np.testing.assert_allclose(pixel_statistics(x), [[0.75, np.sqrt(0.75 * 0.25)], [0.5, 0.0]])


def test_a_noise_strip_and_a_white_picture_are_unlike_the_training_images_and_a_training_image_is_not(gray_set):
    typical = typical_pixel_range(gray_set, share=0.9)
    expected = np.quantile(pixel_statistics(gray_set.x), [0.05, 0.95], axis=0).T
    np.testing.assert_allclose(typical, expected)
    strip = image_to_input(Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 900, 3), dtype=np.uint8)), gray_set)
    mean, spread = pixel_statistics(strip)[0]
    assert unlike_training(strip, typical) == {"mean": (mean, *typical[0]), "standard deviation": (spread, *typical[1])}
    white = image_to_input(Image.new("L", (28, 28), 255), gray_set)
    assert set(unlike_training(white, typical)) == {"mean", "standard deviation"}
    assert unlike_training(gray_set.x[20:21], typical) == {}
