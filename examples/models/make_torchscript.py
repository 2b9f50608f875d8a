"""Writes examples/models/breast_cancer_mlp.pt: a TorchScript model a party
can bring as its own architecture (model.kind = "torchscript").

Contract: forward takes a float32 [batch, features] tensor (already
standardised by Confide) and returns [batch, classes] logits. Every
parameter is trained federatedly; names and shapes must agree across parties.

Regenerate with a full PyTorch install:  python3 examples/models/make_torchscript.py
"""
import pathlib

import torch


class BreastCancerMlp(torch.nn.Module):
    def __init__(self, features: int = 30, hidden: int = 16, classes: int = 2):
        super().__init__()
        self.hidden = torch.nn.Linear(features, hidden)
        self.out = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


if __name__ == "__main__":
    torch.manual_seed(0)
    out = pathlib.Path(__file__).with_name("breast_cancer_mlp.pt")
    torch.jit.script(BreastCancerMlp()).save(str(out))
    print(f"wrote {out}")
