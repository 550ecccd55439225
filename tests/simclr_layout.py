"""The SimCLRv2 converter's checkpoint layout, written out independently of common.py.

github.com/Separius/SimCLRv2-Pytorch convert.py saves {'resnet': model.state_dict(),
'head': head.state_dict()}; the module tree behind those keys is the one the official
BiSMAP code copies in models/backbone/resnet_simclr.py. These rules generate the expected
keys and shapes from that description with plain loops, so the tests check common.py's
SimCLRResNet against the layout rather than against itself."""
import torch

LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _bn(out, prefix, c, dim=1):
    out[prefix + "weight"] = (c,)
    out[prefix + "bias"] = (c,)
    out[prefix + "running_mean"] = (c,)
    out[prefix + "running_var"] = (c,)
    out[prefix + "num_batches_tracked"] = ()


def converter_shapes(depth, width, sk):
    """{key: shape} of the converter's 'resnet' state dict."""
    s = {}
    c = 64 * width
    if sk:
        s["net.0.0.weight"] = (c // 2, 3, 3, 3)
        _bn(s, "net.0.1.0.", c // 2)
        s["net.0.2.weight"] = (c // 2, c // 2, 3, 3)
        _bn(s, "net.0.3.0.", c // 2)
        s["net.0.4.weight"] = (c, c // 2, 3, 3)
        _bn(s, "net.0.5.0.", c)
    else:
        s["net.0.0.weight"] = (c, 3, 7, 7)
        _bn(s, "net.0.1.0.", c)
    cin = c
    for i, n in enumerate(LAYERS[depth], start=1):
        o = 64 * width * 2 ** (i - 1)
        for j in range(n):
            p = f"net.{i}.blocks.{j}."
            if j == 0:
                s[p + ("projection.shortcut.2.weight" if sk else "projection.shortcut.weight")] = (4 * o, cin, 1, 1)
                _bn(s, p + "projection.bn.0.", 4 * o)
            s[p + "net.0.weight"] = (o, cin, 1, 1)
            _bn(s, p + "net.1.0.", o)
            if sk:
                mid = max(int(o * 0.0625), 32)
                s[p + "net.2.main_conv.0.weight"] = (2 * o, o, 3, 3)
                _bn(s, p + "net.2.main_conv.1.0.", 2 * o)
                s[p + "net.2.mixing_conv.0.weight"] = (mid, o, 1, 1)
                _bn(s, p + "net.2.mixing_conv.1.0.", mid)
                s[p + "net.2.mixing_conv.2.weight"] = (2 * o, mid, 1, 1)
                s[p + "net.3.weight"] = (4 * o, o, 1, 1)
                _bn(s, p + "net.4.0.", 4 * o)
            else:
                s[p + "net.2.weight"] = (o, o, 3, 3)
                _bn(s, p + "net.3.0.", o)
                s[p + "net.4.weight"] = (4 * o, o, 1, 1)
                _bn(s, p + "net.5.0.", 4 * o)
            cin = 4 * o
    s["fc.weight"] = (1000, cin)
    s["fc.bias"] = (1000,)
    return s


def head_shapes(width):
    """The contrastive projection head: 3 x (Linear without bias + BatchNorm1d)."""
    c = 2048 * width
    s = {}
    for i, (k, dim) in enumerate(((0, c), (3, c), (6, 128))):
        s[f"layers.{k}.weight"] = (dim, c)
        _bn(s, f"layers.{k + 1}.", dim)
    return s


def converter_checkpoint(depth, width, sk, seed=0, random=True):
    """A converter-layout file's content with random (or zero) tensors; BN variances > 0."""
    g = torch.Generator().manual_seed(seed)

    def t(k, shape):
        if k.endswith("num_batches_tracked"):
            return torch.tensor(0)
        if not random:
            return torch.zeros(shape)
        if k.endswith("running_var"):
            return torch.rand(shape, generator=g) + 0.5
        if k.endswith("weight") and len(shape) == 4:   # conv: fan-in scaled, stable activations
            fan = shape[1] * shape[2] * shape[3]
            return torch.randn(shape, generator=g) * (2.0 / fan) ** 0.5
        return torch.randn(shape, generator=g) * 0.1 + (1.0 if k.endswith("weight") else 0.0)
    return {"resnet": {k: t(k, s) for k, s in converter_shapes(depth, width, sk).items()},
            "head": {k: t(k, s) for k, s in head_shapes(width).items()}}
