"""Command-line options and presets of the training harness."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from train.engine import SampleLevers

__all__ = ["PRESETS", "alpha_at", "build_parser", "parse_args", "sample_levers",
           "warmup_iterations"]

_PAPER = dict(
    encoder="resnet18", width=64, decoder_channels=256, skip_channels=48,
    atrous_rates="12,24,36", batch_size=16, crop=768, epochs=200, iterations=0, amp="fp16",
    num_workers=8, check_every=100, log_every=20, ckpt_every=1000, eval_mc_samples=10,
    eval_batch_size=1, panels=4,
)

#: Preset name -> option defaults (explicit command-line options override them). The paper's
#: settings: DeepLabV3+ with a ResNet-18/101 encoder, batch 16 (across all GPUs), crop 768,
#: SGD 0.01 (decoder and head ×10), momentum 0.9, wd 1e-4, poly 0.9, 200 epochs, fp16 mixed
#: precision, β = 10 MC-dropout samples, α = 10.
_CPU = dict(
    encoder="resnet18", width=16, decoder_channels=64, skip_channels=16, atrous_rates="2,4,6",
    batch_size=8, crop=96, epochs=0, amp="off", check_every=25, log_every=10,
    ckpt_every=100, eval_every=0, eval_mc_samples=10, eval_batch_size=8, panels=4,
    # One worker process renders the scenes while the step computes (a second one, measured on
    # 2 cores, only takes more CPU from the step).
    num_workers=1,
    # From scratch (no ImageNet weights on a CPU box) the running statistics lag behind the
    # fast-changing weights for many steps; sample passes normalised with them give
    # meaningless sigma and U-CE weights of up to ~60 that wreck the run. Batch statistics
    # (running statistics still untouched) keep the samples consistent with the training
    # pass. The paper presets (ImageNet encoders) keep the default "running".
    sample_bn="batch",
)

PRESETS: dict[str, dict[str, object]] = {
    # Street-scene-like synthetic images (Cityscapes' 19 classes and long-tailed pixel shares,
    # 128 × 256): the default, a few minutes on a 2-core CPU. 8192 training scenes, more than
    # the 4000 the run draws, so no training scene is seen twice. 256 validation scenes: trucks,
    # buses and trams appear in ~4% of the scenes each, so fewer validation images would miss
    # some classes altogether (with 64, bus and train never occur); the 256 of scene seed 0
    # hold at least 5 images of every class.
    "cpu-small": dict(_CPU, dataset="street", iterations=500,
                      synthetic_train_size=8192, synthetic_val_size=256, synthetic_size=128),
    # The earlier shapes scenes (7 classes, random labels in ambiguous patches), 128 × 128.
    "cpu-shapes": dict(_CPU, dataset="shapes", iterations=400, synthetic_train_size=2048,
                       synthetic_val_size=64, synthetic_size=128),
    "cityscapes-r18": dict(_PAPER, dataset="cityscapes", data_root="data/cityscapes",
                           eval_every=3720),
    "cityscapes-r101": dict(_PAPER, dataset="cityscapes", data_root="data/cityscapes",
                            encoder="resnet101", eval_every=3720),
    "acdc-r18": dict(_PAPER, dataset="acdc", data_root="data/ACDC", eval_every=2000),
    "acdc-r101": dict(_PAPER, dataset="acdc", data_root="data/ACDC", encoder="resnet101",
                      eval_every=2000),
}


def _rates(text: str) -> tuple[int, ...]:
    try:
        rates = tuple(int(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected three comma-separated ints, got {text!r}") from None
    if len(rates) != 3 or min(rates) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive ints, got {text!r}")
    return rates


def _warmup(text: str) -> str:
    """``N`` (iterations) or ``P%`` (of the run's iterations); returned as given."""
    value = text[:-1] if text.endswith("%") else text
    try:
        number = float(value) if text.endswith("%") else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of iterations or a percentage, got {text!r}") from None
    if number < 0 or (text.endswith("%") and number > 100):
        raise argparse.ArgumentTypeError(f"expected 0..iterations or 0%..100%, got {text!r}")
    return text


def warmup_iterations(spec: str, total: int) -> int:
    """The warm-up length in iterations for ``--alpha-warmup spec`` in a run of ``total``."""
    if spec.endswith("%"):
        return round(float(spec[:-1]) / 100.0 * total)
    return int(spec)


def alpha_at(alpha: float, iteration: int, warmup: int) -> float:
    """U-CE's exponent for the step after ``iteration`` completed ones: a linear ramp from 0 to
    ``alpha`` over ``warmup`` iterations (``alpha`` throughout when ``warmup`` is 0). It depends
    on the iteration only, which checkpoints store, so a resumed run continues the ramp."""
    if warmup <= 0 or iteration >= warmup:
        return alpha
    return alpha * iteration / warmup


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to options that take a value, with X the chosen preset's value;
    not to flags (their default is off) or to options without a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        takes_value = action.nargs != 0
        if (takes_value and action.option_strings and "%(default)" not in text
                and action.default not in (None, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train/main.py",
        description="Train DeepLabV3+ with CE or U-CE (uce_fast), checking the fused loss against "
                    "the pure-PyTorch reference while training. Run with torchrun for DDP.",
        formatter_class=_HelpFormatter,
        epilog="presets: cpu-small (default; street-scene-like synthetic images, tiny "
               "DeepLabV3+ R18, CPU, minutes), cpu-shapes (the earlier shapes scenes), "
               "cityscapes-r18, cityscapes-r101, acdc-r18, acdc-r101 (the paper: "
               "batch 16 over all GPUs, crop 768, 200 epochs, fp16 AMP; give --data-root and "
               "--pretrained). Defaults shown are those of the chosen --preset.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                   help="option defaults for a setting (explicit options override them)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["street", "shapes", "synthetic", "cityscapes", "acdc"],
                   default="street",
                   help="street: street-scene-like images with Cityscapes' 19 classes and "
                        "long-tailed pixel shares, generated on the fly (no files); shapes: "
                        "textured shapes with randomly labelled ambiguous patches (7 classes; "
                        "'synthetic' is its former name)")
    g.add_argument("--data-root", default=None, help="dataset root directory")
    g.add_argument("--acdc-conditions", default="fog,night,rain,snow",
                   help="ACDC conditions to train and evaluate on, comma-separated")
    g.add_argument("--synthetic-train-size", type=int, default=2048,
                   help="synthetic training images per epoch")
    g.add_argument("--synthetic-val-size", type=int, default=64,
                   help="synthetic validation images")
    g.add_argument("--synthetic-size", type=int, default=128,
                   help="synthetic image height (street: width 2×; shapes: square)")
    g.add_argument("--scene-seed", type=int, default=0,
                   help="seed of the synthetic scenes' content; fixed, so that runs with "
                        "different --seed see the same training and validation images")
    g.add_argument("--label-noise", type=float, default=0.0, metavar="P",
                   help="street: relabel each object of a training image with probability P as "
                        "another class (validation labels stay clean); 0 = off")
    g.add_argument("--ood-proxies", type=float, default=0.0, metavar="P",
                   help="street: paste 1-3 OoD proxy objects (furniture, bags, umbrellas, "
                        "balls, ...; kinds no validation or anomaly scene has) into a share P "
                        "of the training images, labelled 254, for entropy maximisation; "
                        "0 = off (the training images unchanged)")
    g.add_argument("--anomaly-val-size", type=int, default=0, metavar="N",
                   help="street: N anomaly-track validation scenes (objects of kinds no "
                        "training image has: animals, lost cargo, debris; labels 1 anomaly, "
                        "0 known, 255 void); 0 = off")
    g.add_argument("--crop", type=int, default=768, help="training crop side (multiple of 16)")
    g.add_argument("--scale", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
                   help="random scale range")
    g.add_argument("--no-flip", action="store_true", help="disable horizontal flips")
    g.add_argument("--normalize", action="store_true",
                   help="normalise images with ImageNet mean/std (the official code does not)")
    g.add_argument("--num-workers", type=int, default=8, help="DataLoader workers per process")
    g.add_argument("--val-limit", type=int, default=0,
                   help="evaluate on the first N validation images only (0 = all)")

    g = p.add_argument_group("model")
    g.add_argument("--encoder", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   default="resnet18", help="DeepLabV3+ encoder")
    g.add_argument("--pretrained", default=None, metavar="PATH",
                   help="local torchvision-format ImageNet weights for the encoder")
    g.add_argument("--width", type=int, default=64, help="encoder base width (64 = ResNet)")
    g.add_argument("--decoder-channels", type=int, default=256,
                   help="channels of the ASPP and decoder convolutions")
    g.add_argument("--skip-channels", type=int, default=48,
                   help="channels of the decoder's low-level (stride 4) skip projection")
    g.add_argument("--atrous-rates", type=_rates, default="12,24,36",
                   help="the three ASPP dilation rates, comma-separated")
    g.add_argument("--dropout", type=float, default=0.2,
                   help="MC-dropout ratio after each residual stage")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP (CUDA)")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=["ce", "uce"], default="uce", help="training loss")
    g.add_argument("--alpha", type=float, default=10.0, help="U-CE exponent")
    g.add_argument("--beta", type=int, default=10, help="MC-dropout samples per step")
    g.add_argument("--alpha-warmup", type=_warmup, default="0", metavar="N|P%",
                   help="warm-up of U-CE (the paper's proposed future work): ramp the "
                        "exponent linearly from 0 to --alpha over the first N iterations (or "
                        "P%% of them); step i uses alpha * min(1, i/N). A ramp rather than N "
                        "steps of CE followed by full U-CE: the weights (1+sigma)^alpha grow "
                        "from 1 (plain CE) as sigma becomes meaningful, without a jump in the "
                        "loss scale at the switch. The sample passes are skipped only where the "
                        "exponent is 0 (the first step). 0 = off, as in the paper")
    g.add_argument("--ood-weight", type=float, default=0.9, metavar="LAMBDA",
                   help="entropy maximisation (Chan et al., ICCV 2021) on the OoD proxy objects "
                        "of --ood-proxies: their pixels get the cross-entropy against the "
                        "uniform distribution, weighted LAMBDA against 1 - LAMBDA for the known "
                        "pixels (with --loss ce and --loss uce alike); in [0, 1), 0 ignores "
                        "them. Default: the paper's")
    g.add_argument("--backend", default="auto", help="uce_fast backend")
    g.add_argument("--sample-bn", choices=["running", "batch", "update"], default="running",
                   help="BatchNorm during the β sample passes: running = eval mode, running "
                        "statistics used and left untouched; batch = statistics of the current "
                        "batch (as the training pass), running statistics untouched; update = "
                        "train mode, running statistics updated on every pass (the official "
                        "code's behaviour)")
    g.add_argument("--bn-update-in-samples", action="store_const", dest="sample_bn",
                   const="update", default=argparse.SUPPRESS, help="same as --sample-bn update")
    g.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="run the layers before the first dropout (stem and layer1) once per "
                        "step instead of in every sample pass; with --sample-bn batch the "
                        "training forward's output of them is reused. Exact. Default: on, except "
                        "with --sample-bn update (the official BatchNorm updates would then run "
                        "once per step in those layers instead of in every pass)")
    g.add_argument("--train-pass-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="count the training forward's detached logits as the first of the β "
                        "samples (β - 1 extra passes): it is a draw from the same distribution "
                        "where the sample passes normalise with batch statistics like it "
                        "(--sample-bn batch or update); refused with --sample-bn running. "
                        "Default: on with --sample-bn batch")
    g.add_argument("--samples-per-forward", type=int, default=1, metavar="K",
                   help="sample passes per batched forward (the batch repeated K times; "
                        "BatchNorm batch statistics computed per original batch, so exact); "
                        "refused with --sample-bn update")
    g.add_argument("--low-res-samples", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the β sample passes at the decoder's 1/4 resolution (before the "
                        "head's ×4 upsampling) and let the MC accumulator upsample them inside "
                        "its kernels (the same statistics, no full-resolution sample in memory, "
                        "and faster)")

    g.add_argument("--bn-init-batches", type=int, default=10,
                   help="with --sample-bn running (the sample passes then normalise with the "
                        "running statistics): before the first step, set the running statistics "
                        "of BatchNorm layers still at their initial values (mean 0, var 1; not "
                        "ImageNet ones) from N training batches, so that the first sample passes "
                        "are meaningful; 0 = off")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of the encoder")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    g.add_argument("--decoder-lr-mult", type=float, default=10.0,
                   help="learning-rate factor of the ASPP, decoder and head")
    g.add_argument("--poly-power", type=float, default=0.9,
                   help="power of the poly learning-rate schedule (per iteration)")
    g.add_argument("--epochs", type=int, default=200,
                   help="training epochs (when --iterations is 0)")
    g.add_argument("--iterations", type=int, default=0, help="total iterations (overrides "
                   "--epochs when > 0)")
    g.add_argument("--batch-size", type=int, default=16, help="global batch (split over ranks)")
    g.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="autocast dtype; fp16 uses a GradScaler")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order, augmentation")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (slower on GPU)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (0: OMP_NUM_THREADS, else cores / local ranks, "
                        "less --num-workers on the CPU)")

    g = p.add_argument_group("parity check")
    g.add_argument("--check-every", type=int, default=100,
                   help="compare the loss and logits gradient with backend='torch' every N "
                        "steps (0 = off)")
    g.add_argument("--check-tol", type=float, default=None,
                   help="relative tolerance (default 1e-4 fp32, 4e-3 fp16, 1e-2 bf16 logits)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N iterations (and always at the end)")
    g.add_argument("--eval-mc-samples", type=int, default=10,
                   help="MC-dropout samples at evaluation (0 = deterministic, no mUnc)")
    g.add_argument("--eval-batch-size", type=int, default=1, help="per process")
    g.add_argument("--panels", type=int, default=4, help="PNG panels per evaluation")

    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default=None,
                   help="run directory (default: runs/<preset>-<loss>)")
    g.add_argument("--log-every", type=int, default=20,
                   help="log the loss and step timing every N iterations")
    g.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N iterations")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint; auto = <out-dir>/checkpoints/last.pt if any")
    g.add_argument("--stop-after", type=int, default=0,
                   help="checkpoint and exit when iteration N is reached (simulates an "
                        "interruption; a resumed run past N continues)")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar or progress lines")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    parser.set_defaults(**PRESETS[known.preset])  # so --help shows the preset's defaults
    args = parser.parse_args(argv)
    if isinstance(args.atrous_rates, str):
        args.atrous_rates = _rates(args.atrous_rates)
    args.acdc_conditions = [c for c in args.acdc_conditions.split(",") if c]
    if args.crop % 16:
        parser.error(f"--crop must be a multiple of 16 (the output stride), got {args.crop}")
    if args.loss == "uce" and args.beta < 2:
        parser.error(f"--beta must be at least 2, got {args.beta}")
    if args.eval_mc_samples == 1 or args.eval_mc_samples < 0:
        parser.error("--eval-mc-samples must be 0 (off) or at least 2")
    if args.iterations <= 0 and args.epochs <= 0:
        parser.error("give --iterations or --epochs")
    if args.samples_per_forward < 1:
        parser.error(f"--samples-per-forward must be at least 1, got {args.samples_per_forward}")
    if args.shared_prefix is None:
        args.shared_prefix = args.sample_bn != "update"
    if args.train_pass_sample is None:
        args.train_pass_sample = args.sample_bn == "batch"
    try:
        sample_levers(args).check(args.sample_bn)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dataset == "synthetic":
        args.dataset = "shapes"
    if not 0.0 <= args.label_noise <= 1.0:
        parser.error(f"--label-noise must be in [0, 1], got {args.label_noise}")
    if args.label_noise and args.dataset != "street":
        parser.error("--label-noise applies to --dataset street only")
    if not 0.0 <= args.ood_proxies <= 1.0:
        parser.error(f"--ood-proxies must be in [0, 1], got {args.ood_proxies}")
    if args.ood_proxies and args.dataset != "street":
        parser.error("--ood-proxies applies to --dataset street only")
    if args.anomaly_val_size < 0:
        parser.error(f"--anomaly-val-size must be at least 0, got {args.anomaly_val_size}")
    if args.anomaly_val_size and args.dataset != "street":
        parser.error("--anomaly-val-size applies to --dataset street only")
    if not 0.0 <= args.ood_weight < 1.0:
        parser.error(f"--ood-weight must be in [0, 1), got {args.ood_weight}")
    if args.alpha_warmup not in ("0", "0%") and args.loss != "uce":
        parser.error("--alpha-warmup applies to --loss uce only")
    if args.out_dir is None:
        args.out_dir = f"runs/{args.preset}-{args.loss}"
    return args


def sample_levers(args: argparse.Namespace) -> SampleLevers:
    """The MC-sampling levers the options ask for."""
    return SampleLevers(shared_prefix=args.shared_prefix, train_pass_sample=args.train_pass_sample,
                        per_forward=args.samples_per_forward)
