"""Benchmark a compiled artifact through the shared generation loop.

Each repeat runs one ``generate`` call (prefill of ``prompt_len`` tokens, then ``gen_len`` decode
steps, EOS ignored so every repeat does the same work) on any backend, so the numbers measure
exactly the path ``moec run`` takes. Results carry the per-repeat values of every metric: the
gate (``moec.compiler.gate``) derives its noise band from them.

Result JSON (``BENCH_FORMAT``)::

    {"format", "moec_version", "created_at",
     "artifact": {"path", "kind", "sha256", "identity": artifact_identity()},
     "backend": backend.describe(),            # device and software versions
     "host": host_identity(),                  # machine, CPU model, cores, host name
     "config": {prompt_len, gen_len, batch, repeats, warmup, seed, threads},
     "metrics": {name: {"unit", "better": "lower"|"higher", "median", "p50",
                        "p90", "p99" (latency, "lower") | "p10", "p1" (throughput, "higher"),
                        "repeats": [one value per repeat], "population": what the numbers are over}}}

Latency percentiles are over every sample (all decode steps of all repeats; one prefill per
repeat); each throughput is ``tokens * 1000 / latency`` at the same percentile, so tokens/s and
ms/step always agree and the tail of every metric (p90/p99 of a latency, p10/p1 of a throughput)
is its pessimistic side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moec.common import contract, progress
from moec.common.artifacts import sha256_file
from moec.common.errors import MoecError
from moec.runtime.backend import Backend

# 2: every metric from one population (named in "population"); throughputs are their latency's
# inverse at the same percentile, with the slow tail as p10/p1.
# 3: the artifact's identity (model config, dtype, lowering, tokenizer), the host and the thread
# count are recorded, so the gate can refuse to compare unlike results; paired results
# (``moec bench NEW --against OLD``, ``moec.runtime.bench_paired``) share the format.
BENCH_FORMAT = "moec.bench/3"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    prompt_len: int = 32
    gen_len: int = 32
    batch: int = 1
    repeats: int = 5
    warmup: int = 1  # untimed repeats first: allocator, kernel selection and caches warm up
    seed: int = 0
    # Intra-op threads of ONNX Runtime and torch; None: the backend's default (resolved_threads).
    threads: int | None = None
    rank_timeout_s: float | None = None  # partition folders: process-group timeout; None: LaunchConfig's

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise MoecError(f"bench threads must be >= 1, got {self.threads}")
        for name in ("prompt_len", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise MoecError(f"bench {name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gen_len < 2:
            raise MoecError(f"bench gen-len must be >= 2, got {self.gen_len}: the first new token comes from the "
                            "prefill, so decode steps are timed from the second on")
        if self.warmup < 0:
            raise MoecError(f"bench warmup must be >= 0, got {self.warmup}")


def artifact_kind(path: Path) -> str:
    if path.is_dir() and (path / contract.ENGINE_MANIFEST).is_file():
        return "trt"
    if path.is_file() and path.suffix == ".onnx":
        return "ort"
    raise MoecError(f"{path} is neither an .onnx file nor an engine directory with {contract.ENGINE_MANIFEST}: "
                    "bench an artifact of `moec export`/`moec optimize` or `moec build`")


def artifact_sha256(path: Path) -> str:
    """One digest for the artifact: the .onnx (with its external data) or the engine directory's
    manifest, which itself pins every engine file's sha256."""
    if path.is_dir():
        return sha256_file(path / contract.ENGINE_MANIFEST)
    return source_hashes(path)["sha256"]


def onnx_files(onnx_path: Path) -> list[Path]:
    """The .onnx file and every external-data file it references (each checked to lie inside the
    model's folder: moec.common.onnx_files)."""
    from moec.common.onnx_files import external_data_needs

    files = {onnx_path}
    for f in external_data_needs(onnx_path):
        if not f.is_file():
            raise MoecError(f"{onnx_path}: external data file {f} is missing; copy it beside the model")
        files.add(f)
    return sorted(files)


def artifact_files(path: Path) -> list[Path]:
    """Every file the artifact consists of or reads: the .onnx, its external data, sidecar and
    tokenizer; or an engine directory's manifest, engines, sidecar and tokenizer."""
    if path.is_dir():
        files = [path / contract.ENGINE_MANIFEST]
        with contextlib.suppress(MoecError, OSError, ValueError, KeyError, TypeError):
            manifest = json.loads((path / contract.ENGINE_MANIFEST).read_text())
            files += [path / e["file"] for e in manifest.get("engines", [])]
            files += [path / manifest[k] for k in ("sidecar", "tokenizer") if manifest.get(k)]
        return files
    files = [path, contract.sidecar_path(path), path.parent / contract.TOKENIZER_FILE]
    with contextlib.suppress(MoecError, OSError, ValueError):
        files += onnx_files(path)
    return files


def check_result_path(out: str | Path, artifact: str | Path) -> None:
    """Refuse to write a bench result over the artifact or any file of it (before any timing)."""
    out, artifact = Path(out), Path(artifact)
    target = out.resolve()
    if target == artifact.resolve():
        raise MoecError(f"--json-out {out} is the benched artifact itself: write the result to another file, e.g. bench.json")
    for f in artifact_files(artifact):
        same = f.resolve() == target or (out.exists() and f.exists() and os.path.samefile(f, out))
        if same:
            raise MoecError(f"--json-out {out} is {f.name}, a file of the benched artifact {artifact}: "
                            "write the result to another file, e.g. bench.json")


def source_hashes(onnx_path: Path) -> dict[str, Any]:
    """sha256 of an ONNX artifact including its external data: per file, and one over all of them."""
    files = {f.name: sha256_file(f) for f in onnx_files(Path(onnx_path))}
    combined = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()
    return {"file": Path(onnx_path).name, "sha256": combined, "files": files}


def resolved_threads(threads: int | None) -> int:
    """The intra-op thread count a run uses: ``threads``, else what OrtBackend picks by default
    (OMP_NUM_THREADS, else every core), so results say what they ran with."""
    if threads is not None:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)


def host_identity() -> dict[str, Any]:
    """The machine a result was measured on. ``name`` is informational (CI runners of one pool
    have different names); machine, CPU model and core count decide comparability."""
    import platform

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"name": platform.node(), "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count() or 0}


def _sidecar_of(path: Path) -> dict[str, Any]:
    from moec.common.sidecar import read_sidecar, read_sidecar_file

    if path.is_dir():
        manifest = json.loads((path / contract.ENGINE_MANIFEST).read_text())
        name = manifest.get("sidecar") if isinstance(manifest, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise MoecError(f"{path}: the manifest names no sidecar file; rebuild the engine with `moec build`")
        return read_sidecar_file(path / name)
    return read_sidecar(path)


def artifact_identity(path: str | Path) -> dict[str, Any]:
    """What the measured artifact is, beyond its bytes: the model (a digest of its configuration,
    and of its tokenizer when it has one), the dtype, the precision, the MoE lowering and target of
    `moec optimize`. Two results with different identities measured different models."""
    path = Path(path)
    side = _sidecar_of(path)
    config_json = json.dumps(side["model_config"], sort_keys=True, separators=(",", ":"))
    return {
        "model_config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "tokenizer_sha256": str(side.get("tokenizer_sha256") or "none"),
        "num_layers": int(side["num_layers"]),
        "vocab_size": int(side["vocab_size"]),
        "dtype": str(side.get("dtype", "fp32")),
        "precision": str(side.get("precision", side.get("dtype", "fp32"))),
        "lowering": str(side.get("moe_lowering", "none")),
        "target": str(side.get("target", "none")),
    }


def open_backend(path: Path, backend: str | None = None, threads: int | None = None) -> Backend:
    kind = artifact_kind(path)
    backend = backend or kind
    if backend != kind:
        raise MoecError(f"{path} is a {kind} artifact; --backend {backend} needs "
                        f"{'an engine directory' if backend == 'trt' else 'an .onnx file'}")
    if threads is not None and (backend == "trt" or "torch" in sys.modules):
        # torch's CPU ops (the TensorRT backend's host-side work) follow the same count; an ONNX
        # Runtime bench does not import torch for it (seconds of start-up on a loaded host).
        import torch

        torch.set_num_threads(threads)
    if backend == "trt":
        from moec.runtime.trt_backend import TrtBackend

        return TrtBackend.from_engine_dir(path)
    from moec.runtime.ort_backend import OrtBackend

    return OrtBackend.from_onnx(path, intra_op_threads=threads)


# Percentile keys: latency metrics give the slow tail as p90/p99 of the time; throughput metrics,
# derived from those same times, give the slow tail as p10/p1 (the throughput of a p90/p99 step),
# so the tail of every metric is its pessimistic side.
LATENCY_KEYS = ("p50", "p90", "p99")
THROUGHPUT_KEYS = ("p50", "p10", "p1")


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"median": float(p50), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def latency_metric(samples_ms: list[float], per_repeat_ms: list[float], population: str) -> dict[str, Any]:
    """Percentiles over ``samples_ms``; ``repeats`` (one value per repeat, the median of that
    repeat's samples) feed the gate's noise band."""
    return {"unit": "ms", "better": "lower", **percentiles(samples_ms), "repeats": per_repeat_ms,
            "population": population}


def throughput_metric(latency: dict[str, Any], tokens_per_sample: int, of: str) -> dict[str, Any]:
    """Tokens/s derived from a latency metric at the same percentile (tokens * 1000 / ms), so the
    two never disagree; the slow tail is p10/p1 = the throughput of a p90/p99 sample."""
    def rate(ms: float) -> float:
        return tokens_per_sample * 1e3 / ms if ms > 0 else 0.0

    return {"unit": "tokens/s", "better": "higher", "median": rate(latency["median"]), "p50": rate(latency["p50"]),
            "p10": rate(latency["p90"]), "p1": rate(latency["p99"]),
            "repeats": [rate(v) for v in latency["repeats"]],
            "population": f"{tokens_per_sample} tokens * 1000 / {of} at the same percentile (p10 from its p90, p1 from its p99)"}


def run_bench(backend: Backend, config: BenchConfig) -> dict[str, dict[str, Any]]:
    """Time ``config.repeats`` generate calls on ``backend``; return the metrics block.

    Every metric comes from one population, named in its "population" field: decode latency from
    all decode steps of all repeats, prefill latency from one prefill per repeat; each throughput
    is its latency's inverse at the same percentile."""
    from moec.runtime.generate import GenerationConfig, generate

    if config.prompt_len + config.gen_len > backend.max_positions:
        raise MoecError(f"prompt-len {config.prompt_len} + gen-len {config.gen_len} exceed the artifact's "
                        f"{backend.max_positions} positions: lower them")
    rng = np.random.default_rng(config.seed)
    vocab_hi = 100  # small ids exist in every vocabulary
    prompt = rng.integers(0, vocab_hi, size=(config.batch, config.prompt_len), dtype=np.int64)
    gen = GenerationConfig(max_new_tokens=config.gen_len, stop_on_eos=False)
    prefill_ms, step_ms, step_median_ms = [], [], []
    for i in range(config.warmup + config.repeats):
        progress.step(f"warm-up {i + 1} of {config.warmup}" if i < config.warmup
                      else f"repeat {i - config.warmup + 1} of {config.repeats}")
        result = generate(backend, prompt, gen)
        if i < config.warmup:
            continue
        steps = [s * 1e3 for s in result.decode_step_s]
        prefill_ms.append(result.prefill_s * 1e3)
        step_ms.extend(steps)
        step_median_ms.append(float(np.median(steps)) if steps else 0.0)
    decode = latency_metric(step_ms, step_median_ms,
                            f"every decode step of every repeat ({len(step_ms)} steps); repeats: each repeat's median step")
    prefill = latency_metric(prefill_ms, prefill_ms, f"one prefill of {config.prompt_len} tokens per repeat ({len(prefill_ms)})")
    return {
        "prefill_ms": prefill,
        "decode_ms_per_step": decode,
        "decode_tokens_per_s": throughput_metric(decode, config.batch, "decode_ms_per_step"),
        "prefill_tokens_per_s": throughput_metric(prefill, config.batch * config.prompt_len, "prefill_ms"),
    }


def bench_artifact(path: str | Path, config: BenchConfig = BenchConfig(), backend: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise MoecError(f"{path} does not exist: bench an .onnx file or an engine directory")
    if (path / contract.PARALLEL_MANIFEST).is_file():  # a partition folder: every rank benched at once
        return _bench_ranks(path, config, backend)
    be = open_backend(path, backend, config.threads)
    metrics = run_bench(be, config)
    if path.is_file():
        from moec.runtime.vision import time_vision_encoder

        vision_ms = time_vision_encoder(path, config.repeats, config.warmup, config.threads)
    elif isinstance(getattr(be, "manifest", None), dict) and be.manifest.get("vision") is not None:
        from moec.runtime.trt_vision import TrtVisionEncoder
        from moec.runtime.vision import time_encoder

        # An engine folder built with a vision graph: its vision engine, through the same encode as ort's.
        vision_ms = time_encoder(TrtVisionEncoder.from_engine_dir(path), config.repeats, config.warmup)
    else:
        vision_ms = None
    if vision_ms is not None:  # an export with --vision: the encoder runs once per image, before prefill
        metrics["vision_encoder_ms"] = latency_metric(vision_ms, vision_ms, f"one encode of one image at the "
                                                      f"largest tile grid per repeat ({len(vision_ms)})")
    return result_header(path, be, config) | {"metrics": metrics}


def artifact_record(path: Path) -> dict[str, Any]:
    return {"path": str(path), "kind": artifact_kind(path), "sha256": artifact_sha256(path),
            "identity": artifact_identity(path)}


def result_header(path: Path, be: Backend, config: BenchConfig) -> dict[str, Any]:
    """Everything of a result but its measurements: format, versions, the artifact and its
    identity, the backend, the host and the settings (threads resolved to a number)."""
    return _header(artifact_record(path), be.describe(), config)


def _header(artifact: dict[str, Any], backend: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    try:
        moec_version = importlib.metadata.version("moec")
    except importlib.metadata.PackageNotFoundError:
        moec_version = "unknown"
    return {
        "format": BENCH_FORMAT,
        "moec_version": moec_version,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "artifact": artifact,
        "backend": {k: str(v) for k, v in backend.items()},
        "host": host_identity(),
        # rank_timeout_s is how long ranks wait for a silent peer, not a setting of the measurement:
        # left out, so it never makes two results incomparable.
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "rank_timeout_s"}
        | {"threads": resolved_threads(config.threads)},
    }


def _bench_ranks(path: Path, config: BenchConfig, backend: str | None) -> dict[str, Any]:
    """A partition folder (moec optimize --tp/--ep): its ranks on ONNX Runtime, rank 0's timings."""
    from moec.runtime.parallel.launch import LaunchConfig, bench_parallel

    if backend not in (None, "ort"):
        raise MoecError(f"{path} is a partition folder; its ranks run on ONNX Runtime (--backend ort)")
    launch = LaunchConfig.with_timeout(config.rank_timeout_s)
    out = bench_parallel(path, config, launch)
    artifact = {"path": str(path), "kind": "ort-parallel", "sha256": sha256_file(path / contract.PARALLEL_MANIFEST),
                "identity": artifact_identity(path / contract.rank_onnx(0))}
    return _header(artifact, out["describe"], config) | {"metrics": out["metrics"], "collective_s": out["collective_s"]}
