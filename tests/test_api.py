"""The Python API (flextron.convert, train, lut, evaluate, export, generate, bench) on a tiny
random Llama: what each returns and writes, budgets served by trained routers, and that the
API and the CLI take the same options (the CLI reads its defaults from the API: cli._option)."""

from __future__ import annotations

import inspect
import json
import math
import os

import pytest
import torch

import flextron
from flextron import api, cli, data
from flextron.benchmarks.breakdown import KINDS
from flextron.budgets import BudgetResolver
from flextron.checkpoint import load_elastic
from flextron.evaluation import mean_loss
from flextron.model import Routing
from flextron.routers import StaticRouter, TokenRouter
from tests.conftest import require_module

transformers = require_module("transformers")

API_OF = {"eval": "evaluate"}
CLI_ONLY = {"help", "quiet", "suite", "run", "command"}  # quiet -> progress, suite -> suites


def test_api_mirrors_the_cli():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for command, sub in commands.items():
        function = getattr(flextron, API_OF.get(command, command))
        parameters = inspect.signature(function).parameters
        flags = {a.dest: a for a in sub._actions if a.dest not in CLI_ONLY}
        missing = sorted(set(flags) - set(parameters))
        assert not missing, f"flextron {command} flags without an API parameter: {missing}"
        extra = sorted(set(parameters) - set(flags) - {"progress", "suites", "config"} - {"prompt"})
        if command != "train":  # train's config is also a flag
            assert not extra, f"flextron.{function.__name__} parameters without a flag: {extra}"
        for name, action in flags.items():
            default = parameters[name].default
            if action.default is None or default is inspect.Parameter.empty or name == "device":
                continue
            cli_default = tuple(action.default) if isinstance(action.default, list) else action.default
            assert cli_default == default, f"{command} --{name}: CLI {cli_default!r} vs API {default!r}"


@pytest.fixture(scope="module")
def converted(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "elastic"
    result = flextron.convert(
        out, tiny_model_dir, text_file, mlp_widths=[128, 64], head_counts=[4, 2], seq_len=64,
        calib_tokens=512, progress=False,
    )  # fmt: skip
    assert result == out and (out / "model.safetensors").is_file()
    return out


def small_config(**changes) -> flextron.TrainConfig:
    settings = {
        "batch_size": 2,
        "seq_len": 32,
        "warmup_steps": 0,
        "eval_tokens": 64,
        "budgets": (1.0, 0.6),
        "train_tokens": 4096,
    }
    return flextron.TrainConfig(**{**settings, **changes})


def test_lut_and_training_stages(converted, text_file, tmp_path):
    table = flextron.lut(converted, tmp_path / "lut.json", seq_len=32, progress=False)
    saved = json.loads((tmp_path / "lut.json").read_text())
    assert saved["mlp_ms"] == table.mlp_ms and len(table.mlp_ms) == 2 and table.full_ms() > 0

    result = flextron.train(
        converted, tmp_path / "elastic", stage="elastic", steps=2, config=small_config(),
        data=text_file, eval_data=text_file, progress=False,
    )  # fmt: skip
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    elastic = result.out_dir / (result.out_dir / "latest").read_text().strip()

    routers = flextron.train(
        elastic, tmp_path / "routers", stage="routers", steps=3, lut=tmp_path / "lut.json",
        config=small_config(), data=text_file, eval_data=text_file, seed=1, progress=False,
    )  # fmt: skip
    checkpoint = routers.out_dir / (routers.out_dir / "latest").read_text().strip()
    assert json.loads((checkpoint / "flextron.json").read_text())["routers"]["kind"] == "static"

    # evaluate serves each budget with the trained routers: the same loss as running the
    # router's argmax choices by hand.
    results = flextron.evaluate(
        checkpoint, data=text_file, budgets=[1.0, 0.6], seq_len=32, max_tokens=128, batch_size=2,
        out=tmp_path / "eval", progress=False,
    )  # fmt: skip
    assert [r.routing for r in results] == ["static router"] * 2
    model, record = load_elastic(checkpoint)
    router = StaticRouter(model.config, (1.0, 0.6), flextron.TrainConfig().router_hidden)
    from safetensors.torch import load_file

    router.load_state_dict(load_file(checkpoint / "routers.safetensors"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    batches = list(data.token_windows(tokenizer, data.read_texts(text_file), 32, 128, 2, None))
    for result_row, budget in zip(results, (1.0, 0.6), strict=True):
        with torch.no_grad():
            output = router(budget)
        loss, _ = mean_loss(model, batches, Routing(output.mlp_choice, output.attention_choice))
        assert result_row.loss == pytest.approx(loss, rel=1e-5)
        fractions = [
            model.config.layer_fraction(m, a)
            for m, a in zip(output.mlp_choice, output.attention_choice, strict=True)
        ]
        assert result_row.active_fraction == pytest.approx(sum(fractions) / len(fractions))
    assert (tmp_path / "eval" / "perplexity.json").is_file()
    uniform = flextron.evaluate(
        checkpoint, data=text_file, budgets=[0.6], routing="uniform", seq_len=32, max_tokens=128,
        progress=False,
    )  # fmt: skip
    assert uniform[0].routing == "uniform" and uniform[0].active_fraction <= 0.6 + 1e-9

    generation = flextron.generate(checkpoint, "Shall I compare", budget=0.6, max_new_tokens=4)
    assert generation.text.startswith("Shall I compare") and generation.served.method == "static router"

    served = BudgetResolver.for_checkpoint(model, record, checkpoint)(0.6)
    if len(set(served.mlp_choices)) == 1 and len(set(served.attention_choices)) == 1:
        out = flextron.export(checkpoint, tmp_path / "hf", budget=0.6)
        exported = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert exported.config.intermediate_size == model.config.mlp_widths[served.mlp_choices[0]]
    else:
        with pytest.raises(ValueError, match="per-layer widths differ"):
            flextron.export(checkpoint, tmp_path / "hf", budget=0.6)
    out = flextron.export(checkpoint, tmp_path / "hf-uniform", budget=0.6, routing="uniform")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.intermediate_size in model.config.mlp_widths


def test_token_router_budgets(converted, text_file, tmp_path):
    model, _ = load_elastic(converted)
    router = TokenRouter(model.config, (1.0, 0.6), 16)
    served = BudgetResolver(model, router)
    routing = served(0.6)
    assert routing.method == "token router" and routing.widths(model.config) == ("per token", "per token")
    with pytest.raises(RuntimeError, match="once it has routed"):
        routing.active_fraction(model.config)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        model(ids, routing.routing)
    fractions = []
    for mlp, attention in routing.routing.choices:
        assert mlp.shape == (2, 12)
        pairs = zip(mlp.flatten().tolist(), attention.flatten().tolist(), strict=True)
        fractions += [model.config.layer_fraction(m, a) for m, a in pairs]
    assert routing.active_fraction(model.config) == pytest.approx(sum(fractions) / len(fractions))
    with pytest.raises(ValueError, match="outside the trained range"):
        served(0.3)


def test_user_errors(converted, tmp_path):
    with pytest.raises(ValueError, match="has no trained routers"):
        flextron.evaluate(converted, budgets=[0.6], routing="router", progress=False)
    with pytest.raises(ValueError, match="routing must be one of"):
        flextron.generate(converted, "x", routing="fastest")
    with pytest.raises(ValueError, match="dtype must be one of"):
        flextron.lut(converted, tmp_path / "t.json", dtype="int8")
    with pytest.raises(ValueError, match="budget or choice indices, not both"):
        flextron.export(converted, tmp_path / "x", budget=0.5, mlp_choice=0, attention_choice=0)
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        flextron.convert(tmp_path / "x", device="gpu")
    with pytest.raises(ValueError, match="benchmark suites are"):
        flextron.bench(["speed"], device="cpu", out=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            flextron.generate(converted, "x", device="cuda")


def test_bench_suites_are_named_like_their_modules_and_old_names_warn():
    from flextron import benchmarks
    from flextron.benchmarks.suite import resolve_suites

    for suite in benchmarks.SUITES:
        assert hasattr(benchmarks, suite), suite  # flextron.benchmarks.<suite> is its module
    with pytest.warns(FutureWarning, match="'kernels' is deprecated: use nested_linear, elastic_mlp"):
        named = resolve_suites(["elastic_model", "kernels"])
    assert named == ("nested_linear", "elastic_mlp", "elastic_model")  # run order, no repeats
    with pytest.warns(FutureWarning, match="BudgetRouting is deprecated: use ServedBudget"):
        from flextron.budgets import BudgetRouting
    assert BudgetRouting is flextron.ServedBudget
    with pytest.raises(ValueError, match="benchmark suites are"):
        resolve_suites([])


def test_bench_quick_writes_results_and_summary(tmp_path, capsys):
    code = cli.main(
        ["bench", "--quick", "--modes", "forward,full", "--device", "cpu", "--out", str(tmp_path)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    for name in flextron.benchmarks.SUITES:
        rows = json.loads((tmp_path / f"{name}-cpu.json").read_text())["rows"]
        assert rows, name
        for row in rows:
            ratio = row.get("fraction_of_dense", row.get("fraction_of_full"))
            assert ratio > 0 and row["ours_ms"] > 0
        assert (tmp_path / f"{name}-cpu.png").stat().st_size > 0
        trained = [r for r in rows if r.get("ours_full_ms", 0) > 0 and "ours_backward_ms" not in r]
        assert trained or name in ("nested_linear", "token_routing"), name  # forward only
    model_rows = json.loads((tmp_path / "elastic_model-cpu.json").read_text())["rows"]
    assert model_rows[0]["fraction_of_full"] == 1.0  # the first case is the full width itself
    assert all(0 < r["ideal_fraction"] <= 1 for r in model_rows)
    assert "| elastic_model | 3 |" in out and "time / ideal" in out
    token_rows = json.loads((tmp_path / "token_routing-cpu.json").read_text())["rows"]
    for row in token_rows:  # the breakdown accounts for the measured time, kind by kind
        kinds = [row[f"per_layer_{k}_ms"] * row["layers"] for k in KINDS if k not in ("lm_head", "other")]
        assert sum(kinds) + row["lm_head_ms"] + row["other_ms"] == pytest.approx(row["ours_ms"], rel=1e-6)
    per_token = [r for r in token_rows if r["case"] == "per-token MLP" and r["phase"] == "prefill"]
    assert per_token and per_token[0]["per_layer_nested_gemm_ms"] > 0  # 16 tokens: the routed MLP


def test_api_text_sources(text_file):
    assert api._texts(text_file, "train")[0].name == "sonnets"
    texts = [data.Text("a", "some words")]
    assert api._texts(texts, "train") == texts
    with pytest.raises(ValueError, match="non-empty list"):
        api._texts([], "train")


def test_importing_flextron_leaves_the_hugging_face_hub_alone():
    """The library reads local files with local_files_only=True; it must not switch the whole
    process offline (a user's own from_pretrained calls would stop downloading)."""
    import subprocess
    import sys

    code = "import os, flextron, flextron.api, flextron.conversion, flextron.data; print(os.environ.get('HF_HUB_OFFLINE'))"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "None"
