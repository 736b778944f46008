"""The CE/U-CE comparison driver: aggregation over seeds, paired differences, the report, and
resuming (no training: fake final.json files)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.compare import RUNS, WARMUP, aggregate, main, render_markdown  # noqa: E402
from train.street import STREET_CLASSES  # noqa: E402

KEYS = ("mIoU", "ECE", "NLL", "Brier", "mUnc", "AUROC_sigma", "AUROC_conf", "AUROC_MI",
        "AURC_sigma", "AURC_conf", "wall_seconds")


def _final(miou: float, seed: int, shift: float = 0.0) -> dict:
    values = {key: 0.1 * (k + 1) + shift for k, key in enumerate(KEYS)}
    values["mIoU"] = miou
    iou = [0.5 + 0.01 * k + shift for k in range(19)]
    iou[STREET_CLASSES.index("train")] = None  # absent from the validation images
    return dict(values, IoU=iou, classes=list(STREET_CLASSES), dataset="street", seed=seed)


def _write(out: Path, run: str, seed: int, final: dict) -> None:
    d = out / run / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "final.json").write_text(json.dumps(final))


def _results():
    ce = {0: _final(0.50, 0), 1: _final(0.60, 1), 2: _final(0.55, 2)}
    uce = {0: _final(0.52, 0, 0.01), 1: _final(0.59, 1, 0.01), 2: _final(0.58, 2, 0.01)}
    return {"ce": ce, "uce": uce}


def test_mean_std_and_paired_differences():
    summary = aggregate(_results())
    ce = summary["runs"]["ce"]["mIoU"]
    assert ce["mean"] == pytest.approx(0.55) and ce["n"] == 3
    assert ce["std"] == pytest.approx(statistics.stdev([0.50, 0.60, 0.55]))  # sample std
    diff = summary["paired"]["uce"]["mIoU"]
    d = [0.02, -0.01, 0.03]
    assert diff["mean"] == pytest.approx(statistics.mean(d))
    assert diff["std"] == pytest.approx(statistics.stdev(d))
    assert diff["ahead"] == 2 and diff["n"] == 3
    assert diff["ci95"] == pytest.approx(4.303 * statistics.stdev(d) / math.sqrt(3))
    # lower is better for ECE: +0.01 everywhere means behind on every seed
    assert summary["paired"]["uce"]["ECE"]["ahead"] == 0
    assert summary["paired"]["uce"]["AUROC_MI"]["ahead"] == 3
    assert summary["paired"]["uce"]["mUnc"]["ahead"] is None  # no better direction
    # per-class IoU: mean over seeds; absent classes skipped
    assert summary["classes"]["ce"]["rider"]["mean"] == pytest.approx(0.5 + 0.01 * 12)
    assert summary["classes"]["ce"]["train"]["n"] == 0
    assert summary["paired"]["uce"]["IoU"]["rider"]["mean"] == pytest.approx(0.01)
    assert "road" not in summary["rare_classes"] and "rider" in summary["rare_classes"]
    assert len(summary["rare_classes"]) == 13


def test_pairs_only_common_seeds_and_single_seed_has_no_std():
    results = _results()
    del results["uce"][2]
    results["ce"] = {s: results["ce"][s] for s in (0, 1, 2)}
    summary = aggregate(results)
    assert summary["paired"]["uce"]["seeds"] == [0, 1]
    one = aggregate({"ce": {0: _final(0.5, 0)}})
    assert one["runs"]["ce"]["mIoU"]["std"] is None and one["paired"] == {}


def test_markdown_report_has_every_metric_and_the_rare_classes():
    summary = aggregate(_results())
    text = render_markdown(summary, command="python -m train.compare --seeds 0,1,2")
    assert "`python -m train.compare --seeds 0,1,2`" in text
    for title in ("mIoU", "ECE", "NLL", "Brier", "mUnc", "AUROC σ", "AUROC 1−conf",
                  "AUROC MI", "AURC σ", "AURC 1−conf", "wall time"):
        assert title in text, title
    assert "| CE | 0.550 ± 0.050 |" in text
    assert "+0.013 ± 0.021 (2/3)" in text  # paired mIoU difference, seeds ahead
    assert "| rider |" in text and "| road |" not in text


def test_driver_skips_finished_runs_and_refuses_mixed_settings(tmp_path, capsys):
    out = tmp_path / "cmp"
    for run, by_seed in _results().items():
        for seed, final in by_seed.items():
            _write(out, run, seed, final)
    (out / "compare.json").write_text(json.dumps(
        {"train_options": ["--iterations", "5"], "runs": {r: RUNS[r][1] for r in ("ce", "uce")},
         "nproc": 1}))
    # finished runs are skipped; nothing is trained
    assert main(["--out", str(out), "--runs", "ce,uce", "--iterations", "5"]) == 0
    printed = capsys.readouterr().out
    assert "ce seed 0: done" in printed and "uce seed 2: done" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["uce"]["mIoU"]["n"] == 3
    assert (out / "summary.md").read_text().startswith("Command: `python -m train.compare")
    # another setting into the same directory is refused
    assert main(["--out", str(out), "--runs", "ce", "--iterations", "7"]) == 2
    # an interrupted run is continued from its checkpoint; the warm-up run uses the fixed 25%
    (out / "uce-warmup" / "seed0" / "checkpoints").mkdir(parents=True)
    (out / "uce-warmup" / "seed0" / "checkpoints" / "last.pt").write_bytes(b"")
    assert main(["--out", str(out), "--runs", "uce-warmup", "--seeds", "0,1", "--dry-run",
                 "--iterations", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"--alpha-warmup {WARMUP}" in printed and WARMUP == "25%"
    seed0 = next(line for line in printed.splitlines() if "uce-warmup seed 0" in line)
    seed1 = next(line for line in printed.splitlines() if "uce-warmup seed 1" in line)
    assert seed0.endswith("--resume auto") and "--resume" not in seed1


def test_driver_options_are_checked():
    with pytest.raises(SystemExit):
        main(["--seed", "3", "--dry-run"])  # not an abbreviation of --seeds
    with pytest.raises(SystemExit):
        main(["--runs", "ce,focal", "--dry-run"])
    with pytest.raises(SystemExit):
        main(["--out-dir", "x", "--dry-run"])


def _with_anomaly(final: dict, ap: float, fpr: float) -> dict:
    metrics = dict(AP=ap, FPR95=fpr, AUROC=0.9, sIoU_gt=0.3, PPV=0.4, F1_mean=0.2,
                   threshold=0.5)
    return dict(final, anomaly={"msp": dict(metrics),
                                "mc_sigma": dict(metrics, AP=ap / 2)})


def test_anomaly_metrics_are_aggregated_and_reported_per_score():
    ce = {s: _with_anomaly(_final(0.5, s), ap, 0.6) for s, ap in zip((0, 1, 2), (0.2, 0.3, 0.4),
                                                                     strict=True)}
    em = {s: _with_anomaly(_final(0.5, s), ap, fpr) for s, ap, fpr in
          zip((0, 1, 2), (0.5, 0.4, 0.6), (0.5, 0.7, 0.4), strict=True)}
    summary = aggregate({"ce": ce, "ce-em": em})
    assert summary["anomaly_scores"] == ["msp", "mc_sigma"]  # the report's order
    assert summary["runs"]["ce"]["anomaly/msp/AP"]["mean"] == pytest.approx(0.3)
    assert summary["runs"]["ce-em"]["anomaly/mc_sigma/AP"]["mean"] == pytest.approx(0.25)
    diff = summary["paired"]["ce-em"]["anomaly/msp/AP"]
    d = [0.3, 0.1, 0.2]
    assert diff["mean"] == pytest.approx(0.2) and diff["ahead"] == 3
    assert diff["ci95"] == pytest.approx(4.303 * statistics.stdev(d) / math.sqrt(3))
    # FPR95: lower is better
    assert summary["paired"]["ce-em"]["anomaly/msp/FPR95"]["ahead"] == 2
    text = render_markdown(summary, {"ce": "CE", "ce-em": "CE + EM"})
    assert "| CE + EM | 1−MSP | 0.500 ± 0.100 | 0.533 ± 0.153 |" in text
    assert "| CE + EM | MC σ | 0.250 ± 0.050 |" in text
    assert "| CE + EM | 1−MSP | +0.200 ± 0.100 (3/3) | -0.067 ± 0.153 (2/3) |" in text
    lo, hi = 0.2 - 4.303 * 0.1 / math.sqrt(3), 0.2 + 4.303 * 0.1 / math.sqrt(3)
    assert f"[{lo:+.3f}, {hi:+.3f}] |" in text
    # runs without the anomaly track: no anomaly tables
    assert "Anomaly track" not in render_markdown(aggregate(_results()))


def test_entropy_maximisation_runs_use_the_fixed_proxies():
    assert RUNS["ce-em"][1] == ["--loss", "ce", "--ood-proxies", "0.1"]
    assert RUNS["uce-warmup-em"][1] == ["--loss", "uce", "--alpha-warmup", WARMUP,
                                        "--ood-proxies", "0.1"]
    with pytest.raises(SystemExit):
        main(["--ood-proxies", "0.3", "--dry-run"])  # set by the runs
