"""A one-page report of a finished run, and the ``fimcb`` command line (``fimcb report RUN_DIR``).

The report gathers what the run folder holds (see :mod:`fimcb.run.folder`): the model and data
classes from ``config.yaml``, the OOD metrics as a table with the best value per OOD set in bold,
every figure the artifacts allow, the most novel samples and the influence queries, and a note for
each missing artifact saying what it would have added. Markdown writes the PNGs beside the report;
HTML is one self-contained file with the PNGs embedded.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from fimcb.evaluation.ood import MEASURES, OODTable
from fimcb.run.folder import (
    HISTORY,
    METRICS_CSV,
    NOVEL_SAMPLES,
    OOD_METRICS,
    OOD_SCORES,
    RunArtifacts,
    RunDirectoryError,
    load_run,
)
from fimcb.viz.figures import png_bytes, run_figures, write_figures

FORMATS = ("md", "html")
CONFIG = "config.yaml"
METRIC_HEADERS = {"auroc": "AUROC ↑", "aupr_in": "AUPR-In ↑", "aupr_out": "AUPR-Out ↑", "fpr95": "FPR@95 ↓"}
LOWER_IS_BETTER = frozenset({"fpr95"})
#: What each missing artifact would have added, and what writes it.
MISSING_NOTES = {
    HISTORY: "no `history/`: no FIM-norm over training (FIMNormCallback(history=True) writes it).",
    METRICS_CSV: "no `metrics.csv`: no training curves (log with Lightning's CSVLogger).",
    OOD_METRICS: "no `ood_metrics.json`: no OOD table (FIMNormCallback's evaluation writes it).",
    OOD_SCORES: "no `ood_scores.pt`: no ROC curves or score histograms.",
    NOVEL_SAMPLES: "no `novel_samples.pt`: no most or least novel samples, no influence.",
}


@dataclass(frozen=True)
class _Heading:
    text: str
    level: int


@dataclass(frozen=True)
class _Text:
    text: str
    note: bool = False  # a remark about what is missing, set apart from the content


@dataclass(frozen=True)
class _Table:
    header: list[str]
    rows: list[list[tuple[str, bool]]]  # (text, bold) per cell


@dataclass(frozen=True)
class _Image:
    name: str
    figure: Figure


_Block = _Heading | _Text | _Table | _Image


def build_report(run_dir: str | Path, out: str | Path | None = None, fmt: str = "md") -> Path:
    """Write the report of ``run_dir`` as ``fmt`` (``"md"`` or ``"html"``) to ``out`` (a file, or a folder
    to put ``report.<fmt>`` in: an existing one or a name without suffix; default
    ``<run_dir>/report/report.<fmt>``) and return its path."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    run = load_run(run_dir)
    path = Path(out) if out is not None else run.directory / "report"
    if out is None or path.is_dir() or not path.suffix:
        path = path / f"report.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = _blocks(run, run_figures(run))
    path.write_text(_markdown(blocks, path.parent) if fmt == "md" else _html(blocks, run.directory))
    return path


# ---- content -------------------------------------------------------------------------------


def _blocks(run: RunArtifacts, figures: dict[str, Figure]) -> list[_Block]:
    blocks: list[_Block] = [_Heading(f"fimcb report: {run.directory}", 1), *_summary(run)]

    def section(title: str, needs: Sequence[str], names: Sequence[str], extra: Sequence[_Block] = ()) -> None:
        blocks.append(_Heading(title, 2))
        blocks.extend(_Text(MISSING_NOTES[a], note=True) for a in needs if a in run.missing)
        blocks.extend(extra)
        blocks.extend(_Image(n, figures[n]) for n in names if n in figures)

    section("Training", [METRICS_CSV], ["training_curves", "training_dynamics"], _unused_csv(run, figures))
    history = [n for n in figures if n == "novelty_over_time" or n.startswith("layer_heatmap_")]
    section("FIM-norm over training", [HISTORY], history)
    histograms = [n for n in figures if n.startswith("score_histograms_")]
    section(
        "OOD detection", [OOD_METRICS, OOD_SCORES], ["roc_curves", *histograms], _ood_table(run.ood_table)
    )
    section("Novel samples", [NOVEL_SAMPLES], ["novel_samples_most", "novel_samples_least"], _ranking(run))
    if run.novel_samples is not None:  # else the note above says there is none
        section("Influence", [], ["influence"], _influence_note(run))
    return blocks


def _summary(run: RunArtifacts) -> list[_Block]:
    config_path = run.directory / CONFIG
    if not config_path.is_file():
        return [_Text(f"no `{CONFIG}`: model and data unknown (LightningCLI writes it).", note=True)]
    config = yaml.safe_load(config_path.read_text()) or {}

    def class_of(key: str) -> str:
        entry = config.get(key)
        return entry.get("class_path", "?") if isinstance(entry, dict) else "?"

    return [_Text(f"Model: {class_of('model')}. Data: {class_of('data')}.")]


def _unused_csv(run: RunArtifacts, figures: dict[str, Figure]) -> list[_Block]:
    if run.metrics is not None and "training_curves" not in figures:
        return [_Text("metrics.csv holds no `<split>/<quantity>` column (e.g. val/nll) to draw.", note=True)]
    return []


def _ood_table(metrics: OODTable | None) -> list[_Block]:
    """The OOD metrics, one row per (OOD set, method); per OOD set the best value of each metric in bold
    (the lowest FPR@95, the highest of the others) and the method with the best AUROC in bold."""
    if metrics is None:
        return []
    rows = []
    for ood, by_method in metrics.items():
        best = {m: _best([v.get(m, math.nan) for v in by_method.values()], m) for m in MEASURES}
        for method, values in by_method.items():
            cells = [(ood, False), (method, values.get("auroc") == best["auroc"])]
            for m in MEASURES:
                value = values.get(m, math.nan)
                cells.append((f"{value:.4f}" if m in values else "n/a", value == best[m]))
            rows.append(cells)
    header = ["OOD set", "method", *(METRIC_HEADERS[m] for m in MEASURES)]
    return [
        _Text("OOD = positive class; scores oriented higher = more novel; best per OOD set in bold."),
        _Table(header, rows),
    ]


def _best(values: list[float], metric: str) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan  # equal to nothing: no bold
    return min(finite) if metric in LOWER_IS_BETTER else max(finite)


def _ranking(run: RunArtifacts) -> list[_Block]:
    """Per set, the sample indices and scores of the most novel samples (readable where images are not)."""
    if run.novel_samples is None:
        return []
    blocks: list[_Block] = [_Text(f"Ranked by {run.novel_samples.get('method', 'an unnamed detector')}.")]
    for name, entry in run.novel_samples.get("sets", {}).items():
        most = entry.get("most", {})
        pairs = zip(most.get("index", []), most.get("score", []), strict=True)
        blocks.append(
            _Text(f"{name}, most novel: " + ", ".join(f"#{int(i)} ({float(s):.4g})" for i, s in pairs))
        )
    return blocks


def _influence_note(run: RunArtifacts) -> list[_Block]:
    influence = run.novel_samples.get("influence") if run.novel_samples is not None else None
    if not influence:
        return [_Text("novel_samples.pt holds no influence queries.", note=True)]
    return [
        _Text(f"Training samples by their {influence.get('metric', 'FIM')} inner product with each query.")
    ]


# ---- rendering -----------------------------------------------------------------------------


def _markdown(blocks: Sequence[_Block], folder: Path) -> str:
    """Markdown, with each figure written as a PNG into ``folder`` and linked by its relative name."""
    lines = []
    for block in blocks:
        if isinstance(block, _Heading):
            lines.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, _Text):
            lines.append(f"> Note: {block.text}" if block.note else block.text)
        elif isinstance(block, _Table):
            lines.append(_markdown_table(block))
        else:
            (path,) = write_figures({block.name: block.figure}, folder).values()
            lines.append(f"![{block.name}]({path.name})")
        lines.append("")
    return "\n".join(lines)


def _markdown_table(table: _Table) -> str:
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    body = [row([f"**{text}**" if bold else text for text, bold in cells]) for cells in table.rows]
    return "\n".join([row(table.header), row(["---"] * len(table.header)), *body])


def _html(blocks: Sequence[_Block], run_dir: Path) -> str:
    """One self-contained HTML page: figures embedded as base64 PNGs."""
    parts = []
    for block in blocks:
        if isinstance(block, _Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, _Text):
            cls = ' class="note"' if block.note else ""
            parts.append(f"<p{cls}>{'Note: ' if block.note else ''}{_inline_code(block.text)}</p>")
        elif isinstance(block, _Table):
            parts.append(_html_table(block))
        else:
            data = base64.b64encode(png_bytes(block.figure)).decode("ascii")
            parts.append(f'<img alt="{html.escape(block.name)}" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "img{max-width:100%;display:block;margin:1em 0}.note{color:#8a5a00}"
    )
    title = html.escape(f"fimcb report: {run_dir}")
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def _inline_code(text: str) -> str:
    """Escaped HTML, with markdown's `code` spans as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_table(table: _Table) -> str:
    def cell(text: str, bold: bool) -> str:
        text = html.escape(text)
        return f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"

    header = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(cell(*c) for c in cells) + "</tr>" for cells in table.rows)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


# ---- command line --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``fimcb report RUN_DIR [--format md|html] [--out PATH]``: write the report, print its path.

    A run directory that does not exist or holds no artifact ends with exit code 2 and the reason."""
    parser = argparse.ArgumentParser(prog="fimcb", description="fimcb tools for finished runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="write a one-page report of a run directory")
    report.add_argument("run_dir", type=Path, help="Lightning log directory, e.g. runs/<name>/version_0")
    report.add_argument("--format", choices=FORMATS, default="md", help="md (PNGs beside) or html (one file)")
    report.add_argument(
        "--out", type=Path, default=None, help="report file or folder (default RUN_DIR/report)"
    )
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dir, args.out, args.format)
    except RunDirectoryError as err:
        report.error(str(err))  # exits with code 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
