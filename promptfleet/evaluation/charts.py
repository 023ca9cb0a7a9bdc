"""A report's charts as PNG data URIs, drawn with matplotlib (the `report` extra).

The Prefect UI shows `data:` images inside markdown artifacts (an inline <svg> is
stripped), and an offline page can hold them with no network. They are drawn for its dark
theme on a dark background of their own, so they read on a light page too, 850 px wide and
well under 200 KB each. Without matplotlib the report is tables only, and says how to get
the charts.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from promptfleet.evaluation import report_rows as rows

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from promptfleet.evaluation.report import Ranking, Report

INSTALL_HINT = "Charts need matplotlib: `pip install 'promptfleet[report]'`."
BACKGROUND, PANEL, TEXT, GRID, MUTED = "#16181f", "#1e212b", "#e6e8ef", "#3a3f4e", "#9aa0b0"
BEST, OTHERS = "#f5c542", ("#5eb1ff", "#56d6a6", "#ff8a65", "#c792ea", "#ffd166", "#80cbc4", "#f48fb1", "#aed581")
WIDTH_IN, DPI = 8.5, 100  # 850 px: the width of an artifact in the UI at 1400 px, so text is shown at its size
MAX_MODELS = 25  # more would be unreadable: the first 25 of the report's order are drawn
MAX_PANELS = 4  # rankings drawn in the score chart


@dataclass(frozen=True)
class Chart:
    name: str  # score, latency, cost
    title: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def load_library() -> None:
    if available():
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401


def _figure(rows: int) -> Figure:
    from matplotlib.figure import Figure

    height = min(14.0, max(2.8, 1.1 + 0.42 * rows))
    return Figure(figsize=(WIDTH_IN, height), dpi=DPI, facecolor=BACKGROUND, layout="constrained")


def _style(axes: Axes, title: str, xlabel: str) -> None:
    axes.set_facecolor(PANEL)
    axes.set_title(title, color=TEXT, fontsize=12, loc="left")
    axes.set_xlabel(xlabel, color=MUTED, fontsize=10)
    axes.tick_params(colors=TEXT, labelsize=10)
    axes.grid(axis="x", color=GRID, linewidth=0.6)
    axes.set_axisbelow(True)
    for spine in axes.spines.values():
        spine.set_color(GRID)


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer, metadata={"Software": None})
    return buffer.getvalue()


def _score_panel(axes: Axes, ranking: Ranking) -> None:
    scale = 100.0 if ranking.metric.proportion else 1.0
    scores = [s for s in ranking.scores if s.interval is not None][:MAX_MODELS][::-1]  # the best on top
    for y, score in enumerate(scores):
        iv = score.interval
        assert iv is not None
        low, high = (iv.mean if iv.low is None else iv.low), (iv.mean if iv.high is None else iv.high)
        colour = BEST if score.best else OTHERS[0]
        axes.errorbar([iv.mean * scale], [y], xerr=[[(iv.mean - low) * scale], [(high - iv.mean) * scale]], fmt="o",
                      color=colour, ecolor=colour, elinewidth=2.5, capsize=5, markersize=8)  # fmt: skip
    labels = [f"{s.model}  {rows.mean_interval(s.interval, ranking.metric.proportion)}" for s in scores]
    axes.set_yticks(range(len(scores)), labels)  # the same figures as the tables
    if ranking.metric.proportion:
        axes.set_xlim(-2, 102)
    unit = "% of answers" if ranking.metric.proportion else "mean score"
    _style(axes, f"{ranking.metric.label}", f"{unit}, with its 95% interval")


def score_chart(report: Report) -> Chart | None:
    rankings = [r for r in report.rankings if any(s.interval for s in r.scores)][:MAX_PANELS]
    if not rankings:
        return None
    models = min(MAX_MODELS, len(report.models))
    figure = _figure(models * len(rankings) + len(rankings))
    for axes, ranking in zip(figure.subplots(len(rankings), 1, squeeze=False).flat, rankings):
        _score_panel(axes, ranking)
    scored = sum(1 for r in report.rankings if any(s.interval for s in r.scores))
    more = f"; the first {len(rankings)} of {scored} judges and scorers" if scored > len(rankings) else ""
    figure.suptitle(f"Score by model (best in gold{more})", color=TEXT, fontsize=13, x=0.01, ha="left")
    return Chart("score", "Score by model, with 95% intervals", _png(figure))


def latency_chart(report: Report) -> Chart | None:
    models = [m.model for m in report.models if report.latencies.get(m.model)][:MAX_MODELS][::-1]
    if not models:
        return None
    figure = _figure(len(models))
    axes = figure.subplots()
    data = [report.latencies[m] for m in models]
    boxes = axes.boxplot(data, orientation="horizontal", whis=(5, 95), patch_artist=True, widths=0.55,
                         flierprops={"marker": ".", "markersize": 3, "markerfacecolor": MUTED, "markeredgecolor": MUTED})  # fmt: skip
    for n, patch in enumerate(boxes["boxes"]):
        patch.set(facecolor=OTHERS[n % len(OTHERS)], alpha=0.75, edgecolor=TEXT)
    for part in ("whiskers", "caps"):
        for line in boxes[part]:
            line.set(color=TEXT)
    for line in boxes["medians"]:
        line.set(color=BACKGROUND, linewidth=2)
    axes.set_yticks(range(1, len(models) + 1), models)
    values = [v for points in data for v in points if v > 0]
    if values and max(values) / min(values) > 50:
        axes.set_xscale("log")
    _style(axes, "Latency per answer", "seconds (box: middle half, line: median, whiskers: 5th to 95th percentile)")
    return Chart("latency", "Latency per model", _png(figure))


def _spend(report: Report) -> tuple[dict[str, float], str]:
    """Cost per 1,000 answers when an answer cost anything, else output tokens per answer."""
    models = report.models[:MAX_MODELS]
    if any(m.cost_usd for m in models):
        return {m.model: 1000 * (m.cost_usd or 0.0) / max(m.answered, 1) for m in models}, "cost per 1,000 answers (USD)"
    why = "the answers cost nothing" if all(m.cost_usd is not None for m in models) else "no prices known"
    return {m.model: m.output_tokens / max(m.answered, 1) for m in models}, f"output tokens per answer ({why})"


def cost_chart(report: Report) -> Chart | None:
    if not report.models:
        return None
    spend, label = _spend(report)
    ranking = next((r for r in report.rankings if any(s.interval for s in r.scores)), None)
    figure = _figure(len(spend) if ranking is None else 6)
    axes = figure.subplots()
    if ranking is None:  # a run without scores: what each model cost
        models = list(spend)[::-1]
        axes.barh(range(len(models)), [spend[m] for m in models], color=[OTHERS[n % len(OTHERS)] for n in range(len(models))])
        axes.set_yticks(range(len(models)), models)
        _style(axes, "Cost by model", label)
        return Chart("cost", "Cost by model", _png(figure))
    scale = 100.0 if ranking.metric.proportion else 1.0
    middle = (min(spend.values()) + max(spend.values())) / 2
    for n, score in enumerate(s for s in ranking.scores if s.interval is not None and s.model in spend):
        iv = score.interval
        assert iv is not None
        low, high = (iv.mean if iv.low is None else iv.low), (iv.mean if iv.high is None else iv.high)
        colour = BEST if score.best else OTHERS[n % len(OTHERS)]
        axes.errorbar([spend[score.model]], [iv.mean * scale], yerr=[[(iv.mean - low) * scale], [(high - iv.mean) * scale]],
                      fmt="o", color=colour, ecolor=colour, capsize=4, markersize=9)  # fmt: skip
        right = spend[score.model] > middle  # named on the inner side, so a long name stays in the picture
        axes.annotate(score.model, (spend[score.model], iv.mean * scale), xytext=(-8 if right else 8, 6), textcoords="offset points",
                      ha="right" if right else "left", color=TEXT, fontsize=10)  # fmt: skip
    if label.startswith("cost"):
        axes.xaxis.set_major_formatter(lambda value, _: f"${value:.3g}")
    axes.set_ylabel(f"{ranking.metric.label} ({'% of answers' if ranking.metric.proportion else 'mean score'})", color=MUTED)
    axes.grid(axis="y", color=GRID, linewidth=0.6)
    _style(axes, "Cost against score (up and left is better)", label)
    return Chart("cost", "Cost against score", _png(figure))


def draw_charts(report: Report) -> list[Chart] | None:
    """The report's charts; None when matplotlib is not installed."""
    if not available():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a glyph missing from the font must not flood a run's log
        charts = [score_chart(report), latency_chart(report), cost_chart(report)]
    return [c for c in charts if c is not None]
