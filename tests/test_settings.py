"""stem.settings: a setting defined once in a dataclass field; checks, metrics and faces derived from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest

from stem.engine import InversionSettings
from stem.settings import SettingError, check, for_face, metrics, setting, spec, specs


@dataclass(frozen=True)
class Inner:
    enabled: bool = setting(True, label="Inner", help="inner switch", flag="--inner")
    gain: float = setting(1.5, label="Inner gain", help="inner gain", minimum=0, maximum=10, flag="--inner-gain")


@dataclass(frozen=True)
class Toy:
    count: int = setting(3, label="Count K", words="the count K", help="how many", minimum=1, maximum=8,
                         note="3 is usual")
    limit: int | None = setting(None, label="Limit", help="a limit", minimum=1)
    scale: float = setting(1.0, label="Scale", help="a scale", minimum=0)
    kind: str = setting("a", label="Kind", help="which kind", choices=("a", "b"))
    pairs: tuple[tuple[str, float], ...] = setting((), label="Pairs", help="word pairs")
    extra: int = setting(0, label="Extra", help="only for kind b", when=lambda s: s.kind == "b")
    hidden: int = setting(0, label="Hidden", help="not recorded", faces={"cli"})
    inner: Inner = setting(default_factory=Inner, label="Inner settings", help="nested")
    plain: int = 7  # not a setting


def test_specs_read_the_fields_metadata_in_order():
    names = [s.name for s in specs(Toy)]
    assert names == ["count", "limit", "scale", "kind", "pairs", "extra", "hidden", "inner"]
    count = spec(Toy, "count")
    assert (count.type, count.default, count.label, count.words, count.flag) == (
        int,
        3,
        "Count K",
        "the count K",
        "--count",
    )
    assert (count.minimum, count.maximum, count.faces) == (1, 8, frozenset({"cli", "app", "api", "metrics"}))
    limit = spec(Toy, "limit")
    assert limit.words == "limit" and limit.optional and limit.base_type is int and limit.default is None
    assert spec(Toy, "inner").nested and spec(Toy, "inner").default == Inner()
    assert specs(Toy()) == specs(Toy)
    with pytest.raises(KeyError):
        spec(Toy, "plain")


@pytest.mark.parametrize("bad, name, sentence", [
    (dict(count=0), "count", "The count K must be between 1 and 8 (3 is usual), got 0."),
    (dict(count=1.5), "count", "The count K must be a whole number (an int), got 1.5."),
    (dict(count=2.0), "count", "The count K must be a whole number (an int), got 2.0."),  # would split a cache key
    (dict(count=True), "count", "The count K must be a whole number (an int), got True."),
    (dict(limit=0), "limit", "Limit must be 1 or more, got 0."),
    (dict(scale=-0.5), "scale", "Scale must be 0 or more, got -0.5."),
    (dict(scale=float("nan")), "scale", "Scale must be a finite number, got nan."),
    (dict(scale="1"), "scale", "Scale must be a finite number, got '1'."),
    (dict(kind="c"), "kind", "Kind must be one of: a, b, got 'c'."),
    (dict(inner=Inner(gain=11.0)), "gain", "Inner gain must be between 0 and 10, got 11.0."),
    (dict(inner=Inner(enabled=1)), "enabled", "Inner is a switch (True or False), got 1."),
    (dict(inner="on"), "inner", "Inner settings must be a Inner, got 'on'."),
])
def test_check_refuses_the_first_bad_field_in_one_sentence_of_words(bad, name, sentence):
    with pytest.raises(SettingError) as error:
        check(Toy(**bad))
    assert str(error.value) == sentence and error.value.setting == name
    assert "--" not in str(error.value)


def test_check_passes_good_settings_and_allows_none_where_optional():
    check(Toy())
    check(Toy(limit=5, scale=2, kind="b", inner=Inner(False, 0.0)))  # an int is a number


def test_for_face_puts_the_face_name_first():
    error = SettingError("count", "The count K must be between 1 and 8, got 0.")
    assert for_face(error, "--count") == "--count: the count K must be between 1 and 8, got 0."
    assert for_face(error, "Count K") == "Count K: the count K must be between 1 and 8, got 0."
    assert (
        for_face(SettingError("b1", "FreeU b1 must be a number."), "--freeu-b1")
        == "--freeu-b1: FreeU b1 must be a number."
    )


def test_metrics_records_what_applies_flattening_nested_settings():
    assert metrics(Toy(pairs=(("cat", 2.0),))) == {
        "count": 3, "limit": None, "scale": 1.0, "kind": "a", "pairs": {"cat": 2.0}, "inner": True, "inner_gain": 1.5}
    assert metrics(Toy(kind="b"))["extra"] == 0  # `when` holds


def test_a_new_field_appears_in_specs_and_metrics_with_no_other_edit():
    Bigger = dataclasses.make_dataclass(
        "Bigger", [("brand_new", int, setting(4, label="Brand new", help="a new setting", minimum=0))],
        bases=(Toy,), frozen=True)
    assert specs(Bigger)[-1].name == "brand_new" and metrics(Bigger())["brand_new"] == 4
    with pytest.raises(SettingError, match=r"^Brand new must be 0 or more, got -1\.$"):
        check(Bigger(brand_new=-1))


# -- InversionSettings ---------------------------------------------------------------------------

def old_inversion_block(s: InversionSettings) -> dict:
    """metrics.json's settings of an inversion as inversion_metrics wrote them by hand (before stem.settings)."""
    block = {"method": s.method, "model": s.model, "num_steps": s.num_steps, "prompt": s.prompt, "stride": s.stride,
             "size": s.size}
    if s.method == "stem":
        block.update(num_bases=s.num_bases, num_iters=s.num_iters, seed=s.seed)
    if s.control != "none":
        block.update({k: v for k, v in s.result_fields().items() if k.startswith(("control", "canny", "depth"))})
    return block


@pytest.mark.parametrize(
    "changes",
    [
        {},
        dict(method="ddim"),
        dict(method="inflated", control="canny"),
        dict(control="depth", control_scale=0),
        dict(control="canny", model="tiny-random"),
    ],
)
def test_inversion_metrics_keep_their_keys_and_values(changes):
    s = dataclasses.replace(InversionSettings(), **changes)
    block = metrics(s)
    block.update({k: v for k, v in s.result_fields().items() if k in block})  # as inversion_metrics does
    assert block == old_inversion_block(s)


def test_every_inversion_field_is_a_setting_with_a_one_line_help():
    fields = [f.name for f in dataclasses.fields(InversionSettings)]
    assert [s.name for s in specs(InversionSettings)] == fields
    for s in specs(InversionSettings):
        assert s.default == getattr(InversionSettings(), s.name)
        assert s.help and "\n" not in s.help and not s.words.startswith("--")


@pytest.mark.parametrize("bad, name, flag", [
    (dict(num_bases=0), "num_bases", "--bases"), (dict(num_iters=101), "num_iters", "--iters"),
    (dict(num_steps=0), "num_steps", "--steps"), (dict(num_frames=0), "num_frames", "--frames"),
    (dict(num_frames=10_000), "num_frames", "--frames"), (dict(seed=-1), "seed", "--seed"),
    (dict(method="magic"), "method", "--method"), (dict(control="pose"), "control", "--control"),
    (dict(control_scale=-1.0), "control_scale", "--control-scale"), (dict(canny_low=300), "canny_low", "--canny-low"),
    (dict(prompt=3), "prompt", "--source-prompt"),
])
def test_inversion_errors_name_the_setting_in_words_and_the_cli_adds_its_flag(bad, name, flag):
    from stem.cli import cli_message

    with pytest.raises(SettingError) as error:
        dataclasses.replace(InversionSettings(), **bad).validate()
    assert error.value.setting == name and "--" not in str(error.value) and str(error.value).count(". ") == 0
    assert cli_message(error.value).startswith(f"{flag}: ")


def test_the_cli_prints_the_flag_of_a_bad_setting_before_any_work(tmp_path, capsys):
    from stem.cli import main

    code = main(["invert", str(tmp_path / "no-such.mp4"), "--model", "tiny-random", "--bases", "0",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --bases: the number of bases K must be between 1 and 4096"), err
    assert not (tmp_path / "out").exists()


# -- a new setting reaches every face with no other edit (issue 18: the CLI and metrics.json sides) --------------

@pytest.fixture
def clip_file(tmp_path):
    from conftest import make_frames
    from stem.video import write_video

    write_video(tmp_path / "clip.mp4", make_frames(2, 64, 64, seed=0), 12.0)
    return tmp_path / "clip.mp4"


def with_new_setting(cls, name: str):
    """A copy of a settings dataclass with one more `setting(...)` field, as a contributor would add it."""
    new = setting(0.25, label=name.capitalize(), help=f"the brand-new {name} setting", minimum=0)
    return dataclasses.make_dataclass(cls.__name__, [(name, float, new)], bases=(cls,), frozen=True)


def run_cli(args, capsys):
    from stem.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--model", "tiny-random", "--steps", "1", "--size", "64", "--frames", "2"]


def test_a_new_inversion_setting_reaches_help_errors_and_metrics_json(monkeypatch, clip_file, tmp_path, capsys):
    import stem.cli.options as options

    monkeypatch.setattr(options, "InversionSettings", with_new_setting(InversionSettings, "warmth"))
    with pytest.raises(SystemExit):
        run_cli(["invert", "--help"], capsys)
    assert "--warmth WARMTH" in " ".join(capsys.readouterr().out.split())
    code, _, err = run_cli(["invert", clip_file, *FAST, "--warmth", "-1", "--out", tmp_path / "never"], capsys)
    assert code == 2 and err == "error: --warmth: warmth must be 0 or more, got -1.0.\n"
    code, _, err = run_cli(
        [
            "invert",
            clip_file,
            *FAST,
            "--method",
            "ddim",
            "--warmth",
            "0.5",
            "--out",
            tmp_path / "out",
            "--cache-dir",
            tmp_path / "cache",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["warmth"] == 0.5


def test_a_new_edit_setting_reaches_help_and_metrics_json(monkeypatch, clip_file, tmp_path, capsys):
    import stem.cli.options as options
    from stem.editing import TokenFlowSettings

    monkeypatch.setitem(options.EDITOR_SETTINGS, "tokenflow", with_new_setting(TokenFlowSettings, "sharpness"))
    with pytest.raises(SystemExit):
        run_cli(["edit", "--help"], capsys)
    assert "--sharpness SHARPNESS the brand-new sharpness setting (default: 0.25)" in " ".join(
        capsys.readouterr().out.split()
    )
    code, _, err = run_cli(["edit", clip_file, *FAST, "--method", "ddim", "--prompt", "a dog", "--sharpness", "2",
                            "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["sharpness"] == 2.0


def test_editor_metrics_keep_their_keys_and_values():
    from stem.editing import FateZeroSettings, FreeUSettings, TokenFlowSettings

    t = TokenFlowSettings("a dog", pnp_attn=0.3, freeu=FreeUSettings(b1=1.1))
    freeu = {"freeu": True, "freeu_b1": 1.1, "freeu_b2": 1.4, "freeu_s1": 0.9, "freeu_s2": 0.2}
    assert t.metrics() == {"prompt": "a dog", "negative_prompt": t.negative_prompt, "guidance": 7.5, "pnp_attn": 0.3,
                           "pnp_conv": 0.8, "batch_size": 8, "attention": "extended", "propagation": "previous",
                           **freeu, "seed": 0}  # as TokenFlowSettings.metrics wrote it by hand
    f = FateZeroSettings("a big dog", source_prompt="a cat", reweight=(("big", 2.0),),
                         cross_replace_words=(("dog", 0.4),), seed=3)
    assert f.metrics() == {
        "prompt": "a big dog", "negative_prompt": "", "guidance": 7.5, "self_replace": 0.6, "cross_replace": 0.8,
        "word_map": "auto", "reweight": {"big": 2.0}, "blend_words": "", "blend_threshold": 0.3, "blend_start": 0.2,
        "blend_end": 0.8, "source_maps": "inversion", "blend_level": "input", "cross_replace_words": {"dog": 0.4},
        "blend_self_attention": True, "blend_latents": False, **freeu, "freeu": False, "freeu_b1": 1.2}
