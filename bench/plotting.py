"""PNG plots of benchmark results (matplotlib with the Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_throughput(report: dict, path: str | Path) -> None:
    """Decode tokens/s against context length, one line per (method, batch), log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in report["results"]:
        if r.get("error") or not r.get("decode_tok_s"):
            continue
        series.setdefault((r["method"], r["batch"]), []).append((r["context"], r["decode_tok_s"]))
    batches = sorted({b for _, b in series})
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for (method, batch), points in sorted(series.items()):
        points.sort()
        xs, ys = zip(*points)
        label = method if len(batches) == 1 else f"{method}, batch {batch}"
        ax.plot(xs, ys, styles[batches.index(batch) % len(styles)], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens/s")
    kv = report.get("kv_mode", "")
    ax.set_title(f"{report['model']['name']} on {report['device']['name']}\n"
                 f"{report.get('dtype', '')}, KV {kv}{' (random K/V)' if kv == 'synthetic' else ''}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful measurement", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
