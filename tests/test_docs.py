"""The documentation is true: the README's and docs/python-api.md's Python blocks run as
written (on a tiny model in place of the paths), every CLI flag is on its command's page,
every public name is in the API page, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import flextron
from flextron import cli

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
API_PAGE = DOCS / "python-api.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_quickstart_runs_and_its_two_paths_agree():
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, "README has no Quickstart python block"
    namespace: dict = {}
    exec(compile(code.group(1), str(README), "exec"), namespace)
    torch.testing.assert_close(namespace["y"], namespace["y2"])


def test_readme_python_flow_runs(tiny_model_dir, text_file, tmp_path, monkeypatch):
    code = re.search(r"The same in Python[^\n]*\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, "README has no Python flow block"
    source = (
        code.group(1)
        .replace('"path/to/hf-llama", "my_texts/"', f"{str(tiny_model_dir)!r}, {str(text_file)!r}")
        .replace(
            "calib_tokens=8192", "calib_tokens=512, mlp_widths=[128, 32], head_counts=[4, 2], progress=False"
        )
        .replace("steps=200", "steps=2, progress=False")
        .replace("budgets=[1.0, 0.75, 0.5])", "budgets=[1.0, 0.75, 0.5], max_tokens=512, progress=False)")
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "my-small" / "config.json").is_file()
    assert namespace["row"].budget == 0.5 and namespace["row"].routing == "uniform"


def test_api_page_blocks_run(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = flextron.convert(
        tmp_path / "elastic", tiny_model_dir, text_file, head_counts=[4, 2], seq_len=64, calib_tokens=256,
        progress=False,
    )  # fmt: skip
    namespace: dict = {}
    for block in python_blocks(API_PAGE):
        source = (
            block.replace('"path/to/hf-llama"', repr(str(tiny_model_dir)))
            .replace('"runs/smollm2-elastic"', repr(str(checkpoint)))
            .replace("steps=20,", "steps=2,")
            .replace("calib_tokens=4096,", "calib_tokens=512, mlp_widths=[128, 32], head_counts=[4, 2],")
        )
        exec(compile(source, str(API_PAGE), "exec"), namespace)
    assert namespace["tokens"].shape[0] == 2 and namespace["y16"].dtype == torch.bfloat16


def test_every_cli_flag_is_documented():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(cli.COMMANDS)
    for command, parser in commands.items():
        page = DOCS / "cli" / f"{command}.md"
        assert page.is_file(), f"no docs page for `flextron {command}`"
        text = page.read_text()
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}`" in text, f"{page.name} does not document {flag}"


def test_every_public_name_is_on_the_api_page():
    text = API_PAGE.read_text()
    missing = [name for name in flextron.__all__ if name not in text and not name.isupper()]
    assert not missing, f"docs/python-api.md does not mention {missing}"


def test_relative_links_resolve():
    for page in [README, *DOCS.rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
