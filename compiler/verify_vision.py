"""Verify a multimodal export's image path: the vision graph on ONNX Runtime against the checkpoint's own vision
tower in PyTorch, and an image prompt through both text models.

``verify_vision`` makes one picture whose size is not a tile multiple (so the processor resizes it to a grid of
several tiles plus the global thumbnail, like a real photo), lays its tokens into a short prompt as ``moec run
--image`` does (compiler/image_inputs.py, the same code), and compares, with verify's comparator and tolerances:

- ``image_features``: ONNX Runtime's vision graph vs torch's tower on the same tiles;
- the prefill logits of the combined prompt and the decode steps after it, each backend fed its *own* features
  (end to end: a wrong feature row or a wrong merge position shows up here), and whether the greedy tokens agree.

The text side without images is the verify stage's job (compiler/verify.py); this one is what it cannot see.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moec.common import contract
from moec.compiler.verify import CompareRow, CompareRows, VerifyConfig, compare_rows

PROMPT = "What is in the picture?"
FEATURES_ROW = "image_features"
# The picture's size in tiles: past one tile in both directions, so a multi-tile grid is exercised wherever the
# processor allows several tiles (a 1-tile processor resizes it to its one tile).
PICTURE_TILES_HW = (1.6, 2.1)


@dataclass
class VisionVerifyReport(CompareRows):
    dtype: str
    atol: float
    rtol: float
    tiles_hw: list[tuple[int, int]]
    image_rows: int
    prompt_len: int
    rows: list[CompareRow] = field(default_factory=list)
    greedy_match: list[bool] = field(default_factory=list)
    text_checked: str = ""  # "" when the combined prompt was compared, else why not

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"dtype": self.dtype, "atol": self.atol, "rtol": self.rtol, "tiles_hw": self.tiles_hw,
                "image_rows": self.image_rows, "prompt_len": self.prompt_len, "passed": self.passed,
                "greedy_match": self.greedy_match, "text_checked": self.text_checked,
                "rows": [asdict(r) for r in self.rows]}


def write_picture(path: Path, tile_size: int) -> None:
    """The demo's picture (models/demo_vision.py) at PICTURE_TILES_HW tiles of ``tile_size`` pixels."""
    from moec.models.demo_vision import write_demo_image

    write_demo_image(path, hw=(round(PICTURE_TILES_HW[0] * tile_size), round(PICTURE_TILES_HW[1] * tile_size)))


def verify_vision(checkpoint: Path, vision_onnx: Path, config: VerifyConfig, torch_backend=None,
                  ort_backend=None, text_skip_reason: str = "") -> VisionVerifyReport:
    """Compare the vision graph ``vision_onnx`` with ``checkpoint``'s tower; with both text backends given, the
    combined prompt too (``text_skip_reason`` says why not, when they are not)."""
    from tokenizers import Tokenizer

    from moec.compiler.image_inputs import VisionEncoder, open_vision_encoder, prepare_image_prompt
    from moec.runtime.vision import OrtVisionEncoder

    atol, rtol = config.tolerances
    reference = open_vision_encoder(checkpoint, "torch")
    graph = OrtVisionEncoder(vision_onnx)
    tokenizer = Tokenizer.from_file(str(checkpoint / contract.TOKENIZER_FILE))
    ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    bos = tokenizer.token_to_id("<|begin_of_text|>")  # as `moec run` finds it (None: the tokenizer has none)
    with tempfile.TemporaryDirectory(prefix="moec-verify-vision-") as tmp:
        picture = Path(tmp) / "picture.png"
        write_picture(picture, graph.metadata["tile_size"])
        # Both sides through prepare_image_prompt: the same tiles and layout `moec run --image` makes.
        got = prepare_image_prompt([picture], ids, tokenizer, VisionEncoder(graph.metadata, graph.encode,
                                                                            str(vision_onnx)), bos, None)
        ref = prepare_image_prompt([picture], ids, tokenizer, reference, bos, None)
    report = VisionVerifyReport(config.dtype, atol, rtol, got.tiles_hw, int(got.features_NH.shape[0]), len(got.ids),
                                text_checked=text_skip_reason)
    report.rows += compare_rows("vision", {FEATURES_ROW: got.features_NH}, {FEATURES_ROW: ref.features_NH}, atol, rtol)
    if torch_backend is None or ort_backend is None:
        return report
    prompt_BS = np.asarray([ref.ids], dtype=np.int64)
    ids_BS, pos_BS = prompt_BS, np.arange(prompt_BS.shape[1], dtype=np.int64)[None]
    t_cache, o_cache = torch_backend.init_cache(1), ort_backend.init_cache(1)
    for step in range(config.decode_steps + 1):
        prefill = step == 0  # the features replace the image tokens' embeddings in the prefill only
        t_logits, t_cache = torch_backend.forward(ids_BS, pos_BS, t_cache,
                                                  image_features_NH=ref.features_NH if prefill else None)
        o_logits, o_cache = ort_backend.forward(ids_BS, pos_BS, o_cache,
                                                image_features_NH=got.features_NH if prefill else None)
        t_logits, o_logits = np.asarray(t_logits, np.float32), np.asarray(o_logits, np.float32)
        name = "prefill" if step == 0 else f"decode {step}"
        report.rows += compare_rows(name, {contract.LOGITS: o_logits}, {contract.LOGITS: t_logits}, atol, rtol)
        next_B = t_logits[:, -1].argmax(-1)
        report.greedy_match.append(bool((o_logits[:, -1].argmax(-1) == next_B).all()))
        ids_BS = next_B[:, None].astype(np.int64)
        pos_BS = np.full((1, 1), t_cache.past_len, dtype=np.int64)
    return report


def describe(report: VisionVerifyReport) -> str:
    worst = {r.output: r for r in sorted(report.rows, key=lambda r: r.max_abs)}
    grid = ", ".join(f"{h}x{w}" for h, w in report.tiles_hw)
    text = (f"; image prompt of {report.prompt_len} tokens: logits max abs {worst[contract.LOGITS].max_abs:.2e}, "
            f"greedy {sum(report.greedy_match)}/{len(report.greedy_match)} steps equal"
            if contract.LOGITS in worst else f"; {report.text_checked}")
    return (f"a picture as a {grid} tile grid, {report.image_rows} image rows: features max abs "
            f"{worst[FEATURES_ROW].max_abs:.2e} (atol {report.atol:g} rtol {report.rtol:g}){text}")
