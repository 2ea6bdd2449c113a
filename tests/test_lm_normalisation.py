"""How a language-model distillation step is normalised, pinned against hand computations.

The loss of a step is the mean over the positions that are actually predicted: a T-token
row predicts T - 1 next tokens, prompt tokens and padding predict nothing, and in an
on-policy step the generated tokens are what carry loss. That mean is the same with and
without gradient accumulation, under DDP, and for any amount of padding. A divergence's
``temperature`` is applied to both distributions inside the loss. Each test also computes
what a wrong normalisation would give (divide by every position, by the pre-generation
count, a mean of row or micro-batch or process means, a temperature that is never
applied) and checks that it differs, so that the test can fail.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

pytest.importorskip("transformers")

from transfuse.data import TokenRows  # noqa: E402
from transfuse.distiller import Distiller, Term  # noqa: E402
from transfuse.engine import FitSettings, StepBatchSampler, fit  # noqa: E402
from transfuse.losses import LOSSES  # noqa: E402
from transfuse.models import build_model  # noqa: E402
from transfuse.on_policy import OnPolicy  # noqa: E402
from transfuse.participants import Participant  # noqa: E402

VOCAB = 32


# ------------------------------------------------------------------------------------ helpers


def _models(context: int, seed: int = 0):
    """A tiny student and a (random, frozen) teacher, the same for the same seed."""
    torch.manual_seed(seed)
    student = build_model("causal_lm", input_shape=(context,), num_classes=VOCAB, layers=1, width=16, heads=2)
    teacher = build_model("causal_lm", input_shape=(context,), num_classes=VOCAB, layers=1, width=24, heads=2)
    return student, teacher


def _distiller(student, teacher, loss: str = "fkl", **options) -> Distiller:
    term = Term(name=loss, loss=LOSSES.get(loss).build(**options), input="student.logits", target="teacher.logits")
    return Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)], [term])


def _fkl_by_hand(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) per position ``(...)``, p = softmax(t / T), q = softmax(s / T), from the formula."""
    log_p = torch.log_softmax(t.double() / temperature, -1)
    log_q = torch.log_softmax(s.double() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _keep_by_hand(lengths, prompts, T: int) -> torch.Tensor:
    """Position t of a row of ``length`` real tokens with a ``prompt`` predicts token t + 1,
    which carries loss when it is real and not a prompt token: prompt - 1 <= t < length - 1."""
    t = torch.arange(T)[None, :]
    lengths, prompts = torch.as_tensor(lengths)[:, None], torch.as_tensor(prompts)[:, None]
    return (t + 1 < lengths) & (t + 1 >= prompts)


def _rows(lengths, prompts, T: int, seed: int = 3) -> TokenRows:
    """Right-padded rows of ``lengths`` real tokens, the first ``prompts`` of them a prompt."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    ids = torch.randint(VOCAB, (n, T), generator=g)
    t = torch.arange(T)[None, :]
    real = t < torch.as_tensor(lengths)[:, None]
    labels = torch.where(real & (t >= torch.as_tensor(prompts)[:, None]), ids, torch.full((), -100))
    return TokenRows(ids * real, real.long(), labels)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _max_gap(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _fit_one_step(student, teacher, rows, tmp_path, *, batch_size: int, accumulate: int = 1, lr: float = 1.0,
                  transforms=(), name: str = "run", seed: int = 1, loss: str = "fkl", **options):
    from lightning_fabric import Fabric

    distiller = _distiller(student, teacher, loss, **options)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=lr)
    settings = FitSettings(steps=1, batch_size=batch_size, accumulate=accumulate, seed=seed, log_every=1,
                           checkpoint_every=1, progress=False)
    fit(Fabric(accelerator="cpu", devices=1), distiller, optimizer, rows, settings, run_dir=tmp_path / name,
        transforms=transforms)
    return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])


# -------------------------------------------------------------- (a) 16 x 128: 2,032, not 2,048


def test_a_16_by_128_batch_of_full_rows_is_divided_by_its_2032_predicted_positions(tmp_path):
    student, teacher = _models(128)
    rows = TokenRows(torch.randint(VOCAB, (16, 128), generator=torch.Generator().manual_seed(0)))
    batch = rows.__getitems__(list(range(16)))
    with torch.no_grad():
        s, t = student(batch), teacher(batch)  # (16, 128, V)
        per_position = _fkl_by_hand(s, t)  # (16, 128)
        right = per_position[:, :-1].sum() / 2032  # the last position of a row predicts nothing
        wrong = per_position.sum() / 2048
        out = _distiller(student, teacher).eval()(batch, 0)
    assert int(batch["predicted"].sum()) == 2032
    torch.testing.assert_close(out["parts"]["fkl"].double(), right, rtol=1e-5, atol=0)
    # Dividing by all 2,048 positions is 0.8 % off when the sum is over the predicted ones, and
    # ~7e-4 off (70x the tolerance) when the last positions' values are summed too.
    assert abs(float(out["parts"]["fkl"]) - float(per_position[:, :-1].sum() / 2048)) > 5e-3 * float(right)
    assert abs(float(out["parts"]["fkl"]) - float(wrong)) > 2e-4 * float(right)
    # The engine's step reports that same value: one step of fit logs the loss before its update.
    logged = _fit_one_step(student, teacher, rows, tmp_path, batch_size=16, lr=0.0)["loss"]
    assert logged == pytest.approx(float(right), rel=1e-5)
    assert logged != pytest.approx(float(wrong), rel=2e-4)


# ------------------------------------------------- (b) prompts and padding: one mean over positions


def test_prompts_and_padding_are_excluded_and_the_gradient_is_that_of_the_mean_over_predicted_positions():
    T = 16
    lengths, prompts = [16, 16, 5, 3, 12, 16], [0, 4, 0, 1, 6, 0]  # heavy padding in rows 2 and 3
    batch = _rows(lengths, prompts, T).__getitems__(list(range(6)))
    keep = _keep_by_hand(lengths, prompts, T)  # (6, T)
    assert torch.equal(batch["predicted"], keep)
    assert keep.sum(1).tolist() == [15, 12, 4, 2, 6, 15]

    student, teacher = _models(T + 8)  # a context with room for the padded rows below
    distiller = _distiller(student, teacher)
    out = distiller(batch, 0)
    out["loss"].backward()
    step_grads = _grads(student)

    def grads_of(reduce) -> list[torch.Tensor]:
        student.zero_grad()
        per_position = _fkl_by_hand(student(batch), teacher(batch).detach())  # (6, T)
        reduce(per_position).backward()
        return _grads(student)

    mean = grads_of(lambda v: v[keep].sum() / keep.sum())
    row_means = grads_of(lambda v: ((v * keep).sum(1) / keep.sum(1)).mean())
    every_position = grads_of(lambda v: v.mean())
    assert _max_gap(step_grads, mean) < 1e-6
    assert _max_gap(step_grads, row_means) > 1e-4
    assert _max_gap(step_grads, every_position) > 1e-4

    # More padding (8 more masked columns) changes neither the loss nor the gradient.
    padded = TokenRows(torch.cat([batch["input_ids"], torch.zeros(6, 8, dtype=torch.long)], 1),
                       torch.cat([batch["attention_mask"], torch.zeros(6, 8, dtype=torch.long)], 1),
                       torch.cat([batch["labels"], torch.full((6, 8), -100)], 1)).__getitems__(list(range(6)))
    student.zero_grad()
    wide_out = distiller(padded, 0)
    wide_out["loss"].backward()
    torch.testing.assert_close(wide_out["loss"], out["loss"], rtol=1e-5, atol=1e-7)
    assert _max_gap(_grads(student), step_grads) < 1e-6


# ---------------------------------------------------- (c) accumulation: the step of one big batch


def test_accumulating_micro_batches_with_different_predicted_counts_equals_one_step_on_their_union(tmp_path):
    T = 16
    lengths = [16, 16, 16, 16, 3, 4, 16, 2]
    prompts = [0, 5, 0, 0, 0, 1, 8, 0]
    rows = _rows(lengths, prompts, T)
    student, teacher = _models(T)
    start = _params(student)
    _fit_one_step(student, teacher, rows, tmp_path, batch_size=8, accumulate=1, name="union")
    union = _params(student)
    student2, _ = _models(T)
    _fit_one_step(student2, teacher, rows, tmp_path, batch_size=4, accumulate=2, name="accumulated")
    accumulated = _params(student2)
    assert _max_gap(accumulated, union) < 2e-7

    # By hand: the step's micro-batches, and SGD's update from each normalisation.
    order = list(StepBatchSampler(8, batch_size=4, accumulate=2, seed=1, end_step=1))
    micro = [rows.__getitems__(idx) for idx in order]
    counts = [int(m["predicted"].sum()) for m in micro]
    assert counts[0] != counts[1]
    student3, _ = _models(T)

    def update(loss_of) -> list[torch.Tensor]:
        student3.zero_grad()
        loss_of().backward()
        return [p - 1.0 * g for p, g in zip(start, _grads(student3))]

    def per_position(m):
        return _fkl_by_hand(student3(m), teacher(m).detach())[m["predicted"]]

    right = update(lambda: sum(per_position(m).sum() for m in micro) / sum(counts))
    mean_of_means = update(lambda: sum(per_position(m).mean() for m in micro) / 2)
    assert _max_gap(accumulated, right) < 1e-6
    assert _max_gap(accumulated, mean_of_means) > 1e-4


# ------------------------------------------------------------------ (d) on-policy normalisation


def _on_policy_batch(T: int = 32, n: int = 6, completion: int = 4):
    """Prompt/completion rows of 32 tokens: prompts of a few tokens, a short completion, padding."""
    prompts = [3, 5, 4, 2, 6, 3][:n]
    lengths = [p + completion for p in prompts]
    return _rows(lengths, prompts, T, seed=7), prompts, lengths


@pytest.mark.parametrize("loss", ["jsd", "fkl", "sampled_rkl"])
def test_an_on_policy_step_is_divided_by_the_generated_tokens_not_the_pre_generation_count(loss):
    T = 32
    rows, prompts, _ = _on_policy_batch(T)
    batch = rows.__getitems__(list(range(6)))
    before = int(batch["predicted"].sum())  # 6 rows x 4 completion tokens (the first predicted by the prompt's last)
    assert before == 24
    student, teacher = _models(T)
    distiller = _distiller(student, teacher, loss)
    torch.manual_seed(0)
    out = OnPolicy(lmbda=1.0)(batch, step=0, distiller=distiller)
    generated = [T - p for p in prompts]  # every token after the prompt is the student's
    assert out["predicted"].sum(1).tolist() == generated
    keep = _keep_by_hand([T] * 6, prompts, T)
    assert torch.equal(out["predicted"], keep)
    with torch.no_grad():
        value = distiller.eval()(out, 0)["parts"][loss].double()
        s, t = student(out).double(), teacher(out).double()  # (6, T, V)
    if loss == "sampled_rkl":  # k3 at the sampled tokens: (r - 1) - log r, r = p(y) / q(y)
        y = out["target"].clamp(min=0)[..., None]
        log_r = (torch.log_softmax(t, -1).gather(-1, y) - torch.log_softmax(s, -1).gather(-1, y)).squeeze(-1)
        per_position = torch.expm1(log_r) - log_r
    elif loss == "jsd":  # beta 0.5: 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2
        p, q = torch.softmax(t, -1), torch.softmax(s, -1)
        m = 0.5 * (p + q)
        per_position = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    else:
        per_position = _fkl_by_hand(s, t)
    total = per_position[keep].sum()
    torch.testing.assert_close(value, total / sum(generated), rtol=1e-5, atol=1e-9)
    # The pre-generation count would weight the step up by 162 / 24 (a sum over 162 tokens divided by 24).
    assert float(value) < 0.5 * float(total / before)


def test_on_policy_steps_with_accumulation_weight_micro_batches_by_their_generated_tokens(tmp_path):
    """Greedy generation (temperature 0) makes the on-policy batches a function of the
    student, so the step's update can be computed by hand: one mean over every generated
    token of the step, although the two micro-batches generate different numbers of tokens."""
    T = 32
    six, _, _ = _on_policy_batch(T, n=6)
    # 8 rows (the first two twice): two micro-batches of 4.
    rows = TokenRows(*(torch.cat([x, x[:2]]) for x in (six.input_ids, six.attention_mask, six.labels)))
    student, teacher = _models(T)
    start = _params(student)
    transform = OnPolicy(lmbda=1.0, temperature=0.0)
    _fit_one_step(student, teacher, rows, tmp_path, batch_size=4, accumulate=2, transforms=[transform], lr=1.0,
                  loss="jsd")
    stepped = _params(student)

    student2, _ = _models(T)
    distiller = _distiller(student2, teacher, "jsd")
    order = list(StepBatchSampler(8, batch_size=4, accumulate=2, seed=1, end_step=1))
    micro = [transform(rows.__getitems__(idx), step=0, distiller=distiller) for idx in order]
    counts = [int(m["predicted"].sum()) for m in micro]
    assert counts[0] != counts[1]
    distiller.train()

    def update(loss) -> list[torch.Tensor]:
        student2.zero_grad()
        loss.backward()
        return [p - g for p, g in zip(start, _grads(student2))]

    # The library's per-micro-batch means (each the mean over its own generated tokens), combined by hand.
    means = [distiller(m, 0)["loss"] for m in micro]
    right = update(sum(v * c for v, c in zip(means, counts)) / sum(counts))
    means = [distiller(m, 0)["loss"] for m in micro]
    halves = update(sum(means) / 2)
    assert _max_gap(stepped, right) < 1e-6
    assert _max_gap(stepped, halves) > 1e-5


# ------------------------------------------------------------------------------ (e) temperature


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "sampled_rkl"])
def test_the_loss_temperature_divides_both_logits_as_the_formula_says(loss):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, VOCAB, generator=g) * 3, torch.randn(3, 7, VOCAB, generator=g) * 3
    target = torch.randint(VOCAB, (3, 7), generator=g)
    needs = {"target": target} if loss == "sampled_rkl" else {}

    def by_hand(T: float) -> torch.Tensor:
        log_p, log_q = torch.log_softmax(t.double() / T, -1), torch.log_softmax(s.double() / T, -1)
        p, q = log_p.exp(), log_q.exp()
        if loss == "fkl":
            return (p * (log_p - log_q)).sum(-1).mean()
        if loss == "rkl":
            return (q * (log_q - log_p)).sum(-1).mean()
        if loss == "jsd":
            m = 0.5 * (p + q)
            return (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean()
        log_r = (log_p - log_q).gather(-1, target[..., None]).squeeze(-1)
        return (torch.expm1(log_r) - log_r).mean()

    hot = LOSSES.get(loss).build(temperature=2.5)
    assert hot.temperature == 2.5
    value = hot(s, t, **needs).double()
    torch.testing.assert_close(value, by_hand(2.5), rtol=1e-5, atol=1e-8)
    plain = by_hand(1.0)
    assert abs(float(value) - float(plain)) > 0.05 * float(plain)  # the temperature is not ignored
    assert abs(float(value) - 2.5 ** 2 * float(by_hand(2.5))) > 0.05 * float(value)  # and no T^2 factor


def test_a_configs_distill_temperature_reaches_the_loss_and_is_written_to_config_yaml(tmp_path):
    import yaml

    from transfuse.build import load_data, make_distiller
    from transfuse.config import config_from_dict
    from transfuse.run import run

    cfg = config_from_dict({
        "name": "hot", "seed": 0,
        "data": {"name": "markov", "options": {"block_size": 12, "num_train": 64, "num_test": 16}},
        "student": {"name": "causal_lm", "options": {"layers": 1, "width": 16, "heads": 2}},
        "teacher": {"name": "causal_lm", "options": {"layers": 1, "width": 16, "heads": 2},
                    "train": {"steps": 2, "batch_size": 16, "optim": {"name": "adam", "lr": 0.003}},
                    "cache_dir": str(tmp_path / "cache")},
        "distill": {"method": "jsd", "options": {"temperature": 2.5, "beta": 0.3}},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"steps": 1, "batch_size": 16, "log_every": 1, "checkpoint_every": 1, "progress": False},
    })
    splits, train_set = load_data(cfg.data)
    distiller = make_distiller(cfg, splits, train_set)
    jsd = [t for t in distiller.terms if t.name != "ce"]
    assert [t.loss.temperature for t in jsd] == [2.5] and jsd[0].loss.beta == 0.3
    # ... and is applied: the built term's value is the generalised JSD of softmax(t / 2.5), softmax(s / 2.5).
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 16, generator=g) * 3, torch.randn(2, 5, 16, generator=g) * 3
    p, q = torch.softmax(t.double() / 2.5, -1), torch.softmax(s.double() / 2.5, -1)
    m = 0.3 * p + 0.7 * q
    want = (0.3 * (p * (p / m).log()).sum(-1) + 0.7 * (q * (q / m).log()).sum(-1)).mean()
    torch.testing.assert_close(jsd[0].loss(s, t).double(), want, rtol=1e-5, atol=1e-8)
    run(cfg, out_dir=tmp_path / "run", quiet=True)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["distill"]["options"]["temperature"] == 2.5


# --------------------------------------------------------------------------------------- (f) DDP


def _ddp_rows() -> tuple[TokenRows, list[list[int]]]:
    """8 rows of 16 tokens; the rows rank 0 gets in step 1 are heavily padded, rank 1's are full."""
    T = 16
    shards = [next(iter(StepBatchSampler(8, batch_size=8, seed=1, end_step=1, rank=r, world_size=2))) for r in (0, 1)]
    lengths, prompts = [16] * 8, [0] * 8
    for i, row in enumerate(shards[0]):
        lengths[row], prompts[row] = 3 + i, i % 2
    return _rows(lengths, prompts, T), shards


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from lightning_fabric import Fabric

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    fabric = Fabric(accelerator="cpu", devices=world, strategy="ddp")
    fabric.launch()
    rows, _ = _ddp_rows()
    student, teacher = _models(16)
    distiller = _distiller(student, teacher)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=1.0)
    counts = []

    def record(batch, *, step, distiller):
        counts.append(int(batch["predicted"].sum()))
        return batch

    settings = FitSettings(steps=1, batch_size=8, seed=1, log_every=1, checkpoint_every=1, progress=False)
    fit(fabric, distiller, optimizer, rows, settings, run_dir=os.path.join(out_dir, "ddp"), transforms=[record])
    torch.save({"params": _params(student), "counts": counts}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_processes_with_different_padding_take_the_single_process_step_on_their_union(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no gloo backend")
    try:
        torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    except OSError as err:  # the platform cannot start processes (a failure inside a worker still fails the test)
        pytest.skip(f"this platform cannot start two processes: {err}")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["counts"][0] != r1["counts"][0]  # different padding on each process
    assert _max_gap(r0["params"], r1["params"]) == 0.0  # DDP keeps the replicas identical

    rows, shards = _ddp_rows()
    student, teacher = _models(16)
    start = _params(student)
    _fit_one_step(student, teacher, rows, tmp_path, batch_size=8, name="single")
    single = _params(student)
    assert _max_gap(r0["params"], single) < 1e-6

    # What averaging each process's own mean (DDP's plain gradient average) would have done instead.
    halves = [rows.__getitems__(s) for s in shards]
    assert [int(h["predicted"].sum()) for h in halves] == [r0["counts"][0], r1["counts"][0]]
    student2, _ = _models(16)
    loss = sum(_fkl_by_hand(student2(h), teacher(h).detach())[h["predicted"]].mean() for h in halves) / 2
    loss.backward()
    mean_of_means = [p - g for p, g in zip(start, _grads(student2))]
    assert _max_gap(r0["params"], mean_of_means) > 1e-4
