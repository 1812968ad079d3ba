"""The demo (reduced): tables printed, CSV and PNG files written, barriers ordered."""

import csv

from graphmerge.cli import main


def test_quick_demo_prints_tables_and_writes_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for title in ("same task", "BatchNorm", "disjoint tasks"):
        assert title in printed
    expected = [
        "comparison.csv", "curves.csv", "width.csv", "curves_same_task.png",
        "curves_batchnorm.png", "comparison_same_task.png", "comparison_batchnorm.png",
        "comparison_disjoint.png", "width_disjoint.png",
    ]  # fmt: skip
    for name in expected:
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes().startswith(b"\x89PNG")
    with open(out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    experiments = {row["experiment"] for row in rows}
    assert experiments == {"same_task", "batchnorm", "disjoint"}
    methods = {row["method"] for row in rows if row["kind"] == "merge"}
    assert methods == {
        "identity", "permute", "zip", "cca", "weight_matching", "preserve_first", "pleas",
        "ot_fusion", "ste",
    }  # fmt: skip
    normalizations = {row["normalize"] for row in rows if row["kind"] == "merge"}
    assert normalizations == {"none", "reset", "repair", "rescale"}
    disjoint = [row for row in rows if row["experiment"] == "disjoint" and row["kind"] == "merge"]
    assert all(row["task_0_accuracy"] and row["task_1_accuracy"] for row in disjoint)
    with open(out / "width.csv") as handle:
        width = [row for row in csv.DictReader(handle) if row.get("budget")]
    series = {row["series"] for row in width}
    assert series == {"permute budget", "zip budget", "pleas budget"}
    assert {float(row["budget"]) for row in width} == {1.0, 1.25, 1.5, 2.0}
    with open(out / "curves.csv") as handle:
        curves = list(csv.DictReader(handle))
    barrier = {}
    for method in ("identity", "permute"):
        points = [
            row for row in curves
            if row["experiment"] == "same_task" and row["method"] == method
            and row["normalize"] == "none"
        ]  # fmt: skip
        losses = [float(row["loss"]) for row in points]
        alphas = [float(row["alpha"]) for row in points]
        barrier[method] = max(
            loss - ((1 - a) * losses[0] + a * losses[-1])
            for a, loss in zip(alphas, losses, strict=True)
        )
    assert barrier["identity"] > 2 * barrier["permute"]
    assert "identity" in printed and "loss barrier" in printed


def test_demo_refuses_an_output_inside_a_missing_folder(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path / "no" / "demo")]) == 2
    assert "does not exist" in capsys.readouterr().err
