"""Training on a tiny Llama (real tokenizer, real text): each stage runs and learns, routers
meet their latency targets on the table, token routers route per token and match the
reference, resume repeats an uninterrupted run bit for bit, two gloo processes match one."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from flextron import cli, data, reference
from flextron.checkpoint import load_elastic
from flextron.latency import LatencyTable, measure
from flextron.model import Routing
from flextron.routers import BudgetEncoding, StaticRouter, TokenRouter, gumbel_choice
from flextron.training import TrainConfig, Trainer, train

SMALL = {"batch_size": 4, "seq_len": 32, "train_tokens": 6000, "eval_tokens": 256, "warmup_steps": 2}


@pytest.fixture
def table(tmp_path, tiny_elastic):
    """A synthetic latency table (deterministic, unlike a measured one)."""
    model, _ = load_elastic(tiny_elastic)
    assert model.config.mlp_widths == (128, 64) and model.config.head_counts == (4, 2)
    table = LatencyTable("cpu", "synthetic", "float32", "prefill", 4, 32, 2, [4.0, 2.0], [2.0, 1.0], 1.0)
    return table.save(tmp_path / "lut.json")


def test_elastic_training_lowers_the_loss(tiny_elastic, tiny_texts, tmp_path):
    config = TrainConfig(stage="elastic", steps=40, lr=3e-3, p_full=0.5, loss="ce+kl", **SMALL)
    result = train(config, tiny_elastic, tiny_texts[0], tmp_path, tiny_texts[1], progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    final = result.evaluations[-1]["budgets"]
    assert set(final) == {"1", "0.75", "0.5"}
    assert all(v["perplexity"] > 1 for v in final.values())
    _model, record = load_elastic(tmp_path / "checkpoint-000040")  # each checkpoint is an elastic checkpoint
    assert record["training"]["step"] == 40 and record["training"]["stage"] == "elastic"


@pytest.mark.parametrize("router", ["static", "token"])
def test_router_training_meets_latency_targets(tiny_elastic, tiny_texts, tmp_path, table, router):
    config = TrainConfig(
        stage="routers", router=router, steps=150, router_lr=0.03, latency_weight=5.0, budgets=(1.0, 0.7, 0.5),
        surrogate_threshold=10.0, temperature_start=1.0, temperature_end=0.3, lut=str(table), **SMALL,
    )  # fmt: skip
    trainer = Trainer(config, tiny_elastic, tiny_texts[0], tmp_path, tiny_texts[1], progress=False)
    result = trainer.run()
    assert len(result.losses) == 150
    lut = LatencyTable.load(table)
    for budget, values in result.evaluations[-1]["budgets"].items():
        target = float(budget) * lut.full_ms()
        assert values["latency_target_ms"] == pytest.approx(target)
        assert abs(values["latency_ms"] / target - 1) < 0.10, (budget, values)
    assert trainer.surrogate is not None and trainer.surrogate.error is not None


def test_surrogate_error_falls(tiny_elastic, tiny_texts, tmp_path, table):
    config = TrainConfig(stage="routers", steps=60, surrogate_threshold=0.0, lut=str(table), **SMALL)
    trainer = Trainer(config, tiny_elastic, tiny_texts[0], tmp_path, tiny_texts[1], progress=False)
    trainer.run()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    errors = [row["surrogate_error"] for row in log if "surrogate_error" in row]
    assert sum(errors[-10:]) / 10 < sum(errors[:10]) / 10


def test_joint_training_with_token_routers(tiny_elastic, tiny_texts, tmp_path, table):
    config = TrainConfig(stage="joint", router="token", steps=6, lut=str(table), **SMALL)
    trainer = Trainer(config, tiny_elastic, tiny_texts[0], tmp_path, tiny_texts[1], progress=False)
    trainer.run()
    model, router = trainer.model.eval(), trainer.router
    assert (tmp_path / "checkpoint-000006" / "routers.safetensors").is_file()
    # Six steps of a latency penalty push every token to the cheapest choice; spread the
    # output layers' logits (and drop the prior) to check per-token routing itself.
    with torch.no_grad():
        router.prior.zero_()  # the warm start's preference would hide the per-token choices
        for net in router.nets:
            net[-1].weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    ids = trainer.windows.batch(0, 2, 0, 1)
    routing = router.route(0.7)
    with torch.no_grad():
        logits = model(ids, routing)
    mlp = torch.stack([c[0] for c in routing.choices])
    attention = torch.stack([c[1] for c in routing.choices])
    assert mlp.unique().numel() > 1 or attention.unique().numel() > 1  # tokens differ
    with torch.no_grad():
        torch.testing.assert_close(
            logits, reference.elastic_lm(model, ids, mlp, attention), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("stage", ["elastic", "routers"])
def test_resume_repeats_an_uninterrupted_run(tiny_elastic, tiny_texts, tmp_path, table, stage):
    config = TrainConfig(stage=stage, steps=8, save_every=4, keep_last=3, lut=str(table), **SMALL)
    whole = train(config, tiny_elastic, tiny_texts[0], tmp_path / "a", tiny_texts[1], progress=False)
    # A run killed after its step-4 checkpoint: the same directory with what came later removed.
    cut = tmp_path / "b"
    train(config, tiny_elastic, tiny_texts[0], cut, tiny_texts[1], progress=False)
    shutil.rmtree(cut / "checkpoint-000008")
    (cut / "latest").write_text("checkpoint-000004\n")
    resumed = train(config, tiny_elastic, tiny_texts[0], cut, tiny_texts[1], resume=True, progress=False)
    assert resumed.losses == whole.losses  # bit-exact on the CPU
    a, _ = load_elastic(tmp_path / "a" / "checkpoint-000008")
    b, _ = load_elastic(cut / "checkpoint-000008")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_a_killed_save_keeps_the_previous_checkpoint(tiny_elastic, tiny_texts, tmp_path, monkeypatch):
    config = TrainConfig(stage="elastic", steps=4, save_every=2, **SMALL)
    trainer = Trainer(config, tiny_elastic, tiny_texts[0], tmp_path, tiny_texts[1], progress=False)
    trainer.run()
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-000004"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr("flextron.training.save_elastic", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(4)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-000004"
    load_elastic(tmp_path / "checkpoint-000004")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, parallel: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    checkpoint, train_texts, eval_texts, out = args
    config = TrainConfig(
        stage="elastic", steps=4, p_full=1.0, lr=1e-3, parallel=parallel, **{**SMALL, "batch_size": 2}
    )
    train(config, checkpoint, train_texts, out, eval_texts, progress=False)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tiny_elastic, tiny_texts, tmp_path, parallel):
    single = TrainConfig(stage="elastic", steps=4, p_full=1.0, lr=1e-3, **SMALL)  # global batch 4
    train(single, tiny_elastic, tiny_texts[0], tmp_path / "one", tiny_texts[1], progress=False)
    args = (tiny_elastic, tiny_texts[0], tiny_texts[1], tmp_path / "two")
    mp.start_processes(_worker, args=(2, _free_port(), parallel, args), nprocs=2, start_method="spawn")
    one, _ = load_elastic(tmp_path / "one" / "checkpoint-000004")
    two, _ = load_elastic(tmp_path / "two" / "checkpoint-000004")
    for (name, p), q in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)


def test_latency_table(tiny_elastic, tmp_path):
    model, _ = load_elastic(tiny_elastic)
    for phase in ("prefill", "decode"):
        table = measure(model, batch_size=2, seq_len=16, phase=phase, warmup=1, repeat=3, progress=False)
        assert len(table.mlp_ms) == 2 and len(table.attention_ms) == 2 and table.fixed_ms > 0
        assert all(v > 0 for v in table.mlp_ms + table.attention_ms)
        assert LatencyTable.load(table.save(tmp_path / f"{phase}.json")) == table
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]], requires_grad=True)
    expected = table.expected_ms(probs, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    manual = table.fixed_ms + 0.5 * sum(table.mlp_ms) + table.mlp_ms[0] + sum(table.attention_ms)
    assert expected.item() == pytest.approx(manual)
    expected.backward()
    assert probs.grad is not None


def test_budget_encoding_and_gumbel():
    encode = BudgetEncoding([0.5, 1.0, 0.75])
    assert encode(0.75).tolist() == [0.0, 1.0, 0.0]
    assert encode(0.625).tolist() == pytest.approx([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="outside the trained range"):
        encode(0.3)
    logits = torch.tensor([[0.0, 5.0, 0.0]], requires_grad=True)
    _choice, scale, probs = gumbel_choice(logits, 0.5, torch.Generator().manual_seed(0))
    assert scale.item() == 1.0 and probs.shape == (1, 3)
    scale.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_static_router_inference_is_deterministic(tiny_elastic):
    model, _ = load_elastic(tiny_elastic)
    router = StaticRouter(model.config, (1.0, 0.5))
    a, b = router(0.8), router(0.8)
    assert a.mlp_choice == b.mlp_choice and all(s is None for s in a.mlp_scale)
    routing = Routing(a.mlp_choice, a.attention_choice)
    assert model(torch.zeros(1, 4, dtype=torch.long), routing).shape[-1] == model.config.vocab_size
    assert isinstance(TokenRouter(model.config, (1.0,)).route(1.0), object)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"stage": "distill"}, "stage must be one of"),
        ({"steps": 0}, "steps must be positive"),
        ({"budgets": [1.5]}, "budgets must be in \\(0, 1\\]"),
        ({"p_full": 2}, "p_full must be in \\[0, 1\\]"),
        ({"router_prior": -1.0}, "router_prior must be >= 0"),
        ({"dtype": "int8"}, "dtype must be one of"),
    ],
)
def test_bad_configs(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_config_files(tmp_path):
    (tmp_path / "run.toml").write_text('stage = "joint"\nsteps = 7\nbudgets = [1.0, 0.6]\n')
    config = TrainConfig.from_file(tmp_path / "run.toml", steps=9)
    assert (config.stage, config.steps, config.budgets) == ("joint", 9, (1.0, 0.6))
    (tmp_path / "run.yaml").write_text("stage: routers\nrouter: token\n")
    assert TrainConfig.from_file(tmp_path / "run.yaml").router == "token"
    (tmp_path / "bad.toml").write_text("stages = 3\n")
    with pytest.raises(ValueError, match="unknown settings \\['stages'\\]"):
        TrainConfig.from_file(tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("stage = \n")
    with pytest.raises(ValueError, match="is not valid toml"):
        TrainConfig.from_file(tmp_path / "broken.toml")


def test_cli_train_and_lut(tiny_elastic, tmp_path, capsys):
    text = tmp_path / "train.txt"
    text.write_text(data.shakespeare("train")[0].content[:20000])
    code = cli.main(
        [
            "lut",
            "--checkpoint",
            str(tiny_elastic),
            "--out",
            str(tmp_path / "lut.json"),
            "--seq-len",
            "16",
            "--quiet",
        ]
    )
    assert code == 0 and LatencyTable.load(tmp_path / "lut.json").num_layers == 2
    (tmp_path / "run.toml").write_text(
        "batch_size = 2\nseq_len = 32\ntrain_tokens = 4000\neval_tokens = 128\nwarmup_steps = 1\n"
    )
    argv = ["train", "--stage", "joint", "--checkpoint", str(tiny_elastic), "--data", str(text), "--eval-data", str(text),
            "--out", str(tmp_path / "run"), "--config", str(tmp_path / "run.toml"), "--steps", "3",
            "--lut", str(tmp_path / "lut.json"), "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "budget 1: perplexity" in out
        and (tmp_path / "run" / "checkpoint-000003" / "routers.safetensors").is_file()
    )
    assert cli.main([*argv[:-1], "--resume", "--steps", "4", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "checkpoint-000004" / "trainer.json").read_text())["step"] == 4
    code = cli.main(
        [
            "train",
            "--checkpoint",
            str(tiny_elastic),
            "--data",
            "/nonexistent.txt",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = cli.main(
        ["train", "--checkpoint", str(tiny_elastic), "--out", str(tmp_path / "empty"), "--resume"]
    )
    assert code == 2 and "holds no checkpoint to resume from" in capsys.readouterr().err


def test_joint_training_lowers_the_lm_loss(tiny_elastic, tiny_texts, tmp_path, table):
    config = TrainConfig(stage="joint", steps=30, lr=3e-3, latency_weight=0.1, lut=str(table), **SMALL)
    train(config, tiny_elastic, tiny_texts[0], tmp_path, tiny_texts[1], progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [row["lm_loss"] for row in log if "lm_loss" in row]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses


def test_uniform_start_picks_the_best_fitting_uniform_subnetwork():
    from flextron.budgets import UniformLoss
    from flextron.training import uniform_start

    # full = 1 + 2 * (4 + 2) = 13 ms; uniform (m, a): (0,0) 13, (0,1) 11, (1,0) 9, (1,1) 7
    table = LatencyTable("cpu", "synthetic", "float32", "prefill", 4, 32, 2, [4.0, 2.0], [2.0, 1.0], 1.0)
    losses = [UniformLoss(0, 0, 3.0), UniformLoss(0, 1, 3.5), UniformLoss(1, 0, 3.2), UniformLoss(1, 1, 4.0)]
    assert uniform_start(table, 1.0, losses) == (0, 0)
    assert uniform_start(table, 0.85, losses) == (1, 0)  # (0,1) fits too but loses more
    assert uniform_start(table, 0.85, []) == (0, 1)  # without losses: the slowest that fits
    assert uniform_start(table, 0.3, losses) == (1, 1)  # nothing fits: the fastest


@pytest.mark.parametrize("router", ["static", "token"])
def test_routers_start_from_the_uniform_table(tiny_elastic, tiny_texts, tmp_path, table, router):
    config = TrainConfig(stage="routers", router=router, steps=1, lut=str(table), budgets=(1.0, 0.6), **SMALL)
    trainer = Trainer(config, tiny_elastic, tiny_texts[0], tmp_path, tiny_texts[1], progress=False)
    from flextron.budgets import UniformLoss
    from flextron.training import uniform_start

    losses = [UniformLoss(**e) for e in trainer.record["uniform_losses"]]
    lut = LatencyTable.load(table)
    for index, budget in enumerate((0.6, 1.0)):  # the encoding's (ascending) order
        mlp, attention = uniform_start(lut, budget, losses)
        assert (trainer.router.prior[index, :, mlp] == 2.0).all()
        assert (trainer.router.prior[index, :, 2 + attention] == 2.0).all()
        assert trainer.router.prior[index].sum() == 2.0 * 2 * 2  # two layers, two margins each
    if router == "static":
        with torch.no_grad():
            output = trainer.router(1.0)
        assert output.mlp_choice == [uniform_start(lut, 1.0, losses)[0]] * 2


def test_routers_saved_without_a_prior_still_load(tiny_elastic):
    from flextron.routers import load_router_state

    model, _ = load_elastic(tiny_elastic)
    router = StaticRouter(model.config, (1.0, 0.5))
    state = {k: v for k, v in router.state_dict().items() if k != "prior"}
    fresh = StaticRouter(model.config, (1.0, 0.5))
    with torch.no_grad():
        fresh.prior.fill_(1.0)
    load_router_state(fresh, state)
    assert (fresh.prior == 0).all()
    torch.testing.assert_close(fresh.logits(0.7)[0], router.logits(0.7)[0])
