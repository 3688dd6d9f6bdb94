"""`longserve eval --plot`: accuracy against context length and against needle depth, one line per method."""

from __future__ import annotations

from typing import Any


def accuracy_by(samples: list[dict[str, Any]], label: str, field: str) -> tuple[list[float], list[float]]:
    """(values of `field`, accuracy at each) for one method's samples, sorted by the value."""
    values = sorted({s[field] for s in samples if s["method"] == label})
    acc = []
    for v in values:
        sub = [s["correct"] for s in samples if s["method"] == label and s[field] == v]
        acc.append(sum(sub) / len(sub))
    return values, acc


def plot_accuracy(result: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise OSError(f"--plot needs matplotlib (pip install longserve[plot]): {e}") from None
    samples = result["samples"]
    labels = [m["label"] for m in result["methods"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, field, xlabel in ((axes[0], "length", "context length (tokens)"),
                              (axes[1], "depth", "needle depth (fraction of the context)")):
        for label in labels:
            x, y = accuracy_by(samples, label, field)
            if x:
                ax.plot(x, y, marker="o", label=label[:48])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (all tasks)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[1].set_xlim(-0.05, 1.05)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=2, frameon=False)
    model = result["settings"].get("model") or "smollm2-135m-instruct"
    fig.suptitle(f"longserve eval: {model}")
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
