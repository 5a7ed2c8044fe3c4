"""Launch parameters of the MoE Triton kernels (moe_triton.py): ``LaunchConfig``, the shipped table
(moe_configs.json: defaults, and entries tuned per GPU by benchmarks/kernel_bench.py --tune, keyed by
expert shapes and a token-count bucket), the ``MOEC_MOE_CONFIGS`` override, and ``select_config``,
which picks the path (decode or prefill) and its tiles for one call.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import triton

from moec.common.errors import MoecError

CONFIG_FILE = "moe_configs.json"


T_BUCKET_MAX = 8192


@dataclass(frozen=True)
class LaunchConfig:
    path: str  # "decode" | "prefill"
    block_m: int
    block_n_gate_up: int
    block_n_down: int
    block_k: int
    split_k_gate_up: int = 1  # decode only
    split_k_down: int = 1  # decode only
    num_warps: int = 4
    num_stages: int = 3
    tuned: bool = False  # True only when an entry of the tuned table supplied it


CONFIG_ENV = "MOEC_MOE_CONFIGS"  # a JSON file of tuned entries, e.g. from kernel_bench.py --tune


_ENTRY_FIELDS = {f for f in LaunchConfig.__dataclass_fields__ if f != "tuned"}


_KEY = re.compile(r"E=\d+,H=\d+,I=\d+,T=(?P<T>\d+)")


def validate_config_table(table: dict, source: str) -> dict:
    """Raise MoecError naming ``source`` and the entry when the table is not one the kernels can
    use: a wrong key, an unknown field, a path other than decode/prefill, a tile that is not a
    positive power of two, or a count that is not a positive integer."""

    def fail(where: str, what: str):
        raise MoecError(f"{source}: {where}: {what}")

    if not isinstance(table, dict) or not isinstance(table.get("tuned", {}), dict):
        fail("top level", 'expected an object with "tuned": {device: {key: entry}}')
    for device, entries in table.get("tuned", {}).items():
        if not isinstance(entries, dict):
            fail(f"tuned.{device}", "expected an object of entries keyed 'E=<E>,H=<H>,I=<I>,T=<bucket>'")
        for key, entry in entries.items():
            where = f"tuned.{device}[{key}]"
            m = _KEY.fullmatch(key)
            if not m or int(m["T"]) & (int(m["T"]) - 1) or int(m["T"]) == 0:
                fail(where, "keys are 'E=<E>,H=<H>,I=<I>,T=<bucket>', T a power of two")
            if not isinstance(entry, dict):
                fail(where, "an entry is an object of launch parameters")
            unknown = set(entry) - _ENTRY_FIELDS
            if unknown:
                fail(where, f"unknown field(s) {sorted(unknown)}; known: {sorted(_ENTRY_FIELDS)}")
            for name, value in entry.items():
                if name == "path":
                    if value not in ("decode", "prefill"):
                        fail(where, f"path must be 'decode' or 'prefill', got {value!r}")
                elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    fail(where, f"{name} must be a positive integer, got {value!r}")
                elif (name.startswith("block_") or name == "num_warps") and value & (value - 1):
                    fail(where, f"{name} must be a power of two, got {value}")
                elif name == "block_k" and value < 16:
                    fail(where, f"block_k must be at least 16 (tl.dot's K), got {value}")
                elif name == "num_warps" and value > 16:
                    fail(where, f"num_warps must be at most 16, got {value}")
    return table


@functools.lru_cache(maxsize=1)
def load_config_table() -> dict:
    """The shipped table, with the tuned entries of the file named by $MOEC_MOE_CONFIGS (if set)
    laid over it, device by device and key by key."""
    shipped = json.loads(resources.files("moec.runtime.kernels").joinpath(CONFIG_FILE).read_text())
    table = validate_config_table(shipped, f"moec/runtime/kernels/{CONFIG_FILE}")
    override_path = os.environ.get(CONFIG_ENV)
    if override_path:
        source = f"${CONFIG_ENV}={override_path}"
        try:
            override = json.loads(Path(override_path).read_text())
        except OSError as exc:
            raise MoecError(f"{source}: cannot read it ({exc.strerror}); point {CONFIG_ENV} at a tuned-configs JSON file or unset it") from exc
        except json.JSONDecodeError as exc:
            raise MoecError(f"{source}: not valid JSON ({exc}); it may be truncated: regenerate it with kernel_bench.py --tune") from exc
        validate_config_table(override, source)
        for device, entries in override.get("tuned", {}).items():
            table["tuned"].setdefault(device, {}).update(entries)
    return table


def t_bucket(num_tokens: int) -> int:
    return min(T_BUCKET_MAX, triton.next_power_of_2(max(1, num_tokens)))


def config_key(E: int, H: int, I: int, num_tokens: int) -> str:
    return f"E={E},H={H},I={I},T={t_bucket(num_tokens)}"


def _next_pow2_clamped(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def default_config(path: str, E: int, num_tokens: int, k: int) -> LaunchConfig:
    """The untuned launch parameters of ``path`` ("decode" or "prefill") for this call's shape."""
    default = load_config_table()["default"]
    if path == "decode":
        d = default["decode"]
        # Rows of one expert in a decode call are at most T; below 16 rows a broadcast-FMA GEMV
        # beats padding the row tile to the tensor-core minimum of 16.
        block_m = _next_pow2_clamped(num_tokens, 1, 16)
        block_m = 16 if block_m > 4 else block_m
        return LaunchConfig(
            path="decode",
            block_m=block_m,
            block_n_gate_up=d["block_n"],
            block_n_down=d["block_n"],
            block_k=d["block_k"],
            split_k_gate_up=d["split_k_gate_up"],
            split_k_down=d["split_k_down"],
            num_warps=d["num_warps"],
            num_stages=d["num_stages"],
        )
    p = default["prefill"]
    # The row tile follows the mean rows per expert, so small batches over many experts do not
    # pad every expert's run to 64.
    mean_rows = -(-num_tokens * k // E)
    return LaunchConfig(
        path="prefill",
        block_m=_next_pow2_clamped(mean_rows, 16, p["block_m_max"]),
        block_n_gate_up=p["block_n_gate_up"],
        block_n_down=p["block_n_down"],
        block_k=p["block_k"],
        num_warps=p["num_warps"],
        num_stages=p["num_stages"],
    )


def default_path(num_tokens: int) -> str:
    return "decode" if num_tokens <= load_config_table()["default"]["decode_max_tokens"] else "prefill"


def select_config(E: int, H: int, I: int, num_tokens: int, k: int, device_name: str | None = None) -> LaunchConfig:
    """Launch parameters for one call: a tuned entry for this device and shape if the table has
    one, else the defaults of moe_configs.json."""
    table = load_config_table()
    entry = None
    if device_name:
        # The longest key the device name contains: "L40S" must not read "L4"'s entries.
        keys = [key for key in table.get("tuned", {}) if key in device_name]
        if keys:
            entry = table["tuned"][max(keys, key=len)].get(config_key(E, H, I, num_tokens))
    cfg = default_config((entry or {}).get("path") or default_path(num_tokens), E, num_tokens, k)
    if entry:
        fields = {k2: v for k2, v in entry.items() if k2 != "path"}
        cfg = replace(cfg, tuned=True, **fields)
    return cfg
