"""``bench/gpu-suite.sh --dry-run``: the prepared GPU suite runs end to end on CPU (tiny model, minimal sizes), so
the one command a lent GPU machine runs has not rotted; every step prints its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = {"gpu_tests", "dit", "pipeline_local", "serve", "official"}


@pytest.mark.slow
def test_the_gpu_suite_dry_run_prints_a_result_for_every_step(tmp_path: Path) -> None:
    out = tmp_path / "suite.jsonl"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("OFFICIAL_DIR", None)
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu-suite.sh"), "--dry-run", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if "error" not in r}
    assert set(by_step) >= STEPS, (rows, (tmp_path / "suite.jsonl.log").read_text()[-3000:])
    summary = rows[-1]
    assert summary["step"] == "summary" and summary["failed"] == [] and set(summary["steps"]) == STEPS
    assert by_step["gpu_tests"]["rc"] in (0, 5)  # passed, or all skipped without CUDA (pytest's 5: none collected)
    assert by_step["serve"]["markers_ok"]  # the content path of the glass-to-glass measurement holds
    assert by_step["official"]["skipped"].startswith("official code not found")


def test_ratio_lines_pair_the_official_rows_with_rheo_rows_of_the_same_configuration_and_vae(tmp_path: Path) -> None:
    """rheo / official at the same size and steps, against rheo's Wan-VAE row (the VAE the official code runs): the
    fast-mode (TAEHV) row of the same configuration is not a side-by-side of the same work."""
    sys.path.insert(0, str(ROOT))
    from bench.official import ratios

    rows = [{"bench": "pipeline_local", "size": "512x512", "steps": 2, "streams": 1, "vae": "wan", "steady_fps": 30.0},
            {"bench": "pipeline_local", "size": "512x512", "steps": 2, "streams": 1, "vae": "taehv",
             "steady_fps": 90.0},
            {"bench": "pipeline_local", "size": "832x480", "steps": 2, "streams": 1, "vae": "wan", "steady_fps": 9.0}]
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    official = [{"bench": "official", "size": "512x512", "steps": 2, "steady_fps": 15.0},
                {"bench": "official", "size": "832x480", "steps": 1, "steady_fps": 10.0}]
    (line,) = ratios(path, official)
    assert (line["size"], line["steps"], line["rheo_fps"], line["ratio"]) == ("512x512", 2, 30.0, 2.0)


def test_only_runs_the_named_steps_and_refuses_a_misspelt_one(tmp_path: Path) -> None:
    """``--only`` (a short device call's subset): the named steps alone, the opt-in torch.compile steps too (the
    whole run leaves them out: the first test); a name that is no step is an error that lists the steps, not a run of
    nothing that passes."""
    out = tmp_path / "suite.jsonl"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("OFFICIAL_DIR", None)
    suite = ["bash", str(ROOT / "bench" / "gpu-suite.sh"), "--dry-run", "--out", str(out), "--only"]
    run = subprocess.run([*suite, "official,compile_tests,vae_compile"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_step = {r["step"]: r for r in rows[:-1]}
    assert sorted(by_step) == ["compile_tests", "official", "vae_compile"] and rows[-1]["step"] == "summary"
    assert by_step["vae_compile"]["bench"] == "pipeline_local" and by_step["compile_tests"]["rc"] in (0, 5)
    bad = subprocess.run([*suite, "serve,servee"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no step 'servee'" in bad.stderr and "serve_ring" in bad.stderr


def test_serve_refuses_codec_only_outside_the_measurement_mode(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.serve import main

    with pytest.raises(SystemExit) as exit_:
        main(["--codec-only", "--no-passthrough"])
    assert exit_.value.code == 2 and "--codec-only is a choice of the measurement mode" in capsys.readouterr().err
