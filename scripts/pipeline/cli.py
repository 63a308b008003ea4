"""Command-line pieces every stage shares: common flags, artist names, logging, exit codes, reports."""
from __future__ import annotations

import argparse
import logging
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

EXIT_OK = 0  # all done
EXIT_PARTIAL = 1  # finished, but some items failed (each named in the log and the report)
EXIT_RUN_FAILED = 1  # a run that started and then failed (stage 4: training diverged)
EXIT_USAGE = 2  # bad usage, or nothing could be done
EXIT_INTERRUPTED = 130  # the shell's status for Ctrl-C; SIGTERM is handled the same way

ARTIST_PATTERN = re.compile(r"^[A-Za-z0-9 ._-]+$")
LOG = logging.getLogger("pipeline")


class StageError(Exception):
    """Nothing could be done: the stage exits with status 2 and this message."""


def error_reason(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def artist_name(value: str) -> str:
    """argparse type: a single folder name of letters, digits, space, '.', '_', '-' (never '..')."""
    if not value or not value.strip():
        raise argparse.ArgumentTypeError("artist name is empty")
    if "/" in value or "\\" in value or Path(value).is_absolute():
        raise argparse.ArgumentTypeError(f"artist name {value!r} must be one folder name, not a path")
    if value in {".", ".."} or ".." in value:
        raise argparse.ArgumentTypeError(f"artist name {value!r} may not contain '..'")
    if not ARTIST_PATTERN.match(value):
        raise argparse.ArgumentTypeError(
            f"artist name {value!r} may hold only letters, digits, space, '.', '_' and '-'")
    return value


def bounded_number(kind, minimum=None, maximum=None, minimum_inclusive=True):
    """argparse type: `kind` (int or float) within [minimum, maximum] (minimum exclusive if asked); no NaN."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if kind is float and value != value:
            raise argparse.ArgumentTypeError("NaN is not allowed")
        if minimum is not None and (value < minimum or (value == minimum and not minimum_inclusive)):
            relation = ">=" if minimum_inclusive else ">"
            raise argparse.ArgumentTypeError(f"{value} must be {relation} {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} must be <= {maximum}")
        return value

    return parse


positive_int = bounded_number(int, 1)
non_negative_int = bounded_number(int, 0)
positive_float = bounded_number(float, 0.0, minimum_inclusive=False)
non_negative_float = bounded_number(float, 0.0)
fraction = bounded_number(float, 0.0, 1.0)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows an option's default in `--help` once: not when its help already says "(default: ...)", and
    never for a default of None (the option is simply off), a suppressed one, or a flag (off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default:" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if action.nargs == 0:  # store_true and friends: the flag's absence is its default
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


def make_parser(description: str, epilog: str | None = None, multiple_artists: bool = False,
                artist_required: bool = True) -> argparse.ArgumentParser:
    """A parser with the flags every stage has (docs/contract.md, 'Command-line surface'), defaults shown in --help.

    `multiple_artists`: `--artist` may be given several times (a list; stage 4's joint models).
    `artist_required` False: the stage checks it itself (stage 5: `--blend` stands in for it)."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=DefaultsHelpFormatter)
    if not artist_required:
        parser.add_argument("--artist", type=artist_name,
                            help="artist folder name (letters, digits, space, '.', '_', '-')")
    elif multiple_artists:
        parser.add_argument("--artist", required=True, type=artist_name, action="append",
                            help="artist folder name (letters, digits, space, '.', '_', '-'); give it several "
                                 "times to train one model on several artists (then --name is required)")
    else:
        parser.add_argument("--artist", required=True, type=artist_name,
                            help="artist folder name (letters, digits, space, '.', '_', '-')")
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="project root holding raw_audio/, data_processed/, encoded_tokens/, ...")
    parser.add_argument("--overwrite", action="store_true", help="redo items whose output already exists")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity")
    return parser


def setup_logging(level: str = "INFO", stage: str = "") -> logging.Logger:
    """Timestamped log lines on stderr; returns the stage's logger."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), force=True,
                        format=f"%(asctime)s {stage + ' ' if stage else ''}%(levelname)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    return logging.getLogger(f"pipeline.{stage}" if stage else "pipeline")


def resolve_device(choice: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is a usage error."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise StageError("--device cuda was asked for, but PyTorch sees no CUDA GPU (use --device cpu)")
    return choice


@dataclass
class StageReport:
    """Counts and named failures of one stage run; decides the exit status and can be written as JSON."""

    stage: str
    artist: str
    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # [{"path": ..., "reason": ...}]
    counters: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def fail(self, path, reason: str, log: logging.Logger | None = None) -> None:
        self.failed.append({"path": str(path), "reason": reason})
        (log or LOG).error("%s: %s", path, reason)

    def count(self, key: str, amount: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + amount

    @property
    def elapsed(self) -> float:
        return time.time() - self.started

    def exit_code(self) -> int:
        if self.failed:
            return EXIT_PARTIAL
        return EXIT_OK

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "artist": self.artist,
            "done": len(self.done),
            "skipped": len(self.skipped),
            "failed": self.failed,
            "counters": self.counters,
            "details": self.details,
            "elapsed_s": round(self.elapsed, 3),
            "exit_status": self.exit_code(),
        }

    def write(self, path: Path) -> None:
        from .files import atomic_write_json

        atomic_write_json(self.as_dict(), path)

    def summary(self) -> str:
        extra = "".join(f", {key} {value}" for key, value in sorted(self.counters.items()))
        return (f"{self.stage} {self.artist!r}: {len(self.done)} done, {len(self.skipped)} skipped, "
                f"{len(self.failed)} failed{extra} in {self.elapsed:.1f} s")


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(main, argv=None) -> int:
    """Run a stage's `main(argv)`: StageError -> exit 2 with its message; Ctrl-C or SIGTERM -> 130.

    SIGTERM (`kill`, a batch scheduler, `docker stop`) raises KeyboardInterrupt like Ctrl-C, so
    the same clean-up runs: atomic writes drop their temporaries, finished outputs are kept.
    """
    previous = _install_sigterm_handler()
    try:
        return main(argv)
    except StageError as error:
        logging.getLogger("pipeline").error("%s", error)
        return EXIT_USAGE
    except KeyboardInterrupt:
        logging.getLogger("pipeline").error("interrupted; finished outputs are kept, re-run to continue")
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _install_sigterm_handler():
    """Make SIGTERM raise KeyboardInterrupt; returns the handler it replaced (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None  # signal.signal only works in the main thread
    return signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
