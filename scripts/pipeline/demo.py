"""A small, deterministic demo corpus: two "artists" with audibly different synthesized music.

    demo_sunny_arps    C major pentatonic, 132 BPM, bright plucked saw arpeggios, a kick on
                       every beat, notes panned left-right; written as 44.1 kHz FLAC.
    demo_night_bells   A natural minor, 76 BPM, soft FM bells over a low drone, a hi-hat of
                       filtered noise on the off-beats, wide stereo; written as 48 kHz OGG/Vorbis.

Nothing is downloaded and nothing is committed but this code: `make_demo_corpus(raw_audio_dir)`.
Run as a script to write the corpus: `python scripts/pipeline/demo.py --root DIR`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class Style:
    artist: str
    root_hz: float
    scale: tuple  # semitone offsets
    bpm: float
    notes_per_beat: int
    rate: int
    file_format: str  # soundfile format name
    extension: str
    voice: str  # "pluck": arpeggios with a kick; "bell": FM bells, hi-hat and a drone


STYLES = (
    Style("demo_sunny_arps", 261.63, (0, 2, 4, 7, 9), 132.0, 2, 44_100, "FLAC", ".flac", "pluck"),
    Style("demo_night_bells", 220.0, (0, 2, 3, 5, 7, 8, 10), 76.0, 1, 48_000, "OGG", ".ogg", "bell"),
)


def _pluck(freq: float, seconds: float, rate: int) -> np.ndarray:
    """Bright plucked tone: five saw-like harmonics with a fast exponential decay."""
    t = np.arange(int(seconds * rate)) / rate
    tone = sum(np.sin(2 * np.pi * freq * k * t) / k for k in range(1, 6))
    return tone * np.exp(-t * 6.0)


def _bell(freq: float, seconds: float, rate: int) -> np.ndarray:
    """Soft FM bell: carrier at freq, modulator at 1.4 x freq, slowly decaying index and level."""
    t = np.arange(int(seconds * rate)) / rate
    index = 2.5 * np.exp(-t * 1.5)
    return np.sin(2 * np.pi * freq * t + index * np.sin(2 * np.pi * 1.4 * freq * t)) * np.exp(-t * 1.2)


def _kick(rate: int) -> np.ndarray:
    t = np.arange(int(0.25 * rate)) / rate
    return np.sin(2 * np.pi * (50 + 90 * np.exp(-t * 30)) * t) * np.exp(-t * 14)


def _hihat(rate: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(int(0.06 * rate))
    return np.diff(noise, prepend=0.0) * np.exp(-np.arange(noise.size) / rate * 60) * 0.3


def _add(out: np.ndarray, start: int, sound: np.ndarray, left: float, right: float) -> None:
    end = min(out.shape[0], start + sound.shape[0])
    out[start:end, 0] += left * sound[: end - start]
    out[start:end, 1] += right * sound[: end - start]


def render_track(style: Style, seconds: float, seed: int) -> np.ndarray:
    """One track `[n, 2]` float32 in -1..1, fully determined by (style, seconds, seed)."""
    rng = np.random.default_rng(seed)
    rate = style.rate
    out = np.zeros((int(seconds * rate), 2))
    beat = 60.0 / style.bpm
    step = beat / style.notes_per_beat
    degree = 0
    for index in range(int(seconds / step)):
        start = int(index * step * rate)
        degree = int(np.clip(degree + rng.integers(-2, 3), 0, 2 * len(style.scale) - 1))
        octave, position = divmod(degree, len(style.scale))
        freq = style.root_hz * 2 ** (octave + style.scale[position] / 12)
        if style.voice == "pluck":
            pan = 0.5 + 0.4 * (-1) ** index
            _add(out, start, 0.25 * _pluck(freq, step * 1.5, rate), 1 - pan, pan)
            if index % style.notes_per_beat == 0:
                _add(out, start, 0.6 * _kick(rate), 0.7, 0.7)
        else:
            pan = rng.uniform(0.2, 0.8)
            _add(out, start, 0.3 * _bell(freq, beat * 3, rate), 1 - pan, pan)
            _add(out, start + int(beat / 2 * rate), _hihat(rate, rng), 0.3, 0.6)
    if style.voice == "bell":
        t = np.arange(out.shape[0]) / rate
        drone = 0.12 * np.sin(2 * np.pi * style.root_hz / 2 * t) * (1 + 0.3 * np.sin(2 * np.pi * 0.2 * t))
        out += drone[:, None]
    return (0.9 * out / max(1e-9, np.abs(out).max())).astype(np.float32)


def make_demo_corpus(raw_audio_dir: str | Path, tracks_per_artist: int = 3, seconds: float = 20.0) -> list[Path]:
    """Write the demo corpus under `raw_audio_dir/<artist>/`; existing files are kept. Returns all paths."""
    written = []
    for style_index, style in enumerate(STYLES):
        folder = Path(raw_audio_dir) / style.artist
        folder.mkdir(parents=True, exist_ok=True)
        for track in range(tracks_per_artist):
            path = folder / f"track_{track + 1:02d}{style.extension}"
            if not path.exists():
                from .files import atomic_path

                wave = render_track(style, seconds, seed=1000 * style_index + track)
                with atomic_path(path) as tmp:
                    sf.write(tmp, wave, style.rate, format=style.file_format)
            written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="project root; writes ROOT/raw_audio/")
    parser.add_argument("--tracks", type=int, default=3, help="tracks per artist (default 3)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each track (default 20)")
    args = parser.parse_args(argv)
    for path in make_demo_corpus(args.root / "raw_audio", args.tracks, args.seconds):
        print(path)
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "pipeline"
    raise SystemExit(main())
