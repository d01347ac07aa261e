"""The README stays short, and its links and those of docs/ and CONTRIBUTING.md lead somewhere."""

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(page: Path) -> list[str]:
    """The relative link targets of a markdown page, outside code blocks."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_the_readme_is_short_enough_for_a_new_user():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 350


def test_every_relative_link_reaches_a_file_and_its_heading():
    prose = {p: re.sub(r"```.*?```", "", p.read_text(), flags=re.DOTALL) for p in PAGES}
    headings = {p: {anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)} for p, text in prose.items()}
    broken = []
    for page in PAGES:
        for target in links(page):
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (fragment and fragment not in headings.get(dest, ())):
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_links_every_page_of_docs():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert set(PAGES[1:]) <= linked
    assert anchor("Structure guidance (ControlNet), in short") == "structure-guidance-controlnet-in-short"


# -- the option tables of docs/ against the parsers --------------------------------------------------

COMMANDS = ("invert", "compare", "edit", "evaluate")
# (page, the heading the table is under) -> the commands whose options that table lists; a row that names
# commands in its first cell, e.g. "`--all` (`compare`)", is for those only
OPTION_TABLES = {
    ("cli.md", "Options"): COMMANDS,
    ("editing.md", "TokenFlow"): ("edit",),
    ("editing.md", "FateZero editing"): ("edit",),
    ("editing.md", "Structure guidance (ControlNet)"): COMMANDS,
    ("evaluation.md", "Evaluation: the paper's comparison over many clips"): ("evaluate",),
}
ALSO = {"evaluate": ("edit",)}  # evaluation.md: "plus every inversion and editing option of `edit`"


def command_options(command: str) -> list[argparse.Action]:
    """The options of a command's parser, built as `python -m stem` builds it (--help left out)."""
    from stem.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if a.option_strings and a.dest != "help"]


def parser_flags() -> dict[str, tuple[set[str], set[str]]]:
    """command -> (every option flag of its parser, those --help shows)."""
    flags = {}
    for command in COMMANDS:
        actions = command_options(command)
        flags[command] = ({f for a in actions for f in a.option_strings},
                          {f for a in actions if a.help != argparse.SUPPRESS for f in a.option_strings})
    return flags


def option_rows() -> list[tuple[str, set[str], tuple[str, ...], str]]:
    """(page and heading, the flags of a row, its commands, its meaning) of every row of the option tables of docs/."""
    rows, tables = [], set()
    for page in sorted((ROOT / "docs").glob("*.md")):
        heading, table = None, None
        for line in re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL).splitlines():
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            if not line.startswith("|"):
                table = None
            elif line.startswith("| option |"):
                table = OPTION_TABLES[page.name, heading]  # a KeyError is an option table this test does not know
                tables.add((page.name, heading))
            elif table is not None and not line.startswith("|---"):
                spans = re.findall(r"`([^`]+)`", line.split("|")[1])
                flags = {f"--{no}{name}" for span in spans for opt, name in re.findall(r"--(\[no-\])?([\w-]+)", span)
                         for no in (("", "no-") if opt else ("",))}
                named = tuple(s for s in spans if s in COMMANDS)
                assert flags and all(s.startswith("--") or s in COMMANDS for s in spans), line
                rows.append((f"{page.name} § {heading}", flags, named or table, line.split("|")[2]))
    assert tables == set(OPTION_TABLES), set(OPTION_TABLES) - tables
    return rows


def test_every_option_of_every_command_is_in_an_option_table_of_the_docs():
    documented = {command: set() for command in COMMANDS}
    for _, flags, commands, _ in option_rows():
        for command in commands:
            documented[command] |= flags
    missing = {}
    for command, (_, shown) in parser_flags().items():
        pages = documented[command].union(*(documented[other] for other in ALSO.get(command, ())))
        missing.update({f"{command} {flag}": "not in the docs" for flag in sorted(shown - pages)})
    assert not missing, missing


def test_every_option_the_docs_list_exists_in_the_commands_they_list_it_for():
    flags = parser_flags()
    wrong = [f"{where}: {flag} is no option of {command}" for where, row_flags, commands, _ in option_rows()
             for command in commands for flag in sorted(row_flags - flags[command][0])]
    assert not wrong, wrong


def words(text: str) -> str:
    """Text as read: markdown's backticks and links dropped, spaces collapsed."""
    text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", text.replace("`", ""))
    return " ".join(text.split())


def test_each_option_tables_meaning_starts_with_the_options_help():
    """A row says first what `python -m stem COMMAND --help` says (its default left out), then may say more."""
    wrong = []
    for where, flags, commands, meaning in option_rows():
        options = {a.option_strings[0]: a for a in command_options(commands[0]) if set(a.option_strings) & flags}
        assert len({a.help for a in options.values()}) == 1, f"{where}: one help per row, not {sorted(options)}"
        action = next(iter(options.values()))
        text = action.help % {"default": action.default}
        text = re.sub(r" ?\(default: (?:[^()]|\([^()]*\))*\)", "", text)  # the default has its own column
        if not words(meaning).startswith(words(text)):
            wrong.append(f"{where} {sorted(flags)}: {words(meaning)!r} does not start with {words(text)!r}")
    assert not wrong, "\n".join(wrong)


def api_rows() -> dict[str, str]:
    """docs/app.md's API table: endpoint -> its parameters cell, plus "all" -> the line every endpoint ends with."""
    text = (ROOT / "docs" / "app.md").read_text()
    section = text[text.index("## API"):text.index("## Examples")]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(/\w+)` \| (.+?) \| [^|]+ \|$", section, re.M)}
    rows["all"] = re.search(r"^All three end with (.+?)\(structure guidance\)", section, re.M).group(1)
    return rows


def test_the_api_table_names_every_parameter_with_its_default():
    """A parameter added to an endpoint (from a new setting) must reach docs/app.md's API table, and every
    default the table writes is the page's (GPU) default."""
    from stem import app_settings

    rows = api_rows()
    named = {kind: set(re.findall(r"\b([a-z][a-z0-9_]*)\b(?=[=,`\s]|$)", rows[kind])) for kind in rows}
    for endpoint, cell in rows.items():
        if endpoint == "all":
            continue
        kind = endpoint.strip("/")
        covered = named[endpoint] | named["all"] | (named["/invert"] if "the `/invert` settings" in cell or
                                                   "as for `/invert`" in cell else set())
        missing = set(app_settings.ENDPOINT_INPUTS[kind]) - covered
        assert not missing, f"docs/app.md's API table lacks {sorted(missing)} of {endpoint}"
    written = {}
    for cell in rows.values():
        for name, value in re.findall(r"\b([a-z][a-z0-9_]*)=(\"[^\"]*\"|[-\d.]+)", cell):
            written[name] = value.strip('"') if value.startswith('"') else float(value)
    assert {"bases", "steps", "guidance", "freeu_b1", "control_scale"} <= set(written)
    for name, value in written.items():
        default = app_settings.DEFAULTS[name]
        assert value == (default if isinstance(value, str) else float(default)), (name, value, default)
