"""The export's `plots/`: loss curves drawn from the stages' trainer logs (matplotlib, optional) and the PNG files
stages wrote, for the model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..files import copy_file

logger = logging.getLogger("hf_modelopt")

PLOTS_DIR = "plots"


def plot_loss_curves(log_history: list[dict], title: str, target: Path) -> bool:
    """Every logged `*loss` (train, eval, KD terms) against the step, as a PNG; False if nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    keys = sorted({k for entry in log_history for k in entry if k.endswith("loss") and k != "train_loss"})
    if not keys:
        return False
    figure = Figure(figsize=(6.4, 3.6), layout="tight")
    axes = figure.subplots()
    for key in keys:
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        axes.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
    axes.set(title=title, xlabel="step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(target, dpi=100)
    return True


def plot_perplexity_curve(log_history: list[dict], title: str, target: Path) -> bool:
    """The held-out perplexity a training logged (`tasks.held_out`) against the tokens trained, as a PNG; False if
    the log holds no such curve."""
    from matplotlib.figure import Figure

    from ..tasks.held_out import perplexity_curve

    curve = perplexity_curve(log_history)
    if not curve:
        return False
    figure = Figure(figsize=(6.4, 3.6), layout="tight")
    axes = figure.subplots()
    axes.plot([p["tokens_trained"] for p in curve], [p["held_out_perplexity"] for p in curve], marker=".")
    axes.set(title=title, xlabel="tokens trained", ylabel="held-out perplexity", yscale="log")
    axes.grid(alpha=0.3, which="both")
    figure.savefig(target, dpi=100)
    return True


# The curves drawn from a stage's trainer log: (drawing function, file suffix, card title).
CURVES = ((plot_loss_curves, "loss", "training losses"),
          (plot_perplexity_curve, "perplexity", "held-out perplexity against tokens trained"))


def write_plots(history: list[dict], stages_dir: Path | None, target: Path) -> list[dict]:
    """Loss curves from the stages' trainer logs and the PNG files stages wrote (in `stages_dir/<stage name>/`), into
    `target/plots/`; the list of plots for the card."""
    from ..extras import missing_packages

    if stages_dir is None:
        return []
    plots = []
    folder = target / PLOTS_DIR
    folder.mkdir()
    for record in history:
        stage_dir = stages_dir / record["name"]
        logs = stage_dir / "log_history.json"
        pngs = sorted(png for png in stage_dir.glob("*.png") if png.is_file() and not png.is_symlink())
        if not logs.is_file() and not pngs:
            continue
        if logs.is_file():
            # The curves only illustrate the card: without matplotlib the export goes on without them.
            problem = missing_packages(("matplotlib",))
            if problem is None:
                log_history = json.loads(logs.read_text())
                for draw, suffix, title in CURVES:
                    if draw(log_history, f"stage {record['name']} ({record['type']})",
                            folder / f"{record['name']}-{suffix}.png"):
                        plots.append({"path": f"{PLOTS_DIR}/{record['name']}-{suffix}.png",
                                      "title": f"{title} of stage {record['name']}"})
            else:
                logger.info("loss curves left out of the card: drawing them %s", problem)
        for png in pngs:
            copy_file(png, folder / f"{record['name']}-{png.name}")
            plots.append({"path": f"{PLOTS_DIR}/{record['name']}-{png.name}",
                          "title": f"{png.stem.replace('_', ' ')} (stage {record['name']})"})
    if not plots:
        folder.rmdir()
    return plots
