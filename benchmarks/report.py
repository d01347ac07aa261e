"""The benchmark's JSON document (rows merged across runs), its markdown page and its plot.

The files are written by `stem.report`, the writer `python -m stem evaluate` uses too; this module says
what the benchmarks' rows, tables and plots are.
"""

from __future__ import annotations

from pathlib import Path

from stem.report import Column, read_doc, save_figure, write_report
from stem.report import markdown_table as columns_table
from stem.report import merge_rows as merged

from .measure import PEAK_MEMORY, machine_info

BENCHES = ("attention", "inversion", "edit", "full", "full-edit")
MODES = {"attention": ("ddim", "inflated", "stem", "stem-naive"), "inversion": ("ddim", "stem", "inflated"),
         "edit": ("ddim", "tokenflow")}
# every mode, in table order; for `edit`, "ddim" is the 3·N per-frame UNet evaluations the editors are compared with
ALL_MODES = (
    "ddim",
    "inflated",
    "stem",
    "stem-fused",
    "stem-canny",
    "stem-naive",
    "tokenflow",
    "fatezero",
)  # stem-fused: CUDA + Triton
PLOTTED = ("attention", "inversion", "edit")  # benches swept over N; full jobs are one N each
FULL_JOB = (
    "full, full-edit: one whole job (every step, VAE included) on SD-1.5's architecture with random weights, "
    "timed once; `peak MiB` there is the absolute peak of torch.cuda.max_memory_allocated() (weights included) and "
    "`estimate MiB` is stem.memory's estimate for the job (margin and reserve included)."
)


def _key(row: dict) -> tuple:
    return (row["bench"], row["mode"], row["frames"], row.get("tokens"), row.get("size"), row["device"], row["dtype"],
            row.get("steps"))


def merge_rows(path: Path, rows: list[dict]) -> dict:
    """The document of `path` (if any) with `rows` merged in (a row replaces one with the same key)."""
    doc = read_doc(path)
    order = {m: i for i, m in enumerate(ALL_MODES)}
    ordered = merged(doc.get("rows", []), rows, _key,
                     lambda r: (BENCHES.index(r["bench"]), r["device"], r["dtype"], r.get("tokens") or r.get("size"),
                                r["frames"], order[r["mode"]]))
    return {**doc, "machine": doc.get("machine") or machine_info(),  # rows from another machine carry their own
            "seconds": "median over the timed calls after warm-up, modes interleaved", "peak_mb": PEAK_MEMORY,
            "rows": ordered}


def machine_summary(info: dict) -> str:
    """"CPU, N cores (T torch threads), torch V[, GPU]": what a row was measured on."""
    return (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), torch {info['torch']}"
            + (f", GPU {info['gpu']}" if "gpu" in info else ""))


def write_reports(rows: list[dict], json_path: Path | None, md_path: Path | None, plot_path: Path | None,
                  reread: bool, merge=None, table=None, document=None, draw=None) -> None:
    """Merge `rows` into the JSON file (or, with `reread`, only read it), print the table, write the page and plot.

    A bench with its own row layout passes its own `merge`, `table`, `document` and `draw`.
    """
    merge, table = merge or merge_rows, table or markdown_table
    doc = None  # the JSON file's rows: the table of the page and the plot
    if json_path:
        doc = read_doc(json_path) if reread else merge(json_path, rows)
    print()
    print(table(rows or doc["rows"]))
    write_report(doc or {"rows": rows}, json_path=json_path if json_path and rows else None, md_path=md_path,
                 png_path=plot_path, markdown=document or markdown_document, plot=draw or plot)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, with each mode's time relative to ddim at the same N."""
    ddim = {(_key(r)[0],) + _key(r)[2:]: r["seconds"] for r in rows if r["mode"] == "ddim"}

    def ratio(r: dict) -> str:
        base = ddim.get((_key(r)[0],) + _key(r)[2:])
        return f"{r['seconds'] / base:.2f}" if base else "-"

    return columns_table([
        Column("bench", lambda r: r["bench"]), Column("N", lambda r: r["frames"], right=True),
        Column("tokens / px", lambda r: r.get("tokens") if r["bench"] == "attention" else r.get("size"), right=True),
        Column("mode", lambda r: r["mode"]), Column("seconds", lambda r: f"{r['seconds']:.3f}", right=True),
        Column("× ddim", ratio, right=True), Column("peak MiB", lambda r: f"{r['peak_mb']:.0f}", right=True),
        Column("timed calls", lambda r: r.get("repeats", "-"), right=True),
        Column("device", lambda r: r["device"]), Column("dtype", lambda r: r["dtype"]),
    ], rows)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


FULL_JOB_COLUMNS = [Column(name, lambda r, name=name: _cell(r.get(name))) for name in (
    "bench", "mode", "frames", "size", "steps", "seconds", "seconds_inverting", "seconds_reconstructing",
    "seconds_editing", "peak_mb", "estimate_mb", "peak_reserved_mb", "finite", "note")]
SECTION_COLUMNS = [Column("section", lambda s: s["name"]), Column("status", lambda s: s["status"]),
                   Column("seconds", lambda s: f"{s.get('seconds', 0):.0f}", right=True),
                   Column("note", lambda s: s.get("note", ""))]


def full_jobs_table(rows: list[dict]) -> str:
    """The whole jobs' details: phases, estimate against peak, finiteness, notes."""
    return columns_table(FULL_JOB_COLUMNS, [r for r in rows if r["bench"] in ("full", "full-edit")])


def sections_table(sections: dict[str, dict]) -> str:
    """The GPU check's sections: status, seconds, note."""
    return columns_table(SECTION_COLUMNS, [{"name": name, **s} for name, s in sections.items()])


def markdown_document(doc: dict) -> str:
    """The benchmark page: machine, how it was measured, the tables."""
    machine = machine_summary(doc["machine"])
    elsewhere = {}
    for r in doc["rows"]:
        if r.get("machine", machine) != machine:
            elsewhere.setdefault(r["machine"], set()).add(r["bench"])
    parts = [
        "# Benchmarks: self-attention modes, editing and whole jobs against the number of frames N", "",
        f"Machine: {machine}."
        + "".join(f" The {', '.join(sorted(b))} rows: {m}." for m, b in elsewhere.items()), "",
        f"`seconds`: {doc['seconds']}. `peak MiB`: {doc['peak_mb']}", "",
        markdown_table(doc["rows"]), "",
    ]
    if any(r["bench"] in ("full", "full-edit") for r in doc["rows"]):
        parts += ["## Whole jobs", "", FULL_JOB, "", full_jobs_table(doc["rows"]), ""]
    if doc.get("sdpa"):
        parts += ["## Scaled-dot-product attention kernels", "", doc["sdpa"].get("about", ""), "",
                  "| query | key length | head dim | " + " | ".join(doc["sdpa"]["backends"]) + " |",
                  "|---|---:|---:|" + "---|" * len(doc["sdpa"]["backends"])]
        for case in doc["sdpa"]["cases"]:
            parts.append(f"| {case['name']} | {case['keys']} | {case['head_dim']} | "
                         + " | ".join(case["usable"].get(b, "-") for b in doc["sdpa"]["backends"]) + " |")
        if doc["sdpa"].get("ran"):
            parts += ["", "Kernels that ran in the processors (profiler): "
                      + "; ".join(f"{k}: {v}" for k, v in doc["sdpa"]["ran"].items()) + "."]
        parts.append("")
    if doc.get("sections"):
        parts += ["## Sections of the GPU check", "", sections_table(doc["sections"]), ""]
    return "\n".join(parts)


def plot(rows: list[dict], path: Path) -> None:
    """Seconds and peak memory against N, one line per mode; one row of two panels per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    benches = [b for b in PLOTTED if any(r["bench"] == b for r in rows)]
    fig, axes = plt.subplots(max(1, len(benches)), 2, figsize=(10, 3.8 * max(1, len(benches))), squeeze=False)
    for (ax_time, ax_mem), bench in zip(axes, benches):
        picked = [r for r in rows if r["bench"] == bench]
        shape = "tokens" if bench == "attention" else "size"
        where = f"{picked[0]['device']} {picked[0]['dtype']}, {shape} {picked[0].get(shape)}"
        for mode in ALL_MODES:
            line = sorted((r["frames"], r["seconds"], r["peak_mb"]) for r in picked if r["mode"] == mode)
            if not line:
                continue
            n, seconds, peak = zip(*line)
            label = "3N per-frame UNet" if bench == "edit" and mode == "ddim" else mode
            ax_time.plot(n, seconds, marker="o", label=label)
            ax_mem.plot(n, peak, marker="o", label=label)
        times = [r["seconds"] for r in picked]
        log = max(times) > 20 * min(times)  # inflated attention: two orders of magnitude
        ax_time.set(title=f"{bench}: time ({where})", xlabel="frames N",
                    ylabel="seconds (log scale)" if log else "seconds", yscale="log" if log else "linear")
        if log:
            ax_time.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax_mem.set(title=f"{bench}: peak memory above baseline", xlabel="frames N", ylabel="MiB")
        for ax, values in ((ax_time, times), (ax_mem, [r["peak_mb"] for r in picked])):
            if len({r["frames"] for r in picked}) == 1 and ax.get_yscale() == "linear":
                ax.set_ylim(0, 1.15 * max(values))  # one N: points, compared from zero
            ax.set_xticks(sorted({r["frames"] for r in picked}))
            ax.grid(alpha=0.3)
            ax.legend()
    save_figure(fig, path)
