#!/usr/bin/env python3
"""Draws an fpdt --trace file (Chrome trace-event JSON) as an SVG timeline: one row per stream
(compute, copy-in, copy-out, communication), one box per chunk operation, coloured by kind.
No dependencies. Usage: python3 bench/trace_svg.py trace.json out.svg [--width 1400]"""
import json, sys, html

def main():
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    width = int(args[args.index("--width") + 1]) if "--width" in args else 1400
    ev = json.load(open(args[0]))["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in ev if e["ph"] == "M"}
    boxes = [e for e in ev if e["ph"] == "X"]
    t0 = min(e["ts"] for e in boxes)
    t1 = max(e["ts"] + e["dur"] for e in boxes)
    left, row, pad = 190, 34, 6
    scale = (width - left - 10) / max(t1 - t0, 1e-9)
    palette = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
    kinds = sorted({e["name"] for e in boxes})
    colour = {k: palette[i % len(palette)] for i, k in enumerate(kinds)}
    tids = sorted(names)
    height = len(tids) * row + 40 + 18 * ((len(kinds) + 3) // 4)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    for r, tid in enumerate(tids):
        y = 10 + r * row
        out.append(f'<text x="5" y="{y + row / 2 + 4}">{html.escape(names[tid])}</text>')
        out.append(f'<line x1="{left}" y1="{y + row - 2}" x2="{width - 10}" y2="{y + row - 2}" stroke="#ddd"/>')
        for e in boxes:
            if e["tid"] != tid:
                continue
            x, w = left + (e["ts"] - t0) * scale, max(e["dur"] * scale, 0.5)
            a = e.get("args", {})
            tip = f'{e["name"]} layer {a.get("layer")} chunk {a.get("chunk")} {a.get("bytes", 0)} bytes {e["dur"]:.0f} us'
            out.append(f'<rect x="{x:.2f}" y="{y + pad}" width="{w:.2f}" height="{row - 2 * pad}" fill="{colour[e["name"]]}">'
                       f'<title>{html.escape(tip)}</title></rect>')
    y = 20 + len(tids) * row
    out.append(f'<text x="{left}" y="{y}">0</text><text x="{width - 60}" y="{y}">{(t1 - t0) / 1e3:.1f} ms</text>')
    for i, k in enumerate(kinds):
        x, yy = 5 + (i % 4) * (width // 4), y + 16 + 18 * (i // 4)
        out.append(f'<rect x="{x}" y="{yy - 10}" width="12" height="12" fill="{colour[k]}"/>'
                   f'<text x="{x + 16}" y="{yy}">{html.escape(k)}</text>')
    out.append("</svg>")
    open(args[1], "w").write("\n".join(out))

if __name__ == "__main__":
    main()
