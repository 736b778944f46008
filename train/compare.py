"""CE vs U-CE over several seeds: runs ``train/main.py`` per (run, seed) and reports
mean ± std of every metric, the paired differences to CE, the IoU of the rare classes and,
with ``--anomaly-val-size N``, the anomaly-segmentation metrics of every score.

    python -m train.compare --seeds 0,1,2 [--runs ce,uce,uce-warmup] [--out runs/compare]
                            [--nproc N] [any train/main.py option, e.g. --iterations 300]

Runs are made one after another, each in its own process, into ``<out>/<run>/seed<k>/``. A run
whose ``final.json`` exists is skipped, and one that was interrupted after a checkpoint is
continued with ``--resume auto``, so an interrupted comparison is resumed by repeating the
command. ``<out>/compare.json`` records the runs' options; a later invocation with other
options into the same directory is refused (results of different settings never mix). At the
end (or with ``--aggregate-only``) it writes ``<out>/summary.json`` and ``<out>/summary.md``.

The runs:

* ``ce``: ``--loss ce``.
* ``uce``: ``--loss uce`` (α = 10, β = 10 unless given).
* ``uce-warmup``: ``--loss uce --alpha-warmup 25%``: U-CE's exponent ramped linearly from 0
  over the first quarter of the iterations. The 25% was fixed before any comparison, after the
  ramp-up length of loss-weight schedules in semi-supervised learning (80 of 300 epochs in
  temporal ensembling, Laine & Aila 2017): long enough for a network trained from scratch to
  learn the frequent classes before the weights reach full strength, short enough that three
  quarters of the run use the full α.
* ``ce-em`` and ``uce-warmup-em``: ``ce`` and ``uce-warmup`` with entropy maximisation (Chan,
  Rottmann & Gottschalk, ICCV 2021) on OoD proxy objects pasted into 10% of the training images
  (``--ood-proxies 0.1``) with λ = 0.9 (``--ood-weight``'s default): the released code's
  ``ood_subsampling_factor`` (one proxy image per ten in-distribution ones) and ``pareto_alpha``,
  fixed before any comparison.

Every seed changes initialisation, data order, augmentation and dropout masks; the scenes
(training and validation) are the same for all runs (``--scene-seed``), so the runs of one seed
are paired: they differ only in the loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(ROOT))

__all__ = ["METRICS", "RUNS", "WARMUP", "aggregate", "main", "render_markdown"]

#: The warm-up of the ``uce-warmup`` run (see the module docstring for the reason).
WARMUP = "25%"

#: The share of training images with OoD proxies in the entropy-maximisation runs.
OOD_PROXIES = "0.1"

#: Run name -> (label, train/main.py options).
RUNS: dict[str, tuple[str, list[str]]] = {
    "ce": ("CE", ["--loss", "ce"]),
    "uce": ("U-CE", ["--loss", "uce"]),
    "uce-warmup": (f"U-CE, α warm-up {WARMUP}", ["--loss", "uce", "--alpha-warmup", WARMUP]),
    "ce-em": ("CE + EM", ["--loss", "ce", "--ood-proxies", OOD_PROXIES]),
    "uce-warmup-em": (f"U-CE, α warm-up {WARMUP} + EM",
                      ["--loss", "uce", "--alpha-warmup", WARMUP, "--ood-proxies", OOD_PROXIES]),
}
BASELINE = "ce"

#: (final.json key, column title, +1 higher is better / -1 lower is better / 0 neither).
METRICS: list[tuple[str, str, int]] = [
    ("mIoU", "mIoU", +1),
    ("ECE", "ECE", -1),
    ("NLL", "NLL", -1),
    ("Brier", "Brier", -1),
    ("mUnc", "mUnc", 0),
    ("AUROC_sigma", "AUROC σ", +1),
    ("AUROC_conf", "AUROC 1−conf", +1),
    ("AUROC_MI", "AUROC MI", +1),
    ("AURC_sigma", "AURC σ", -1),
    ("AURC_conf", "AURC 1−conf", -1),
    ("wall_seconds", "wall time (s)", 0),
]
#: Anomaly-track metrics (final.json ``anomaly[score][key]``), as METRICS.
ANOMALY_METRICS: list[tuple[str, str, int]] = [
    ("AP", "AUPRC", +1),
    ("FPR95", "FPR95", -1),
    ("AUROC", "AUROC", +1),
    ("sIoU_gt", "sIoU", +1),
    ("PPV", "PPV", +1),
    ("F1_mean", "mean F1", +1),
]
#: Anomaly score -> its name in the report (train.engine.ANOMALY_SCORES).
SCORE_TITLES = {"msp": "1−MSP", "entropy": "entropy", "mc_msp": "MC 1−MSP",
                "mc_entropy": "MC entropy", "mc_mi": "MC MI", "mc_sigma": "MC σ"}
#: The two Markdown tables of the per-run results.
_TABLES = (("mIoU", "ECE", "NLL", "Brier", "mUnc", "wall_seconds"),
           ("AUROC_sigma", "AUROC_conf", "AUROC_MI", "AURC_sigma", "AURC_conf"))
#: Options the driver sets itself.
_RESERVED = ("--seed", "--out-dir", "--loss", "--alpha-warmup", "--resume", "--stop-after",
             "--ood-proxies")

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else 1.96


def _stats(values: Sequence[float]) -> dict[str, object]:
    """Mean, sample standard deviation (n - 1; None for one value) and n."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _iou(final: dict[str, object], k: int) -> float | None:
    iou = final.get("IoU") or []
    return _number(iou[k]) if k < len(iou) else None


def rare_classes(final: dict[str, object]) -> list[str]:
    """The classes whose IoU the report lists: for the street scenes those with a Cityscapes
    pixel share below 2% (all but road, sidewalk, building, vegetation, sky and car); for
    other datasets every class."""
    classes = list(final.get("classes") or [])
    if final.get("dataset") == "street":
        from train.street import CITYSCAPES_PIXEL_SHARES, STREET_CLASSES
        share = dict(zip(STREET_CLASSES, CITYSCAPES_PIXEL_SHARES, strict=True))
        return [c for c in classes if share.get(c, 0.0) < 2.0]
    return classes


def _anomaly_key(score: str, key: str) -> str:
    return f"anomaly/{score}/{key}"


def _anomaly_scores(results: dict[str, dict[int, dict[str, object]]]) -> list[str]:
    """The anomaly scores any run reports, in train.engine.ANOMALY_SCORES order."""
    found = {score for run in results.values() for final in run.values()
             for score in (final.get("anomaly") or {})}
    return [s for s in SCORE_TITLES if s in found] + sorted(found - set(SCORE_TITLES))


def _flat(final: dict[str, object]) -> dict[str, object]:
    """final.json with its anomaly metrics as flat keys ``anomaly/<score>/<metric>``."""
    flat = dict(final)
    for score, values in (final.get("anomaly") or {}).items():
        for key, value in values.items():
            flat[_anomaly_key(score, key)] = value
    return flat


def aggregate(results: dict[str, dict[int, dict[str, object]]],
              baseline: str = BASELINE) -> dict[str, object]:
    """Summary of ``results[run][seed]`` (each a final.json): per run and metric the mean ±
    std over seeds; per run other than ``baseline`` the paired differences on the seeds both
    have (mean ± std, 95% t-interval half-width, seeds on which the run is ahead); per-class
    IoU (mean ± std, and the mean paired difference); the same for every anomaly metric of
    every score (keys ``anomaly/<score>/<metric>``, scores in ``anomaly_scores``)."""
    scores = _anomaly_scores(results)
    metrics = METRICS + [(_anomaly_key(score, key), title, direction) for score in scores
                         for key, title, direction in ANOMALY_METRICS]
    results = {run: {seed: _flat(final) for seed, final in by_seed.items()}
               for run, by_seed in results.items()}
    summary: dict[str, object] = {"metrics": [m[0] for m in metrics], "runs": {},
                                  "paired": {}, "classes": {}, "baseline": baseline,
                                  "anomaly_scores": scores}
    any_final = next((f for run in results.values() for f in run.values()), None)
    classes = list(any_final.get("classes") or []) if any_final else []
    rare = rare_classes(any_final) if any_final else []
    summary["class_names"], summary["rare_classes"] = classes, rare
    for run, by_seed in results.items():
        seeds = sorted(by_seed)
        entry: dict[str, object] = {"seeds": seeds}
        for key, _, _ in metrics:
            values = [v for s in seeds if (v := _number(by_seed[s].get(key))) is not None]
            entry[key] = _stats(values)
        summary["runs"][run] = entry
        summary["classes"][run] = {
            name: _stats([v for s in seeds if (v := _iou(by_seed[s], k)) is not None])
            for k, name in enumerate(classes)}
    base = results.get(baseline, {})
    for run, by_seed in results.items():
        if run == baseline or not base:
            continue
        seeds = sorted(set(by_seed) & set(base))
        paired: dict[str, object] = {"seeds": seeds}
        for key, _, direction in metrics:
            diffs = []
            for s in seeds:
                a, b = _number(by_seed[s].get(key)), _number(base[s].get(key))
                if a is not None and b is not None:
                    diffs.append(a - b)
            stats = _stats(diffs)
            stats["ci95"] = (_t95(stats["n"] - 1) * stats["std"] / math.sqrt(stats["n"])
                             if stats["std"] is not None else None)
            stats["ahead"] = (sum(1 for d in diffs if d * direction > 0) if direction else None)
            paired[key] = stats
        iou_diffs: dict[str, object] = {}
        for k, name in enumerate(classes):
            diffs = []
            for s in seeds:
                a, b = _iou(by_seed[s], k), _iou(base[s], k)
                if a is not None and b is not None:
                    diffs.append(a - b)
            stats = _stats(diffs)
            stats["ahead"] = sum(1 for d in diffs if d > 0)
            iou_diffs[name] = stats
        paired["IoU"] = iou_diffs
        summary["paired"][run] = paired
    return summary


def _fmt(stats: dict[str, object], digits: int) -> str:
    if stats is None or stats.get("mean") is None:
        return "–"
    mean = f"{stats['mean']:.{digits}f}"
    if stats.get("std") is None:
        return mean
    return f"{mean} ± {stats['std']:.{digits}f}"


def _digits(key: str) -> int:
    return 0 if key == "wall_seconds" else 3


def _signed(stats: dict[str, object], digits: int) -> str:
    if stats is None or stats.get("mean") is None:
        return "–"
    text = f"{stats['mean']:+.{digits}f}"
    if stats.get("std") is not None:
        text += f" ± {stats['std']:.{digits}f}"
    if stats.get("ahead") is not None:
        text += f" ({stats['ahead']}/{stats['n']})"
    return text


def render_markdown(summary: dict[str, object], labels: dict[str, str] | None = None,
                    command: str | None = None) -> str:
    """The summary as Markdown tables."""
    labels = labels or {run: RUNS[run][0] if run in RUNS else run for run in summary["runs"]}
    titles = {key: title for key, title, _ in METRICS}
    runs = list(summary["runs"])
    lines: list[str] = []
    if command:
        lines += [f"Command: `{command}`", ""]
    seeds = {run: summary["runs"][run]["seeds"] for run in runs}
    lines.append("Seeds: " + "; ".join(f"{labels.get(r, r)} {seeds[r]}" for r in runs)
                 + ". Mean ± sample standard deviation over the seeds.")
    lines.append("")
    for table in _TABLES:
        lines.append("| run | " + " | ".join(titles[k] for k in table) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in table) + " |")
        for run in runs:
            cells = [_fmt(summary["runs"][run][k], _digits(k)) for k in table]
            lines.append(f"| {labels.get(run, run)} | " + " | ".join(cells) + " |")
        lines.append("")
    paired = summary["paired"]
    if paired:
        base = labels.get(summary["baseline"], summary["baseline"])
        lines.append(f"Paired differences to {base} (same seed; mean ± std over seeds, in "
                     "brackets the seeds on which the run is better; 95% t-interval of the "
                     "mean mIoU difference):")
        lines.append("")
        for number, table in enumerate(_TABLES):
            keys = [k for k in table if k != "wall_seconds"]
            extra = " | 95% CI Δ mIoU" if number == 0 else ""
            lines.append("| run − " + base + " | " + " | ".join(f"Δ {titles[k]}" for k in keys)
                         + extra + " |")
            lines.append("| --- | " + " | ".join("---:" for _ in keys)
                         + (" | ---:" if extra else "") + " |")
            for run, diff in paired.items():
                cells = [_signed(diff[k], 3) for k in keys]
                if extra:
                    ci, mean = diff["mIoU"].get("ci95"), diff["mIoU"].get("mean")
                    cells.append(f"[{mean - ci:+.3f}, {mean + ci:+.3f}]" if ci is not None
                                 and mean is not None else "–")
                lines.append(f"| {labels.get(run, run)} | " + " | ".join(cells) + " |")
            lines.append("")
    rare = summary.get("rare_classes") or []
    if rare:
        lines.append("IoU of the rare classes (mean ± std over seeds"
                     + ("; Δ = paired difference to " + labels.get(summary["baseline"],
                                                                  summary["baseline"])
                        if paired else "") + "):")
        lines.append("")
        head = [labels.get(r, r) for r in runs] + [f"Δ {labels.get(r, r)}" for r in paired]
        lines.append("| class | " + " | ".join(head) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in head) + " |")
        for name in rare:
            cells = [_fmt(summary["classes"][r].get(name), 3) for r in runs]
            cells += [_signed(paired[r]["IoU"].get(name), 3) for r in paired]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _render_anomaly(summary, labels)
    return "\n".join(lines)


def _render_anomaly(summary: dict[str, object], labels: dict[str, str]) -> list[str]:
    """The anomaly-track tables: every run and score (mean ± std over seeds), then the paired
    differences to the baseline with the 95% t-interval of the mean AUPRC difference."""
    scores = summary.get("anomaly_scores") or []
    if not scores:
        return []
    runs = [r for r in summary["runs"]
            if any(summary["runs"][r].get(_anomaly_key(s, "AP"), {}).get("n") for s in scores)]
    head = " | ".join(title for _, title, _ in ANOMALY_METRICS)
    rule = " | ".join("---:" for _ in ANOMALY_METRICS)
    lines = ["Anomaly track (unknown objects; pixel-level AUPRC, FPR at 95% TPR and AUROC; "
             "component-level sIoU, PPV and mean F1 over sIoU thresholds 0.25…0.75; mean ± std "
             "over the seeds):", "", f"| run | score | {head} |", f"| --- | --- | {rule} |"]
    for run in runs:
        for score in scores:
            cells = [_fmt(summary["runs"][run].get(_anomaly_key(score, key)), 3)
                     for key, _, _ in ANOMALY_METRICS]
            lines.append(f"| {labels.get(run, run)} | {SCORE_TITLES.get(score, score)} | "
                         + " | ".join(cells) + " |")
    lines.append("")
    paired = {r: d for r, d in summary["paired"].items() if r in runs}
    if paired:
        base = labels.get(summary["baseline"], summary["baseline"])
        lines += [f"Anomaly track, paired differences to {base} (same seed; mean ± std, in "
                  "brackets the seeds on which the run is better; 95% t-interval of the mean "
                  "AUPRC difference):", "",
                  "| run − " + base + " | score | "
                  + " | ".join(f"Δ {title}" for _, title, _ in ANOMALY_METRICS)
                  + " | 95% CI Δ AUPRC |", f"| --- | --- | {rule} | ---: |"]
        for run, diff in paired.items():
            for score in scores:
                cells = [_signed(diff.get(_anomaly_key(score, key)), 3)
                         for key, _, _ in ANOMALY_METRICS]
                ap = diff.get(_anomaly_key(score, "AP")) or {}
                ci, mean = ap.get("ci95"), ap.get("mean")
                cells.append(f"[{mean - ci:+.3f}, {mean + ci:+.3f}]" if ci is not None
                             and mean is not None else "–")
                lines.append(f"| {labels.get(run, run)} | {SCORE_TITLES.get(score, score)} | "
                             + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _train_command(nproc: int) -> list[str]:
    main = str(ROOT / "train" / "main.py")
    if nproc == 1:
        return [sys.executable, main]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", main]


def _load(out: Path, runs: Sequence[str], seeds: Sequence[int]
          ) -> dict[str, dict[int, dict[str, object]]]:
    results: dict[str, dict[int, dict[str, object]]] = {}
    for run in runs:
        for seed in seeds:
            path = out / run / f"seed{seed}" / "final.json"
            if path.is_file():
                results.setdefault(run, {})[seed] = json.loads(path.read_text())
    return results


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    # No abbreviations: options the driver does not know go to train/main.py, so a prefix of
    # one of its own (--seed for --seeds) must not be taken for it.
    p = argparse.ArgumentParser(
        prog="python -m train.compare", allow_abbrev=False,
        description="Train CE, U-CE and U-CE with α warm-up for several seeds (one run after "
                    "another) and report mean ± std of every metric, the paired differences "
                    "to CE and the IoU of the rare classes. Other options go to "
                    "train/main.py (the same for every run).")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"comma-separated runs out of {', '.join(RUNS)} (default: all)")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    p.add_argument("--aggregate-only", action="store_true",
                   help="train nothing; summarise the runs that have finished")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args, extra = p.parse_known_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    args.runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown or not args.runs or not args.seeds:
        p.error(f"--runs: choose from {', '.join(RUNS)} (got {unknown or 'none'}); "
                "--seeds: at least one")
    for option in extra:
        if option.split("=")[0] in _RESERVED:
            p.error(f"{option.split('=')[0]} is set by the driver per run")
    return args, extra


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parse(argv)
    out = Path(args.out)
    command = "python -m train.compare " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    manifest = {"train_options": extra, "runs": {r: RUNS[r][1] for r in args.runs},
                "nproc": args.nproc}
    if not args.aggregate_only and not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "compare.json"
        if path.is_file():
            old = json.loads(path.read_text())
            clash = [r for r in args.runs if r in old.get("runs", {})
                     and old["runs"][r] != RUNS[r][1]]
            if old.get("train_options") != extra or clash:
                print(f"error: {out} holds runs made with other options "
                      f"({old.get('train_options')} vs {extra}); use another --out",
                      file=sys.stderr)
                return 2
            manifest["runs"] = {**old.get("runs", {}), **manifest["runs"]}
        path.write_text(json.dumps(manifest, indent=2) + "\n")

    for run in [] if args.aggregate_only else args.runs:
        for seed in args.seeds:
            run_dir = out / run / f"seed{seed}"
            if (run_dir / "final.json").is_file():
                print(f"{run} seed {seed}: done ({run_dir / 'final.json'})", flush=True)
                continue
            cmd = [*_train_command(args.nproc), *extra, *RUNS[run][1], "--seed", str(seed),
                   "--out-dir", str(run_dir)]
            if (run_dir / "checkpoints" / "last.pt").is_file():
                cmd += ["--resume", "auto"]
            print(f"{run} seed {seed}: {shlex.join(cmd)}", flush=True)
            if args.dry_run:
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            with open(run_dir / "console.log", "a") as log:
                proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(os.environ))
            if proc.returncode != 0:
                tail = (run_dir / "console.log").read_text().splitlines()[-20:]
                print("\n".join(tail), file=sys.stderr)
                print(f"error: {run} seed {seed} failed (exit {proc.returncode}); log "
                      f"{run_dir / 'console.log'}; rerun the same command to continue",
                      file=sys.stderr)
                return 1
            final = json.loads((run_dir / "final.json").read_text())
            print(f"{run} seed {seed}: mIoU {final.get('mIoU'):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    if args.dry_run:
        return 0

    results = _load(out, args.runs, args.seeds)
    if not results:
        print(f"no finished runs under {out}", file=sys.stderr)
        return 1
    summary = aggregate(results)
    summary["command"] = command
    summary["train_options"] = extra
    summary["labels"] = {run: RUNS[run][0] for run in results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = render_markdown(summary, summary["labels"], command)
    (out / "summary.md").write_text(markdown + "\n")
    print(markdown)
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
