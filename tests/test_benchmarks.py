"""The benchmark scripts that a GPU lease runs (benchmarks/gpu_run.sh) must not rot between leases: their
smoke presets run here, and every dn2 row they report is exact."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_knn_bench_smoke_preset_times_every_candidate_dtype_and_stays_exact(tmp_path):
    out = tmp_path / "knn.json"
    subprocess.run(
        [sys.executable, "benchmarks/knn_bench.py", "--preset", "tiny", "--dtypes", "--repeats", "1", "--json", out],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = json.loads(out.read_text())["rows"]
    searched = {row["method"]: row for row in rows if row["method"].startswith("dn2")}
    assert {"dn2 torch, float16 candidates", "dn2 torch, bfloat16 candidates"} <= set(searched)
    assert {"bare float32 GEMM", "bare float16 GEMM", "bare bfloat16 GEMM"} <= {row["method"] for row in rows}
    for method, row in searched.items():
        assert row["exact_rows"] == "100.00%", f"{method}: {row}"
        assert row["uncertified_rows_pct"] is not None and 0 <= row["uncertified_rows_pct"] <= 100


def test_knn_profile_times_each_step_of_the_candidate_stage_on_a_small_shape():
    done = subprocess.run(
        [sys.executable, "benchmarks/knn_profile.py", "--shape", "9000", "200", "32", "--kernels", "3"]
        + ["--candidate_dtype", "float16", "--tile_groups", "2", "256"],  # float16: an operand that can be tiled
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    steps = [line for line in done.stdout.splitlines() if line.startswith("| ") and "ms per block" not in line]
    assert len(steps) == 7, done.stdout
    blocks = int(done.stdout.split(" GEMM blocks per search")[0].rsplit(", ", 1)[1])
    for line in steps:
        per_block, per_search = (float(cell) for cell in line.strip("| ").split(" | ")[1:])
        assert per_block > 0 and abs(per_search - per_block * blocks) <= 0.05 + 0.01 * per_search, line
    whole = r"whole knn_distances, the (\w+) operand(?:, (\d+) groups per tile)? \(([\d,]+) rows tiled\): ([\d.]+) ms"
    wholes = re.findall(whole, done.stdout)
    tiles = [(operand, groups, rows) for operand, groups, rows, _ in wholes]
    assert tiles == [("default", "", "0"), ("tiled", "2", "8,960"), ("tiled", "256", "8,192")], wholes
    assert all(float(ms) > 0 for *_, ms in wholes)


def test_extract_bench_cpu_preset_reports_every_path_for_a_small_run(tmp_path):
    out = tmp_path / "extract.json"
    command = [sys.executable, "benchmarks/extract_bench.py", "--preset", "cpu", "--backbones", "efficientnet_lite0"]
    command += ["--images", "96", "--batch_size", "64", "--repeats", "3", "--json", out]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["settings"]["images"] == 96 and report["settings"]["repeats"] == 3
    (row,) = report["rows"]
    paths = ("bare", "preprocess", "on_device_input", "protocol", "dataloader", "module_fit")
    assert all(row[f"{path}_img_per_s"] > 0 for path in paths), row
    for path in paths:  # the table's figure is the median of the rounds
        assert row[f"{path}_img_per_s"] == sorted(row["rounds_img_per_s"][path])[1], (path, row)
    assert row["protocol_over_bare"] == row["protocol_img_per_s"] / row["bare_img_per_s"]


def test_pixel_metrics_bench_quantile_binning_matches_exact_in_every_row():
    result = subprocess.run(
        [sys.executable, "benchmarks/pixel_metrics_bench.py"], cwd=ROOT, check=True, capture_output=True, text=True
    )
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines()[2:]]
    assert len(rows) == 9
    for row in rows:
        auroc_exact, auroc_binned, _, pro_exact, pro_binned = (float(cell) for cell in row[2:])
        assert abs(auroc_binned - auroc_exact) <= 2e-4 and abs(pro_binned - pro_exact) <= 2e-4, row


def test_memory_bench_reports_every_stage_of_a_small_bank():
    command = [sys.executable, "benchmarks/memory_bench.py", "--rows", "400", "--clean_rows", "120", "--queries", "40"]
    done = subprocess.run(
        [*command, "--dim", "32", "--every_threshold_image"], cwd=ROOT, check=True, capture_output=True, timeout=300
    )
    rows = [line.split("|")[1].strip() for line in done.stdout.decode().splitlines() if line.startswith("| ")][1:]
    assert rows == [
        "fit",
        "fit, threshold_samples=None",
        "save checkpoint",
        "load_from_checkpoint",
        "first test (40 images)",
        "fit, clean_fraction=0.5",
        "DN2Detector.fit",
        "DN2Detector.decision_function x 3 (40 rows)",
    ]
