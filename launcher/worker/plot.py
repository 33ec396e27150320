"""<run_dir>/loss.png from metrics.jsonl: loss, tokens/s and (on GPUs, where a peak is known) MFU per step.

matplotlib is optional here: without it the plot is skipped with a note, the run is unaffected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple


def plot_run(run_dir: Path) -> Tuple[Optional[Path], str]:
    """(png path or None, a note for the console when there is no plot)."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("loss") is not None:
                records.append(record)
    if not records:
        return None, "no logged steps, no loss plot"
    try:
        import matplotlib
    except ImportError:
        return None, "matplotlib is not installed: no loss.png (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    panels = [("loss", "loss"), ("tokens_per_sec", "tokens/s")]
    if any(r.get("mfu") is not None for r in records):
        panels.append(("mfu", "MFU"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.2 * len(panels)), dpi=100, sharex=True)
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [r.get(key) for r in records], marker=".", linewidth=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(run_dir.name)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out, ""
