"""benchmarks/gpu_step.py (the GPU MFU / memory-vs-plan check) runs end to end on CPU with
its tiny model, so the script is ready when an accelerator is lent."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_step  # noqa: E402


def test_tiny_run_reports_step_kernel_and_plan(capsys, tmp_path):
    out_file = tmp_path / "r.json"
    rc = gpu_step.main(["--tiny", "--steps", "1", "--variants", "einsum_remat:2:none,flash:2:none",
                        "--chip", "h100", "--check", "--isolate", "--out", str(out_file)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1, out                              # one run failed: reported, not fatal
    assert json.loads(out_file.read_text()) == out   # written as it went
    assert out["isolated"] and out["jax"] == gpu_step.jax.__version__
    r, bad = out["runs"]                             # each from its own process
    assert r["attention_kernel"] == "einsum_remat"
    assert (r["batch"], r["remat"], r["seq"]) == (2, "none", 128)
    assert r["step_s"] > 0 and r["train_flops_per_step"] > 0 and r["xla_bytes"] > 0
    assert 4.0 < r["loss_first"] < 7.0               # ~ln(256) at init
    assert r["plan_chip"] == "h100" and r["plan_bytes"] > 0 and r["kernel_warnings"] == []
    assert r["plan_source"] == "traced" and r["plan_analytic_bytes"] > 0
    assert r["mfu"] is None                          # no peak FLOP/s for a CPU
    assert "attention_impl='flash'" in bad["error"]
    chk = out["attention_check"]                     # CPU: the default kernel is einsum
    assert chk["kernel"] == "einsum" and chk["ok"]
    for case in ("padded", "packed"):                # bf16 vs fp32: rounding, not a bug
        assert 1e-4 < max(chk[f"{case}_kernel"].values()) < 2e-2


def test_variants_parse_and_refuse():
    import argparse
    a = argparse.Namespace(variants=":8:none,xla:16:dots:4096", impls="", batch=8,
                           remat="none", seq=2048)
    assert gpu_step.parse_variants(a) == [("", 8, "none", 2048), ("xla", 16, "dots", 4096)]
    a.variants = "xla:8:everything"
    try:
        gpu_step.parse_variants(a)
    except SystemExit as e:
        assert "IMPL:BATCH:REMAT" in str(e)
    else:
        raise AssertionError("a bad variant was accepted")


def test_chip_names():
    assert gpu_step.chip_name("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_step.chip_name("NVIDIA H200") == "h200"
    assert gpu_step.chip_name("TPU v5 lite") == "v5e"
    assert gpu_step.chip_name("TPU v5p") == "v5p"
    assert gpu_step.chip_name("cpu") is None
