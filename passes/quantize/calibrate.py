"""Calibration: the activations that feed each weight the quantize pass will scale, from the
full-precision export run on ONNX Runtime over a prompt text (``calibration.txt`` ships with moec;
``--quantize-calibration`` names another).

It runs the export, not the fused graph: the export is standard ONNX that ONNX Runtime runs, and
in it every weight still feeds its own MatMul / Gemm, so the input of that node is exactly what
the weight multiplies. Captured per weight (keyed by the weight's name without the export's
``.T``):
- a dense weight (MLP, shared expert, attention): the rows x_TK it multiplies, every token;
- the routed experts: x_ETK, expert e's rows of the dense-over-experts form, where a token the
  router did not send to e is a zero row (its score is 0) and a routed one is the score-scaled
  input. awq.py keeps the router's chosen tokens per expert (the non-zero rows); fp8_act.py the
  largest |x| the fused op's input takes (the router's input, captured under ``<layer>.experts.hidden``).
The text is cut into independent prompts of ``CHUNK`` tokens (each from position 0, no cache), at
most ``MAX_TOKENS`` tokens in all: a few hundred tokens fix a per-channel mean or a per-tensor max.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from moec.common import contract
from moec.common.errors import MoecError

MAX_TOKENS = 512
CHUNK = 128
_EXPERTS = re.compile(r"(^|\.)feed_forward\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"(^|\.)feed_forward\.router\.weight$")


def experts_hidden_key(weight_name: str) -> str:
    """The key of the fused experts' input (the router's input) for a layer's expert weight."""
    return weight_name.rsplit(".experts.", 1)[0] + ".experts.hidden"


@dataclasses.dataclass(frozen=True)
class Calibration:
    source: str  # the prompt file's name
    tokens: int
    inputs: dict[str, np.ndarray]  # weight name -> x_TK (dense) | x_ETK (experts); "<layer>.experts.hidden" -> x_TH

    def record(self) -> str:
        return f"{self.source} ({self.tokens} tokens, fp32 export on ONNX Runtime CPU)"


def read_prompt_tokens(text_path: Path, tokenizer_path: Path | None, what: str) -> list[int]:
    if tokenizer_path is None or not Path(tokenizer_path).is_file():
        raise MoecError(f"{what}: calibration tokenizes {text_path.name} with the model's tokenizer.json, and the "
                        "export has none beside it; export from a checkpoint with a tokenizer.json, or use a method "
                        "without calibration (--quantize-method rtn|clip)")
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MoecError(f"--quantize-calibration {text_path}: not a readable UTF-8 text ({e})") from e
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_path)).encode(text).ids
    if len(ids) < 16:
        raise MoecError(f"--quantize-calibration {text_path}: {len(ids)} tokens; calibration needs at least 16")
    return ids[:MAX_TOKENS]


def _captures(model) -> dict[str, str]:
    """{weight key: the activation value name feeding it} for every weight calibration can scale."""
    from moec.passes.quantize import WEIGHT_KINDS

    inits = {i.name for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        key = node.input[1].removesuffix(".T")
        if _EXPERTS.search(key) or any(p.search(key) for p in WEIGHT_KINDS.values()):
            out[key] = node.input[0]
        elif _ROUTER.search(key):
            out[key.removesuffix("router.weight") + "experts.hidden"] = node.input[0]
    return out


def calibrate(export_path: Path, tokenizer_path: Path | None, text_path: Path) -> Calibration:
    """Run the export on the prompt text and return what feeds each weight (see the module docstring)."""
    import onnx
    import onnxruntime as ort

    ids = read_prompt_tokens(text_path, tokenizer_path, str(export_path))
    model = onnx.load(str(export_path), load_external_data=False)
    captures = _captures(model)
    if not captures:
        raise MoecError(f"{export_path}: calibration found no MatMul / Gemm weight to calibrate (is it a moec export, "
                        "not an optimized graph?)")
    del model.graph.output[1:]  # logits alone; the caches are not needed
    for name in dict.fromkeys(captures.values()):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    collected: dict[str, list[np.ndarray]] = {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    # The graph goes as bytes (only its structure: the weights stay in the export's data files,
    # which ONNX Runtime reads from the export's own folder).
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  str(Path(export_path).resolve().parent))
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 (ONNX Runtime raises its own exception types)
        raise MoecError(f"{export_path}: calibration cannot run the export on ONNX Runtime ({e}); export with "
                        "--dtype fp32") from e
    del model
    names = [o.name for o in session.get_outputs()][1:]
    for start in range(0, len(ids), CHUNK):
        piece = np.asarray(ids[start : start + CHUNK], np.int64)[None]
        feeds = {contract.INPUT_IDS: piece, contract.POSITION_IDS: np.arange(piece.shape[1], dtype=np.int64)[None]}
        for inp in session.get_inputs():
            if inp.name not in feeds:
                shape = [1 if d == contract.DIM_BATCH else d if isinstance(d, int) else 0 for d in inp.shape]
                feeds[inp.name] = np.zeros(shape, np.float16 if "float16" in inp.type else np.float32)
        for name, value in zip(names, session.run(names, feeds)):
            collected.setdefault(name, []).append(np.asarray(value, np.float32))
    inputs = {}
    for key, name in captures.items():
        parts = collected[name]
        if _EXPERTS.search(key):  # [E, T, K] per prompt (the dense-over-experts form)
            inputs[key] = np.concatenate([p.reshape(p.shape[0], -1, p.shape[-1]) for p in parts], axis=1)
        else:
            inputs[key] = np.concatenate([p.reshape(-1, p.shape[-1]) for p in parts], axis=0)
    return Calibration(text_path.name, len(ids), inputs)
