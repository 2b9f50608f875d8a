"""Writes party/tests/fixtures/batch_mean_mlp.pt: examples/models/breast_cancer_mlp.pt
whose forward first subtracts the batch's mean row (x - x.mean(0)), so that
a row's logits depend on the other rows of its batch. The party's tests use
it to check that a DP evaluation scores a TorchScript module one row a call
(a row's prediction must not depend on the other rows).

TorchScript archives are zip files whose code is recompiled from source on
load, so this edits the source with the standard library alone (no PyTorch):
    python3 scripts/make_batch_dependent_module.py
"""
import pathlib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples/models/breast_cancer_mlp.pt"
OUT = ROOT / "party/tests/fixtures/batch_mean_mlp.pt"

OLD = "_0 = (out).forward(torch.tanh((hidden).forward(x, )), )"
NEW = "_0 = (out).forward(torch.tanh((hidden).forward(torch.sub(x, torch.mean(x, [0], True)), )), )"

OUT.parent.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(SOURCE) as src, zipfile.ZipFile(OUT, "w") as out:
    for info in src.infolist():
        data = src.read(info.filename)
        if info.filename.endswith("code/__torch__.py.debug_pkl"):
            continue  # source ranges of the old code
        if info.filename.endswith("code/__torch__.py"):
            text = data.decode()
            assert OLD in text, text
            data = text.replace(OLD, NEW).encode()
        # Stored (not deflated) members stay aligned as libtorch expects.
        out.writestr(info, data, compress_type=info.compress_type)
print(f"wrote {OUT}")
