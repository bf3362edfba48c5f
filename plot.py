#!/usr/bin/env python3
"""plot.py: pictures of fpdt runs, as PNG files (matplotlib).

    python3 plot.py --out DIR [--log RUN/main.log] [--eval [LABEL=]FILE.csv ...] [--needle FILE.csv]

--log     a train run's main.log (train --out RUN writes it): loss and held-out loss, retrieval
          by distance (passkey), tokens/s and learning rate over the steps       -> DIR/run.png
--eval    CSVs of ./fpdt eval --csv (one or several runs): the loss by position, one curve a file,
          on one axes; LABEL= names a curve (default: the file's name)          -> DIR/loss_by_position.png
--needle  the CSV of ./fpdt eval --needle --csv: the grid as a heatmap          -> DIR/needle.png
"""
import argparse
import csv
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

STEP = re.compile(r"^step (\d+)/\d+ \| loss (\S+) \| lr (\S+) \| norm \S+ \| (\S+) tok/s")
EVAL = re.compile(r"^eval step (\d+) \| seq (\d+) \| loss (\S+)(.*)$")
BUCKET = re.compile(r" (<\d+[KM]?|>=\d+[KM]?) (\d+)%")
FAR = re.compile(r"key in an earlier chunk: (\S+)% of")


def tokens(n):
    """64, 1K, 4K, 1M: a power-of-two count as fpdt prints it"""
    n = int(n)
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n >= 1024 and n % 1024 == 0 else str(n)


def read_log(path):
    """The step lines and eval lines of a main.log, as lists of dicts."""
    steps, evals = [], []
    with open(path) as f:
        for line in f:
            m = STEP.match(line)
            if m:
                steps.append(dict(step=int(m[1]), loss=float(m[2]), lr=float(m[3]), tps=float(m[4])))
                continue
            m = EVAL.match(line)
            if m:
                rest = m[4].split("| by distance:")
                far = FAR.search(m[4])
                evals.append(dict(step=int(m[1]), seq=int(m[2]), loss=float(m[3]),
                                  far=float(far[1]) if far else None,
                                  dist=dict(BUCKET.findall(rest[1])) if len(rest) > 1 else {}))
    if not steps:
        sys.exit(f"plot.py: {path}: no 'step N/M | loss ...' lines (expected a train run's main.log)")
    return steps, evals


def plot_run(path, out):
    steps, evals = read_log(path)
    x = [s["step"] for s in steps]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    a = ax[0][0]
    a.plot(x, [s["loss"] for s in steps], lw=0.6, color="tab:blue", label="training loss")
    if evals:
        a.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color="tab:red", ms=3, label="held-out loss")
    for e0, e1 in zip(evals, evals[1:]):  # where the sequence length changes (a short start)
        if e0["seq"] != e1["seq"]:
            a.axvline(e0["step"], color="gray", ls=":", lw=1)
            a.text(e0["step"], a.get_ylim()[1], f" seq {e0['seq']} -> {e1['seq']}", va="top", fontsize=8, color="gray")
    a.set_yscale("log"), a.set_xlabel("step"), a.set_ylabel("loss (nats/token)"), a.legend(), a.set_title("loss")
    a = ax[0][1]
    names = []
    for e in evals:
        names += [n for n in e["dist"] if n not in names]
    for n in names:
        pts = [(e["step"], float(e["dist"][n])) for e in evals if n in e["dist"]]
        a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1, label=f"distance {n}")
    far = [(e["step"], e["far"]) for e in evals if e["far"] is not None]
    if far:
        a.plot([p[0] for p in far], [p[1] for p in far], "k*-", ms=6, lw=1.5, label="key in an earlier chunk")
    if names:
        a.axhline(10, color="gray", ls="--", lw=1, label="chance (10%)")
        a.set_ylim(0, 100), a.legend(fontsize=8)
    else:
        a.text(0.5, 0.5, "no retrieval task in this run", ha="center", transform=a.transAxes)
    a.set_xlabel("step"), a.set_ylabel("answer symbols right (%)"), a.set_title("passkey retrieval by distance (held out)")
    a = ax[1][0]
    a.plot(x, [s["tps"] for s in steps], lw=0.6, color="tab:green")
    a.set_xlabel("step"), a.set_ylabel("tokens/s"), a.set_title("throughput"), a.set_ylim(bottom=0)
    a = ax[1][1]
    a.plot(x, [s["lr"] for s in steps], color="tab:purple")
    a.set_xlabel("step"), a.set_ylabel("learning rate"), a.set_title("learning rate")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(path))) + "/main.log")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def read_eval_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows or "metric" not in rows[0]:
        sys.exit(f"plot.py: {path}: not a CSV of ./fpdt eval --csv (expected the header seq,metric,lo,hi,value,count)")
    return rows


def plot_positions(specs, out):
    fig, a = plt.subplots(figsize=(8, 5))
    for spec in specs:
        label, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (None, spec)
        rows = read_eval_csv(path)
        pos = [r for r in rows if r["metric"] == "loss_by_position"]
        mean = [r for r in rows if r["metric"] == "loss"]
        label = label or os.path.splitext(os.path.basename(path))[0] + f" (seq {mean[0]['seq']})"
        # each bucket drawn over its span of positions [lo, hi)
        xs, ys = [], []
        for r in pos:
            xs += [max(int(r["lo"]), 1), int(r["hi"])]
            ys += [float(r["value"])] * 2
        a.plot(xs, ys, lw=2, label=f"{label}: mean {float(mean[0]['value']):.3f}")
    a.set_xscale("log", base=2)
    a.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: tokens(v)))
    a.set_xlabel("token position (buckets that double)"), a.set_ylabel("held-out loss (nats/token)")
    a.set_title("loss by position"), a.legend(fontsize=8), a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_needle(path, out):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows or "depth" not in rows[0]:
        sys.exit(f"plot.py: {path}: not a CSV of ./fpdt eval --needle --csv (expected the header seq,depth,accuracy,answers)")
    lens = sorted({int(r["seq"]) for r in rows})
    depths = sorted({float(r["depth"]) for r in rows})
    grid = [[0.0] * len(lens) for _ in depths]
    for r in rows:
        grid[depths.index(float(r["depth"]))][lens.index(int(r["seq"]))] = 100 * float(r["accuracy"])
    fig, a = plt.subplots(figsize=(max(6.5, 1.1 * len(lens) + 3), 6))
    im = a.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lens)):
            a.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=8)
    a.set_xticks(range(len(lens)), [tokens(n) for n in lens])
    a.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    a.set_xlabel("context length (tokens)"), a.set_ylabel("depth of the key")
    a.set_title(f"needle in a haystack: answer symbols right (%)\n{rows[0]['answers']} symbols a cell; chance 10%", fontsize=10)
    fig.colorbar(im, ax=a, label="%")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the PNG files (created)")
    p.add_argument("--log", help="a train run's main.log")
    p.add_argument("--eval", nargs="+", default=[], help="./fpdt eval --csv files, [LABEL=]FILE")
    p.add_argument("--needle", help="./fpdt eval --needle --csv file")
    a = p.parse_args()
    if not (a.log or a.eval or a.needle):
        p.error("nothing to draw: give --log, --eval or --needle")
    os.makedirs(a.out, exist_ok=True)
    made = []
    if a.log:
        plot_run(a.log, os.path.join(a.out, "run.png")), made.append("run.png")
    if a.eval:
        plot_positions(a.eval, os.path.join(a.out, "loss_by_position.png")), made.append("loss_by_position.png")
    if a.needle:
        plot_needle(a.needle, os.path.join(a.out, "needle.png")), made.append("needle.png")
    print("wrote " + ", ".join(os.path.join(a.out, m) for m in made))


if __name__ == "__main__":
    main()
