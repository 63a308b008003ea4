"""Generation in reduced precision (`pipeline.precision`, stage 5's `--dtype`): the automatic choice,
bf16 and int8 against float32 on a tiny model that has learned something, cached against uncached
in each precision, float32 left as it was, and the sidecar's record."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import make_root, outputs
from pipeline import generation, precision
from pipeline.contract import PAD, load_token_file
from pipeline.lean_decoder import LeanDecoder, TracedStep
from pipeline.patterns import build_sequence
from pipeline.sampling import CollapseSettings, SamplingSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REDUCED = ["bfloat16", "int8"]
# the largest logit error allowed, as a share of the largest |logit| (measured on this model: bf16
# 0.005, int8 0.010; a transposed or unscaled weight gives errors of the order of 1)
LOGIT_TOLERANCE = {"bfloat16": 0.02, "int8": 0.04}
STATES = 16  # codes per codebook of the chain the model learns


# ---- the automatic choice ------------------------------------------------------------------------
@pytest.mark.parametrize("flags, has_int8, expected", [
    ({"amx_bf16", "amx_tile", "avx512_bf16"}, True, "bfloat16"),  # an AMX Xeon
    ({"avx512_bf16", "avx512_vnni"}, True, "int8"),  # AVX-512 BF16 without AMX: int8 measured faster
    ({"avx2", "fma"}, True, "int8"),  # no bf16 instructions
    ({"avx2"}, False, "float32"),  # a torch without the int8 kernels
    ({"amx_bf16"}, False, "bfloat16"),
])
def test_auto_on_a_cpu_follows_its_flags(flags, has_int8, expected):
    used, reason = precision.auto_cpu_precision(frozenset(flags), has_int8)
    assert used == expected and reason.startswith("auto on a CPU")


def test_choose_precision_on_each_device():
    bf16_cpu = frozenset({"amx_bf16"})
    assert precision.choose_precision("auto", "cpu", bf16_cpu).used == "bfloat16"
    assert precision.choose_precision("auto", "cuda", bf16_cpu).used == "float32"  # not measured on a GPU
    forced = precision.choose_precision("float32", "cpu", bf16_cpu)
    assert (forced.used, forced.reason) == ("float32", "asked for")
    assert precision.choose_precision("bfloat16", "cuda:0").describe()["kv_cache"] == "bfloat16"
    assert precision.choose_precision("bfloat16", "cpu").describe()["kv_cache"] == "float32"
    with pytest.raises(ValueError, match="CPU only"):
        precision.choose_precision("int8", "cuda")
    with pytest.raises(ValueError, match="not one of"):
        precision.choose_precision("float16", "cpu")
    with pytest.raises(ValueError, match="not one of"):
        generation.GenerationSettings(pattern="delay", precision="float16")


def test_cpu_flags_from_cpuinfo_else_from_torch(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert precision.cpu_flags(cpuinfo) == frozenset({"fpu", "avx2", "avx512_bf16"})
    monkeypatch.setattr(torch.cpu, "get_capabilities",
                        lambda: {"amx_bf16": True, "avx512_bf16": False, "num_sockets": 1}, raising=False)
    assert precision.cpu_flags(tmp_path / "missing") == frozenset({"amx_bf16"})


# ---- a tiny model that has learned a chain ----------------------------------------------------------
def chain_frames(batch: int, length: int, generator: torch.Generator, successor: torch.Tensor,
                 codes: torch.Tensor) -> torch.Tensor:
    """Frames `[B, L, Q]` of an order-1 chain per codebook: state s -> successor[q, s], coded as codes[q, s]."""
    state = torch.randint(0, STATES, (batch, codes.shape[0]), generator=generator)  # [B, Q]
    rows = []
    for _ in range(length):
        rows.append(codes.gather(1, state.T).T)  # [Q, S] at [Q, B] -> [B, Q]
        state = successor.gather(1, state.T).T  # [B, Q]
    return torch.stack(rows, dim=1)  # L x [B, Q] -> [B, L, Q]


@pytest.fixture(scope="module")
def chain_model(transformer_module):
    """(a `tiny` model trained for 100 steps on a chain, frames of that chain `[2, 40, Q]`): its top
    token leads by far more than reduced precision moves a logit, so greedy tokens are well defined."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    successor = torch.stack([torch.randperm(STATES, generator=generator) for _ in range(4)])  # [Q, S]
    codes = torch.stack([torch.randperm(1024, generator=generator)[:STATES] for _ in range(4)])  # [Q, S]
    model = transformer_module.MusicTransformer(transformer_module.model_args_for("tiny", 4, 40)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        inputs, targets = build_sequence(chain_frames(8, 24, generator, successor, codes), "delay")  # [B, S, Q] each
        logits, _ = model(inputs)  # [B, S, Q, V]
        loss = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 1.0  # learned (a uniform guess is 6.9)
    return model.eval(), chain_frames(2, 40, generator, successor, codes)


def lean_logits(model, inputs: torch.Tensor, prefill_rows: int = 5) -> torch.Tensor:
    """Logits `[B, S - prefill_rows + 1, Q, V]` (float32) of a prefill and one step per further row."""
    with torch.inference_mode():
        decoder = LeanDecoder(model, inputs.shape[0], inputs.shape[1] + 1)
        logits = [decoder.prefill(inputs[:, :prefill_rows])]
        logits += [decoder.step(inputs[:, row:row + 1]) for row in range(prefill_rows, inputs.shape[1])]
    return torch.stack(logits, dim=1).float()


def greedy(model, prompt: torch.Tensor, total: int, precision_name: str, use_cache: bool = True,
           cpu_trace: bool = True) -> torch.Tensor:
    settings = generation.GenerationSettings(pattern="delay", context_frames=36, stride_frames=18,
                                             use_cache=use_cache, precision=precision_name, cpu_trace=cpu_trace)
    frames, _ = generation.generate_frames(model, prompt, total, settings, SamplingSettings(temperature=0.0), None,
                                           0, "cpu")
    return frames  # [1, total, Q]


@pytest.mark.parametrize("name", REDUCED)
def test_reduced_precision_logits_stay_close_to_float32(chain_model, name):
    model, frames = chain_model
    inputs, _ = build_sequence(frames, "delay")  # [2, 43, Q]
    reference = lean_logits(model, inputs)
    reduced = lean_logits(precision.precision_model(model, name), inputs)
    error = float((reduced - reference).abs().max()) / float(reference.abs().max())
    assert 0.0 < error <= LOGIT_TOLERANCE[name]  # not float32 in disguise, and close to it
    assert float(reference.std()) > 0.5


@pytest.mark.parametrize("name", REDUCED)
def test_reduced_precision_gives_float32s_greedy_tokens(chain_model, name):
    model, frames = chain_model
    prompt = frames[:1, :6]  # [1, 6, Q]: six frames of the chain, then 54 generated across a window slide
    reference = greedy(model, prompt, 60, "float32")
    assert torch.equal(greedy(model, prompt, 60, name), reference)
    learned = chain_frames_continue(frames[:1], 60)
    assert torch.equal(reference, learned)  # the model plays the chain: its greedy tokens mean something


def chain_frames_continue(frames: torch.Tensor, total: int) -> torch.Tensor:
    """The chain `frames` `[1, L, Q]` continued to `total` frames (each codebook's successor read off the frames)."""
    successor = {}
    for q in range(frames.shape[2]):
        column = frames[0, :, q].tolist()
        successor[q] = dict(zip(column[:-1], column[1:]))
    rows = frames[0].tolist()
    while len(rows) < total:
        rows.append([successor[q][code] for q, code in enumerate(rows[-1])])
    return torch.tensor(rows[:total]).unsqueeze(0)  # [1, total, Q]


@pytest.mark.parametrize("name", REDUCED)
def test_cached_equals_uncached_in_each_precision(chain_model, name):
    """The lean engine against the copy's own full forward, in the same precision: close logits at every
    step, the same greedy tokens (int8 quantises a prefill's rows together, a step's alone: not exact)."""
    model, frames = chain_model
    reduced = precision.precision_model(model, name)
    inputs, _ = build_sequence(frames, "delay")
    with torch.inference_mode():
        full = reduced(inputs)[0][:, 4:].float()  # [B, S - 4, Q, V]
    error = float((lean_logits(reduced, inputs) - full).abs().max()) / float(full.abs().max())
    assert error <= 0.03
    prompt = frames[:1, :6]
    assert torch.equal(greedy(model, prompt, 44, name), greedy(model, prompt, 44, name, use_cache=False))


# ---- the copy in a precision -------------------------------------------------------------------------
def test_float32_is_the_model_itself_and_reduced_copies_follow_the_weights(chain_model):
    model, _ = chain_model
    assert precision.precision_model(model, "float32") is model
    steps = generation.LeanSteps(model, 1, 20, cuda_graph=False)
    assert steps.decoder.model is model and all(cache.dtype == torch.float32 for cache in steps.decoder.keys)
    assert not any(isinstance(module, precision.ReducedLinear) for module in model.modules())
    bf16 = precision.precision_model(model, "bfloat16")
    assert precision.precision_model(model, "bfloat16") is bf16  # made once
    kernels = [module for module in bf16.modules() if isinstance(module, precision.ReducedLinear)]
    assert len(kernels) == 4 * model.args.n_layer + 2  # QKV, attention out, MLP in and out; input projection, heads
    decoder = LeanDecoder(bf16, 1, 20)
    assert decoder.position_table.dtype == torch.bfloat16 and decoder.keys[0].dtype == torch.float32  # CPU: f32 cache
    with torch.no_grad():
        model.heads.bias.add_(1.0)
    try:
        assert precision.precision_model(model, "bfloat16") is not bf16  # weights changed: a new copy
    finally:
        with torch.no_grad():
            model.heads.bias.sub_(1.0)


def test_the_cpu_trace_serves_float32_and_int8_and_leaves_packed_bf16_eager(chain_model, caplog):
    """A trace cannot hold oneDNN's packed bf16 weights: that copy steps eagerly, without a warning; the others
    replay a trace, and their greedy tokens are the eager engine's."""
    model, frames = chain_model
    names = ["float32", "bfloat16"] + (["int8"] if precision.int8_available() else [])
    with caplog.at_level("WARNING"), torch.inference_mode():
        for name in names:
            steps = generation.LeanSteps(precision.precision_model(model, name), 1, 20, cuda_graph=False, cpu_trace=True)
            packed = name == "bfloat16" and precision.onednn_bf16_available()
            assert isinstance(steps.graphed, TracedStep) != packed, name
            assert precision.traceable(precision.precision_model(model, name)) != packed
    assert "tracing" not in caplog.text
    prompt = frames[:1, :6]
    for name in names:
        assert torch.equal(greedy(model, prompt, 44, name), greedy(model, prompt, 44, name, cpu_trace=False)), name


# ---- stage 5: float32 as before, the sidecar's record ------------------------------------------------
def test_dtype_float32_writes_the_tokens_of_the_plain_model(transformer_module, in_process, tmp_path):
    """`--dtype float32` generates with the checkpoint's own model, as every release before `--dtype auto`."""
    root = make_root(tmp_path, transformer_module, "delay")
    assert in_process(root, "--seconds", 1.2, "--seed", 4, "--threads", 1, "--dtype", "float32", "--name", "f32") == 0
    written = load_token_file(outputs(root, "f32")[".th"]).codes[:, :, :182]  # [1, Q, 182]
    checkpoint = torch.load(root / "model_results" / "demo" / "best.pt", weights_only=True)
    model = transformer_module.MusicTransformer(transformer_module.model_args_from(checkpoint["model_args"], "demo"))
    model.load_state_dict(checkpoint["model"])
    settings = generation.GenerationSettings(pattern="delay", context_frames=120, stride_frames=60)  # no precision
    frames, _ = generation.generate_frames(model.eval(), None, 182, settings, SamplingSettings(), CollapseSettings(),
                                           4, "cpu", threads=1)
    assert torch.equal(written.long(), frames.transpose(1, 2))  # [1, 182, Q] -> [1, Q, 182]
    sidecar = json.loads(outputs(root, "f32")[".json"].read_text())
    assert sidecar["precision"] == {"requested": "float32", "used": "float32", "kv_cache": "float32",
                                    "reason": "asked for"}


def test_the_sidecar_records_the_precision_auto_chose(transformer_module, in_process, tmp_path):
    root = make_root(tmp_path, transformer_module, "delay")
    assert in_process(root, "--seconds", 1.2, "--seed", 4, "--name", "auto") == 0
    assert in_process(root, "--seconds", 1.2, "--seed", 4, "--dtype", "bfloat16", "--name", "bf16") == 0
    auto = json.loads(outputs(root, "auto")[".json"].read_text())
    expected = precision.choose_precision("auto", "cpu")
    assert auto["parameters"]["dtype"] == "auto"
    assert auto["precision"] == {"requested": "auto", "used": expected.used, "kv_cache": "float32",
                                 "reason": expected.reason}
    bf16 = json.loads(outputs(root, "bf16")[".json"].read_text())["precision"]
    assert (bf16["requested"], bf16["used"], bf16["kv_cache"]) == ("bfloat16", "bfloat16", "float32")


def test_the_studio_uses_stage_5s_default():
    from pipeline.request import GenerationRequest
    from pipeline.studio import generation_request

    request = generation_request({"seconds": 2.0}, root=".", model="m", artist="a", blend=None, checkpoint=None,
                                 name="n", prompt=None)
    assert request.dtype == GenerationRequest().dtype == "auto"
