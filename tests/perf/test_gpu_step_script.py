"""benchmarks/gpu_step.py (the GPU MFU / memory-vs-plan check) runs end to end on CPU with
its tiny model, so the script is ready when an accelerator is lent."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_step  # noqa: E402


def test_tiny_run_reports_step_kernel_and_plan(capsys):
    rc = gpu_step.main(["--tiny", "--steps", "1", "--impls", "einsum_remat,flash",
                        "--chip", "h100"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1, out                              # one impl failed: reported, not fatal
    r, bad = out["runs"]
    assert r["attention_kernel"] == "einsum_remat"
    assert r["step_s"] > 0 and r["train_flops_per_step"] > 0 and r["xla_bytes"] > 0
    assert 4.0 < r["loss_first"] < 7.0               # ~ln(256) at init
    assert r["plan_chip"] == "h100" and r["plan_bytes"] > 0
    assert r["mfu"] is None                          # no peak FLOP/s for a CPU
    assert "attention_impl='flash'" in bad["error"]


def test_chip_names():
    assert gpu_step.chip_name("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_step.chip_name("NVIDIA H200") == "h200"
    assert gpu_step.chip_name("TPU v5 lite") == "v5e"
    assert gpu_step.chip_name("TPU v5p") == "v5p"
    assert gpu_step.chip_name("cpu") is None
