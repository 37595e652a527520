"""The report's "time against this machine" table: each stage's seconds beside the floor its work has here (the
`roofline` ragtune run records per stage in manifest.json, `ragtune.core.roofline`)."""

from __future__ import annotations

from typing import Any

ROOFLINE_COLUMNS = ["stage", "seconds", "work", "floor (s)", "× floor", "server starts", "largest process"]
ROOFLINE_NOTE = ("Floor: the FLOPs of each stage's work at the GEMM rate ragtune's precision probe measured on this "
                 "machine at each model's layer shapes, in the format the work ran in (manifest.json, `roofline`). "
                 "Work on a GPU has no floor here; decode at small batches is bound by memory, not FLOPs.")
KIND_ORDER = ("prefill", "decode", "train", "eval_forward", "embed")


def _tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def _model(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def work_line(work: list[dict[str, Any]]) -> str:
    """`prefill 180.2k tok, decode 62.1k tok (SmolLM2…, vllm cpu float32)`, one clause per model and place."""
    groups: dict[tuple[str, str], list[str]] = {}
    for item in sorted(work, key=lambda w: KIND_ORDER.index(w["kind"]) if w["kind"] in KIND_ORDER else 99):
        floor = "" if item.get("floor_s") is None else f" ≥{item['floor_s']:.0f}s"
        groups.setdefault((_model(item["model"]), item["where"]), []).append(
            f"{item['kind']} {_tokens(item['tokens'])} tok{floor}")
    return "; ".join(f"{', '.join(parts)} ({model}, {where})" for (model, where), parts in groups.items())


def roofline_rows(manifest: dict[str, Any] | None) -> list[list[str]]:
    """One row per stage that recorded a roofline, in pipeline order."""
    rows = []
    for name, stage in ((manifest or {}).get("stages") or {}).items():
        roof = stage.get("roofline")
        if not roof:
            continue
        starts = roof.get("server_starts") or {}
        rows.append([name, f"{roof['seconds']:.0f}", work_line(roof.get("work") or []) or "–",
                     "–" if roof.get("floor_s") is None else f"{roof['floor_s']:.0f}",
                     "–" if roof.get("x_floor") is None else f"{roof['x_floor']:.1f}×",
                     f"{starts['count']} ({starts['seconds']:.0f} s)" if starts.get("count") else "–",
                     f"{roof.get('rss_peak_gb', 0):.2f} GB ({roof.get('rss_peak_process') or '?'})"])
    return rows
