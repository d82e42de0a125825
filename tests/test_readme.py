"""The README's commands and example outputs are the current code's.

Planner commands followed by an output block are re-run and must print exactly that block; the
layouts the shipped TOMLs name (`# plan:`) are all in the README; every option a README command
passes to one of Trinity's tools exists in that tool's --help.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex

import pytest

from tests.fixtures import REPO
from tests.test_train_configs import documented_layouts
from trinity_titan.tools import bench, convert, data_position, fetch_assets, niah, plan

README = (REPO / "README.md").read_text()
TOOLS = {
    "plan": plan,
    "convert": convert,
    "fetch_assets": fetch_assets,
    "niah": niah,
    "bench": bench,
    "data_position": data_position,
}


def blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README, re.M | re.S)


def tool_commands() -> list[tuple[str, list[str]]]:
    """(tool, arguments) of each `-m trinity_titan.tools.TOOL` command in a bash block."""
    out = []
    for lang, body in blocks():
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            m = re.search(r"-m trinity_titan\.tools\.(\w+)(.*)", line)
            if m:
                out.append((m.group(1), shlex.split(m.group(2), comments=True)))
    return out


def run(tool: str, args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = TOOLS[tool].main(args)
        except SystemExit as e:  # argparse's --help
            code = e.code
    return code, out.getvalue()


def test_planner_outputs_are_the_planners():
    shown = blocks()
    checked = 0
    for (lang, body), (next_lang, output) in zip(shown, shown[1:], strict=False):
        commands = [c for c in body.splitlines() if "-m trinity_titan.tools.plan" in c]
        if lang == "bash" and next_lang == "text" and len(commands) == 1:
            args = shlex.split(commands[0].split("-m trinity_titan.tools.plan", 1)[1])
            code, printed = run("plan", args)
            assert printed.strip() == output.strip(), f"README shows another output for {args}"
            assert code == (0 if output.strip().endswith("FITS") else 1)
            checked += 1
    assert checked >= 2


def test_every_documented_layout_is_in_the_readme():
    shown = {" ".join(args) for tool, args in tool_commands() if tool == "plan"}
    for path, layout in documented_layouts():
        command = " ".join(["--job.config_file", f"train_configs/{path.name}", *layout])
        assert command in shown, command


@pytest.mark.parametrize(
    "tool,args", tool_commands(), ids=[f"{t} {' '.join(a)[:60]}" for t, a in tool_commands()]
)
def test_readme_commands_use_options_the_tools_have(tool, args):
    sub = [args[0]] if tool == "convert" else []  # convert's subcommand has its own options
    code, help_text = run(tool, [*sub, "--help"])
    assert code == 0
    own = [a for a in args if a.startswith("--") and "." not in a]  # not TorchTitan's options
    missing = [a for a in own if a not in help_text]
    assert not missing, (tool, missing)
    if tool == "fetch_assets":
        assert args[0] in fetch_assets.FLAVOR_ASSETS
