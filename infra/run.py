"""One run of train.py around its loop: the process, --out, loading, --resume, the log and metrics.jsonl,
checkpoints on schedule or Ctrl-C, and the closing summary. train.py keeps the method and the loop itself.

A bad model, data or --out fails before --out is touched; an --out this run created is removed again if the
start fails; train_config.json is written only once everything has loaded (checkpoint.py: what --out holds
and the rules of --resume).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from infra import atomic, checkpoint, cli, demo, fsdp, hf, memory, report
from model import DECODER_LINEARS

PRETRAIN_STEPS = 1000   # the paper's 1000 steps when --max-steps is not given (SFT: one epoch)
MAX_SKIPPED = 50        # fp16 steps skipped in a row (overflow at every loss scale) before the run is declared broken


def now() -> str:
    """The wall-clock time, for the metrics rows and the summary: ISO 8601 in UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Run:
    """This process's part (rank of world) of a run: what it loaded, where it logs and saves."""

    def __init__(self, args, build_dataset, build_model, recipe: list[str], saved: list[str]):
        """build_dataset(args, model_args) -> (dataset, pad_id), build_model(args, dtype, device) -> (model,
        trainable, PI factor); `saved`: the flags train_config.json keeps, `recipe`: those --resume must keep."""
        self.args, self.out, self.last_saved = args, Path(args.out), None
        self.output = self.out / ("model" if args.full_finetune else "adapter")      # the final weights
        self.rank, self.world, self.device = init_distributed()
        self.fsdp, self.gathered = args.fsdp and self.world > 1, None    # gathered: --fsdp's adapter, for rank 0
        self.dtype = cli.compute_dtype(args.dtype, self.device)
        if self.dtype == torch.float16 and args.train_embed_norm:     # (--dtype fp16, --as-published, auto on a V100)
            raise ValueError("--train-embed-norm with fp16 compute: the embeddings and norms would be trained in "
                             "fp16, whose gradients loss scaling cannot unscale; use --dtype bf16 or fp32")
        created = next((p for p in [*reversed(self.out.parents), self.out] if not p.exists()), None)
        self.lock = checkpoint.lock(self.out) if self.rank == 0 else None
        try:
            self._load(build_dataset, build_model, recipe, saved)
        except BaseException:
            self.__exit__()
            if created is not None and self.rank == 0:     # what this start made, it removes again
                shutil.rmtree(created, ignore_errors=True)
            raise
        self.log(self.describe())
        if args.fsdp and self.world == 1:       # e.g. a 70B preset started with python instead of torchrun
            self.log("warning: --fsdp in one process: nothing to shard, the whole model is loaded here "
                     "(start it with torchrun --nproc_per_node N)")

    def log(self, message: str) -> None:
        """A line on rank 0's stdout, written above the progress bar (tqdm.write), not into it."""
        if self.rank == 0:
            tqdm.write(message)
            sys.stdout.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            os.close(self.lock)         # releases the lock of --out
            self.lock = None

    def _load(self, build_dataset, build_model, recipe, saved):
        """Check --out, read the config and the data, load the model, and only then write train_config.json."""
        args, out = self.args, self.out
        if args.demo:       # every check (the data too) passes before the previous demo's output is replaced
            start = checkpoint.resume_point(out, args.resume, args.overwrite, args.max_steps, demo=True)
            self.dataset, self.pad_id = build_dataset(args, demo.model_args(args.ctx))
            self.log(f"{demo.BANNER}\n{args.max_steps} steps of {args.grad_accum * args.batch_size * args.ctx:,} "
                     f"tokens on {torch.get_num_threads()} CPU thread(s) (--threads); the time they take is "
                     "printed after the first step")
            if self.rank == 0:
                if start is None:
                    checkpoint.remove_run(out)        # the demo replaces its own previous output
                demo.make_base(out, args.ctx, args.seed)
            if self.world > 1:
                dist.barrier()
            args.model = str(out / "demo-base")
        model_args = hf.read_config(args.model)
        if not args.demo:       # bad model or data are reported before a conflict with --out
            self.dataset, self.pad_id = build_dataset(args, model_args)
            start = checkpoint.resume_point(out, args.resume, args.overwrite, args.max_steps)
        self.heldout = report.held_out_dataset(args, model_args, build_dataset) if args.eval_every else None
        tensorboard = report.summary_writer() if args.tensorboard and self.rank == 0 else None   # or a clear error
        self.sampler = data.ShuffledSampler(len(self.dataset), args.seed, self.rank, self.world)
        if args.max_steps is None:
            args.max_steps = max(1, len(self.sampler) // (args.batch_size * args.grad_accum)) if args.sft \
                else PRETRAIN_STEPS
            if start is not None and start[0] > args.max_steps:
                raise ValueError(f"{start[1]}: the checkpoint is at step {start[0]}, past this run's {args.max_steps}")
        if args.warmup > args.max_steps:
            self.log(f"warning: --warmup {args.warmup} is longer than the run ({args.max_steps} steps): the full LR "
                     "is never reached")
        torch.manual_seed(args.seed)          # the same LoRA initialisation on every rank
        # --fsdp: the structure on meta, sharded, then each rank reads what it keeps (infra/fsdp.py)
        self.model, self.trainable, self.factor = build_model(args, self.dtype, "meta" if self.fsdp else self.device)
        if self.fsdp:
            self.trainable = fsdp.shard(self.model)
            fsdp.load_weights(self.model, args.model, self.dtype, self.device, args.seed, args.quant_backend)
            self.model.set_memory_savings(args.mlp_chunk, args.offload_activations and self.device.type == "cuda")
        self.training = {"rope_scaling": self.model.args.rope_scaling, "ctx": args.ctx,
                         "max_position_embeddings": model_args.max_position_embeddings,
                         **({"template": args.template} if args.sft else {})}
        self.config = {**{k: getattr(args, k) for k in saved}, **self.training, "model": str(args.model),
                       "demo": args.demo, "preset": args.preset, "world_size": self.world, "pi_factor": self.factor,
                       "compute_dtype": str(self.dtype)[6:], "base_fingerprint": hf.fingerprint(args.model),
                       "device": str(self.device), "torch": torch.__version__}
        if start is not None:
            checkpoint.check_same_recipe(start[1], self.config, [*recipe, "base_fingerprint", "world_size", "fsdp"])
        # --resume of a run whose last checkpoint is its last step and whose final weights are saved: nothing to do
        self.complete = start is not None and start[0] == args.max_steps and self.output.is_dir()
        if self.rank == 0 and start is None:        # --- from here on --out is written (on resume: once restored)
            if args.overwrite:
                checkpoint.remove_run(out)
            atomic.write_json(out / "train_config.json", self.config)
            (out / "metrics.jsonl").write_text("")
        self.start = start
        self.tb = tensorboard and tensorboard(str(out / "tensorboard"))       # once --out holds this run

    def describe(self) -> str:
        args, a = self.args, self.model.args
        return (f"model {args.model}: {a.n_layers} layers, dim {a.dim}, trained context {a.max_position_embeddings} "
                f"-> ctx {args.ctx}, PI factor {self.factor:g}; {'NF4' if args.quant == 'nf4' else 'dense'} base, "
                + ("full fine-tuning" if args.full_finetune else f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on "
                   f"{', '.join(DECODER_LINEARS)}" + (" + embeddings, norms" if args.train_embed_norm else ""))
                + f": {sum(p.numel() for p in self.trainable):,} trainable parameters; attention "
                + (f"S²-Attn (groups of {int(args.ctx * args.group_size_ratio)}, shift {args.s2_shift})"
                   if args.attn == "s2" else "full") + f"; {len(self.dataset):,} sequences of {args.ctx} tokens, "
                f"{args.batch_size} x {args.grad_accum} x {self.world} rank(s){' (FSDP)' if self.fsdp else ''} per step; "
                f"{args.max_steps} steps -> {self.out}")

    def restore(self, optimizer, scheduler, scaler) -> int:
        """The step to continue after: 0 for a fresh run, or the checkpoint's, with the weights, optimizer,
        schedule, loss scale, data position and every RNG as they were when it was saved."""
        if self.start is None:
            torch.manual_seed(self.args.seed + self.rank)   # dropout masks differ between ranks
            return 0
        step, self.last_saved = self.start
        if self.rank == 0:
            checkpoint.remove_temporaries(self.out)     # what a kill during a write left (no other run: locked)
        if self.complete:
            return step
        checkpoint.restore(self.last_saved, self.model, self.args.full_finetune, None if self.fsdp else optimizer,
                           scheduler, scaler, self.sampler, self.rank)
        if self.fsdp:
            fsdp.load_sharded(self.last_saved / fsdp.SHARDED, self.model, optimizer)
        if self.rank == 0:
            checkpoint.truncate_metrics(self.out / "metrics.jsonl", step)
            atomic.write_json(self.out / "train_config.json", self.config)
        self.log(f"resumed from {self.last_saved} (step {step})")
        return step

    @contextlib.contextmanager
    def progress(self, start: int):
        """The progress bar, metrics.jsonl open for appending, and Ctrl-C: the first one only sets self.stop (the
        loop finishes its step, saves and exits, save_if_due), a second one interrupts at once."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rows, self.skipped, self.stop, t_start, self.started = [], 0, False, time.perf_counter(), now()
        main = threading.current_thread() is threading.main_thread()      # signals are the main thread's
        previous = signal.signal(signal.SIGINT, self._ctrl_c) if main else None
        try:
            with tqdm(total=self.args.max_steps, initial=start, desc="train", unit="step", disable=self.rank != 0,
                      dynamic_ncols=True) as self.bar, \
                    open(self.out / "metrics.jsonl" if self.rank == 0 else os.devnull, "a") as self.metrics:
                yield
        except (MemoryError, RuntimeError) as e:
            if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "DefaultCPUAllocator" not in str(e):
                raise
            raise ValueError(self.out_of_memory(start + len(self.rows) + 1, e)) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        self.elapsed = time.perf_counter() - t_start
        if self.tb is not None:
            self.tb.close()

    def out_of_memory(self, step: int, e: BaseException) -> str:
        """What a step that ran out of memory needed: infra/memory.py's prediction for this run's shapes."""
        args, where = self.args, "GPU" if self.device.type == "cuda" else "CPU"
        need = memory.predict_peak_memory(self.model.args, args.ctx, **{**memory.options(args, self.dtype.itemsize),
                                                                        "world_size": self.world, "fsdp": self.fsdp})
        return (f"step {step}: out of {where} memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                f"one step of --ctx {args.ctx} x --batch-size {args.batch_size} is predicted to need "
                f"{need['peak_bytes'] / 1e9:.1f} GB (infra/memory.py). See what fits with the same flags plus "
                "--dry-run --budget <memory, e.g. 24GB>, then lower --batch-size or --ctx (--grad-accum keeps the "
                "step's tokens), or add --mlp-chunk / --offload-activations")

    def _ctrl_c(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def check(self, step: int, r: dict, scaler) -> None:
        """Stop, nothing saved, at a non-finite step, or when fp16 loss scaling skipped MAX_SKIPPED steps in a
        row (or every step of a shorter run)."""
        if not r["finite"]:
            raise ValueError(f"step {step}: loss {r['loss']:.4g}, gradient norm {r['grad_norm']:.4g}: not finite; "
                             f"stopped before applying it, nothing saved. Last good checkpoint: "
                             f"{self.last_saved or 'none'}. Lower --lr, or check the data and the base weights")
        self.skipped = self.skipped + 1 if r["skipped"] else 0
        if self.skipped >= MAX_SKIPPED or (step == self.args.max_steps and self.skipped == len(self.rows) + 1):
            raise ValueError(f"step {step}: fp16 loss scaling skipped {self.skipped} steps in a row (the gradients "
                             f"overflow even at scale {scaler.get_scale():g}); nothing saved. Last good "
                             f"checkpoint: {self.last_saved or 'none'}. Use --dtype bf16 or fp32")

    def record(self, step: int, r: dict, t0: float, scaler) -> None:
        """The step's metrics.jsonl row (t0: when it began), the bar, a log line every --log-every steps."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        row = {"step": step, **{k: r[k] for k in ("loss", "grad_norm", "lr", "tokens")},
               "tokens_per_s": r["tokens"] / (time.perf_counter() - t0),
               "peak_mem_bytes": peak_memory_bytes(self.device), "skipped": int(r["skipped"]),
               **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}), "time": now()}
        self.rows.append(row)
        self.write_row(row)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % self.args.log_every == 0 or len(self.rows) == 1:
            self.log(f"step {step}/{self.args.max_steps} loss {row['loss']:.4f} lr {row['lr']:.3g} grad_norm "
                     f"{row['grad_norm'] or 0:.4g} {row['tokens_per_s']:.0f} tok/s peak "
                     f"{row['peak_mem_bytes'] / 2**30:.2f} GiB" + (" SKIPPED (fp16 overflow)" if r["skipped"] else "")
                     + (f"; about {(time.perf_counter() - t0) * (self.args.max_steps - step) / 60:.1f} min for "
                        f"the demo's remaining {self.args.max_steps - step} step(s)"
                        if self.args.demo and len(self.rows) == 1 else ""))

    def write_row(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            report.log_scalars(self.tb, row)

    def evaluate_if_due(self, step: int) -> None:
        """Every --eval-every steps and at the last: the held-out loss at --ctx (rank 0; the others wait)."""
        if not self.args.eval_every or (step % self.args.eval_every and step != self.args.max_steps):
            return
        if self.rank == 0 or self.fsdp:       # a sharded model computes on every rank
            result = report.held_out_loss(self.model, self.heldout, self.args.eval_sequences, self.args.batch_size,
                                          self.pad_id)
            if self.fsdp:       # no backward followed to free the root unit's gathered weights
                self.model.reshard()
            if self.rank == 0:
                self.write_row({"step": step, **result, "time": now()})
            self.log(f"step {step}/{self.args.max_steps} held-out loss {result['eval_loss']:.4f} ppl "
                     f"{result['eval_ppl']:.2f} ({result['eval_tokens']} tokens, full attention)")
        if self.world > 1:
            dist.barrier()

    def save_weights(self, folder: Path, shards: Path | None = None) -> None:
        if shards is not None:
            os.replace(shards, folder / fsdp.SHARDED)
        checkpoint.save_weights(self.model, folder, self.args.full_finetune, self.args.model, self.training,
                                self.gathered)

    def save_if_due(self, step: int, optimizer, scheduler, scaler) -> None:
        """A checkpoint every --save-every steps; after Ctrl-C (on any rank) one more, then stop."""
        interrupted = self.stop
        if self.world > 1:      # Ctrl-C on any rank stops every rank at the same step (a checkpoint needs them all)
            flag = torch.tensor([float(self.stop)])
            dist.all_reduce(flag)
            interrupted = bool(flag.item())
        if interrupted or (self.args.save_every and step % self.args.save_every == 0):
            state = checkpoint.trainer_state(step, None if self.fsdp else optimizer, scheduler, scaler, self.sampler,
                                             self.world)
            shards = fsdp.staging(self.out, step) if self.fsdp else None
            if self.fsdp:       # every rank writes its shards, then rank 0 moves them into the checkpoint
                fsdp.save_sharded(shards, self.model, optimizer)
                self.gathered = fsdp.gather_adapter(self.model)
            if self.rank == 0:
                self.last_saved = checkpoint.save(self.out, step, lambda tmp: self.save_weights(tmp, shards), state,
                                                  self.config, self.args.keep_checkpoints)
        if interrupted:
            self.log(f"stopped at step {step}; checkpoint {self.last_saved}; continue with --resume")
            raise KeyboardInterrupt

    def finish(self) -> dict:
        """The final weights saved (rank 0); the summary, logged and returned."""
        args, out, rows = self.args, self.out, self.rows
        summary = {"out": str(out), "demo": args.demo, "steps": args.max_steps, "steps_run": len(rows),
                   "output": str(self.output)}
        if self.complete:
            self.log(f"{out}: the run is already complete ({args.max_steps} steps, {self.last_saved}); nothing to do")
            return {**summary, "complete": True}
        self.gathered = fsdp.gather_adapter(self.model) if self.fsdp else None
        if self.rank == 0:
            self.save_weights(out)
        if self.world > 1:
            dist.barrier()
        metrics = checkpoint.read_metrics(out / "metrics.jsonl") if self.rank == 0 else rows
        all_rows, evals = [r for r in metrics if "loss" in r], [r for r in metrics if "eval_loss" in r]
        summary.update(first_loss=all_rows[0]["loss"] if all_rows else None,
                       last_loss=all_rows[-1]["loss"] if all_rows else None,
                       tokens_per_s=sum(r["tokens"] for r in rows) / self.elapsed if rows else 0.0,
                       peak_mem_bytes=peak_memory_bytes(self.device), seconds=self.elapsed,
                       started=self.started, finished=now(),
                       **({k: evals[-1][k] for k in ("eval_loss", "eval_ppl")} if evals else {}))
        if self.rank == 0:      # the summary and the loss curve stay in the run folder
            atomic.write_json(out / "summary.json", summary)
            if all_rows:
                report.plot_metrics(out / "metrics.jsonl", out / "loss.png")
        if all_rows:
            self.log(f"loss: first step {summary['first_loss']:.4f} -> last step {summary['last_loss']:.4f}; "
                     f"{summary['tokens_per_s']:.0f} tok/s; peak {summary['peak_mem_bytes'] / 2**30:.2f} GiB; "
                     f"{self.elapsed:.0f} s; saved {summary['output']}")
            if args.demo:
                self.log(demo.verdict(all_rows, self.dataset))
        if self.world > 1:      # leave together: a rank tearing gloo down while another still works can abort it
            dist.barrier()
        return summary


def init_distributed():
    """(rank, world size, device); under torchrun one process per GPU (nccl) or CPU process (gloo)."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def peak_memory_bytes(device) -> int:
    """Peak allocated device memory on CUDA; the process's peak resident set size on CPU (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
