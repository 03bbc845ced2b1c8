"""What a run leaves for people to read: metrics as JSON lines and a loss-curve picture."""

from __future__ import annotations

import json
from pathlib import Path

from glassformer.checkpoints.files import atomic_write


def write_metrics(path: Path, metrics: list[dict[str, float]]) -> None:
    """One JSON object per evaluation (step, train_loss, val_loss, lr, tokens_per_s, elapsed_s)."""
    text = "".join(json.dumps(row) + "\n" for row in metrics)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def plot_losses(metrics: list[dict[str, float]], path: Path) -> None:
    """Training and validation loss against step, as a PNG."""
    if not metrics:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [m["train_loss"] for m in metrics], label="train")
    ax.plot(steps, [m["val_loss"] for m in metrics], label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
