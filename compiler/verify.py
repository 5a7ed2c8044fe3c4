"""Verify an export: the same prompts through PyTorch (the reference) and ONNX Runtime.

``verify(checkpoint, VerifyConfig)`` exports the checkpoint to a temporary folder, runs a prefill
of a prompt longer than the attention chunk (so chunked attention, NoPE temperature tuning and
QK norm are exercised past the first chunk) and several decode steps on both backends, and
compares every output of every step: the logits and each layer's present key/value.

Both backends are fed the same tokens at every decode step (the reference's greedy choice), so
one early difference cannot snowball into unrelated sequences; whether ONNX Runtime's greedy
choice agrees is reported per step as well.

The comparison is Polygraphy's (``SimpleCompareFunc`` with ``check_error_stat="elemwise"``): an
element mismatches only when its absolute error exceeds atol AND its relative error (against
the reference) exceeds rtol; a step's output fails when any element mismatches. Polygraphy's
comparator is used as-is, so its numbers mean what they mean in ``polygraphy run``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moec.common import contract, progress
from moec.common.errors import MoecError

# Per-dtype default tolerances (atol, rtol) of verify. fp32: the export's contract (1e-4 on
# logits; measured 2.6e-6). fp16: 10-bit mantissa; measured max abs error on the demo model is
# 6.4e-3 on logits and 7.5e-3 on KV over 8 decode steps, so 5e-2 leaves room for accumulation-order differences without hiding a wrong
# op (a wrong op moves logits by O(1)). bf16: 7-bit mantissa, 8x coarser than fp16.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 1e-4),
    "fp16": (5e-2, 5e-2),
    "bf16": (4e-1, 1e-1),
}


@dataclass(frozen=True)
class VerifyConfig:
    dtype: str = "fp32"
    atol: float | None = None  # None: DEFAULT_TOLERANCES[dtype]
    rtol: float | None = None
    batch: int = 2
    # None: default_prompt_len (crosses the attention chunk where that fits the memory budget).
    prompt_len: int | None = None
    decode_steps: int = 6
    seed: int = 0
    providers: tuple[str, ...] | None = None  # ONNX Runtime providers; None: the best available
    graph_optimization: bool = True
    export_dir: Path | None = None  # keep the export here instead of a temporary folder
    allow_nonfinite_weights: bool = False  # load NaN/Inf weights (refused by default) on both sides

    def __post_init__(self) -> None:
        if self.dtype not in DEFAULT_TOLERANCES:
            raise MoecError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DEFAULT_TOLERANCES)}")
        for name in ("atol", "rtol"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise MoecError(f"{name} must be >= 0, got {v}")
        if self.batch < 1 or self.decode_steps < 0 or (self.prompt_len is not None and self.prompt_len < 1):
            raise MoecError("batch and prompt_len must be >= 1 and decode_steps >= 0")

    @property
    def tolerances(self) -> tuple[float, float]:
        atol, rtol = DEFAULT_TOLERANCES[self.dtype]
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)


@dataclass
class CompareRow:
    step: str  # "prefill", "decode 1", ...
    output: str  # graph output name
    max_abs: float
    max_rel: float
    passed: bool


class CompareRows:
    """What a report of CompareRow rows answers (VerifyReport, verify_vision's VisionVerifyReport)."""

    rows: list[CompareRow]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def failures(self) -> list[CompareRow]:
        return [r for r in self.rows if not r.passed]


@dataclass
class VerifyReport(CompareRows):
    dtype: str
    atol: float
    rtol: float
    prompt_len: int
    batch: int
    prompt_rule: str = ""  # how the prompt length was chosen
    rows: list[CompareRow] = field(default_factory=list)
    # Per decode step (and the prefill first): does ORT's greedy token equal the reference's?
    greedy_match: list[bool] = field(default_factory=list)
    torch_describe: dict = field(default_factory=dict)
    ort_describe: dict = field(default_factory=dict)

    def max_abs(self, output: str | None = None) -> float:
        vals = [r.max_abs for r in self.rows if output is None or r.output == output]
        return max(vals) if vals else 0.0

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "atol": self.atol,
            "rtol": self.rtol,
            "prompt_len": self.prompt_len,
            "batch": self.batch,
            "prompt_rule": self.prompt_rule,
            "passed": self.passed,
            "greedy_match": self.greedy_match,
            "rows": [asdict(r) for r in self.rows],
            "torch": self.torch_describe,
            "ort": self.ort_describe,
        }


def _compare(ort_outputs: dict[str, np.ndarray], ref_outputs: dict[str, np.ndarray], atol: float, rtol: float):
    from polygraphy.comparator import IterationResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    # Polygraphy prints every metric, and each failure as an [E] line, on stdout; moec's report says
    # the same in one table, and stdout must stay pure JSON under --json. CRITICAL silences both.
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        func = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise")
        results = func(
            IterationResult(ort_outputs, runner_name="onnxruntime"),
            IterationResult(ref_outputs, runner_name="torch"),
        )
    return results


def compare_rows(step: str, got: dict[str, np.ndarray], ref: dict[str, np.ndarray], atol: float,
                 rtol: float) -> list[CompareRow]:
    """One CompareRow per output of ``ref``: ``got`` against it with Polygraphy's comparator."""
    results = _compare(got, ref, atol, rtol)
    rows = []
    for out_name in ref:
        r = results[out_name]
        # NaN compares unequal to everything, so a tolerance check can miss it; a non-finite
        # output on either side is a failure, never "equal".
        finite = bool(np.isfinite(ref[out_name]).all() and np.isfinite(got[out_name]).all())
        max_abs, max_rel = float(r.max_absdiff), float(r.max_reldiff)
        ok = bool(r) and finite and bool(np.isfinite(max_abs))
        rows.append(CompareRow(step, out_name, max_abs if finite else float("nan"), max_rel, ok))
    return rows


def _step_outputs(logits_BSV, kv_pairs) -> dict[str, np.ndarray]:
    out = {contract.LOGITS: np.asarray(logits_BSV, dtype=np.float32)}
    for i, (k, v) in enumerate(kv_pairs):
        out[contract.present_key(i)] = k
        out[contract.present_value(i)] = v
    return out


def _torch_kv(cache) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(k.float().numpy(), v.float().numpy()) for k, v in cache.layers]


def _ort_kv(cache) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(k.numpy().astype(np.float32), v.numpy().astype(np.float32)) for k, v in zip(cache.keys, cache.values)]


# The largest tensors a verify prefill of S tokens creates, in fp32: the logits [B, S, vocab] (both
# backends return them whole, and the comparison holds a few copies) and one attention layer's
# scores [B, heads, S, S] in the torch reference. Their sum is kept under this budget so that the
# default prompt fits a small CI machine even at the real vocabulary (202,048) and 40 heads; a
# longer prompt is one --prompt-len away.
VERIFY_BUDGET_BYTES = 256 << 20


def prompt_bytes(prompt_len: int, batch: int, heads: int, vocab_size: int) -> int:
    """Bytes of the logits plus one layer's attention scores of a prefill (see VERIFY_BUDGET_BYTES)."""
    return 4 * batch * prompt_len * (heads * prompt_len + vocab_size)


def default_prompt_len(batch: int, heads: int, vocab_size: int, chunk_size: int | None, max_len: int) -> tuple[int, str]:
    """verify's prompt length when none is given, and the sentence that says why.

    Prefer 2 * chunk + 3 (crosses two chunk boundaries), then chunk + 3 (one), so chunked attention,
    NoPE temperature tuning and QK norm are checked past the first chunk; each only if it fits
    VERIFY_BUDGET_BYTES and the export's positions (``max_len``). Otherwise the longest prompt that
    fits: on Llama 4's real configs (chunk 8192, vocab 202,048) that is about 150 tokens at batch 2,
    which checks every op but not a chunk boundary; say so rather than exhaust the machine.
    """
    chunk = chunk_size or 8
    for n, what in ((2 * chunk + 3, "crosses two attention chunks"), (chunk + 3, "crosses one attention chunk")):
        if n <= max_len and prompt_bytes(n, batch, heads, vocab_size) <= VERIFY_BUDGET_BYTES:
            return n, f"{n} tokens: {what} of {chunk}"
    n = max(1, min(max_len, chunk))
    while n > 1 and prompt_bytes(n, batch, heads, vocab_size) > VERIFY_BUDGET_BYTES:
        n = n * 9 // 10
    if chunk + 3 > max_len and prompt_bytes(chunk + 3, batch, heads, vocab_size) <= VERIFY_BUDGET_BYTES:
        return n, f"{n} tokens: the export's {max_len} positions leave no room to cross the attention chunk ({chunk})"
    return n, (f"{n} tokens: a prompt past the attention chunk ({chunk}) would exceed verify's "
               f"{VERIFY_BUDGET_BYTES >> 20} MiB budget for logits and attention scores; pass --prompt-len to cross it")


def verify_backends(torch_backend, ort_backend, config: VerifyConfig, vocab_size: int, chunk_size: int | None) -> VerifyReport:
    """Compare two ready backends (see the module doc)."""
    atol, rtol = config.tolerances
    max_pos = min(torch_backend.max_positions, ort_backend.max_positions)
    if config.prompt_len is not None:
        prompt_len, rule = config.prompt_len, f"{config.prompt_len} tokens: given"
    else:
        heads = torch_backend.config.num_attention_heads
        prompt_len, rule = default_prompt_len(config.batch, heads, vocab_size, chunk_size, max_pos - config.decode_steps)
    if prompt_len + config.decode_steps > max_pos:
        raise MoecError(
            f"prompt_len {prompt_len} + decode_steps {config.decode_steps} exceed the {max_pos} positions of the export"
        )
    if hasattr(ort_backend, "kv_cache"):
        torch_backend.follow_kv_cache(ort_backend.kv_cache)
    rng = np.random.default_rng(config.seed)
    ids_BS = rng.integers(0, vocab_size, size=(config.batch, prompt_len), dtype=np.int64)
    pos_BS = np.broadcast_to(np.arange(prompt_len, dtype=np.int64), ids_BS.shape).copy()

    report = VerifyReport(
        dtype=config.dtype,
        atol=atol,
        rtol=rtol,
        prompt_len=prompt_len,
        batch=config.batch,
        prompt_rule=rule,
        torch_describe=torch_backend.describe(),
        ort_describe=ort_backend.describe(),
    )
    t_cache = torch_backend.init_cache(config.batch)
    o_cache = ort_backend.init_cache(config.batch)
    for step in range(config.decode_steps + 1):
        progress.step("prefill" if step == 0 else f"decode step {step} of {config.decode_steps}")
        t_logits, t_cache = torch_backend.forward(ids_BS, pos_BS, t_cache)
        o_logits, o_cache = ort_backend.forward(ids_BS, pos_BS, o_cache)
        ref = _step_outputs(t_logits, _torch_kv(t_cache))
        got = _step_outputs(o_logits, _ort_kv(o_cache))
        report.rows += compare_rows("prefill" if step == 0 else f"decode {step}", got, ref, atol, rtol)
        ref_next_B = t_logits[:, -1].argmax(-1)
        finite_logits = bool(np.isfinite(t_logits[:, -1]).all() and np.isfinite(o_logits[:, -1]).all())
        report.greedy_match.append(finite_logits and bool((o_logits[:, -1].argmax(-1) == ref_next_B).all()))
        ids_BS = ref_next_B[:, None].astype(np.int64)
        pos_BS = np.full((config.batch, 1), t_cache.past_len, dtype=np.int64)
    return report


def verify(checkpoint: str | os.PathLike, config: VerifyConfig = VerifyConfig()) -> VerifyReport:
    """Export ``checkpoint`` with ``config.dtype`` and compare ONNX Runtime against PyTorch."""
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.models import Llama4Config
    from moec.models.checkpoint import checkpoint_folder
    from moec.models.torch_backend import TorchBackend
    from moec.runtime.ort_backend import OrtBackend

    llama = Llama4Config.from_pretrained(checkpoint_folder(checkpoint))
    with tempfile.TemporaryDirectory(prefix="moec-verify-") as tmp:
        out_dir = Path(config.export_dir) if config.export_dir else Path(tmp)
        onnx_path = out_dir / "model.onnx"
        progress.step("exporting")
        export_onnx(checkpoint, onnx_path,
                    ExportConfig(dtype=config.dtype, allow_nonfinite_weights=config.allow_nonfinite_weights))
        ort_backend = OrtBackend.from_onnx(
            onnx_path, providers=config.providers, graph_optimization=config.graph_optimization
        )
        torch_backend = TorchBackend.from_checkpoint(checkpoint, dtype=config.dtype,
                                                     allow_nonfinite=config.allow_nonfinite_weights)
        return verify_backends(torch_backend, ort_backend, config, llama.vocab_size, llama.attention_chunk_size)


def format_report(report: VerifyReport) -> str:
    """The table ``moec verify`` prints: one row per step and output."""
    lines = [
        f"verify {report.dtype}: batch {report.batch}, prompt {report.prompt_rule or f'{report.prompt_len} tokens'}, "
        f"atol {report.atol:g}, rtol {report.rtol:g} (an element fails when both are exceeded)",
        f"{'step':<10} {'output':<18} {'max abs':>11} {'max rel':>11}  result",
    ]
    for r in report.rows:
        lines.append(f"{r.step:<10} {r.output:<18} {r.max_abs:>11.3e} {r.max_rel:>11.3e}  {'ok' if r.passed else 'FAIL'}")
    greedy = ", ".join("yes" if m else "NO" for m in report.greedy_match)
    lines.append(f"greedy token equal per step (prefill, decode...): {greedy}")
    lines.append(f"{'PASSED' if report.passed else 'FAILED'}: {len(report.failures)} of {len(report.rows)} comparisons out of tolerance")
    return "\n".join(lines)
