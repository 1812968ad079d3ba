"""The comparison harness: baselines, the method x normalization x scope grid, per-task
columns, CSV and text output, width sweeps, TaskSubset; and the reference cache that
lets REPAIR / RESCALE of several merges read the source models' statistics once."""

import csv
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import train_pair

import graphmerge as gm
from graphmerge.comparison import Comparison, Scope, TaskSubset, compare, width_sweep, write_csv
from graphmerge.normalization import ReferenceCache, renormalize

TASKS = [range(5), range(5, 10)]


def fixed_order(data):
    return torch.utils.data.DataLoader(data.train.dataset, batch_size=256, shuffle=False)


@pytest.fixture(scope="module")
def same_task(digits_flat):
    """Two digit MLPs (hidden 16, 16) from seeds 0 and 1 and a Merger with their statistics."""
    models = train_pair("mlp", {"hidden": (16, 16)}, [digits_flat] * 2, epochs=3, lr=0.1)
    fixed = fixed_order(digits_flat)
    merger = gm.Merger(models, example_input=next(iter(fixed))[0], progress=False)
    merger.collect(fixed)
    return digits_flat, models, merger, fixed


@pytest.fixture(scope="module")
def disjoint(digits_flat):
    """MLPs for digits 0-4 and 5-9 (5 outputs each) and a Merger on all ten digits."""
    halves = [gm.data.digits(classes=classes) for classes in ("0-4", "5-9")]
    models = train_pair("mlp", {"hidden": (16, 16)}, halves, epochs=3, lr=0.1)
    fixed = fixed_order(digits_flat)
    merger = gm.Merger(models, example_input=next(iter(fixed))[0], progress=False)
    merger.collect(fixed)
    return digits_flat, halves, models, merger, fixed


def metrics_by_hand(logits_of, loader):
    """Accuracy and mean cross-entropy of ``logits_of(x)`` over the loader."""
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = logits_of(x)
            correct += (logits.argmax(1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            count += len(y)
    return correct / count, loss / count


def expected_width(merger, first, last):
    """Sum over mergeable spaces: d where merged ([first, last)), N * d where kept apart."""
    count = len(merger.models)
    return sum(
        space.width if first <= index < last else count * space.width
        for index, space in enumerate(merger.spaces)
    )


def test_baselines_are_the_models_and_the_ensemble(same_task):
    data, models, merger, _ = same_task
    table = compare(merger, data.test, ["permute"], progress=False)
    assert [row["name"] for row in table.rows] == ["model 0", "model 1", "ensemble", "permute"]
    assert [row["kind"] for row in table.rows] == ["model", "model", "ensemble", "merge"]
    for model, row in zip(models, table.rows[:2], strict=True):
        accuracy, loss = metrics_by_hand(model.eval(), data.test)
        assert row["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert row["loss"] == pytest.approx(loss, abs=1e-6)
        assert row["merged_width"] is None and row["seconds"] is None
    accuracy, loss = metrics_by_hand(lambda x: (models[0](x) + models[1](x)) / 2, data.test)
    assert table.rows[2]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert table.rows[2]["loss"] == pytest.approx(loss, abs=1e-6)
    assert table.merges() == table.rows[3:]
    assert [row["name"] for row in compare(merger, data.test, ["permute"], baselines=False,
                                           progress=False).rows] == ["permute"]  # fmt: skip


def test_one_row_per_method_scope_and_normalization_in_order(same_task):
    data, _, merger, fixed = same_task
    scopes = [Scope(), Scope(stop_at=1)]
    table = compare(
        merger, data.test, ["identity", "permute"], [None, "repair"], scopes, loader=fixed,
        progress=False,
    )  # fmt: skip
    assert [row["name"] for row in table.merges()] == [
        "identity", "identity + repair", "identity (stop_at=1)", "identity + repair (stop_at=1)",
        "permute", "permute + repair", "permute (stop_at=1)", "permute + repair (stop_at=1)",
    ]  # fmt: skip
    grid = [(m, s, n) for m in ("identity", "permute") for s in scopes for n in (None, "repair")]
    for row, (method, scope, normalize) in zip(table.merges(), grid, strict=True):
        assert row["method"] == method and row["normalize"] == (normalize or "none")
        assert (row["start_at"], row["stop_at"]) == (scope.start_at, scope.stop_at)
        assert row["hparams"] == ""
        first, last = merger.scope(scope.start_at, scope.stop_at)
        assert row["merged_width"] == expected_width(merger, first, last)
        result = merger.merge(method, stop_at=scope.stop_at, normalize=normalize, loader=fixed)
        metrics = gm.evaluation.evaluate(result.model, data.test)
        assert row["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-12), row["name"]
        assert row["loss"] == pytest.approx(metrics["loss"], abs=1e-6), row["name"]
        parts = [row["seconds_matching"], row["seconds_fold"], row["seconds_normalize"] or 0.0]
        assert row["seconds"] == pytest.approx(sum(parts))
        assert (row["seconds_normalize"] is None) == (normalize is None)
    assert [row["merged_width"] for row in table.merges()[:4]] == [32, 32, 48, 48]


def test_merged_width_is_the_sum_over_spaces_and_nothing_merged_is_the_ensemble(same_task):
    data, _, merger, _ = same_task
    count = len(merger.spaces)
    total = sum(space.width for space in merger.spaces)
    scopes = [
        Scope(start_at=count),
        Scope(stop_at=0),
        Scope(start_at=1),
        Scope(start_at="layers.fc2"),
    ]
    table = compare(merger, data.test, ["permute", "zip"], scopes=scopes, progress=False,
                    hparams={"zip": {"merged_width": 24}})  # fmt: skip
    widths = {row["name"]: row["merged_width"] for row in table.merges()}
    assert widths == {
        "permute (start_at=2)": 2 * total, "permute (stop_at=0)": 2 * total,
        "permute (start_at=1)": 16 + 2 * 16, "permute (start_at=layers.fc2)": 16 + 2 * 16,
        "zip (start_at=2, merged_width=24)": 2 * total,
        "zip (stop_at=0, merged_width=24)": 2 * total,
        "zip (start_at=1, merged_width=24)": 2 * 16 + 24,
        "zip (start_at=layers.fc2, merged_width=24)": 2 * 16 + 24,
    }  # fmt: skip
    assert {row["hparams"] for row in table.merges() if row["method"] == "zip"} == {
        "merged_width=24"
    }
    ensemble = table.rows[2]
    for row in table.merges():
        if row["merged_width"] == 2 * total:
            assert row["accuracy"] == pytest.approx(ensemble["accuracy"], abs=1e-12), row["name"]
            assert row["loss"] == pytest.approx(ensemble["loss"], abs=1e-5), row["name"]


def test_tasks_and_joint_logits_add_per_task_columns(disjoint):
    data, halves, models, merger, _ = disjoint
    table = compare(merger, data.test, ["permute"], output="concat", tasks=TASKS, progress=False)
    names = [row["name"] for row in table.rows]
    assert names == ["model 0 (own task)", "model 1 (own task)", "ensemble", "permute"]
    own = [
        gm.evaluation.evaluate(model, half.test) for model, half in zip(models, halves, strict=True)
    ]
    for index in range(2):
        row = table.rows[index]
        assert row["accuracy"] == pytest.approx(own[index]["accuracy"], abs=1e-12)
        assert row["loss"] == pytest.approx(own[index]["loss"], abs=1e-6)
        assert row[f"task_{index}_accuracy"] == row["accuracy"]
    ensemble = table.rows[2]
    joint, _ = metrics_by_hand(lambda x: torch.cat([models[0](x), models[1](x)], dim=1), data.test)
    assert ensemble["accuracy"] == pytest.approx(joint, abs=1e-12)
    # within task i the concatenated ensemble predicts what model i predicts
    assert ensemble["task_0_accuracy"] == pytest.approx(own[0]["accuracy"], abs=1e-12)
    assert ensemble["task_1_accuracy"] == pytest.approx(own[1]["accuracy"], abs=1e-12)
    assert ensemble["mean_task_accuracy"] == pytest.approx(
        (own[0]["accuracy"] + own[1]["accuracy"]) / 2, abs=1e-12
    )
    merged = merger.merge("permute", output="concat").model
    expected = gm.evaluation.evaluate(merged, data.test, tasks=TASKS)
    row = table.rows[3]
    assert [row["task_0_accuracy"], row["task_1_accuracy"]] == pytest.approx(
        expected["task_accuracy"], abs=1e-12
    )
    assert row["mean_task_accuracy"] == pytest.approx(expected["mean_task_accuracy"], abs=1e-12)
    assert table.columns()[-2:] == ["task_0_accuracy", "task_1_accuracy"]
    text = table.format()
    assert "task avg" in text.splitlines()[0]
    assert f"{100 * ensemble['mean_task_accuracy']:.2f}%" in text.splitlines()[4]
    # joint logits without tasks: no per-model rows (a model covers half the labels)
    plain = compare(merger, data.test, ["permute"], output="concat", progress=False)
    assert [row["name"] for row in plain.rows] == ["ensemble", "permute"]
    assert plain.rows[0]["accuracy"] == pytest.approx(joint, abs=1e-12)
    assert plain.rows[0]["mean_task_accuracy"] is None and "task avg" not in plain.format()


def test_errors_come_before_any_merge(same_task, monkeypatch):
    data, models, merger, fixed = same_task

    def must_not_merge(*args, **kwargs):
        raise AssertionError("compare merged before checking its arguments")

    monkeypatch.setattr(merger, "merge", must_not_merge)
    cases = [
        ({"methods": ["permut"]}, ValueError, r"unknown matching function 'permut'"),
        ({"methods": "permute"}, ValueError, "methods must be a non-empty list"),
        ({"methods": []}, ValueError, "methods must be a non-empty list"),
        ({"normalizations": [None, "repiar"], "loader": fixed}, ValueError,
         r"unknown normalization 'repiar': choose one of reset, repair, rescale \(or None\)"),
        ({"normalizations": "repair", "loader": fixed}, ValueError,
         "normalizations must be a non-empty list"),
        ({"normalizations": [None, "repair"]}, ValueError,
         "normalizations need data: pass loader="),
        ({"hparams": {"zip": {"reduction": 0.5}}}, ValueError,
         "hparams given for methods not in the grid: zip"),
        ({"methods": ["cca"], "hparams": {"cca": {"alpha": 0.5}}}, ValueError,
         "'cca' has no hyper-parameter alpha"),
        ({"scopes": [Scope(), Scope(stop_at="layers.fc9")]}, ValueError,
         "stop_at='layers.fc9' is not a mergeable space"),
        ({"scopes": [Scope(start_at=3)]}, ValueError, "start_at=3 is out of range"),
        ({"scopes": [{"start_at": 1}]}, TypeError, "scopes must hold Scope objects, got a dict"),
        ({"output": "sum"}, ValueError, "output must be one of average, concat"),
    ]  # fmt: skip
    for options, error, message in cases:
        arguments = {"methods": ["permute"], **options}
        with pytest.raises(error, match=message):
            compare(merger, data.test, progress=False, **arguments)
    monkeypatch.undo()
    fresh = gm.Merger(models, example_input=next(iter(fixed))[0], progress=False)
    with pytest.raises(ValueError, match=r"holds no statistics: call merger.collect\(loader\)"):
        compare(fresh, data.test, ["weight_matching", "permute"], progress=False)
    data_free = compare(fresh, data.test, ["weight_matching"], progress=False)  # needs none
    assert [row["name"] for row in data_free.merges()] == ["weight_matching"]
    assert data_free.merges()[0]["merged_width"] == 32


def test_scope_resolves_indices_and_names(same_task):
    _, _, merger, _ = same_task
    assert merger.scope(None, None) == (0, 2)
    assert merger.scope(1, None) == (1, 2)
    assert merger.scope(None, "layers.fc2") == (0, 1)
    assert merger.scope("layers.fc2", 2) == (1, 2)
    assert merger.scope(2, 2) == (2, 2)  # nothing merged, as asked
    with pytest.raises(ValueError, match=r"start_at=2 \(space 2\) comes after stop_at=1"):
        merger.scope(2, 1)  # a reversed scope is a mistake, not an empty one
    with pytest.raises(ValueError, match=r"start_at=5 is out of range.*0\.\.2"):
        merger.scope(5, None)
    with pytest.raises(ValueError, match="stop_at='fc2' is not a mergeable space"):
        merger.scope(None, "fc2")
    assert Scope().label == "" and Scope(start_at=1, stop_at="x").label == "start_at=1, stop_at=x"


def test_write_csv_and_format(same_task, tmp_path):
    data, _, merger, fixed = same_task
    table = compare(merger, data.test, ["identity", "permute"], [None, "rescale"], loader=fixed,
                    progress=False)  # fmt: skip
    path = tmp_path / "comparison.csv"
    table.write_csv(path)
    assert os.listdir(tmp_path) == ["comparison.csv"]
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == table.columns() == list(gm.comparison.COLUMNS)
        read = list(reader)
    assert len(read) == len(table.rows) == 7
    for written, row in zip(read, table.rows, strict=True):
        assert written["name"] == row["name"] and written["kind"] == row["kind"]
        assert float(written["accuracy"]) == row["accuracy"]
        assert float(written["loss"]) == row["loss"]
        assert written["merged_width"] == ("" if row["merged_width"] is None else "32")
        assert written["mean_task_accuracy"] == ""
    lines = table.format().splitlines()
    assert len(lines) == 2 + len(table.rows)
    assert lines[0].split() == ["name", "accuracy", "loss", "merge", "s"]
    assert set(lines[1]) == {"-", " "}
    for line, row in zip(lines[2:], table.rows, strict=True):
        assert line.startswith(row["name"] + " ")
        assert f"{100 * row['accuracy']:.2f}%" in line and f"{row['loss']:.4f}" in line


def test_write_csv_of_plain_rows(tmp_path):
    rows = [{"a": 1, "b": 0.5}, {"b": 2, "c": "x"}]
    write_csv(rows, tmp_path / "default.csv")
    assert (tmp_path / "default.csv").read_text() == "a,b,c\n1,0.5,\n,2,x\n"
    write_csv(rows, tmp_path / "chosen.csv", columns=["c", "b", "a"])
    assert (tmp_path / "chosen.csv").read_text() == "c,b,a\n,0.5,1\nx,2,\n"
    with pytest.raises(ValueError, match="rows hold keys not among the columns: a, c"):
        write_csv(rows, tmp_path / "partial.csv", columns=["b"])
    assert not (tmp_path / "partial.csv").exists()
    Comparison(rows=[]).write_csv(tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text().startswith("name,kind,method,")


def test_width_sweep(same_task):
    data, _, merger, _ = same_task
    sweep = width_sweep(merger, data.test, reductions=(0.0, 0.25, 0.5), progress=False)
    assert [row.get("series") for row in sweep.rows] == [
        None, *["stop_at"] * 3, *["start_at"] * 3, *["zip reduction"] * 3,
    ]  # fmt: skip
    ensemble, rows = sweep.rows[0], sweep.rows[1:]
    assert ensemble["kind"] == "ensemble"
    by_series = {s: [r for r in rows if r["series"] == s] for s in ("stop_at", "start_at")}
    assert [r["stop_at"] for r in by_series["stop_at"]] == [0, 1, 2]
    assert [r["start_at"] for r in by_series["start_at"]] == [0, 1, 2]
    assert [r["merged_width"] for r in by_series["stop_at"]] == [64, 48, 32]
    assert [r["merged_width"] for r in by_series["start_at"]] == [32, 48, 64]
    zipped = rows[6:]
    assert [r["hparams"] for r in zipped] == ["reduction=0.0", "reduction=0.25", "reduction=0.5"]
    assert [r["name"] for r in zipped] == [f"zip ({r['hparams']})" for r in zipped]
    assert [r["merged_width"] for r in zipped] == [64, 48, 32]
    nothing_merged = [by_series["stop_at"][0], by_series["start_at"][2], zipped[0]]
    for row in nothing_merged:
        assert row["accuracy"] == pytest.approx(ensemble["accuracy"], abs=1e-12), row
        assert row["loss"] == pytest.approx(ensemble["loss"], abs=1e-5), row
    full = merger.merge("zip").model  # stop_at=2, start_at=0 and reduction 0.5: full zip
    expected = gm.evaluation.evaluate(full, data.test)
    for row in (by_series["stop_at"][2], by_series["start_at"][0], zipped[2]):
        assert row["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12), row
        assert row["loss"] == pytest.approx(expected["loss"], abs=1e-6), row


def test_task_subset_keeps_one_task_and_renumbers_its_labels():
    x = torch.arange(16.0).reshape(8, 2)
    loader = [
        (x[0:4], torch.tensor([0, 5, 7, 2])),
        (x[4:6], torch.tensor([5, 5])),
        (x[6:8], torch.tensor([1, 3])),  # no sample of the task: skipped
    ]
    subset = TaskSubset(loader, [7, 5])  # labels numbered in the order of the columns
    batches = list(subset)
    assert len(batches) == 2
    assert torch.equal(batches[0][0], x[1:3]) and batches[0][1].tolist() == [1, 0]
    assert torch.equal(batches[1][0], x[4:6]) and batches[1][1].tolist() == [1, 1]
    assert len(list(subset)) == 2  # re-iterable


def test_task_subset_of_the_digits_is_the_digits_of_that_task(digits_flat):
    upper = gm.data.digits(classes="5-9")
    batches = list(TaskSubset(digits_flat.test, range(5, 10)))
    inputs = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    expected_inputs, expected_labels = upper.test.dataset.tensors
    assert torch.equal(inputs, expected_inputs)
    assert torch.equal(labels, expected_labels)
    assert set(labels.tolist()) == set(range(5))


# The reference cache: REPAIR / RESCALE of several merges read the sources once


def passes(result):
    return result.details["normalization"].passes


def test_second_repair_on_the_same_loader_reuses_the_reference_statistics(same_task):
    data, models, _, fixed = same_task
    example = next(iter(fixed))[0]
    merger = gm.Merger(models, example_input=example, progress=False)
    merger.collect(fixed)
    first = merger.merge("permute", normalize="repair", loader=fixed)
    levels = {item.point.level for item in first.details["normalization"].points}
    assert passes(first) == 1 + len(levels)  # the references, then one pass per level
    second = merger.merge("permute", weights=0.3, normalize="repair", loader=fixed)
    assert passes(second) == passes(first) - 1
    # RESCALE reads the same reference moments (identity, like permute, matches unit to unit)
    rescaled = merger.merge("identity", normalize="rescale", loader=fixed)
    assert passes(rescaled) == passes(first) - 1
    other_loader = fixed_order(data)  # another loader object: read again
    assert passes(merger.merge("permute", normalize="repair", loader=other_loader)) == passes(first)
    for cached, method, options in (
        (second, "permute", {"weights": 0.3}),
        (rescaled, "identity", {}),
    ):
        fresh = gm.Merger(models, example_input=example, progress=False)  # an empty cache
        fresh.statistics = merger.statistics
        uncached = fresh.merge(method, normalize=cached.normalize, loader=fixed, **options)
        assert passes(uncached) == passes(first)
        ours, theirs = cached.model.state_dict(), uncached.model.state_dict()
        for key in ours:
            assert torch.allclose(ours[key], theirs[key], atol=1e-6, rtol=0), (method, key)


def test_reference_cache_used_directly(same_task):
    _, models, merger, fixed = same_task
    result = merger.merge("permute")
    cache = ReferenceCache()
    options = {"matches": result.matches, "progress": False}
    first = renormalize(result.model, models, fixed, result.graph, reference_cache=cache, **options)
    again = renormalize(result.model, models, fixed, result.graph, reference_cache=cache, **options)
    alone = renormalize(result.model, models, fixed, result.graph, **options)
    assert again.passes == first.passes - 1 and alone.passes == first.passes
    for report in (again, alone):
        for key, value in first.model.state_dict().items():
            assert torch.allclose(report.model.state_dict()[key], value, atol=1e-6, rtol=0), key
    limited = renormalize(result.model, models, fixed, result.graph, reference_cache=cache,
                          max_batches=2, **options)  # fmt: skip
    assert limited.passes == first.passes  # other limits: other statistics


def test_width_sweep_budgets_compare_permute_zip_and_pleas(same_task):
    data, _, merger, fixed = same_task
    sweep = width_sweep(
        merger, data.test, reductions=(), loader=fixed, budgets=(1.0, 1.5), progress=False
    )
    rows = [row for row in sweep.rows if "budget" in row]
    assert [(r["series"], r["budget"]) for r in rows] == [
        ("permute budget", 1.0), ("zip budget", 1.0), ("pleas budget", 1.0),
        ("permute budget", 1.5), ("zip budget", 1.5), ("pleas budget", 1.5),
    ]  # fmt: skip
    assert [r["merged_width"] for r in rows] == [32, 32, 32, 48, 48, 48]
    permuted = gm.evaluation.evaluate(merger.merge("permute").model, data.test)
    assert rows[0]["accuracy"] == pytest.approx(permuted["accuracy"], abs=1e-12)
    # The least squares fit the merged layers to the sources' merged outputs: lower loss.
    assert rows[2]["loss"] < rows[0]["loss"] and rows[5]["loss"] < rows[3]["loss"]


def test_methods_that_read_the_data_get_the_loader(same_task):
    data, _, merger, fixed = same_task
    table = compare(
        merger, data.test, ["pleas", "ste"], [None, "repair"], loader=fixed,
        hparams={"pleas": {"budget": 1.25}, "ste": {"steps": 2}}, baselines=False,
        progress=False,
    )  # fmt: skip
    assert [(r["method"], r["normalize"]) for r in table.rows] == [
        ("pleas", "none"), ("pleas", "repair"), ("ste", "none"), ("ste", "repair"),
    ]  # fmt: skip
    pleas = merger.merge("pleas", budget=1.25, loader=fixed)
    repaired = merger.normalized(pleas, "repair", fixed)
    expected = gm.evaluation.evaluate(repaired.model, data.test)
    assert table.rows[1]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    with pytest.raises(ValueError, match="read the data themselves: pass loader="):
        compare(merger, data.test, ["pleas"], progress=False)
