"""Import coverage: the wide suite of issue 10 in full, written as a table to bench/RESULTS.md.

Every timm architecture of ``tests/importer/timm_models.py`` (random weights, small sizes) is exported with both
torch.onnx exporters (legacy at opset 17, dynamo at its default opset), at a fixed batch of 1 and with a dynamic
batch, then imported and used as ``tests/importer/wide_suite.check_model`` says: the import's comparison with
onnxruntime at batch 1 and 2, the catalog with its token tensors as targets, 2 render steps at batch 2. The
Paddle and TFLite models of ``wide_suite.REAL_MODELS`` go through the same check.

    .venv/bin/python bench/bench_import.py                     # everything (about an hour on 2 busy cores)
    .venv/bin/python bench/bench_import.py --models vit_tiny_patch16_224,convnext_atto --exporters dynamo
    .venv/bin/python bench/bench_import.py --resume            # keep the rows of bench/import_rows.jsonl

Rows are appended to ``bench/import_rows.jsonl`` as they come (a long run can be resumed); the table in
``bench/RESULTS.md`` (section "Import coverage") is rewritten from all the rows at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "importer"))

from timm_models import TIMM_MODELS  # noqa: E402
from timm_models import export_timm  # noqa: E402
from wide_suite import REAL_MODELS  # noqa: E402
from wide_suite import check_model  # noqa: E402
from wide_suite import real_model_onnx  # noqa: E402

ROWS = HERE / "import_rows.jsonl"
RESULTS = HERE / "RESULTS.md"
SECTION = "## Import coverage (bench/bench_import.py)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:159] + "\u2026"


def run_case(family: str, name: str, exporter: str, batch: str, make_path) -> dict:
    row = {"family": family, "model": name, "exporter": exporter, "batch": batch}
    start = time.perf_counter()
    try:
        path = make_path()
    except Exception as exc:  # noqa: BLE001 - an export failure is a row, not the end of the run
        return {**row, "verdict": "export failed", "error": _first_line(exc), "export_s": time.perf_counter() - start}
    row["export_s"] = time.perf_counter() - start
    try:
        row.update(check_model(path))
        row["verdict"] = "ok"
    except Exception as exc:  # noqa: BLE001
        row.update(verdict="failed", error=_first_line(exc))
    return row


def cases(args, folder: Path):
    """The real models first, then every timm model per exporter and batch (the cheap legacy exports first)."""
    names = set(args.models.split(",")) if args.models else None
    if not args.no_real:
        for real in REAL_MODELS:
            if names and real.key not in names:
                continue
            exporter = "paddle2onnx" if real.family == "paddle" else "tflite2onnx"
            yield real.family, real.key, exporter, "as shipped", lambda r=real: real_model_onnx(r, folder)
    for exporter in args.exporters.split(","):
        for batch in args.batch.split(","):
            for spec in TIMM_MODELS:
                if names and spec.name not in names:
                    continue
                path = folder / f"{spec.name}_{exporter}_{batch}.onnx"
                yield (spec.family, spec.name, exporter, batch,
                       lambda s=spec, p=path, e=exporter, b=batch: export_timm(s, p, dynamo=e == "dynamo",
                                                                             dynamic_batch=b == "dynamic"))


def write_table(rows: list[dict]) -> str:
    ok = Counter()
    tried = Counter()
    for row in rows:
        for key in ((row["family"], row["exporter"], "all"), (row["family"], row["exporter"], row["batch"])):
            tried[key] += 1
            ok[key] += row["verdict"] == "ok"
    cpu = _cpu()
    lines = [SECTION, "",
             f"{time.strftime('%Y-%m-%d')}, {cpu}, torch {_version('torch')}, timm {_version('timm')}, onnx "
             f"{_version('onnx')}, onnxruntime {_version('onnxruntime')}, table written at commit {_commit()} (rows "
             "kept by `--resume` or `--models` may be older). Random weights "
             "(timm, `pretrained=False`), small inputs (64 px unless the model needs more); legacy exporter at "
             "opset 17, dynamo at its default opset. `max rel err`: the import's figure, the worst over batch 1 and "
             "batch 2 against onnxruntime; `mode`: `native` runs a batch at once, `per-image` image by image (a "
             "fixed-batch graph the batch rewrite could not free). `ok` = imported, matched (<= 1e-3), catalog "
             "listed, token tensors used as targets, 2 render steps at batch 2. `NHWC layers`: channels-last maps in "
             "the catalog (a channel objective on one renders too); `-` for rows measured before that column.", "",
             "Imported / tried, per family and exporter (and per batch mode):", "",
             "| family | exporter | imported / tried | fixed batch | dynamic batch |", "| --- | --- | --- | --- | --- |"]

    def count(key):
        return f"{ok[key]} / {tried[key]}" if tried[key] else "-"

    for family, exporter, _ in sorted(k for k in tried if k[2] == "all"):
        lines.append(f"| {family} | {exporter} | {count((family, exporter, 'all'))} | "
                     f"{count((family, exporter, 'fixed'))} | {count((family, exporter, 'dynamic'))} |")
    expected = len(TIMM_MODELS) * 4 + len(REAL_MODELS)
    if len(rows) < expected:
        lines += ["", f"This pass ran {len(rows)} of the {expected} cases (the machine's 2 cores were shared with other "
                      "work); the cases not listed were not run, `--resume` adds them."]
    lines += ["", "| model | family | exporter | batch | nodes | import s | max rel err | mode | token layers | "
                  "NHWC layers | verdict |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for row in rows:
        err = f"{row['max_rel_err']:.1e}" if row.get("max_rel_err") is not None else "-"
        verdict = row["verdict"] if row["verdict"] == "ok" else f"{row['verdict']}: {row.get('error', '')}"
        verdict = re.sub(r"\x1b\[[0-9;]*m", "", verdict)  # torch.export colours its messages
        lines.append(f"| {row['model']} | {row['family']} | {row['exporter']} | {row['batch']} | "
                     f"{row.get('nodes', '-')} | {row.get('import_s', 0):.1f} | {err} | {row.get('batch_mode', '-')} | "
                     f"{row.get('token_layers', '-')} | {row.get('nhwc_layers', '-')} | {verdict.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return "-"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "-"


def update_results(table: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION in text:
        start = text.index(SECTION)
        following = text.find("\n## ", start + len(SECTION))
        text = text[:start] + table + (text[following + 1:] if following >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + table
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated timm names or real-model keys (default: all)")
    parser.add_argument("--exporters", default="legacy,dynamo")
    parser.add_argument("--batch", default="fixed,dynamic")
    parser.add_argument("--no-real", action="store_true", help="skip the Paddle and TFLite models")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in bench/import_rows.jsonl")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite bench/RESULTS.md")
    parser.add_argument("--table-only", action="store_true", help="only write the table of the rows already there")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)

    done: dict[tuple, dict] = {}
    if (args.resume or args.table_only) and ROWS.exists():
        for line in ROWS.read_text().splitlines():
            row = json.loads(line)
            done[(row["model"], row["exporter"], row["batch"])] = row
    elif ROWS.exists() and not args.models and not args.table_only:
        ROWS.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for family, name, exporter, batch, make_path in cases(args, Path(tmp)):
            if (name, exporter, batch) in done or args.table_only:
                continue
            row = run_case(family, name, exporter, batch, make_path)
            done[(name, exporter, batch)] = row
            with ROWS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{family:7s} {name:34s} {exporter:11s} {batch:10s} {row['verdict']:13s} "
                  f"{row.get('max_rel_err') or 0:.1e} {row.get('error', '')}", flush=True)
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.exists() else list(done.values())
    latest = {(r["model"], r["exporter"], r["batch"]): r for r in rows}
    order = {spec.name: i for i, spec in enumerate(TIMM_MODELS)}
    order.update({m.key: len(order) + i for i, m in enumerate(REAL_MODELS)})
    table = write_table(sorted(latest.values(), key=lambda r: (order.get(r["model"], 1 << 20), r["exporter"],
                                                                  r["batch"])))
    if not args.no_write:
        update_results(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
