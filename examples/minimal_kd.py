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
from transfuse.losses import CrossEntropy, KD


def train(model_or_distiller: nn.Module, data, steps: int, lr: float = 3e-3) -> None:
    opt = torch.optim.Adam(model_or_distiller.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(len(data), (64,), generator=g).tolist()
        batch = data.__getitems__(idx)  # {"input": (64,1,8,8), "target": (64,), "index": (64,)}
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

    # The teacher learns from labels: a Distiller with one CE term and no teacher.
    train(transfuse.Distiller(teacher, None, [transfuse.Term("ce", CrossEntropy())]), splits.train, steps=1000)

    distiller = transfuse.Distiller(
        student,
        transfuse.Teacher(teacher),  # frozen, eval-locked, not in distiller.parameters()
        [transfuse.Term("ce", CrossEntropy(), weight=0.1), transfuse.Term("kd", KD(temperature=4.0), weight=0.9)],
    )
    train(distiller, splits.train, steps=800)

    for name, model in (("teacher", teacher), ("student", student)):
        logits, targets = predict(model, splits.test)
        print(f"{name}: {100 * accuracy(logits, targets):.1f} % test accuracy")


if __name__ == "__main__":
    main()
