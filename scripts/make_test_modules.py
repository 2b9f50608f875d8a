"""Writes two edits of examples/models/breast_cancer_mlp.pt to party/tests/fixtures/:
- batch_mean_mlp.pt, whose forward first subtracts the batch's mean row
  (x - x.mean(0)), so that a row's logits depend on the other rows of its
  batch: the party's tests check that a TorchScript module is scored one
  row a call (a row's prediction must not depend on the other rows);
- dropout_mlp.pt, with dropout (p = 0.5) after the hidden layer, saved in
  training mode: the tests check that the party loads modules in eval mode
  (else each row's prediction would be random).

TorchScript archives are zip files whose code is recompiled from source on
load, so this edits the source with the standard library alone (no PyTorch):
    python3 scripts/make_test_modules.py
"""
import pathlib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples/models/breast_cancer_mlp.pt"
FIXTURES = ROOT / "party/tests/fixtures"

OLD = "_0 = (out).forward(torch.tanh((hidden).forward(x, )), )"
EDITS = {
    "batch_mean_mlp.pt": "_0 = (out).forward(torch.tanh((hidden).forward(torch.sub(x, torch.mean(x, [0], True)), )), )",
    "dropout_mlp.pt": "_0 = (out).forward(torch.dropout(torch.tanh((hidden).forward(x, )), 0.5, self.training), )",
}

FIXTURES.mkdir(parents=True, exist_ok=True)
for name, new in EDITS.items():
    out_path = FIXTURES / name
    with zipfile.ZipFile(SOURCE) as src, zipfile.ZipFile(out_path, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("code/__torch__.py.debug_pkl"):
                continue  # source ranges of the old code
            if info.filename.endswith("code/__torch__.py"):
                text = data.decode()
                assert OLD in text, text
                data = text.replace(OLD, new).encode()
            # Stored (not deflated) members stay aligned as libtorch expects.
            out.writestr(info, data, compress_type=info.compress_type)
    print(f"wrote {out_path}")
