#!/usr/bin/env bash
# Run stages 1 -> 5 for every artist folder in raw_audio/ (or the artists named), ESPnet-style.
#
#   bash scripts/run_pipeline.sh                      # every artist in ./raw_audio; the demo if there is none
#   bash scripts/run_pipeline.sh --stage 4 --resume --epochs 40 "My Band"  # train on, then generate
#
# With no raw_audio/ folder (and no artist named), it writes a small synthesized demo corpus into
# demo_run/ and runs the whole pipeline on it with the small model (about 3-4 minutes on 2 CPU cores).

# Plain POSIX up to here, so that sh and bash 3.2 (macOS's /bin/bash) reach this message rather than
# a syntax error: the loop needs bash >= 4.4 (namerefs; "${empty[@]}" under set -u).
_major="${BASH_VERSION%%.*}" _rest="${BASH_VERSION#*.}"
if [ -z "${BASH_VERSION:-}" ] || [ "$_major" -lt 4 ] || { [ "$_major" -eq 4 ] && [ "${_rest%%.*}" -lt 4 ]; }; then
  echo "run_pipeline.sh needs bash 4.4 or newer; this is ${BASH_VERSION:+bash }${BASH_VERSION:-not bash}." >&2
  echo "Run it as: bash scripts/run_pipeline.sh (macOS: brew install bash, then use that bash)." >&2
  exit 2
fi
set -euo pipefail

SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

usage() {
  cat <<USAGE
Usage: bash scripts/run_pipeline.sh [options] [ARTIST ...]

Runs scripts/1_audio_preprocessing.py .. scripts/5_MusicPrediction.py for each artist
(default: every folder in ROOT/raw_audio). One artist's failure is reported and the loop goes
on; a summary table ends the run. Exit status 1 if any artist failed.

Options (defaults in brackets; demo defaults in braces):
  --root DIR            project root holding raw_audio/ [current directory] {./demo_run}
  --stage N             first stage to run, 1..5 [1]
  --stop-stage M        last stage to run, 1..5 [5]
  --demo                run the demo corpus even if ROOT/raw_audio exists
  --demo-tracks N       demo tracks per artist [3]
  --demo-track-seconds S  length of each demo track [20]
  --preset NAME         model size: tiny, small, base [small] {small}
  --epochs N            training epochs [20] {25}
  --batch-size N        training windows per optimizer step (per process) [8] {4}
  --context-frames N    training window in codec frames (150 = 1 s) [1500] {300}
  --pattern NAME        codebook pattern: parallel or delay [delay]
  --bandwidth KBPS      Encodec bandwidth 3, 6, 12 or 24 [6]
  --shifts K            stage 2 encodes each clip at K sub-frame offsets (1..320): K token sequences
                        of the same music, which training draws among; variants of other offsets
                        are removed, --shifts 1 removes them all (docs/stage2.md) [not given: the
                        clips alone, variants already there kept]
  --codec SPEC          hub id, local folder, random[:seed], or auto
                        [facebook/encodec_48khz] {auto: pretrained if cached or downloadable,
                        else the random codec with a warning banner}
  --clip-seconds S      length of the training clips [60] {10}
  --seconds S           seconds of music to generate per artist [30] {10}
  --device DEV          auto, cpu or cuda [auto]
  --nproc N             processes for stages 2 and 4 under torchrun (GPUs on this machine) [1]
  --joint NAME          one model for all the artists: stages 1-3 per artist, then ONE stage-4 run
                        conditioned on the artist (model_results/NAME/), then stage 5 once per artist
                        with --model NAME (README, "One model for several artists")
  --resume              stage 4 continues an artist's unfinished or shorter run (model_results/<artist>/
                        last.pt) up to --epochs instead of stopping; an artist without one starts fresh
  --overwrite           redo every stage that runs (from --stage on): e.g. --stage 4 --overwrite
                        re-trains from scratch and generates again
  --stageK-arg WORD     one extra argument for stage K (K = 1..5); repeat it for more, e.g.
                        --stage5-arg --top-k --stage5-arg 100 --stage5-arg --prompt-audio --stage5-arg "my riff.flac"
                        (a WORD is passed as it is: spaces stay inside it)
  --stageK-args "..."   several extra arguments for stage K, split on whitespace (no spaces inside one)
  -h, --help            this help

Environment: PYTHON, the interpreter that runs the stages [python3]; it must have requirements.txt installed.
USAGE
}

log() { printf '%s run_pipeline %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

ROOT="" BATCH="" STAGE=1 STOP_STAGE=5 DEMO=0 RESUME=0 OVERWRITE=0 PRESET="" EPOCHS="" CONTEXT="" PATTERN="delay" BANDWIDTH=6
CODEC="" CLIP_SECONDS="" SECONDS_OUT="" DEVICE=auto NPROC=1 DEMO_TRACKS=3 DEMO_TRACK_SECONDS=20 JOINT="" SHIFTS=""
declare -a ARTISTS=() EXTRA1=() EXTRA2=() EXTRA3=() EXTRA4=() EXTRA5=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --root) ROOT="$2"; shift 2 ;;
    --stage) STAGE="$2"; shift 2 ;;
    --stop-stage) STOP_STAGE="$2"; shift 2 ;;
    --demo) DEMO=1; shift ;;
    --demo-tracks) DEMO_TRACKS="$2"; shift 2 ;;
    --demo-track-seconds) DEMO_TRACK_SECONDS="$2"; shift 2 ;;
    --preset) PRESET="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --batch-size) BATCH="$2"; shift 2 ;;
    --context-frames) CONTEXT="$2"; shift 2 ;;
    --pattern) PATTERN="$2"; shift 2 ;;
    --bandwidth) BANDWIDTH="$2"; shift 2 ;;
    --shifts) [[ $# -ge 2 ]] || die "--shifts needs a number"; SHIFTS="$2"; shift 2 ;;
    --codec) CODEC="$2"; shift 2 ;;
    --clip-seconds) CLIP_SECONDS="$2"; shift 2 ;;
    --seconds) SECONDS_OUT="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --nproc) NPROC="$2"; shift 2 ;;
    --joint) [[ $# -ge 2 ]] || die "--joint needs a model name"; JOINT="$2"; shift 2 ;;
    --resume) RESUME=1; shift ;;
    --overwrite) OVERWRITE=1; shift ;;
    --stage[1-5]-arg) [[ $# -ge 2 ]] || die "$1 needs a value"; eval "EXTRA${1:7:1}+=(\"\$2\")"; shift 2 ;;
    --stage[1-5]-args) read -r -a _words <<<"$2"; eval "EXTRA${1:7:1}+=(\"\${_words[@]}\")"; shift 2 ;;
    --) shift; ARTISTS+=("$@"); break ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) ARTISTS+=("$1"); shift ;;
  esac
done
[[ "$STAGE" =~ ^[1-5]$ && "$STOP_STAGE" =~ ^[1-5]$ && "$STAGE" -le "$STOP_STAGE" ]] \
  || die "--stage and --stop-stage must be 1..5 with stage <= stop-stage"
[[ "$RESUME" == 0 || "$OVERWRITE" == 0 ]] || die "--resume and --overwrite exclude each other"
[[ -z "$SHIFTS" || ( "$SHIFTS" =~ ^[1-9][0-9]{0,2}$ && "$SHIFTS" -le 320 ) ]] \
  || die "--shifts must be a whole number 1..320, got '$SHIFTS'"

# ---- the interpreter: say which one, and stop now if it lacks the requirements -----------------
command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (set PYTHON=/path/to/python)"
log "python: $(command -v "$PYTHON") ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
PYTHONPATH="$SCRIPTS" "$PYTHON" -m pipeline.requirements \
  || die "the requirements are not importable by $PYTHON (named above): pip install -r requirements.txt into it, or set PYTHON"

# ---- the demo: a synthesized corpus when there is no music to work on -------------------------
if [[ -z "$ROOT" && ( "$DEMO" == 1 || ( ! -d raw_audio && ${#ARTISTS[@]} -eq 0 ) ) ]]; then
  DEMO=1 ROOT="demo_run"
fi
ROOT="${ROOT:-.}"
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
if [[ "$DEMO" == 1 ]]; then
  # small for 25 epochs of 4 x 300 frames (150 steps per artist): the demo's models end 2.5-3 bits/frame
  # below their bigram baselines (BENCHMARKS.md); tiny, or a dozen steps, stayed above them
  PRESET="${PRESET:-small}" EPOCHS="${EPOCHS:-25}" CONTEXT="${CONTEXT:-300}" CLIP_SECONDS="${CLIP_SECONDS:-10}"
  BATCH="${BATCH:-4}"
  SECONDS_OUT="${SECONDS_OUT:-10}" CODEC="${CODEC:-auto}"
  log "demo: writing a synthesized two-artist corpus into $ROOT/raw_audio (kept if already there)"
  "$PYTHON" "$SCRIPTS/pipeline/demo.py" --root "$ROOT" --tracks "$DEMO_TRACKS" \
    --seconds "$DEMO_TRACK_SECONDS" >/dev/null
fi
PRESET="${PRESET:-small}" EPOCHS="${EPOCHS:-20}" CONTEXT="${CONTEXT:-1500}" CLIP_SECONDS="${CLIP_SECONDS:-60}" BATCH="${BATCH:-8}"
SECONDS_OUT="${SECONDS_OUT:-30}" CODEC="${CODEC:-facebook/encodec_48khz}"

if [[ "$CODEC" == auto ]]; then
  availability="$(PYTHONPATH="$SCRIPTS" "$PYTHON" -m pipeline.codec --probe facebook/encodec_48khz)"
  if [[ "$availability" == unavailable ]]; then
    CODEC="random:0"
    cat >&2 <<BANNER

  ************************************************************************************
  *  The pretrained Encodec weights (facebook/encodec_48khz) are not cached and the  *
  *  Hugging Face hub cannot be reached: this run uses a RANDOM, UNTRAINED codec.    *
  *  Every stage works, but the generated audio is noise-like, NOT music.            *
  *  Get the weights: see README.md, "Codec weights" (one download, then offline).   *
  ************************************************************************************

BANNER
  else
    CODEC="facebook/encodec_48khz"
    log "codec: facebook/encodec_48khz ($availability)"
  fi
fi

if [[ ${#ARTISTS[@]} -eq 0 ]]; then
  [[ -d "$ROOT/raw_audio" ]] || die "no $ROOT/raw_audio folder: put songs in raw_audio/<artist>/ (or run with --demo)"
  while IFS= read -r -d '' dir; do ARTISTS+=("$(basename "$dir")"); done \
    < <(find "$ROOT/raw_audio" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -print0 | sort -z)
  [[ ${#ARTISTS[@]} -gt 0 ]] || die "no artist folders in $ROOT/raw_audio"
fi

launcher() {  # stages 2 and 4 may run as several processes under torchrun
  if [[ "$NPROC" -gt 1 ]]; then echo "torchrun --standalone --nproc_per_node=$NPROC"; else echo "$PYTHON"; fi
}

resume_flag() {  # --resume for stage 4 when asked for and the artist has a run to continue
  if [[ "$RESUME" == 1 && -f "$ROOT/model_results/$1/last.pt" ]]; then
    echo "--resume"
  elif [[ "$RESUME" == 1 ]]; then
    log "$1: no model_results/$1/last.pt to resume: training from the start"
  fi
}

run_stage() {  # run_stage N ARTIST -> the stage's exit status (0 ok, 1 partial, 2+ failed)
  local n="$1" artist="$2" common=(--artist "$artist" --root "$ROOT")
  [[ -n "$JOINT" && "$n" == 5 ]] && common+=(--model "$JOINT")
  local -n extra="EXTRA$n"
  [[ "$OVERWRITE" == 1 ]] && common+=(--overwrite)
  case "$n" in
    1) "$PYTHON" "$SCRIPTS/1_audio_preprocessing.py" "${common[@]}" --clip-seconds "$CLIP_SECONDS" "${extra[@]}" ;;
    2) $(launcher) "$SCRIPTS/2_Tokenization.py" "${common[@]}" --codec "$CODEC" --bandwidth "$BANDWIDTH" \
         ${SHIFTS:+--shifts "$SHIFTS"} --device "$DEVICE" "${extra[@]}" ;;
    3) "$PYTHON" "$SCRIPTS/3_data_preparation.py" "${common[@]}" "${extra[@]}" ;;
    4) $(launcher) "$SCRIPTS/4_Transformer.py" "${common[@]}" $(resume_flag "$artist") --preset "$PRESET" \
         --epochs "$EPOCHS" --context-frames "$CONTEXT" --batch-size "$BATCH" --pattern "$PATTERN" \
         --device "$DEVICE" "${extra[@]}" ;;
    5) "$PYTHON" "$SCRIPTS/5_MusicPrediction.py" "${common[@]}" --seconds "$SECONDS_OUT" --device "$DEVICE" \
         "${extra[@]}" ;;
  esac
}

run_joint_training() {  # stage 4 once over every artist given -> its exit status
  local artist_flags=() name
  for name in "$@"; do artist_flags+=(--artist "$name"); done
  [[ "$OVERWRITE" == 1 ]] && artist_flags+=(--overwrite)
  $(launcher) "$SCRIPTS/4_Transformer.py" "${artist_flags[@]}" --name "$JOINT" --root "$ROOT" \
    $(resume_flag "$JOINT") --preset "$PRESET" --epochs "$EPOCHS" --context-frames "$CONTEXT" --batch-size "$BATCH" \
    --pattern "$PATTERN" --device "$DEVICE" "${EXTRA4[@]}"
}

STAGE_NAMES=("" "preprocessing" "tokenization" "data preparation" "training" "generation")
RESULTS="$(mktemp)"
trap 'rm -f "$RESULTS"' EXIT
any_failed=0
LAST_PER_ARTIST="$STOP_STAGE"  # with --joint, stages 4 (once for all) and 5 run after the per-artist loop
[[ -n "$JOINT" && "$STOP_STAGE" -gt 3 ]] && LAST_PER_ARTIST=3
declare -a READY=()  # artists whose per-artist stages succeeded (the joint model's artists)
for artist in "${ARTISTS[@]}"; do
  started=$(date +%s) status="ok"
  log "=== $artist: stages $STAGE..$LAST_PER_ARTIST"
  for ((n = STAGE; n <= LAST_PER_ARTIST; n++)); do
    log "--- $artist: stage $n (${STAGE_NAMES[$n]})"
    rc=0
    run_stage "$n" "$artist" || rc=$?
    if [[ "$rc" -eq 1 ]]; then
      status="partial"
      log "$artist: stage $n finished, but some items failed (see its report); going on"
    elif [[ "$rc" -ne 0 ]]; then
      status="failed at stage $n"
      any_failed=1
      log "$artist: stage $n failed (exit $rc); going on with the next artist"
      break
    fi
  done
  [[ "$status" != failed* ]] && READY+=("$artist")
  printf '%s\t%s\t%s\n' "$artist" "$status" "$(( $(date +%s) - started ))" >>"$RESULTS"
done

if [[ -n "$JOINT" && "$STOP_STAGE" -ge 4 ]]; then
  joint_ok=1
  if [[ "$STAGE" -le 4 ]]; then
    started=$(date +%s) rc=0
    log "=== $JOINT: stage 4 (one model for ${READY[*]})"
    if [[ ${#READY[@]} -eq 0 ]]; then
      rc=2
      log "$JOINT: no artist got through stages 1-3: nothing to train"
    else
      run_joint_training "${READY[@]}" || rc=$?
    fi
    [[ "$rc" -eq 0 ]] || { joint_ok=0; any_failed=1; log "$JOINT: stage 4 failed (exit $rc)"; }
    printf '%s\t%s\t%s\n' "$JOINT" "$([[ $joint_ok == 1 ]] && echo ok || echo "failed at stage 4")" \
      "$(( $(date +%s) - started ))" >>"$RESULTS"
  fi
  if [[ "$STOP_STAGE" -ge 5 && "$joint_ok" == 1 ]]; then
    for artist in "${READY[@]}"; do
      started=$(date +%s) rc=0
      log "--- $artist: stage 5 (generation) with the joint model $JOINT"
      run_stage 5 "$artist" || rc=$?
      [[ "$rc" -eq 0 ]] && status="ok" || status="failed at stage 5"
      [[ "$rc" -eq 1 ]] && status="partial"
      [[ "$rc" -gt 1 ]] && any_failed=1
      printf '%s\t%s\t%s\n' "$artist" "$status" "$(( $(date +%s) - started ))" >>"$RESULTS"
    done
  fi
fi

echo
PYTHONPATH="$SCRIPTS" "$PYTHON" -m pipeline.summary --root "$ROOT" --results "$RESULTS" --list-outputs
if [[ "$DEMO" == 1 ]]; then
  cat <<NEXT

Demo finished: listen to the WAVs above, look at the spectrograms and model_results/*/loss.png.
Next, with your own music:
  mkdir -p raw_audio/"My Artist"   # put that artist's songs there (WAV, FLAC, OGG, MP3, ...)
  bash scripts/run_pipeline.sh     # every artist in raw_audio/; see --help and README.md
NEXT
  [[ "$CODEC" == random:* ]] && echo "(This demo used an untrained codec: its audio is not music. README.md, \"Codec weights\".)"
fi
exit "$any_failed"
