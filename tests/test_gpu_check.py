"""The GPU self-check (``python -m benchmarks.gpu_check`` = ``musetalk-flow doctor``) in its reduced CPU form
on tiny models: the device render path on CPU tensors against the numpy path, the slow-encoder check, and
the CUDA-only checks reported as skipped with their reason."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.gpu_check import Checks, build_parser, run_gpu_check

pytest_plugins = ["tests.fixtures_engine"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form; a GPU machine runs the full check")
def test_the_self_check_passes_in_its_cpu_form(tiny_models, tmp_path):
    said = []
    verdict = run_gpu_check(device="cpu", work_dir=tmp_path, budget_s=300, tiny_models=tiny_models,
                            throughput_batches=[1], say=said.append)
    json.dumps(verdict)  # one JSON verdict
    checks = verdict["checks"]
    assert verdict["verdict"] == "pass", verdict["problems"]
    assert checks["device_path_vs_cpu_path_on_cpu"]["status"] == "pass"
    assert checks["device_path_vs_cpu_path_on_cpu"]["vs_cpu_render"]["max"] <= 2
    assert checks["slow_encoder_same_frames"]["vs_plain_device_render"]["max"] == 0
    for name in ("graphs_vs_eager_fp32", "slow_gpu_same_frames", "real_oom_halves_the_batch", "graphs_on_cuda1",
                 "compiled_warm_up_and_render_threads"):
        assert checks[name]["status"] == "skipped" and "CUDA" in checks[name]["reason"]
    assert checks["throughput_per_batch_size"]["eager_b1"]["fps"] > 0
    assert len(said) == len(checks)


def test_checks_past_the_budget_are_skipped_and_failures_reported():
    checks = Checks(budget_s=10, say=lambda m: None)
    checks.run("fine", lambda: {"ok": True, "n": 1})
    checks.run("wrong", lambda: {"ok": False})
    checks.run("raises", lambda: 1 / 0)
    checks.run("too_long", lambda: {"ok": True}, needs_s=60)
    r = checks.results
    assert r["fine"]["status"] == "pass" and r["fine"]["n"] == 1
    assert r["wrong"]["status"] == "fail" and "ZeroDivisionError" in r["raises"]["error"]
    assert r["too_long"]["status"] == "skipped" and "budget" in r["too_long"]["reason"]


def test_doctor_is_the_same_command(capsys):
    from deployments.cli import build_parser as cli_parser

    args = cli_parser().parse_args(["doctor", "--device", "cpu", "--budget-s", "5", "--batch-sizes", "1,2"])
    assert args.func.__name__ == "cmd_doctor" and args.batch_sizes == [1, 2] and args.budget_s == 5
    assert {a.dest for a in build_parser()._actions} <= {a.dest for a in cli_parser()._subparsers._group_actions[0]
                                                        .choices["doctor"]._actions}
