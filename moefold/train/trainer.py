"""Trainer: one optimizer step reads top to bottom; it makes no layout decisions.

The loss contract: the objective is the mean over the global batch's M micro-batches of
(token-mean LM loss + router losses). Each rank back-propagates its local token-mean loss
times `loss_scale = 1 / (M * tp * cp)` (its tokens are 1/(tp*cp) of a micro-batch), the router
injects its loss share with scale 1/M, and `reduce_gradients` sums over the families' groups:
the result equals the single-process gradient.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moefold.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    check_model_config,
    find_resume_checkpoint,
    is_intact,
    list_checkpoints,
    load_checkpoint,
    resolve_init_checkpoint,
    save_checkpoint,
    step_was_finite,
)
from moefold.config import JobConfig, job_to_dict, job_to_toml
from moefold.data import BatchLoader, eval_batches
from moefold.errors import CheckpointRefused, NonFiniteError
from moefold.model.mtp import mtp_shard
from moefold.model.size import flops_per_token
from moefold.parallel.comm import all_ranks_agree
from moefold.parallel.mesh import ParallelGroups
from moefold.parallel.optimizer import build_optimizer
from moefold.run_dir import checkpoint_root as run_checkpoint_root
from moefold.safe_io import atomic_write_text
from moefold.schedules import StageShapes
from moefold.train.loggers import ExperimentLoggers
from moefold.train.lr_schedule import lr_at
from moefold.train.metrics import (
    MetricsWriter,
    expert_load_metrics,
    peak_memory_mb,
    print0,
    step_router_losses,
)
from moefold.train.peak import PeakFlops
from moefold.train.progress import Progress, emit, summarize
from moefold.train.step_runner import LocalRunner, PipelineRunner

logger = logging.getLogger(__name__)


class Trainer:
    """Trains a (possibly parallelised) model; `groups` carries every process group.

    `model` is this rank's part of the model (all of it unless pipelined) and `stages` its
    pipeline stages from split_for_pipeline.
    """

    def __init__(
        self,
        job: JobConfig,
        model: nn.Module,
        stages: list,
        groups: ParallelGroups,
        train_data: Any,
        val_data: Any,
        out_dir: Path,
        device: torch.device,
        peak: PeakFlops | None = None,
    ) -> None:
        self.job, self.model, self.groups = job, model, groups
        self.device, self.out_dir = device, out_dir
        train = job.train
        self.num_microbatches = train.global_batch // train.micro_batch  # M, global
        self.loader = BatchLoader(
            train_data,
            train.global_batch,
            train.micro_batch,
            train.seed,
            dp_rank=groups.coord("dp"),
            dp_size=groups.size("dp"),
        )
        self.val_data = val_data
        # Each rank runs one backward per local micro-batch (per stage under pipelining).
        self.optimizer = build_optimizer(
            model, train, job.parallel, groups, self.num_microbatches // groups.size("dp")
        )
        self.loss_scale = 1.0 / (self.num_microbatches * groups.size("tp_cp"))
        for layer in model.moe_layers():
            layer.router.aux_grad_scale = 1.0 / self.num_microbatches
        self.runner = self._build_runner(stages)
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0  # consecutive skipped steps (train.max_skipped_steps)
        self.tokens_per_step = train.global_batch * train.seq_len
        self.flops_per_step = (
            flops_per_token(job.model, job.moe, train.seq_len) * self.tokens_per_step
        )
        # The MFU denominator is an input (train.peak.mfu_peak, resolved by the launcher): a
        # Trainer built in a test or a notebook measures nothing and writes no cache.
        self.peak = peak
        self.checkpoint_root = run_checkpoint_root(out_dir, job.checkpoint.dir)

    def _build_runner(self, stages: list):
        if self.groups.size("pp") == 1:
            return LocalRunner(
                self.model, self.shard_batch, self.autocast, self.loss_scale, self.mtp_coeff
            )
        train, model_cfg = self.job.train, self.job.model
        shapes = StageShapes(
            train.micro_batch,
            train.seq_len // self.groups.size("tp_cp"),
            model_cfg.hidden,
            model_cfg.vocab_size,
            torch.bfloat16 if train.dtype == "bf16" else torch.float32,
            model_cfg.mtp_depths,
            # bf16 parameters (Megatron-style mixed precision) keep a bf16 residual stream
            hidden_dtype=torch.bfloat16 if train.dtype == "bf16" else torch.float32,
        )
        return PipelineRunner(
            stages,
            self.groups,
            self.job.parallel.pp_schedule,
            self.num_microbatches // self.groups.size("dp"),
            train.eval_batches_for(self.groups.size("dp")) // self.groups.size("dp"),
            self.shard_batch,
            self.autocast,
            self.loss_scale,
            self.device,
            shapes,
            self.mtp_coeff,
        )

    @property
    def mtp_coeff(self) -> float:
        return self.job.train.mtp_loss_coeff if self.job.model.mtp_depths else 0.0

    # ---- the step -------------------------------------------------------------------------

    def autocast(self):
        if self.job.train.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def shard_batch(self, batch_BS1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of this rank's part of one micro-batch [B, S+1].

        `model.positions` (set from the layout) says which tokens this rank holds under context
        and sequence parallelism; at tp = cp = 1 it is the whole micro-batch in order.
        """
        batch_BS1 = batch_BS1.to(self.device)
        local = self.model.positions.local(batch_BS1.shape[1] - 1, self.device)
        if self.job.model.mtp_depths:  # ids and labels [B, s, 1+D], shifted over the full batch
            return mtp_shard(batch_BS1, local, self.job.model.mtp_depths)
        return batch_BS1[:, :-1][:, local], batch_BS1[:, 1:][:, local]

    def train_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.groups.comm_stats.reset()  # count this step's traffic only (not evaluation's)
        loss_sum = self.compute_gradients()
        grad_norm = self.apply_gradients(loss_sum)
        return self.step_metrics(loss_sum, grad_norm, started)

    def compute_gradients(self) -> torch.Tensor:
        """Forward/backward over this rank's micro-batches, then the cross-rank gradient sums.

        Afterwards every parameter's gradient equals the single-process gradient (its shard).
        Returns the sum of this rank's micro-batch losses (0 off the last pipeline stage).
        """
        self.model.train()
        for layer in self.model.moe_layers():
            layer.router.reset_step_statistics()
            layer.stats = type(layer.stats)()
        loss_sum = self.runner.forward_backward(self.loader.next_batch())
        self.optimizer.reduce_gradients()
        return loss_sum

    def apply_gradients(self, loss_sum: torch.Tensor | None = None) -> torch.Tensor:
        """Clip, optimizer step at this step's learning rate, expert-bias update.

        A non-finite loss or gradient norm (the norm is global, so every rank agrees) never
        reaches the weights: the step is skipped (train.nonfinite='skip', counted in
        `skipped_steps`) or the run stops ('stop', or too many skips in a row) without saving:
        the weights that produced a NaN are not a state worth keeping.
        """
        grad_norm = self.clip_gradients()
        if not self._finite(grad_norm, loss_sum):
            self.handle_nonfinite(grad_norm)
        else:
            self.nonfinite_in_a_row = 0
            self.optimizer.step(lr_at(self.step, self.job.train))
            self.update_expert_bias()
        self.step += 1
        return grad_norm

    def _finite(self, grad_norm: torch.Tensor, loss_sum: torch.Tensor | None) -> bool:
        finite = bool(torch.isfinite(grad_norm))
        if loss_sum is None:
            return finite
        # only the last pipeline stage sees the loss: agree everywhere
        return all_ranks_agree(
            finite and bool(torch.isfinite(loss_sum)), self.groups.group("world")
        )

    def handle_nonfinite(self, grad_norm: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        train = self.job.train
        if train.nonfinite == "stop" or self.nonfinite_in_a_row > train.max_skipped_steps:
            raise self.nonfinite_error(
                f"step {self.step + 1}: non-finite loss or gradient norm ({float(grad_norm)}) "
                f"({self.nonfinite_in_a_row} in a row; train.nonfinite={train.nonfinite}, "
                f"train.max_skipped_steps={train.max_skipped_steps})"
            )
        logger.warning("step %d: non-finite loss or gradient norm, step skipped", self.step + 1)

    def nonfinite_error(self, what: str) -> NonFiniteError:
        """The stop message: nothing was saved; where the newest good state is."""
        good = [p for p in list_checkpoints(self.checkpoint_root) if step_was_finite(p)]
        where = f"the newest good checkpoint is {good[-1]}" if good else "no checkpoint was kept"
        return NonFiniteError(
            f"{what}; stopped without saving (these weights produce non-finite values); {where}"
            " (lower train.lr or tighten train.grad_clip, then resume from it)"
        )

    def clip_gradients(self) -> torch.Tensor:
        """Clip by the global norm, which counts every gradient shard exactly once."""
        grad_norm = self.optimizer.grad_norm()
        clip = self.job.train.grad_clip
        if clip > 0:
            scale = float(torch.clamp(clip / (grad_norm + 1e-6), max=1.0))
            if scale < 1.0:
                self.optimizer.scale_gradients(scale)
        return grad_norm

    def update_expert_bias(self) -> None:
        for layer in self.model.moe_layers():
            counts = layer.router.step_tokens_per_expert.clone()
            self.all_reduce(counts, "dp_cp_tp")
            layer.router.update_expert_bias(counts)

    def all_reduce(self, tensor: torch.Tensor, family: str) -> torch.Tensor:
        if self.groups.size(family) > 1:
            dist.all_reduce(tensor, group=self.groups.group(family))
        return tensor

    def sum_over_model(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks of one pipeline stage, then over the stages."""
        return self.all_reduce(self.all_reduce(tensor, "dp_cp_tp"), "pp")

    # ---- metrics --------------------------------------------------------------------------

    def step_metrics(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor, started: float):
        aux, z = step_router_losses(self.model)
        values = self.sum_over_model(torch.stack([loss_sum.float().cpu(), aux, z]))
        elapsed = time.perf_counter() - started
        num_micro = self.num_microbatches
        row: dict[str, Any] = {
            "step": self.step,
            "loss": float(values[0]) / (num_micro * self.groups.size("tp_cp")),
            "aux_loss": float(values[1]) / num_micro,
            "z_loss": float(values[2]) / num_micro,
            "grad_norm": float(grad_norm),
            "lr": lr_at(self.step - 1, self.job.train),
            "tokens_per_s": self.tokens_per_step / elapsed,
            "mfu": self.mfu(elapsed),
            "step_time_s": elapsed,
            "peak_memory_mb": peak_memory_mb(self.device),
            "optimizer_state_mb": self.optimizer.state_bytes() / 2**20,
            "skipped_steps": self.skipped_steps,
        }
        if self.job.model.mtp_depths:  # the mean MTP depth loss, unweighted
            mtp = self.sum_over_model(self.runner.take_mtp_loss().float().cpu())
            row["mtp_loss"] = float(mtp) / (num_micro * self.groups.size("tp_cp"))
        row.update(expert_load_metrics(self.model, self.job.model.layers, self.sum_over_model))
        row["comm_bytes"] = self.groups.comm_stats.as_dict()
        return row

    def mfu(self, elapsed: float) -> float | None:
        """Model FLOPs per second over the peak of all devices (moefold/model/size.py); None
        (null in metrics.jsonl, not a non-finite value) when no peak was given."""
        if self.peak is None:
            return None
        return self.flops_per_step / elapsed / (self.peak.flops_per_s * self.groups.world_size)

    # ---- evaluation, checkpoints, loop ----------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over train.eval_batches fixed micro-batches (split over dp)."""
        self.model.eval()
        train = self.job.train
        num_batches = train.eval_batches_for(self.groups.size("dp"))
        batches = eval_batches(
            self.val_data,
            train.micro_batch,
            num_batches,
            self.groups.coord("dp"),
            self.groups.size("dp"),
        )
        total = self.sum_over_model(self.runner.evaluate(batches))
        self.model.train()
        return float(total) / (num_batches * self.groups.size("tp_cp"))

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "loader": self.loader.state_dict(),
            "finite": self.nonfinite_in_a_row == 0,  # this step's loss and grad norm
        }

    def save(self) -> Path:
        return save_checkpoint(
            self.checkpoint_root,
            self.step,
            self.model,
            self.optimizer,
            self.trainer_state(),
            job_to_toml(self.job),
            self.job.checkpoint.keep,
            self.groups,
        )

    def maybe_resume(self) -> Path | None:
        """Resume from checkpoint.resume; with 'auto', the newest checkpoint that loads (a
        truncated or corrupt one is reported and the next older one is tried)."""
        resume = self.job.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            candidates = [
                p for p in reversed(list_checkpoints(self.checkpoint_root)) if is_intact(p)
            ]
        else:
            explicit = find_resume_checkpoint(self.checkpoint_root, resume)
            candidates = [] if explicit is None else [explicit]
        sections = job_to_dict(self.job)
        for path in candidates:
            check_model_config(path, sections["model"], sections["moe"])
            try:
                state = load_checkpoint(path, self.model, self.optimizer, self.groups)
            except CheckpointError as error:
                if resume != "auto" or isinstance(error, CheckpointRefused):
                    raise  # a crafted file stops the run: someone tampered with the folder
                logger.warning("%s; trying an older checkpoint", error)
                continue
            self.step = int(state["step"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.nonfinite_in_a_row = 0 if state.get("finite", True) else 1
            self.loader.load_state_dict(state["loader"])
            return path
        return None

    def maybe_init_from(self) -> Path | None:
        """Load only the model weights named by checkpoint.init_from (any saved layout; the
        optimizer, step and data position start fresh)."""
        if not self.job.checkpoint.init_from:
            return None
        sections = job_to_dict(self.job)
        path = resolve_init_checkpoint(
            self.job.checkpoint.init_from, sections["model"], sections["moe"]
        )
        load_checkpoint(path, self.model, None, self.groups)
        self.optimizer.refresh_masters()  # bf16: the fp32 main parameters follow the weights
        return path

    def train(self) -> list[dict[str, Any]]:
        job, log = self.job, self.groups.is_logging_rank
        resumed = self.maybe_resume()
        initialised = None if resumed else self.maybe_init_from()
        if resumed:
            start = f"resumed from {resumed}"
        elif initialised:
            start = f"weights from {initialised}"
        else:
            start = "from scratch"
        if self.step > job.train.steps:
            raise CheckpointError(
                f"{resumed} is at step {self.step}, past train.steps={job.train.steps}; raise "
                "train.steps, or pass another --out or checkpoint.resume=none"
            )
        if self.step == job.train.steps:
            logger.warning("%s is already at train.steps=%d: nothing to train", resumed, self.step)
            return []
        if log:  # only now: a refused resume leaves the folder's config.toml as it was
            atomic_write_text(self.out_dir / CONFIG_FILE, job_to_toml(job))
        print0(log, f"moefold: {job.train.steps} steps, {start}")
        writer = MetricsWriter(self.out_dir, log, resume_step=self.step)
        loggers = ExperimentLoggers(
            self.out_dir, log, job.train.wandb_project, job_to_dict(job) if log else None
        )
        rows = []
        progress = Progress(log, job.train.steps, self.step, job.train.log_every)
        while self.step < job.train.steps:
            row = self.train_step()
            if job.train.eval_every and self.step % job.train.eval_every == 0:
                row["val_loss"] = self.evaluate()
            if self.step == job.train.steps and "val_loss" not in row:
                row["val_loss"] = self.evaluate()
            writer.write(row)
            loggers.log(row)
            rows.append(row)
            progress.update(row)
            every = job.checkpoint.every
            wanted = (every and self.step % every == 0) or (
                self.step == job.train.steps and job.checkpoint.save_final
            )
            if self.nonfinite_in_a_row and self.step == job.train.steps:
                raise self.nonfinite_error(f"the last step ({self.step}) was non-finite")
            if wanted and self.nonfinite_in_a_row:
                logger.warning("step %d: not saved (its step was non-finite)", self.step)
            elif wanted:
                self.save()
        progress.close()
        writer.close()
        loggers.close()
        if log:
            saved = list_checkpoints(self.checkpoint_root)
            for line in summarize(rows, self.out_dir, saved[-1] if saved else None):
                emit(line)
        return rows
