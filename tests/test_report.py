"""The run report: the OOD table's numbers, linked or embedded PNGs that decode, notes on what is missing."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_figures import METHODS, OOD_SETS, assert_png, make_run

from fimcb.evaluation.ood import MEASURES
from fimcb.run.folder import ARTIFACTS
from fimcb.viz.report import MISSING_NOTES, build_report, main

REPO = Path(__file__).resolve().parents[1]


def _table_rows(report: str) -> dict[tuple[str, str], list[str]]:
    """The markdown OOD table as {(OOD set, method): cells}, bold markers kept."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) == 2 + len(MEASURES) and cells[0] in OOD_SETS:
            rows[(cells[0], cells[1].strip("*"))] = cells
    return rows


def test_markdown_report_has_the_ood_table_and_links_to_pngs_that_exist(tmp_path: Path) -> None:
    written = make_run(tmp_path / "run")
    path = build_report(tmp_path / "run")
    assert path == tmp_path / "run" / "report" / "report.md"
    report = path.read_text()
    assert "Model: fimcb.models.VAE. Data: fimcb.data.ImageDataModule." in report
    rows = _table_rows(report)
    assert set(rows) == {(o, m) for o in OOD_SETS for m in METHODS}
    for ood, by_method in written["ood_metrics"].items():
        for metric_index, metric in enumerate(MEASURES):
            values = {m: by_method[m][metric] for m in METHODS}
            best = (min if metric == "fpr95" else max)(values.values())
            for method, value in values.items():
                cell = rows[(ood, method)][2 + metric_index]
                assert cell.strip("*") == f"{value:.4f}"
                assert cell.startswith("**") == (value == best), (ood, method, metric)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) == 11 and "influence.png" in links and "roc_curves.png" in links
    for link in links:
        assert_png(path.parent / link)
    assert "Note:" not in report  # nothing is missing
    assert "test, most novel: #0 (9), #3 (8), #6 (7), #9 (6)" in report


def test_html_report_is_one_file_with_embedded_pngs(tmp_path: Path) -> None:
    written = make_run(tmp_path)
    path = build_report(tmp_path, tmp_path / "out" / "run.html", fmt="html")
    assert path == tmp_path / "out" / "run.html" and sorted(p.name for p in path.parent.iterdir()) == [
        "run.html"
    ]
    page = path.read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 11 and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        assert len(set(image.convert("L").getdata())) > 1  # not blank
    auroc = written["ood_metrics"]["noise"]["fim_gaussian"]["auroc"]
    assert re.search(rf"<td>(<b>)?{auroc:.4f}(</b>)?</td>", page) and "<table>" in page


@pytest.mark.parametrize(
    "present", [("history",), ("ood_metrics.json",), ("novel_samples.pt", "metrics.csv")]
)
def test_missing_artifacts_give_a_note_each_not_a_crash(tmp_path: Path, present: tuple[str, ...]) -> None:
    make_run(tmp_path, present, tokens=True, influence=False)
    for fmt in ("md", "html"):
        report = build_report(tmp_path, fmt=fmt).read_text()
        for artifact in ARTIFACTS:
            note = MISSING_NOTES[artifact].split(":")[0].replace("`", "")  # e.g. "no history/"
            shown = note in re.sub(r"</?code>|`", "", report)
            assert shown == (artifact not in present), (fmt, artifact)
    report = (tmp_path / "report" / "report.md").read_text()
    if "ood_metrics.json" in present:
        assert len(_table_rows(report)) == len(OOD_SETS) * len(METHODS)
    if "novel_samples.pt" in present:
        assert "novel_samples.pt holds no influence queries" in report
        assert "![novel_samples_most](novel_samples_most.png)" in report


def test_cli_main_writes_the_report_and_prints_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make_run(tmp_path / "run", ("ood_metrics.json",))
    assert main(["report", str(tmp_path / "run"), "--format", "html", "--out", str(tmp_path / "site")]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "site" / "report.html") and Path(printed).is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "none of the run artifacts" in capsys.readouterr().err


def test_python_dash_m_runs_the_report(tmp_path: Path) -> None:
    make_run(tmp_path, ("metrics.csv",))
    done = subprocess.run(
        [sys.executable, "-m", "fimcb.viz.report", str(tmp_path), "--out", str(tmp_path / "r.md")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "r.md")
    assert "![training_curves](training_curves.png)" in (tmp_path / "r.md").read_text()
    assert_png(tmp_path / "training_curves.png")
