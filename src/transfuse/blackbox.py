"""A label-only (black-box) teacher: it answers the class it predicts, never logits, from a budget.

:class:`LabelOnlyTeacher` wraps a frozen teacher (a participant, or a teacher-output
cache) the way a remote prediction API wraps a model: for each input it is asked about it
returns one class id, and every answer costs one query from a fixed ``budget``. Once the
budget is spent it answers nothing more. It is a source like any other (``provide``,
``resolve_field``), with exactly two fields:

* ``labels`` -- int64 ``(B,)``: the teacher's top-1 class, or ``-1``
  (:data:`~transfuse.functional.hard_labels.NO_ANSWER`) where it did not answer;
* ``answered`` -- bool ``(B,)``: ``labels >= 0``.

Asking it for ``logits``, probabilities or a feature raises :class:`LabelOnlyError`: a
term cannot reach past the black box by accident. The ``label_only`` loss
(:func:`~transfuse.functional.hard_labels.hard_label_ce`) trains the student on ``labels``
and masks the unanswered samples out by their ``-1``.

**Which samples are answered.** In batch order, the samples that need a query (see
*memory*) are answered while budget remains; the batch that crosses the budget is answered
partially (its first samples), later batches not at all. The teacher is run on the answered
rows only, so a spent budget costs no teacher compute at all.

**Memory** (``num_samples``). A real black box is queried once per input and the answer
kept: with ``num_samples=N`` the source remembers each answer by the sample's
``batch["index"]`` (``0..N-1``, the position in the training set) and answers that sample
again for free, every later epoch (and a sample that appears twice in one batch is asked
once). Without memory every sample of every batch is a new
query -- what augmented inputs need when each view should be labelled afresh (a batch
transform such as ``gaussian_noise`` changes the input every step; with memory a sample
keeps the answer given for the view it was first asked about).

**State.** The number of queries spent (``queries``) and the remembered answers
(``answers``) are buffers: they are in the module's ``state_dict``, so a checkpointed run
resumes with exactly the budget and answers it had. The Distiller must hold the source in
its module tree for that (a non-trainable stateful source); the teacher it wraps is never
part of that state.

**DDP.** The budget is global. Each process counts the samples that need a query in its
shard; one ``all_reduce`` of those counts gives every process the same view, the remaining
budget goes to the processes in rank order (rank 0's samples first), and every process adds
the same global number of answers to ``queries``. With memory the processes also exchange
the answers they received (one ``all_gather``), so a sample answered on one process is known
to all. Both happen only while budget remains.

**Host synchronisation.** While budget remains, one per batch (the number of rows to send
to the teacher); once it is spent, none: a host-side copy of the count short-cuts the rest.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from .errors import UserError
from .functional.hard_labels import NO_ANSWER
from .participants import LOGITS, Outputs

LABELS = "labels"
ANSWERED = "answered"
#: The only fields a label-only teacher answers.
FIELDS = (LABELS, ANSWERED)
#: Batch entry that keys remembered answers: the sample's position in the training set.
INDEX = "index"
#: Batch entry that marks labelled samples in a transfer set (``skip_labelled``).
LABELLED = "labelled"


class LabelOnlyError(UserError, ValueError):
    """A label-only teacher asked for something it never answers, or built or fed wrongly."""


class LabelOnlyTeacher(nn.Module):
    """A frozen teacher behind a label-only interface with a query budget.

    >>> teacher = Participant("teacher", net, trainable=False)
    >>> blackbox = LabelOnlyTeacher("blackbox", teacher, budget=2000, num_samples=len(train_set))
    >>> out = blackbox.provide(batch, ["labels", "answered"])

    ``member``: a source that reads no other source and answers ``logits`` -- a frozen
    :class:`~transfuse.participants.Participant` or a
    :class:`~transfuse.sources.CachedOutputs`. ``budget``: how many answers the teacher
    gives in all (``>= 0``). ``num_samples``: remember answers for the training samples
    ``batch["index"] in [0, num_samples)`` (None: every sample asked about is a new query).
    ``skip_labelled``: do not spend queries on samples whose ``batch["labelled"]`` is True
    (a transfer set's labelled part, which has labels of its own).

    Not trainable (no parameters); an ``nn.Module`` for its buffers: ``queries`` (int64
    scalar, the answers given so far, counted globally under DDP) and ``answers`` (int64
    ``(num_samples,)``, ``-1`` where not yet asked) when it remembers.
    """

    trainable = False
    inputs: tuple[str, ...] = ()

    def __init__(
        self, name: str, member, *, budget: int, num_samples: int | None = None, skip_labelled: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"source name {name!r} must be an identifier (letters, digits, underscores)")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"label-only teacher {name!r}: budget must be an integer >= 0 (queries), got {budget!r}")
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"label-only teacher {name!r}: num_samples must be an integer >= 1 or None, got {num_samples!r}")
        if not callable(getattr(member, "provide", None)):
            raise ValueError(f"label-only teacher {name!r}: its member must be a source (with provide), got {member!r}")
        if tuple(getattr(member, "inputs", ())):
            raise ValueError(
                f"label-only teacher {name!r}: its member {getattr(member, 'name', member)!r} reads other sources "
                f"({list(member.inputs)}); wrap a teacher that answers on its own: a frozen participant or a "
                "teacher-output cache"
            )
        if getattr(member, "trainable", False):
            raise ValueError(
                f"label-only teacher {name!r}: its member {getattr(member, 'name', member)!r} is trainable; a black-box "
                "teacher is a frozen model (trainable: false)"
            )
        self.name = name
        # Held outside the module tree: the teacher's weights are never part of this state.
        object.__setattr__(self, "_member", member)
        self.budget = int(budget)
        self.skip_labelled = bool(skip_labelled)
        self.register_buffer("queries", torch.zeros((), dtype=torch.int64))
        if num_samples is None:
            self.register_buffer("answers", None)
        else:
            self.register_buffer("answers", torch.full((num_samples,), NO_ANSWER, dtype=torch.int64))
        self._spent: int | None = 0  # host copy of `queries`; None = read it again (after a load)

    def extra_repr(self) -> str:
        memory = "none" if self.answers is None else f"{len(self.answers)} samples"
        return (f"name={self.name!r}, member={getattr(self._member, 'name', '?')!r}, budget={self.budget}, "
                f"memory={memory}, skip_labelled={self.skip_labelled}")

    # ------------------------------------------------------------------ the Source interface

    @property
    def members(self) -> tuple:
        """The teacher this source runs itself (not through ``upstream``): whoever sets up
        frozen participants on a device, or loads their trained weights, must reach it."""
        return (self._member,)

    def resolve_field(self, field: str) -> str:
        """``labels`` or ``answered``; any other field is refused: a black box has no logits or features."""
        if field not in FIELDS:
            raise LabelOnlyError(
                f"source {self.name!r} is a label-only (black-box) teacher: it answers only 'labels' (the class it "
                f"predicts, int64 (B,), -1 where it did not answer) and 'answered' (bool (B,)); it never exposes "
                f"{field!r} (no logits, probabilities or features). Distil its answers with the label_only loss, "
                f"target: {self.name}.labels"
            )
        return field

    def provide(
        self, batch: Mapping[str, torch.Tensor], fields: Iterable[str] = FIELDS, upstream: Mapping[str, Outputs] | None = None
    ) -> Outputs:
        """``{"labels": (B,) int64, "answered": (B,) bool}`` (the fields asked for) for ``batch``,
        spending queries on the samples that need one while budget remains."""
        fields = list(fields)
        for field in fields:
            self.resolve_field(field)
        reference = _batch_reference(batch, self.name)
        size, device = reference.shape[0], reference.device
        index = self._index(batch) if self.answers is not None else None
        labels = self._remembered(index, size, device)
        if self.remaining > 0:  # the host copy: nothing to synchronise once the budget is spent
            need = labels < 0
            if self.skip_labelled and LABELLED in batch:
                need = need & ~batch[LABELLED].to(device=device, dtype=torch.bool).reshape(size)
            self._ask(batch, need, labels, index)
        out = {LABELS: labels, ANSWERED: labels >= 0}
        return {field: out[field] for field in fields}

    # ------------------------------------------------------------------ budget and state

    @property
    def spent(self) -> int:
        """Queries answered so far (all processes together)."""
        if self._spent is None:
            self._spent = int(self.queries)
        return self._spent

    @property
    def remaining(self) -> int:
        """Queries left in the budget."""
        return max(self.budget - self.spent, 0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._spent = None  # the buffer changed: read the count again when it is next needed

    def setup(self, fabric) -> None:
        """Place the wrapped teacher on Fabric's device in Fabric's precision (as a frozen
        participant is set up); the buffers move with the module that holds this source."""
        setup = getattr(self._member, "setup", None)
        if callable(setup):
            setup(fabric)

    # ------------------------------------------------------------------ internals

    def _index(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if INDEX not in batch:
            raise LabelOnlyError(
                f"label-only teacher {self.name!r} remembers answers by the sample's '{INDEX}' (its position in the "
                f"training set), but the batch has no '{INDEX}' (keys: {sorted(batch)}); datasets built by "
                "transfuse.data provide it, or build the source without memory (num_samples=None)"
            )
        return batch[INDEX].long().reshape(-1)

    def _remembered(self, index: torch.Tensor | None, size: int, device: torch.device) -> torch.Tensor:
        """``(B,)`` int64: the remembered answer of each sample, ``-1`` where none is known."""
        if index is None:
            return torch.full((size,), NO_ANSWER, dtype=torch.int64, device=device)
        answers = self.answers
        index = index.to(answers.device)
        inside = (index >= 0) & (index < len(answers))
        # Out-of-range indices are reported where the budget is spent (_ask); never read past the buffer.
        stored = answers[index.clamp(0, len(answers) - 1)]
        return torch.where(inside, stored, torch.full_like(stored, NO_ANSWER)).to(device)

    def _ask(self, batch: Mapping[str, torch.Tensor], need: torch.Tensor, labels: torch.Tensor,
             index: torch.Tensor | None) -> None:
        """Query the teacher on the samples of ``need`` that the remaining budget covers;
        write its answers into ``labels`` (and the memory); count them."""
        device = need.device
        world, rank = _world()
        if index is not None:
            # A sample twice in one batch is asked once; its other rows get that answer below.
            first = need & _first_rows(index.to(device), need, len(self.answers))
            repeats, need = need & ~first, first
        wanted = need.sum()  # samples of this process that need an answer (a tensor: no sync)
        if world > 1:
            # Every process's count, in one all_reduce: the budget goes to ranks in order.
            counts = torch.zeros(2, world, dtype=torch.int64, device=device)
            counts[0, rank] = wanted
            counts[1, rank] = need.numel()
            torch.distributed.all_reduce(counts)
            before, total, widest = counts[0, :rank].sum(), counts[0].sum(), counts[1].max()
        else:
            before, total, widest = torch.zeros((), dtype=torch.int64, device=device), wanted, None
        remaining = self.budget - self.queries.to(device)
        mine = (remaining - before).clamp(min=0)  # how many of this process's samples may be answered
        ask = need & (need.cumsum(0) <= mine)  # the first ones, in batch order
        spent_now = torch.minimum(total, remaining.clamp(min=0))  # answers given by all processes together
        checks = [ask.sum(), spent_now]
        if index is not None:
            checks.append(((index < 0) | (index >= len(self.answers))).any().to(torch.int64).to(device))
        values = torch.stack([c.to(device) for c in checks]).tolist()  # the one host sync of a batch
        asked, spent_now = values[0], values[1]
        if index is not None and values[2]:
            outside = index[(index < 0) | (index >= len(self.answers))][:3].tolist()
            raise LabelOnlyError(
                f"label-only teacher {self.name!r} remembers {len(self.answers)} samples, but the batch has '{INDEX}' "
                f"values outside [0, {len(self.answers)}) (e.g. {outside}); build it with num_samples = the training "
                "set's length"
            )
        got = None
        rows = None
        if asked:
            rows = ask.nonzero().flatten()  # (k,)
            got = self._answer(batch, rows, need.numel())  # (k,) int64
            labels[rows] = got.to(labels.device)
            if index is not None:
                self.answers[index[rows].to(self.answers.device)] = got.to(self.answers.device)
        if world > 1 and index is not None and spent_now:
            self._share(index, rows, got, int(widest), device)
        if index is not None:
            stored = self.answers[index.clamp(0, len(self.answers) - 1).to(self.answers.device)].to(labels.device)
            labels.copy_(torch.where(repeats.to(labels.device), stored, labels))
        if spent_now:
            before_now = self.spent
            self.queries.add_(spent_now)
            self._spent = before_now + spent_now

    def _answer(self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor, size: int) -> torch.Tensor:
        """The teacher's top-1 class for the batch's ``rows``: it is run on those rows only."""
        sub = {k: v[rows.to(v.device)] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == size else v
               for k, v in batch.items()}
        logits = self._member.provide(sub, (LOGITS,), {})[LOGITS]
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise LabelOnlyError(
                f"label-only teacher {self.name!r}: its teacher must answer one row of class scores per sample, "
                f"({len(rows)}, C) here; got logits of shape {tuple(logits.shape)} (label-only teachers are classifiers)"
            )
        return logits.argmax(dim=-1).to(torch.int64)

    def _share(self, index: torch.Tensor, rows: torch.Tensor | None, got: torch.Tensor | None, widest: int,
               device: torch.device) -> None:
        """Under DDP: every process learns the answers every other one received this batch."""
        payload = torch.full((widest, 2), NO_ANSWER, dtype=torch.int64, device=device)
        if rows is not None:
            payload[: len(rows), 0] = index[rows].to(device)
            payload[: len(rows), 1] = got.to(device)
        gathered = [torch.empty_like(payload) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, payload)
        both = torch.cat(gathered)
        known = both[:, 0] >= 0
        self.answers[both[known, 0].to(self.answers.device)] = both[known, 1].to(self.answers.device)


def _batch_reference(batch: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """A batch entry with the batch dimension (``index``, ``sample_id``, ``input``, else the first tensor)."""
    for key in (INDEX, "sample_id", "input"):
        value = batch.get(key)
        if torch.is_tensor(value) and value.dim() >= 1:
            return value
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() >= 1:
            return value
    raise LabelOnlyError(f"label-only teacher {name!r}: the batch holds no tensor with a batch dimension ({sorted(batch)})")


def _first_rows(index: torch.Tensor, need: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``(B,)`` bool: True at the first row of each sample index among the rows of ``need``
    (no host synchronisation: a scatter of row positions, not ``unique``)."""
    size = len(index)
    rows = torch.arange(size, device=index.device)
    safe = index.clamp(0, num_samples - 1)
    first = torch.full((num_samples,), size, dtype=torch.int64, device=index.device)
    first.scatter_reduce_(0, safe, torch.where(need, rows, torch.full_like(rows, size)), reduce="amin")
    return first[safe] == rows


def _world() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group; ``(1, 0)`` outside one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


__all__ = ["ANSWERED", "FIELDS", "LABELS", "LabelOnlyError", "LabelOnlyTeacher"]
