"""Tensor parallelism on 2 and 4 CPU processes (gloo, loopback): the same numbers as one process."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import glassformer as gf
from glassformer import parallel

CONFIGS = {
    "decoder-mha": dict(arch="decoder"),
    "decoder-gqa-rotary-swiglu": dict(arch="decoder", n_kv_heads=4, positional="rotary", norm="rmsnorm", act="swiglu"),
    "decoder-gemma-like": dict(
        arch="decoder",
        n_kv_heads=4,
        positional="rotary",
        rotary_base_local=100.0,
        norm="rmsnorm",
        norm_position="sandwich",
        act="geglu",
        qk_norm="head",
        sliding_window=3,
        layer_types=["sliding", "full"],
        attn_softcap=2.0,
        final_softcap=5.0,
    ),
    "encoder-post-norm": dict(arch="encoder", norm_position="post"),
    "encoder-decoder": dict(arch="encoder-decoder", positional="sinusoidal"),
    "encoder-decoder-relative": dict(arch="encoder-decoder", positional="relative", relative_buckets=8),
}


def make(kw, seed=0):
    cfg = gf.Config(**{**dict(n_layers=2, d_model=32, n_heads=8, d_mlp=64, d_vocab=40, n_ctx=24), **kw})
    return gf.Transformer(cfg, seed=seed).eval()


def inputs(arch):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (3, 9), generator=g)
    mask = torch.ones_like(tokens)
    if arch == "decoder":
        mask[0, :3] = 0  # left padding
    else:
        mask[1, 6:] = 0
    args = (tokens, torch.randint(0, 40, (3, 5), generator=g)) if arch == "encoder-decoder" else (tokens,)
    return args, {"attention_mask": mask}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    parallel.init(timeout_s=30)


def check_forward_cache_and_generation(rank, world, port, tmp):
    join(rank, world, port)
    try:
        for name, kw in CONFIGS.items():
            reference, sharded = make(kw), parallel.shard(make(kw))
            args, kwargs = inputs(kw["arch"])
            with torch.no_grad():
                expected, full = reference.run_with_cache(*args, **kwargs)
                logits, gathered = sharded.run_with_cache(*args, gather=True, **kwargs)
                _, local = sharded.run_with_cache(*args, **kwargs)
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5, msg=name)
            assert set(gathered.keys()) == set(full.keys())
            for hook in full:
                torch.testing.assert_close(gathered[hook], full[hook], atol=1e-5, rtol=1e-5, msg=f"{name} {hook}")
            assert local["pattern", 0, "decoder" if kw["arch"] == "encoder-decoder" else None].shape[1] == 8 // world
            if kw["arch"] == "decoder":  # each process caches only its key/value heads
                prompt, mask = args[0], kwargs["attention_mask"]
                assert torch.equal(
                    sharded.generate(prompt, 8, attention_mask=mask), reference.generate(prompt, 8, attention_mask=mask)
                )
            if kw["arch"] == "encoder-decoder":  # T5's relative bias: each process adds its heads' columns
                assert torch.equal(
                    sharded.generate(args[0], 6, decoder_start_token_id=1),
                    reference.generate(args[0], 6, decoder_start_token_id=1),
                )
        # Sharding straight from a checkpoint: each process reads only its slices.
        model = make(CONFIGS["decoder-gqa-rotary-swiglu"])
        if rank == 0:
            model.save(tmp)
        dist.barrier()
        loaded, sharded = parallel.load_sharded(tmp), parallel.shard(make(CONFIGS["decoder-gqa-rotary-swiglu"]))
        for (a_name, a), (b_name, b) in zip(loaded.named_parameters(), sharded.named_parameters(), strict=True):
            assert a_name == b_name and torch.equal(a, b), a_name
        assert loaded.blocks[0].attn.n_heads == 8 // world and loaded.blocks[0].mlp.d_mlp == 64 // world
        assert loaded.cfg.n_heads == 8  # the shared config is not changed
        # ... and back: saving a split model gathers it whole.
        loaded.save(f"{tmp}/again")
        dist.barrier()
        again = gf.Transformer.load(f"{tmp}/again")
        for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    finally:
        dist.destroy_process_group()


def check_training_step(rank, world, port):
    """Gradients through the collectives equal the single-process gradients' slices, and so do the
    weights after an optimizer step. (SGD: AdamW's first step is lr * sign(grad), which turns a
    rounding-level difference in a near-zero gradient into a full step of difference.)"""
    join(rank, world, port)
    try:
        kw = CONFIGS["decoder-gqa-rotary-swiglu"]
        reference, sharded = make(kw).train(), parallel.shard(make(kw)).train()
        tokens = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(1))
        for model in (reference, sharded):
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads = {k: p.grad for k, p in reference.named_parameters()}
        expected = parallel.local_state(reference.cfg, grads, lambda name, index: grads[name][index], rank, world)
        for name, param in sharded.named_parameters():
            torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5, msg=f"grad {name}")
        for model in (reference, sharded):
            torch.optim.SGD(model.parameters(), lr=0.5).step()
        full = {k: v.detach() for k, v in reference.state_dict().items()}
        expected = parallel.local_state(reference.cfg, full, lambda name, index: full[name][index], rank, world)
        for name, value in sharded.state_dict().items():
            torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_model_equals_single_process(tmp_path, world):
    mp.spawn(check_forward_cache_and_generation, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)


def test_a_training_step_updates_weights_as_on_one_process():
    mp.spawn(check_training_step, args=(2, free_port()), nprocs=2, join=True)


def test_indivisible_sizes_fail_before_any_communication():
    with pytest.raises(ValueError, match="cannot split n_heads=6, n_kv_heads=3 across a tensor-parallel group of 4"):
        parallel.check_divisible(make(dict(n_heads=6, n_kv_heads=3, d_model=36)).cfg, 4)
    with pytest.raises(ValueError, match="d_mlp=66"):
        parallel.check_divisible(make(dict(d_mlp=66)).cfg, 4)
    with pytest.raises(ValueError, match="qk_norm='projection'"):
        parallel.check_divisible(make(dict(qk_norm="projection", norm="rmsnorm")).cfg, 2)
    with pytest.raises(gf.GlassformerError, match="call glassformer.parallel.init"):
        parallel.shard(make({}))


def test_a_mixture_of_experts_is_refused_before_any_communication():
    with pytest.raises(ValueError, match="does not split a mixture of experts yet \\(Config.n_experts=4\\)"):
        parallel.check_divisible(make(dict(act="swiglu", n_experts=4)).cfg, 2)


def die_or_wait(rank, world, port, result_path):
    join(rank, world, port)
    model = parallel.shard(make({}))
    tokens = torch.randint(0, 40, (1, 5))
    with torch.no_grad():
        model(tokens)
        if rank == 1:
            os._exit(1)  # a process that dies without a word
        start = time.monotonic()
        try:
            model(tokens)
        except gf.GlassformerError as err:
            with open(result_path, "w") as f:
                f.write(f"{type(err).__name__} after {time.monotonic() - start:.1f}s: {err}")
            os._exit(0)
        os._exit(3)


def test_a_dead_peer_makes_the_others_fail_fast_with_a_clear_error(tmp_path):
    result = tmp_path / "result.txt"
    context = mp.spawn(die_or_wait, args=(2, free_port(), str(result)), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not result.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in context.processes:
        process.join(timeout=10)
    text = result.read_text()
    assert text.startswith("PeerError") and "peer stopped" in text
    assert float(text.split(" after ")[1].split("s:")[0]) < 45


def test_torchrun_generate_with_tp_prints_what_one_process_prints(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    make(dict(d_vocab=len(alphabet))).save(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    command = ["-m", "glassformer", "generate", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "8", "--greedy"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    alone = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=True)
    split = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), *command, "--tp", "2"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert split.returncode == 0, split.stderr[-4000:]
    assert split.stdout == alone.stdout and alone.stdout.startswith("hi")


def test_torchrun_train_with_tp_saves_a_whole_model_that_generates(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    train = ["-m", "glassformer", "train", "--data", "repeat", "--max-steps", "4", "--eval-interval", "4"]
    train += ["--n-layers", "1", "--n-heads", "4", "--d-model", "32", "--out", str(tmp_path), "--no-progress"]
    split = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), *train, "--tp", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert split.returncode == 0, split.stderr[-4000:]
    assert split.stdout.count("done at step 4") == 1  # one process reports
    model = gf.Transformer.load(tmp_path)
    assert model.blocks[0].attn.W_Q.shape == (4, 32, 8)  # every head, not one process's share


def test_each_process_draws_its_own_dropout_inside_a_split_section_and_the_same_outside():
    draws = []
    for rank in (0, 1):
        torch.manual_seed(0)
        with parallel.TensorParallel(None, rank, 2).own_random_stream(torch.device("cpu")):
            inside = torch.rand(4)
        draws.append((inside, torch.rand(4)))
    assert not torch.equal(draws[0][0], draws[1][0])  # per-head dropout masks differ between processes
    assert torch.equal(draws[0][1], draws[1][1])  # the replicated residual's masks stay equal


def test_a_failed_collective_names_a_device_mismatch_or_a_lost_peer(monkeypatch):
    """nccl refuses CPU tensors with a RuntimeError, as gloo reports a dead peer: the two must read apart."""
    from glassformer import parallel

    def refuse(x, group=None):
        raise RuntimeError("No backend type associated with device type cpu")

    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel.dist, "all_reduce", refuse)
    monkeypatch.setattr(parallel.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(gf.InputError, match="a cpu tensor cannot take part in nccl's all-reduce.*must be on cuda:0"):
        parallel._all_reduce(torch.ones(2), None)
    monkeypatch.setattr(parallel.dist, "get_backend", lambda group=None: "gloo")
    with pytest.raises(parallel.PeerError, match="peer stopped or timed out during the all-reduce"):
        parallel._all_reduce(torch.ones(2), None)
    assert parallel.local_device() == torch.device("cpu")
