"""The report's ``--compare seed``: the seed's published rows beside the groups of the same model and
optimizer, the in/out-of-band marks, the groups and rows without a match, and the band on the plots."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image
from test_report import make_run

from train.report import (
    PLOTS,
    Reference,
    accuracy_figure,
    find_run_dirs,
    group_runs,
    inside_band,
    load_comparison,
    load_run,
    main,
)

RESNET50_SGD = ["train.arch=resnet50"]
RESNET50_ADAM = ["train.arch=resnet50", 'train.optim={name="adam", weight_decay=1e-4}', "train.lr=0.003"]
RESNET50_SAM_V1 = ["train.arch=resnet50", 'train.optim={name="sgd-sam", rho=0.05, v2=false}']
# Last evaluation of each run, (top-1, top-5), chosen against the seed's rows:
# SGD 77.3860 ± 0.1773 / 93.5580 ± 0.0675, Adam 76.0133 ± 0.1125 / 92.9093 ± 0.0571.
FINALS = {
    "r50-sgd": [(77.30, 93.40), (77.40, 93.45), (77.50, 93.50)],  # top-1 inside, top-5 outside (mean 93.45)
    "r50-adam": [(75.40, 92.88), (75.60, 92.92)],  # top-1 outside (mean 75.5), top-5 inside
    "r50-sam-v1": [(77.00, 93.00)],  # the seed's SAM-v1 row has no training time
    "r18-sgd": [(60.00, 85.00)],  # no ResNet-18 row in the seed's table
}
OVERRIDES = {"r50-sgd": RESNET50_SGD, "r50-adam": RESNET50_ADAM, "r50-sam-v1": RESNET50_SAM_V1, "r18-sgd": []}


@pytest.fixture(scope="module")
def compared_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compared")
    for name, finals in FINALS.items():
        for seed, (top1, top5) in enumerate(finals, start=1):
            run = make_run(root, f"{name}-s{seed}", OVERRIDES[name], seed)
            records = run["records"]
            records[-1].update(val_acc1=top1, val_acc5=top5)
            (run["path"] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def compared_report(compared_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("compared-report")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([str(compared_runs), "--out", str(out), "--compare", "seed"]) == 0
    return out, (out / "results.md").read_text(), stdout.getvalue()


def rows_of(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]


def cell(values, mark: str) -> str:
    values = np.array(values)
    spread = f" ± {2 * np.std(values, ddof=1):.4f}" if len(values) > 1 else ""
    return f"{values.mean():.4f}{spread} {mark}".rstrip()


def test_each_matching_group_has_the_seeds_row_under_it_and_marks_in_and_out(compared_report):
    _, text, stdout = compared_report
    rows = rows_of(text)
    labels = [row[2] for row in rows]
    assert labels == ["resnet18 SGD", "resnet50 Adam", "seed: resnet50 Adam", "resnet50 SAM-v1",
                      "seed: resnet50 SAM-v1", "resnet50 SGD", "seed: resnet50 SGD"]
    by_label = {row[2]: row for row in rows}
    sgd = FINALS["r50-sgd"]
    assert by_label["resnet50 SGD"][4] == cell([t1 for t1, _ in sgd], "✓")
    assert by_label["resnet50 SGD"][5] == cell([t5 for _, t5 in sgd], "✗")
    adam = FINALS["r50-adam"]
    assert by_label["resnet50 Adam"][4] == cell([t1 for t1, _ in adam], "✗")
    assert by_label["resnet50 Adam"][5] == cell([t5 for _, t5 in adam], "✓")
    # The published rows as published: epochs, steps, runs, mean ± 2σ, and "-" for a missing time.
    assert by_label["seed: resnet50 SGD"] == ["90", "112590", "seed: resnet50 SGD", "3", "77.3860 ± 0.1773",
                                              "93.5580 ± 0.0675", "5.1837 ± 0.0258"]
    assert by_label["seed: resnet50 Adam"][4:] == ["76.0133 ± 0.1125", "92.9093 ± 0.0571", "5.2771 ± 0.0026"]
    assert by_label["seed: resnet50 SAM-v1"][6] == "-"
    assert by_label["resnet50 SAM-v1"][4] == "77.0000 ✗"  # one run: the mean alone, still marked
    # Training times are shown, never marked; a group without a seed row gets no mark.
    assert not any(mark in row[6] for row in rows for mark in "✓✗")
    assert by_label["resnet18 SGD"][4:6] == ["60.0000", "85.0000"]
    assert rows_of(stdout) == rows  # the same table on the console


def test_the_output_says_what_matching_means_and_what_did_not_match(compared_report):
    _, text, stdout = compared_report
    for output in (text, " ".join(stdout.split())):  # the console wraps the long explanation
        assert ("compared with the seed's row of the same model (train.arch: resnet50) and optimizer "
                "(SGD, Adam, Schedule-Free SGD, SAM-v1, SAM-v2), whatever else differs") in output
        assert "no seed row for: resnet18 SGD" in output
        assert "seed rows with no runs here: resnet50 Schedule-Free SGD; resnet50 SAM-v2" in output
        # These runs train 3 epochs; the seed's 90: said, as it makes the comparison loose.
        assert "resnet50 SGD: 3 epochs, the seed's row 90: compared all the same" in output


def test_the_band_is_inclusive_and_symmetric():
    sgd = (77.3860, 0.1773)
    assert inside_band(77.3860, sgd) and inside_band(77.2087, sgd) and inside_band(77.5633, sgd)
    assert not inside_band(77.2086, sgd) and not inside_band(77.5634, sgd)


def test_the_seed_table_holds_the_five_published_rows():
    comparison = load_comparison("seed")
    assert [row.label for row in comparison.rows] == ["resnet50 SGD", "resnet50 Adam", "resnet50 Schedule-Free SGD",
                                                      "resnet50 SAM-v1", "resnet50 SAM-v2"]
    assert all((row.epochs, row.steps, row.runs) == (90, 112590, 3) for row in comparison.rows)
    assert comparison.rows[0] == Reference("resnet50", "SGD", 90, 112590, 3, (77.3860, 0.1773), (93.5580, 0.0675),
                                           (5.1837, 0.0258))


def reference_bands(axes) -> dict[str, tuple[float, float]]:
    """The published bands drawn on ``axes``: label -> (low, high) in accuracy units."""
    return {patch.get_gid().removeprefix("reference "): (patch.get_y(), patch.get_y() + patch.get_height())
            for patch in axes.patches if (patch.get_gid() or "").startswith("reference ")}


@pytest.mark.parametrize("metric, published", [("val_acc1", {"resnet50 SGD": (77.3860, 0.1773),
                                                             "resnet50 Adam": (76.0133, 0.1125)}),
                                               ("val_acc5", {"resnet50 SGD": (93.5580, 0.0675),
                                                             "resnet50 Adam": (92.9093, 0.0571)})])
def test_plots_draw_the_seeds_band_beside_each_matching_group(compared_runs, metric, published):
    groups = group_runs([load_run(path) for path in find_run_dirs([str(compared_runs)])])
    figure = accuracy_figure(groups, "step", metric, "Top-1", load_comparison("seed"))
    main_panel, zoom = figure.axes[:2]
    colours = {line.get_label().split("  (n=")[0]: line.get_color() for line in main_panel.get_lines()}
    for axes in (main_panel, zoom):
        bands = reference_bands(axes)
        assert set(bands) == {"resnet50 SGD", "resnet50 Adam", "resnet50 SAM-v1"}  # not resnet18: no seed row
        for label, (mean, two_sd) in published.items():
            assert bands[label] == pytest.approx((mean - two_sd, mean + two_sd))
        for patch in axes.patches:  # each band in the colour of its group's line
            if (patch.get_gid() or "").startswith("reference "):
                assert to_rgb(patch.get_facecolor()) == to_rgb(colours[patch.get_gid().removeprefix("reference ")])
    # The zoom shows every band and every compared group's end, large enough to tell in from out.
    low, high = zoom.get_ylim()
    assert low <= min(b[0] for b in reference_bands(zoom).values()) and high >= max(
        b[1] for b in reference_bands(zoom).values())
    assert high - low < 30


def test_plots_without_a_match_or_without_compare_have_no_band(compared_runs, tmp_path):
    groups = group_runs([load_run(path) for path in find_run_dirs([str(compared_runs)])])
    resnet18 = [g for g in groups if g.label == "resnet18 SGD"]
    assert len(accuracy_figure(resnet18, "step", "val_acc1", "Top-1", load_comparison("seed")).axes) == 1
    plain = accuracy_figure(groups, "time", "val_acc1", "Top-1")
    assert len(plain.axes) == 1 and not reference_bands(plain.axes[0])


def test_compared_pngs_are_written_and_referenced(compared_report):
    out, text, _ = compared_report
    for name in PLOTS:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > image.size[1] > 500
        assert f"![]({name})" in text


def test_an_unknown_table_is_refused(compared_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(compared_runs), "--out", str(tmp_path), "--compare", "timm"])
    assert exit_.value.code == 2 and "--compare: invalid choice: 'timm'" in capsys.readouterr().err
