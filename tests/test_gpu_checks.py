"""The prepared device-check script (benchmarks/gpu_checks.py) runs end to end in its CPU smoke
mode, so it is ready, unrotted, for the first session that is lent a GPU."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_checks_smoke_runs_every_check(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_checks.py", "--smoke", "--repeats", "1", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in open(tmp_path / "gpu_checks.jsonl", encoding="utf-8")]
    status = {line["check"]: line["status"] for line in lines if "status" in line}
    assert status == {"selection": "ok", "kernels": "ok", "engine": "ok", "long_context": "ok"}, status
    engine = next(line for line in lines if line["check"] == "engine" and "status" not in line)
    # The smoke run forces the Pallas kernels (interpret mode): the detector finds them in the
    # one compiled engine program.
    assert engine["programs"] == 1
    assert engine["kernel_mentions"]["fused_sampler"] >= 1
    assert engine["kernel_mentions"]["decode_attention_split_k"] >= 1
    assert engine["tokens_per_s"] > 0


def test_a_failing_check_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    from benchmarks import gpu_checks

    def broken(report, *args):
        raise RuntimeError("kernel not selected")

    monkeypatch.setattr(gpu_checks, "check_selection", broken)
    assert gpu_checks.main(["--only", "selection", "--out", str(tmp_path)]) == 1
    line = json.loads(open(tmp_path / "gpu_checks.jsonl", encoding="utf-8").read().splitlines()[-1])
    assert line["status"] == "FAIL" and "kernel not selected" in line["error"]
