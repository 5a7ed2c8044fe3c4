"""``moec build --layers-per-engine N``: the model as a chain of engines, each a contiguous range of
layers (``moec.runtime.layer_chain`` cuts the graph), built one after another in this process.

Why: TensorRT-RTX's own copies during a build come to ~1.75x the weights of the network it
compiles, and it releases them when the plan is written (benchmarks/results/build_memory_probe.md),
so building N layers at a time bounds the build's peak host memory by one range's weights
(BUILD_RSS_RATIO x range + the libraries) instead of the model's.

ENG_DIR/
  layers{a}-{b}/   what ``moec build`` writes for one graph, for layers a..b (engines per arch,
                   manifest.json with ``layer_range``: its layers, inputs and outputs)
  chain.json       the chain: every range's layers, I/O and engines (sha256), the model's memory
                   plan (the engines run on one GPU, so it is the whole model's), each range's
                   weight bytes and the build's estimated host peak
  sidecar, tokenizer  (once for the chain: the range folders hold none; ``chain_tokenizer``)

``load_layer_chain`` is what a runtime calls first: it refuses a chain that is incomplete (a range
folder or engine missing), mixed (an engine whose sha256 is not the recorded one) or not one
chain (layers not contiguous from 0, an input no feed or earlier range provides).
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

from moec.common import contract
from moec.common.artifacts import atomic_dir, check_output_dir, sha256_file, write_json_atomic
from moec.common.errors import MoecError
from moec.common.manifest_json import fields_named, read_manifest_json

from moec.compiler.plan import BUILD_RSS_BASE, BUILD_RSS_RATIO, build_host_bytes

CHAIN_MANIFEST = contract.LAYER_CHAIN_MANIFEST
CHAIN_FORMAT = "moec-layer-chain"


def range_dir(first: int, end: int) -> str:
    return f"layers{first}-{end - 1}"


def build_layer_chain(onnx_path: str | Path, out_dir: str | Path, config, layers_per_engine: int, display=None) -> dict:
    """Build ``onnx_path`` (a moec graph) as engines of ``layers_per_engine`` layers each into
    ``out_dir`` (atomically: nothing appears unless every range built); chain.json's content."""
    from moec.common.onnx_files import load_graph_structure, require_moec_io
    from moec.common.sidecar import model_tokenizer, read_sidecar
    from moec.compiler.build.engine import _engine_memory, build_engine
    from moec.compiler.build.profiles import Limits
    from moec.compiler.plan import onnx_weight_bytes
    from moec.runtime.bench import source_hashes
    from moec.runtime.layer_chain import cut_layer_ranges

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise MoecError(f"{onnx_path} does not exist: pass the .onnx written by `moec optimize` or `moec export`")
    protected = [onnx_path, *([config.timing_cache] if config.timing_cache else [])]
    check_output_dir(out_dir, command="build", inputs=protected)
    sidecar = read_sidecar(onnx_path)
    tokenizer = model_tokenizer(onnx_path.parent, sidecar, onnx_path)
    model = load_graph_structure(onnx_path)
    num_layers = int(sidecar["num_layers"])
    require_moec_io(onnx_path, model, num_layers, "image_token_id" in sidecar)
    ranges = cut_layer_ranges(model, num_layers, layers_per_engine, str(onnx_path))  # bad N: named, before work
    entries = []
    with atomic_dir(out_dir, command="build", inputs=protected) as tmp:
        for r in ranges:
            result = build_engine(onnx_path, tmp / range_dir(r.first, r.end), config, display, layer_range=r)
            m = result.manifest
            weights = onnx_weight_bytes(r.model)
            own = {contract.past_key(i) for i in range(r.first, r.end)} | {contract.past_value(i) for i in range(r.first, r.end)}
            entries.append({"index": r.index, "layers": r.layers, "dir": range_dir(r.first, r.end),
                            "inputs": list(r.inputs), "outputs": list(r.outputs), "weight_bytes": weights,
                            "build_host_bytes_estimate": build_host_bytes(weights),
                            # KV of this range's own layers (a range may read another's past for its shape only).
                            "kv_inputs": [t for t in m["io"]["inputs"] if t["name"] in own],
                            "engines": [{"file": e["file"], "archs": e["archs"], "sha256": e["sha256"], "bytes": e["bytes"]}
                                        for e in m["engines"]]})
            last = m
            # The next range's builder starts from this one's memory released (TensorRT's copies
            # go with the builder, network and parser, which only ``result`` still reaches).
            del result, m
            gc.collect()
        limits = Limits(**last["limits"])  # every range is built with the same limits
        try:
            memory, context_note = _engine_memory(sidecar, model, limits, config)
        except MoecError:
            memory, context_note = None, ""
        sidecar_file = contract.sidecar_path(onnx_path)
        shutil.copy2(sidecar_file, tmp / sidecar_file.name)
        if tokenizer is not None:
            shutil.copy2(tokenizer, tmp / contract.TOKENIZER_FILE)
        from moec.common.kv_cache import kv_bytes_from_io

        context = min(limits.max_positions, limits.max_past + 1)
        out = {"format": CHAIN_FORMAT, "version": 1, "num_layers": num_layers, "layers_per_engine": layers_per_engine,
               "archs": list(last["archs"]), "trt": last["trt"], "source_onnx": source_hashes(onnx_path),
               "limits": last["limits"], "context_note": context_note, "memory": memory,
               "kv_cache": {"context": context, "bytes_per_sequence": kv_bytes_from_io(
                   [t for e in entries for t in e["kv_inputs"]], context)},
               "weight_bytes": sum(e["weight_bytes"] for e in entries),
               "build_host_bytes_estimate": max(e["build_host_bytes_estimate"] for e in entries),
               "sidecar": sidecar_file.name, "tokenizer": contract.TOKENIZER_FILE if tokenizer is not None else None,
               "outputs": [o.name for o in model.graph.output], "ranges": entries,
               "engine_split": config.engine_split or {"requested": layers_per_engine, "layers_per_engine": layers_per_engine}}
        write_json_atomic(tmp / CHAIN_MANIFEST, out)
    return out


def suggest_layers_per_engine(weight_bytes: int, num_layers: int, host: int) -> int | None:
    """The most layers per engine whose build fits ``host`` bytes at BUILD_RSS_RATIO, when one
    engine does not (None when it does, or when not even one layer would)."""
    if build_host_bytes(weight_bytes) <= host:
        return None
    per_layer = weight_bytes / max(1, num_layers)
    n = int((host - BUILD_RSS_BASE) / (BUILD_RSS_RATIO * per_layer))
    return n if n >= 1 else None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def format_chain(chain: dict, out_dir: Path) -> str:
    """``moec build --layers-per-engine``'s and ``moec inspect``'s lines for a chain."""
    from moec.compiler.plan import format_engine_memory

    lines = [f"built {len(chain['ranges'])} layer-range engines ({chain['layers_per_engine']} layers each) for "
             f"{', '.join(chain['archs'])} with {chain['trt']['flavour']} {chain['trt']['version']} -> {out_dir}",
             f"  weights {_size(chain['weight_bytes'])}; build host memory, estimated: "
             f"{_size(chain['build_host_bytes_estimate'])} (one range at a time)",
             f"  context: {chain['limits']['max_positions']} positions{chain.get('context_note', '')}"]
    if chain.get("memory"):
        lines.append(f"  {format_engine_memory(chain['memory'])} (all ranges on one GPU)")
    for r in chain["ranges"]:
        first, end = r["layers"]
        boundary = [n for n in r["inputs"] + r["outputs"] if n.startswith("hidden.") or n == contract.LOGITS
                    or n == contract.INPUT_IDS and first == 0]
        lines.append(f"  {r['dir']}/: layers {first}-{end - 1}, weights {_size(r['weight_bytes'])}, "
                     f"{' -> '.join(boundary)}; " + ", ".join(f"{e['file']} {e['bytes'] / 2**20:.2f} MiB sha256 "
                                                              f"{e['sha256'][:16]}" for e in r["engines"]))
    return "\n".join(lines)


def load_layer_chain(eng_dir: str | Path, arch: str | None = None) -> tuple[dict, list[Path]]:
    """(chain.json, [engine file of each range for ``arch``]), after checking the chain is complete,
    of one build, and runs as one chain (the first built arch when ``arch`` is None)."""
    eng_dir = Path(eng_dir)
    path = eng_dir / CHAIN_MANIFEST
    chain = read_manifest_json(
        path, fix="rebuild with `moec build --layers-per-engine N`", format=CHAIN_FORMAT,
        missing=f"{eng_dir} has no {CHAIN_MANIFEST}; build it with `moec build --layers-per-engine N`",
        not_this=f"{path} is not a moec layer-chain manifest; rebuild with `moec build --layers-per-engine N`")
    with fields_named(path, "rebuild with `moec build`"):
        return chain, _chain_engines(chain, eng_dir, path, arch)


def _chain_engines(chain: dict, eng_dir: Path, path: Path, arch: str | None) -> list[Path]:
    from moec.common.confine import plain_file_name

    arch = arch or chain["archs"][0]
    if chain.get("sidecar"):
        plain_file_name(eng_dir, chain["sidecar"], f"{path} sidecar", "rebuild with `moec build`")
    expect, engines = 0, []
    available = {contract.INPUT_IDS, contract.POSITION_IDS} | {
        n for i in range(int(chain["num_layers"])) for n in (contract.past_key(i), contract.past_value(i))}
    for r in chain["ranges"]:
        first, end = (int(x) for x in r["layers"])
        if first != expect or end <= first:
            raise MoecError(f"{path}: range {r['index']} holds layers {first}-{end - 1}, expected to start at {expect}: "
                            "not one chain; rebuild with `moec build`")
        expect = end
        missing = [n for n in r["inputs"] if n not in available]
        if missing:
            raise MoecError(f"{path}: range {r['index']} needs {', '.join(missing)}, which no feed or earlier range "
                            "provides: not one chain; rebuild with `moec build`")
        available |= set(r["outputs"])
        folder = plain_file_name(eng_dir, r["dir"], f"{path} range {r['index']} dir", "rebuild with `moec build`")
        entry = next((e for e in r["engines"] if arch in e["archs"]), None)
        if entry is None:
            raise MoecError(f"{eng_dir}: range {r['index']} has no engine for {arch}; built: {', '.join(chain['archs'])}")
        engine = plain_file_name(folder, entry["file"], f"{path} range {r['index']} engine", "rebuild with `moec build`")
        if not engine.is_file():
            raise MoecError(f"{engine} is missing: the chain is incomplete; copy the whole folder `moec build` wrote")
        if sha256_file(engine) != entry["sha256"]:
            raise MoecError(f"{engine} is not the engine {CHAIN_MANIFEST} records (sha256 differs): a mixed chain; "
                            "copy one build's folder whole")
        engines.append(engine)
    if expect != int(chain["num_layers"]):
        raise MoecError(f"{path}: the ranges end at layer {expect - 1} of {chain['num_layers']}: the chain is incomplete; "
                        "rebuild with `moec build`")
    missing = [n for n in chain["outputs"] if n not in available]
    if missing:
        raise MoecError(f"{path}: no range produces {', '.join(missing[:3])}: not one chain; rebuild with `moec build`")
    return engines


def chain_tokenizer(eng_dir: str | Path, chain: dict) -> Path | None:
    """The chain's tokenizer.json, in the chain folder (None when the model shipped none)."""
    from moec.common.confine import plain_file_name

    name = chain.get("tokenizer")
    if not name:
        return None
    path = plain_file_name(Path(eng_dir), name, f"{Path(eng_dir) / CHAIN_MANIFEST} tokenizer", "rebuild with `moec build`")
    if not path.is_file():
        raise MoecError(f"{path} is missing: the chain is incomplete; copy the whole folder `moec build` wrote")
    return path


def inspect_layer_chain(eng_dir: str | Path) -> dict:
    """``moec inspect`` of a layer-chain folder: the chain checked as a runtime would load it (every
    arch), then each range's folder inspected like a single engine folder."""
    from moec.compiler.build import inspect_engine_dir

    eng_dir = Path(eng_dir)
    chain, _ = load_layer_chain(eng_dir)
    for arch in chain["archs"][1:]:
        load_layer_chain(eng_dir, arch)
    ranges = [inspect_engine_dir(eng_dir / r["dir"]) for r in chain["ranges"]]
    tokenizer = chain_tokenizer(eng_dir, chain)
    return {"path": str(eng_dir), "chain": {k: chain[k] for k in ("num_layers", "layers_per_engine", "archs", "weight_bytes",
                                                                 "build_host_bytes_estimate")},
            "tokenizer": str(tokenizer) if tokenizer else None, "engine_split": chain.get("engine_split"),
            "ranges": [{"layers": r["layers"], "dir": r["dir"], "inputs": r["inputs"], "outputs": r["outputs"],
                        "weight_bytes": r["weight_bytes"], "engines": r["engines"]} for r in chain["ranges"]],
            "range_reports": ranges,
            "problems": [f"range {i}: {p}" for i, r in enumerate(ranges) for p in r["problems"]]}
