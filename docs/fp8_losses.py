"""Draws docs/fp8_losses.svg from docs/fp8_losses.json (plain SVG, no plotting library).

    FP8_CURVES=docs/fp8_losses.json python -m pytest -s -m slow tests/test_fp8_training.py -k 300
    python docs/fp8_losses.py
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {"none": "#222222", "delayed": "#d62728", "blockwise": "#1f77b4"}
W, H, PAD = 720, 400, 50


def smooth(values, k=10):
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1])
            for i in range(len(values))]


def main():
    with open(os.path.join(HERE, "fp8_losses.json")) as f:
        curves = {k: smooth(v) for k, v in json.load(f).items()}
    steps = max(len(v) for v in curves.values())
    lo, hi = min(min(v) for v in curves.values()), max(max(v) for v in curves.values())
    x = lambda i: PAD + (W - 2 * PAD) * i / (steps - 1)
    y = lambda v: H - PAD - (H - 2 * PAD) * (v - lo) / (hi - lo)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">step</text>',
             f'<text x="{PAD}" y="{PAD - 20}">training loss (nats/token, 10-step mean), tiny '
             'model on argparse.py bytes</text>']
    for tick in range(0, steps + 1, 50):
        parts.append(f'<text x="{x(min(tick, steps - 1))}" y="{H - PAD + 16}" '
                     f'text-anchor="middle">{tick}</text>')
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        parts.append(f'<text x="{PAD - 6}" y="{y(v) + 4}" text-anchor="end">{v:.1f}</text>')
    for n, (name, values) in enumerate(curves.items()):
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(f'<polyline fill="none" stroke="{COLORS.get(name, "gray")}" '
                     f'stroke-width="1.5" points="{points}"/>')
        parts.append(f'<text x="{W - PAD - 160}" y="{PAD + 18 * n}" '
                     f'fill="{COLORS.get(name, "gray")}">fp8={name}: final {values[-1]:.3f}</text>')
    parts.append("</svg>")
    with open(os.path.join(HERE, "fp8_losses.svg"), "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
