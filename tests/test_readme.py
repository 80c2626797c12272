"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"


def test_quickstart_runs_and_its_two_paths_agree():
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, "README has no Quickstart python block"
    namespace: dict = {}
    exec(compile(code.group(1), str(README), "exec"), namespace)
    torch.testing.assert_close(namespace["y"], namespace["y2"])


def test_attention_example_runs():
    code = re.search(r"### Elastic attention\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, "README has no Elastic attention python block"
    import flextron

    namespace: dict = {"torch": torch, "flextron": flextron}
    exec(compile(code.group(1), str(README), "exec"), namespace)
    assert namespace["step"].shape == (2, 1, 576)
    assert namespace["cache"].length == 17


def test_model_example_runs(tiny_model_dir, tmp_path):
    code = re.search(
        r"In Python \(after `flextron convert[^\n]*\n\n```python\n(.*?)```", README.read_text(), re.S
    )
    assert code is not None, "README has no elastic-model python block"
    from flextron import cli

    checkpoint = tmp_path / "elastic"
    argv = ["convert", "--model", str(tiny_model_dir), "--out", str(checkpoint), "--quiet"]
    assert cli.main([*argv, "--seq-len", "64", "--calib-tokens", "256", "--head-widths", "4,2"]) == 0
    source = code.group(1).replace('"runs/smollm2-elastic"', repr(str(checkpoint)))
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    assert (
        namespace["tokens"].shape[0] == 2
        and namespace["tokens"].shape[1] > namespace["batch"].input_ids.shape[1]
    )
