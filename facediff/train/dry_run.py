"""`facediff train CONFIG --dry-run`: the config end to end on the device at hand, in this process, before a
cluster allocation is spent on it (Lightning's `fast_dev_run`, plus a plan).

The stages use the building blocks of the Ray worker loop (`loop.py`) without Ray: the task built at its real
size (`--random-weights`: pretrained networks from their shipped presets, random init), `GpuStep` and a DeepSpeed
engine of world size 1 (a 1-process group of its own: gloo on CPU, NCCL on CUDA), the EMA; batches read straight
from the shards (pyarrow + `stream.dataset.decode_batch` + `stream.batch.finish_batch`) at the config's batch sizes; the
optimizer step(s); one evaluation batch (`eval.batch_size` records, at most EVAL_RECORDS_ON_CPU on a CPU) sampled
with EVAL_SAMPLER_STEPS steps of `eval.sampler` from a plain copy holding the EMA weights (as `Evaluator` does);
`checkpoint.save`; a fresh engine restored by `checkpoint.load`
(the step, the trained weights and the EMA must match, bit for bit); the checkpoint's EMA weights loaded into a
plain task and exported (`task.export`, as `run.train` ends), then reloaded (`load_exported`) and compared.
Everything is written into a temporary folder, removed after.

Timing: the timed step is the last one. On CUDA two steps run and the second is timed (the first pays CUDA
context, kernel loading and allocator growth); on a CPU one step runs (there the first step costs about what a
later one does, and a production step takes minutes). The projected wall time is
`engine.total_steps(cfg, trainer.num_workers)` x that time: data-parallel workers are assumed to keep the
per-worker step time (the all-reduce, the data loading, evaluations and checkpoints are not in it).

Memory: `memory.py` (the measurement and the per-GPU formula).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from facediff.config import resolve_paths
from facediff.config.schema import PIPELINE_FAMILIES, ExperimentConfig
from facediff.data.stream.batch import finish_batch
from facediff.data.prepare.latents import check_cached_inputs
from facediff.data.shards import MANIFEST, shard_paths, split_rows
from facediff.data.stream.dataset import _cached_latent_shape, decode_batch
from facediff.models.pretrained import WeightsNotFound
from facediff.models.weights import copy_weights, gathered
from facediff.rng import batch_generator
from facediff.runs.load import resolve_device
from facediff.tasks import build_task
from facediff.train import checkpoint
from facediff.train.checkpoint import TrainState
from facediff.train.distributed import seed_worker_rng
from facediff.train.ema import EMA
from facediff.train.engine import GpuStep, build_engine, total_steps
from facediff.train.memory import GIB, MemoryProbe, parameter_bytes, per_gpu_estimate

EVAL_SAMPLER_STEPS = 2
EVAL_RECORDS_ON_CPU = 4  # a CPU samples a production network at ~6 s an image a step (unet_r5, 1 thread)
STAGES = ("data", "build", "step", "eval", "checkpoint", "resume", "export")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(error).__name__}: {error}")
        self.stage, self.error = stage, error


@dataclass
class DryRunReport:
    config: str
    device: str
    precision: str
    workers: int
    zero_stage: int
    trainable: int = 0
    frozen: int = 0
    steps: int = 0  # optimizer steps taken (the resumed step must equal it)
    step_seconds: float | None = None
    peak_bytes: int | None = None  # CUDA max allocated, or peak RSS, during the timed step
    activation_bytes: int | None = None
    per_gpu_bytes: int | None = None
    total_steps: int = 0
    projected_seconds: float | None = None
    resumed_step: int | None = None
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ok" or its error
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(self.stages.get(stage) == "ok" for stage in STAGES)


# ------------------------------------------------------------------------------------------------- data
def read_batch(cfg: ExperimentConfig, split: str, n: int, hflip: bool, device: torch.device) -> dict:
    """The first `n` records of a split, decoded and finished on `device` as the loader would (epoch 0)."""
    d = cfg.data
    pieces, taken = [], 0
    for path in shard_paths(d.path, split):
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=n):
            pieces.append(record_batch.slice(0, n - taken))
            taken += pieces[-1].num_rows
            if taken == n:
                break
        if taken == n:
            break
    if taken < n:
        raise ValueError(f"{Path(d.path) / MANIFEST}: split {split!r} holds {taken} records, fewer than the batch of "
                         f"{n} the config asks for; prepare a larger split")
    table = pa.Table.from_batches(pieces)
    columns = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    latent_shape = _cached_latent_shape(Path(d.path), d.image_size, hflip) if d.use_latents else None
    decoded = decode_batch(columns, image_size=d.image_size, hflip=hflip, seed=cfg.trainer.seed, epoch=0,
                           latent_shape=latent_shape)
    return finish_batch({k: torch.as_tensor(v) for k, v in decoded.items()}, d.resolved_part_groups(), device)


def check_data(cfg: ExperimentConfig) -> list[str]:
    """The shards a run reads (ValueError/FileNotFoundError naming the file: bad input). A dry run may read a
    sample of the data, so a `data.train_records` regime the dataset does not hold is a note, not an error."""
    d = cfg.data
    shard_paths(d.path, d.train_split)
    shard_paths(d.path, d.eval_split)
    if d.use_latents:
        check_cached_inputs(d.path, cfg.model)
    found = split_rows(d.path, d.train_split)
    if d.train_records is not None and found != d.train_records:
        return [f"data.train_records is {d.train_records} but {Path(d.path) / MANIFEST} holds {found} training "
                "records: a real run refuses this dataset (the dry run reads a batch of it)"]
    return []


# ------------------------------------------------------------------------------------------- the stages
@contextlib.contextmanager
def single_process_group(device: torch.device):
    """A 1-process torch.distributed group for DeepSpeed (Ray Train makes one in the workers), destroyed after."""
    import torch.distributed as dist

    if dist.is_initialized():  # the caller's own group
        yield
        return
    with socket.socket() as probe:  # a free localhost port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        yield
    finally:
        from deepspeed.comm import comm as deepspeed_comm

        # DeepSpeed's own destroy also drops the groups it cached: a second dry run in this process (the tests)
        # would find groups of the destroyed one
        (deepspeed_comm.destroy_process_group if deepspeed_comm.cdb is not None else dist.destroy_process_group)()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _digest(module_or_tensors) -> str:
    """A hash of the trainable weights of a module (gathered under ZeRO-3), or of a list of tensors."""
    tensors = ([p for p in module_or_tensors.parameters() if p.requires_grad]
               if isinstance(module_or_tensors, torch.nn.Module) else list(module_or_tensors))
    h = hashlib.sha1()
    with gathered(tensors):
        for t in tensors:
            h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # bf16 has no numpy dtype
    return h.hexdigest()


def _collect() -> None:
    """Free what a dropped engine or task held now (DeepSpeed's hooks make cycles) and hand it back to the system
    (glibc keeps freed heap otherwise): the next build must not meet it on a machine with little to spare."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class DryRun:
    def __init__(self, cfg: ExperimentConfig, random_weights: bool, device: torch.device, folder: Path,
                 echo: Callable[[str], None], name: str):
        self.cfg, self.random_weights, self.device, self.folder, self.echo = cfg, random_weights, device, folder, echo
        t = cfg.trainer
        where = str(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} thr)"
        self.report = DryRunReport(name, where, t.precision, t.num_workers, t.zero_stage,
                                   total_steps=total_steps(cfg, t.num_workers))
        self.memory = MemoryProbe(device)
        self.steps = 2 if device.type == "cuda" else 1  # see the module docstring
        self.said = ""

    def build(self):
        """As a worker of `loop.py` does: seeded RNG, the task on the device, its engine, the EMA, the generator."""
        seed_worker_rng(self.cfg.trainer.seed, 0)
        task = build_task(self.cfg, load_pretrained=not self.random_weights).to(self.device)
        gpu_step = GpuStep(self.cfg, self.device)
        engine = build_engine(task, self.cfg, 1, gpu_step)
        ema = EMA(engine.module, self.cfg.trainer.ema, engine.optimizer)  # averages the fp32 masters
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.trainer.seed * 1_000_003)
        return engine, ema, gpu_step, generator

    def run(self) -> DryRunReport:
        cfg, r = self.cfg, self.report
        with self.stage("data"):
            r.notes += check_data(cfg)
            batch = read_batch(cfg, cfg.data.train_split, cfg.trainer.batch_size, cfg.data.hflip, self.device)
            n_eval = min(cfg.eval.batch_size, split_rows(cfg.data.path, cfg.data.eval_split),
                         EVAL_RECORDS_ON_CPU if self.device.type == "cpu" else cfg.eval.batch_size)
            eval_batch = read_batch(cfg, cfg.data.eval_split, n_eval, False, self.device)
            self.said = f"{cfg.trainer.batch_size} training + {n_eval} evaluation records at {cfg.data.image_size} px"
        with self.stage("build"):
            engine, ema, gpu_step, generator = self.build()
            sizes = parameter_bytes(engine.module)
            r.trainable, r.frozen = sizes["trainable"], sizes["frozen"]
            self.said = (f"{r.trainable:,} trainable + {r.frozen:,} frozen parameters, {cfg.trainer.precision}, "
                         f"ZeRO {cfg.trainer.zero_stage}, 1 worker")
        with self.stage("step"):
            for step in range(self.steps):
                static = self.memory.current()
                self.memory.reset_peak()
                start = time.perf_counter()
                engine.module.training_progress = step / r.total_steps
                with gpu_step.forward():
                    loss = engine(gpu_step.batch(batch), generator)
                engine.backward(loss)
                engine.step()
                ema.update(engine.module)
                loss_value = float(loss.detach())  # waits for the step (CUDA)
                r.step_seconds = time.perf_counter() - start
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"the loss of step {step + 1} is {loss_value}")
            r.steps = self.steps
            r.peak_bytes = self.memory.peak()
            r.activation_bytes = max(0, r.peak_bytes - max(static, self.memory.current()))
            r.projected_seconds = r.total_steps * r.step_seconds
            terms = "".join(f", {k} {float(v):.4f}" for k, v in getattr(engine.module, "loss_terms", {}).items())
            self.said = (f"loss {loss_value:.4f}{terms}; step {self.steps}: {r.step_seconds:.2f} s, peak "
                         f"{r.peak_bytes / GIB:.2f} GiB")
        with self.stage("eval"):
            eval_copy_bytes = self.evaluate(engine, ema, eval_batch)
        r.per_gpu_bytes = per_gpu_estimate(cfg, sizes, eval_copy_bytes, r.activation_bytes)
        with self.stage("checkpoint"):
            saved = self.folder / "checkpoint"
            consumed = set(zip(batch["epoch"].tolist(), batch["id"].tolist()))
            checkpoint.save(saved, engine, ema, TrainState(step=self.steps), generator, 0, consumed)
            trained, averaged = _digest(engine.module), _digest(ema.shadow)
            size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
            self.said = f"{size / GIB:.2f} GiB at step {self.steps}"
        engine.destroy()
        del engine, ema
        _collect()
        with self.stage("resume"):
            engine, ema, _, generator = self.build()
            state = checkpoint.load(saved, engine, ema, generator, 0)
            r.resumed_step = state.step
            if state.step != self.steps:
                raise RuntimeError(f"resumed at step {state.step}, saved at step {self.steps}")
            if _digest(engine.module) != trained or _digest(ema.shadow) != averaged:
                raise RuntimeError("the restored trained or EMA weights differ from the saved ones")
            self.said = f"a fresh engine at step {state.step}, trained and EMA weights identical"
        engine.destroy()
        del engine, ema
        _collect()
        with self.stage("export"):
            self.export(saved)
        return r

    @torch.no_grad()
    def evaluate(self, engine, ema, batch):
        """Sample one evaluation batch from a plain copy holding the EMA weights, as `Evaluator` does. Returns the
        copy's bytes, which count per GPU when the config evaluates during training (a worker keeps the copy beside
        its engine; here it is dropped after, to leave room for the resume's second engine)."""
        cfg = self.cfg
        _collect()  # the step's activations, back to the system before the copy is built
        copy = build_task(cfg, load_pretrained=not self.random_weights).eval().to(self.device)
        sizes = parameter_bytes(copy)
        if cfg.eval.use_ema:
            ema.gather()
            ema.copy_to(copy)
        else:
            copy_weights(engine.module, copy)
        n = len(batch["id"])
        images = copy.sample(n, batch_generator(cfg.eval.seed, 0, 0, 1), cfg.eval.sampler, EVAL_SAMPLER_STEPS, batch)
        want = (n, 3, cfg.data.image_size, cfg.data.image_size)
        if tuple(images.shape) != want or not torch.isfinite(images).all():
            raise RuntimeError(f"samples of shape {tuple(images.shape)} (want {want}), all finite: "
                               f"{bool(torch.isfinite(images).all())}")
        self.said = f"{n} samples, {cfg.eval.sampler} x {EVAL_SAMPLER_STEPS} steps, EMA weights"
        del copy, images
        _collect()
        evaluates = cfg.eval.every_kimg is not None
        return sizes["trainable_bytes"] + sizes["frozen_bytes"] + sizes["held_bytes"] if evaluates else 0

    def export(self, saved: Path) -> None:
        """As `run.train` ends (in the driver, on its CPU): a plain task given the checkpoint's EMA weights, exported;
        then reloaded."""
        task = build_task(self.cfg, load_pretrained=not self.random_weights).eval()
        missing, unexpected = task.load_state_dict(checkpoint.load_ema_weights(saved), strict=False)
        names = [name for name, p in task.named_parameters() if p.requires_grad]
        if unexpected or set(names) & set(missing):
            raise RuntimeError(f"the EMA weights do not fit the task (missing {sorted(set(names) & set(missing))[:3]},"
                               f" unexpected {unexpected[:3]})")
        out = self.folder / "export"
        task.export(out)
        files = sum(1 for f in out.rglob("*") if f.is_file())
        if self.random_weights and self.cfg.model.family in PIPELINE_FAMILIES:
            # the export names its base pipeline by hub id: under --random-weights there is none to load it onto
            self.said = f"{files} files; reload skipped (its base pipeline is pretrained, absent here)"
            return
        before = _digest(task)
        task.load_exported(out)
        reloaded = dict(task.named_parameters())
        if any(name not in reloaded for name in names) or _digest(reloaded[n] for n in names) != before:
            raise RuntimeError("the reloaded export differs from the exported weights")
        self.said = f"{files} files, reloaded identical"

    @contextlib.contextmanager
    def stage(self, name: str):
        """One progress line when the stage ends (`self.said`: what it did); a failure is raised as StageFailed
        naming it, except missing pretrained weights, which are the user's input (exit 2: --random-weights)."""
        start, self.said = time.perf_counter(), ""
        try:
            yield
        except WeightsNotFound:
            raise
        except Exception as err:  # noqa: BLE001 - any failure ends the dry run at this stage, named
            self.report.stages[name] = f"{type(err).__name__}: {err}"
            raise StageFailed(name, err) from err
        self.report.stages[name] = "ok"
        self.echo(f"dry run: {name:<10} ok {time.perf_counter() - start:7.1f} s  {self.said}")


def dry_run(cfg: ExperimentConfig, name: str, random_weights: bool = False, device: str = "auto",
            echo: Callable[[str], None] = print) -> DryRunReport:
    """Run every stage (see the module docstring). Raises StageFailed naming the first stage that failed (the
    report so far as its `.report`); ValueError/FileNotFoundError for bad input (missing shards, pretrained
    weights absent without `random_weights`)."""
    cfg = resolve_paths(cfg)
    target = resolve_device(device)
    check_data(cfg)  # missing shards or latents: bad input, before anything is built
    with tempfile.TemporaryDirectory(prefix="facediff-dry-run-") as folder, single_process_group(target):
        run = DryRun(cfg, random_weights, target, Path(folder), echo, name)
        try:
            return run.run()
        except StageFailed as failed:
            failed.report = run.report
            raise
        finally:
            _collect()


# -------------------------------------------------------------------------------------------- the table
def _duration(seconds: float) -> str:
    unit, size = next(((u, n) for u, n in (("d", 86400), ("h", 3600), ("min", 60)) if seconds >= n), ("s", 1))
    return f"{seconds / size:.1f} {unit}"


def _size(b: int | None) -> str:
    return "-" if b is None else f"{b / GIB:.1f} GiB" if b >= GIB else f"{b / 2**20:.0f} MiB"


def table_rows(reports: list[DryRunReport]) -> list[list[str]]:
    """The table's header and one row per report (docs/dry-run.md holds every production config's)."""
    rows = [["config", "device", "trainable", "frozen", "s/step", "peak mem", "per-GPU est.", "total steps",
             "projected", "stages"]]
    for r in reports:
        timed = r.step_seconds is not None
        rows.append([r.config, r.device, f"{r.trainable:,}", f"{r.frozen:,}", f"{r.step_seconds:.2f}" if timed else "-",
                     _size(r.peak_bytes) + ("" if r.device.startswith("cuda") else " RSS"),
                     f"{_size(r.per_gpu_bytes)} ({r.workers}x, ZeRO {r.zero_stage}, {r.precision})",
                     f"{r.total_steps:,}", _duration(r.projected_seconds) if timed else "-",
                     f"{sum(r.stages.get(stage) == 'ok' for stage in STAGES)}/{len(STAGES)} ok"])
    return rows


def format_table(reports: list[DryRunReport]) -> str:
    """Plain text, aligned: names left, numbers right."""
    rows = table_rows(reports)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)
