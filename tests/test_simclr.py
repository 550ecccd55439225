"""SimCLRv2 encoders (the paper's E-hat and distillation student) and the real-data
protocol details: converter-layout files (made here, tests/simclr_layout.py), strict
loading, the exact mapping onto the DeepLabV3+ backbone, E-hat's input preparation, and
SYNTHIA's base resize and id map on files in the real formats."""
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import load_stage
from simclr_layout import converter_checkpoint, converter_shapes

stm = load_stage("04_stm")

# Published sizes (millions of parameters, google-research/simclr README "Pre-trained
# models for SimCLRv2", Table 1 of the SimCLRv2 paper): the backbone without the supervised
# fc head and without the projection head.
PUBLISHED_M = {(101, 1, False): 43, (152, 1, True): 89, (50, 1, False): 24, (50, 1, True): 35}


def n_params(net):
    return sum(p.numel() for k, p in net.named_parameters() if not k.startswith("fc."))


@pytest.mark.parametrize("depth,width,sk", [(50, 1, False), (50, 1, True), (101, 1, False),
                                            (152, 1, True)])
def test_keys_and_shapes_are_the_converters(depth, width, sk):
    net = common.SimCLRResNet(depth, width, sk)
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert own == converter_shapes(depth, width, sk)
    assert round(n_params(net) / 1e6) == PUBLISHED_M[(depth, width, sk)]


def test_strict_load_converter_files_sk0_and_sk1(tmp_path):
    # r101_1x_sk0 through a file written as the converter writes it
    ck = converter_checkpoint(101, 1, False, seed=1)
    torch.save(ck, tmp_path / "r101_1x_sk0.pth")
    net = common.build_simclr("simclr-r101-1x-sk0", tmp_path / "r101_1x_sk0.pth")
    for k in ("net.0.0.weight", "net.3.blocks.22.net.4.weight", "net.4.blocks.0.projection.bn.0.running_var"):
        assert torch.equal(net.state_dict()[k], ck["resnet"][k])
    # r152_1x_sk1 (the official E-hat) from the dict itself
    ck = converter_checkpoint(152, 1, True, seed=2)
    net = common.load_simclr(common.SimCLRResNet(152, 1, True), ck)
    for k in ("net.0.4.weight", "net.2.blocks.0.projection.shortcut.2.weight",
              "net.3.blocks.35.net.2.mixing_conv.2.weight"):
        assert torch.equal(net.state_dict()[k], ck["resnet"][k])


def test_wrong_file_names_the_keys(tmp_path):
    ck = converter_checkpoint(50, 1, False, random=False)
    # the wrong network: an r50 sk0 file for the r50 sk1 encoder
    with pytest.raises(KeyError) as e:
        common.load_simclr(common.SimCLRResNet(50, 1, True), ck, what="--encoder-weights x.pth")
    msg = e.value.args[0]
    assert "--encoder-weights x.pth" in msg and "the file holds r50_1x_sk0, not r50_1x_sk1" in msg
    assert "missing keys" in msg and "net.0.2.weight" in msg                  # sk1 stem conv
    assert "unexpected keys" in msg and "net.1.blocks.0.net.5.0.weight" in msg
    assert "shape mismatches" in msg and "net.0.0.weight: expected (32, 3, 3, 3), found (64, 3, 7, 7)" in msg
    # one tensor gone, one reshaped: exactly those are named
    bad = {k: v for k, v in ck["resnet"].items() if k != "net.2.blocks.1.net.3.0.bias"}
    bad["net.4.blocks.2.net.4.weight"] = torch.zeros(2048, 512, 3, 3)
    with pytest.raises(KeyError) as e:
        common.load_simclr(common.SimCLRResNet(50, 1, False), {"resnet": bad})
    msg = e.value.args[0]
    assert "missing keys (1): net.2.blocks.1.net.3.0.bias" in msg
    assert "shape mismatches (1): net.4.blocks.2.net.4.weight: expected (2048, 512, 1, 1), found (2048, 512, 3, 3)" in msg
    assert "unexpected" not in msg
    # a torchvision-layout file is not a converter file
    tv = common.build_resnet("resnet50").state_dict()
    torch.save(tv, tmp_path / "tv.pth")
    with pytest.raises(KeyError, match="not in the SimCLRv2 converter layout"):
        common.build_simclr("simclr-r50-1x-sk0", tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="no SimCLRv2 weights"):
        common.build_simclr("simclr-r152-1x-sk1", "imagenet")
    with pytest.raises(FileNotFoundError, match="nope.pth not found"):
        common.build_simclr("simclr-r50-1x-sk0", tmp_path / "nope.pth")


def test_converter_r101_sk0_maps_exactly_onto_the_deeplab_backbone(tmp_path, capsys):
    """The paper's student: a random r101_1x_sk0 in the converter's layout, mapped into our
    DeepLabV3+ backbone (output stride 16), gives the SimCLRv2 network's own features."""
    torch.manual_seed(0)
    ck = converter_checkpoint(101, 1, False, seed=3)
    torch.save(ck, tmp_path / "r101_1x_sk0.pth")
    model = common.build_model("resnet101", "none").eval()
    info = common.load_backbone_init(model.backbone, "resnet101", tmp_path / "r101_1x_sk0.pth")
    assert info["layout"] == "SimCLRv2 converter (r101_1x_sk0)"
    assert info["tensors_loaded"] == info["tensors_in_backbone"] == len(model.backbone.state_dict())
    assert set(info["unused_keys"]) == {"fc.weight", "fc.bias"} | {f"head.{k}" for k in ck["head"]}
    out = capsys.readouterr().out
    assert out.count("keys not used by the resnet101 backbone") == 1 and "fc.*" in out
    ref = common.load_simclr(common.SimCLRResNet(101, 1, False, output_stride=16), ck).eval()
    b = model.backbone
    x = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        ours = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
        theirs = ref(x)
    assert ours.shape == theirs.shape == (2, 2048, 4, 5)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def test_torchvision_and_proda_layouts(tmp_path, capsys):
    src = common.build_resnet("resnet50")
    state = {k: v.clone() for k, v in src.state_dict().items()}
    # ProDA / the official code: {'state_dict': ...} with torchvision names (+ fc)
    torch.save({"state_dict": state}, tmp_path / "proda.pth")
    model = common.build_model("resnet50", "none")
    info = common.load_backbone_init(model.backbone, "resnet50", tmp_path / "proda.pth")
    assert info["layout"] == "torchvision names" and info["unused_keys"] == ["fc.weight", "fc.bias"]
    assert torch.equal(model.backbone.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])
    assert capsys.readouterr().out.count("fc.*") == 1
    # a missing and a mis-shaped backbone tensor are errors that name them
    bad = dict(state)
    del bad["layer2.1.bn2.running_mean"]
    bad["layer4.0.downsample.0.weight"] = torch.zeros(2048, 1024, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(KeyError) as e:
        common.load_backbone_init(model.backbone, "resnet50", tmp_path / "bad.pth")
    assert "missing keys (1): layer2.1.bn2.running_mean" in e.value.args[0]
    assert "layer4.0.downsample.0.weight: expected (2048, 1024, 1, 1)" in e.value.args[0]
    # a SimCLRv2 file of the wrong kind for the student
    with pytest.raises(KeyError, match="holds r50_1x_sk1, not r50_1x_sk0"):
        common.load_backbone_init(model.backbone, "resnet50",
                                  _saved(tmp_path, converter_checkpoint(50, 1, True, random=False)))
    assert common.load_backbone_init(model.backbone, "resnet50", "none")["layout"] == "random init"


def _saved(tmp_path, obj):
    torch.save(obj, tmp_path / "x.pth")
    return tmp_path / "x.pth"


def test_ehat_input_follows_the_official_extractor(tmp_path):
    torch.save(converter_checkpoint(50, 1, True, seed=4), tmp_path / "r50_1x_sk1.pth")
    enc = stm.build_encoder("simclr-r50-1x-sk1", tmp_path / "r50_1x_sk1.pth")
    assert enc.input_spec == {"pixels": "unit", "size": (256, 128), "pool": (1, 2)}
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1052, 1914, 3), dtype=np.uint8)   # a GTA5-sized image
    x = stm.encoder_input(enc, torch.from_numpy(img).permute(2, 0, 1))
    # [0, 1] pixels, no mean/std, 256x128 as PIL's bilinear resize (within one grey level)
    ref = np.asarray(Image.fromarray(img).resize((256, 128), Image.BILINEAR), np.float32) / 255
    assert x.shape == (1, 3, 128, 256)
    assert np.abs(x[0].permute(1, 2, 0).numpy() - ref).max() <= 1.0 / 255 + 1e-6
    # layer4 at stride 32 is 4x8; the (1, 2) average pool makes it 4x4 = 16 positions
    f, hw = stm.encode(enc, torch.from_numpy(img).permute(2, 0, 1), amp=False)
    with torch.no_grad():
        raw = enc(x)                                                    # (1, 2048, 4, 8)
    assert raw.shape == (1, 2048, 4, 8) and hw == (4, 4) and f.shape == (16, 2048)
    want = (raw[..., 0::2] + raw[..., 1::2]) / 2                        # mean of horizontal pairs
    assert torch.allclose(f, want[0].flatten(1).T, rtol=1e-5, atol=1e-6)
    assert stm.feature_positions((1914, 1052), 1.0, 32, (256, 128), (1, 2)) == 16
    # --encoder-size overrides the size; torchvision encoders keep ImageNet normalisation
    assert stm.build_encoder("simclr-r50-1x-sk0", "none", size=(512, 256)).input_spec["size"] == (512, 256)
    tv = stm.build_encoder("resnet18", "none")
    small = torch.from_numpy(img[:64, :96].copy()).permute(2, 0, 1)
    assert torch.equal(stm.encoder_input(tv, small), common.normalize(small[None]))


def _synthia_pair(root, ids, size=(1280, 760)):
    """A SYNTHIA-RAND-CITYSCAPES pair in the real formats: RGB PNG and a 16-bit 3-channel
    GT/LABELS PNG (class id in R, instance id in G) written with OpenCV (BGR order)."""
    w, h = size
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "RGB" / "0000001.png")
    cls = np.zeros((h, w), np.uint16)
    bands = np.array_split(np.arange(w), len(ids))
    for i, cols in zip(ids, bands):
        cls[:, cols] = i
    inst = rng.integers(0, 3000, (h, w)).astype(np.uint16)
    bgr = np.stack([np.zeros_like(cls), inst, cls], -1)          # OpenCV writes B, G, R
    assert cv2.imwrite(str(root / "GT" / "LABELS" / "0000001.png"), bgr)
    return cls


def test_synthia_base_resize_and_official_id_map(tmp_path):
    root = tmp_path / "SYNTHIA" / "RAND_CITYSCAPES"
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
    cls = _synthia_pair(root, ids)
    lab = common.decode_label(root / "GT" / "LABELS" / "0000001.png", "synthia")
    assert lab.shape == (760, 1280) and lab.dtype == np.uint8
    official = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
                17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
    for i in ids:
        got = np.unique(lab[cls == i])
        assert got.tolist() == [official.get(i, 255)], (i, got)
    assert lab[cls == 16].min() == 9 and lab[cls == 18].min() == 14 and lab[cls == 20].min() == 16
    # the real file goes through the reader and the dataset: 1280x760 -> 2048x1024 before the scale
    items = common.synthia_items(tmp_path)
    ds = common.SegDataset(items, "synthia", crop=None, scale=(1.0, 1.0), flip=False,
                           base=common.BASE_RESIZE["synthia"])
    b = ds[0]
    assert b["image"].shape == (3, 1024, 2048) and b["label"].shape == (1024, 2048)
    # nearest-neighbour: the resized label holds the same classes, band by band
    assert set(np.unique(b["label"].numpy())) == set(np.unique(lab))
    col = b["label"][:, 1024].unique().tolist()   # x = 1024 of 2048 comes from x = 640 of 1280
    assert col == [lab[0, 640]]
    # with a random scale s the size is 2048 s x 1024 s (here s in [0.5, 0.5])
    ds = common.SegDataset(items, "synthia", crop=None, scale=(0.5, 0.5), flip=False,
                           base=common.BASE_RESIZE["synthia"])
    assert ds[0]["label"].shape == (512, 1024)


def test_gta5_and_cityscapes_base_sizes():
    img = torch.zeros(3, 1052, 1914, dtype=torch.uint8)
    lab = torch.zeros(1052, 1914, dtype=torch.uint8)
    out, (l2,) = common.joint_transform(img, [lab], scale=(1.0, 1.0), flip=False,
                                        base=common.BASE_RESIZE["gta5"])
    assert out.shape == (3, 1209, 2200) and l2.shape == (1209, 2200)   # official: 2200 px wide
    img = torch.zeros(3, 1024, 2048, dtype=torch.uint8)
    out, _ = common.joint_transform(img, [], scale=(1.0, 1.0), flip=False,
                                    base=common.BASE_RESIZE["cityscapes"])
    assert out.shape == (3, 1024, 2048)
    p = common.base_parser("x", training=True)
    assert p.parse_args([]).base_resize == "official"
    assert common.base_resize(p.parse_args(["--base-resize", "native"]), "synthia") == (1.0, 1.0)
