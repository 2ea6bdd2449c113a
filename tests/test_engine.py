"""The engine: data order, accumulation, exact resume, non-finite losses."""

import shutil

import pytest
import torch
from lightning_fabric import Fabric
from torch import nn

from transfuse.checkpoint import latest_checkpoint, load_checkpoint
from transfuse.data.base import ArrayDataset
from transfuse.distiller import Distiller, Term
from transfuse.engine import FitSettings, NonFiniteLossError, StepBatchSampler, fit
from transfuse.losses import LOSSES, DistillLoss
from transfuse.recipes import DefaultRecipe
from transfuse.metrics_log import read_metrics
from transfuse.optim import lr_at, make_optimizer
from transfuse.participants import Participant


def _data(n=256, d=6, classes=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return ArrayDataset(x, y)


def _models(dropout=0.0):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4))
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
    return student, teacher


def _distiller(student, teacher):
    return Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)],
                     [Term("ce", LOSSES.get("ce").build(), 0.5, target=None), Term("kd", LOSSES.get("kd").build(), 0.5)])


def _fabric():
    return Fabric(accelerator="cpu", devices=1)


def _train(run_dir, *, steps=30, batch_size=32, accumulate=1, dropout=0.0, optim="adam", resume=False, student_teacher=None,
           transforms=(), **kw):
    student, teacher = student_teacher or _models(dropout)
    d = _distiller(student, teacher)
    opt = make_optimizer(d.parameters(), name=optim, lr=0.05)
    settings = FitSettings(steps=steps, batch_size=batch_size, accumulate=accumulate, seed=3, log_every=kw.pop("log_every", 5),
                           checkpoint_every=kw.pop("checkpoint_every", 10), keep_checkpoints=10, progress=False, **kw)
    fit(_fabric(), d, opt, _data(), settings, run_dir=run_dir, resume=resume, transforms=transforms)
    return student


def test_sampler_is_a_pure_function_of_seed_and_step():
    full = list(StepBatchSampler(100, batch_size=8, seed=1, end_step=30))
    tail = list(StepBatchSampler(100, batch_size=8, seed=1, start_step=12, end_step=30))
    assert full[12:] == tail
    # Each epoch is a permutation: 12 full steps of 8 out of 100 samples, no repeats within an epoch.
    epoch0 = [i for b in full[:12] for i in b]
    assert len(set(epoch0)) == 96
    assert full[:12] != full[12:24], "a new epoch reshuffles"


def test_sampler_accumulation_and_ranks_partition_the_global_batch():
    single = list(StepBatchSampler(64, batch_size=16, seed=0, end_step=3))
    micro = list(StepBatchSampler(64, batch_size=8, accumulate=2, seed=0, end_step=3))
    assert [a + b for a, b in zip(micro[::2], micro[1::2])] == single
    r0 = list(StepBatchSampler(64, batch_size=16, seed=0, end_step=3, rank=0, world_size=2))
    r1 = list(StepBatchSampler(64, batch_size=16, seed=0, end_step=3, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == single
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(64, batch_size=15, end_step=1, world_size=2)
    with pytest.raises(ValueError, match="fewer than one step"):
        StepBatchSampler(10, batch_size=16, end_step=1)


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    # SGD without momentum: the update is linear in the gradient, so the two runs must agree
    # to float precision if the accumulated loss is scaled by 1/accumulate.
    big = _train(tmp_path / "a", steps=8, batch_size=64, optim="sgd")
    acc = _train(tmp_path / "b", steps=8, batch_size=16, accumulate=4, optim="sgd")
    for p, q in zip(big.parameters(), acc.parameters()):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()


def test_resume_is_bit_identical(tmp_path):
    # Dropout makes the result depend on the RNG stream, so RNG state must be restored too.
    full = _train(tmp_path / "full", steps=30, dropout=0.3)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for ck in (part / "checkpoints").iterdir():
        if ck.name not in ("step-00000010",):
            shutil.rmtree(ck) if ck.is_dir() else ck.unlink()
    resumed = _train(part, steps=30, dropout=0.3, resume=True, student_teacher=_models(0.3))
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    steps = [r["step"] for r in read_metrics(part / "metrics.jsonl") if "loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30], "resumed log must not repeat steps"


def test_resume_without_checkpoint_starts_from_step_zero(tmp_path):
    # A run killed before its first checkpoint left nothing to continue: --resume starts it anew.
    fresh = _train(tmp_path / "a", steps=12)
    resumed = _train(tmp_path / "b", steps=12, resume=True)
    for p, q in zip(fresh.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


class _NanAfter(DistillLoss):
    uses_teacher = False
    needs = ("target",)

    def __init__(self, after: int):
        super().__init__()
        self.calls, self.after = 0, after

    def forward(self, student, teacher, *, target, mask=None, weights=None):
        self.calls += 1
        loss = nn.functional.cross_entropy(student, target)
        return loss * float("nan") if self.calls > self.after else loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    student, _ = _models()
    d = Distiller([Participant("student", student)], [Term("bad", _NanAfter(after=13), target=None)])
    opt = make_optimizer(d.parameters(), name="adam", lr=0.01)
    settings = FitSettings(steps=30, batch_size=32, checkpoint_every=5, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"at step 14 in term\(s\) bad=nan.*step-00000010") as err:
        fit(_fabric(), d, opt, _data(), settings, run_dir=tmp_path)
    assert err.value.step == 14
    state, _ = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(torch.isfinite(p).all() for p in student.parameters()), "the bad update was not applied"


def test_lr_schedules():
    assert lr_at(0, base_lr=1.0, total_steps=10, warmup_steps=4) == 0.25
    assert lr_at(9, base_lr=1.0, total_steps=10) == 1.0
    assert lr_at(0, base_lr=1.0, total_steps=10, schedule="cosine") == 1.0
    assert abs(lr_at(5, base_lr=1.0, total_steps=10, schedule="cosine") - 0.5) < 1e-9


def test_the_default_recipe_syncs_with_the_host_once_per_step(tmp_path, monkeypatch):
    # The loss parts stay on the device between log rows; only the step's loss is read
    # (for the non-finite check), so transfuse calls .item()/float() on a tensor once per
    # step plus once per logged part. (The optimizer's own reads of its CPU step counter
    # are not device syncs and are not counted.)
    import traceback

    calls = {"n": 0}

    def counting(original):
        def wrapper(self, *args):
            caller = traceback.extract_stack(limit=2)[0].filename
            if "transfuse" in caller and "tests" not in caller:
                calls["n"] += 1
            return original(self, *args)
        return wrapper

    monkeypatch.setattr(torch.Tensor, "__float__", counting(torch.Tensor.__float__))
    monkeypatch.setattr(torch.Tensor, "item", counting(torch.Tensor.item))
    _train(tmp_path, steps=20, log_every=10, checkpoint_every=20)
    parts = 2  # ce and kd
    assert calls["n"] == 20 + 2 * parts, calls


def test_two_optimizers_each_step_and_are_checkpointed(tmp_path):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    b = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    d = Distiller([Participant("a", a), Participant("b", b)],
                  [Term("ce_a", LOSSES.get("ce").build(), input="a.logits", target=None),
                   Term("ce_b", LOSSES.get("ce").build(), input="b.logits", target=None),
                   Term("kl_a", LOSSES.get("kd").build(temperature=1.0), input="a.logits", target="b.logits"),
                   Term("kl_b", LOSSES.get("kd").build(temperature=1.0), input="b.logits", target="a.logits")])
    before_a, before_b = [p.clone() for p in a.parameters()], [p.clone() for p in b.parameters()]
    opts = {"a": make_optimizer(a.parameters(), name="sgd", lr=0.1), "b": make_optimizer(b.parameters(), name="adam", lr=0.01)}
    settings = FitSettings(steps=4, batch_size=32, checkpoint_every=2, progress=False)
    fit(_fabric(), d, opts, _data(), settings, run_dir=tmp_path, recipe=DefaultRecipe())
    assert all(not torch.equal(p, q) for p, q in zip(a.parameters(), before_a))
    assert all(not torch.equal(p, q) for p, q in zip(b.parameters(), before_b))
    _, state = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert sorted(state["optimizers"]) == ["a", "b"]


def test_batch_transforms_run_before_the_forward_pass(tmp_path):
    seen = []

    def double_inputs(batch, *, step, distiller):
        seen.append(step)
        return {**batch, "input": batch["input"] * 2}

    student, teacher = _models()
    d = _distiller(student, teacher)
    opt = make_optimizer(d.parameters(), name="adam", lr=0.01)
    settings = FitSettings(steps=3, batch_size=32, accumulate=2, checkpoint_every=3, progress=False)
    fit(_fabric(), d, opt, _data(), settings, run_dir=tmp_path, transforms=[double_inputs])
    assert seen == [0, 0, 1, 1, 2, 2]


def test_alternating_recipe_updates_participants_in_turn_like_a_hand_written_loop(tmp_path):
    from transfuse.functional import cross_entropy, kd
    from transfuse.recipes import AlternatingRecipe

    def nets():
        torch.manual_seed(0)
        return (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)),
                nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)))

    a, b = nets()
    d = Distiller([Participant("a", a), Participant("b", b)],
                  [Term("ce_a", LOSSES.get("ce").build(), input="a.logits", target=None),
                   Term("kl_a", LOSSES.get("kd").build(temperature=1.0), input="a.logits", target="b.logits"),
                   Term("ce_b", LOSSES.get("ce").build(), input="b.logits", target=None),
                   Term("kl_b", LOSSES.get("kd").build(temperature=1.0), input="b.logits", target="a.logits")])
    opts = {"a": make_optimizer(a.parameters(), name="sgd", lr=0.1, momentum=0.0),
            "b": make_optimizer(b.parameters(), name="sgd", lr=0.1, momentum=0.0)}
    settings = FitSettings(steps=3, batch_size=32, seed=5, checkpoint_every=3, progress=False)
    fit(_fabric(), d, opts, _data(), settings, run_dir=tmp_path, recipe=AlternatingRecipe())

    ra, rb = nets()
    oa, ob = torch.optim.SGD(ra.parameters(), lr=0.1), torch.optim.SGD(rb.parameters(), lr=0.1)
    data = _data()
    for batch_idx in StepBatchSampler(len(data), batch_size=32, seed=5, end_step=3):
        batch = data.__getitems__(batch_idx)
        x, y = batch["input"], batch["target"]
        loss_a = cross_entropy(ra(x), y) + kd(ra(x), rb(x).detach(), temperature=1.0)
        oa.zero_grad(), loss_a.backward(), oa.step()
        loss_b = cross_entropy(rb(x), y) + kd(rb(x), ra(x).detach(), temperature=1.0)  # sees a's new weights
        ob.zero_grad(), loss_b.backward(), ob.step()
    for p, q in zip([*a.parameters(), *b.parameters()], [*ra.parameters(), *rb.parameters()]):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()


def test_resume_with_a_random_batch_transform_is_bit_identical(tmp_path):
    from transfuse.transforms import make_transform

    noise = [make_transform("gaussian_noise", std=0.5)]
    full = _train(tmp_path / "full", steps=30, transforms=noise)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for ck in (part / "checkpoints").iterdir():
        if ck.name != "step-00000010":
            shutil.rmtree(ck) if ck.is_dir() else ck.unlink()
    resumed = _train(part, steps=30, resume=True, transforms=noise)
    plain = _train(tmp_path / "plain", steps=30)
    for p, q, r in zip(full.parameters(), resumed.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, r) for p, r in zip(full.parameters(), plain.parameters())), "the noise must change training"


def _keep_only(run_dir, names):
    """Delete every checkpoint entry of ``run_dir`` except ``names`` (``latest`` too, unless named)."""
    for ck in (run_dir / "checkpoints").iterdir():
        if ck.name not in names:
            shutil.rmtree(ck) if ck.is_dir() else ck.unlink()


def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path):
    import warnings

    from transfuse.checkpoint import CheckpointFallbackWarning

    full = _train(tmp_path / "full", steps=30, dropout=0.3)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    ckpts = part / "checkpoints"
    # The run was at step 20 when the disk lost the end of its newest state.pt; a killed
    # process also left a temp folder and a half-pruned checkpoint behind.
    _keep_only(part, {"step-00000010", "step-00000020"})
    (ckpts / "latest").write_text("step-00000020\n")
    state = ckpts / "step-00000020" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (ckpts / ".tmp-step-00000030-999999").mkdir()
    (ckpts / "step-00000005").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _train(part, steps=30, dropout=0.3, resume=True, student_teacher=_models(0.3))
    fallbacks = [w for w in caught if issubclass(w.category, CheckpointFallbackWarning)]
    assert len(fallbacks) == 1
    assert "step-00000020" in str(fallbacks[0].message) and "truncated" in str(fallbacks[0].message)
    assert "step-00000010" in str(fallbacks[0].message)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    steps = [r["step"] for r in read_metrics(part / "metrics.jsonl") if "loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30], "resumed log must not repeat steps"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000010", "step-00000020", "step-00000030"]
    load_checkpoint(ckpts / "step-00000020")  # rewritten whole


def test_resume_stops_when_no_checkpoint_loads(tmp_path):
    from transfuse.checkpoint import CheckpointError

    _train(tmp_path, steps=20)
    for step in ("00000010", "00000020"):
        (tmp_path / "checkpoints" / f"step-{step}" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"step-00000020: .*empty.*; step-00000010: .*empty"):
        _train(tmp_path, steps=20, resume=True)


def test_fit_removes_leftovers_at_start(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".tmp-step-00000010-999999").mkdir()
    (ckpts / "step-00000010").mkdir()
    _train(tmp_path, steps=4, checkpoint_every=100)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000004"]


class _Clock:
    """A clock the test advances by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_prints_plain_lines_when_not_on_a_terminal():
    import io

    from transfuse.progress import Progress

    clock, out = _Clock(), io.StringIO()
    progress = Progress(total=100, description="train teacher (mlp)", stream=out, interval_s=10.0, clock=clock)
    for done in range(1, 26):
        clock.now += 0.5  # 2 steps/s: a line every 20 steps
        progress.update(done, loss=0.25 if done <= 20 else 0.5)
    progress.close()
    progress.close()  # a second close adds nothing
    assert out.getvalue().splitlines() == [
        "train teacher (mlp): step 20/100 (20%) loss 0.2500 2.0 steps/s",
        "train teacher (mlp): step 25/100 (25%) loss 0.5000 2.0 steps/s",
    ]


def test_progress_keeps_the_bar_on_a_terminal_and_is_silent_when_off():
    import io

    from transfuse.progress import Progress

    out = io.StringIO()
    with Progress(total=10, description="distil", stream=out, tty=True, clock=_Clock()) as bar:
        for done in range(1, 11):
            bar.update(done, loss=1.0)
    assert "\r" in out.getvalue() and "distil" in out.getvalue() and "10/10" in out.getvalue()
    assert "step 10/10" not in out.getvalue()
    quiet = io.StringIO()
    with Progress(total=10, enabled=False, stream=quiet, tty=False) as off:
        off.update(10, loss=1.0)
    assert quiet.getvalue() == ""


def test_fit_reports_progress_on_stderr_when_not_on_a_terminal(tmp_path, capsys):
    import io

    student, teacher = _models()
    d = _distiller(student, teacher)
    settings = FitSettings(steps=6, batch_size=32, checkpoint_every=6, description="distil kd", progress_every_s=0.0)
    fit(_fabric(), d, make_optimizer(d.parameters(), name="adam", lr=0.01), _data(), settings, run_dir=tmp_path / "a")
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("distil kd: ")]
    assert len(lines) == 6 and lines[-1].startswith("distil kd: step 6/6 (100%) loss "), captured.err
    assert "step" not in captured.out, "stdout carries the CLI's JSON result only"
    quiet = io.StringIO()
    settings = FitSettings(steps=3, batch_size=32, checkpoint_every=3, progress=False, progress_every_s=0.0)
    fit(_fabric(), d, make_optimizer(d.parameters(), name="adam", lr=0.01), _data(), settings, run_dir=tmp_path / "b",
        progress_stream=quiet)
    assert quiet.getvalue() == ""


def test_nan_in_the_data_is_named_instead_of_the_learning_rate(tmp_path):
    data = _data()
    first = StepBatchSampler(len(data), batch_size=32, seed=0, end_step=1).epoch_order(0)[:32]
    bad_row = int(first[3])
    data.inputs[bad_row, 2] = float("nan")
    data = type(data)(data.inputs, data.targets, ids=torch.arange(len(data)) + 1000)
    student, _ = _models()
    d = Distiller([Participant("student", student)], [Term("ce", LOSSES.get("ce").build(), target=None)])
    settings = FitSettings(steps=3, batch_size=32, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"at step 1 in term\(s\) ce=nan") as err:
        fit(_fabric(), d, make_optimizer(d.parameters(), name="adam", lr=0.01), data, settings, run_dir=tmp_path)
    message = str(err.value)
    assert f"`input` in 1 sample(s) (sample ids [{bad_row + 1000}])" in message, message
    assert "optim.lr" not in message


def test_nan_from_a_batch_transform_is_blamed_on_the_transform(tmp_path):
    def poison(batch, *, step, distiller):
        x = batch["input"].clone()
        x[0, 0] = float("inf")
        return {**batch, "input": x}

    student, _ = _models()
    d = Distiller([Participant("student", student)], [Term("ce", LOSSES.get("ce").build(), target=None)])
    settings = FitSettings(steps=3, batch_size=32, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"batch transforms produced non-finite values: `input` in 1 sample"):
        fit(_fabric(), d, make_optimizer(d.parameters(), name="adam", lr=0.01), _data(), settings, run_dir=tmp_path,
            transforms=[poison])


def test_a_non_finite_weight_is_named_when_every_term_is_finite(tmp_path):
    student, teacher = _models()
    d = Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)],
                  [Term("ce", LOSSES.get("ce").build(), 0.5, target=None), Term("kd", LOSSES.get("kd").build(), float("inf"))])
    settings = FitSettings(steps=3, batch_size=32, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"in the weighted sum of terms.*the weight of kd=inf") as err:
        fit(_fabric(), d, make_optimizer(d.parameters(), name="adam", lr=0.01), _data(), settings, run_dir=tmp_path)
    assert "optim.lr" not in str(err.value) and "distill.weight" in str(err.value)


def test_a_diverging_loss_still_gets_the_learning_rate_advice(tmp_path):
    student, _ = _models()
    d = Distiller([Participant("student", student)], [Term("bad", _NanAfter(after=2), target=None)])
    settings = FitSettings(steps=5, batch_size=32, checkpoint_every=2, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"batch is finite.*lower optim.lr or set train.grad_clip.*step-00000002"):
        fit(_fabric(), d, make_optimizer(d.parameters(), name="adam", lr=0.01), _data(), settings, run_dir=tmp_path)
