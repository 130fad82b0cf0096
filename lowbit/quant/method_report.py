"""The per-layer error plot of quant_report.png for any set of methods measured side by side
(RTN, AWQ, GPTQ, AWQ-GPTQ): one bar per method and decoder layer, log scale."""
from __future__ import annotations

import io


def errors_png(index: list[int], series: dict[str, list[float]], title: str) -> bytes:
    """index: the decoder layers; series: method label -> its error on each of those layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(series))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * n * len(index) + 3), 4))
    for k, (label, values) in enumerate(series.items()):
        offset = (k - (n - 1) / 2) * width
        ax.bar([i + offset for i in index], [max(v, 1e-12) for v in values], width, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("layer output MSE vs fp (calibration inputs)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
