"""Stage 4's training engine: one model, its optimizer and schedule, the data, and the loop.

The engine receives the model it trains (stage 4 builds it from its `ModelArgs`); it needs of it
only `args` (a dataclass saved in every checkpoint), `prepare_training(grad_checkpointing)` and a
forward `model(inputs, artist=labels) -> (logits, _)`. It writes the run folder of `pipeline.runs`:
epoch checkpoints, last.pt, best.pt, metrics.jsonl and loss.png (rank 0 only under torchrun).

A run resumes exactly: every micro-batch reseeds torch from (seed, epoch, batch, rank), and a
checkpoint saved inside an epoch holds how many micro-batches of it were trained and the partial
sums of its metrics (`EpochTotals`), so the resumed run finishes the epoch as the straight one did.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import copying
from .cli import EXIT_INTERRUPTED, EXIT_OK
from .dist import DistInfo
from .files import atomic_torch_save
from .patterns import codebook_offsets
from .runs import (LOSS_PLOT, METRICS_FILE, POSITIONS_PLOT, append_metrics, epoch_checkpoint_path, prune_epochs,
                   store_baselines)
from .threads import SpeedWatch
from .train_data import (Dataset, balanced_epoch_windows, epoch_windows, fit_baselines, make_batch, rank_share,
                         train_windows_per_rank, valid_windows)
from .training import (Precision, StopRequest, TrainingDiverged, bits_by_position, bits_per_frame, bucket_sums,
                       build_optimizer, copy_atomically, count_parameters, current_lr, in_position_order,
                       micro_batch_seed, plain, plot_losses, plot_positions, position_buckets, restore_rng_states,
                       rng_states, sequence_losses, set_schedule, to_cpu, token_nll)

CHECKPOINT_FORMAT = 1
LOG = logging.getLogger("pipeline.stage4")
PLOT_INTERVAL_S = 20.0  # loss.png and loss_by_position.png are redrawn at most this often (~0.3 s a drawing),
# and once more when the run ends: short epochs no longer spend most of their time in matplotlib


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    epoch_batches_done: int = 0  # micro-batches of the unfinished epoch already trained (mid-epoch save)
    best_nll: float | None = None  # the lowest epoch NLL so far, bits per frame, measured on `best_split`
    best_split: str = "valid"  # "valid", or "train" when the manifest has no valid clip
    best_epoch: int = 0  # the epoch whose NLL is best_nll (for --patience)
    elapsed_s: float = 0.0  # training time over every run so far


@dataclass
class EpochTotals:
    """Sums over the micro-batches of one epoch on this rank (all ranks after `summed_over_ranks`).

    The sums stay tensors on the training device, so adding to them never waits for the GPU.
    Checkpoints hold them packed in one float64 tensor `[4 + 2Q]`:
    [loss, micro_batches, frames, nll (Q), counts (Q), seconds].
    """

    loss: torch.Tensor  # float64 []: the micro-batches' mean (smoothed) losses, summed
    micro_batches: torch.Tensor  # float64 []
    frames: torch.Tensor  # float64 []: target frames trained (the targets of codebook 0)
    nll: torch.Tensor  # float64 [Q]: NLL in nats of each codebook's targets, summed
    counts: torch.Tensor  # float64 [Q]: targets of each codebook
    seconds: float = 0.0  # this rank's training time: never summed over ranks

    @classmethod
    def zeros(cls, n_codebooks: int, device: str) -> "EpochTotals":
        return cls.unpack(torch.zeros(4 + 2 * n_codebooks, dtype=torch.float64), device)

    @classmethod
    def unpack(cls, packed: torch.Tensor, device: str) -> "EpochTotals":
        """The inverse of `pack`: `[4 + 2Q]` -> totals on `device`."""
        packed = packed.to(device=device, dtype=torch.float64)
        q = (packed.numel() - 4) // 2
        return cls(loss=packed[0].clone(), micro_batches=packed[1].clone(), frames=packed[2].clone(),
                   nll=packed[3:3 + q].clone(), counts=packed[3 + q:3 + 2 * q].clone(), seconds=float(packed[-1]))

    def pack(self) -> torch.Tensor:
        """One float64 tensor `[4 + 2Q]` (for `all_reduce` and checkpoints)."""
        scalars = torch.stack([self.loss, self.micro_batches, self.frames])  # [3]
        seconds = torch.tensor([self.seconds], dtype=torch.float64, device=scalars.device)  # [1]
        return torch.cat([scalars, self.nll, self.counts, seconds])  # -> [4 + 2Q]

    def add(self, loss: torch.Tensor, nll_sums: torch.Tensor, counts: torch.Tensor) -> None:
        """One micro-batch: its mean loss `[]`, NLL sums `[Q]` and target counts `[Q]`."""
        self.loss += loss.double()
        self.micro_batches += 1
        self.frames += counts[0].double()
        self.nll += nll_sums.double()
        self.counts += counts.double()

    def summed_over_ranks(self) -> "EpochTotals":
        """Every rank's sums added up (a collective: call it on every rank); `seconds` stays this rank's."""
        packed = self.pack()
        torch.distributed.all_reduce(packed)
        summed = EpochTotals.unpack(packed, str(packed.device))
        summed.seconds = self.seconds
        return summed

    def mean_loss(self) -> float:
        return float(self.loss / self.micro_batches.clamp(min=1))


class Trainer:
    """One model, its optimizer and schedule, the data, and the loop that ties them together."""

    def __init__(self, args: dict, model: torch.nn.Module, data: Dataset, folder: Path, artist: str,
                 info: DistInfo, device: str, log: logging.Logger = LOG, artists: list[str] | None = None,
                 manifests: list | None = None):
        self.args, self.data, self.folder = args, data, folder
        self.model_args = model.args  # the model's constructor arguments (a dataclass)
        self.artist, self.info, self.device, self.log = artist, info, device, log
        self.artists = list(artists) if artists else [artist]  # label ids: positions in this list
        self.manifests = [str(path) for path in manifests or []]
        self.conditioned = self.model_args.n_artists > 0
        self.store = data.store
        self.train_clips, self.valid_clips = self.store.clips("train"), self.store.clips("valid")
        self.precision = Precision.for_device(device)
        self.progress = Progress()
        self.epoch_totals: EpochTotals | None = None  # partial sums of an unfinished epoch
        self.baselines: dict | None = None  # unigram / bigram scores, fitted by rank 0 at its first validation
        self.buckets = position_buckets(args["context_frames"])  # [start, stop) frames into a window
        self.offsets = codebook_offsets(args["pattern"], data.store.n_codebooks)  # [Q]: row of frame f = f + offset
        self.overfit_reported = False  # the log says once when valid rises while train falls
        self.undrawn_records: list[dict] | None = None  # metrics.jsonl as last written, when not drawn yet
        self.plotted_at = -float("inf")  # time.monotonic() of the last drawing
        self.speed = SpeedWatch("training", "frames", log)
        # --copy-path ngram: the in-context copy path is fitted at every validation that improves the best
        # valid NLL (rank 0, on at most copying.MAX_FIT_WINDOWS of its valid windows); checkpoints carry the
        # latest fit, so best.pt carries the fit of its own weights
        self.copy_enabled = args.get("copy_path", "off") != "off"
        self.copy_held_out: copying.HeldOut | None = None  # the fit windows' tokens (once) and model probabilities
        self.copy_path_record: dict | None = None  # the latest fit (`CopyPath.as_record()`), saved in checkpoints
        per_rank = train_windows_per_rank(self.store, self.train_clips, args["context_frames"], info.world_size)
        self.micro_per_epoch = math.ceil(per_rank / args["batch_size"])
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / args["grad_accum"])
        self.plain_model, self.local_model, self.synced_model = self._model_handles(model)
        self.optimizer, self.scheduler = build_optimizer(self.plain_model, args, self.total_steps(), device)
        self.scaler = self.precision.grad_scaler()

    def total_steps(self) -> int:
        return self.args["epochs"] * self.steps_per_epoch

    def _model_handles(self, model: torch.nn.Module) -> tuple:
        """Three handles on one network: `plain_model`, the nn.Module itself (its weights are what
        checkpoints save, the optimizer steps and gradients are clipped); `local_model`, this process's
        forward (torch.compile'd with --compile, else the plain model; validation uses it: no gradient
        sync); `synced_model`, the training forward and backward (DDP-wrapped under torchrun, so
        gradients are averaged across ranks; else the local model)."""
        plain_model = model.to(self.device)
        plain_model.prepare_training(self.args["grad_checkpointing"])
        local_model = torch.compile(plain_model) if self.args["compile"] else plain_model
        if not self.info.is_distributed:
            return plain_model, local_model, local_model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
        return plain_model, local_model, DistributedDataParallel(local_model, device_ids=device_ids)

    # -- resume ---------------------------------------------------------------------------------------
    def restore(self, checkpoint: dict, new_lr: float | None = None, given: set[str] = frozenset()) -> None:
        """Continue exactly where `checkpoint` stopped; re-plan the schedule if --epochs changed.

        The caller has checked that the checkpoint's weights fit the model. The optimizer's and the
        schedule's saved states carry the old --weight-decay, --warmup-frac and --min-lr-frac: each
        one in `given` (typed again) is applied over them here."""
        self.plain_model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_states(checkpoint["rng"])
        self.progress = Progress(epoch=int(checkpoint["epoch"]), step=int(checkpoint["step"]),
                                 epoch_batches_done=int(checkpoint.get("epoch_batches_done", 0)),
                                 best_nll=checkpoint.get("best_nll_bits_per_frame", checkpoint.get("best_valid_nll")),
                                 best_split=checkpoint.get("best_nll_split", "valid"),
                                 best_epoch=int(checkpoint.get("best_epoch", checkpoint["epoch"])),
                                 elapsed_s=float(checkpoint.get("elapsed_s", 0.0)))
        self.epoch_totals = self._restored_totals(checkpoint.get("epoch_totals"))
        self.copy_path_record = checkpoint.get("copy_path") if self.copy_enabled else None
        planned = self.scheduler.lr_lambdas[0].total_steps
        self.apply_given_options(given)
        if planned != self.total_steps() or new_lr is not None or given & {"warmup_frac", "min_lr_frac"}:
            before = current_lr(self.optimizer)
            set_schedule(self.scheduler, self.total_steps(), new_lr)
            self.log.info("LR schedule re-planned (%d -> %d steps%s): LR %.3g -> %.3g", planned,
                          self.total_steps(), f", peak {new_lr:g}" if new_lr is not None else "", before,
                          current_lr(self.optimizer))

    def _restored_totals(self, packed: torch.Tensor | None) -> EpochTotals | None:
        """A mid-epoch checkpoint's totals are summed over ranks: rank 0 resumes from them, the others from zero."""
        if packed is None:
            return None
        return EpochTotals.unpack(packed if self.info.is_main else torch.zeros_like(packed), self.device)

    def apply_given_options(self, given: set[str]) -> None:
        """Put --weight-decay, --warmup-frac and --min-lr-frac typed with --resume into the restored states."""
        if "weight_decay" in given:
            self.optimizer.param_groups[0]["weight_decay"] = self.args["weight_decay"]  # group 0: the decayed
        schedule = self.scheduler.lr_lambdas[0]
        if "warmup_frac" in given:
            schedule.warmup_steps = round(self.args["warmup_frac"] * self.total_steps())
        if "min_lr_frac" in given:
            schedule.min_factor = float(self.args["min_lr_frac"])

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        """Train until --epochs; returns the exit status (130 when stopped by a signal). However it ends,
        rank 0's plots show every epoch recorded."""
        try:
            return self._train()
        finally:
            if self.info.is_main:
                self.draw_plots()

    def _train(self) -> int:
        self.log.info("training %s: %d train / %d valid clips, %d micro-batches (%d optimizer steps) per epoch "
                      "per rank, %s on %s x%d, %.2f M parameters", self.artist, len(self.train_clips),
                      len(self.valid_clips), self.micro_per_epoch, self.steps_per_epoch, self.precision.name,
                      self.device, self.info.world_size, count_parameters(self.plain_model) / 1e6)
        with StopRequest() as stop:
            while self.progress.epoch < self.args["epochs"]:
                finished = self.train_epoch(stop)
                if finished:
                    self.end_epoch()
                elif self.max_steps_reached() and not stop.signal_number:
                    self.end_partial_epoch()  # validate the last steps, so best.pt is never stale
                else:
                    self.save_last()  # every rank: the partial totals are summed before rank 0 writes
                if stop.signal_number:
                    self.log.warning("stopped by %s at epoch %d, step %d; resume with --resume",
                                     signal.Signals(stop.signal_number).name, self.progress.epoch + 1,
                                     self.progress.step)
                    return EXIT_INTERRUPTED
                if self.max_steps_reached():
                    self.log.info("--max-steps %d reached; resume with --resume", self.args["max_steps"])
                    return EXIT_OK
                if self.patience_ran_out():
                    return EXIT_OK
        return EXIT_OK

    def patience_ran_out(self) -> bool:
        """--patience N: the valid NLL has not improved for N epochs (best.pt keeps the best)."""
        patience, waited = int(self.args.get("patience") or 0), self.progress.epoch - self.progress.best_epoch
        if patience <= 0 or waited < patience or self.progress.best_split != "valid":
            return False
        self.log.info("stopping early: the valid NLL has not improved for %d epochs (--patience %d); best.pt holds "
                      "epoch %d (%.3f bits/frame)", waited, patience, self.progress.best_epoch, self.progress.best_nll)
        return True

    def report_baselines(self) -> None:
        """Rank 0 fits the unigram and bigram on the train split, logs them and stores them in metrics.jsonl.

        Called at the first validation, not at the start: the fit reads every train frame (seconds per
        ten hours of music), and the first optimizer step should not wait for it. Other ranks have no
        use for them (rank 0 alone logs and writes the gains)."""
        if self.baselines is not None or not self.info.is_main:
            return
        eval_clips = self.valid_clips if len(self.valid_clips) else self.train_clips
        scores = fit_baselines(self.store, self.train_clips, eval_clips)
        self.baselines = {**scores.as_record(), "scored_on": "valid" if len(self.valid_clips) else "train"}
        self.log.info("baselines on the %s split: unigram %.2f, bigram %.2f, bigram + unigram %.2f bits/frame; "
                      "the best count model (%s, %.2f) is the yardstick: a model that learned more than a count "
                      "table can ends below it", self.baselines["scored_on"], scores.unigram_bits_per_frame,
                      scores.bigram_bits_per_frame, scores.interpolated_bits_per_frame, scores.best_count_model,
                      scores.best_count_bits_per_frame)
        self.folder.mkdir(parents=True, exist_ok=True)
        store_baselines(self.folder / "metrics.jsonl", self.baselines)

    def max_steps_reached(self) -> bool:
        return 0 < self.args["max_steps"] <= self.progress.step

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's micro-batches of `epoch`, each windows `[B, 2]` (clip, start)."""
        if self.conditioned:
            windows = balanced_epoch_windows(self.store, self.train_clips, self.args["context_frames"],
                                             self.args["seed"], epoch, self.args["artist_alpha"])
        else:
            windows = epoch_windows(self.store, self.train_clips, self.args["context_frames"], self.args["seed"], epoch)
        mine = rank_share(windows, self.info, pad=True)
        size = self.args["batch_size"]
        return [mine[i:i + size] for i in range(0, len(mine), size)]

    def new_totals(self) -> EpochTotals:
        return EpochTotals.zeros(self.store.n_codebooks, self.device)

    def train_epoch(self, stop: StopRequest) -> bool:
        """Train the current epoch from where it stands; False when stopped before its end."""
        epoch, accum = self.progress.epoch, self.args["grad_accum"]
        batches = self.epoch_batches(epoch)
        totals = self.new_totals() if self.epoch_totals is None else self.epoch_totals
        self.synced_model.train()
        bar = self._progress_bar(epoch, len(batches))
        started, group_loss = time.perf_counter(), 0.0
        for micro in range(self.progress.epoch_batches_done, len(batches)):
            group_start = micro - micro % accum
            group_size = min(accum, len(batches) - group_start)  # a leftover group still counts
            is_last = micro == group_start + group_size - 1
            group_loss = group_loss + self.micro_step(batches[micro], epoch, micro, group_size, is_last, totals)
            bar.update(1)
            if not is_last:
                continue
            stop_now = self.optimizer_step(group_loss, stop, epoch)
            group_loss = 0.0
            self.speed.observe(group_size * self.args["batch_size"] * self.args["context_frames"])
            self._update_bar(bar, totals, started)
            if stop_now and micro + 1 < len(batches):
                self._close_epoch_part(totals, started, bar, batches_done=micro + 1)
                return False
            if stop_now:
                break
        self._close_epoch_part(totals, started, bar)
        return True

    def _close_epoch_part(self, totals: EpochTotals, started: float, bar, batches_done: int | None = None) -> None:
        """Count this part's seconds and keep the totals; `batches_done` when the epoch stops before its end."""
        bar.close()
        totals.seconds += time.perf_counter() - started
        self.epoch_totals = totals
        if batches_done is not None:
            self.progress.epoch_batches_done = batches_done

    def micro_step(self, windows: np.ndarray, epoch: int, micro: int, group_size: int, is_last: bool,
                   totals: EpochTotals) -> torch.Tensor:
        """Forward and backward one micro-batch; gradients sync across ranks only on a group's last."""
        seed = micro_batch_seed(self.args["seed"], epoch, micro, self.info.rank)
        torch.manual_seed(seed)
        inputs, targets = make_batch(self.store, windows, self.args["context_frames"], self.args["pattern"],
                                     self.args["frame_dropout"], np.random.default_rng(seed))  # 2 x [B, S, Q]
        inputs, targets = self._to_device(inputs), self._to_device(targets)
        artist = self.training_labels(windows, seed) if self.conditioned else None  # [B] or None
        sync = contextlib.nullcontext() if is_last or not self.info.is_distributed else self.synced_model.no_sync()
        with sync:
            with self.precision.autocast():
                logits, _ = self.synced_model(inputs, artist=artist)  # [B, S, Q] -> [B, S, Q, V]
            loss, nll_sums, counts = sequence_losses(logits, targets, self.args["label_smoothing"])  # [], [Q], [Q]
            self.scaler.scale(loss / group_size).backward()
        loss = loss.detach()
        totals.add(loss, nll_sums, counts)
        return loss

    def training_labels(self, windows: np.ndarray, seed: int) -> torch.Tensor:
        """Each window's artist label `[B]`, replaced by "no artist" with probability --cond-dropout
        (drawn from the micro-batch's seed, so a resumed run drops the same labels)."""
        labels = self.store.clip_labels(windows[:, 0]).copy()  # [B]
        dropped = np.random.default_rng([seed, 1]).random(len(labels)) < self.args["cond_dropout"]  # [B]
        labels[dropped] = self.model_args.n_artists
        return self._to_device(torch.from_numpy(labels))

    def _to_device(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.device.startswith("cuda"):
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        return tokens.long()

    def optimizer_step(self, group_loss: torch.Tensor, stop: StopRequest, epoch: int) -> bool:
        """Clip, step, advance the schedule; True when training should stop after this step."""
        flags = torch.tensor([float(stop.signal_number > 0), float(not torch.isfinite(group_loss).item())],
                             device=self.device)  # [stop asked, loss not finite]
        if self.info.is_distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[1]:
            self.diverged(epoch, "loss")
        self.scaler.unscale_(self.optimizer)
        max_norm = self.args["max_grad_norm"] if self.args["max_grad_norm"] > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.plain_model.parameters(), max_norm)
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            self.diverged(epoch, "gradient norm")  # identical on every rank: gradients are all-reduced
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1
        if flags[0] and not stop.signal_number:
            stop.signal_number = signal.SIGTERM  # another rank was signalled
        return bool(flags[0]) or self.max_steps_reached()

    def diverged(self, epoch: int, what: str) -> None:
        last = self.folder / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"training diverged: the {what} became NaN or infinite at epoch {epoch + 1}, optimizer step "
            f"{self.progress.step + 1}; nothing was saved after it and {kept}. Resume with a lower LR "
            f"(e.g. --resume --lr {self.scheduler.base_lrs[0] / 3:.2g}) or a smaller --max-grad-norm.")

    def _progress_bar(self, epoch: int, n_batches: int):
        from tqdm import tqdm

        return tqdm(total=n_batches, initial=self.progress.epoch_batches_done, unit="batch", leave=False,
                    desc=f"epoch {epoch + 1}/{self.args['epochs']}", disable=not self.info.is_main,
                    dynamic_ncols=True)

    def _update_bar(self, bar, totals: EpochTotals, started: float) -> None:
        """Step, mean loss so far and frames/s (all ranks) on the bar."""
        if bar.disable:
            return
        seconds = time.perf_counter() - started
        mean_loss = totals.loss.item() / max(1.0, totals.micro_batches.item())
        bar.set_postfix(step=self.progress.step, loss=f"{mean_loss:.3f}",
                        fps=f"{totals.frames.item() * self.info.world_size / max(seconds, 1e-9):.0f}")

    # -- end of an epoch ----------------------------------------------------------------------------
    def end_epoch(self) -> dict:
        """Validate, record the epoch (metrics, checkpoints on rank 0), log it; returns its metrics."""
        totals = self.epoch_totals.summed_over_ranks() if self.info.is_distributed else self.epoch_totals
        metrics = self.epoch_metrics(totals)
        self.progress.epoch += 1
        self.progress.epoch_batches_done = 0
        self.progress.elapsed_s += totals.seconds
        self.epoch_totals = None
        metrics.update(epoch=self.progress.epoch, step=self.progress.step, elapsed_s=self.progress.elapsed_s)
        improved = self._track_best(metrics)
        if improved:
            metrics.update(self.fit_copy_path())
        if self.info.is_main:
            self.write_epoch(metrics, improved)
        self._log_epoch(metrics)
        self._report_overfitting(metrics)
        return metrics

    def end_partial_epoch(self) -> dict:
        """--max-steps inside an epoch: validate the steps trained so far and record them (a line of
        metrics.jsonl marked `partial_epoch`, which the finished epoch replaces on resume), so best.pt
        is never older than the last step; then save the resumable last.pt (every rank)."""
        totals = self.epoch_totals.summed_over_ranks() if self.info.is_distributed else self.epoch_totals
        metrics = self.epoch_metrics(totals)
        metrics.update(epoch=self.progress.epoch + 1, partial_epoch=True, step=self.progress.step,
                       elapsed_s=self.progress.elapsed_s + totals.seconds)
        improved = self._track_best(metrics)
        if improved:
            metrics.update(self.fit_copy_path())
        self.save_last(metrics)
        if self.info.is_main:
            if improved:
                copy_atomically(self.folder / "last.pt", self.folder / "best.pt")
            self._write_metrics(metrics)
        self._log_epoch(metrics)
        return metrics

    def _report_overfitting(self, metrics: dict) -> None:
        """Once per run (rank 0 only): the valid NLL rose above its best while the train NLL went on falling."""
        valid = metrics["valid_nll_bits_per_frame"]
        if self.overfit_reported or valid is None or self.progress.best_split != "valid" or not self.info.is_main:
            return
        if valid > self.progress.best_nll + 0.05 and self.progress.epoch > self.progress.best_epoch:
            self.overfit_reported = True
            self.log.warning("the model has started to overfit: valid NLL %.3f rose above its best %.3f (epoch %d) "
                             "while the train NLL fell to %.3f; best.pt keeps epoch %d. More music (or stage 2's "
                             "--shifts 2) helps; a smaller model that learns faster (--preset tiny --lr 1e-2) may "
                             "(docs/stage4.md, 'Overfitting and the early stop')",
                             valid, self.progress.best_nll, self.progress.best_epoch,
                             metrics["train_nll_bits_per_frame"], self.progress.best_epoch)

    def _track_best(self, metrics: dict) -> bool:
        """Whether this epoch's NLL (valid, else train) is the best so far; if so it becomes the best."""
        split = "train" if metrics["valid_nll_bits_per_frame"] is None else "valid"
        score = metrics[f"{split}_nll_bits_per_frame"]
        improved = (self.progress.best_nll is None or split != self.progress.best_split
                    or score < self.progress.best_nll)
        if improved:
            self.progress.best_nll, self.progress.best_split = score, split
            self.progress.best_epoch = metrics["epoch"]
        return improved

    def _log_epoch(self, metrics: dict) -> None:
        if not self.info.is_main:
            return
        gain = metrics["gain_over_best_count_bits_per_frame"]
        valid = metrics["valid_nll_bits_per_frame"]
        self.log.info("epoch %s/%d: train loss %.4f, train NLL %.3f bits/frame, valid NLL %s bits/frame "
                      "(%.2f %s the best count model), LR %.3g, %.0f frames/s",
                      f"{metrics['epoch']}{' (partial)' if metrics.get('partial_epoch') else ''}", self.args["epochs"],
                      metrics["train_loss"], metrics["train_nll_bits_per_frame"],
                      "n/a" if valid is None else f"{valid:.3f}", abs(gain), "below" if gain >= 0 else "above",
                      metrics["lr"], metrics["frames_per_s"])
        if "valid_nll_copy_path_bits_per_frame" in metrics:
            record = metrics["copy_path"]
            self.log.info("  with the in-context copy path (n %d, beta %g; its gate fitted on %d held-out windows, "
                          "scored cross-fitted): valid NLL %.3f bits/frame (fitted in %.2f s)", record["n"],
                          record["beta"], metrics["copy_path_windows"], metrics["valid_nll_copy_path_bits_per_frame"],
                          metrics["copy_path_fit_s"])
        if metrics.get("valid_nll_by_position"):
            self.log.info("  valid NLL by frames into the window: %s", ", ".join(
                f"{bucket} {bits:.2f}" for bucket, bits in in_position_order(metrics["valid_nll_by_position"])))
        for artist, bits in metrics.get("valid_nll_by_artist", {}).items():
            self.log.info("  %s: valid NLL %.3f bits/frame with its label, %.3f with 'no artist'", artist, bits,
                          metrics["valid_nll_no_artist_by_artist"][artist])

    def epoch_metrics(self, totals: EpochTotals) -> dict:
        self.report_baselines()
        train_bits, train_per_codebook = bits_per_frame(totals.nll, totals.counts)
        own, positions = (self.valid_sums("own" if self.conditioned else None, collect=self.copy_enabled)
                          if len(self.valid_clips) else (None, None))
        valid = self.sums_bits(own.sum(dim=0)) if own is not None else None  # [A, 2Q] -> [2Q] -> bits
        by_artist = self.validate_by_artist(own) if self.conditioned and own is not None else {}
        return {"train_loss": totals.mean_loss(),
                "train_nll_bits_per_frame": train_bits, "train_nll_bits_per_codebook": train_per_codebook,
                "valid_nll_bits_per_frame": valid[0] if valid else None,
                "valid_nll_bits_per_codebook": valid[1] if valid else None,
                "lr": current_lr(self.optimizer), "frames": int(totals.frames),
                "frames_per_s": float(totals.frames / max(totals.seconds, 1e-9)),
                "epoch_time_s": totals.seconds, "pattern": self.args["pattern"],
                "valid_nll_by_position": (bits_by_position(positions, self.buckets, self.store.n_codebooks)
                                          if positions is not None else None),
                **by_artist, **self.gains(valid[0] if valid else train_bits)}

    def gains(self, model_bits: float) -> dict:
        """How far below the baselines the model is (bits/frame; positive = better than the baseline);
        {} on ranks other than 0, which do not fit the baselines."""
        if self.baselines is None:
            return {}
        best_count = self.baselines.get("best_count_bits_per_frame",
                                        min(self.baselines["unigram_bits_per_frame"], self.baselines["bigram_bits_per_frame"]))
        return {"gain_over_unigram_bits_per_frame": self.baselines["unigram_bits_per_frame"] - model_bits,
                "gain_over_bigram_bits_per_frame": self.baselines["bigram_bits_per_frame"] - model_bits,
                "gain_over_best_count_bits_per_frame": best_count - model_bits}

    def sums_bits(self, sums: torch.Tensor) -> tuple[float, list]:
        """NLL sums and counts `[2Q]` (as `valid_sums` keeps them) -> (bits per frame, bits per codebook)."""
        q = self.store.n_codebooks
        return bits_per_frame(sums[:q], sums[q:])

    def fit_copy_path(self) -> dict:
        """Rank 0 fits the copy path on the windows the last validation collected (`valid_sums` with
        `collect`) and keeps it for the checkpoints -> its metrics ({} when there is nothing to fit)."""
        held_out = self.copy_held_out
        if not self.copy_enabled or not self.info.is_main or held_out is None or not held_out.model:
            return {}
        started = time.perf_counter()
        fitted = copying.fit(held_out)
        self.copy_path_record = fitted.copy_path.as_record()
        return {"valid_nll_copy_path_bits_per_frame": fitted.mixed_bits, "copy_path": self.copy_path_record,
                "copy_path_windows": fitted.windows, "copy_path_fit_s": time.perf_counter() - started}

    @torch.no_grad()
    def valid_sums(self, label_mode: str | int | None, collect: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL sums and counts of the valid split per artist `[A, 2Q]` (A = 1 for an unconditioned model):
        row a holds artist a's NLL sums `[:Q]` then its target counts `[Q:]`; and per position bucket
        `[2, K]` (NLL sum, cell count: `training.bucket_sums`); both summed over the ranks.

        `label_mode`: "own" (each clip's artist), an int (that label for every clip: "no artist" is
        n_artists) or None (no label given: an unconditioned model). `collect`: rank 0 also keeps what
        fitting the copy path needs of at most copying.MAX_FIT_WINDOWS of its windows (their tokens'
        side once per run, the model's probabilities every time)."""
        q, size = self.store.n_codebooks, self.args["batch_size"]
        windows = rank_share(valid_windows(self.store, self.valid_clips, self.args["context_frames"]),
                             self.info, pad=False)
        collect = collect and self.info.is_main
        if collect:
            fit_rows = copying.fit_window_mask(len(windows))  # [W] bool
            if self.copy_held_out is None:
                self.copy_held_out = copying.HeldOut(n_codebooks=q)
            self.copy_held_out.new_validation()
        sums = torch.zeros(max(1, self.model_args.n_artists), 2 * q, dtype=torch.float64, device=self.device)
        positions = torch.zeros(2, len(self.buckets), dtype=torch.float64, device=self.device)
        self.local_model.eval()
        for start in range(0, len(windows), size):
            batch = windows[start:start + size]  # [B, 2]
            inputs, targets = make_batch(self.store, batch, self.args["context_frames"], self.args["pattern"])
            owners = self.store.clip_labels(batch[:, 0])  # [B]
            artist = None if label_mode is None else self._to_device(torch.from_numpy(
                owners if label_mode == "own" else np.full_like(owners, label_mode)))
            with self.precision.autocast():
                logits, _ = self.local_model(self._to_device(inputs), artist=artist)  # [B, S, Q] -> [B, S, Q, V]
            nll, weights, _ = token_nll(logits, self._to_device(targets))  # [B, S, Q] x2
            positions += bucket_sums(nll, weights, self.offsets, self.buckets)
            if collect and fit_rows[start:start + size].any():
                self._collect_held_out(np.flatnonzero(fit_rows[start:start + size]), inputs, targets, nll)
            for owner in np.unique(owners):
                rows = torch.from_numpy(np.flatnonzero(owners == owner)).to(self.device)  # [b]
                sums[owner, :q] += (nll[rows] * weights[rows]).sum(dim=(0, 1)).double()  # [Q]
                sums[owner, q:] += weights[rows].sum(dim=(0, 1)).double()  # [Q]
        self.synced_model.train()
        if collect:
            self.copy_held_out.tokens_complete = True
        if self.info.is_distributed:
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(positions)
        return sums, positions

    def _collect_held_out(self, rows: np.ndarray, inputs: torch.Tensor, targets: torch.Tensor,
                          nll: torch.Tensor) -> None:
        """The batch's `rows` that copy-path fits use: their tokens' side on the first validation, and the
        model's probability of every target (from its NLL `[B, S, Q]`) each time."""
        held_out, picked = self.copy_held_out, torch.from_numpy(rows)
        chosen_targets = targets.index_select(0, picked).long()  # [b, S, Q] on the CPU
        if not held_out.tokens_complete:
            held_out.add_tokens(inputs.index_select(0, picked).long(), chosen_targets)
        probs = torch.exp(-nll.index_select(0, picked.to(nll.device)).float()).cpu()  # [b, S, Q]
        held_out.add_model(probs, chosen_targets)

    def validate_by_artist(self, own: torch.Tensor) -> dict:
        """A joint model's valid NLL per artist with its own label (`own`, `[A, 2Q]` from `valid_sums`)
        and with "no artist": what the label is worth."""
        q = self.store.n_codebooks
        unlabelled, _ = self.valid_sums(self.model_args.n_artists)  # [A, 2Q]
        record = {"valid_nll_by_artist": {}, "valid_nll_no_artist_by_artist": {},
                  "valid_nll_no_artist_bits_per_frame": self.sums_bits(unlabelled.sum(0))[0]}
        for label, name in enumerate(self.artists):
            if float(own[label, q:].sum()) == 0:
                continue  # an artist without valid clips
            record["valid_nll_by_artist"][name] = self.sums_bits(own[label])[0]
            record["valid_nll_no_artist_by_artist"][name] = self.sums_bits(unlabelled[label])[0]
        return record

    # -- writing (rank 0 only) ---------------------------------------------------------------------
    def checkpoint(self, metrics: dict | None) -> dict:
        """The contract's checkpoint; tensors on the CPU so a machine without a GPU loads it as it is."""
        return to_cpu({
            "format": CHECKPOINT_FORMAT,
            "model": self.plain_model.state_dict(),
            "model_args": asdict(self.model_args),
            "token_contract": {**self.data.token_contract, "pattern": self.args["pattern"],
                               "context_frames": self.args["context_frames"]},
            "artist": self.artist,
            "artists": list(self.artists),  # label ids: positions in this list (a joint model's)
            "manifests": list(self.manifests),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states(),
            "epoch": self.progress.epoch,
            "step": self.progress.step,
            "epoch_batches_done": self.progress.epoch_batches_done,
            "epoch_totals": None if self.epoch_totals is None else self.epoch_totals.pack(),
            "elapsed_s": self.progress.elapsed_s,
            "train_args": plain(self.args),
            "best_nll_bits_per_frame": self.progress.best_nll,
            "best_nll_split": self.progress.best_split,
            "best_epoch": self.progress.best_epoch,
            "metrics": metrics,
            "copy_path": self.copy_path_record,  # the latest fitted copy path (pipeline.copying), None: none
        })

    def write_epoch(self, metrics: dict, improved: bool) -> None:
        path = epoch_checkpoint_path(self.folder, self.progress.epoch)
        atomic_torch_save(self.checkpoint(metrics), path)
        copy_atomically(path, self.folder / "last.pt")
        if improved:
            copy_atomically(path, self.folder / "best.pt")
        prune_epochs(self.folder, self.args["keep_last"])
        self._write_metrics(metrics)

    def _write_metrics(self, metrics: dict) -> None:
        self.undrawn_records = append_metrics(self.folder / METRICS_FILE, metrics)
        if time.monotonic() - self.plotted_at >= PLOT_INTERVAL_S:
            self.draw_plots()

    def draw_plots(self) -> None:
        """Draw loss.png and loss_by_position.png from the metrics last written (nothing when drawn already)."""
        if self.undrawn_records is None:
            return
        plot_losses(self.undrawn_records, self.folder / LOSS_PLOT)
        plot_positions(self.undrawn_records, self.folder / POSITIONS_PLOT)
        self.undrawn_records, self.plotted_at = None, time.monotonic()

    def save_last(self, metrics: dict | None = None) -> None:
        """A mid-epoch checkpoint (Ctrl-C, --max-steps): last.pt only, resumable exactly. Call it on
        every rank: the epoch's partial totals are summed over the ranks (rank 0 keeps its own seconds),
        so the resumed epoch counts each rank's share once; on resume rank 0 starts from the sums and
        the other ranks from zero."""
        if self.info.is_distributed and self.epoch_totals is not None:
            summed = self.epoch_totals.summed_over_ranks()
            if self.info.is_main:
                self.epoch_totals = summed
        if not self.info.is_main:
            return
        atomic_torch_save(self.checkpoint(metrics), self.folder / "last.pt")
        self.log.info("saved a resumable checkpoint %s (epoch %d, %d batches into it, step %d)",
                      self.folder / "last.pt", self.progress.epoch + 1, self.progress.epoch_batches_done,
                      self.progress.step)
