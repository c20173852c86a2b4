"""The candidates side by side: a table, two plots and the fixed prompts' generations.

What a person reads before trusting a promotion. `write_comparison` writes them as
files; the pipeline logs them with the run and prints `candidate_table`.
"""
from __future__ import annotations

import csv
import os

from components.artifacts import EvalReport
from components.evaluate import CANDIDATE_METRICS, reference_variant

# (header, metric, format) of the printed table; every metric goes to candidates.csv.
COLUMNS = (
    ("device", "eval/on_cuda", lambda v: "cuda" if v else "cpu"),
    ("params", "model/params_total", lambda v: f"{int(v):,}"),
    ("size MB", "model/size_bytes", lambda v: f"{v / 1e6:.2f}"),
    ("x size", "model/size_ratio", lambda v: f"{v:.2f}"),
    ("linear MB", "model/disk_linear_bytes", lambda v: f"{v / 1e6:.2f}"),
    ("val ppl", "eval/val_ppl", lambda v: f"{v:.3f}"),
    ("d ppl %", "eval/val_ppl_delta_pct", lambda v: f"{v:+.2f}"),
    ("val acc", "eval/val_accuracy", lambda v: f"{v:.4f}"),
    ("compl. loss", "eval/completion_loss", lambda v: f"{v:.3f}"),
    ("tok/s b1", "eval/tokens_per_s", lambda v: f"{v:.1f}"),
    ("x speed", "eval/speedup", lambda v: f"{v:.2f}"),
    ("tok/s b8", "eval/tokens_per_s_batch8", lambda v: f"{v:.1f}"),
    ("TTFT ms", "eval/ttft_ms", lambda v: f"{v:.1f}"),
    ("p50 ms", "eval/token_ms_p50", lambda v: f"{v:.2f}"),
    ("p95 ms", "eval/token_ms_p95", lambda v: f"{v:.2f}"),
    ("peak MB", "eval/peak_mem_bytes", lambda v: f"{v / 1e6:.1f}"),
)
TABLE_FILE, CSV_FILE, GENERATIONS_FILE = "candidates.md", "candidates.csv", "generations.md"
PLOT_SIZE_FILE, PLOT_SPEED_FILE = "quality_vs_size.png", "quality_vs_speed.png"


def candidate_table(reports: list[EvalReport], winner: str | None = None) -> str:
    """A Markdown table of the candidates (skipped ones with their reason), readable in a terminal.

    "(ref)" marks the candidate the deltas (d ppl %, x size, x speed) are measured against.
    """
    reference = reference_variant(reports)
    header = ["candidate", *(name for name, _, _ in COLUMNS)]
    names = {r.variant: r.variant + (" (ref)" if r.variant == reference else "")
             + (" <- champion" if r.variant == winner else "") for r in reports}
    rows = [[names[r.variant], *(fmt(r.metrics[key]) if key in r.metrics else "-" for _, key, fmt in COLUMNS)]
            for r in reports if not r.skipped]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              + " |" for row in rows]
    lines += [f"| {names[r.variant].ljust(widths[0])} | skipped: {r.skipped} |" for r in reports if r.skipped]
    return "\n".join(lines)


def write_comparison(reports: list[EvalReport], out_dir: str, winner: str | None = None) -> list[str]:
    """Write the table (Markdown and CSV with every metric), the two plots and the generations.

    Returns:
        the paths written, to log as artifacts.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name)
             for name in (TABLE_FILE, CSV_FILE, GENERATIONS_FILE, PLOT_SIZE_FILE, PLOT_SPEED_FILE)}
    with open(paths[TABLE_FILE], "w") as f:
        f.write(candidate_table(reports, winner) + "\n")
    with open(paths[CSV_FILE], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["candidate", "skipped", *CANDIDATE_METRICS])
        for r in reports:
            writer.writerow([r.variant, r.skipped, *(r.metrics.get(k, "") for k in CANDIDATE_METRICS)])
    with open(paths[GENERATIONS_FILE], "w") as f:
        f.write(_generations_markdown(reports))
    measured = [r for r in reports if not r.skipped]
    _plot(measured, "model/size_bytes", "stored size (MB)", 1e-6, paths[PLOT_SIZE_FILE])
    _plot(measured, "eval/tokens_per_s", "batch-1 decode tokens/s (KV cache)", 1.0, paths[PLOT_SPEED_FILE])
    return list(paths.values())


def _generations_markdown(reports: list[EvalReport]) -> str:
    measured = [r for r in reports if not r.skipped]
    prompts = list(measured[0].generations) if measured else []
    out = ["# Greedy continuations of the fixed prompts (evaluate.prompts), candidate by candidate\n"]
    for prompt in prompts:
        out.append(f"## Prompt\n\n```\n{prompt}\n```\n")
        for r in measured:
            out.append(f"**{r.variant}**\n\n```\n{prompt}{r.generations.get(prompt, '')}\n```\n")
    return "\n".join(out)


def _plot(reports: list[EvalReport], x_key: str, x_label: str, x_scale: float, path: str) -> None:
    import matplotlib.pyplot as plt

    fig = quality_figure(reports, x_key, x_label, x_scale)
    fig.savefig(path)
    plt.close(fig)


def quality_figure(reports: list[EvalReport], x_key: str, x_label: str, x_scale: float = 1.0):
    """Validation perplexity (lower is better) against `x_key`: one labelled point per candidate."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a Ray worker or a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for r in reports:
        x, y = r.metrics[x_key] * x_scale, r.metrics["eval/val_ppl"]
        ax.scatter([x], [y], s=40)
        ax.annotate(r.variant, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_title(f"Candidates: quality vs {x_label.split(' (')[0]}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


# The side-by-side plot shows the metrics a decision reads; the full list is in the table beside it.
_SIDE_BY_SIDE_PLOTTED = ("eval/suite_bpb", "eval/suite_completion_bpb", "eval/val_bpb", "eval/completion_bpb",
                         "model/size_bytes", "eval/tokens_per_s")


def write_side_by_side_plot(rows: list[dict], challenger: str, champion: str, path: str) -> bool:
    """A bar per metric of `components.promote.side_by_side` rows: the challenger's change against the
    champion in percent (task accuracies in points), so a regression stands out. Returns False (and
    writes nothing) when no row has a change to show."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a Ray worker or a server
    import matplotlib.pyplot as plt

    shown = [(r["metric"], r["delta_pct"]) for r in rows
             if r["metric"] in _SIDE_BY_SIDE_PLOTTED and r["delta_pct"] is not None]
    shown += [(r["metric"], 100.0 * r["delta"]) for r in rows
              if r["metric"].startswith("eval/task/") and r["metric"].rsplit("/", 1)[-1].startswith("acc")]
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(shown) + 1.5), dpi=100)
    names, values = [n for n, _ in shown], [v for _, v in shown]
    ax.barh(names, values, color=["#c44" if v > 0 else "#4a4" for v in values])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{challenger} against {champion}: change in % (task accuracies: points)")
    ax.set_title(f"Challenger {challenger} vs champion {champion}, measured side by side")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
