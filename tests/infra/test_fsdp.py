"""--fsdp (infra/fsdp.py) on CPU with gloo, two ranks: one sharded step (a loaded model, sharded) computes the
single-process loss and LoRA gradients of the same global batch, the NF4 base is sharded too, both ranks agree on
an fp16 overflow that only one rank's shard saw; a train.py --fsdp run (the structure sharded on meta, each rank
reading its slices and drawing LoRA's initialisation as one process does; bf16) trains the single-process adapter, and a
run whose rank is SIGKILLed resumes bit for bit; a checkpoint refuses another world size. And the dry run's
prediction for one rank of N."""
import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import train
from conftest import PG19_MINI, ROOT, make_hf_checkpoint
from infra import fsdp, memory
from lora import adapter_parameters
from model import ModelArgs
from quant import Linear4bit

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TIMING_KEYS = ("tokens_per_s", "peak_mem_bytes", "time")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return {"model": make_hf_checkpoint(root / "tiny", initializer_range=0.125), "cache": root / "cache"}


def rel_l2(a: dict, b: dict) -> float:
    """|a - b| / |b| over every tensor of two dicts with the same keys."""
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    return math.sqrt(num / sum(float((b[k].double() ** 2).sum()) for k in b))


# --------------------------------------------------------------------------- one step, inside two processes

def batch(seed: int, ignored: int) -> dict:
    """A sequence of 64 random tokens, the last `ignored` labels -100 (the ranks count different loss tokens)."""
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, 64 - ignored:] = -100
    return {"input_ids": ids, "labels": labels, "padding_mask": None}


def captured_grads(optimizer, names: list[str], into: dict):
    """Record the gradients optimizer.step sees (reduced over the ranks), whole, by parameter name."""
    def hook(opt, args, kwargs):
        for name, p in zip(names, opt.param_groups[0]["params"]):
            into[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
    return optimizer.register_step_pre_hook(hook)


def one_step_worker(rank: int, model_dir: str, port: int, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    args = train.parse_args(["--model", model_dir, "--data", "synthetic", "--dtype", "fp32", "--ctx", "64",
                             "--lora-r", "8", "--lora-dropout", "0"])
    torch.manual_seed(0)
    model, trainable, _ = train.build_model(args)
    with torch.no_grad():       # B = 0 at initialisation would leave every A without gradient
        for p in trainable[1::2]:
            p.normal_(std=0.05)
    reference = copy.deepcopy(model)
    names = list(adapter_parameters(model))
    micro = [batch(1, 0), batch(2, 20)]
    off = torch.amp.GradScaler("cpu", enabled=False)
    ref_opt = train.make_optimizer(list(adapter_parameters(reference).values()), 1e-3, 0.0, torch.device("cpu"))
    ref_grads, grads = {}, {}
    captured_grads(ref_opt, names, ref_grads)
    # one process, the global batch; no clipping, which would hide a gradient off by a constant factor
    ref = train.train_step(reference, micro, ref_opt, off, max_grad_norm=0)

    sharded = fsdp.shard(model)
    opt = train.make_optimizer(sharded, 1e-3, 0.0, torch.device("cpu"), sharded=True)
    hook = captured_grads(opt, names, grads)
    got = train.train_step(model, [micro[rank]], opt, fsdp.ShardedGradScaler("cpu", enabled=False), 0, "tokens",
                           2, sharded=True)
    hook.remove()
    nf4 = [(t.to_local().numel(), t.numel()) for m in model.modules() if isinstance(m, Linear4bit)
           for t in (m.weight, m.absmax, m.nested_absmax)]

    # fp16 loss scaling: an overflow in rank 1's shard alone (what the hook leaves) skips the step on both ranks
    scaler = fsdp.ShardedGradScaler("cpu", init_scale=1024.0)
    unscale = scaler.unscale_

    def overflow_on_rank_1(optimizer):
        if rank == 1:
            sharded[0].grad.to_local().fill_(float("inf"))
        unscale(optimizer)
    scaler.unscale_ = overflow_on_rank_1
    before = [p.detach().to_local().clone() for p in sharded]
    skipped = train.train_step(model, [micro[rank]], opt, scaler, 0.3, "tokens", 2, sharded=True)
    unchanged = all(torch.equal(a, p.detach().to_local()) for a, p in zip(before, sharded))
    if rank == 0:
        Path(result_file).write_text(json.dumps({
            "loss": [ref["loss"], got["loss"]], "grad_norm": [ref["grad_norm"], got["grad_norm"]],
            "grads_rel_l2": rel_l2(grads, ref_grads), "nf4_local_total": nf4,
            "overflow": [skipped["skipped"], unchanged, scaler.get_scale()]}))
    else:
        assert skipped["skipped"] and unchanged and scaler.get_scale() == 512.0
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_sharded_step_equals_one_process_and_ranks_agree_on_overflow(tiny, tmp_path):
    result = tmp_path / "result.json"
    mp.spawn(one_step_worker, args=(str(tiny["model"]), free_port(), str(result)), nprocs=2)
    r = json.loads(result.read_text())
    print(f"one step, 2 ranks vs 1 process: loss {r['loss']}, grad norm {r['grad_norm']}, LoRA grads rel-L2 "
          f"{r['grads_rel_l2']:.2e}")
    assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-6)
    assert r["grad_norm"][1] == pytest.approx(r["grad_norm"][0], rel=1e-5)     # the norm over both ranks' shards
    assert r["grads_rel_l2"] <= 1e-5
    assert all(local <= math.ceil(total / 2) for local, total in r["nf4_local_total"])  # NF4 bytes, absmax sharded
    assert r["overflow"] == [True, True, 512.0]


# --------------------------------------------------------------------------- train.py --fsdp runs

def flags(tiny, out, *extra):
    return [str(x) for x in ["--model", tiny["model"], "--data", PG19_MINI, "--split", "validation", "--cache-dir",
                             tiny["cache"], "--out", out, "--dtype", "bf16", "--ctx", 128, "--log-every", 100,
                             "--lr", "1e-3", "--warmup", 1, "--batch-size", 1, "--lora-dropout", 0, "--save-every", 2,
                             *extra]]


def torchrun(tiny, out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *flags(tiny, out, "--fsdp", *extra)]
    log = open(f"{out}.log", "a")      # a file, not a pipe: a long run's progress bar never blocks on it
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=log)


def finished(p: subprocess.Popen) -> None:
    p.wait(timeout=300)
    assert p.returncode == 0, Path(p.args[p.args.index("--out") + 1] + ".log").read_text()[-3000:]


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def adapter(out):
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def test_sharded_run_trains_the_one_process_adapter_and_resumes_after_sigkill(tiny, tmp_path):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    train.main(flags(tiny, one, "--max-steps", 4, "--grad-accum", 2))      # also tokenizes once, before the races
    run = torchrun(tiny, two, "--max-steps", 4)
    crash = torchrun(tiny, killed, "--max-steps", 1000, "--keep-checkpoints", 0)     # killed after its first checkpoint
    while not (killed / "checkpoint-2").is_dir():
        assert crash.poll() is None, Path(f"{killed}.log").read_text()[-3000:]
        time.sleep(0.02)
    rank = Path(f"/proc/{crash.pid}/task/{crash.pid}/children").read_text().split()[-1]
    os.kill(int(rank), signal.SIGKILL)
    crash.wait(timeout=120)
    assert crash.returncode != 0
    finished(run)
    for later in [p for p in killed.glob("checkpoint-*") if p.name != "checkpoint-2"]:   # resume from step 2 on
        shutil.rmtree(later)
    finished(torchrun(tiny, killed, "--max-steps", 4, "--resume"))

    (a1, r1), (a2, r2), (a3, r3) = ((adapter(o), rows(o)) for o in (one, two, killed))
    assert json.loads((two / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((one / "adapter" / "adapter_config.json").read_text())
    print(f"adapter after 4 steps, 2 FSDP ranks vs 1 process: rel-L2 {rel_l2(a2, a1):.2e}")
    assert a2.keys() == a1.keys() and rel_l2(a2, a1) <= 1e-5
    for x, y in zip(r1, r2):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6) and y["tokens"] == x["tokens"] == 256
    assert r3 == r2 and all(torch.equal(a3[k], a2[k]) for k in a2)          # resumed: bit for bit
    assert (two / "checkpoint-4" / fsdp.SHARDED / ".metadata").is_file()
    with pytest.raises(ValueError, match="world_size: 2 -> 1.*as many ranks"):
        train.main(flags(tiny, two, "--fsdp", "--max-steps", 6, "--resume"))


# --------------------------------------------------------------------------- the per-rank prediction (--dry-run)

def test_per_rank_prediction_shards_the_weights_and_states_and_meets_the_70b_targets(capsys):
    a = ModelArgs(**memory.ARCHS["llama2-70b"])
    one = memory.predict_peak_memory(a, 8192, mlp_chunk=2048)
    ddp = memory.predict_peak_memory(a, 8192, mlp_chunk=2048, world_size=2)
    two = memory.predict_peak_memory(a, 8192, mlp_chunk=2048, world_size=2, fsdp=True)
    assert ddp["peak_bytes"] == one["peak_bytes"]                  # data parallel: every rank holds everything
    for part in ("nf4_weights", "embed_and_head", "norms", "lora_weights_grads_adam"):
        assert two[part] == -(-one[part] // 2)                       # FSDP: each rank its half
    for part in ("checkpointed_hidden_states", "layer_recompute", "loss_chunk"):
        assert two[part] == one[part]                                # activations: each rank its own micro-batch
    layer = (one["nf4_weights"] + one["norms"]) / a.n_layers
    assert 2 * layer + one["embed_and_head"] / 2 < two["fsdp_gathered_units"] < 3 * layer + one["embed_and_head"]
    assert two["peak_bytes"] == sum(two[k] for k in ("nf4_weights", "embed_and_head", "norms", "fsdp_gathered_units",
                                                      "lora_weights_grads_adam", "checkpointed_hidden_states")) \
        + max(two["layer_recompute"], two["loss_chunk"])
    # the targets, as the presets run them (llama2-70b-8k: --mlp-chunk 2048; 32k: + offload)
    assert two["peak_bytes"] <= 40e9 < ddp["peak_bytes"]
    assert memory.predict_peak_memory(a, 8192, mlp_chunk=2048, world_size=2, fsdp=True, offload=True)["peak_bytes"] \
        <= 30e9
    for preset, n, target in (("llama2-70b-8k", 2, 40e9), ("llama2-70b-32k", 8, 60e9)):
        p = train.main(["--dry-run", "--preset", preset, "--world-size", str(n), "--budget", "40GB"])
        assert p["peak_bytes"] <= target and p["fsdp"] and p["world_size"] == n
        assert f"one rank of {n}, the weights and the LoRA states sharded (--fsdp)" in capsys.readouterr().out
    # --budget per rank: more ranks, smaller shards, a longer context in the same memory
    fits = [memory.largest_ctx(a, 40e9, world_size=n, fsdp=True, mlp_chunk=2048) for n in (2, 8)]
    assert 8192 <= fits[0] < fits[1]


def test_fsdp_in_one_process_says_it_shards_nothing(tiny, tmp_path, capsys):
    """A plain run, as predicted by the one-process dry run; but never silently so (a 70B preset would OOM)."""
    train.main(["--model", str(tiny["model"]), "--data", "synthetic", "--ctx", "64", "--max-steps", "1",
                "--out", str(tmp_path / "out"), "--fsdp", "--save-every", "0"])
    assert "--fsdp in one process: nothing to shard" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
