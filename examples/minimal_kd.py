"""Knowledge distillation in plain PyTorch with transfuse: no config file, no CLI.

    python examples/minimal_kd.py

Trains a teacher MLP on sklearn's digits, then a smaller student with KD through a
`Distiller` in an ordinary training loop, and prints both accuracies.
"""

import torch
from torch import nn

import transfuse
from transfuse.analysis import accuracy, predict
from transfuse.data import load_dataset
from transfuse.losses import LOSSES


def train(model_or_distiller: nn.Module, data, steps: int, lr: float = 3e-3) -> None:
    opt = torch.optim.Adam(model_or_distiller.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(len(data), (64,), generator=g).tolist()
        batch = data.__getitems__(idx)  # {"input": (64,1,8,8), "target": (64,), "index": (64,), "sample_id": (64,)}
        loss = model_or_distiller(batch, step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    torch.manual_seed(0)
    splits = load_dataset("digits")
    make = transfuse.models.build_model
    teacher = make("mlp", input_shape=splits.input_shape, num_classes=10, hidden=[256, 256])
    student = make("mlp", input_shape=splits.input_shape, num_classes=10, hidden=[32])

    ce, kd = LOSSES.get("ce"), LOSSES.get("kd")
    # The teacher learns from labels: it is the one trainable participant, with one CE term.
    pretrain = transfuse.Distiller([transfuse.Participant("teacher", teacher)],
                                   [transfuse.Term("ce", ce.build(), input="teacher.logits", target=None)])
    train(pretrain, splits.train, steps=1000)

    distiller = transfuse.Distiller(
        [transfuse.Participant("student", student),
         transfuse.Participant("teacher", teacher, trainable=False)],  # frozen, eval-locked, not in distiller.parameters()
        [transfuse.Term("ce", ce.build(), weight=0.1, input="student.logits", target=None),
         transfuse.Term("kd", kd.build(temperature=4.0), weight=0.9, input="student.logits", target="teacher.logits")],
    )
    train(distiller, splits.train, steps=800)

    for name, model in (("teacher", teacher), ("student", student)):
        logits, targets = predict(model, splits.test)
        print(f"{name}: {100 * accuracy(logits, targets):.1f} % test accuracy")


if __name__ == "__main__":
    main()
