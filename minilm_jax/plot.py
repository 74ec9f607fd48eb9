"""training.png: training loss and evaluation metrics against the step, from the records of
metrics.jsonl ({"step", "epoch", "loss", "learning_rate", "pairs_per_second", and on evaluation
steps "eval_<metric>": by default the correlations "eval_spearman_cosine", "eval_pearson_cosine",
or the evaluators' primary metrics the caller names).

matplotlib is imported inside `plot_training`, so `import minilm_jax` stays light.
"""

from __future__ import annotations

import os
import tempfile

DEFAULT_EVAL_KEYS = ("eval_spearman_cosine", "eval_pearson_cosine")
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
_MARKERS_BELOW = 30  # points; with fewer, each one is drawn so that a single record still shows


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def _say_empty(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="gray")
    axes.set_xticks([])
    axes.set_yticks([])


def plot_training(records: list[dict], path: str, eval_keys=DEFAULT_EVAL_KEYS, loss_name: str = "cosine MSE") -> None:
    """Write a PNG with two panels, training loss and the evaluation metrics `eval_keys`, both against
    the step.

    The image is written to a temporary file beside `path` and renamed over it, so `path` is
    either the old image or the new one, never half of one."""
    # A Figure with its own Agg canvas rather than pyplot + matplotlib.use("Agg"): it renders
    # without a display and leaves the process-wide backend (a notebook's, say) untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_axes, eval_axes = fig.subplots(1, 2)

    steps, losses = _series(records, "loss")
    if steps:
        loss_axes.plot(steps, losses, color="tab:red", linewidth=1.2,
                       marker="o" if len(steps) < _MARKERS_BELOW else None, markersize=3)
    else:
        _say_empty(loss_axes, "no training loss logged")
    loss_axes.set(title="Training loss", xlabel="step", ylabel=f"loss ({loss_name})")
    loss_axes.grid(alpha=0.3)

    any_eval = False
    for key, color in zip(eval_keys, _COLORS * len(eval_keys)):
        steps, values = _series(records, key)
        if steps:
            any_eval = True
            eval_axes.plot(steps, values, color=color, marker="o", markersize=4, label=key.removeprefix("eval_"))
    if any_eval:
        eval_axes.legend(loc="lower right")
    else:
        _say_empty(eval_axes, "no evaluation in this run")
    eval_axes.set(title="Evaluation", xlabel="step", ylabel="metric")
    eval_axes.grid(alpha=0.3)

    for axes in (loss_axes, eval_axes):
        if axes.has_data():
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
            low, high = axes.get_xlim()
            if high - low < 2:  # one step only: widen, or the axis shows fractions of a step
                axes.set_xlim(low - 1, high + 1)

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the image is meant to be shared like the rest
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
