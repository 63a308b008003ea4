"""An explicit copy path: the model's distribution mixed with an in-context match model.

Music repeats itself: a bar, a motif, a loop. GPT-2 with learned positions does not learn to look
back one period within a short training budget (docs/stage4.md, "Reusing what it just heard"), so
the prediction at every row is mixed with a predictor that copies, computed from the tokens in
the window alone (no weights):

    similarity(p, j) = cells that agree between the n rows ending at p and the n rows ending at j
                       (all Q codebooks; BOS / PAD cells never agree), for every earlier j < p
    copy(p, q)       = sum_j exp(beta * similarity(p, j)) * onehot(row j+1, codebook q), normalised
    p(x)             = (1 - gate[m]) * model(x) + gate[m] * copy(x),  m = max_j similarity(p, j)

It works on the model's own rows, so it needs nothing from the codebook pattern: in the delay
pattern a periodic piece is periodic in rows too. It is an in-context n-gram model with a soft
match (Grave et al. 2017's neural cache with token matches in place of hidden states). The gate
is a table over the best match's size (0..n*Q cells; "no earlier row" gets 0), fitted on held-out
data to maximise the mixture's likelihood, so on a stream where copying does not pay (a Markov
chain, most of real music) it drops towards 0 and the mixture does no worse than the model.
`n` and `beta` are chosen from a small grid the same way.

Fitting is cheap by construction (stage 4 fits at every validation that improves the best valid
NLL): the copy side depends on the tokens only, so `HeldOut` computes it once per run for at most
`MAX_FIT_WINDOWS` held-out windows, and only the probability of each target (never a 1024-way
distribution); a validation adds the model's probabilities of the same targets, and `fit` scores
every gate of the grid for every token once, then sums per (bucket, fold).

Generation (`TokenGenerator`) applies `CopyPath.mix` to the logits of every step: the copy
distribution of the newest row is a function of the window's rows so far (O(rows x n x Q)
comparisons a step).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .contract import CODEBOOK_SIZE

CONFIGS = ((1, 1.0), (2, 1.0), (4, 1.0), (4, 0.5), (8, 0.5))  # (n rows, beta) tried when fitting
GATE_GRID = np.concatenate([np.linspace(0.0, 0.99, 100), [0.995, 0.998, 0.999]])  # GATE_GRID[0] = 0: off
MIN_TOKENS_PER_BUCKET = 20  # fewer held-out tokens than this in a bucket: its gate stays 0 (no evidence)
MAX_FIT_WINDOWS = 32  # held-out windows a fit uses at most, spread over the valid clips
LN2 = math.log(2.0)
LOG = logging.getLogger("pipeline.copying")


def context_windows(inputs: torch.Tensor, n: int) -> torch.Tensor:
    """Rows `[B, S, Q]` (codes, BOS, PAD) -> the n rows ending at each position `[B, S, Q, n]`; cells that
    are not codes (BOS, PAD, before the start) are -1."""
    codes = torch.where(inputs < CODEBOOK_SIZE, inputs, torch.full_like(inputs, -1))
    padded = torch.cat([codes.new_full((codes.shape[0], n - 1, codes.shape[2]), -1), codes], dim=1)  # [B, S+n-1, Q]
    return padded.unfold(1, n, 1)  # [B, S, Q, n]


def _weights(similarity: torch.Tensor, allowed: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """similarity `[B, P, J]`, allowed bool `[B or 1, P, J]` -> (unnormalised match weights `[B, P, J]`,
    0 where not allowed; gate bucket `[B, P]` long: 0 = no earlier row, else 1 + best match)."""
    masked = similarity.masked_fill(~allowed, float("-inf"))
    best = masked.amax(dim=-1, keepdim=True)  # [B, P, 1]
    has_any = torch.isfinite(best)
    weights = torch.exp(beta * (masked - torch.where(has_any, best, torch.zeros_like(best))))  # [B, P, J]
    bucket = torch.where(has_any[..., 0], best[..., 0].clamp_min(0).long() + 1, torch.zeros_like(best[..., 0]).long())
    return weights, bucket


def _followers(inputs: torch.Tensor) -> torch.Tensor:
    """Rows `[B, S, Q]` -> the row after each position `[B, S, Q]` (-1: none, or not a code)."""
    followers = torch.cat([inputs[:, 1:], inputs.new_full((inputs.shape[0], 1, inputs.shape[2]), -1)], dim=1)
    return torch.where(followers < CODEBOOK_SIZE, followers, torch.full_like(followers, -1))


def _distribution(similarity: torch.Tensor, allowed: torch.Tensor, followers: torch.Tensor, beta: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """similarity `[B, P, J]`, allowed bool `[B or 1, P, J]`, followers `[B, J, Q]` (-1: none) ->
    (copy probabilities `[B, P, Q, V]`, gate bucket `[B, P]` long: 0 = no earlier row, else 1 + best match)."""
    batch, n_query, n_keys = similarity.shape
    n_codebooks = followers.shape[-1]
    weights, bucket = _weights(similarity, allowed, beta)  # [B, P, J], [B, P]
    real = followers >= 0  # [B, J, Q]
    index = followers.clamp_min(0).permute(0, 2, 1).unsqueeze(1).expand(batch, n_query, n_codebooks, n_keys)  # [B, P, Q, J]
    source = weights.unsqueeze(2) * real.permute(0, 2, 1).unsqueeze(1).to(weights.dtype)  # [B, P, Q, J]
    probs = weights.new_zeros(batch, n_query, n_codebooks, CODEBOOK_SIZE).scatter_add_(3, index, source)
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return probs, bucket


def similarities(inputs: torch.Tensor, ns) -> dict:
    """Rows `[B, S, Q]` -> {n: similarity `[B, S(p), S(j)]`}: cells that agree between the n rows ending at
    p and the n rows ending at j. One row-to-row agreement table, summed along its diagonals."""
    codes = torch.where(inputs < CODEBOOK_SIZE, inputs, torch.full_like(inputs, -1))
    agree = ((codes.unsqueeze(2) == codes.unsqueeze(1)) & (codes.unsqueeze(2) >= 0)).sum(-1).float()  # [B, S, S]
    out, total, length = {}, torch.zeros_like(agree), agree.shape[1]
    for k in range(max(ns)):
        if k == 0:
            total += agree
        elif k < length:
            total[:, k:, k:] += agree[:, :-k, :-k]  # row p-k against row j-k
        if k + 1 in ns:
            out[k + 1] = total.clone()
    return out


def _causal(length: int, device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril(-1).unsqueeze(0)  # [1, P, J]: j < p


def copy_distribution(inputs: torch.Tensor, n: int, beta: float, similarity: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position of rows `[B, S, Q]` -> (copy probabilities `[B, S, Q, 1024]` of the row each position
    predicts, bucket `[B, S]`); position p sees rows 0..p only (causal). `similarity`: `similarities`'s
    table for this n, when already computed."""
    if similarity is None:
        similarity = similarities(inputs, {n})[n]  # [B, S(p), S(j)]
    return _distribution(similarity, _causal(inputs.shape[1], inputs.device), _followers(inputs), beta)


def copy_target_probs(inputs: torch.Tensor, targets: torch.Tensor, configs=CONFIGS) -> dict:
    """What `copy_distribution` gives the targets, without the 1024-way distributions: rows `[B, S, Q]`,
    targets `[B, S, Q]` -> {config: (the copy probability of each target `[B, S, Q]`, bucket `[B, S]`)}."""
    followers = _followers(inputs)  # [B, J, Q]
    real = (followers >= 0).float()  # [B, J, Q]
    same = (followers.unsqueeze(1) == targets.unsqueeze(2)).float()  # [B, P, J, Q]: row j+1 holds p's target
    allowed = _causal(inputs.shape[1], inputs.device)
    tables = similarities(inputs, {n for n, _ in configs})
    out = {}
    for n, beta in configs:
        weights, bucket = _weights(tables[n], allowed, beta)  # [B, P, J], [B, P]
        hits = torch.einsum("bpj,bpjq->bpq", weights, same)  # [B, P, Q]
        total = torch.bmm(weights, real)  # [B, P, J] @ [B, J, Q] -> [B, P, Q]
        out[(n, beta)] = (hits / total.clamp_min(1e-30), bucket)
    return out


def copy_distribution_last(inputs: torch.Tensor, n: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The newest position of rows `[B, P+1, Q]` -> (copy probabilities `[B, Q, 1024]`, bucket `[B]`): what
    `copy_distribution` gives at position P, for one generation step."""
    windows = context_windows(inputs, n)  # [B, P+1, Q, n]
    last = windows[:, -1:]  # [B, 1, Q, n]
    agree = (windows[:, :-1] == last) & (last >= 0)  # [B, P, Q, n]
    similarity = agree.sum(dim=(-1, -2)).float().unsqueeze(1)  # [B, 1, P]
    allowed = torch.ones_like(similarity, dtype=torch.bool)
    followers = inputs[:, 1:]  # row j+1 of each earlier j: [B, P, Q]
    followers = torch.where(followers < CODEBOOK_SIZE, followers, torch.full_like(followers, -1))
    probs, bucket = _distribution(similarity, allowed, followers, beta)
    return probs[:, 0], bucket[:, 0]


# ---- the mixture ---------------------------------------------------------------------------------
@dataclass
class CopyPath:
    """A fitted copy path: `n` rows of context, softness `beta`, and the gate per best-match bucket."""

    n: int = 4
    beta: float = 1.0
    gate: list = field(default_factory=list)  # [n*Q + 2]: bucket 0 = no earlier row, b = best match b-1 cells

    def as_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict | None) -> "CopyPath | None":
        return None if not record else cls(n=int(record["n"]), beta=float(record["beta"]), gate=list(record["gate"]))

    @property
    def active(self) -> bool:
        return any(value > 0 for value in self.gate)

    def gate_of(self, bucket: torch.Tensor) -> torch.Tensor:
        """Buckets long `[...]` -> gates `[...]` (the table is copied to the device once, not every step)."""
        cached = self.__dict__.get("_table")
        if cached is None or cached.device != bucket.device:
            cached = torch.tensor(self.gate, dtype=torch.float32, device=bucket.device)
            self.__dict__["_table"] = cached
        return cached[bucket.clamp_max(len(self.gate) - 1)]

    def mix(self, logits: torch.Tensor, inputs: torch.Tensor, traced: bool = False) -> torch.Tensor:
        """One step: logits `[B, Q, >=1024]` at the newest position of rows `inputs` `[B, P+1, Q]` ->
        the mixture's log-probabilities `[B, Q, 1024]` (used as logits: sampling normalises them).
        `traced` (a CPU only): run the copy side from a TorchScript trace made at the first call (the
        same kernels without the Python between them; one trace serves every window length)."""
        log_model = torch.log_softmax(logits[..., :CODEBOOK_SIZE].float(), dim=-1)
        if not self.active or inputs.shape[1] < 2:
            return log_model
        mixer = self._traced_mixer(log_model, inputs) if traced and inputs.device.type == "cpu" else None
        if mixer is not None:
            return mixer(log_model, inputs)
        return self.mix_log_model(log_model, inputs)

    def mix_log_model(self, log_model: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """`mix` after the model's log-softmax: log-probabilities `[B, Q, 1024]`, rows `[B, P+1, Q]` (P >= 1)."""
        probs, bucket = copy_distribution_last(inputs, self.n, self.beta)  # [B, Q, V], [B]
        gate = self.gate_of(bucket).view(-1, 1, 1)  # [B, 1, 1]
        return mix_log_probs(log_model, probs, gate)

    def _traced_mixer(self, log_model: torch.Tensor, inputs: torch.Tensor):
        """`mix_log_model` traced for these batch and codebook sizes (made once, kept on this object), or
        None (logged once) when this torch cannot trace it: the eager mixing then runs."""
        key = (tuple(log_model.shape), inputs.shape[0], inputs.shape[2])
        traced = self.__dict__.setdefault("_traced", {})
        if key not in traced:
            traced[key] = None
            with warnings.catch_warnings():  # the tracer's notes on sizes read as ints: the sizes used are traced;
                # TorchScript's deprecation: a torch without it makes tracing fail, and the eager path runs (logged)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    traced[key] = torch.jit.trace(_Mixer(self), (log_model, inputs), check_trace=False)
                except (RuntimeError, AttributeError) as error:
                    LOG.warning("tracing the copy path's mixing failed (%s): mixing eagerly", error)
        return traced[key]


class _Mixer(torch.nn.Module):
    """`CopyPath.mix_log_model` as a module, for `torch.jit.trace`."""

    def __init__(self, copy_path: CopyPath):
        super().__init__()
        self.copy_path = copy_path

    def forward(self, log_model: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return self.copy_path.mix_log_model(log_model, inputs)


def mix_log_probs(log_model: torch.Tensor, copy_probs: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """log((1 - gate) * exp(log_model) + gate * copy_probs), broadcasting `gate`."""
    return torch.logaddexp(torch.log1p(-gate) + log_model, torch.log(gate) + torch.log(copy_probs))


# ---- fitting on held-out data ----------------------------------------------------------------------
def fit_window_mask(n_windows: int, limit: int = MAX_FIT_WINDOWS) -> np.ndarray:
    """Which of `n_windows` held-out windows (in clip order) a fit uses: all of them, or `limit` spread
    evenly from the first to the last, so every part of the valid split has its say. bool `[n_windows]`."""
    mask = np.zeros(n_windows, dtype=bool)
    if n_windows:
        mask[np.unique(np.linspace(0, n_windows - 1, min(limit, n_windows)).round().astype(np.int64))] = True
    return mask


def bucket_fold_sums(model: np.ndarray, copy: np.ndarray, buckets: np.ndarray, folds: np.ndarray, n_buckets: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per token `[N]`: the model's and the copy path's probability of it, its bucket and fold (0 or 1) ->
    (sum of log((1-g) pm + g pc) per bucket, fold and gate of GATE_GRID `[n_buckets, 2, G]`, token
    counts `[n_buckets, 2]`). Every later choice of gates is a lookup in these sums."""
    grid = len(GATE_GRID)
    key = np.minimum(buckets, n_buckets - 1).astype(np.int64) * 2 + folds  # [N]
    sums = np.zeros((n_buckets * 2, grid))
    if len(key):
        order = np.argsort(key, kind="stable")  # tokens grouped by (bucket, fold): one sum per group
        ordered = key[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        gates = GATE_GRID.astype(np.float32)  # float32 scores (2.5x faster than float64), summed in float64
        scores = np.log((1 - gates) * model[order].astype(np.float32)[:, None]
                        + gates * copy[order].astype(np.float32)[:, None] + np.float32(1e-30))  # [N, G]
        sums[ordered[starts]] = np.add.reduceat(scores, starts, axis=0, dtype=np.float64)
    counts = np.bincount(key, minlength=n_buckets * 2)
    return sums.reshape(n_buckets, 2, grid), counts.reshape(n_buckets, 2)


def best_gates(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per bucket, the index in GATE_GRID that maximises the summed log-likelihood `sums` `[K, G]`;
    0 (gate 0) for bucket 0 (no earlier row) and for buckets with fewer than MIN_TOKENS_PER_BUCKET tokens."""
    index = sums.argmax(axis=1)
    index[counts < MIN_TOKENS_PER_BUCKET] = 0
    index[0] = 0
    return index


def fit_gate(model_probs: np.ndarray, copy_probs: np.ndarray, buckets: np.ndarray, n_buckets: int) -> list:
    """Per bucket, the gate in GATE_GRID that maximises sum log((1-g) pm + g pc) over its tokens `[N]`."""
    sums, counts = bucket_fold_sums(model_probs, copy_probs, buckets, np.zeros(len(buckets), dtype=np.int64),
                                    n_buckets)
    return [float(GATE_GRID[i]) for i in best_gates(sums.sum(axis=1), counts.sum(axis=1))]


def mixture_nats(model_probs: np.ndarray, copy_probs: np.ndarray, buckets: np.ndarray, gate: list) -> float:
    g = np.asarray(gate)[np.minimum(buckets, len(gate) - 1)]
    return float(-np.log((1 - g) * model_probs + g * copy_probs + 1e-300).sum())


@dataclass
class HeldOut:
    """What fitting needs of held-out windows: per scored token its window (folds alternate), and per
    config the copy path's probability of it and its bucket (the token side: `add_tokens`, once per
    run), and the model's probability of it (`add_model`, again at every validation; `new_validation`
    clears it)."""

    n_codebooks: int
    configs: tuple = CONFIGS
    window: list = field(default_factory=list)  # [N] per token: the window's number (folds alternate)
    model: list = field(default_factory=list)  # [N]
    copy: dict = field(default_factory=dict)  # config -> [N]
    bucket: dict = field(default_factory=dict)  # config -> [N]
    windows_seen: int = 0
    tokens_complete: bool = False  # the token side holds every window the fits use

    def add_tokens(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """The copy side of windows: rows `[B, S, Q]`, targets `[B, S, Q]` (not a code = not scored)."""
        scored = targets < CODEBOOK_SIZE  # [B, S, Q]
        window = torch.arange(self.windows_seen, self.windows_seen + inputs.shape[0], device=inputs.device)
        self.window.append(window.view(-1, 1, 1).expand_as(targets)[scored].cpu().numpy())
        self.windows_seen += inputs.shape[0]
        for config, (probs, bucket) in copy_target_probs(inputs, targets, self.configs).items():
            self.copy.setdefault(config, []).append(probs[scored].double().cpu().numpy())
            self.bucket.setdefault(config, []).append(bucket.unsqueeze(-1).expand_as(targets)[scored].cpu().numpy())

    def add_model(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        """The model side of the same windows, in the same order: its probability of each target `[B, S, Q]`."""
        self.model.append(probs[targets < CODEBOOK_SIZE].double().cpu().numpy())

    def add(self, inputs: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> None:
        """Both sides of one batch: rows `[B, S, Q]`, targets `[B, S, Q]`, the model's logits `[B, S, Q, V]`."""
        self.add_tokens(inputs, targets)
        safe = torch.where(targets < CODEBOOK_SIZE, targets, torch.zeros_like(targets)).long()
        log_model = torch.log_softmax(logits[..., :CODEBOOK_SIZE].float(), dim=-1)
        self.add_model(log_model.gather(-1, safe.unsqueeze(-1))[..., 0].exp(), targets)

    def new_validation(self) -> None:
        self.model = []

    def arrays(self):
        cat = np.concatenate
        return (cat(self.window), cat(self.model), {c: cat(v) for c, v in self.copy.items()},
                {c: cat(v) for c, v in self.bucket.items()})


@dataclass
class FitResult:
    copy_path: CopyPath  # fitted on all the held-out tokens (what generation uses)
    model_bits: float  # the model alone, bits per frame
    mixed_bits: float  # the mixture, bits per frame, each fold scored with the other fold's fit (honest)
    mixed_bits_in_sample: float  # the mixture with the all-data fit (optimistic)
    frames: float
    windows: int = 0  # held-out windows fitted on


def fit(held_out: HeldOut) -> FitResult:
    """Choose (n, beta) and the gate on the held-out tokens; score the mixture by two-fold cross-fitting
    (windows alternate between the folds), so the reported figure never saw its own fit."""
    window, model, copy, bucket = held_out.arrays()
    if len(model) != len(window):
        raise ValueError(f"the model side holds {len(model)} tokens, the copy side {len(window)}")
    frames = len(model) / held_out.n_codebooks
    folds = (window % 2).astype(np.int64)
    tables = {config: bucket_fold_sums(model, copy[config], bucket[config], folds,
                                       config[0] * held_out.n_codebooks + 2) for config in copy}

    def best_fit(fold_slice):
        """(in-sample nats, config, gate indices) of the config fitting the folds `fold_slice` best."""
        fits = []
        for config, (sums, counts) in tables.items():
            chosen, chosen_counts = sums[:, fold_slice].sum(axis=1), counts[:, fold_slice].sum(axis=1)
            index = best_gates(chosen, chosen_counts)
            fits.append((-float(chosen[np.arange(len(index)), index].sum()), config, index))
        return min(fits, key=lambda item: item[0])

    nats, config, index = best_fit(slice(0, 2))
    crossed = nats  # one window only: no second fold to score on (the in-sample figure)
    if (folds == 0).any() and (folds == 1).any():
        crossed = 0.0
        for train_fold in (0, 1):
            _, fold_config, fold_index = best_fit(slice(train_fold, train_fold + 1))
            sums = tables[fold_config][0][:, 1 - train_fold]  # [K, G] of the other fold
            crossed -= float(sums[np.arange(len(fold_index)), fold_index].sum())
    gate = [float(GATE_GRID[i]) for i in index]
    return FitResult(copy_path=CopyPath(n=config[0], beta=config[1], gate=gate),
                     model_bits=float(-np.log(model + 1e-300).sum()) / LN2 / frames,
                     mixed_bits=crossed / LN2 / frames, mixed_bits_in_sample=nats / LN2 / frames, frames=frames,
                     windows=held_out.windows_seen)


# ---- a trained run, scored (bench) --------------------------------------------------------------------
@torch.no_grad()
def score_run(root, artist: str, checkpoint_path, batch_size: int = 8, max_windows: int | None = None) -> dict:
    """Load `checkpoint_path`, run it on the artist's valid windows (all of them, or `max_windows` spread
    over them) and fit the copy path -> figures."""
    import time

    from .model_io import load_model
    from .train_data import load_artists, make_batch, valid_windows

    loaded = load_model(checkpoint_path, "cpu")
    data, _ = load_artists(root, [artist])
    store = data.store
    context = int(loaded.contract["context_frames"])
    windows = valid_windows(store, store.clips("valid"), context)
    if max_windows:
        windows = windows[fit_window_mask(len(windows), max_windows)]
    held_out = HeldOut(n_codebooks=loaded.n_codebooks)
    started = time.perf_counter()
    for start in range(0, len(windows), batch_size):
        inputs, targets = make_batch(store, windows[start:start + batch_size], context, loaded.pattern)
        logits, _ = loaded.model(inputs.long())
        held_out.add(inputs.long(), targets.long(), logits)
    result = fit(held_out)
    return {"model_alone_bits": result.model_bits, "copy_path_bits": result.mixed_bits,
            "copy_path_bits_in_sample": result.mixed_bits_in_sample, "copy_path": result.copy_path.as_record(),
            "copy_path_fit_seconds": time.perf_counter() - started, "checkpoint_step": loaded.step,
            "windows": len(windows)}
