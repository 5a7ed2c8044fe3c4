"""TensorRT backend: the manifest checks run here on real TensorRT-RTX engines (no GPU needed);
running an engine needs a GPU TensorRT-RTX supports and is skipped elsewhere."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moec.common import contract
from moec.common.errors import MoecError

trt = pytest.importorskip("tensorrt_rtx")

from moec.compiler.build import BuildConfig, build_engine  # noqa: E402
from moec.runtime.trt_backend import (  # noqa: E402
    EngineProfile,
    HostTrt,
    TrtBackend,
    TrtKVCache,
    engine_profiles,
    load_manifest,
    max_prompt_tokens,
    parse_arch,
    select_engine,
    select_profile,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compiler"))
from test_build import write_moec_graph  # noqa: E402  (the same tiny moec graph the build tests use)

HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trt_backend")
    src = write_moec_graph(root / "src")
    out = root / "engines"
    build_engine(src, out, BuildConfig(archs=("sm89", "sm120"), progress=False))
    return out


@pytest.fixture
def host() -> HostTrt:
    return HostTrt(flavour="tensorrt-rtx", version=trt.__version__, arch="sm89")


def copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_matching_host_selects_its_arch(engine_dir, host):
    m = load_manifest(engine_dir)
    assert select_engine(m, engine_dir, host) == engine_dir / "engine.sm89.plan"
    assert select_engine(m, engine_dir, dataclasses.replace(host, arch="sm120")) == engine_dir / "engine.sm120.plan"


def test_tampered_engine_is_a_hash_mismatch(engine_dir, host, tmp_path):
    d = copy_dir(engine_dir, tmp_path / "e")
    blob = bytearray((d / "engine.sm89.plan").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (d / "engine.sm89.plan").write_bytes(bytes(blob))
    with pytest.raises(MoecError, match=r"engine.sm89.plan: sha256 .* does not match .* rebuild"):
        select_engine(load_manifest(d), d, host)
    # The untouched sm120 engine still verifies.
    select_engine(load_manifest(d), d, dataclasses.replace(host, arch="sm120"))


def test_other_arch_says_which_and_how_to_rebuild(engine_dir, host):
    with pytest.raises(MoecError, match=r"built for sm89, sm120, this GPU is sm86; .*--arch sm86 --builder trt-rtx"):
        select_engine(load_manifest(engine_dir), engine_dir, dataclasses.replace(host, arch="sm86"))


def test_other_version_or_flavour(engine_dir, host):
    m = load_manifest(engine_dir)
    with pytest.raises(MoecError, match=rf"built with tensorrt-rtx {trt.__version__}, this host has 1.99.0.1"):
        select_engine(m, engine_dir, dataclasses.replace(host, version="1.99.0.1"))
    with pytest.raises(MoecError, match=r"built with tensorrt-rtx .* this host runs tensorrt 10.16.0"):
        select_engine(m, engine_dir, HostTrt("tensorrt", "10.16.0", "sm90"))


def test_version_compatible_engine_accepts_newer_same_major(engine_dir, host):
    m = json.loads(json.dumps(load_manifest(engine_dir)))
    m["build_options"]["version_compatible"] = True
    major = trt.__version__.split(".")[0]
    select_engine(m, engine_dir, dataclasses.replace(host, version=f"{major}.99.0.0"))
    with pytest.raises(MoecError, match="same major version or newer"):
        select_engine(m, engine_dir, dataclasses.replace(host, version="0.1.0.0"))


def test_missing_plugin(engine_dir, host):
    m = json.loads(json.dumps(load_manifest(engine_dir)))
    m["plugins"] = [{"name": contract.PLUGIN_NAME, "version": contract.PLUGIN_VERSION, "namespace": contract.PLUGIN_NAMESPACE}]
    with pytest.raises(MoecError, match=rf"needs TensorRT plugin moec::{contract.PLUGIN_NAME} version 1.*--moe-lowering hybrid, the default, or dense"):
        select_engine(m, engine_dir, host)
    present = dataclasses.replace(host, plugins=frozenset({(contract.PLUGIN_NAME, contract.PLUGIN_VERSION, contract.PLUGIN_NAMESPACE)}))
    assert select_engine(m, engine_dir, present).name == "engine.sm89.plan"


def test_not_an_engine_dir(tmp_path, engine_dir):
    with pytest.raises(MoecError, match="not a moec engine directory"):
        load_manifest(tmp_path)
    d = copy_dir(engine_dir, tmp_path / "e")
    (d / "manifest.json").write_text("{broken")
    with pytest.raises(MoecError, match="not valid JSON"):
        load_manifest(d)


def test_parse_arch():
    assert parse_arch("sm89") == (8, 9) and parse_arch("sm120") == (12, 0) and parse_arch("sm_75") == (7, 5)
    assert parse_arch("SM100") == (10, 0)


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-host refusal")
def test_from_engine_dir_without_gpu_refuses_clearly(engine_dir):
    with pytest.raises(MoecError, match="no CUDA GPU is visible"):
        TrtBackend.from_engine_dir(engine_dir)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_engine_matches_onnx_runtime_on_gpu(tmp_path):
    """Greedy tokens from the engine equal ONNX Runtime's on the same graph (GPU hosts only)."""
    from moec.runtime.generate import GenerationConfig, generate
    from moec.runtime.ort_backend import OrtBackend
    from moec.runtime.trt_backend import local_gpu_arch

    arch = local_gpu_arch()
    if arch not in [n.lower() for n in trt.ComputeCapability.__members__]:
        pytest.skip(f"TensorRT-RTX cannot target this GPU ({arch})")
    src = write_moec_graph(tmp_path / "src")
    build_engine(src, tmp_path / "e", BuildConfig(archs=(arch,), progress=False))
    be = TrtBackend.from_engine_dir(tmp_path / "e")
    prompt = np.array([[3, 5, 7, 2]], dtype=np.int64)
    cfg = GenerationConfig(max_new_tokens=6, stop_on_eos=False)
    got = generate(be, prompt, cfg)
    ref = generate(OrtBackend.from_onnx(src), prompt, cfg)
    assert got.new_tokens == ref.new_tokens


class _OrtAsTrtContext:
    """Stands in for a TensorRT execution context on the CPU: takes the same profile, shape and
    address calls TrtBackend makes, reads the inputs from those (host) addresses, runs the graph
    with ONNX Runtime and writes the outputs to the bound addresses. It checks the backend's
    profile selection, binding and KV-cache bookkeeping, not TensorRT.

    Profiles behave as TensorRT documents them: a new context runs profile 0; the active one
    changes only through set_optimization_profile_async; set_input_shape refuses (returns False)
    a shape outside the active profile's [min, max], and so does the enqueue if any input shape
    is outside it. ``profiles`` are (min, max) per input, by default the manifest's."""

    def __init__(self, onnx_path: Path, profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.shapes, self.addresses = {}, {}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.steps = 0
        self.profiles = profiles
        self.active_optimization_profile = 0
        self.switches: list[tuple[int, int]] = []  # (profile index, stream) per switch
        self.step_profiles: list[int] = []  # the active profile at each enqueue

    def set_optimization_profile_async(self, index, stream):
        if not 0 <= index < len(self.profiles):
            return False
        self.active_optimization_profile = index
        self.switches.append((index, stream))
        return True

    def _fits(self, name, shape) -> bool:
        lo, hi = self.profiles[self.active_optimization_profile][name]
        return len(shape) == len(lo) and all(a <= d <= b for d, a, b in zip(shape, lo, hi))

    def set_input_shape(self, name, shape):
        if not self._fits(name, tuple(shape)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    @staticmethod
    def _wrap(address, shape, dtype):
        import ctypes

        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n == 0:
            return np.empty(shape, dtype)
        return np.frombuffer((ctypes.c_byte * n).from_address(address), dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream):
        if not all(self._fits(i.name, self.shapes[i.name]) for i in self.session.get_inputs()):
            return False
        self.step_profiles.append(self.active_optimization_profile)
        feeds = {}
        for i in self.session.get_inputs():
            dtype = np.int64 if "int64" in i.type else np.float32
            feeds[i.name] = self._wrap(self.addresses[i.name], self.shapes[i.name], dtype).copy()
        for name, value in zip(self.outputs, self.session.run(self.outputs, feeds)):
            self._wrap(self.addresses[name], value.shape, value.dtype)[...] = value
        self.steps += 1
        return True


class _Engine:
    def __init__(self, manifest):
        io = manifest["io"]["inputs"] + manifest["io"]["outputs"]
        self.names = [t["name"] for t in io]
        self.dtypes = {t["name"]: "DataType." + {"int64": "INT64", "float": "FLOAT"}[t["dtype"]] for t in io}
        self.num_io_tensors = len(io)
        self.num_optimization_profiles = len(manifest["profiles"])

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]


class _HostStream:
    cuda_stream = 7  # any handle: the stand-in records which stream a profile switch was issued on

    def synchronize(self):
        pass


def cpu_backend(engine_dir: Path, onnx_path: Path, context_profiles=None) -> TrtBackend:
    manifest = load_manifest(engine_dir)
    profiles = context_profiles or [p.ranges for p in engine_profiles(manifest)]
    return TrtBackend(engine_dir, manifest, _Engine(manifest), _OrtAsTrtContext(onnx_path, profiles), torch.device("cpu"),
                      _HostStream(), manifest["trt"]["flavour"], manifest["trt"]["version"])


@pytest.fixture(scope="module")
def demo_optimized(demo_onnx, tmp_path_factory) -> Path:
    """The demo export optimized as `moec compile` does for TensorRT-RTX sm89 (default lowering)."""
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    out = tmp_path_factory.mktemp("demo_opt") / "model.onnx"
    optimize_onnx(demo_onnx, out, OptimizeConfig(target="trt-rtx:sm89"))
    return out


PREFILL, DECODE = 0, 1


@pytest.mark.parametrize("model", ["tiny", "demo", "demo-optimized"])
def test_binding_and_kv_cache_match_onnx_runtime(model, engine_dir, request, tmp_path):
    """TrtBackend's per-step profile selection, shapes, addresses and ping-pong KV buffers, driven
    by the shared generation loop, give ONNX Runtime's exact tokens: the prefill runs on the
    prefill profile (a new context's profile 0), then one switch to decode, on the backend's
    stream, for every decode step."""
    from moec.runtime.generate import GenerationConfig, generate
    from moec.runtime.ort_backend import OrtBackend

    if model == "tiny":
        src, engines = engine_dir.parent / "src" / "model.onnx", engine_dir
    else:
        src = request.getfixturevalue("demo_onnx" if model == "demo" else "demo_optimized")
        engines = tmp_path / "e"
        build_engine(src, engines, BuildConfig(archs=("sm89",), max_batch=2, max_new_tokens=8, max_past=24, progress=False))
    be = cpu_backend(engines, src)
    assert [p.name for p in be.profiles] == ["prefill", "decode"]
    prompt = np.array([[3, 5, 7, 2, 9], [4, 4, 1, 8, 6]], dtype=np.int64)
    cfg = GenerationConfig(max_new_tokens=7, stop_on_eos=False)
    got = generate(be, prompt, cfg)
    ref = generate(OrtBackend.from_onnx(src), prompt, cfg)
    assert got.new_tokens == ref.new_tokens
    assert be.context.steps == 7  # one prefill + 6 decode steps
    assert be.context.step_profiles == [PREFILL] + [DECODE] * 6
    assert be.context.switches == [(DECODE, _HostStream.cuda_stream)]  # switched once, on the stream
    # A fresh cache prefills again: back to the prefill profile, one more switch.
    logits_trt, cache = be.forward(prompt, np.tile(np.arange(5), (2, 1)), be.init_cache(2))
    assert be.context.switches[-1] == (PREFILL, _HostStream.cuda_stream) and len(be.context.switches) == 2
    ort_be = OrtBackend.from_onnx(src)
    logits_ort, _ = ort_be.forward(prompt, np.tile(np.arange(5), (2, 1)), ort_be.init_cache(2))
    np.testing.assert_array_equal(logits_trt, logits_ort)
    assert cache.past_len == 5 and be.describe()["trt_flavour"] == "tensorrt-rtx"


def test_one_token_prompt_prefills_on_the_prefill_profile(engine_dir):
    """S == 1 with no past is a prefill (decode's past starts at 1); the next step is decode."""
    from moec.runtime.generate import GenerationConfig, generate

    be = cpu_backend(engine_dir, engine_dir.parent / "src" / "model.onnx")
    generate(be, [[3]], GenerationConfig(max_new_tokens=3, stop_on_eos=False))
    assert be.context.step_profiles == [PREFILL, DECODE, DECODE]


def test_decode_runs_to_the_last_position(engine_dir):
    """The decode profile's past reaches max_positions - 1 (63 here), beyond what the prefill
    profile's box allows (32), so generation can fill the whole context."""
    from moec.runtime.generate import GenerationConfig, generate

    be = cpu_backend(engine_dir, engine_dir.parent / "src" / "model.onnx")
    assert be.max_positions == 64
    res = generate(be, [list(range(2, 12))], GenerationConfig(max_new_tokens=100, stop_on_eos=False))
    assert len(res.new_tokens[0]) == 54 and res.finish_reasons == ["max_positions"]
    assert be.context.step_profiles == [PREFILL] + [DECODE] * 53


def test_shapes_outside_every_profile_are_clear_errors(engine_dir):
    be = cpu_backend(engine_dir, engine_dir.parent / "src" / "model.onnx")
    with pytest.raises(MoecError, match="exceeds the engine's profile max batch 2"):
        be.init_cache(3)
    too_long = np.zeros((1, 33), dtype=np.int64)
    with pytest.raises(MoecError) as e:
        be.forward(too_long, too_long, be.init_cache(1))
    msg = str(e.value)
    assert "fit no optimization profile" in msg
    assert "profile prefill (#0): input_ids [1, 33] is outside min [1, 1] max [2, 32]" in msg
    assert "profile decode (#1): input_ids [1, 33] is outside min [1, 1] max [2, 1]" in msg
    # A past longer than decode's range (63): the error names the past tensor and both ranges.
    cache = be.init_cache(1)
    views = {name: bufs[0][: 2 * 64 * 4].view(1, 2, 64, 4) for name, bufs in cache.buffers.items()}
    one = np.zeros((1, 1), dtype=np.int64)
    with pytest.raises(MoecError) as e:
        be.forward(one, one + 64, TrtKVCache(cache.buffers, views, 1, 64))
    msg = str(e.value)
    assert "profile prefill (#0): past_key.0 [1, 2, 64, 4] is outside min [1, 2, 0, 4] max [2, 2, 32, 4]" in msg
    assert "profile decode (#1): past_key.0 [1, 2, 64, 4] is outside min [1, 2, 1, 4] max [2, 2, 63, 4]" in msg
    assert be.context.steps == 0 and be.context.switches == []  # nothing reached the context
    with pytest.raises(MoecError, match="position_ids shape"):
        be.forward(one, np.zeros((1, 2), dtype=np.int64), be.init_cache(1))


def test_context_refusing_a_shape_names_the_profile(engine_dir):
    """Where the engine's real profile is narrower than the manifest says (a manifest that does
    not belong to the engine), TensorRT's refusal is a MoecError, not a crash."""
    manifest_ranges = [p.ranges for p in engine_profiles(load_manifest(engine_dir))]
    narrow = [dict(r) for r in manifest_ranges]
    narrow[0]["input_ids"] = ((1, 1), (2, 4))
    be = cpu_backend(engine_dir, engine_dir.parent / "src" / "model.onnx", context_profiles=narrow)
    ids = np.zeros((1, 8), dtype=np.int64)
    with pytest.raises(MoecError, match=r"TensorRT refused input input_ids shape \[1, 8\] in profile prefill \(#0\)"):
        be.forward(ids, ids, be.init_cache(1))


def test_manifest_with_other_profiles_than_the_engine_is_refused(engine_dir):
    manifest = load_manifest(engine_dir)
    engine = _Engine(manifest)
    engine.num_optimization_profiles = 1
    context = _OrtAsTrtContext(engine_dir.parent / "src" / "model.onnx", [p.ranges for p in engine_profiles(manifest)])
    with pytest.raises(MoecError, match="engine holds 1 optimization profile.*the manifest lists 2"):
        TrtBackend(engine_dir, manifest, engine, context, torch.device("cpu"), _HostStream(), "tensorrt-rtx", trt.__version__)


def test_single_custom_profile_never_switches(tmp_path):
    """--shapes without a profile prefix builds one profile; every step runs on it."""
    from moec.runtime.generate import GenerationConfig, generate

    src = write_moec_graph(tmp_path / "src")
    build_engine(src, tmp_path / "e", BuildConfig(archs=("sm89",), shapes=("input_ids:1x1,1x1,1x16",), progress=False))
    be = cpu_backend(tmp_path / "e", src)
    assert [(p.name, p.index) for p in be.profiles] == [("custom", 0)]
    generate(be, [[3, 5, 7]], GenerationConfig(max_new_tokens=4, stop_on_eos=False))
    assert be.context.step_profiles == [0] * 4 and be.context.switches == []


def _profile(name, index, new, past):
    return EngineProfile(name, index, {"input_ids": ((1, new[0]), (4, new[1])), "past_key.0": ((1, 2, past[0], 4), (4, 2, past[1], 4))})


def test_select_profile_prefers_decode_for_one_token_steps():
    # Overlapping profiles (a custom prefill that also covers past > 0): S == 1 takes decode
    # wherever it fits, S > 1 the first that fits, and neither fits -> both reasons named.
    prefill, decode = _profile("prefill", 0, (1, 64), (0, 32)), _profile("decode", 1, (1, 1), (1, 63))
    both = [prefill, decode]
    shapes = lambda s, p: {"input_ids": (1, s), "past_key.0": (1, 2, p, 4)}  # noqa: E731
    assert select_profile(both, shapes(1, 5)) is decode
    assert select_profile(both, shapes(1, 0)) is prefill  # decode needs a past
    assert select_profile(both, shapes(8, 5)) is prefill
    assert select_profile(both, shapes(1, 40)) is decode
    with pytest.raises(MoecError, match=r"e/engine: .*profile prefill \(#0\): past_key.0 \[1, 2, 40, 4\].*profile decode \(#1\): input_ids \[1, 2\]"):
        select_profile(both, shapes(2, 40), "e/engine")


def test_old_manifest_format_is_refused(engine_dir, tmp_path):
    d = copy_dir(engine_dir, tmp_path / "e")
    m = json.loads((d / "manifest.json").read_text())
    m["format"] = "moec.engine/1"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MoecError, match="expected 'moec.engine/2'; rebuild"):
        load_manifest(d)


def test_tensorrt_validity_diagnostics_are_named():
    from moec.runtime.trt_backend import _check_validity

    class Runtime:
        def __init__(self, answer):
            self.answer = answer

        def get_engine_validity(self, blob):
            return self.answer

    flags = trt.EngineInvalidityDiagnostics
    bad = Runtime((trt.EngineValidity.INVALID, int(flags.UNSUPPORTED_CC) | int(flags.OLD_CUDA_DRIVER)))
    with pytest.raises(MoecError, match=r"cannot run here \(unsupported_cc, old_cuda_driver\)"):
        _check_validity(trt, bad, b"", Path("engine.sm89.plan"))
    _check_validity(trt, Runtime((trt.EngineValidity.VALID, 0)), b"", Path("engine.sm89.plan"))
    _check_validity(trt, Runtime((trt.EngineValidity.SUBOPTIMAL, 0)), b"", Path("engine.sm89.plan"))


def test_long_prompt_is_prefilled_in_chunks_on_the_prefill_profile(engine_dir):
    """The tiny engine's prefill profile takes 32 new tokens (half of 64 positions): a 50-token
    prompt goes in as 32 + 18 on the prefill profile, and matches ONNX Runtime's one-step prefill."""
    from moec.runtime.generate import GenerationConfig, generate
    from moec.runtime.ort_backend import OrtBackend

    src = engine_dir.parent / "src" / "model.onnx"
    be = cpu_backend(engine_dir, src)
    assert be.max_new_tokens_per_step == 32
    prompt = np.random.default_rng(0).integers(0, 16, size=(1, 50))
    cfg = GenerationConfig(max_new_tokens=4, stop_on_eos=False)
    got = generate(be, prompt, cfg)
    assert got.new_tokens == generate(OrtBackend.from_onnx(src), prompt, cfg).new_tokens
    assert be.context.step_profiles == [PREFILL, PREFILL, DECODE, DECODE, DECODE]
    assert max_prompt_tokens(be.profiles, 64) == 63


def test_max_prompt_tokens_follows_the_profiles():
    def prof(name, index, new, past):
        return EngineProfile(name, index, {contract.INPUT_IDS: ((1, new[0]), (2, new[1])),
                                           "past_key.0": ((1, 2, past[0], 4), (2, 2, past[1], 4))})

    # Demo defaults: 512 positions, prefill 1..256 new with past 0..256: 256 + 255 (one position left).
    assert max_prompt_tokens([prof("prefill", 0, (1, 256), (0, 256)), prof("decode", 1, (1, 1), (1, 511))], 512) == 511
    # A prefill profile with no room for a past: one chunk, then one last token on the decode profile.
    assert max_prompt_tokens([prof("prefill", 0, (1, 100), (0, 0)), prof("decode", 1, (1, 1), (1, 511))], 512) == 101
    # Chunks of 200 at past 0 and 200 fit (past <= 312); at 400 only decode's single token does.
    assert max_prompt_tokens([prof("prefill", 0, (1, 200), (0, 312)), prof("decode", 1, (1, 1), (1, 511))], 512) == 401
    assert max_prompt_tokens([prof("prefill", 0, (1, 200), (0, 312))], 512) == 400


@pytest.mark.parametrize("edit, message", [
    ("tamper", r"engine.sm89.plan: sha256 .* does not match"),
    ("archs", r"engine.sm89.plan: the engine header says archs sm89 \(manifest: sm80\)"),
    ("version", r"the engine header says tensorrt-rtx version .* \(manifest: 1.5.0\)"),
    ("manifest_archs", r"manifest.json: archs sm80, sm89 but its engines target sm120, sm89"),
])
def test_from_engine_dir_checks_integrity_before_the_gpu(engine_dir, tmp_path, edit, message):
    """No GPU here: a tampered or mismatched directory is reported as such, not as "no CUDA GPU"."""
    d = copy_dir(engine_dir, tmp_path / "e")
    m = json.loads((d / "manifest.json").read_text())
    if edit == "tamper":
        blob = bytearray((d / "engine.sm89.plan").read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        (d / "engine.sm89.plan").write_bytes(bytes(blob))
    elif edit == "archs":
        m["engines"][0]["archs"] = ["sm80"]
    elif edit == "version":
        m["trt"]["version"] = "1.5.0"
    else:
        m["archs"] = ["sm80", "sm89"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MoecError, match=message):
        TrtBackend.from_engine_dir(d)
