"""The local studio's web app: a page and a JSON API over stage 5's piece writing (`scripts/studio.py`
serves it).

No generation code of its own: a request becomes a `GenerationRequest` (`pipeline.request`, the
same one stage 5's options become, with its defaults and limits), and a single worker thread runs
`pipeline.pieces.write_pieces` with a model kept in memory per model name, reporting progress
through the core's progress callback and stopping through its cancel check. Pieces land where
stage 5 writes them (`music_transformer/<artist>/<name>.{wav,th,png,json}`), so the command line
and the studio share one history.

Nothing from a request is used as a filesystem path: models, artists, prompts and pieces are
looked up by id in what the server found on disk or stored itself. The studio answers only requests
addressed to its own host and port (a web page cannot reach it through DNS rebinding), refuses
state-changing requests sent from another origin, and refuses jobs larger than the machine can hold.
"""

import json
import logging
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from . import runs
from .cli import StageError, error_reason
from .codec import UNTRAINED_WARNING, parse_random_spec
from .decoding import DecodingOutOfMemory
from .files import is_temporary
from .generation import GenerationCancelled
from .pieces import is_complete, load_model_and_codec, write_pieces
from .request import (GenerationRefused, GenerationRequest, InvalidRequest, check_request, estimated_job_bytes,
                      physical_memory_bytes)

LOG = logging.getLogger("pipeline.studio")
PAGE = Path(__file__).with_name("studio_page.html")
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an audio prompt: a few minutes of WAV; larger uploads get 413
MAX_SECONDS = 600.0  # the longest piece a request may ask for (the command line has no such limit)
MAX_PIECES = 32  # pieces one job may ask for (the command line has no such limit)
MEMORY_SHARE = 0.5  # a job may use this share of the machine's memory (by `estimated_job_bytes`)
# the GenerationRequest fields a request may set directly; `model`, `artist`, `blend` and the prompt
# are checked against the catalog first
REQUEST_FIELDS = ("seconds", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "num_samples",
                  "prompt_seconds", "cfg_coef", "loop", "max_copy_seconds")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:-]{0,200}$")


class StudioError(Exception):
    """A request the studio refuses: an HTTP status and a reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def refuse_unsafe_id(value: str, what: str) -> None:
    """An id is a name, never a path: '..' or a separator is refused (404: no such thing)."""
    if "/" in value or "\\" in value or ".." in value or not SAFE_ID.match(value):
        raise StudioError(404, f"{what} {value!r} is not one (an id holds no '..' or path separator)")


# ==== what lies on disk =======================================================================
class Catalog:
    """The models under `model_results/` and the pieces under `music_transformer/`, found by listing."""

    def __init__(self, root: Path):
        self.root = root
        self._facts: dict = {}  # (path, mtime) -> the checkpoint's codec spec, artist labels, model_args, contract

    def models(self) -> dict[str, Path]:
        """Model name -> checkpoint (best.pt, else last.pt) for every folder of `model_results/`."""
        return runs.model_folders(self.root)

    def artists_of(self, model: str) -> list[str]:
        """The artist labels a model knows: a joint model's list (stage 4 with several --artist), else
        the one artist it was trained on, its folder's name."""
        checkpoint = self.models().get(model)
        labels = self.checkpoint_facts(checkpoint)["artists"] if checkpoint is not None else []
        return list(labels) if len(labels) > 1 else [model]

    def is_joint(self, model: str) -> bool:
        return self.artists_of(model) != [model]

    def codec_spec(self, checkpoint: Path) -> str | None:
        return self.checkpoint_facts(checkpoint)["codec"]

    def checkpoint_facts(self, checkpoint: Path) -> dict:
        """The checkpoint's codec spec, artist labels, model_args and token contract, read once per file
        version (memory-mapped: the weights stay on disk)."""
        key = (checkpoint, checkpoint.stat().st_mtime_ns)
        if key not in self._facts:
            try:
                saved = runs.read_checkpoint(checkpoint, mmap=True)
                self._facts[key] = {"codec": str(saved["token_contract"]["codec"]),
                                    "artists": [str(a) for a in saved.get("artists") or []],
                                    "model_args": dict(saved["model_args"]),
                                    "contract": dict(saved["token_contract"])}
            except Exception as error:  # noqa: BLE001 - a listing must not fail on one odd file
                LOG.warning("%s: cannot read it (%s)", checkpoint, error_reason(error))
                self._facts[key] = {"codec": None, "artists": [], "model_args": None, "contract": None}
        return self._facts[key]

    def pieces(self) -> dict[str, Path]:
        """Piece id (`<artist>:<name>`) -> its stem, for every finished piece (its sidecar JSON written last)."""
        found = {}
        folder = self.root / "music_transformer"
        for sidecar in sorted(folder.glob("*/*.json")) if folder.is_dir() else []:
            if is_temporary(sidecar) or sidecar.parent.name.startswith("."):
                continue
            if is_complete(sidecar.parent, sidecar.stem):
                found[piece_id(sidecar.parent.name, sidecar.stem)] = sidecar.with_suffix("")
        return found

    def piece(self, identifier: str) -> Path:
        refuse_unsafe_id(identifier, "piece id")
        stem = self.pieces().get(identifier)
        if stem is None:
            raise StudioError(404, f"no piece {identifier!r}")
        return stem


def piece_id(artist: str, name: str) -> str:
    return f"{artist}:{name}"


def piece_summary(identifier: str, stem: Path) -> dict:
    """What the page lists for a piece: its id, links and a few sidecar fields (originality and loop
    figures included; pieces written before they existed have none)."""
    sidecar = json.loads(stem.with_suffix(".json").read_text())
    base = f"/api/pieces/{identifier}"
    return {"id": identifier, "artist": sidecar.get("artist"), "name": sidecar.get("name"),
            "duration_s": sidecar.get("duration_s"), "seed": sidecar.get("seed"),
            "created": stem.with_suffix(".json").stat().st_mtime,
            "collapse_events": sidecar.get("collapse_events", []), "warning": sidecar.get("warning"),
            "originality": originality_summary(sidecar.get("originality")),
            "originality_reason": sidecar.get("originality_reason"), "loop": sidecar.get("loop"),
            "audio": f"{base}/audio", "spectrogram": f"{base}/spectrogram", "sidecar": base}


def originality_summary(report: dict | None) -> dict | None:
    """The figures the page shows beside a piece: its longest copied run (all codebooks), where it comes
    from, the copied share of its windows, and a --max-copy-seconds warning."""
    if report is None:
        return None
    keys = ("longest_copy_seconds", "training_file", "training_seconds", "piece_seconds", "copied_share",
            "warning")
    return {key: report.get(key) for key in keys}


# ==== requests ================================================================================
class GenerateBody(BaseModel):
    """The JSON body of `POST /api/generate`: stage 5's settings by name; an omitted one takes stage 5's default."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = None
    artist: str | None = None
    blend: dict[str, float] | None = None  # a joint model's artists mixed: {artist: weight >= 0}
    cfg_coef: float | None = None  # classifier-free guidance of a joint model (1 = off)
    seconds: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    num_samples: int | None = None
    prompt_id: str | None = None
    prompt_seconds: float | None = None
    loop: bool | None = None  # stage 5's --loop: each piece a seamless loop
    max_copy_seconds: float | None = None  # stage 5's --max-copy-seconds (None: off)


def generation_request(settings: dict, root: Path, model: str, artist: str | None, blend: dict | None,
                       checkpoint: Path, name: str, prompt: Path | None) -> GenerationRequest:
    """A request's settings as stage 5's `GenerationRequest`, within its limits (422 naming the field)."""
    given = {key: settings[key] for key in REQUEST_FIELDS if settings.get(key) is not None}
    request = GenerationRequest(root=root, model=model, artist=artist, blend=blend, checkpoint=checkpoint,
                                name=name, prompt_audio=prompt, **given)
    try:
        return check_request(request)
    except InvalidRequest as error:  # "top_p: 0.0 must be > 0.0"
        raise StudioError(422, str(error)) from None


# ==== jobs ====================================================================================
@dataclass
class Job:
    id: str
    model: str
    request: GenerationRequest
    state: str = "queued"
    progress: float = 0.0
    frames_per_second: float | None = None
    error: str | None = None
    pieces: list = field(default_factory=list)
    warning: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def as_dict(self) -> dict:
        return {"job": self.id, "state": self.state, "progress": round(self.progress, 4),
                "frames_per_second": self.frames_per_second, "error": self.error, "pieces": list(self.pieces),
                "model": self.model, "artist": self.request.label, "warning": self.warning}

    def on_frames(self, done: int, total: int) -> None:
        self.progress = done / max(total, 1)
        elapsed = time.perf_counter() - self.started
        if elapsed > 0:
            self.frames_per_second = round(done * self.request.num_samples / elapsed, 1)


class Studio:
    """The models in memory, the uploaded prompts and the job queue, run by one worker thread."""

    def __init__(self, root: Path, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_seconds: float = MAX_SECONDS,
                 max_pieces: int = MAX_PIECES, max_job_bytes: int | None = None, allowed_hosts=None):
        """`max_job_bytes`: the memory one job may use (default: MEMORY_SHARE of the machine's);
        `allowed_hosts`: the Host values it answers ("name:port", or "name" for any port; default:
        the loopback names on any port, see `served_hosts`)."""
        self.root = Path(root)
        self.max_seconds, self.max_pieces = max_seconds, max_pieces
        self.max_job_bytes, self.memory_limit_note = ((max_job_bytes, "set for this studio")
                                                      if max_job_bytes is not None else default_job_bytes())
        self.allowed_hosts = [split_host(host) for host in (allowed_hosts or LOOPBACK_NAMES)]
        self.catalog = Catalog(self.root)
        self.max_upload_bytes = max_upload_bytes
        self.prompt_folder = Path(tempfile.mkdtemp(prefix="studio-prompts-"))
        self.prompts: dict[str, Path] = {}
        self.models: dict = {}  # model name -> a `pipeline.pieces.Preloaded`, loaded on first use
        self.jobs: dict[str, Job] = {}
        self.queue: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="studio-worker", daemon=True)
        self.worker.start()

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel_requested.set()
        self.queue.put(None)
        self.worker.join(timeout=30)
        shutil.rmtree(self.prompt_folder, ignore_errors=True)

    # ---- requests -------------------------------------------------------------------------
    def model_list(self) -> list[dict]:
        listed = []
        for name, checkpoint in self.catalog.models().items():
            spec = self.catalog.codec_spec(checkpoint)
            listed.append({"name": name, "artists": self.catalog.artists_of(name),
                           "joint": self.catalog.is_joint(name), "checkpoint": checkpoint.name,
                           "loaded": name in self.models, "codec": spec,
                           "codec_untrained": None if spec is None else parse_random_spec(spec) is not None})
        return listed

    def store_prompt(self, chunks) -> str:
        """Save an uploaded file (an iterable of byte blocks) as a prompt if it is audio -> its id."""
        from .audio import AudioDecodeError, open_audio

        limit = self.max_upload_bytes
        identifier = uuid.uuid4().hex
        path = self.prompt_folder / identifier
        size = 0
        with open(path, "wb") as handle:
            for block in chunks:
                size += len(block)
                if size > limit:
                    handle.close()
                    path.unlink()
                    raise StudioError(413, f"the upload is over the limit of {limit} bytes")
                handle.write(block)
        try:
            open_audio(path).close()
        except AudioDecodeError as error:
            path.unlink()
            raise StudioError(400, f"not audio: {error_reason(error).replace(str(path), 'the upload')}") from None
        self.prompts[identifier] = path
        return identifier

    def submit(self, settings: dict) -> Job:
        """Check a generation request (4xx, nothing changed) and queue it."""
        if settings.get("seconds") is not None and settings["seconds"] > self.max_seconds:
            raise StudioError(422, f"seconds: {settings['seconds']:g} is over this studio's limit of "
                                   f"{self.max_seconds:g} s (scripts/studio.py --max-seconds)")
        model, checkpoint = self.checked_model(settings.get("model"), settings.get("artist"))
        blend = self.checked_blend(model, settings.get("artist"), settings.get("blend"))
        artist = settings.get("artist")
        artist = artist if artist is not None or blend else self.catalog.artists_of(model)[0]
        if artist is not None and artist not in self.catalog.artists_of(model):
            raise StudioError(404, f"model {model!r} knows no artist {artist!r}")
        identifier = uuid.uuid4().hex[:12]
        name = f"studio-{time.strftime('%Y%m%d-%H%M%S')}-{identifier}"
        request = generation_request(settings, self.root, model, artist, blend, checkpoint, name,
                                     self.checked_prompt(settings.get("prompt_id")))
        self.check_size(request, checkpoint)
        if request.max_copy_seconds is not None and not (checkpoint.parent / runs.TRAINING_INDEX).is_file():
            raise StudioError(422, f"max_copy_seconds: model {model!r} has no {runs.TRAINING_INDEX} to look pieces "
                                   "up in (trained before stage 4 wrote one): build it with `PYTHONPATH=scripts "
                                   f"python -m pipeline.originality --model {checkpoint.parent}`")
        job = Job(id=identifier, model=model, request=request)
        self.jobs[identifier] = job
        self.queue.put(job)
        return job

    def checked_model(self, model: str | None, artist: str | None) -> tuple[str, Path]:
        """The model a request names (else its artist's) and its checkpoint; 404 for an unknown one."""
        if model is None and artist is None:
            raise StudioError(422, "name a model or an artist")
        model = model if model is not None else artist
        refuse_unsafe_id(model, "model")
        checkpoint = self.catalog.models().get(model)
        if checkpoint is None:
            raise StudioError(404, f"no model {model!r} under model_results/")
        return model, checkpoint

    def checked_prompt(self, prompt_id: str | None) -> Path | None:
        if prompt_id is None:
            return None
        if prompt_id not in self.prompts:
            raise StudioError(404, f"no prompt {prompt_id!r} (upload one to /api/prompts)")
        return self.prompts[prompt_id]

    def check_size(self, request: GenerationRequest, checkpoint: Path) -> None:
        """Refuse (422, with the limit) a job of more pieces, or more memory, than this studio allows."""
        if request.num_samples > self.max_pieces:
            raise StudioError(422, f"num_samples: {request.num_samples} pieces is over this studio's limit of "
                                   f"{self.max_pieces} pieces per job (scripts/studio.py --max-pieces)")
        facts = self.catalog.checkpoint_facts(checkpoint)
        if facts["model_args"] is None or self.max_job_bytes is None:
            return
        needed = estimated_job_bytes(request, facts["model_args"], facts["contract"])
        if needed > self.max_job_bytes:
            raise StudioError(422, f"num_samples: {request.num_samples} pieces of {request.seconds:g} s need about "
                                   f"{human_bytes(needed)} of memory, over this studio's limit of "
                                   f"{human_bytes(self.max_job_bytes)} per job ({self.memory_limit_note}): ask for "
                                   "fewer pieces or fewer seconds")

    def checked_blend(self, model: str, artist: str | None, blend: dict | None) -> dict | None:
        """A request's blend, checked against the model (`check_request` then checks the weights)."""
        if blend is None:
            return None
        if not blend:
            raise StudioError(422, "blend: name at least one of the model's artists with a weight")
        if artist is not None:
            raise StudioError(422, "give an artist or a blend, not both")
        if not self.catalog.is_joint(model):
            raise StudioError(422, f"model {model!r} knows one artist: a blend needs a model trained on several")
        unknown = [name for name in blend if name not in self.catalog.artists_of(model)]
        if unknown:
            raise StudioError(404, f"model {model!r} knows no artist {unknown[0]!r}")
        return blend

    def job(self, identifier: str) -> Job:
        refuse_unsafe_id(identifier, "job id")
        if identifier not in self.jobs:
            raise StudioError(404, f"no job {identifier!r}")
        return self.jobs[identifier]

    def cancel(self, identifier: str) -> Job:
        job = self.job(identifier)
        job.cancel_requested.set()
        if job.state == "queued":
            job.state = "cancelled"  # the worker skips it
        return job

    # ---- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            if job.cancel_requested.is_set():
                job.state = "cancelled"
                continue
            job.state = "running"
            try:
                self._run(job)
            except GenerationCancelled:
                job.state = "cancelled"
            except (GenerationRefused, StageError, DecodingOutOfMemory) as error:  # a plain refusal (a prompt
                job.state, job.error = "failed", error_reason(error)  # longer than the piece, say): its reason
            except Exception as error:  # noqa: BLE001 - a job's failure must not stop the worker
                LOG.exception("job %s failed", job.id)
                job.state, job.error = "failed", f"{type(error).__name__}: {error_reason(error)}"

    def _run(self, job: Job) -> None:
        if job.model not in self.models:
            self.models[job.model] = load_model_and_codec(job.request)
        preloaded = self.models[job.model]
        job.started = time.perf_counter()  # frames/s counts generation, not the model's first load
        job.warning = None if preloaded.codec.pretrained else UNTRAINED_WARNING
        report = write_pieces(job.request, preloaded, on_frames=job.on_frames, cancel=job.cancel_requested.is_set)
        job.pieces = [piece_id(job.request.label, name) for name in report.done]
        if report.failed:
            job.state, job.error = "failed", "; ".join(failure["reason"] for failure in report.failed)
        else:
            job.state, job.progress = "done", 1.0


# ==== limits ==================================================================================
def default_job_bytes() -> tuple[int | None, str]:
    """(MEMORY_SHARE of this machine's memory, where that limit comes from); None where the system does
    not say: no memory limit."""
    memory = physical_memory_bytes()
    if memory is None:
        return None, "unknown machine memory"
    return int(memory * MEMORY_SHARE), f"{MEMORY_SHARE:.0%} of this machine's {human_bytes(memory)}"


def human_bytes(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


# ==== who may ask =============================================================================
def served_hosts(host: str, port: int) -> list[str]:
    """The Host values a studio serving on `host`:`port` answers: the loopback names and `host`, with
    the port (any port when `port` is 0: the system picks it)."""
    names = [*LOOPBACK_NAMES, f"[{host}]" if ":" in host and not host.startswith("[") else host]
    return [name if port == 0 else f"{name}:{port}" for name in dict.fromkeys(names)]


def split_host(value: str) -> tuple[str, int | None]:
    """"name[:port]" (a Host header, an allowed host) -> (name in lower case, port or None); an IPv6
    literal keeps its brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name, port = name + "]", rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = value.partition(":")
    return name, int(port) if port.isdigit() else None


def is_allowed(name: str, port: int | None, allowed: list[tuple[str, int | None]]) -> bool:
    """Whether `name:port` is one of `allowed` (an allowed entry without a port accepts any port)."""
    return bool(name) and any(name == known and known_port in (None, port) for known, known_port in allowed)


def host_allowed(host: str | None, allowed: list[tuple[str, int | None]]) -> bool:
    if not host:
        return False
    name, port = split_host(host)
    return is_allowed(name, port if port is not None else 80, allowed)


def foreign_request(method: str, host: str | None, origin: str | None,
                    allowed: list[tuple[str, int | None]]) -> tuple[int, str] | None:
    """(status, reason) for a request the studio must refuse, else None."""
    if not host_allowed(host, allowed):
        return 403, f"refused: the Host {host!r} is not this studio's address"
    if method in STATE_CHANGING and origin is not None and not origin_allowed(origin, allowed):
        return 403, f"refused: a {method} from the origin {origin!r}, not this studio's page"
    return None


def origin_allowed(origin: str, allowed: list[tuple[str, int | None]]) -> bool:
    """An Origin header ("http://host:port", or "null") names one of the allowed hosts."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return False
    name = parts.hostname or ""
    return is_allowed(f"[{name}]" if ":" in name else name, port, allowed)


# ==== the HTTP app ============================================================================
def create_app(studio: Studio):
    """The FastAPI app: `GET /` (the page), `/api/...` (JSON, documented at `/docs`)."""
    from fastapi import FastAPI

    app = FastAPI(title="MusicTransformer studio", version="1",
                  description="Generate pieces with stage 5 and listen to them. Uploads over "
                              f"{studio.max_upload_bytes} bytes get 413.")
    app.state.studio = studio
    add_guards(app, studio)
    add_generation_routes(app, studio)
    add_piece_routes(app, studio)
    return app


def add_guards(app, studio: Studio) -> None:
    """The Host and Origin checks before every route, and a `StudioError` as its status and reason."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def only_this_studio(request: Request, call_next):
        """Refuse a request addressed to another host (DNS rebinding) and a state-changing one from
        another origin (a foreign web page posting to the studio)."""
        refusal = foreign_request(request.method, request.headers.get("host"), request.headers.get("origin"),
                                  studio.allowed_hosts)
        if refusal is not None:
            LOG.warning("refused %s %s: %s", request.method, request.url.path, refusal[1])
            return JSONResponse({"detail": refusal[1]}, status_code=refusal[0])
        return await call_next(request)

    @app.exception_handler(StudioError)
    async def refused(_request: Request, error: StudioError):
        return JSONResponse({"detail": error.reason}, status_code=error.status)


def add_generation_routes(app, studio: Studio) -> None:
    """The page, the models, prompt uploads and the jobs."""
    from fastapi import File, UploadFile
    from fastapi.responses import HTMLResponse

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/api/models", summary="Trained models and the artists each can generate")
    def models():
        return studio.model_list()

    @app.post("/api/prompts", summary=f"Upload an audio prompt (at most {studio.max_upload_bytes} bytes: 413)",
              responses={400: {"description": "the upload is not audio"},
                         413: {"description": f"the upload is over {studio.max_upload_bytes} bytes"}})
    def upload_prompt(file: UploadFile = File(...)):
        blocks = iter(lambda: file.file.read(1 << 20), b"")  # counted while read: it stops at the limit
        return {"prompt_id": studio.store_prompt(blocks)}

    @app.post("/api/generate", status_code=202, summary="Queue a generation -> {job}",
              responses={404: {"description": "unknown model, artist or prompt"},
                         422: {"description": "a setting out of stage 5's range, or a job over this studio's "
                                              "limits of pieces or memory (the reason says which)"}})
    def generate(request: GenerateBody):
        return {"job": studio.submit(request.model_dump()).id}

    @app.get("/api/jobs/{job_id}", summary="A job's state, progress (0..1), frames/s, error and pieces")
    def job(job_id: str):
        return studio.job(job_id).as_dict()

    @app.delete("/api/jobs/{job_id}", summary="Cancel a queued or running job")
    def cancel(job_id: str):
        return studio.cancel(job_id).as_dict()


def add_piece_routes(app, studio: Studio) -> None:
    """The finished pieces: the list, each sidecar, its audio and its spectrogram."""
    from fastapi.responses import FileResponse

    @app.get("/api/pieces", summary="Every finished piece, newest first")
    def pieces():
        listed = [piece_summary(identifier, stem) for identifier, stem in studio.catalog.pieces().items()]
        return sorted(listed, key=lambda piece: piece["created"], reverse=True)

    @app.get("/api/pieces/{piece_id}", summary="A piece's sidecar JSON")
    def piece(piece_id: str):
        return json.loads(studio.catalog.piece(piece_id).with_suffix(".json").read_text())

    @app.get("/api/pieces/{piece_id}/audio", summary="A piece's WAV (48 kHz stereo)")
    def audio(piece_id: str):
        stem = studio.catalog.piece(piece_id)
        return FileResponse(stem.with_suffix(".wav"), media_type="audio/wav", filename=f"{stem.name}.wav")

    @app.get("/api/pieces/{piece_id}/spectrogram", summary="A piece's spectrogram (PNG)")
    def spectrogram(piece_id: str):
        return FileResponse(studio.catalog.piece(piece_id).with_suffix(".png"), media_type="image/png")
