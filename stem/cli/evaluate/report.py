"""The tables of an evaluation: results.json / .csv, and summary.md / .png with the paper's mean ± std.

The files are written by `stem.report`, the one report writer (the benchmarks' too); this module says what
the summary page and figure show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...metrics import TINY_CLIP
from ...models import TINY_MODEL
from ...report import Column, markdown_table, save_figure, write_report
from .plan import EDIT, RECONSTRUCTION, Plan

RESULT_FILES = ("results.json", "results.csv", "summary.md", "summary.png")  # written last, by the main process
# the columns of results.csv, in order (a row has the ones that apply to its kind)
COLUMNS = (
    "id", "clip", "video", "kind", "method", "editor", "prompt", "source_prompt", "num_frames", "width", "height",
    "psnr", "ssim", "psnr_vae", "ssim_vae", "psnr_vs_vae", "ssim_vs_vae", "warp_error", "warp_error_source",
    "clip_text", "frame_acc", "tem_con", "clip_model", "seconds", "seconds_job", "cache_hit", "process_index",
    "device", "file", "skipped", "error", "fingerprint",
)
RECONSTRUCTION_METRICS = ("psnr", "ssim", "psnr_vae", "ssim_vae", "psnr_vs_vae", "ssim_vs_vae", "warp_error",
                          "warp_error_source")
# summary tables: (row key, column title, +1 if higher is better else -1, number format)
RECONSTRUCTION_TABLE = (("psnr", "PSNR (dB)", 1, "{:.2f}"), ("ssim", "SSIM", 1, "{:.4f}"),
                        ("psnr_vs_vae", "PSNR vs VAE (dB)", 1, "{:.2f}"), ("warp_error", "warp error", -1, "{:.5f}"),
                        ("seconds", "seconds", -1, "{:.1f}"))
EDIT_TABLE = (("clip_text", "CLIP text", 1, "{:.4f}"), ("frame_acc", "Frame-Acc", 1, "{:.3f}"),
              ("tem_con", "Tem-Con", 1, "{:.4f}"), ("warp_error", "warp error", -1, "{:.5f}"),
              ("seconds", "seconds", -1, "{:.1f}"))


def write_results(out: Path, plan: Plan, args, rows: list[dict], num_processes: int) -> None:
    """results.json, results.csv, summary.md and summary.png of the gathered rows (each written atomically)."""
    header = {"manifest": str(args.video), "model": args.model, "methods": plan.methods, "editors": plan.editors,
              "clip_model": plan.clip_model, "num_steps": args.steps, "num_bases": args.bases,
              "num_iters": args.iters, "seed": args.seed, "num_processes": num_processes}
    write_report({**header, "rows": rows}, json_path=out / "results.json", csv_path=out / "results.csv",
                 md_path=out / "summary.md", png_path=out / "summary.png", csv_first=COLUMNS,
                 markdown=lambda doc: summary_markdown(header, doc["rows"]), plot=plot_summary,
                 indent=2, allow_nan=False, final_newline=False)


def table_groups(rows: list[dict], kind: str) -> dict[str, list[dict]]:
    """Rows of one kind without errors, by method (reconstruction) or 'editor / method' (edit), in order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["kind"] == kind and not row.get("error"):
            label = row["method"] if kind == RECONSTRUCTION else f"{row['editor']} / {row['method']}"
            groups.setdefault(label, []).append(row)
    return groups


def mean_std(rows: list[dict], key: str) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (0 for one value) and count of a metric; None when no row has it.

    The seconds of a reconstruction count only when it really inverted (not when it came from the cache).
    """
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
              and not (key == "seconds" and row["kind"] == RECONSTRUCTION and row.get("cache_hit"))]
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std, len(values)


def mean_std_table(groups: dict[str, list[dict]], columns, first: str) -> str:
    """A paper-style table: mean ± std per row, the best mean of each column in bold."""
    table = [{"label": label, "n": len(rows), **{key: mean_std(rows, key) for key, *_ in columns}}
             for label, rows in groups.items()]
    best = {}
    for key, _, sign, _ in columns:
        means = [row[key][0] for row in table if row[key] is not None]
        best[key] = max(means, key=lambda m: sign * m) if len(means) > 1 else None

    def cell(key: str, fmt: str):
        """The cell of one metric: mean ± std, in bold when the best mean; a dash when no row has it."""
        def text(row: dict) -> str:
            if row[key] is None:
                return "–"
            mean, std, _ = row[key]
            value = f"{fmt.format(mean)} ± {fmt.format(std)}"
            return f"**{value}**" if mean == best[key] else value
        return text

    arrows = {1: "↑", -1: "↓"}
    shown = [Column(first, lambda row: row["label"]), Column("n", lambda row: row["n"], right=True)]
    shown += [Column(f"{title} {arrows[sign]}", cell(key, fmt), right=True) for key, title, sign, fmt in columns]
    return markdown_table(shown, table)


def summary_markdown(header: dict, rows: list[dict]) -> str:
    """summary.md: what was run, the reconstruction table and the editing table, failures."""
    clips = sorted({row["clip"] for row in rows})
    lines = [f"# Evaluation of {header['manifest']}", "",
             f"Model `{header['model']}`, {len(clips)} clips, methods {', '.join(header['methods'])}, "
             f"{header['num_steps']} DDIM steps (STEM: K = {header['num_bases']}, R = {header['num_iters']}), "
             f"{header['num_processes']} process(es)."]
    if header["model"] == TINY_MODEL:
        lines.append("The model is the built-in `tiny-random` (random weights): every number here is noise.")
    lines += ["", "## Reconstruction", "",
              "Mean ± standard deviation over clips. PSNR and SSIM against the input frames, PSNR vs VAE against "
              "the VAE round trip (the best any latent method can do), warp error with the input's optical flow "
              "(lower is steadier), seconds of inversion + reconstruction (inversions from the cache left out).", ""]
    lines.append(mean_std_table(table_groups(rows, RECONSTRUCTION), RECONSTRUCTION_TABLE, "method"))
    edits = table_groups(rows, EDIT)
    if edits:
        clip = header["clip_model"]
        lines += [
            "",
            "## Editing",
            "",
            "Mean ± standard deviation over edits (clip × target prompt). "
            + (
                f"CLIP `{clip}`: CLIP text = mean cosine similarity of each edited frame to the target prompt "
                "(TokenFlow), Frame-Acc = share of frames closer to the target prompt than to the source prompt "
                "(FateZero), Tem-Con = mean cosine similarity of consecutive frames (FateZero). "
                if clip
                else "No CLIP model (--clip-model none). "
            )
            + "Warp error of the edit with the source's optical flow; seconds of editing (denoising + decoding).",
            "",
        ]
        if clip == TINY_CLIP:
            lines += ["The CLIP model is the built-in `tiny-random` (random weights): its scores mean nothing.", ""]
        lines.append(mean_std_table(edits, EDIT_TABLE, "editor / method"))
    failed = [row for row in rows if row.get("error")]
    if failed:
        lines += ["", f"## Failed jobs ({len(failed)})", ""] + [f"- `{row['id']}`: {row['error']}" for row in failed]
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[dict], path: Path) -> None:
    """summary.png: one bar chart per metric, mean with the standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(RECONSTRUCTION, key, title, sign) for key, title, sign, _ in RECONSTRUCTION_TABLE[:4]]
    panels += [(EDIT, key, title, sign) for key, title, sign, _ in EDIT_TABLE[:4]]
    panels = [p for p in panels if any(mean_std(g, p[1]) for g in table_groups(rows, p[0]).values())]
    columns = 4
    fig, axes = plt.subplots(max(1, -(-len(panels) // columns)), columns, figsize=(4 * columns, 3.4), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (kind, key, title, sign) in zip(axes.flat, panels):
        groups = table_groups(rows, kind)
        labels = [label for label, g in groups.items() if mean_std(g, key)]
        stats = [mean_std(groups[label], key) for label in labels]
        ax.bar(range(len(labels)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4,
               color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{kind}: {title} {'↑' if sign > 0 else '↓'}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path, dpi=100)
