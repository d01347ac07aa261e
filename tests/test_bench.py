"""The benchmark command end to end (tiny shapes), and the fast STEM path against the naive reference."""

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention

from stem.attention import AttentionState, StemAttnProcessor, attention_mode
from stem.bench import NaiveStemAttnProcessor, install, main

ROW_KEYS = {"bench", "mode", "frames", "seconds", "peak_mb", "device", "dtype", "memory"}


def test_attention_and_inversion_benchmarks_write_one_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["attention", "--tokens", "64", "--frames", "1,2", "--repeats", "1", "--bases", "8", "--iters", "2",
          "--json", str(out)])
    main(["inversion", "--unet", "tiny", "--size", "64", "--frames", "1,2", "--repeats", "1", "--bases", "8",
          "--iters", "2", "--json", str(out), "--md", str(tmp_path / "bench.md"), "--plot", str(tmp_path / "bench.png")])

    rows = json.loads(out.read_text())["rows"]
    attention = [r for r in rows if r["bench"] == "attention"]
    inversion = [r for r in rows if r["bench"] == "inversion"]
    assert {(r["mode"], r["frames"]) for r in attention} == {
        (m, n) for m in ("ddim", "inflated", "stem", "stem-naive") for n in (1, 2)}
    assert {(r["mode"], r["frames"]) for r in inversion} == {(m, n) for m in ("ddim", "stem", "inflated") for n in (1, 2)}
    for r in rows:
        assert ROW_KEYS <= r.keys() and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["seconds"] > 0 and r["peak_mb"] >= 0
    assert all(r["tokens"] == 64 for r in attention) and all(r["size"] == 64 for r in inversion)

    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "bench.md").read_text()
    assert page.count("| attention |") == 8 and page.count("| inversion |") == 6
    assert "| inversion | 2 | 64 | stem |" in capsys.readouterr().out  # the table is printed too


def test_rerunning_a_mode_replaces_its_rows(tmp_path):
    out = tmp_path / "bench.json"
    args = ["attention", "--tokens", "16", "--frames", "1", "--repeats", "1", "--bases", "4", "--iters", "1", "--json", str(out)]
    main(args + ["--modes", "ddim,stem"])
    main(args + ["--modes", "stem"])
    assert sorted(r["mode"] for r in json.loads(out.read_text())["rows"]) == ["ddim", "stem"]


def test_report_rerenders_the_page_and_plot_without_running(tmp_path):
    out = tmp_path / "bench.json"
    main(["attention", "--tokens", "16", "--frames", "1", "--repeats", "1", "--bases", "4", "--iters", "1",
          "--modes", "ddim", "--json", str(out)])
    before = out.read_text()
    main(["report", "--json", str(out), "--md", str(tmp_path / "b.md"), "--plot", str(tmp_path / "b.png")])
    assert out.read_text() == before
    assert "| attention | 1 | 16 | ddim |" in (tmp_path / "b.md").read_text() and (tmp_path / "b.png").exists()


def test_unknown_mode_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["attention", "--modes", "ddim,fast"])


@torch.no_grad()
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 1000])  # one chunk; many ragged ones
def test_fast_stem_equals_the_naive_reference(groups, chunk_elements):
    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16).eval()
    # keys spread widely enough that most logits / tau lie far below their row's maximum
    x = 3 * torch.randn(groups * 3, 50, 64, generator=torch.Generator().manual_seed(1))

    def run(cls, seed=0):
        state = AttentionState(method="stem", num_bases=8, num_iters=3, seed=seed, num_groups=groups,
                               em_chunk_elements=chunk_elements)
        attn.set_processor(cls(state))
        return attn(x)

    fast, naive = run(StemAttnProcessor), run(NaiveStemAttnProcessor)
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(run(StemAttnProcessor, seed=1), naive, rtol=1e-3, atol=1e-3)  # the check can fail


@torch.no_grad()
def test_naive_reference_installs_like_the_engine_on_a_unet(tiny_parts):
    unet = tiny_parts.unet
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(1))
    state = AttentionState(method="stem", num_bases=6, num_iters=2, step=3)
    with attention_mode(unet, state):
        fast = unet(x, 10, encoder_hidden_states=text).sample
    with install(unet, "stem-naive", state):
        naive = unet(x, 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-4)  # 10 sharp (tau = 0.01) EMs in a row
    with attention_mode(unet, AttentionState(method="stem", num_bases=6, num_iters=2, step=4)):
        other_step = unet(x, 10, encoder_hidden_states=text).sample
    assert not torch.allclose(other_step, naive, rtol=1e-3, atol=1e-3)  # same layer seeds matter
