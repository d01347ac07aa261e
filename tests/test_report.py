"""stem.report, the one rows -> JSON / CSV / markdown / PNG writer of the benchmarks and evaluate."""

import csv
import io
import json

import pytest

from stem.report import Column, markdown_table, merge_rows, read_doc, rows_csv, save_figure, write_report

ROWS = [{"clip": "ball", "psnr": 31.5, "method": "stem"}, {"clip": "city", "method": "ddim", "error": "out of memory"}]


def draw(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.bar(range(len(rows)), [r.get("psnr", 0) for r in rows])
    save_figure(fig, path, dpi=50)


def test_every_file_of_a_report_holds_the_document(tmp_path):
    doc = {"model": "tiny-random", "rows": ROWS}
    write_report(doc, json_path=tmp_path / "r.json", csv_path=tmp_path / "r.csv", md_path=tmp_path / "r.md",
                 png_path=tmp_path / "r.png", markdown=lambda d: f"# {d['model']}: {len(d['rows'])} rows\n", plot=draw,
                 csv_first=("clip", "method"))
    assert json.loads((tmp_path / "r.json").read_text()) == doc == read_doc(tmp_path / "r.json")
    table = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert list(table[0]) == ["clip", "method", "error", "psnr"]  # the first columns, then the rest sorted
    assert table == [{"clip": "ball", "method": "stem", "error": "", "psnr": "31.5"},
                     {"clip": "city", "method": "ddim", "error": "out of memory", "psnr": ""}]
    assert (tmp_path / "r.md").read_text() == "# tiny-random: 2 rows\n"
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json", "r.md", "r.png"]  # no temp files left


def test_a_failing_plot_leaves_the_previous_png_and_no_temp_file(tmp_path):
    (tmp_path / "r.png").write_bytes(b"old")

    def broken(rows, path):
        path.write_bytes(b"half a PNG")
        raise RuntimeError("the plot failed")

    with pytest.raises(RuntimeError):
        write_report({"rows": ROWS}, png_path=tmp_path / "r.png", plot=broken)
    assert (tmp_path / "r.png").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["r.png"]


def test_strict_json_refuses_nan_before_writing(tmp_path):
    with pytest.raises(ValueError):
        write_report({"rows": [{"psnr": float("nan")}]}, json_path=tmp_path / "r.json", allow_nan=False)
    assert not (tmp_path / "r.json").exists()
    write_report({"rows": [{"psnr": float("nan")}]}, json_path=tmp_path / "r.json")  # the benchmarks' default
    assert "NaN" in (tmp_path / "r.json").read_text()


def test_a_page_needs_its_renderer():
    with pytest.raises(ValueError):
        write_report({"rows": []}, md_path="page.md")


def test_merging_replaces_rows_of_the_same_key_and_sorts():
    old = [{"n": 2, "s": 1.0}, {"n": 1, "s": 2.0}]
    new = [{"n": 2, "s": 9.0}, {"n": 3, "s": 0.5}]
    assert merge_rows(old, new, key=lambda r: (r["n"],), order=lambda r: r["n"]) == [
        {"n": 1, "s": 2.0}, {"n": 2, "s": 9.0}, {"n": 3, "s": 0.5}]


def test_markdown_table_aligns_numbers_right():
    columns = [Column("clip", lambda r: r["clip"]), Column("PSNR", lambda r: f"{r.get('psnr', 0):.1f}", right=True)]
    assert markdown_table(columns, ROWS).splitlines() == [
        "| clip | PSNR |", "|---|---:|", "| ball | 31.5 |", "| city | 0.0 |"]
    assert rows_csv([]) == "\n"  # no rows, no columns: an empty header line
