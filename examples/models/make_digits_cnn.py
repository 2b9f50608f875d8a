"""Writes examples/models/digits_cnn.pt: a TorchScript CNN for the UCI digits
(8x8 images) that a party can bring as its own architecture
(model.kind = "torchscript"), shaped like Confide's built-in CNN, so that
DP-SGD can derive its per-example gradients: two blocks of a 3x3
convolution (padding 1), ReLU and 2x2 max-pooling (16, then 32 channels),
then a linear layer to the 10 classes.

Contract: forward takes a float32 [batch, 64] tensor (already standardised
by Confide) and returns [batch, 10] logits.

This script needs no PyTorch: it writes the TorchScript archive itself (the
module's TorchScript source, its parameters pickled as `torch.save` does,
zipped), because the PyTorch wheel here cannot import without CUDA
libraries. With a full PyTorch install, `torch.jit.script` of this module
writes the same parameters under the same names (the names are what the
parties' models are matched by):

    class DigitsCnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            P = torch.nn.Parameter
            self.conv0_weight, self.conv0_bias = P(torch.empty(16, 1, 3, 3)), P(torch.empty(16))
            self.conv1_weight, self.conv1_bias = P(torch.empty(32, 16, 3, 3)), P(torch.empty(32))
            self.out_weight, self.out_bias = P(torch.empty(10, 128)), P(torch.empty(10))
        def forward(self, x):
            x = x.reshape(-1, 1, 8, 8)
            x = F.max_pool2d(F.relu(F.conv2d(x, self.conv0_weight, self.conv0_bias, padding=1)), 2)
            x = F.max_pool2d(F.relu(F.conv2d(x, self.conv1_weight, self.conv1_bias, padding=1)), 2)
            return F.linear(x.flatten(1), self.out_weight, self.out_bias)

Regenerate with:  python3 examples/models/make_digits_cnn.py
"""
import math
import pathlib
import random
import struct
import zipfile

NAME = "digits_cnn"

# (name, shape, fan-in): PyTorch's default initialisation bound 1/sqrt(fan-in).
PARAMETERS = [
    ("conv0_weight", (16, 1, 3, 3), 9),
    ("conv0_bias", (16,), 9),
    ("conv1_weight", (32, 16, 3, 3), 144),
    ("conv1_bias", (32,), 144),
    ("out_weight", (10, 128), 128),
    ("out_bias", (10,), 128),
]

CODE = '''class DigitsCnn(Module):
  __parameters__ = ["conv0_weight", "conv0_bias", "conv1_weight", "conv1_bias", "out_weight", "out_bias", ]
  __buffers__ = []
  conv0_weight : Tensor
  conv0_bias : Tensor
  conv1_weight : Tensor
  conv1_bias : Tensor
  out_weight : Tensor
  out_bias : Tensor
  training : bool
  def forward(self: __torch__.DigitsCnn,
    x: Tensor) -> Tensor:
    image = torch.reshape(x, [-1, 1, 8, 8])
    z0 = torch.conv2d(image, self.conv0_weight, self.conv0_bias, [1, 1], [1, 1], [1, 1], 1)
    a0 = torch.max_pool2d(torch.relu(z0), [2, 2], [2, 2], [0, 0], [1, 1], False)
    z1 = torch.conv2d(a0, self.conv1_weight, self.conv1_bias, [1, 1], [1, 1], [1, 1], 1)
    a1 = torch.max_pool2d(torch.relu(z1), [2, 2], [2, 2], [0, 0], [1, 1], False)
    return torch.linear(torch.flatten(a1, 1, -1), self.out_weight, self.out_bias)
'''


def text(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def integer(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def tup(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


def tensor(key: str, shape) -> bytes:
    """torch._utils._rebuild_tensor_v2 of a contiguous float32 storage `key`."""
    numel = math.prod(shape)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    storage = b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text(key) + text("cpu") + integer(numel) + b"tQ"
    hooks = b"ccollections\nOrderedDict\n)R"
    args = storage + integer(0) + tup(integer(d) for d in shape) + tup(integer(s) for s in strides) + b"\x88" + hooks
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"


def data_pkl() -> bytes:
    items = text("training") + b"\x88"
    for key, (name, shape, _) in enumerate(PARAMETERS):
        items += text(name) + tensor(str(key), shape)
    return b"\x80\x02c__torch__\nDigitsCnn\n)\x81}(" + items + b"ub."


def main():
    rng = random.Random(0)
    out = pathlib.Path(__file__).with_name(f"{NAME}.pt")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        def add(path: str, payload: bytes):
            # Fixed dates: the same bytes on every run.
            info = zipfile.ZipInfo(f"{NAME}/{path}", date_time=(1980, 1, 1, 0, 0, 0))
            z.writestr(info, payload)

        add("data.pkl", data_pkl())
        add("code/__torch__.py", CODE.encode())
        add("constants.pkl", b"\x80\x02).")
        add("version", b"3\n")
        add("byteorder", b"little")
        for key, (_, shape, fan_in) in enumerate(PARAMETERS):
            bound = 1 / math.sqrt(fan_in)
            values = [rng.uniform(-bound, bound) for _ in range(math.prod(shape))]
            add(f"data/{key}", struct.pack(f"<{len(values)}f", *values))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
