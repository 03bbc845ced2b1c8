"""Training: it learns, it resumes to the same weights after a kill, it parallelises exactly."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import glassformer as gf
from glassformer.training.data import SyntheticData
from glassformer.training.trainer import TrainConfig, learning_rate, loss_of, make_optimizer, train

TINY = dict(n_layers=2, n_heads=2, d_model=32, n_ctx=32)


def config(out, **kw):
    return TrainConfig(
        **{
            **dict(
                out_dir=str(out),
                data="repeat",
                task_vocab=12,
                task_length=8,
                batch_size=8,
                max_steps=30,
                warmup_steps=5,
                eval_interval=10,
                eval_batches=2,
                checkpoint_interval=10,
                progress=False,
                model=TINY,
            ),
            **kw,
        }
    )


def weights_digest(directory):
    return hashlib.sha256((Path(directory) / "model.safetensors").read_bytes()).hexdigest()


def test_a_tiny_model_overfits_one_batch():
    model = gf.Transformer(gf.Config(d_vocab=12, **TINY), seed=0).train()
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.0), torch.device("cpu"))
    batch = SyntheticData("repeat", 12, 8).batch("train", 4, torch.Generator().manual_seed(0))
    for _ in range(300):
        loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05


def test_loss_decreases_on_tinyshakespeare(tmp_path):
    result = train(
        TrainConfig(
            out_dir=str(tmp_path),
            max_steps=40,
            warmup_steps=5,
            lr=3e-3,
            eval_interval=20,
            eval_batches=3,
            checkpoint_interval=40,
            progress=False,
            model=dict(n_layers=2, n_heads=2, d_model=64, n_ctx=32),
        )
    )
    first, last = result.metrics[0], result.metrics[-1]
    assert last["val_loss"] < first["val_loss"] < 4.2  # log(65) = 4.17: the start knows nothing
    assert last["val_loss"] < 3.3
    written = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "loss.png",
        "train_state.safetensors",
        "tokens.npy",
    } <= written
    assert gf.Transformer.load(tmp_path).cfg.d_vocab == 65


def test_learning_rate_warms_up_then_decays_to_min():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    rates = [learning_rate(cfg, s) for s in range(111)]
    assert rates[0] < rates[5] < rates[9] <= 1e-3
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))
    assert rates[110] == pytest.approx(1e-4)


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = gf.Transformer(gf.Config(d_vocab=12, **TINY), seed=0)
    decay, plain = make_optimizer(model, TrainConfig(), torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.dim() == 2 and n not in ("embed.W_E", "pos_embed.W_pos")
    }
    assert "blocks.0.ln1.w" in {names[id(p)] for p in plain["params"]} and plain["weight_decay"] == 0.0


RESUME_SCRIPT = """
import sys
from glassformer.training.trainer import TrainConfig, train
out, steps = sys.argv[1], int(sys.argv[2])
train(TrainConfig(out_dir=out, data="repeat", task_vocab=12, task_length=8, batch_size=8, max_steps=steps,
                  warmup_steps=5, eval_interval=10, eval_batches=2, checkpoint_interval=10, progress=False,
                  resume=len(sys.argv) > 3, model=dict(n_layers=2, n_heads=2, d_model=32, n_ctx=32, dropout=0.1)))
"""


def test_killed_run_resumes_to_bit_identical_weights(tmp_path):
    """SIGKILL after the first checkpoint, resume, and the final weights equal an uninterrupted run's."""
    run = lambda out, *extra: [sys.executable, "-c", RESUME_SCRIPT, str(out), "400", *extra]  # noqa: E731
    subprocess.run(run(tmp_path / "straight"), check=True, capture_output=True)
    victim = subprocess.Popen(run(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "train_state.safetensors"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a few more steps, then kill mid-run
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    subprocess.run(run(tmp_path / "killed", "--resume"), check=True, capture_output=True)
    assert weights_digest(tmp_path / "killed") == weights_digest(tmp_path / "straight")


def test_ctrl_c_saves_and_resuming_continues_exactly(tmp_path, monkeypatch):
    straight = train(config(tmp_path / "straight"))
    calls = {"n": 0}
    real_clip = torch.nn.utils.clip_grad_norm_

    def interrupting(parameters, max_norm):  # called once per training step, before the optimizer step
        calls["n"] += 1
        if calls["n"] == 17:  # inside step 17, after 16 completed steps
            raise KeyboardInterrupt
        return real_clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupting)
    stopped = train(config(tmp_path / "stopped"))
    assert stopped.interrupted and stopped.step == 16
    monkeypatch.undo()
    resumed = train(config(tmp_path / "stopped", resume=True))
    assert resumed.step == 30
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_input_is_refused_and_checkpoints_are_untouched(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "short.txt").write_text("a short text")
    for name, message in [
        ("empty.txt", "is empty"),
        ("latin1.txt", "is not UTF-8"),
        ("missing.txt", "not a readable"),
        ("short.txt", "smaller than one context window"),
    ]:
        with pytest.raises(gf.InputError, match=message):
            train(config(tmp_path / "run", data=str(tmp_path / name)))
    train(config(tmp_path / "done"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()}
    with pytest.raises(gf.CheckpointError, match="already holds a run"):
        train(config(tmp_path / "done"))
    with pytest.raises(gf.CheckpointError, match=r"different settings \(batch_size"):
        train(config(tmp_path / "done", batch_size=4, resume=True))
    with pytest.raises(gf.CheckpointError, match=r"different settings \(model\)"):
        train(config(tmp_path / "done", model={**TINY, "d_model": 16}, resume=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()} == before


def ddp_worker(rank, world, port, out, batch):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(config(out, batch_size=batch, max_steps=8, checkpoint_interval=8, eval_interval=8))
    finally:
        torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_processes_equals_one_process_with_the_doubled_batch(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), tmp_path / "ddp", 4), nprocs=2, join=True)
    single = train(config(tmp_path / "single", batch_size=8, max_steps=8, checkpoint_interval=8, eval_interval=8))
    parallel = gf.Transformer.load(tmp_path / "ddp")
    for (name, a), b in zip(single.model.named_parameters(), parallel.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_encoder_decoder_learns_to_reverse(tmp_path):
    from glassformer.training.showcase import seq2seq_accuracy

    cfg = config(
        tmp_path,
        data="reverse",
        task_vocab=10,
        task_length=6,
        batch_size=64,
        max_steps=1500,
        lr=3e-3,
        warmup_steps=50,
        eval_interval=500,
        checkpoint_interval=1500,
        model=dict(n_layers=2, n_heads=4, d_model=64, n_ctx=16),
    )
    result = train(cfg)
    assert seq2seq_accuracy(result.model, SyntheticData("reverse", 10, 6), n=512) >= 0.99


def tp_worker(rank, world, port, out, kw, crash_at):
    """One process of a tensor-parallel run; `crash_at`: fail inside that step, as a killed run would."""
    from glassformer import parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    if crash_at:
        real_clip, calls = parallel.clip_grad_norm_, {"n": 0}

        def crashing(model, max_norm):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise RuntimeError("simulated crash")
            return real_clip(model, max_norm)

        parallel.clip_grad_norm_ = crashing
    try:
        train(config(out, **kw))
    except RuntimeError as err:
        assert crash_at and "simulated crash" in str(err)
    finally:
        torch.distributed.destroy_process_group()


SHORT = dict(max_steps=8, checkpoint_interval=8, eval_interval=8)


@pytest.mark.parametrize("world", [2, 4])  # 4: two copies of a model split in two (tensor x data parallel)
def test_tensor_parallel_training_equals_one_process(tmp_path, world):
    kw = dict(SHORT, tp=2, batch_size=8 // (world // 2), model={**TINY, "n_heads": 4, "n_kv_heads": 2, "act": "swiglu"})
    mp.spawn(tp_worker, args=(world, free_port(), tmp_path / "tp", kw, 0), nprocs=world, join=True)
    single = train(config(tmp_path / "single", **{**kw, "tp": 1, "batch_size": 8}))
    split = gf.Transformer.load(tmp_path / "tp")  # the saved checkpoint is the whole model
    for (name, a), b in zip(single.model.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    metrics = [json.loads(line) for line in (tmp_path / "tp" / "metrics.jsonl").read_text().splitlines()]
    if world == 2:  # evaluation batches have batch_size rows: the same as the single run's only here
        assert metrics[-1]["val_loss"] == pytest.approx(single.metrics[-1]["val_loss"], abs=1e-5)


def test_tensor_parallel_run_resumes_to_bit_identical_weights(tmp_path):
    """A split run with dropout crashes after its step-10 checkpoint; resumed, it ends where an
    uninterrupted split run ends."""
    kw = dict(tp=2, max_steps=20, model={**TINY, "dropout": 0.1})
    mp.spawn(tp_worker, args=(2, free_port(), tmp_path / "straight", kw, 0), nprocs=2, join=True)
    mp.spawn(tp_worker, args=(2, free_port(), tmp_path / "crashed", kw, 14), nprocs=2, join=True)
    mp.spawn(tp_worker, args=(2, free_port(), tmp_path / "crashed", {**kw, "resume": True}, 0), nprocs=2, join=True)
    assert weights_digest(tmp_path / "crashed") == weights_digest(tmp_path / "straight")


def test_compiled_training_follows_eager_training(tmp_path):
    kw = dict(max_steps=4, checkpoint_interval=4, eval_interval=4)
    eager = train(config(tmp_path / "eager", **kw))
    compiled = train(config(tmp_path / "compiled", compile=True, **kw))
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert compiled.metrics[-1]["val_loss"] == pytest.approx(eager.metrics[-1]["val_loss"], abs=1e-4)


def test_gradient_accumulation_equals_the_whole_batch_at_once(tmp_path):
    """Two micro-batches of 4 windows are the 8 windows one batch of 8 draws: the same update."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(chr(97 + (i * 7) % 26) for i in range(5000)))
    kw = dict(data=str(corpus), max_steps=3, checkpoint_interval=3, eval_interval=3, model={**TINY, "n_ctx": 16})
    accumulated = train(config(tmp_path / "accum", batch_size=4, grad_accum=2, **kw))
    whole = train(config(tmp_path / "whole", batch_size=8, **kw))
    for (name, a), b in zip(accumulated.model.named_parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    one_micro = train(config(tmp_path / "half", batch_size=4, **kw))  # and it is not the same as half the batch
    assert not torch.allclose(one_micro.model.embed.W_E, whole.model.embed.W_E, atol=1e-4)


@pytest.mark.parametrize(("task", "expected"), [("copy", lambda s: s), ("sort", lambda s: s.sort(1).values)])
def test_copy_and_sort_tasks_pair_each_source_with_its_answer(task, expected):
    batch = SyntheticData(task, 10, 6).batch("train", 32, torch.Generator().manual_seed(0))
    assert torch.equal(batch["targets"], expected(batch["src"]))
    assert (batch["src"] >= 1).all() and (batch["tgt"][:, 0] == 0).all()  # 0 only starts a target
    assert torch.equal(batch["tgt"][:, 1:], batch["targets"][:, :-1])  # teacher forcing: shifted by one
