"""The run's pictures, from its folder alone (`optimize report RUN_DIR` redraws them):

- convergence.png: each trial's score (failed trials marked on the axis), the best so far, and the holdout
  scores of the best trials beside their training scores — a holdout line that falls while training rises
  is the optimiser fitting the payloads rather than making better models;
- blocks.png: the best trial's weight per block for each searched parameter, the latest trial's (dashed),
  and the spread (min..max) of the top trials behind them: narrow where the blocks matter, wide where
  they do not.
"""
from __future__ import annotations

from ..tools.report import figure, save_figure

TOP = 10


def draw_convergence(run, path) -> None:
    records = run.records
    fig = figure(8, 4.2)
    ax = fig.add_subplot()
    ok = [r for r in records if r["score"] is not None]
    failed = [r for r in records if r["score"] is None]
    ax.plot([r["trial"] for r in ok], [r["score"] for r in ok], "o", ms=3.5, color="#7a9cc6", label="trial score")
    best, xs, ys = None, [], []
    for r in ok:
        best = r["score"] if best is None else max(best, r["score"])
        xs.append(r["trial"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="#1f4e8c", lw=2, label="best so far")
    if failed:
        low = min((r["score"] for r in ok), default=0.0)
        ax.plot([r["trial"] for r in failed], [low] * len(failed), "x", color="#c0392b", label="failed")
    if run.holdouts:
        hs = [h for h in run.holdouts if h["score"] is not None]
        ax.plot([h["trial"] for h in hs], [h["score"] for h in hs], "s", ms=6, mfc="none", color="#d35400",
                label="holdout score")
        ax.plot([h["trial"] for h in hs], [h["train_score"] for h in hs], "s", ms=3, color="#1f4e8c", alpha=0.5)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"score ({run.config['aggregate']})")
    ax.set_title(f"{run.log.folder.name}: {len(records)} trials, {run.optimizer.name}")
    ax.grid(alpha=0.3)
    if records:
        ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def draw_blocks(run, path) -> None:
    fig = figure(9, 4.2)
    ax = fig.add_subplot()
    ok = sorted((r for r in run.records if r["score"] is not None), key=lambda r: (-r["score"], r["trial"]))
    names = run.space.names
    x = list(range(len(names)))
    colours = ["#1f4e8c", "#d35400", "#27ae60", "#8e44ad", "#c0392b"]
    if ok:
        top = [run.space.block_values(r["params"]) for r in ok[:TOP]]
        for i, param in enumerate(top[0]):
            colour = colours[i % len(colours)]
            lows = [min(t[param][j] for t in top) for j in x]
            highs = [max(t[param][j] for t in top) for j in x]
            ax.fill_between(x, lows, highs, color=colour, alpha=0.15, step="mid",
                            label=f"{param}: top {len(top)} spread")
            ax.plot(x, top[0][param], "o-", color=colour, label=f"{param}: best (trial {ok[0]['trial']})")
        if run.records and run.records[-1]["trial"] != ok[0]["trial"]:
            latest = run.records[-1]
            for i, (param, values) in enumerate(run.space.block_values(latest["params"]).items()):
                ax.plot(x, values, "--", color=colours[i % len(colours)], alpha=0.6,
                        label=f"{param}: latest (trial {latest['trial']})")
    searched = {b for s in run.space.searched for b in s.blocks}
    ax.set_xticks(x, names, rotation=90, fontsize=7)
    for label in ax.get_xticklabels():
        if label.get_text() not in searched:
            label.set_color("#999999")
    ax.set_ylabel("weight")
    ax.set_title("best block weights (grey blocks are not searched)")
    ax.grid(alpha=0.3)
    if ok:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def draw_report(run) -> list:
    folder = run.log.folder
    paths = [folder / "convergence.png", folder / "blocks.png"]
    draw_convergence(run, paths[0])
    draw_blocks(run, paths[1])
    return paths
