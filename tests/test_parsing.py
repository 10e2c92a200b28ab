"""BiSeNet key layout, weight loading, and the raw/jaw/neck mask modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from musetalk_engine.errors import MissingWeightsError
from musetalk_engine.parsing import (
    LOWER_LIP, MOUTH, NECK, NOSE, SKIN, UPPER_LIP, BiSeNet, FaceParser, cheek_zone_mask, jaw_kernel,
    load_bisenet, mask_from_labels, write_tiny_bisenet,
)

# Tensors of the released face-parse-bisent/79999_iter.pth (zllrunning face-parsing.PyTorch).
RELEASE_SHAPES = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.bn1.running_var": (64,),
    "cp.resnet.layer1.0.conv1.weight": (64, 64, 3, 3),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer2.0.downsample.1.running_mean": (128,),
    "cp.resnet.layer4.1.conv2.weight": (512, 512, 3, 3),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
    "cp.arm32.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm32.bn_atten.weight": (128,),
    "cp.conv_head32.conv.weight": (128, 128, 3, 3),
    "cp.conv_head16.bn.bias": (128,),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    "conv_out16.conv_out.weight": (19, 64, 1, 1),
    "conv_out32.conv_out.weight": (19, 64, 1, 1),
}
RELEASE_TENSOR_COUNT = 191  # including the BatchNorm num_batches_tracked counters


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return write_tiny_bisenet(tmp_path_factory.mktemp("bisenet") / "79999_iter.pth", base=8, seed=0)


class FixedLabels(nn.Module):
    """Stand-in net: one-hot logits of a fixed 512×512 label map; records its last input."""

    def __init__(self, labels: np.ndarray):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 19).permute(2, 0, 1).float()
        self.last_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 512, 512)
        self.last_input = x
        return self.logits.expand(x.shape[0], -1, -1, -1)


# --------------------------------------------------------------------------- network / weights


def test_full_size_keys_and_shapes_match_release():
    sd = BiSeNet().state_dict()
    assert len(sd) == RELEASE_TENSOR_COUNT
    for key, shape in RELEASE_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert "conv_out.conv_out.bias" not in sd  # classifier convs have no bias in the release
    assert not any(k.startswith(("sp.", "cp.resnet.fc")) for k in sd)  # no spatial path, no fc


def test_tiny_write_load_roundtrip_is_strict_and_deterministic(tiny_path, tmp_path):
    net = load_bisenet(tiny_path)
    assert net.base == 8 and not net.training
    ref = BiSeNet(base=8).state_dict()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.items()}

    again = torch.load(write_tiny_bisenet(tmp_path / "again.pth", base=8, seed=0), weights_only=True)
    saved = torch.load(tiny_path, weights_only=True)
    assert all(torch.equal(saved[k], again[k]) for k in saved)

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (200 + 20 * i, 180, 3), dtype=np.uint8) for i in range(2)]
    parser = FaceParser(net)
    a, b = parser.labels(images), parser.labels(images)
    assert a.shape == (2, 512, 512) and a.dtype == np.uint8 and a.max() < 19
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[1], parser.labels(images[1:2])[0])  # eval BN: batch-independent


def test_release_without_bn_counters_still_loads(tiny_path, tmp_path):
    sd = torch.load(tiny_path, weights_only=True)
    stripped = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(stripped, tmp_path / "old.pth")
    assert load_bisenet(tmp_path / "old.pth").base == 8


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "face-parse-bisent" / "79999_iter.pth"
    with pytest.raises(MissingWeightsError) as err:
        load_bisenet(path)
    assert err.value.path == str(path)
    assert "79999_iter.pth" in str(err.value) and "musetalk-flow models download" in str(err.value)


@pytest.mark.parametrize("content", ["garbage", "truncated", "wrong_keys"])
def test_unreadable_checkpoint_is_missing_weights(tiny_path, tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "garbage":
        path.write_bytes(b"definitely not a torch checkpoint")
    elif content == "truncated":
        data = open(tiny_path, "rb").read()
        path.write_bytes(data[: len(data) // 2])
    else:
        sd = torch.load(tiny_path, weights_only=True)
        sd["extra.weight"] = torch.zeros(1)
        torch.save(sd, path)
    with pytest.raises(MissingWeightsError, match="bad.pth"):
        load_bisenet(path)


# --------------------------------------------------------------------------- masks


def _face_labels() -> np.ndarray:
    lab = np.zeros((512, 512), np.uint8)
    lab[200:400, 60:452] = SKIN
    lab[250:290, 236:276] = NOSE
    lab[330:350, 220:292] = UPPER_LIP
    lab[350:360, 220:292] = LOWER_LIP
    lab[450:460, 250:262] = MOUTH  # far from the skin: only the lips/mouth rule can add it
    lab[470:500, 200:312] = NECK
    return lab


def test_jaw_kernel_is_cone_and_tail():
    k = jaw_kernel()
    assert k.shape == (33, 33) and k.dtype == np.uint8
    assert not k[:10].any()
    assert np.nonzero(k[10])[0].tolist() == [16]  # cone apex
    assert [int(r.sum()) for r in k[10:21]] == list(range(1, 22, 2))
    assert all(np.nonzero(r)[0].tolist() == list(range(6, 27)) for r in k[20:])  # 21-wide tail
    assert int(k.sum()) == 121 + 12 * 21


def test_cheek_zones_follow_widths():
    m = cheek_zone_mask(90, 70)
    assert m[:, :167].min() == 255 and m[:, 167:326].max() == 0 and m[:, 326:].min() == 255


def test_raw_and_neck_modes():
    lab = _face_labels()
    raw = mask_from_labels(lab, "raw")
    assert set(np.unique(raw)) == {0, 255}
    assert raw[300, 100] == 255 and raw[340, 256] == 255 and raw[455, 255] == 255
    assert raw[270, 256] == 0 and raw[100, 256] == 0 and raw[480, 256] == 0  # nose, background, neck
    assert mask_from_labels(lab, "neck")[480, 256] == 255


def test_jaw_mode_dilates_erodes_cheeks_and_drops_nose():
    lab = _face_labels()
    jaw = mask_from_labels(lab, "jaw")  # cheek zones x <= 166 and x >= 346
    assert jaw[270, 256] == 0  # nose removed although surrounded by (dilated) skin
    assert jaw[340, 256] == 255 and jaw[455, 255] == 255  # lips and mouth added
    assert jaw[480, 256] == 0  # neck not part of jaw mode
    # Centre zone: dilated skin kept (skin ends at row 399; the cone reaches 6 rows below it).
    assert jaw[404, 256 - 40] == 255 and jaw[410, 256 - 40] == 0
    # Cheek zones: the sides are eroded (skin starts at x=60 but the mask only at x=84).
    row = np.nonzero(jaw[300])[0]
    assert (row[0], row[-1]) == (84, 427)
    # Narrow skin inside the centre zone: horizontal extent only grows (no erosion there).
    lab2 = np.zeros((512, 512), np.uint8)
    lab2[200:400, 200:312] = SKIN
    row2 = np.nonzero(mask_from_labels(lab2, "jaw")[300])[0]
    assert (row2[0], row2[-1]) == (190, 321)
    # Wider cheek widths move the edge into the protected zone: no erosion at x=60 any more.
    wide = mask_from_labels(lab, "jaw", left_cheek_width=256, right_cheek_width=256)
    assert np.nonzero(wide[300])[0][0] == 50


@pytest.mark.parametrize("kwargs, word", [({"mode": "lips"}, "raw, jaw, neck"),
                                          ({"left_cheek_width": -1}, "left_cheek_width"),
                                          ({"right_cheek_width": 300}, "right_cheek_width")])
def test_invalid_parameters_are_rejected(kwargs, word):
    with pytest.raises(ValueError, match=word):
        FaceParser(FixedLabels(np.zeros((512, 512), np.uint8)), **kwargs)


def test_parser_normalises_input_and_returns_masks_at_image_size():
    lab = np.zeros((512, 512), np.uint8)
    lab[:, :256] = SKIN
    net = FixedLabels(lab)
    parser = FaceParser(net, mode="raw")
    images = [np.full((100, 60, 3), 128, np.uint8), np.full((512, 512, 3), 128, np.uint8)]
    masks = parser.masks(images)
    assert [m.shape for m in masks] == [(100, 60), (512, 512)]
    assert masks[0].dtype == np.uint8
    assert masks[0][:, :28].min() == 255 and masks[0][:, 32:].max() == 0  # a soft (bicubic) edge between
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(net.last_input[0, :, 10, 10], expected)
    with pytest.raises(ValueError, match="RGB uint8"):
        parser.labels([np.zeros((10, 10), np.uint8)])


@pytest.mark.parametrize("mode", ["jaw", "raw"])
@pytest.mark.parametrize("size", [(100, 60), (333, 333), (700, 700)])
def test_crop_size_mask_is_pils_bicubic_resize_of_the_512_mask(mode, size):
    """MuseTalk's ``face_seg`` resizes the 512² 'L' mask to the crop with PIL's default filter (bicubic)."""
    rng = np.random.default_rng(3)
    lab = np.zeros((512, 512), np.uint8)
    lab[180:470, 90:420] = SKIN
    lab[330:400, 200:310] = UPPER_LIP
    lab[rng.integers(0, 512, 400), rng.integers(0, 512, 400)] = NOSE  # speckle: many edges to resample
    parser = FaceParser(FixedLabels(lab), mode=mode)
    (mask,) = parser.masks([np.zeros((*size, 3), np.uint8)])
    full = mask_from_labels(lab, mode)
    expected = np.asarray(Image.fromarray(full, "L").resize((size[1], size[0]), Image.BICUBIC))
    np.testing.assert_array_equal(mask, expected)
    assert 0 < np.count_nonzero((mask > 0) & (mask < 255))  # edges are soft, as MuseTalk's are
