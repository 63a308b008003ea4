"""The studio's HTTP API (FastAPI's test client) on a tiny checkpoint and the random codec."""
from __future__ import annotations

import io
import re
import threading
import time

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from helpers import ARTIST, make_root, sine_tone, wait_for  # noqa: E402
from pipeline import pieces  # noqa: E402
from pipeline.request import GenerationRequest  # noqa: E402
from pipeline.studio import Studio, create_app, served_hosts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TEST_HOST = "testserver"  # the Host header of FastAPI's test client


@pytest.fixture
def studio(random_codec, transformer_module, monkeypatch, tmp_path):
    """A studio over a root holding one tiny model (`demo`), loading codecs as the session's random one."""
    loads = []

    def load_codec(spec, device="cpu"):
        loads.append(spec)
        return random_codec

    monkeypatch.setattr(pieces, "load_codec", load_codec)
    running = Studio(make_root(tmp_path, transformer_module, "delay"), max_upload_bytes=200_000,
                     allowed_hosts=(TEST_HOST,))
    running.codec_loads = loads
    yield running
    running.close()


@pytest.fixture
def client(studio):
    with TestClient(create_app(studio)) as test_client:
        yield test_client


def generate(client, **settings) -> str:
    response = client.post("/api/generate", json={"artist": ARTIST, **settings})
    assert response.status_code == 202, response.text
    return response.json()["job"]


def final_files(studio) -> list[str]:
    folder = studio.root / "music_transformer" / ARTIST
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith(".")) if folder.is_dir() else []


def test_models_list_the_checkpoint_and_its_untrained_codec(client):
    models = client.get("/api/models").json()
    assert models == [{"name": ARTIST, "artists": [ARTIST], "joint": False, "checkpoint": "best.pt",
                       "loaded": False, "codec": "random:0", "codec_untrained": True}]


def test_a_blend_needs_a_model_of_several_artists(client, studio):
    response = client.post("/api/generate", json={"model": ARTIST, "blend": {ARTIST: 1.0}})
    assert response.status_code == 422 and "a blend needs a model trained on several" in response.json()["detail"]
    assert final_files(studio) == []


def test_generate_polls_to_done_and_serves_the_pieces_stage5_wrote(client, studio):
    job = generate(client, seconds=1.0, seed=5, num_samples=2, top_k=50)
    status = wait_for(client, job)
    assert status["state"] == "done", status
    assert status["progress"] == 1.0 and status["frames_per_second"] > 0 and status["error"] is None
    assert "UNTRAINED" in status["warning"]
    assert len(status["pieces"]) == 2
    for piece in status["pieces"]:
        audio = client.get(f"/api/pieces/{piece}/audio")
        assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
        wave, rate = sf.read(io.BytesIO(audio.content))
        assert rate == 48_000 and wave.shape == (48_000, 2)  # stereo, the asked second
        sidecar = client.get(f"/api/pieces/{piece}").json()
        assert sidecar["seed"] == 5 and sidecar["parameters"]["top_k"] == 50
        assert sidecar["parameters"]["temperature"] == 1.0  # omitted: stage 5's default
        spectrogram = client.get(f"/api/pieces/{piece}/spectrogram")
        assert spectrogram.headers["content-type"] == "image/png" and spectrogram.content[:4] == b"\x89PNG"
    names = final_files(studio)  # stage 5's folder and names: <name>_<i>.{json,png,th,wav}
    stem = status["pieces"][0].split(":", 1)[1][:-2]
    assert names == sorted(f"{stem}_{i}{suffix}" for i in (0, 1) for suffix in (".json", ".png", ".th", ".wav"))
    listed = client.get("/api/pieces").json()
    assert sorted(piece["id"] for piece in listed) == sorted(status["pieces"])
    assert listed[0]["audio"] == f"/api/pieces/{listed[0]['id']}/audio"


def test_one_model_in_memory_reused_by_the_next_job(client, studio):
    first = wait_for(client, generate(client, seconds=0.5, seed=1))
    model = studio.models[ARTIST]
    second = wait_for(client, generate(client, seconds=0.5, seed=1))
    assert first["state"] == second["state"] == "done"
    assert studio.models[ARTIST] is model and len(studio.codec_loads) == 1  # loaded once
    assert client.get("/api/models").json()[0]["loaded"] is True
    audio = [client.get(f"/api/pieces/{job['pieces'][0]}/audio").content for job in (first, second)]
    assert audio[0] == audio[1]  # same seed, same model in memory: the same piece


def test_pieces_written_by_the_command_line_are_listed(client, studio, in_process):
    assert in_process(studio.root, "--seconds", 0.5, "--seed", 2, "--name", "from_cli") == 0
    listed = client.get("/api/pieces").json()
    assert [piece["id"] for piece in listed] == [f"{ARTIST}:from_cli"]
    assert client.get(f"/api/pieces/{ARTIST}:from_cli/audio").status_code == 200


def test_cancel_mid_run_leaves_no_file_under_a_final_name(client, studio):
    job = generate(client, seconds=60.0, seed=1)
    wait_for(client, job, states=("running",))
    deadline = time.monotonic() + 60
    while client.get(f"/api/jobs/{job}").json()["progress"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = client.delete(f"/api/jobs/{job}")
    assert cancelled.status_code == 200
    status = wait_for(client, job)
    assert status["state"] == "cancelled" and 0 < status["progress"] < 1 and status["pieces"] == []
    assert final_files(studio) == []
    assert not [thread for thread in threading.enumerate() if thread.name == "stage5-decoder"]  # closed, not leaked
    assert client.get("/api/pieces").json() == []
    after = wait_for(client, generate(client, seconds=0.5))  # the worker goes on with the next job
    assert after["state"] == "done"


def test_a_queued_job_cancelled_never_runs(client, studio):
    running = generate(client, seconds=60.0, seed=1)
    queued = generate(client, seconds=0.5, seed=1)
    assert client.get(f"/api/jobs/{queued}").json()["state"] == "queued"  # one generation at a time
    assert client.delete(f"/api/jobs/{queued}").json()["state"] == "cancelled"
    client.delete(f"/api/jobs/{running}")
    assert wait_for(client, running)["state"] == "cancelled"
    assert wait_for(client, queued)["state"] == "cancelled" and final_files(studio) == []


def test_an_audio_prompt_is_uploaded_and_continued(client):
    upload = io.BytesIO()
    sf.write(upload, sine_tone(1.0, rate=44_100), 44_100, format="WAV")
    response = client.post("/api/prompts", files={"file": ("../../etc/passwd", upload.getvalue(), "audio/wav")})
    assert response.status_code == 200, response.text
    prompt = response.json()["prompt_id"]
    status = wait_for(client, generate(client, seconds=1.0, seed=1, prompt_id=prompt, prompt_seconds=0.5))
    assert status["state"] == "done", status
    sidecar = client.get(f"/api/pieces/{status['pieces'][0]}").json()
    assert sidecar["prompt"]["kind"] == "audio" and 0 < sidecar["prompt"]["frames"] <= 75


def test_a_job_stage5_refuses_fails_with_its_reason_and_writes_nothing(client, studio):
    upload = io.BytesIO()
    sf.write(upload, sine_tone(1.0), 48_000, format="WAV")
    prompt = client.post("/api/prompts", files={"file": ("riff.wav", upload.getvalue(), "audio/wav")}).json()
    status = wait_for(client, generate(client, seconds=0.5, **prompt))  # the prompt is longer than the piece
    assert status["state"] == "failed" and "nothing to generate" in status["error"]
    assert status["pieces"] == [] and final_files(studio) == []
    assert wait_for(client, generate(client, seconds=0.5))["state"] == "done"  # the worker goes on


@pytest.mark.parametrize("settings, status, reason", [
    ({"model": "nobody"}, 404, "no model"),
    ({"artist": "nobody"}, 404, "no model"),
    ({"model": ARTIST, "artist": "someone"}, 404, "no artist"),
    ({"model": "../model_results"}, 404, "not one"),
    ({"temperature": -1}, 422, "temperature"),
    ({"top_p": 0}, 422, "top_p: 0.0 must be > 0.0"),
    ({"top_p": 1.5}, 422, "top_p"),
    ({"top_k": -3}, 422, "top_k"),
    ({"repetition_penalty": 0.5}, 422, "repetition_penalty"),
    ({"num_samples": 0}, 422, "num_samples"),
    ({"seconds": 0}, 422, "seconds"),
    ({"seed": -1}, 422, "seed: -1 must be >= 0"),
    ({"seconds": 601}, 422, "over this studio's limit of 600 s"),
    ({"seconds": "long"}, 422, "seconds"),
    ({"checkpoint": "/etc/passwd"}, 422, "checkpoint"),  # only the documented fields
    ({"prompt_id": "0123456789abcdef"}, 404, "no prompt"),
])
def test_bad_settings_are_refused_and_change_nothing(client, studio, settings, status, reason):
    response = client.post("/api/generate", json={"artist": ARTIST, **settings})
    assert response.status_code == status, response.text
    assert reason in str(response.json()["detail"])
    assert studio.jobs == {} and final_files(studio) == []


def test_a_request_without_model_or_artist_is_refused(client):
    response = client.post("/api/generate", json={})
    assert response.status_code == 422 and "model or an artist" in response.json()["detail"]


def test_uploads_that_are_not_audio_or_too_large_are_refused(client, studio):
    not_audio = client.post("/api/prompts", files={"file": ("song.wav", b"this is not audio" * 10, "audio/wav")})
    assert not_audio.status_code == 400 and "not audio" in not_audio.json()["detail"]
    too_large = client.post("/api/prompts", files={"file": ("big.wav", b"\0" * 200_001, "audio/wav")})
    assert too_large.status_code == 413 and "200000 bytes" in too_large.json()["detail"]
    assert studio.prompts == {} and list(studio.prompt_folder.iterdir()) == []


@pytest.mark.parametrize("path", [
    f"/api/pieces/{ARTIST}:nothing", f"/api/pieces/{ARTIST}:nothing/audio", f"/api/pieces/{ARTIST}:x/spectrogram",
    "/api/pieces/..", "/api/pieces/..%2F..%2Fmodel_results%2Fdemo%2Fbest", "/api/pieces/demo:..%5Cbest/audio",
    "/api/jobs/nothing", "/api/jobs/..",
])
def test_ids_that_are_not_one_get_404(client, path):
    assert client.get(path).status_code == 404


def test_the_page_and_the_openapi_document(client):
    page = client.get("/")
    assert page.status_code == 200 and "Generate" in page.text and "<script>" in page.text
    assert not re.search(r'(src|href)="(https?:)?//', page.text)  # works offline: nothing fetched from elsewhere
    defaults = GenerationRequest()
    for option in ("seconds", "temperature", "top_k", "top_p", "repetition_penalty", "num_samples"):
        shown = re.search(rf'id="{option}"[^>]*value="([^"]+)"', page.text, re.S)
        assert shown and float(shown.group(1)) == getattr(defaults, option), option  # the page shows stage 5's
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/models", "/api/prompts", "/api/generate", "/api/jobs/{job_id}", "/api/pieces",
            "/api/pieces/{piece_id}", "/api/pieces/{piece_id}/audio",
            "/api/pieces/{piece_id}/spectrogram"} <= set(paths)
    assert "413" in paths["/api/prompts"]["post"]["responses"]  # the upload limit is documented


def test_a_length_between_chunks_is_kept_to_the_sample(client):
    """Lengths that are not whole codec chunks keep their samples exactly."""
    status = wait_for(client, generate(client, seconds=1.3, seed=0))
    wave, rate = sf.read(io.BytesIO(client.get(f"/api/pieces/{status['pieces'][0]}/audio").content))
    assert wave.shape == (62_400, 2) and np.abs(wave).max() > 0


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                          ("0.0.0.0", True), ("192.168.1.5", True)])
def test_binding_beyond_loopback_warns(host, warned, monkeypatch, tmp_path, caplog):
    import importlib.util

    import uvicorn

    from conftest import SCRIPTS

    spec = importlib.util.spec_from_file_location("studio_cli", SCRIPTS / "studio.py")
    studio_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(studio_cli)
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: served.append((host, port)))
    monkeypatch.setattr(studio_cli, "setup_logging", lambda *args: None)
    with caplog.at_level("WARNING", logger="pipeline.studio"):
        assert studio_cli.main(["--root", str(tmp_path), "--host", host, "--port", "8123"]) == 0
    assert served == [(host, 8123)]
    assert ("not loopback" in caplog.text) is warned


# ---- who may ask, and how much -------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""])
def test_a_foreign_host_header_is_refused(client, studio, host):
    """DNS rebinding: a web page whose name resolves to 127.0.0.1 reaches the studio with its own Host."""
    for method, path in (("GET", "/api/models"), ("GET", "/"), ("POST", "/api/generate")):
        response = client.request(method, path, headers={"Host": host}, json={"artist": ARTIST})
        assert response.status_code == 403, (method, path, response.text)
        assert "is not this studio's address" in response.json()["detail"]
    assert studio.jobs == {}


def test_only_the_served_address_is_answered(studio):
    hosts = served_hosts("127.0.0.1", 8123)
    assert hosts == ["127.0.0.1:8123", "localhost:8123", "[::1]:8123"]
    assert "studio.lan:8123" in served_hosts("studio.lan", 8123) and "[::1]" in served_hosts("::1", 0)
    served = Studio(studio.root, allowed_hosts=hosts)
    try:
        with TestClient(create_app(served), base_url="http://localhost:8123") as local:
            assert local.get("/api/models").status_code == 200
            assert local.get("/api/models", headers={"Host": "[::1]:8123"}).status_code == 200
            assert local.get("/api/models", headers={"Host": "localhost:8000"}).status_code == 403  # another port
            assert local.get("/api/models", headers={"Host": TEST_HOST}).status_code == 403
    finally:
        served.close()


@pytest.mark.parametrize("origin", ["http://evil.example", "http://127.0.0.1.evil.example", "null",
                                    "http://localhost:9999"])
def test_a_state_changing_request_from_a_foreign_origin_is_refused(client, studio, origin):
    response = client.post("/api/generate", json={"artist": ARTIST, "seconds": 0.5}, headers={"Origin": origin})
    assert response.status_code == 403 and "not this studio's page" in response.json()["detail"]
    assert studio.jobs == {}
    upload = client.post("/api/prompts", files={"file": ("a.wav", b"RIFF", "audio/wav")}, headers={"Origin": origin})
    assert upload.status_code == 403 and studio.prompts == {}
    assert client.get("/api/models", headers={"Origin": origin}).status_code == 200  # reading changes nothing


def test_the_studios_own_page_may_post_and_cancel(client, studio):
    own = {"Origin": f"http://{TEST_HOST}"}
    response = client.post("/api/generate", json={"artist": ARTIST, "seconds": 60.0, "seed": 1}, headers=own)
    assert response.status_code == 202, response.text
    job = response.json()["job"]
    refused = client.delete(f"/api/jobs/{job}", headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403 and client.get(f"/api/jobs/{job}").json()["state"] in ("queued", "running")
    assert client.delete(f"/api/jobs/{job}", headers=own).status_code == 200
    assert wait_for(client, job)["state"] == "cancelled"


def test_an_oversized_job_is_refused_with_the_limit(client, studio):
    response = client.post("/api/generate", json={"artist": ARTIST, "num_samples": 100_000})
    assert response.status_code == 422
    assert "100000 pieces is over this studio's limit of 32 pieces per job" in response.json()["detail"]
    assert studio.jobs == {}


def test_a_job_over_the_memory_limit_is_refused_with_the_limit(studio):
    small = Studio(studio.root, max_job_bytes=50 * 2**20, allowed_hosts=(TEST_HOST,))
    try:
        with TestClient(create_app(small)) as client:
            response = client.post("/api/generate", json={"artist": ARTIST, "num_samples": 8, "seconds": 300})
            assert response.status_code == 422
            detail = response.json()["detail"]
            assert "8 pieces of 300 s need about" in detail and "over this studio's limit of 50 MiB per job" in detail
            assert small.jobs == {}
            assert client.post("/api/generate", json={"artist": ARTIST, "seconds": 0.5}).status_code == 202
    finally:
        small.close()


def test_the_memory_estimate_counts_generations_weight_copies(monkeypatch):
    """A reduced-precision copy (half a float32 word a weight at most) unless float32, and the `[out, in]`
    copies a CPU step of 2-3 rows uses (a guided piece, two pieces), on top of the float32 model."""
    from pipeline import request
    from pipeline.request import GenerationRequest, estimated_job_bytes

    args = {"d_model": 256, "n_layer": 4, "n_head": 4, "n_codebooks": 4, "n_positions": 304, "n_artists": 2}
    contract = {"context_frames": 300, "pattern": "delay"}
    blocks = 12 * 4 * 256 ** 2  # the Conv1D weights
    weights = blocks + 256 * 4 * 1026 + 304 * 256

    def estimate(**fields):
        return estimated_job_bytes(GenerationRequest(seconds=1.0, **fields), args, contract)

    assert estimate(dtype="auto", cfg_coef=1.0) - estimate(dtype="float32", cfg_coef=1.0) == 4 * (weights // 2)
    with_copies = {rows: estimate(dtype="float32", **fields) for rows, fields in
                   ((1, {"cfg_coef": 1.0}), (2, {"cfg_coef": 3.0}), (3, {"cfg_coef": 1.0, "num_samples": 3}),
                    (4, {"cfg_coef": 3.0, "num_samples": 2}))}
    monkeypatch.setattr(request, "ROW_MAJOR_ROWS", ())
    for rows, fields in ((1, {"cfg_coef": 1.0}), (2, {"cfg_coef": 3.0}), (3, {"cfg_coef": 1.0, "num_samples": 3}),
                         (4, {"cfg_coef": 3.0, "num_samples": 2})):
        copies = 4 * blocks if rows in (2, 3) else 0
        assert with_copies[rows] - estimate(dtype="float32", **fields) == copies, rows


def index_training_tokens(studio) -> None:
    """model_results/demo/training_index.npz over one random training clip."""
    from pipeline.originality import TrainingIndex
    from pipeline.runs import TRAINING_INDEX as INDEX_FILE

    clip = np.random.default_rng(3).integers(0, 1024, size=(600, 4))
    TrainingIndex.build([clip], ["encoded_tokens/demo/song_0.th"]).save(studio.root / "model_results" / ARTIST /
                                                                        INDEX_FILE)


def test_max_copy_seconds_needs_the_models_training_index(client, studio):
    response = client.post("/api/generate", json={"artist": ARTIST, "max_copy_seconds": 0.5})
    assert response.status_code == 422 and "max_copy_seconds" in response.json()["detail"]
    assert "pipeline.originality --model" in response.json()["detail"]
    assert client.post("/api/generate", json={"artist": ARTIST, "max_copy_seconds": -1}).status_code == 422
    assert studio.jobs == {}


def test_a_loop_with_a_copy_limit_shows_its_figures_beside_the_piece(client, studio):
    index_training_tokens(studio)
    status = wait_for(client, generate(client, seconds=1.0, seed=3, loop=True, max_copy_seconds=5))
    assert status["state"] == "done", status
    piece = status["pieces"][0]
    sidecar = client.get(f"/api/pieces/{piece}").json()
    assert sidecar["parameters"]["loop"] is True and sidecar["parameters"]["max_copy_seconds"] == 5.0
    assert sidecar["originality"]["max_copy_seconds"] == 5.0 and sidecar["originality"]["warning"] is None
    loop = sidecar["loop"]
    assert loop["start_sample"] == 0 and loop["end_sample"] + 1 == sidecar["audio_samples"]
    wave, _ = sf.read(io.BytesIO(client.get(f"/api/pieces/{piece}/audio").content))
    assert wave.shape == (sidecar["audio_samples"], 2)
    listed = {entry["id"]: entry for entry in client.get("/api/pieces").json()}[piece]
    assert listed["originality"] == {"longest_copy_seconds": 0.0, "training_file": None, "training_seconds": None,
                                     "piece_seconds": None, "copied_share": 0.0, "warning": None}
    assert listed["loop"] == loop and listed["originality_reason"] is None
    page = client.get("/").text
    assert re.search(r'id="loop"[^>]*type="checkbox"', page) and 'id="max_copy_seconds"' in page
