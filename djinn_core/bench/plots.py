"""Report plots: PNGs drawn from what the claim tests put in ``extra_info`` (the list is in
:mod:`djinn_core.bench.report`'s docstring). :func:`report_plots` draws every plot of one report; matplotlib is imported
only when a plot is drawn (Agg backend)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from djinn_core.bench.report import ClaimRow

GiB = 2**30


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (imported only when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Lay ``fig`` out, write it to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:80]


def _plot_claims(rows: list[ClaimRow], out_dir: Path, name: str) -> list[Path]:
    plt = _pyplot()

    paths = []
    by_claim: dict[str, list[ClaimRow]] = {}
    for r in rows:
        if r.record["kind"] not in ("check", "precondition"):  # counts, budgets read better in the table
            by_claim.setdefault(r.claim, []).append(r)
    for claim, crs in by_claim.items():
        numeric = [k for k, v in crs[0].params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not numeric or len(crs) < 2:
            continue
        x_key = numeric[0]
        series: dict[str, list[tuple[float, float]]] = {}
        for r in crs:
            if x_key not in r.params:
                continue
            others = ", ".join(f"{k}={v}" for k, v in r.params.items() if k != x_key)
            label = r.method + (f" ({others})" if others else "")
            series.setdefault(label, []).append((r.params[x_key], r.measured))
            if r.reference is not None:
                ref_label = (r.reference_method or "reference") + (f" ({others})" if others else "")
                if r.record["kind"] == "bandwidth":
                    ref_label = "same-run ceiling" + (f" ({others})" if others else "")
                series.setdefault(ref_label, []).append((r.params[x_key], r.reference))
        merged: dict[tuple, list[str]] = {}  # identical curves (a shared reference) are drawn once
        for label, pts in series.items():
            merged.setdefault(tuple(sorted(set(pts))), []).append(label)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for pts, labels in merged.items():
            label = labels[0] if len(labels) == 1 else labels[0].split(" (")[0]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        xs = [p[0] for pts in merged for p in pts]
        if min(xs) > 0 and max(xs) / min(xs) > 30:
            ax.set_xscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel(crs[0].unit or "value")
        if crs[0].unit == "ms" and max(p[1] for s in series.values() for p in s) > 50 * max(
                min(p[1] for p in s) for s in series.values()):
            ax.set_yscale("log")
        ax.set_title(claim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        p = out_dir / f"{name}_{_slug(claim)}.png"
        _save(plt, fig, p)
        paths.append(p)
    return paths


def _plot_vram(test: str, vram: dict[str, Any], out_dir: Path, name: str, budget: float | None) -> Path | None:
    plt = _pyplot()

    tl = vram.get("timeline") or []
    if not tl:
        return None
    pcie = vram.get("pcie") or []
    fig, axes = plt.subplots(2 if pcie else 1, 1, figsize=(9, 6 if pcie else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    t = [s["t_s"] for s in tl]
    for key, label in (("nvml_used", "NVML used"), ("torch_reserved", "torch reserved"),
                       ("torch_allocated", "torch allocated")):
        if key in tl[0]:
            ax.plot(t, [s[key] / GiB for s in tl], label=label, lw=1)
    if budget:
        ax.axhline(budget / GiB, color="red", ls="--", lw=1, label="budget")
    for m in vram.get("marks", []):
        if m["label"] in ("start", "stop"):
            continue
        ax.axvline(m["t_s"], color="grey", alpha=0.25, lw=0.6)
    ax.set_ylabel("GiB")
    ax.set_title(f"GPU memory: {test}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if pcie:
        ax2 = axes[1][0]
        tp = [s["t_s"] for s in pcie]
        ax2.plot(tp, [s["pcie_rx_KBps"] * 1e3 / 1e9 for s in pcie], label="host-to-device (NVML RX)", lw=1)
        ax2.plot(tp, [s["pcie_tx_KBps"] * 1e3 / 1e9 for s in pcie], label="device-to-host (NVML TX)", lw=1)
        ax2.set_ylabel("GB/s")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    axes[-1][0].set_xlabel("s")
    p = out_dir / f"{name}_{_slug(test.split('::')[-1])}_vram.png"
    _save(plt, fig, p)
    return p


def _plot_layer_timeline(test: str, rows: list[dict[str, Any]], out_dir: Path, name: str) -> Path | None:
    plt = _pyplot()

    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.18 * len(rows) + 1.5))
    for r in rows:
        y = r["layer"]
        ax.barh(y - 0.2, r["copy_end_ms"] - r["copy_start_ms"], left=r["copy_start_ms"], height=0.38,
                color="tab:blue", label="copy (H2D)" if y == rows[0]["layer"] else None)
        ax.barh(y + 0.2, r["compute_end_ms"] - r["compute_start_ms"], left=r["compute_start_ms"], height=0.38,
                color="tab:orange", label="compute" if y == rows[0]["layer"] else None)
    ax.set_xlabel("ms from forward start")
    ax.set_ylabel("layer")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    ax.set_title(f"per-layer copy/compute: {test}", fontsize=9)
    p = out_dir / f"{name}_{_slug(test.split('::')[-1])}_layers.png"
    _save(plt, fig, p)
    return p


def _plot_swaps(test: str, rows: list[dict[str, Any]], out_dir: Path, name: str) -> Path | None:
    """Each swap's GB/s against its start (s), out and in in two panels; the bracketing copies' GB/s where recorded.
    Swaps smaller than half the largest (partial ones) are left out."""
    plt = _pyplot()

    rows = [r for r in rows if r.get("ms", 0) > 0]
    if not rows:
        return None
    largest = max(r["nbytes"] for r in rows)
    rows = [r for r in rows if r["nbytes"] >= largest / 2]
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    for ax, direction in zip(axes, ("out", "in")):
        mine = [r for r in rows if r["direction"] == direction]
        t = [r["start_ms"] / 1e3 for r in mine]
        ax.plot(t, [r["nbytes"] / r["ms"] / 1e6 for r in mine], ".", ms=4, label=f"swap-{direction}")
        br = [r for r in mine if "bracket_GBps" in r]
        if br:
            ax.plot([r["start_ms"] / 1e3 for r in br], [r["bracket_GBps"] for r in br], "x", ms=3, alpha=0.6,
                    color="tab:gray", label="copies right around it")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7, loc="lower left")
    axes[-1].set_xlabel("s from the first swap")
    axes[0].set_title(f"whole-session swaps: {test}", fontsize=9)
    p = out_dir / f"{name}_{_slug(test.split('::')[-1])}_swaps.png"
    _save(plt, fig, p)
    return p


def _timings(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The top-level entries of a benchmark's info that are timings (``TimingStats.to_dict``)."""
    return {k: v for k, v in info.items() if isinstance(v, dict) and isinstance(v.get("samples_ms"), list)
            and v["samples_ms"]}


def _plot_timings(data: dict[str, Any], out_dir: Path, name: str, limit: int = 12) -> Path | None:
    """Every timing a benchmark recorded in its info, as box plots of the raw samples (ms), one panel per benchmark
    (the first ``limit``): what was timed and how much it varied, asserted or not."""
    plt = _pyplot()

    panels = [(b.get("name", "?"), t) for b in data.get("benchmarks", [])
              if (t := _timings((b.get("extra_info") or {}).get("info") or {}))][:limit]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, sum(0.35 * len(t) + 0.9 for _, t in panels)),
                             squeeze=False)
    for ax, (test, timings) in zip(axes[:, 0], panels):
        labels = [f"{k} [{'host' if v.get('clock') == 'host' else 'CUDA events'}]" for k, v in timings.items()]
        samples = [v["samples_ms"] for v in timings.values()]
        ax.boxplot(samples, orientation="horizontal", tick_labels=labels)
        lo = min(min(x) for x in samples)
        if lo > 0 and max(max(x) for x in samples) / lo > 50:
            ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_title(test, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    p = out_dir / f"{name}_timings.png"
    _save(plt, fig, p)
    return p


# method label -> key of its median latency in a resume benchmark's info (tests_exp3/test_resume_latency.py)
CROSSOVER_METHODS = {"djinn resume": "djinn_ms", "manual pinned offload": "manual_ms", "recompute": "recompute_ms",
                     "eager (all held)": "eager_ms"}
# plotted when the run recorded them
CROSSOVER_OPTIONAL = {"manual copy in a tight loop (warm host)": "manual_tight_loop_ms"}


def _plot_crossover(data: dict[str, Any], out_dir: Path, name: str) -> Path | None:
    """Latency to continue from layer L, every method against depth, from the resume benchmarks' info."""
    plt = _pyplot()

    points: dict[str, list[tuple[int, float]]] = {}
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info") or {}
        info, layer = extra.get("info") or {}, extra.get("L")
        if layer is None or not all(k in info for k in CROSSOVER_METHODS.values()):
            continue
        for label, key in (*CROSSOVER_METHODS.items(), *CROSSOVER_OPTIONAL.items()):
            if key in info:
                points.setdefault(label, []).append((int(layer), float(info[key])))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, pts in points.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer L the session continues from")
    ax.set_ylabel("ms until layer L can compute (median)")
    ax.set_title("resume latency vs depth")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    p = out_dir / f"{name}_crossover.png"
    _save(plt, fig, p)
    return p


EDIT_METHODS = {"djinn: edit, resume from L": "djinn", "recompute from 0 (streamed)": "recompute_from_0",
                "nnsight-style whole forward (streamed)": "nnsight_style_whole_forward"}


def _plot_edit_costs(data: dict[str, Any], out_dir: Path, name: str) -> Path | None:
    """Edit -> logits against the layer L edited, the three methods and the bound max(transfer, compute) of layers
    L.., from the exp4 edit benchmarks' ``info["costs"]`` (medians)."""
    points: dict[str, list[tuple[int, float]]] = {}
    for bench in data.get("benchmarks", []):
        info = (bench.get("extra_info") or {}).get("info") or {}
        costs = info.get("costs")
        if not isinstance(costs, dict) or "layer" not in costs:
            continue
        for label, key in EDIT_METHODS.items():
            if isinstance(costs.get(key), dict) and "median_ms" in costs[key]:
                points.setdefault(label, []).append((int(costs["layer"]), float(costs[key]["median_ms"])))
        if "bound_ms" in info:
            points.setdefault("max(transfer, compute) of layers L..", []).append((int(costs["layer"]),
                                                                                  float(info["bound_ms"])))
    if not points:
        return None
    return _line_plot(points, out_dir / f"{name}_edit_cost_vs_layer.png", xlabel="layer L edited",
                      ylabel="edit -> logits, ms (median)", title="an edit costs only the layers after it",
                      dashed=("max(transfer, compute) of layers L..",))


def _plot_batched_decode(data: dict[str, Any], out_dir: Path, name: str) -> Path | None:
    """Aggregate tokens/s against the batch size k: Djinn's batched decode of the deep model with its copy-bound line
    k x ceiling / streamed bytes (``info["runs"]``), and on the peer's shallower model of the same architecture
    Djinn's (``info["same_model_runs"]``) beside the peer's (``info["peer_runs"]``), from the exp4 batched
    benchmark."""
    points: dict[str, list[tuple[int, float]]] = {}

    def add(label: str, k: Any, value: Any) -> None:
        points.setdefault(label, []).append((int(k), float(value)))

    for bench in data.get("benchmarks", []):
        info = (bench.get("extra_info") or {}).get("info") or {}
        runs = info.get("runs")
        if not isinstance(runs, dict):
            continue
        layers = ((info.get("runtime") or {}).get("streaming") or {}).get("layers")
        for k, r in runs.items():
            if isinstance(r, dict) and "tokens_per_s" in r:
                add("djinn decode_batch" + (f", {layers} layers" if layers else ""), k, r["tokens_per_s"])
                add("copy bound: k x ceiling / streamed bytes", k, r["copy_bound_tokens_per_s"])
        peer_runs = info.get("peer_runs") or {}
        for k, r in peer_runs.items():
            if isinstance(r, dict) and "tokens_per_s" in r:
                add(f"{r.get('peer', 'peer')}, {r.get('layers', '?')} layers", k, r["tokens_per_s"])
        for k, r in (info.get("same_model_runs") or {}).items():
            if isinstance(r, dict) and "tokens_per_s" in r:
                peer_layers = (peer_runs.get(k) or {}).get("layers", "?")
                add(f"djinn decode_batch, the peer's {peer_layers} layers", k, r["tokens_per_s"])
    if not points:
        return None
    return _line_plot(points, out_dir / f"{name}_tokens_per_s_vs_k.png", xlabel="sessions per batched step k",
                      ylabel="tokens/s, all sessions", title="sessions share one weight stream",
                      dashed=("copy bound: k x ceiling / streamed bytes",), logx=True)


def _line_plot(points: dict[str, list[tuple[int, float]]], path: Path, *, xlabel: str, ylabel: str, title: str,
               dashed: tuple[str, ...] = (), logx: bool = False) -> Path:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, pts in points.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker="o", label=label,
                linestyle="--" if label in dashed else "-")
    ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return path


def report_plots(data: dict[str, Any], rows: list[ClaimRow], out_dir: Path, name: str) -> list[Path]:
    """Every plot of the report ``name`` (see the module docstring), written to ``out_dir``, and the figures a test
    wrote itself next to the JSON (named ``<name>_*.png``), except those of a report whose name extends this one
    (``exp3_memory_pressure_card_*.png`` are not ``exp3_memory_pressure``'s)."""
    plots = _plot_claims(rows, out_dir, name)
    plots += [p for p in (_plot_crossover(data, out_dir, name), _plot_timings(data, out_dir, name),
                          _plot_edit_costs(data, out_dir, name), _plot_batched_decode(data, out_dir, name)) if p]
    for bench in data.get("benchmarks", []):
        info = (bench.get("extra_info") or {}).get("info") or {}
        test = bench.get("name", "?")
        if isinstance(info.get("vram"), dict):
            plots.append(_plot_vram(test, info["vram"], out_dir, name, info.get("budget_bytes")))
        if isinstance(info.get("layer_timeline"), list):
            plots.append(_plot_layer_timeline(test, info["layer_timeline"], out_dir, name))
        if isinstance(info.get("swaps"), list):
            plots.append(_plot_swaps(test, info["swaps"], out_dir, name))
    plots = [p for p in plots if p]
    longer = [p.stem + "_" for p in out_dir.glob(f"{name}_*.json")]
    plots += sorted(p for p in out_dir.glob(f"{name}_*.png")
                    if p not in plots and not any(p.name.startswith(stem) for stem in longer))
    return plots
