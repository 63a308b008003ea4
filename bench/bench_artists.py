#!/usr/bin/env python3
"""One model for several artists: is one model of two artists better than each artist's own model, does the label
carry information, and what does classifier-free guidance cost per frame?

    python bench/bench_artists.py                                # Debian's muldjord + sectoid songs, the goals
    python bench/bench_artists.py --tiny                         # minutes: checks that the script works
    python bench/bench_artists.py --device cuda --epochs 40 --json out.json
    python bench/bench_artists.py --demo                         # the README demo's two synthesized artists

Steps: the song.ogg of every song folder of each artist (default: the Debian packages
fretsonfire-songs-muldjord and fretsonfire-songs-sectoid) go through stages 1-3 per artist; stage 4
trains one model per artist and one joint model (`--artist A --artist B --name joint`) with the same
--epochs. A joint epoch holds as many windows as the two single-artist epochs together, so equal
epochs is equal total training compute (the step counts are printed). Each artist's valid split is
then scored (bits per frame) by its own model and by the joint model with the true label, the other
artist's label and "no artist"; the label's margins are also printed in bits per window, next to two
yardsticks. One: each artist's valid split under unigrams fitted on its own, the other artist's and
both artists' train split (how far apart the artists' tokens are, and whether an artist's own songs
describe its held-out song better than the pool does). Two: log2(2) = 1 bit, the most a perfect
model's label can be worth over "no artist" per window (a perfect "no artist" model is the mixture
of the two artists, which costs at most log2(1 / 0.5) bits more than knowing the artist).
Then the style check, where the label matters most: the joint model generates from nothing with
each label (guidance off and 3.0), and each piece is scored under bigrams fitted on each artist's
train split: does it sound like the labelled artist? Last, the joint model generates --cfg-frames
frames with CFG off and on (one batched step of 2B rows) and the per-frame time ratio is printed.
--reuse keeps the manifests and models --root already holds. The CFG ratio comes last, then its
`RESULT {json}` line with every goal; without the song packages (or, with --codec of a hub id, the
codec weights), or with --device cuda and no GPU, it exits 77 (skipped).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import Missing, finish, link_songs, require_codec, require_cuda, run_command

import numpy as np
import torch


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from pipeline import train_data  # noqa: E402
from pipeline.baselines import fit_and_score  # noqa: E402
from pipeline.demo import STYLES, make_demo_corpus  # noqa: E402
from pipeline.generation import GenerationSettings, generate_frames, label_weights  # noqa: E402
from pipeline.model_io import model_from_checkpoint, model_module  # noqa: E402
from pipeline.runs import read_checkpoint  # noqa: E402
from pipeline.sampling import SamplingSettings  # noqa: E402
from pipeline.training import bits_per_frame, sequence_losses  # noqa: E402

SONGS = Path("/usr/share/games/fretsonfire/data/songs")
DEFAULT_ARTISTS = ("muldjord", "sectoid")


def run(script: str, *args) -> None:
    """One stage as a subprocess; its error output is shown when it fails."""
    run_command([sys.executable, SCRIPTS / script, *args])


def prepare_artist(root: Path, artist: str, options) -> None:
    common = ["--artist", artist, "--root", root, "--log-level", "WARNING"]
    run("1_audio_preprocessing.py", *common, "--clip-seconds", options.clip_seconds)
    run("2_Tokenization.py", *common, "--codec", options.codec, "--bandwidth", options.bandwidth,
        "--device", options.device)
    run("3_data_preparation.py", *common, "--valid-fraction", options.valid_fraction, "--overwrite")


def train(root: Path, artists: list[str], name: str | None, options) -> Path:
    """Stage 4 on `artists` -> its last.pt (the same recipe for every model)."""
    flags = [item for artist in artists for item in ("--artist", artist)] + (["--name", name] if name else [])
    last = root / "model_results" / (name or artists[0]) / "last.pt"
    if options.reuse and last.is_file():
        return last
    run("4_Transformer.py", *flags, "--root", root, "--preset", options.preset, "--epochs", options.epochs,
        "--context-frames", options.context_frames, "--batch-size", options.batch_size, "--device", options.device,
        "--pattern", options.pattern, "--seed", options.seed, "--log-level", "WARNING", "--overwrite")
    return root / "model_results" / (name or artists[0]) / "last.pt"


def load_model(path: Path, device: str):
    checkpoint = read_checkpoint(path)
    return model_from_checkpoint(checkpoint, path, device).model, checkpoint


@functools.lru_cache(maxsize=None)
def artist_dataset(root: Path, artist: str):
    """The artist's manifest and token files, read once per run (every score below reuses them)."""
    return train_data.load_dataset(train_data.read_training_manifest(root, artist))


def split_clips(root: Path, artist: str, split: str) -> list:
    """The artist's `split` clips as code arrays `[T, Q]` (views into its store)."""
    store = artist_dataset(root, artist).store
    return [store.clip_codes(clip) for clip in store.clips(split)]


def valid_windows(root: Path, artist: str, context: int):
    """(the artist's token store, its valid windows `[N, 2]` of `context` frames)."""
    data = artist_dataset(root, artist)
    return data, train_data.valid_windows(data.store, data.store.clips("valid"), context)


@torch.no_grad()
def valid_nll(model, checkpoint: dict, root: Path, artist: str, label: int | None, device: str) -> float:
    """Bits per frame of `artist`'s valid split under `model` with artist `label` (None: no label given)."""
    context, pattern = checkpoint["train_args"]["context_frames"], checkpoint["train_args"]["pattern"]
    data, windows = valid_windows(root, artist, context)  # windows [N, 2]
    if len(windows) == 0:
        return float("nan")  # stage 3 put every track in train: use more songs
    sums = torch.zeros(2 * data.store.n_codebooks, dtype=torch.float64)
    q = data.store.n_codebooks
    for start in range(0, len(windows), 8):
        inputs, targets = train_data.make_batch(data.store, windows[start:start + 8], context, pattern)
        artist_rows = None if label is None else torch.full((inputs.shape[0],), label, device=device)  # [B]
        logits, _ = model(inputs.long().to(device), artist=artist_rows)  # [B, S, Q] -> [B, S, Q, V]
        _, nll_sums, counts = sequence_losses(logits, targets.long().to(device))
        sums[:q] += nll_sums.double().cpu()
        sums[q:] += counts.double().cpu()
    return bits_per_frame(sums[:q], sums[q:])[0]


def unigram_yardsticks(root: Path, artist: str, other: str) -> dict:
    """`artist`'s valid split (bits/frame) under unigrams fitted on the train split of: the artist itself
    ("own"), the other artist ("other") and both ("pooled"): what an artist label is worth to a model
    without context, and whether the artist's own songs describe its held-out songs better than the pool."""
    held_out = split_clips(root, artist, "valid")
    own, theirs = split_clips(root, artist, "train"), split_clips(root, other, "train")
    if not held_out:
        return {"own": float("nan"), "other": float("nan"), "pooled": float("nan")}
    return {name: fit_and_score(train, held_out).unigram_bits_per_frame
            for name, train in (("own", own), ("other", theirs), ("pooled", own + theirs))}


def style_check(joint, checkpoint: dict, root: Path, artists: list[str], options) -> dict:
    """Where the label matters: generating from nothing. For each artist label, with guidance off and
    at 3.0, --style-pieces pieces of --style-frames frames are scored (bits/frame) under a bigram
    fitted on each artist's train split; a piece "sounds like" the artist whose bigram scores it
    lower. Returns, per label and coefficient, the share of pieces closer to the labelled artist and
    the mean margin (other artist's bigram minus the labelled one's)."""
    train = {artist: split_clips(root, artist, "train") for artist in artists}
    pattern, context = checkpoint["train_args"]["pattern"], int(checkpoint["train_args"]["context_frames"])
    results = {}
    for label, artist in enumerate(artists):
        other = artists[1 - label]
        for coef in (1.0, 3.0):
            settings = GenerationSettings(pattern=pattern, context_frames=min(context, options.style_frames),
                                          stride_frames=max(1, min(context, options.style_frames) // 2),
                                          num_samples=options.style_pieces, cfg_coef=coef,
                                          artist_weights=label_weights(label, joint.args.n_artists))
            frames, _ = generate_frames(joint, None, options.style_frames, settings, SamplingSettings(), None,
                                        label, options.device)  # [B, T, Q]
            pieces = [piece.cpu().numpy() for piece in frames]
            margins = [fit_and_score(train[other], [piece]).bigram_bits_per_frame
                       - fit_and_score(train[artist], [piece]).bigram_bits_per_frame for piece in pieces]
            results[f"{artist}, cfg {coef:g}"] = {"share_closer_to_label": float(np.mean([m > 0 for m in margins])),
                                                  "mean_margin_bits_per_frame": float(np.mean(margins))}
    return results


def print_style(style: dict, pieces: int, frames: int) -> None:
    print(f"generated from nothing ({pieces} pieces x {frames} frames per label): share of pieces whose tokens a "
          f"bigram of the labelled artist scores better than the other's, and the mean margin")
    for key, row in style.items():
        print(f"  {key:<28} {row['share_closer_to_label']:>5.0%}  {row['mean_margin_bits_per_frame']:+.3f} bits/frame")


def mean_window_frames(root: Path, artist: str, context: int) -> float:
    """Frames per valid window (the last window of a clip is shorter): bits/frame x this = bits/window."""
    data, windows = valid_windows(root, artist, context)
    if len(windows) == 0:
        return float("nan")
    lengths = np.minimum(data.store.lengths[windows[:, 0]] - windows[:, 1], context)  # [N]
    return float(lengths.mean())


def cfg_overhead(model, pattern: str, context_frames: int, options) -> dict:
    """Seconds per generated frame without and with CFG (the same model, label 0, lean engine)."""
    context = min(int(context_frames), options.cfg_frames)
    times = {}
    for coef in (1.0, 3.0, 1.0, 3.0):  # twice each, interleaved: the second of each pair is kept
        settings = GenerationSettings(pattern=pattern, context_frames=context,
                                      stride_frames=max(1, context // 2), num_samples=options.cfg_batch,
                                      artist_weights=label_weights(0, model.args.n_artists), cfg_coef=coef)
        started = time.perf_counter()
        generate_frames(model, None, options.cfg_frames, settings, SamplingSettings(), None, 0, options.device)
        if options.device.startswith("cuda"):
            torch.cuda.synchronize()
        times[coef] = (time.perf_counter() - started) / options.cfg_frames
    return {"s_per_frame_unguided": times[1.0], "s_per_frame_cfg": times[3.0], "ratio": times[3.0] / times[1.0]}


def time_cfg_only(options) -> dict:
    """CFG's cost per frame on an untrained model of --preset (the time does not depend on the weights),
    the lean decoder as it ships and, as the reference, with every step on the stored `[in, out]`
    weights (no row-major copies for 2-3-row steps)."""
    from pipeline import lean_decoder

    torch.set_num_threads(1 if options.device == "cpu" else torch.get_num_threads())
    torch.manual_seed(0)
    stage4 = model_module()
    model_args = stage4.model_args_for(options.preset, 4, int(options.context_frames))
    model_args.n_artists = 2
    model = stage4.MusicTransformer(model_args).to(options.device).eval()
    shipped_rows, results = lean_decoder.ROW_MAJOR_ROWS, {}
    for name, rows in (("stored [in, out] weights only", ()), ("as shipped", shipped_rows)):
        lean_decoder.ROW_MAJOR_ROWS = rows
        results[name] = cfg = cfg_overhead(model, options.pattern, int(options.context_frames), options)
        print(f"{options.preset}, batch {options.cfg_batch}, {options.cfg_frames} frames on {options.device}, {name}: "
              f"{cfg['s_per_frame_unguided'] * 1e3:.2f} -> {cfg['s_per_frame_cfg'] * 1e3:.2f} ms/frame with CFG "
              f"({cfg['ratio']:.2f}x)")
    lean_decoder.ROW_MAJOR_ROWS = shipped_rows
    if options.json:
        options.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"CFG / unguided per frame, as shipped: {results['as shipped']['ratio']:.2f}x (goal <= 1.3x)")
    return {"value": round(results["as shipped"]["ratio"], 3), "preset": options.preset,
            "batch": options.cfg_batch, "device": options.device,
            "stored_weights_only_ratio": round(results["stored [in, out] weights only"]["ratio"], 3)}


def steps_per_epoch(path: Path) -> int:
    metrics = torch.load(path, map_location="cpu", weights_only=True)
    return int(metrics["step"]) // max(1, int(metrics["epoch"]))


def parse_options(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artists", nargs=2, default=list(DEFAULT_ARTISTS), help="two artist folders under --songs")
    parser.add_argument("--songs", type=Path, default=SONGS, help="folder of <artist>/<song>/song.ogg")
    parser.add_argument("--root", type=Path, help="project root to work in (default: a temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="a few seconds of each artist, tiny model: a smoke run")
    parser.add_argument("--demo", action="store_true",
                        help="the README demo's synthesized artists with its recipe (random codec, small, 25 "
                             "epochs of 4 x 300 frames) instead of --songs")
    parser.add_argument("--songs-per-artist", type=int, default=0, help="use only this many songs (0: all)")
    parser.add_argument("--codec",
                        help="stage 2's codec (default facebook/encodec_48khz; random:0 with --tiny, --demo)")
    parser.add_argument("--bandwidth", default="6", help="stage 2's bandwidth")
    parser.add_argument("--clip-seconds", default="30", help="stage 1's clip length")
    parser.add_argument("--valid-fraction", default="0.25", help="stage 3's share of tracks in the valid split")
    parser.add_argument("--preset", default="small", help="stage 4's model size")
    parser.add_argument("--epochs", default="30", help="epochs of every model (equal epochs = equal compute)")
    parser.add_argument("--context-frames", default="750", help="stage 4's window")
    parser.add_argument("--batch-size", default="8", help="stage 4's batch size")
    parser.add_argument("--pattern", default="delay", help="codebook pattern")
    parser.add_argument("--seed", default="0", help="stage 4's seed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cfg-frames", type=int, default=300, help="frames generated for the CFG timing")
    parser.add_argument("--cfg-batch", type=int, default=1, help="pieces generated together for the CFG timing")
    parser.add_argument("--cfg-only", action="store_true",
                        help="only the CFG timing, on an untrained --preset model with two labels (no songs)")
    parser.add_argument("--style-pieces", type=int, default=8, help="pieces per label for the style check")
    parser.add_argument("--style-frames", type=int, default=300, help="frames of each style-check piece")
    parser.add_argument("--reuse", action="store_true",
                        help="keep what --root already holds (each artist's manifest, each model's last.pt) "
                             "instead of preparing and training again")
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args(argv)
    if options.tiny:
        options.songs_per_artist, options.codec, options.clip_seconds = 2, options.codec or "random:0", "10"
        options.valid_fraction = "0.5"
        options.preset, options.epochs, options.context_frames, options.batch_size = "tiny", "1", "150", "4"
        options.cfg_frames, options.style_pieces, options.style_frames = 60, 2, 60
    if options.demo:  # run_pipeline.sh's demo recipe (3 tracks of 20 s per artist: one valid track each)
        options.artists = [style.artist for style in STYLES]
        options.codec, options.clip_seconds, options.valid_fraction = options.codec or "random:0", "10", "0.34"
        options.preset, options.epochs, options.context_frames, options.batch_size = "small", "25", "300", "4"
    options.codec = options.codec or "facebook/encodec_48khz"
    return options


def score_table(root: Path, paths: dict, artists: list[str], device: str) -> dict:
    """Each artist's valid bits/frame under its own model and under the joint model with each label."""
    joint, joint_checkpoint = load_model(paths["joint"], device)
    table = {}
    for label, artist in enumerate(artists):
        own, own_checkpoint = load_model(paths[artist], device)
        table[artist] = {
            "own_model": valid_nll(own, own_checkpoint, root, artist, None, device),
            "joint_true_label": valid_nll(joint, joint_checkpoint, root, artist, label, device),
            "joint_other_label": valid_nll(joint, joint_checkpoint, root, artist, 1 - label, device),
            "joint_no_artist": valid_nll(joint, joint_checkpoint, root, artist, 2, device),
            "window_frames": mean_window_frames(root, artist, joint_checkpoint["train_args"]["context_frames"]),
            "unigram": unigram_yardsticks(root, artist, artists[1 - label])}
    return table


def print_table(table: dict) -> None:
    print(f"{'artist':<17} {'own model':>10} {'joint, label':>13} {'other label':>12} {'no artist':>10}  (bits/frame)")
    for artist, row in table.items():
        print(f"{artist:<17} {row['own_model']:>10.3f} {row['joint_true_label']:>13.3f} "
              f"{row['joint_other_label']:>12.3f} {row['joint_no_artist']:>10.3f}")
    print("the label's margins (positive: the true label is better), and the same margins for unigrams fitted on "
          "the artist's own, the other artist's and both artists' train split:")
    for artist, row in table.items():
        other = row["joint_other_label"] - row["joint_true_label"]
        none = row["joint_no_artist"] - row["joint_true_label"]
        frames, unigram = row["window_frames"], row["unigram"]
        print(f"  {artist:<17} vs other label {other:+.3f} bits/frame ({other * frames:+.1f} bits/window), "
              f"vs no artist {none:+.3f} ({none * frames:+.1f} bits/window; a perfect model: 0 to +1)")
        print(f"  {'':<17} unigram: other - own {unigram['other'] - unigram['own']:+.3f} bits/frame, "
              f"pooled - own {unigram['pooled'] - unigram['own']:+.3f}")


def require_resources(options) -> None:
    """Missing (exit 77) before any work when a GPU, the songs or the codec weights are not here."""
    require_cuda(options.device)
    if options.cfg_only:
        return
    if not options.demo:
        for artist in options.artists:
            if not any((options.songs / artist).glob("*/song.ogg")):
                raise Missing(f"no */song.ogg under {options.songs / artist} "
                              f"(apt-get install fretsonfire-songs-{artist})")
    require_codec(options.codec)


def main(argv=None) -> dict:
    options = parse_options(argv)
    require_resources(options)
    if options.cfg_only:
        return time_cfg_only(options)
    torch.set_num_threads(1 if options.device == "cpu" else torch.get_num_threads())
    root = options.root or Path(tempfile.mkdtemp(prefix="bench_artists_"))
    a, b = options.artists
    results = {"settings": {k: str(v) for k, v in vars(options).items()}, "root": str(root)}
    if options.demo:
        results["songs"] = {artist: 3 for artist in (a, b)}
        make_demo_corpus(root / "raw_audio")
    for artist in (a, b):
        if not options.demo:
            results.setdefault("songs", {})[artist] = link_songs(root, artist, options.songs, options.songs_per_artist)
        if not (options.reuse and (root / f"metadata_clean_{artist}.jsonl").is_file()):
            prepare_artist(root, artist, options)
    paths = {a: train(root, [a], None, options), b: train(root, [b], None, options),
             "joint": train(root, [a, b], "joint", options)}
    results["steps_per_epoch"] = {key: steps_per_epoch(path) for key, path in paths.items()}
    table = results["valid_nll_bits_per_frame"] = score_table(root, paths, [a, b], options.device)
    joint, joint_checkpoint = load_model(paths["joint"], options.device)
    train_args = joint_checkpoint["train_args"]
    results["cfg"] = cfg_overhead(joint, train_args["pattern"], train_args["context_frames"], options)
    results["style"] = style_check(joint, joint_checkpoint, root, [a, b], options)
    print(f"steps per epoch: {results['steps_per_epoch']}  (joint ~ the sum of the two: equal compute)")
    print_table(table)
    print_style(results["style"], options.style_pieces, options.style_frames)
    goals = {artist: {"joint_beats_own": row["joint_true_label"] < row["own_model"],
                      "label_beats_other": row["joint_true_label"] < row["joint_other_label"],
                      "label_beats_no_artist": row["joint_true_label"] < row["joint_no_artist"]}
             for artist, row in table.items()}
    results["goals"] = {**goals, "cfg_within_1.3x": results["cfg"]["ratio"] <= 1.3}
    cfg = results["cfg"]
    print(f"goals: {json.dumps(results['goals'])}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"CFG: {cfg['s_per_frame_unguided'] * 1e3:.2f} -> {cfg['s_per_frame_cfg'] * 1e3:.2f} ms/frame "
          f"({cfg['ratio']:.2f}x; goal <= 1.3x)")
    return {"value": round(cfg["ratio"], 3), "artists": [a, b], "goals": results["goals"],
            "valid_nll_bits_per_frame": {artist: {key: round(value, 3) for key, value in row.items()
                                                  if isinstance(value, float)} for artist, row in table.items()}}


if __name__ == "__main__":
    finish(main, name="artists", unit="x the per-frame time of unguided generation (CFG / unguided)",
           goal="<= 1.3")
