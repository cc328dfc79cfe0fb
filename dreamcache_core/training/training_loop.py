"""The adapter training loop: optimizer, accumulation, precision, checkpoints, exact resume, logging, DDP.

Only the adapter's parameters are optimised (AdamW, or Adafactor: ``make_optimizer``); every base-model tensor
is frozen (``requires_grad_(False)``) and never handed to the optimizer. One
optimizer step consumes ``batch_size * grad_accum * world_size`` samples,
drawn from the epoch-shuffled stream of ``sample_draws.draw_sample``: the
k-th sample of the run always gets the same dataset row, timestep, noise and
dropout decisions, whatever the number of processes, and a resumed run
continues the very same stream.

Checkpoints (every ``save_every`` steps and at the end) are the pack's adapter
``.safetensors`` (loadable by Load DreamCache Adapter) plus a side file
``<name>.state.pt`` (optimizer and grad-scaler state, step, RNG states, the
config) read back with ``torch.load(weights_only=True)``.

What a run reports (rank 0 only): ``train_log.csv`` (a row per log interval:
the step's loss, the mean loss per timestep band over the interval, lr, grad
norm, samples/s, peak memory), TensorBoard event files in ``tensorboard/``
(the same as scalars, the loss and grad norm of every step, and the validation
grid), and, with a ``Validator``, a validation grid PNG and the held-out
reference gap (``reference_gap.csv``) every ``validator.settings.every``
steps. Losses and grad norms stay on the device until a log line is written:
one device sync per log line.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..io.adapter_io import load_adapter, save_adapter
from ..io.memory_probes import proc_status_bytes
from .sample_draws import SampleDraw, draw_sample
from .reference_gap import GAP_FIELDS, TIMESTEP_BANDS, band_index
from .training_loss import LossRow, denoising_losses, gradient_checkpointing, sigma_of_timestep
from .training_sources import null_reference_cache, reference_cache
from ..comfy_bridge import comfy_memory_attention
from ..method.adapter import check_adapter_fits

CHECKPOINT_DIR = "checkpoints"
FINAL_NAME = "dreamcache_adapter.safetensors"
LOG_NAME = "train_log.csv"
LOG_FIELDS = ["step", "samples", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s"] + [
    f"loss_t_{band}" for band, _, _ in TIMESTEP_BANDS] + ["peak_memory_mb"]
GAP_LOG_NAME = "reference_gap.csv"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class TrainConfig:
    output_dir: str
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5                      # the authors' learning rate
    weight_decay: float = 1e-2
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0            # 0 = no clipping
    warmup_steps: int = 0
    caption_dropout: float = 0.05         # caption -> empty prompt (what combined guidance's e(I, 0) needs)
    reference_dropout: float = 0.05       # reference -> the null (white) reference
    seed: int = 0
    timestep_range: tuple = (0, 999)
    mixed_precision: str = "auto"         # auto | no | bf16 | fp16
    optimizer: str = "adamw"              # adamw | adafactor (see make_optimizer)
    gradient_checkpointing: bool = False
    use_masks: bool = True                # drop background tokens where a reference mask is given
    save_every: int = 500
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True              # event files in <output_dir>/tensorboard (needs the tensorboard package)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        data["timestep_range"] = list(self.timestep_range)
        return data


@dataclass
class DistributedInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _AdapterStep(torch.nn.Module):
    """The adapter as a module whose forward is one micro-batch loss, so DistributedDataParallel can wrap it."""

    def __init__(self, adapter, trainer):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "_trainer", trainer)  # not a submodule: DDP must not see the base model

    def forward(self, draws):
        losses = self._trainer.draw_losses(draws)
        self._trainer._row_losses.append((draws, losses.detach()))
        return losses.mean()


def resolve_precision(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``mode`` on ``device`` (None = no autocast)."""
    mode = (mode or "auto").lower()
    if mode in ("no", "none", "fp32", "off"):
        return None
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 mixed precision needs a CUDA device; use --mixed-precision bf16 or no on the CPU.")
        return torch.float16
    raise ValueError(f"Unknown mixed precision {mode!r}; use auto, no, bf16 or fp16.")


OPTIMIZERS = ("adamw", "adafactor")


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, over ``parameters``.

    * adamw: ``torch.optim.AdamW`` (the authors'), two fp32 moments per parameter: 8 bytes per adapter
      parameter (0.2 GB for SD1.5's 25M);
    * adafactor: ``torch.optim.Adafactor`` (no extra dependency), no first moment and a factored second moment
      (a row and a column vector per matrix): next to no state. Its step is relative: each tensor moves by
      about ``min(lr, 1/sqrt(step)) * max(1e-3, RMS(tensor))``, so ``lr`` is not AdamW's absolute step size
      (torch's default is 1e-2), and it reads every tensor's norm on the host each step (one device sync
      per tensor per step).
    """
    name = (config.optimizer or "adamw").lower()
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                 weight_decay=config.weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(parameters, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"Unknown optimizer {config.optimizer!r}; use one of {', '.join(OPTIMIZERS)}.")


class AdapterTrainer:
    """Trains ``adapter`` on ``source`` against the frozen ``model_patcher`` (a ComfyUI ModelPatcher)."""

    def __init__(self, model_patcher, adapter, source, config: TrainConfig, distributed: Optional[DistributedInfo] = None,
                 attention=None, log: Callable[[str], None] = print, validator=None):
        self.model = model_patcher
        self.unet = model_patcher.model.diffusion_model
        check_adapter_fits(adapter, self.unet)
        self.source = source
        self.config = config
        self.dist = distributed or DistributedInfo()
        self.attention = attention or comfy_memory_attention
        self.log = log if self.dist.is_main else (lambda message: None)
        self.device = torch.device(model_patcher.load_device)
        self.model.model.requires_grad_(False)
        self.adapter = adapter.to(device=self.device, dtype=torch.float32)
        self.adapter.requires_grad_(True)
        self.autocast_dtype = resolve_precision(config.mixed_precision, self.device)
        self.optimizer = make_optimizer(self.adapter.parameters(), config)
        fp16 = self.autocast_dtype == torch.float16 or self.unet.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if (fp16 and self.device.type == "cuda") else None
        self.step = 0
        self.samples_seen = 0
        self._history: list = []  # (step, loss) as floats, see ``history``
        self._unread_losses: list = []  # (step, statistics vector, see train_step) not read from the device yet
        self._step_statistics: dict = {}  # step -> (grad norm, band loss sums, band row counts) as floats
        self._row_losses: list = []  # (draws, per-row losses) of the current step's micro-batches
        self.validator = validator
        self.step_module = _AdapterStep(self.adapter, self)
        self.ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.step_module, device_ids=None)
        self._special = None
        self._null_cache = None

    # ------------------------------------------------------------------ data
    @property
    def special(self):
        if self._special is None:
            self._special = self.source.special()
        return self._special

    def draws_for(self, step: int, micro: int) -> list:
        """The samples this process handles in micro-batch ``micro`` of optimizer step ``step``."""
        c = self.config
        first = ((step * c.grad_accum + micro) * self.dist.world_size + self.dist.rank) * c.batch_size
        return [draw_sample(c.seed, first + j, len(self.source), c.caption_dropout, c.reference_dropout,
                            tuple(c.timestep_range)) for j in range(c.batch_size)]

    def loss_row(self, draw: SampleDraw, reference: str = "matched", shuffled_index: Optional[int] = None) -> LossRow:
        """The loss row of ``draw``; ``reference`` = matched | shuffled (cache of ``shuffled_index``) | none."""
        sample = self.source.prepared(draw.index, draw)
        special = self.special
        cond, pooled = sample.text_cond, sample.text_pooled
        if draw.drop_caption:
            cond, pooled = special.empty_cond, special.empty_pooled
        if reference == "none":
            cache = None
        elif draw.drop_reference:
            cache = self.null_cache()
        elif reference == "shuffled":
            other = self.source.prepared(shuffled_index)
            cache = reference_cache(self.model, other, shuffled_index, special, self.config.use_masks)
        else:
            cache = reference_cache(self.model, sample, draw.index, special, self.config.use_masks)
        sigma = float(sigma_of_timestep(self.model, [draw.timestep])[0])
        return LossRow(sample.target_latent, draw.noise(sample.target_latent.shape), sigma, cond, pooled, cache)

    def null_cache(self):
        if self._null_cache is None:
            self._null_cache = null_reference_cache(self.model, self.special)
        return self._null_cache

    def autocast(self):
        if self.autocast_dtype is None:
            return None
        return lambda: torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def draw_losses(self, draws: list, reference: str = "matched") -> torch.Tensor:
        rows = [self.loss_row(d, reference) for d in draws]
        return denoising_losses(self.model, self.adapter, rows, self.attention, self.autocast())

    # ------------------------------------------------------------------ steps
    def lr_at(self, step: int) -> float:
        if self.config.warmup_steps > 0 and step < self.config.warmup_steps:
            return self.config.lr * (step + 1) / self.config.warmup_steps
        return self.config.lr

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns the mean loss of the step's samples (over all processes) as a 0-d tensor
        on the loss's device. Reading it is a device sync: ``fit`` reads losses at its log interval only."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        module = self.ddp or self.step_module
        total = None
        self._row_losses = []
        with gradient_checkpointing(self.unet, c.gradient_checkpointing):
            for micro in range(c.grad_accum):
                draws = self.draws_for(self.step, micro)
                sync = (micro == c.grad_accum - 1) or self.ddp is None
                context = contextlib.nullcontext() if sync else self.ddp.no_sync()
                with context:
                    loss = module(draws)
                    scaled = loss / c.grad_accum
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                part = loss.detach().double() / c.grad_accum
                total = part if total is None else total + part
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if c.max_grad_norm and c.max_grad_norm > 0:  # the norm before clipping, as clip_grad_norm_ measures it
            grad_norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), c.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.adapter.parameters() if p.grad is not None])
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # [mean loss, loss sum per timestep band, rows per band]: one all-reduce, read at the log interval
        bands = len(TIMESTEP_BANDS)
        band_sums = torch.zeros(bands, dtype=torch.float64, device=total.device)
        band_counts = torch.zeros(bands, dtype=torch.float64)
        for draws, losses in self._row_losses:
            where = torch.tensor([band_index(d.timestep) for d in draws])
            band_sums.index_add_(0, where.to(total.device), losses.double())
            band_counts.index_add_(0, where, torch.ones(len(draws), dtype=torch.float64))
        self._row_losses = []
        statistics = torch.cat([total.reshape(1), band_sums, band_counts.to(total.device)])
        if self.dist.enabled:
            import torch.distributed as torch_dist

            torch_dist.all_reduce(statistics, op=torch_dist.ReduceOp.SUM)
            statistics[0] /= self.dist.world_size
        total = statistics[0]
        self.step += 1
        self.samples_seen += c.batch_size * c.grad_accum * self.dist.world_size
        self.last_grad_norm = grad_norm
        self._unread_losses.append((self.step, torch.cat([statistics, grad_norm.detach().reshape(1).to(
            statistics.device, torch.float64)])))
        return total

    @property
    def history(self) -> list:
        """(step, loss) of every optimizer step of this process's run, as floats (read in one sync)."""
        if self._unread_losses:
            bands = len(TIMESTEP_BANDS)
            rows = torch.stack([vector for _, vector in self._unread_losses]).tolist()
            for (step, _), row in zip(self._unread_losses, rows):
                self._history.append((step, row[0]))
                self._step_statistics[step] = (row[-1], row[1:1 + bands], row[1 + bands:1 + 2 * bands])
            self._unread_losses = []
        return self._history

    def peak_memory_bytes(self) -> tuple:
        """(bytes, what): the device's peak allocated memory on CUDA (``torch.cuda.max_memory_allocated``), else
        the process's peak resident set size (VmHWM, Linux; None elsewhere). No device sync."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), "peak_gpu_memory_gib"
        return proc_status_bytes("VmHWM"), "peak_rss_gib"

    def _band_losses(self, steps: list) -> dict:
        """Mean loss per timestep band over the rows of ``steps`` ((step, loss) pairs); None for an empty band."""
        sums = [0.0] * len(TIMESTEP_BANDS)
        counts = [0.0] * len(TIMESTEP_BANDS)
        for step, _ in steps:
            _, band_sums, band_counts = self._step_statistics[step]
            sums = [a + b for a, b in zip(sums, band_sums)]
            counts = [a + b for a, b in zip(counts, band_counts)]
        return {band: (total / count if count else None)
                for (band, _, _), total, count in zip(TIMESTEP_BANDS, sums, counts)}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, step: int) -> str:
        return os.path.join(self.config.output_dir, CHECKPOINT_DIR, f"adapter-{step:07d}.safetensors")

    def save_checkpoint(self, path: Optional[str] = None) -> str:
        path = path or self.checkpoint_path(self.step)
        if not self.dist.is_main:
            return path
        metadata = {"training": {"step": self.step, "samples": self.samples_seen, "seed": self.config.seed,
                                 "lr": self.config.lr, "source": getattr(self.source, "describe", dict)()}}
        save_adapter(self.adapter, path, extra_metadata=metadata)
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "python": json.dumps(random.getstate())},
            "config": json.dumps(self.config.to_json(), sort_keys=True),
        }
        torch.save(state, side_file(path))
        return path

    def resume(self, path: str) -> None:
        """Continue exactly from a checkpoint written by ``save_checkpoint``."""
        state_path = side_file(path)
        if not os.path.isfile(state_path):
            raise ValueError(f"{path} has no training state beside it ({os.path.basename(state_path)}); it can start a "
                             "new run (--init-adapter) but cannot be resumed exactly.")
        loaded = load_adapter(path)
        if sorted(loaded.keys()) != sorted(self.adapter.keys()):
            raise ValueError(f"{path} was trained for other memory layers than this base model's; it cannot be resumed.")
        with torch.no_grad():
            for (name, param), (_, value) in zip(self.adapter.named_parameters(), loaded.named_parameters()):
                param.copy_(value.to(param.device, param.dtype))
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = json.loads(state.get("config", "{}"))
        saved_optimizer = saved.get("optimizer", "adamw")
        if saved_optimizer != self.config.optimizer:
            raise ValueError(f"{path} was trained with --optimizer {saved_optimizer}; resume it with the same optimizer "
                             f"(not {self.config.optimizer}), or start a new run from its weights with --init-adapter.")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "python" in rng:
            python_state = json.loads(rng["python"])
            random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        changed = [k for k in ("seed", "batch_size", "grad_accum", "caption_dropout", "reference_dropout")
                   if k in saved and saved[k] != getattr(self.config, k)]
        if changed:
            self.log(f"warning: resuming with changed {', '.join(changed)}; the run will not match an uninterrupted one")
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ the run
    def train(self, steps: Optional[int] = None) -> str:
        """Train up to ``steps`` (default: config.steps) optimizer steps; returns the final adapter path."""
        c = self.config
        target = c.steps if steps is None else steps
        os.makedirs(c.output_dir, exist_ok=True)
        log_writer = _CsvLog(os.path.join(c.output_dir, LOG_NAME), self.step) if self.dist.is_main else None
        validate = self.validator is not None and self.validator.settings.every > 0 and self.dist.is_main
        gap_writer = (_CsvLog(os.path.join(c.output_dir, GAP_LOG_NAME), self.step, GAP_FIELDS)
                      if validate and self.validator.settings.gap else None)
        board = TensorBoardLog.open(c.output_dir, self.step, self.log) if (c.tensorboard and self.dist.is_main) else None
        bar = None
        if c.progress and self.dist.is_main:
            try:
                from tqdm import tqdm
                bar = tqdm(total=target, initial=self.step, desc="train DreamCache", unit="step", dynamic_ncols=True)
            except ImportError:
                bar = None
        start = time.perf_counter()
        samples_at_start = self.samples_seen
        running = None
        logged = len(self.history)
        try:
            while self.step < target:
                self.train_step()
                if bar is not None:
                    bar.update(1)
                if self.step % c.log_every == 0 or self.step == target:  # losses stay on the device until then
                    history = self.history
                    new_losses = [loss for _, loss in history[logged:]]
                    logged = len(history)
                    bad = next((loss for loss in new_losses if not math.isfinite(loss)), None)
                    if bad is not None:
                        raise FloatingPointError(f"The loss became {bad} by step {self.step}; lower --lr or use "
                                                 "--mixed-precision no.")
                    for loss in new_losses:
                        running = loss if running is None else 0.9 * running + 0.1 * loss
                    elapsed = time.perf_counter() - start
                    rate = (self.samples_seen - samples_at_start) / max(elapsed, 1e-9)
                    band_losses = self._band_losses(history[-len(new_losses):])
                    memory, memory_kind = self.peak_memory_bytes()
                    if bar is not None:
                        bar.set_postfix(loss=f"{running:.4f}", samples_s=f"{rate:.1f}")
                    if log_writer:
                        row = {"step": self.step, "samples": self.samples_seen,
                               "loss": f"{new_losses[-1]:.6f}", "lr": f"{self.lr_at(self.step - 1):.3g}",
                               "grad_norm": f"{self._step_statistics[self.step][0]:.4g}",
                               "samples_per_s": f"{rate:.2f}", "elapsed_s": f"{elapsed:.1f}",
                               "peak_memory_mb": "" if memory is None else f"{memory / 2 ** 20:.0f}"}
                        row.update({f"loss_t_{band}": "" if value is None else f"{value:.6f}"
                                    for band, value in band_losses.items()})
                        log_writer.write(row)
                    if board:
                        for step, loss in history[-len(new_losses):]:
                            board.scalar("train/loss", loss, step)
                            board.scalar("train/grad_norm", self._step_statistics[step][0], step)
                            board.scalar("train/lr", self.lr_at(step - 1), step)
                        for band, value in band_losses.items():
                            if value is not None:
                                board.scalar(f"train/loss_t_{band}", value, self.step)
                        board.scalar("train/samples_per_s", rate, self.step)
                        if memory is not None:
                            board.scalar(f"train/{memory_kind}", memory / 2 ** 30, self.step)
                        board.flush()
                if validate and self.step % self.validator.settings.every == 0:
                    record = self.validator.run(self.step, self.adapter, c.output_dir, self.log, board)
                    if gap_writer:
                        gap_writer.write({k: v if k == "step" else f"{v:.6f}" for k, v in record.items()})
                    if board:
                        for name in ("gap", "matched", "shuffled", "gap_fraction", "gap_low", "gap_mid", "gap_high"):
                            board.scalar(f"reference_gap/{name}", record[name], self.step)
                        board.flush()
                if c.save_every and self.step % c.save_every == 0 and self.step < target:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            for writer in (log_writer, gap_writer, board):
                if writer:
                    writer.close()
        self.save_checkpoint(self.checkpoint_path(self.step))
        final = os.path.join(c.output_dir, FINAL_NAME)
        if self.dist.is_main:
            metadata = {"training": {"step": self.step, "samples": self.samples_seen, "seed": c.seed, "lr": c.lr}}
            save_adapter(self.adapter, final, extra_metadata=metadata)
            self.log(f"saved {final} after {self.step} steps ({self.samples_seen} samples)")
        return final


def side_file(adapter_path: str) -> str:
    root, _ = os.path.splitext(adapter_path)
    return root + ".state.pt"


def latest_checkpoint(output_dir: str) -> Optional[str]:
    folder = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return None
    found = sorted(f for f in os.listdir(folder) if f.startswith("adapter-") and f.endswith(".safetensors")
                   and os.path.isfile(side_file(os.path.join(folder, f))))
    return os.path.join(folder, found[-1]) if found else None


class _CsvLog:
    """train_log.csv (or another per-step csv); on resume the rows after the resumed step are dropped, so the log
    matches the run."""

    def __init__(self, path: str, resume_step: int, fields: Optional[list] = None):
        fields = fields or LOG_FIELDS
        rows = []
        if os.path.isfile(path) and resume_step > 0:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = [r for r in csv.DictReader(handle) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        self.handle = open(path, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.handle, fieldnames=fields)
        self.writer.writeheader()
        for row in rows:
            self.writer.writerow({k: row.get(k, "") for k in fields})
        self.handle.flush()

    def write(self, row: dict):
        self.writer.writerow(row)
        self.handle.flush()

    def close(self):
        self.handle.close()


class TensorBoardLog:
    """Scalars and images in ``<output_dir>/tensorboard`` through ``torch.utils.tensorboard.SummaryWriter``.

    A resumed run drops the events after the resumed step (``purge_step``), as train_log.csv does.
    """

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, output_dir: str, resume_step: int, log: Callable[[str], None]) -> Optional["TensorBoardLog"]:
        """The log, or None (with one line saying why) when the tensorboard package is missing."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("TensorBoard logging is off: the tensorboard package is not installed (pip install tensorboard); "
                "train_log.csv is written either way.")
            return None
        folder = os.path.join(output_dir, TENSORBOARD_DIR)
        return cls(SummaryWriter(folder, purge_step=resume_step if resume_step > 0 else None))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), int(step))

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``image`` [H, W, 3] in 0..1."""
        self.writer.add_image(tag, image.clamp(0, 1), int(step), dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
