"""The PNG: throughput and latencies against the request rate (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lightserve.benchmark.hf_baseline import HFResult
from lightserve.benchmark.report import rate_label
from lightserve.benchmark.stats import RunSummary


def write_plot(path: str | Path, runs: list[RunSummary], hf: Optional[HFResult]) -> Optional[str]:
    """Draw the figure; returns None, or why no figure was written (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG written"

    # Rates on a categorical axis: "inf" has no place on a numeric one.
    x = list(range(len(runs)))
    labels = [rate_label(s.request_rate) for s in runs]
    fig, (ax_tput, ax_ttft, ax_tok) = plt.subplots(1, 3, figsize=(15, 4.5))

    ax_tput.plot(x, [s.output_throughput for s in runs], "o-", label="lightserve output tok/s")
    if hf is not None:
        note = f", first {hf.requests_run} req" if hf.subset else ""
        ax_tput.axhline(hf.useful_output_throughput, color="tab:red", linestyle="--",
                        label=f"transformers useful tok/s (B={hf.batch_size}{note})")
    ax_tput.set_title("Output token throughput")
    ax_tput.set_ylabel("tokens / s")

    for name, pick in (("mean", lambda d: d.mean), ("p50", lambda d: d.p50), ("p99", lambda d: d.p99)):
        ax_ttft.plot(x, [pick(s.ttft_ms) for s in runs], "o-", label=f"TTFT {name}")
    ax_ttft.set_title("Time to first token")
    ax_ttft.set_ylabel("ms")

    for metric in ("tpot_ms", "itl_ms"):
        for name, style in (("p50", "o-"), ("p99", "s--")):
            ax_tok.plot(x, [getattr(getattr(s, metric), name) for s in runs], style,
                        label=f"{metric[:-3].upper()} {name}")
    ax_tok.set_title("Time per output token / inter-token latency")
    ax_tok.set_ylabel("ms")

    for ax in (ax_tput, ax_ttft, ax_tok):
        ax.set_xticks(x, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)  # from zero, with room above the highest point or line
    conc = runs[0].max_concurrency or "unlimited"
    fig.suptitle(f"lightserve serving benchmark: {runs[0].num_requests} requests, max concurrency {conc}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
