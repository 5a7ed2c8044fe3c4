"""Engine folders without an engine run: the manifest format, TensorRT flavours, GPU archs and engine
headers, which engine and which optimization profile serve a host and a shape. Needs no GPU and no
TensorRT, so the build, ``moec inspect`` and the runtime check folders the same way everywhere."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any

from moec.common import contract
from moec.common.artifacts import sha256_file
from moec.common.errors import MoecError
from moec.common.manifest_json import read_manifest_json
from moec.runtime.manifest_schema import validate_manifest

# 2: "profiles" became a list of named profiles ({"name", "index", "shapes"}), prefill and decode.
MANIFEST_FORMAT = "moec.engine/2"


# --- TensorRT flavours ---------------------------------------------------------------------------
# "tensorrt" is full TensorRT (data-center and embedded GPUs, builds need the target GPU);
# "tensorrt-rtx" is TensorRT for RTX (builds ahead of time on a CPU for a list of compute
# capabilities, runs on consumer/workstation GPUs).
FLAVOUR_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


FLAVOUR_PREFERENCE = ("tensorrt", "tensorrt-rtx")


FLAVOUR_INSTALL_HINT = {
    "tensorrt": "install full TensorRT on a GPU host (pip install 'moec[tensorrt]')",
    "tensorrt-rtx": "pip install 'moec[trt-rtx]'",
}


@dataclasses.dataclass(frozen=True)
class TrtFlavour:
    name: str  # "tensorrt" | "tensorrt-rtx"
    trt: Any  # the imported module
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"


def import_trt(flavour: str | None = None) -> TrtFlavour:
    """Import the TensorRT module for ``flavour``; with None, whichever imports (full TensorRT first)."""
    if flavour is not None and flavour not in FLAVOUR_MODULES:
        raise MoecError(f"unknown TensorRT backend {flavour!r}: use one of {', '.join(FLAVOUR_MODULES)}")
    candidates = [flavour] if flavour else list(FLAVOUR_PREFERENCE)
    reasons = []
    for name in candidates:
        try:
            module = importlib.import_module(FLAVOUR_MODULES[name])
        except ImportError as e:
            reasons.append(f"{FLAVOUR_MODULES[name]}: {e}")
            continue
        return TrtFlavour(name=name, trt=module, version=str(module.__version__))
    hints = "; or ".join(FLAVOUR_INSTALL_HINT[n] for n in candidates)
    raise MoecError(f"TensorRT is not importable ({'; '.join(reasons)}): {hints}")


# --- GPU architecture names ----------------------------------------------------------------------
_ARCH_RE = re.compile(r"^sm_?(\d+)(\d)$")


def parse_arch(name: str) -> tuple[int, int]:
    """'sm89' -> (8, 9); 'sm120' -> (12, 0). The last digit is the minor version, as in nvcc's names."""
    m = _ARCH_RE.match(name.strip().lower())
    if not m:
        raise MoecError(f"unknown GPU arch {name!r}: write it like sm75, sm80, sm86, sm89, sm90, sm100, sm120")
    return int(m.group(1)), int(m.group(2))


def arch_name(major: int, minor: int) -> str:
    return f"sm{major}{minor}"


def local_gpu_arch() -> str | None:
    """The arch of CUDA device 0, or None on a host without a usable GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return arch_name(*torch.cuda.get_device_capability(0))


# --- Serialized engine header ----------------------------------------------------------------------
# Why hand-decoded: TensorRT-RTX cannot deserialize an engine without a GPU (cudaError 35 here), and
# IRuntime.get_engine_validity needs one too, so on a CPU the header is the only view of an engine
# besides its manifest. The layout below is what TensorRT-RTX 1.7 writes (observed, not documented):
# magic at 0, the library version as 4 bytes (major, minor, patch, build) at 0x18, and a bit mask of
# the compute capabilities the engine targets at 0x20 (bits checked for sm80, sm86, sm89, sm120,
# sm121; sm75 is bit 0 by their order). Anything else is reported as unknown, never guessed.
_RTX_CC_BITS = ["sm75", "sm80", "sm86", "sm89", "sm120", "sm121"]


def read_engine_header(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(64)
    magic = head[:4].decode("ascii", errors="replace")
    info: dict[str, Any] = {"magic": magic, "bytes": Path(path).stat().st_size}
    if magic == "vtrt" and len(head) >= 0x24:
        info["flavour"] = "tensorrt-rtx"
        info["version"] = ".".join(str(b) for b in head[0x18:0x1C])
        mask = int.from_bytes(head[0x20:0x24], "little")
        info["archs"] = [a for i, a in enumerate(_RTX_CC_BITS) if mask >> i & 1]
        if mask >> len(_RTX_CC_BITS):
            info["unknown_arch_bits"] = hex(mask >> len(_RTX_CC_BITS) << len(_RTX_CC_BITS))
    else:
        info["flavour"] = "tensorrt" if magic == "ftrt" else "unknown"
        info["note"] = "header layout not decoded for this flavour; see the manifest"
    return info


# --- Manifest verification (runs without a GPU) --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HostTrt:
    """What this machine offers an engine: TensorRT flavour/version, GPU arch, registered plugins."""

    flavour: str
    version: str
    arch: str | None
    plugins: frozenset[tuple[str, str, str]] = frozenset()  # (name, version, namespace)

    @classmethod
    def detect(cls, flavour: TrtFlavour) -> HostTrt:
        registry = flavour.trt.get_plugin_registry()
        plugins = frozenset(
            (c.name, str(c.plugin_version), c.plugin_namespace) for c in registry.all_creators if c is not None
        )
        return cls(flavour=flavour.name, version=flavour.version, arch=local_gpu_arch(), plugins=plugins)


def load_manifest(engine_dir: str | Path) -> dict[str, Any]:
    engine_dir = Path(engine_dir)
    path = engine_dir / contract.ENGINE_MANIFEST
    fix = "rebuild the engine directory with `moec build`"
    manifest = read_manifest_json(
        path, fix=fix, format=MANIFEST_FORMAT,
        missing=f"{engine_dir} is not a moec engine directory (no {contract.ENGINE_MANIFEST}): build one with `moec build`",
    )
    return validate_manifest(manifest, path)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def _rebuild_hint(manifest: dict[str, Any], host: HostTrt) -> str:
    arch = host.arch or "<your GPU's arch>"
    return f"rebuild on this host: moec build {manifest['source_onnx']['file']} -o DIR --arch {arch} --builder {'trt-rtx' if host.flavour == 'tensorrt-rtx' else 'trt'}"


def select_engine(manifest: dict[str, Any], engine_dir: str | Path, host: HostTrt, check_integrity: bool = True) -> Path:
    """Check ``manifest`` against ``host``; return the engine file to deserialize.

    Every refusal is a MoecError naming the mismatch and the rebuild that fixes it. The checks run
    in the order a user can act on: flavour, version, arch, plugins, then the file's integrity.
    """
    engine_dir = Path(engine_dir)
    built = manifest["trt"]
    if built["flavour"] != host.flavour:
        raise MoecError(
            f"{engine_dir}: engine built with {built['flavour']} {built['version']}, but this host runs "
            f"{host.flavour} {host.version}; {_rebuild_hint(manifest, host)}"
        )
    if built["version"] != host.version:
        vc = manifest.get("build_options", {}).get("version_compatible", False)
        b, h = _version_tuple(built["version"]), _version_tuple(host.version)
        if not (vc and b[:1] == h[:1] and h >= b):
            raise MoecError(
                f"{engine_dir}: engine built with {built['flavour']} {built['version']}, this host has "
                f"{host.version} (engines only run on the exact version unless built with --version-compatible, "
                f"and then only on the same major version or newer); {_rebuild_hint(manifest, host)}"
            )
    if host.arch is None:
        raise MoecError(f"{engine_dir}: no CUDA GPU is visible on this host; TensorRT engines need one")
    engine = _engine_for_arch(manifest, host.arch)
    if engine is None:
        built_for = ", ".join(manifest["archs"])
        raise MoecError(
            f"{engine_dir}: engines were built for {built_for}, this GPU is {host.arch}; {_rebuild_hint(manifest, host)}"
        )
    for plugin in manifest.get("plugins", []):
        key = (plugin["name"], str(plugin["version"]), plugin["namespace"])
        if key not in host.plugins:
            raise MoecError(
                f"{engine_dir}: engine needs TensorRT plugin {key[2]}::{key[0]} version {key[1]}, which is not "
                f"registered in {host.flavour} here: import moec.runtime.trt_plugin on a host where it loads, or "
                f"rebuild the graph with a lowering that needs no plugin (moec optimize --moe-lowering hybrid, the default, or dense)"
            )
    path = engine_dir / engine["file"]
    if check_integrity:
        check_engine_files(manifest, engine_dir, [engine])
    return path


def engine_problems(manifest: dict[str, Any], engine_dir: str | Path, entry: dict[str, Any]) -> list[str]:
    """What is wrong with one engine file of ``manifest`` (missing, sha256 mismatch, a header that
    disagrees with the manifest on flavour, version or archs), each with what to do; needs no GPU."""
    path = Path(engine_dir) / entry["file"]
    if not path.is_file():
        return [f"{path} is missing: the engine directory is incomplete; rebuild it with `moec build`"]
    if path.stat().st_size == 0:
        return [f"{path} is empty (0 bytes), not an engine: rebuild the engine directory with `moec build`"]
    problems = []
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        problems.append(f"{path}: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}... "
                        "(file modified or corrupted); rebuild the engine directory with `moec build`")
    header, built = read_engine_header(path), manifest["trt"]
    said = []
    if header.get("flavour") in FLAVOUR_MODULES and header["flavour"] != built["flavour"]:
        said.append(f"flavour {header['flavour']} (manifest: {built['flavour']})")
    if "version" in header and header["version"] != built["version"]:
        said.append(f"{header.get('flavour')} version {header['version']} (manifest: {built['version']})")
    if "archs" in header and sorted(header["archs"]) != sorted(entry["archs"]):
        said.append(f"archs {', '.join(header['archs']) or 'none'} (manifest: {', '.join(entry['archs'])})")
    if said:
        problems.append(f"{path}: the engine header says {'; '.join(said)}: the manifest does not describe this "
                        "engine; rebuild the engine directory with `moec build`")
    return problems


def manifest_problems(manifest: dict[str, Any], engine_dir: str | Path) -> list[str]:
    """Disagreements inside the manifest: its archs against its engines' archs."""
    listed = sorted(manifest.get("archs", []))
    built = sorted({a for e in manifest["engines"] for a in e["archs"]})
    if listed != built:
        return [f"{Path(engine_dir) / contract.ENGINE_MANIFEST}: archs {', '.join(listed)} but its engines target "
                f"{', '.join(built)}: the manifest was edited; rebuild the engine directory with `moec build`"]
    return []


def check_engine_files(manifest: dict[str, Any], engine_dir: str | Path, entries: list[dict[str, Any]] | None = None) -> None:
    """Raise on the first problem of the given engines (default: all) or of the manifest itself."""
    for entry in manifest["engines"] if entries is None else entries:
        problems = engine_problems(manifest, engine_dir, entry)
        if problems:
            raise MoecError(problems[0])
    problems = manifest_problems(manifest, engine_dir)
    if problems:
        raise MoecError(problems[0])


def _engine_for_arch(manifest: dict[str, Any], arch: str) -> dict[str, Any] | None:
    for engine in manifest["engines"]:
        if arch in engine["archs"]:
            return engine
    if manifest.get("build_options", {}).get("hardware_compat") == "ampere+" and parse_arch(arch) >= (8, 0):
        return manifest["engines"][0]
    return None


# --- Optimization profiles (selection runs without a GPU) -----------------------------------------
@dataclasses.dataclass(frozen=True)
class EngineProfile:
    """One optimization profile as the manifest records it: TensorRT's index and each input's
    (min, max) shape."""

    name: str
    index: int
    ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]

    def misfit(self, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """Why ``shapes`` do not fit this profile (the first tensor outside it), or None."""
        for name, shape in shapes.items():
            lo, hi = self.ranges.get(name, (shape, shape))
            if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi)):
                return f"{name} {list(shape)} is outside min {list(lo)} max {list(hi)}"
        return None


def engine_profiles(manifest: dict[str, Any]) -> list[EngineProfile]:
    profiles = [EngineProfile(p["name"], int(p["index"]),
                              {n: (tuple(r["min"]), tuple(r["max"])) for n, r in p["shapes"].items()})
                for p in manifest["profiles"]]
    if not profiles:
        raise MoecError("the engine manifest lists no optimization profile: rebuild the engine directory with `moec build`")
    return profiles


def select_profile(profiles: list[EngineProfile], shapes: dict[str, tuple[int, ...]], where: str = "engine") -> EngineProfile:
    """The profile whose ranges hold every input shape of this step: the decode profile for a
    one-token step when it fits, else the first that fits in TensorRT's index order (prefill
    before decode). A step no profile holds is an error naming each profile's reason."""
    fits = [p for p in profiles if p.misfit(shapes) is None]
    if not fits:
        reasons = "; ".join(f"profile {p.name} (#{p.index}): {p.misfit(shapes)}" for p in profiles)
        raise MoecError(
            f"{where}: this step's inputs fit no optimization profile of the engine: {reasons}. Shorten the "
            f"prompt or generation, or rebuild with larger --max-new-tokens / --max-past / --max-batch (or --shapes)"
        )
    if shapes.get(contract.INPUT_IDS, (0, 0))[1] == 1:
        for p in fits:
            if p.name == "decode":
                return p
    return fits[0]


def ring_inputs(manifest: dict[str, Any]) -> frozenset[str]:
    """Past inputs of chunked layers' ring caches: a fixed slot axis in the engine's I/O shapes
    (a full cache's is dynamic, -1). Their size does not follow the past length."""
    return frozenset(t["name"] for t in manifest.get("io", {}).get("inputs", [])
                     if t["name"].startswith(("past_key.", "past_value.")) and len(t["shape"]) == 4 and t["shape"][2] >= 0)


def max_prompt_tokens(profiles: list[EngineProfile], max_positions: int, batch: int = 1,
                      rings: frozenset[str] = frozenset()) -> int:
    """The longest prompt the generation loop can prefill on these profiles and still generate a
    token (so at most ``max_positions - 1``), feeding it in chunks of the largest new-token count
    any profile takes (``TrtBackend.max_new_tokens_per_step``): each chunk, at the past the
    earlier chunks left, must fit some profile."""
    chunk = max(p.ranges[contract.INPUT_IDS][1][1] for p in profiles)
    limit = max_positions - 1
    done = 0
    while done < limit:
        room = 0
        for p in profiles:
            (b_lo, n_lo), (b_hi, n_hi) = p.ranges[contract.INPUT_IDS]
            pasts = [(lo[2], hi[2]) for name, (lo, hi) in p.ranges.items()
                     if name.startswith(("past_key.", "past_value.")) and name not in rings]
            p_lo, p_hi = (max(lo for lo, _ in pasts), min(hi for _, hi in pasts)) if pasts else (0, max_positions)
            if b_lo <= batch <= b_hi and p_lo <= done <= p_hi:
                n = min(chunk, n_hi, limit - done)
                if n >= n_lo:
                    room = max(room, n)
        if room == 0:
            break
        done += room
        if room < chunk:  # a shorter chunk ends the prompt: a longer one would not fit here
            break
    return done


def manifest_io_shape(manifest: dict[str, Any], name: str) -> list[int]:
    for t in manifest["io"]["inputs"] + manifest["io"]["outputs"]:
        if t["name"] == name:
            return t["shape"]
    raise MoecError(f"engine manifest has no I/O tensor {name!r}: the graph is not a moec export; re-export it")


def _count_layers(manifest: dict[str, Any]) -> int:
    return sum(1 for t in manifest["io"]["inputs"] if t["name"].startswith("past_key."))
