"""evaluate: joint accuracy and loss, per-task accuracy (argmax within the task), errors."""

import math

import pytest
import torch
from torch import nn

import graphmerge as gm

# Five samples, four output columns, tasks [0, 1] and [2, 3]. The joint argmax and the
# argmax within the sample's own task differ on purpose (comments: joint / within task).
LOGITS = [
    [5.0, 1.0, 0.0, 9.0],  # label 0: joint 3 (wrong), task [0, 1] -> 0 (right)
    [2.0, 1.0, 0.0, 0.0],  # label 1: joint 0 (wrong), task [0, 1] -> 0 (wrong)
    [0.0, 0.0, 3.0, 1.0],  # label 2: joint 2 (right), task [2, 3] -> 2 (right)
    [7.0, 0.0, 1.0, 2.0],  # label 3: joint 0 (wrong), task [2, 3] -> 3 (right)
    [0.0, 0.0, 1.0, 4.0],  # label 3: joint 3 (right), task [2, 3] -> 3 (right)
]
LABELS = [0, 1, 2, 3, 3]


class FixedLogits(nn.Module):
    """Input i (a float sample index) -> row i of a fixed logit table."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", torch.tensor(logits))

    def forward(self, x):
        return self.table[x.long()]


def loader(indices_per_batch, labels=LABELS):
    """A list of (inputs, targets) batches: inputs are sample indices into LOGITS."""
    return [
        (torch.tensor(batch, dtype=torch.float32), torch.tensor([labels[i] for i in batch]))
        for batch in indices_per_batch
    ]


# batch 1 holds only task 0's samples, batch 2 only task 1's: every task sees an empty batch
BATCHES = [[0, 1], [2, 3, 4]]


def cross_entropy_by_hand(logits, label):
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_joint_accuracy_loss_and_sample_count():
    metrics = gm.evaluation.evaluate(FixedLogits(LOGITS), loader(BATCHES))
    assert set(metrics) == {"accuracy", "loss", "num_samples"}
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    expected_loss = (
        sum(cross_entropy_by_hand(r, y) for r, y in zip(LOGITS, LABELS, strict=True)) / 5
    )
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["num_samples"] == 5


@pytest.mark.parametrize(
    "tasks",
    [
        [[0, 1], [2, 3]],
        [range(2), range(2, 4)],
        [[1, 0], [3, 2]],  # column order within a task does not matter
    ],
)
def test_task_accuracy_takes_the_argmax_within_each_task(tasks):
    metrics = gm.evaluation.evaluate(FixedLogits(LOGITS), loader(BATCHES), tasks=tasks)
    assert metrics["accuracy"] == pytest.approx(2 / 5)  # the joint accuracy is unchanged
    assert metrics["task_accuracy"] == pytest.approx([1 / 2, 3 / 3])
    assert metrics["mean_task_accuracy"] == pytest.approx((1 / 2 + 1) / 2)


def test_task_order_sets_the_order_of_task_accuracies():
    metrics = gm.evaluation.evaluate(FixedLogits(LOGITS), loader(BATCHES), tasks=[[3, 2], [0, 1]])
    assert metrics["task_accuracy"] == pytest.approx([1.0, 0.5])


def test_samples_outside_every_task_count_only_for_the_joint_accuracy():
    # labels 2 and 3 only in task [2, 3]; task [0] sees sample 0; sample 1 (label 1) is in none
    metrics = gm.evaluation.evaluate(FixedLogits(LOGITS), loader(BATCHES), tasks=[[0], [2, 3]])
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    # a one-column task is always right on its own samples
    assert metrics["task_accuracy"] == pytest.approx([1.0, 1.0])


def test_a_linear_model_in_training_mode_is_evaluated_and_its_mode_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.9))
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    model.train()
    metrics = gm.evaluation.evaluate(model, [(x[:25], y[:25]), (x[25:], y[25:])])
    assert model.training and model[1].training
    with torch.no_grad():
        logits = model[0](x)  # dropout off in eval mode
    assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert metrics["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5
    )


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([], "tasks must be a non-empty list of non-empty lists"),
        ([[0, 1], []], "tasks must be a non-empty list of non-empty lists"),
        ([[0, 1], [1, 2]], "tasks must not share output columns"),
        ([[0, 0], [2, 3]], "tasks must not share output columns"),
        ([[-1, 0], [2, 3]], "task columns must be >= 0, got -1"),
        ([[0, 1], [2, 3, 4]], "task 1 names output column 4 but the model has 4 outputs"),
    ],
)
def test_bad_tasks_get_clear_errors(tasks, message):
    with pytest.raises(ValueError, match=message):
        gm.evaluation.evaluate(FixedLogits(LOGITS), loader(BATCHES), tasks=tasks)


def test_a_task_without_samples_is_an_error():
    only_first_task = loader([[0, 1]])
    with pytest.raises(ValueError, match=r"task\(s\) \[1\] have no samples in the loader"):
        gm.evaluation.evaluate(FixedLogits(LOGITS), only_first_task, tasks=[[0, 1], [2, 3]])


def test_bad_loaders_and_outputs_get_clear_errors():
    model = FixedLogits(LOGITS)
    with pytest.raises(ValueError, match="the loader yielded no samples"):
        gm.evaluation.evaluate(model, [])
    with pytest.raises(ValueError, match=r"needs a loader of \(inputs, targets\) pairs"):
        gm.evaluation.evaluate(model, [torch.zeros(2)])
    with pytest.raises(ValueError, match=r"labels range over 0\.\.7 but the model has 4 outputs"):
        gm.evaluation.evaluate(model, [(torch.tensor([0.0, 1.0]), torch.tensor([0, 7]))])
    broken = FixedLogits([[float("nan"), 0.0, 0.0, 0.0]])
    with pytest.raises(FloatingPointError, match="NaN or Inf outputs"):
        gm.evaluation.evaluate(broken, [(torch.tensor([0.0]), torch.tensor([0]))])
