"""End-to-end: 2-process DDP (gloo, CPU) training runs of train/main.py via torchrun.

A tiny model on small synthetic scenes trains, checks the fused loss against the reference,
evaluates, checkpoints, is interrupted (``--stop-after``; SIGTERM in a second test) and resumes;
the resumed run must reproduce the uninterrupted run's loss curve, final weights and metrics
bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import uce_fast

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "train" / "main.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.data import StreetScenes, Transform  # noqa: E402

TINY = [
    "--preset", "cpu-small", "--width", "8", "--decoder-channels", "16", "--skip-channels", "8",
    "--atrous-rates", "1,2,3", "--crop", "48", "--synthetic-size", "64",
    "--synthetic-train-size", "24", "--synthetic-val-size", "5", "--batch-size", "4",
    "--beta", "3", "--eval-mc-samples", "3", "--eval-batch-size", "2", "--panels", "1",
    "--log-every", "1", "--no-tensorboard", "--no-progress", "--seed", "3",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("UCE_FAST_BACKEND", None)
    return env


def _command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(MAIN), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(MAIN), *args]


def _run(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_command(nproc, args), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _records(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _logged_iteration(path: Path) -> int:
    """The last logged training iteration of a running job (0 if none yet)."""
    last = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if record["type"] == "train":
                last = record["iteration"]
    return last


def _loss_curve(out_dir: Path) -> dict[int, float]:
    """Iteration -> logged loss; the last record wins (a resumed run re-logs nothing twice)."""
    return {r["iteration"]: r["loss"] for r in _records(out_dir) if r["type"] == "train"}


def _final_state(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_ddp_train_check_eval_stop_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    # BatchNorm on running statistics in the sample passes (the default outside cpu-small)
    args = [*TINY, "--iterations", "10", "--check-every", "3", "--ckpt-every", "4",
            "--eval-every", "5", "--sample-bn", "running"]
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "interrupted"

    out = _check(_run(2, [*args, "--out-dir", str(ref_dir)]))
    assert "2 process(es) on cpu" in out and "final (UCE, 10 iterations" in out
    records = _records(ref_dir)
    parity = [r["parity"] for r in records if r["type"] == "train" and "parity" in r]
    assert len(parity) == 3 and all(p["ok"] and p["ranks"] == 2 for p in parity)
    assert max(p["grad_rel"] for p in parity) <= 1e-4
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["iteration"] for r in evals] == [5, 10]
    final = json.loads((ref_dir / "final.json").read_text())
    # every validation image evaluated exactly once over the two ranks (no padded duplicates)
    val = StreetScenes(5, Transform(train=False), seed=3, split="val", size=64, scene_seed=0)
    assert final["pixels"] == sum(int((val[i][1] != 255).sum()) for i in range(5))
    for key in ("mIoU", "ECE", "mUnc", "AUROC_sigma", "AUROC_conf", "AUROC_MI", "Brier",
                "AURC_sigma", "AURC_conf"):
        assert final[key] is not None and 0.0 <= final[key] <= 2.0, key
    assert final["NLL"] > 0 and len(final["IoU"]) == len(final["classes"]) == 19
    try:
        import PIL  # noqa: F401  (panels need pillow; without it the run says so and goes on)
    except ImportError:
        assert "panels off: pillow is not installed" in out
    else:
        assert (ref_dir / "panels" / "iter0000010_0.png").is_file()
    timing = [r["time_ms"] for r in records if r["type"] == "train"][-1]
    assert {"data", "forward", "samples", "loss", "backward", "optimizer"} <= timing.keys()

    # 6 iterations per epoch: interrupted after 7 (mid-epoch, between checkpoints), resumed
    out = _check(_run(2, [*args, "--out-dir", str(cut_dir), "--stop-after", "7"]))
    assert "stopped at iteration 7" in out
    assert torch.load(cut_dir / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 7
    out = _check(_run(2, [*args, "--out-dir", str(cut_dir), "--resume", "auto"]))
    assert "resumed from" in out and "at iteration 7" in out

    reference, resumed = _loss_curve(ref_dir), _loss_curve(cut_dir)
    assert sorted(reference) == list(range(1, 11))
    assert resumed == reference  # bit for bit (floats compared exactly)
    ref_state, cut_state = _final_state(ref_dir), _final_state(cut_dir)
    assert all(torch.equal(ref_state[k], cut_state[k]) for k in ref_state)
    resumed_final = json.loads((cut_dir / "final.json").read_text())
    for key in ("mIoU", "ECE", "mUnc", "AUROC_sigma", "AUROC_conf", "AUROC_MI", "NLL", "Brier",
                "AURC_sigma", "AURC_conf", "pixels"):
        assert resumed_final[key] == final[key], key


def test_sigterm_checkpoints_at_a_step_boundary_and_resumes_exactly(tmp_path):
    # a long schedule, stopped by SIGTERM to torchrun (forwarded to both workers) once a few
    # steps are logged; then resumed up to a fixed iteration and compared with a run that was
    # never interrupted
    # (with a DataLoader worker per rank: torchrun signals the whole process group)
    args = [*TINY, "--iterations", "400", "--check-every", "0", "--ckpt-every", "0",
            "--eval-every", "0", "--num-workers", "1"]
    run_dir, ref_dir = tmp_path / "terminated", tmp_path / "reference"
    proc = subprocess.Popen(_command(2, [*args, "--out-dir", str(run_dir)]), cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if _logged_iteration(run_dir / "metrics.jsonl") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stopped = [r for r in _records(run_dir) if r["type"] == "stopped"]
    assert stopped and stopped[0]["reason"] == "SIGTERM", output[-4000:]
    k = stopped[0]["iteration"]
    assert 2 <= k < 400
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == k and len(ckpt["rng"]) == 2

    stop = str(k + 3)
    _check(_run(2, [*args, "--out-dir", str(run_dir), "--resume", "auto", "--stop-after", stop]))
    _check(_run(2, [*args, "--out-dir", str(ref_dir), "--stop-after", stop]))
    reference, resumed = _loss_curve(ref_dir), _loss_curve(run_dir)
    assert sorted(reference) == list(range(1, k + 4))
    assert resumed == reference


def test_alpha_warmup_ramps_and_resumes_exactly(tmp_path):
    # one process: the exponent of step i is alpha * i / 4 for the first 4 steps (step 0 is
    # plain CE without sample passes), and a run stopped inside the warm-up continues the ramp
    args = [*TINY, "--iterations", "6", "--alpha-warmup", "4", "--check-every", "2",
            "--ckpt-every", "0", "--eval-every", "0", "--eval-mc-samples", "0", "--alpha", "8"]
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "interrupted"
    out = _check(_run(1, [*args, "--out-dir", str(ref_dir)]))
    assert "alpha warm-up: linear from 0 to 8 over the first 4 iterations" in out
    records = [r for r in _records(ref_dir) if r["type"] == "train"]
    assert [r["alpha"] for r in records] == [0.0, 2.0, 4.0, 6.0, 8.0, 8.0]
    assert all(r["parity"]["ok"] for r in records if "parity" in r)
    final = json.loads((ref_dir / "final.json").read_text())
    assert final["alpha_warmup_iterations"] == 4 and final["mUnc"] is None
    _check(_run(1, [*args, "--out-dir", str(cut_dir), "--stop-after", "2"]))
    _check(_run(1, [*args, "--out-dir", str(cut_dir), "--resume", "auto"]))
    assert _loss_curve(cut_dir) == _loss_curve(ref_dir)
    resumed = [r for r in _records(cut_dir) if r["type"] == "train"]
    assert [r["alpha"] for r in resumed] == [0.0, 2.0, 4.0, 6.0, 8.0, 8.0]


@pytest.mark.skipif("cpu" not in uce_fast.available_backends(),
                    reason="needs the compiled CPU backend (differs from 'torch' by rounding)")
def test_parity_failure_stops_with_a_clear_error(tmp_path):
    proc = _run(1, [*TINY, "--iterations", "3", "--check-every", "1", "--check-tol", "0",
                    "--backend", "cpu", "--out-dir", str(tmp_path)])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert "parity check failed at iteration 1" in out and "beyond --check-tol" in out
    assert (tmp_path / "parity_failure_rank0.pt").is_file()
