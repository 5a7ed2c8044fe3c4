"""GPU archs: one table of names, which arch each TensorRT flavour can build, one error text.

Every command that takes an arch (``moec build --arch``, ``moec optimize/compile --target
trt-rtx:<arch>``) reads it through ``normalize_arch`` and checks it with ``check_arch``, so
``sm89``, ``sm_89``, ``8.9`` and ``l4`` mean the same everywhere and a refusal reads the same in
every command. What a flavour can target comes from its module when it is installed (TensorRT-RTX
lists its ``ComputeCapability`` members; FACTS.md: SM75-SM121 without SM90/SM100); the static
table below is the fallback and full TensorRT's list (it builds for the GPU it runs on).

Standard library only, like the rest of ``moec.common``: the backend modules are imported on
first use, never at import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re

from moec.common.errors import MoecError

# GPU names -> compute capability, as NVIDIA's CUDA GPU table lists them. Lower case, no spaces.
GPU_ARCHS: dict[str, str] = {
    "t4": "sm75",
    "a100": "sm80", "a100-40": "sm80", "a100-80": "sm80", "a30": "sm80",
    "a10": "sm86", "a10g": "sm86", "a40": "sm86", "rtx3090": "sm86",
    "orin": "sm87",
    "l4": "sm89", "l40s": "sm89", "rtx4090": "sm89",
    "h100": "sm90", "h200": "sm90", "gh200": "sm90",
    "b200": "sm100", "gb200": "sm100",
    "b300": "sm103", "gb300": "sm103",
    "thor": "sm110",
    "rtx5090": "sm120",
    "dgx-spark": "sm121", "gb10": "sm121",
}

# What each flavour builds when its module does not say (TensorRT-RTX 1.7 offers exactly these;
# full TensorRT 10/11: the real archs from Turing on, for the GPU it runs on).
STATIC_ARCHS: dict[str, tuple[str, ...]] = {
    "trt-rtx": ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121"),
    "trt": ("sm75", "sm80", "sm86", "sm87", "sm89", "sm90", "sm100", "sm103", "sm110", "sm120", "sm121"),
}
KNOWN_ARCHS = tuple(sorted(set().union(*STATIC_ARCHS.values(), GPU_ARCHS.values()), key=lambda a: int(a[2:])))
FLAVOUR_NAMES = {"trt": "full TensorRT", "trt-rtx": "TensorRT-RTX"}
FLAVOUR_MODULES = {"trt": "tensorrt", "trt-rtx": "tensorrt_rtx"}

_SM_RE = re.compile(r"^sm_?(\d{2,3})$")
_CC_RE = re.compile(r"^(\d{1,2})\.(\d)$")


def arch_key(arch: str) -> int:
    """Sort key: sm89 -> 89, sm120 -> 120."""
    return int(arch[2:])


def gpu_names(arch: str) -> list[str]:
    return [g for g, a in GPU_ARCHS.items() if a == arch]


def normalize_arch(text: str) -> str:
    """``sm89`` for ``sm89``, ``SM_89``, ``8.9`` or a GPU name (``l4``); unknown ones refused."""
    key = text.strip().lower()
    if m := _SM_RE.match(key):
        arch = f"sm{m.group(1)}"
    elif m := _CC_RE.match(key):
        arch = f"sm{m.group(1)}{m.group(2)}"
    else:
        arch = GPU_ARCHS.get(re.sub(r"[\s_-]", "", key)) or GPU_ARCHS.get(key.replace("_", "-"))
    if arch is None or arch not in KNOWN_ARCHS:
        raise MoecError(unknown_arch_message(text))
    return arch


def unknown_arch_message(text: str) -> str:
    return (f"unknown arch {text.strip()}; GPU archs are {', '.join(KNOWN_ARCHS)}, "
            f"or a GPU name ({', '.join(sorted(GPU_ARCHS))})")


def installed(kind: str) -> bool:
    """Whether the TensorRT flavour ``kind`` ("trt" | "trt-rtx") is importable here."""
    return importlib.util.find_spec(FLAVOUR_MODULES[kind]) is not None


@functools.cache
def buildable_archs(kind: str) -> tuple[str, ...]:
    """The archs flavour ``kind`` builds: its module's ComputeCapability list when it is
    installed and has one (TensorRT-RTX), else the static table."""
    if installed(kind):
        try:
            module = importlib.import_module(FLAVOUR_MODULES[kind])
        except ImportError:
            return STATIC_ARCHS[kind]
        caps = getattr(module, "ComputeCapability", None)
        offered = [n.lower() for n in getattr(caps, "__members__", {}) if _SM_RE.match(n.lower())]
        if offered:
            return tuple(sorted(offered, key=arch_key))
    return STATIC_ARCHS[kind]


def arch_unsupported_reason(kind: str, arch: str) -> str | None:
    """Why flavour ``kind`` cannot build for the normalized ``arch`` (None when it can). The one
    text ``moec optimize``, ``moec build`` and ``moec compile`` print."""
    offered = buildable_archs(kind)
    if arch in offered:
        return None
    others = [k for k in STATIC_ARCHS if k != kind and arch in buildable_archs(k)]
    hint = (f"; build {arch} with {FLAVOUR_NAMES[others[0]]} ({others[0]}:{arch}, or moec build "
            f"--builder {others[0]})") if others else ""
    return f"{FLAVOUR_NAMES[kind]} cannot target {arch}; it targets {', '.join(offered)}{hint}"


def check_arch(kind: str, text: str) -> str:
    """The normalized arch, or one MoecError line naming it and what to do."""
    arch = normalize_arch(text)
    if reason := arch_unsupported_reason(kind, arch):
        raise MoecError(reason)
    return arch


def split_archs(text: str) -> list[str]:
    """``"sm80, l4"`` -> ``["sm80", "l4"]`` (unnormalized; empty items dropped)."""
    return [a for a in text.replace(" ", "").split(",") if a]


def check_archs(kind: str, texts) -> list[str]:
    """Normalized, checked, each once: an arch listed twice (``sm89,l4``) is refused, not merged."""
    archs = [check_arch(kind, t) for t in texts]
    seen: dict[str, str] = {}
    for t, a in zip(texts, archs):
        if a in seen:
            raise MoecError(f"arch {a} is listed twice ({seen[a]} and {t}); list each arch once")
        seen[a] = t
    return archs


def arch_help(kind: str) -> str:
    """The archs and GPU names ``kind`` can build, for a command's --help."""
    archs = buildable_archs(kind)
    names = [g for a in archs for g in gpu_names(a) if not re.search(r"-\d", g)]  # a100, not a100-40 and a100-80
    return f"{FLAVOUR_NAMES[kind]} builds {', '.join(archs)}; GPU names: {', '.join(names)}"


def split_target(text: str) -> list[str]:
    """``"trt-rtx:sm80,l4"`` -> ``["trt-rtx:sm80", "trt-rtx:l4"]``: one target per arch (``moec
    compile`` builds each); ``"ort"`` stays one."""
    kind, sep, archs = text.strip().partition(":")
    if not sep or "," not in archs:
        return [text.strip()]
    return [f"{kind}:{a}" for a in split_archs(archs)]
