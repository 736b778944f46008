"""The training run: setup (DDP, data, model, optimiser), the step loop, evaluation, checkpoints."""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

import uce_fast
from train.checkpoint import (
    atomic_save,
    gather_rng_states,
    load_checkpoint,
    resolve_resume,
    set_rng_state,
)
from train.config import alpha_at, parse_args, sample_levers, warmup_iterations
from train.data import (
    IGNORE_INDEX,
    OOD_LABEL,
    SYNTHETIC_DATASETS,
    DatasetError,
    ResumableDistributedSampler,
    Transform,
    build_dataset,
    dataset_classes,
)
from train.engine import (
    ANOMALY_SCORES,
    amp_context,
    compute_loss,
    draw_mc_samples,
    evaluate,
    evaluate_anomalies,
    init_batchnorm_statistics,
    parity_check,
)
from train.models import build_model, param_groups
from train.monitor import Progress, RunLogger, StepTimer
from train.visualize import CITYSCAPES_PALETTE, SYNTHETIC_PALETTE, save_anomaly_panel, save_panel
from uce_fast.functional import resolve_backend

__all__ = ["main", "run"]

_STOP_REQUESTED = False


def _on_sigterm(signum: int, frame: object) -> None:
    global _STOP_REQUESTED
    _STOP_REQUESTED = True


def _worker_init(worker_id: int) -> None:
    # The main process handles SIGTERM (checkpoint at the next step boundary); workers, which
    # torchrun signals together with it, keep serving batches until the loader is closed. Only
    # a SIGTERM from the main process itself ends a worker: multiprocessing's end of its
    # daemonic children at exit, which persistent workers still open then rely on.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _end_on_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(args: argparse.Namespace) -> DistInfo:
    """Read torchrun's environment, pick the device and start the process group (nccl on GPU,
    gloo on CPU) when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available in this torch build/machine")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        cores = (os.cpu_count() or 1) // max(local_world, 1)
        if not use_cuda:
            # On the CPU the loader's workers render on cores of their own: the step gets the
            # rest (on 2 cores with one worker, 1 thread: 239 vs 453 ms a default step).
            cores -= args.num_workers
        torch.set_num_threads(max(1, cores))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


class ParityError(RuntimeError):
    pass


def run(args: argparse.Namespace, info: DistInfo) -> dict[str, object]:
    """Train (or continue) per ``args``; returns the final evaluation metrics."""
    wall_start = time.perf_counter()
    device, rank, world = info.device, info.rank, info.world_size
    out_dir = Path(args.out_dir)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.batch_size % world or args.batch_size < world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a positive multiple of the "
                         f"number of processes ({world})")
    per_rank_batch = args.batch_size // world

    # ---------------------------------------------------------------------------------- data
    train_tf = Transform(train=True, crop=args.crop, scale_min=args.scale[0],
                         scale_max=args.scale[1], flip=not args.no_flip,
                         normalize=args.normalize)
    eval_tf = Transform(train=False, normalize=args.normalize)
    common = dict(root=args.data_root, seed=args.seed, conditions=args.acdc_conditions,
                  synthetic_size=args.synthetic_size, scene_seed=args.scene_seed)
    train_set = build_dataset(args.dataset, "train", train_tf,
                              synthetic_length=args.synthetic_train_size,
                              label_noise=args.label_noise, ood_proxies=args.ood_proxies,
                              **common)
    val_set = build_dataset(args.dataset, "val", eval_tf,
                            synthetic_length=args.synthetic_val_size, **common)
    # The anomaly track: validation scenes with objects of kinds no training image has.
    anomaly_set = None
    if args.anomaly_val_size > 0:
        anomaly_set = build_dataset(args.dataset, "anomaly", eval_tf,
                                    synthetic_length=args.anomaly_val_size, **common)
    # Entropy maximisation on the OoD proxies pasted into training images.
    ood_index = OOD_LABEL if args.ood_proxies > 0 else None
    ood_weight = args.ood_weight if ood_index is not None else None
    classes = dataset_classes(args.dataset)
    num_classes = len(classes)
    palette = SYNTHETIC_PALETTE if args.dataset == "shapes" else CITYSCAPES_PALETTE
    if args.val_limit > 0:
        val_set = Subset(val_set, range(min(args.val_limit, len(val_set))))
    # exact sharding: every validation image on exactly one rank, no padding duplicates
    val_shard = Subset(val_set, range(rank, len(val_set), world))
    sampler = ResumableDistributedSampler(train_set, world, rank, seed=args.seed)
    iters_per_epoch = sampler.num_samples // per_rank_batch
    if iters_per_epoch == 0:
        raise SystemExit(f"the training set ({len(train_set)} images) is smaller than one batch")
    total = args.iterations if args.iterations > 0 else args.epochs * iters_per_epoch
    cuda = device.type == "cuda"
    # Worker processes load (render) the next batches while this process computes. The training
    # loader's stay (not restarted at every epoch) and work at least four batches ahead; the
    # evaluation loaders' end with each pass, whose new iterator draws from the global RNG as
    # before (resumed runs evaluate exactly as uninterrupted ones).
    workers = args.num_workers > 0
    loader_kw = dict(num_workers=args.num_workers, pin_memory=cuda,
                     worker_init_fn=_worker_init if workers else None)
    train_loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler,
                              drop_last=True, generator=torch.Generator().manual_seed(args.seed),
                              persistent_workers=workers,
                              prefetch_factor=max(2, 4 // args.num_workers) if workers else None,
                              **loader_kw)
    val_loader = DataLoader(val_shard, batch_size=args.eval_batch_size, shuffle=False,
                            drop_last=False, **loader_kw)
    anomaly_loader = None
    if anomaly_set is not None:
        anomaly_loader = DataLoader(Subset(anomaly_set, range(rank, len(anomaly_set), world)),
                                    batch_size=args.eval_batch_size, shuffle=False,
                                    drop_last=False, **loader_kw)

    # --------------------------------------------------------------------------------- model
    _seed_everything(args.seed)  # identical initialisation on every rank
    model = build_model(num_classes, args.encoder, args.dropout, args.width,
                        args.decoder_channels, args.skip_channels, args.atrous_rates,
                        pretrained=args.pretrained)
    if args.sync_bn and not info.distributed:
        print("note: --sync-bn has no effect in a single process", flush=True)
    if args.sync_bn and info.distributed:
        if not cuda:
            raise SystemExit("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) \
        if info.distributed else model
    _seed_everything(args.seed + 1 + rank)  # per-rank dropout masks

    optimizer = torch.optim.SGD(param_groups(model, args.lr, args.decoder_lr_mult), lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    power = args.poly_power
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max(0.0, 1.0 - min(it, total) / total) ** power)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    # the poly schedule advances every iteration, also when the GradScaler skips a step
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
    autocast = amp_context(device, args.amp)
    criterion = uce_fast.UCELoss(alpha=args.alpha, ignore_index=IGNORE_INDEX,
                                 backend=args.backend, ood_index=ood_index,
                                 ood_weight=ood_weight) if args.loss == "uce" else None
    logits_dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    levers = sample_levers(args)
    backend = resolve_backend(args.backend, device, (logits_dtype,)) if criterion else "-"
    warmup = warmup_iterations(args.alpha_warmup, total) if criterion is not None else 0

    # -------------------------------------------------------------------------------- resume
    iteration, epoch, step_in_epoch = 0, 0, 0
    ckpt_path = resolve_resume(args.resume, out_dir)
    logger = RunLogger(out_dir, rank, fresh=ckpt_path is None,
                       tensorboard=not args.no_tensorboard)
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        iteration, epoch, step_in_epoch = (int(state["iteration"]), int(state["epoch"]),
                                           int(state["step_in_epoch"]))
        rng_states = state["rng"]
        exact = state["world_size"] == world and state["batch_size"] == args.batch_size
        if exact:
            set_rng_state(rng_states[rank], device)
        else:
            logger.print(f"warning: checkpoint from {state['world_size']} processes with batch "
                         f"{state['batch_size']}, now {world} with {args.batch_size}: continuing, "
                         "but not as an exact continuation")
        logger.print(f"resumed from {ckpt_path} at iteration {iteration} (epoch {epoch}, step "
                     f"{step_in_epoch})")
        logger.record("resume", iteration, path=str(ckpt_path), exact=exact)
    else:
        logger.record("config", 0, args=vars(args), world_size=world, device=str(device),
                      backend=backend, torch=torch.__version__, uce_fast=uce_fast.__version__,
                      parameters=sum(p.numel() for p in model.parameters()),
                      train_images=len(train_set), val_images=len(val_set),
                      iterations=total, iterations_per_epoch=iters_per_epoch,
                      alpha_warmup_iterations=warmup, classes=list(classes))
    logger.print(
        f"{args.loss.upper()} | {args.dataset} ({len(train_set)} train / {len(val_set)} val, "
        f"{num_classes} classes) | DeepLabV3+ {args.encoder} width {args.width} | {world} "
        f"process(es) on {device}, batch {args.batch_size} ({per_rank_batch}/process), crop "
        f"{args.crop} | {total} iterations ({iters_per_epoch}/epoch) | amp {args.amp} | "
        f"uce_fast backend {backend}" + (f", β={args.beta} α={args.alpha:g}"
                                         if criterion else "")
    )
    if criterion is not None:
        used = [name for name, on in (
            ("shared prefix", levers.shared_prefix),
            ("training pass as a sample", levers.train_pass_sample),
            (f"{levers.per_forward} per forward", levers.per_forward > 1),
            ("low resolution", args.low_res_samples)) if on]
        logger.print(f"MC sample passes: BatchNorm {args.sample_bn}"
                     + (f"; {', '.join(used)}" if used else ""))
        if warmup > 0:
            logger.print(f"alpha warm-up: linear from 0 to {args.alpha:g} over the first "
                         f"{warmup} iterations")
    if args.label_noise > 0:
        logger.print(f"label noise: each object of a training image relabelled with "
                     f"probability {args.label_noise:g}")
    if ood_index is not None:
        logger.print(f"OoD proxies pasted into {args.ood_proxies:.0%} of the training images, "
                     f"labelled {ood_index}; entropy maximisation with weight "
                     f"{ood_weight:g}")
    if anomaly_set is not None:
        logger.print(f"anomaly track: {len(anomaly_set)} scenes with unknown objects, evaluated "
                     "at the end")
    if args.pretrained is None and args.dataset not in SYNTHETIC_DATASETS:
        logger.print("warning: no --pretrained weights; the paper starts from ImageNet weights")
    if args.check_every > 0 and criterion is None:
        logger.print("note: the parity check applies to --loss uce only")

    # ---------------------------------------------------------------------- helpers (closures)
    def save_checkpoint() -> None:
        rng = gather_rng_states(device)  # collective: every rank calls it
        if rank != 0:
            return
        ep, step = (epoch + 1, 0) if step_in_epoch >= iters_per_epoch else (epoch, step_in_epoch)
        atomic_save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "iteration": iteration, "epoch": ep, "step_in_epoch": step, "rng": rng,
            "world_size": world, "batch_size": args.batch_size, "total_iterations": total,
            "args": {k: v if not isinstance(v, tuple) else list(v) for k, v in vars(args).items()},
        }, out_dir / "checkpoints" / "last.pt")

    def run_eval() -> dict[str, object]:
        start = time.perf_counter()
        if info.distributed:  # every rank evaluates rank 0's BatchNorm statistics (as saved)
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        panels_left = [args.panels if rank == 0 else 0]
        panel_dir = out_dir / "panels"

        def on_batch(images, labels, pred, uncertainty) -> None:
            for i in range(images.shape[0]):
                if panels_left[0] <= 0:
                    return
                k = args.panels - panels_left[0]
                try:
                    save_panel(panel_dir / f"iter{iteration:07d}_{k}.png", images[i], labels[i],
                               pred[i], uncertainty[i], palette, normalized=args.normalize,
                               uncertainty_name="sigma" if args.eval_mc_samples else "1-conf")
                except ImportError:
                    logger.print("panels off: pillow is not installed")
                    panels_left[0] = 0
                    return
                panels_left[0] -= 1

        result = evaluate(model, val_loader, num_classes, device=device,
                          mc_samples=args.eval_mc_samples, autocast=autocast,
                          seed=args.seed + 7919 * (rank + 1), on_batch=on_batch)
        result["seconds"] = time.perf_counter() - start
        result["epoch"] = epoch
        logger.record("eval", iteration, **result)
        return result

    def run_anomaly_eval() -> dict[str, dict[str, object]]:
        start = time.perf_counter()
        result, panels = evaluate_anomalies(
            model, anomaly_loader, num_classes, device=device, mc_samples=args.eval_mc_samples,
            autocast=autocast, seed=args.seed + 7919 * (rank + 1) + 1,
            keep=args.panels if rank == 0 else 0)
        for k, (image, gt, scores) in enumerate(panels):
            try:
                save_anomaly_panel(out_dir / "panels" / f"anomaly_{k}.png", image, gt, scores,
                                   {name: m["threshold"] for name, m in result.items()},
                                   {name: ANOMALY_SCORES[name] for name in scores},
                                   normalized=args.normalize)
            except ImportError:
                logger.print("panels off: pillow is not installed")
                break
        logger.record("anomaly", iteration, seconds=time.perf_counter() - start, **result)
        return result

    def fmt(result: dict[str, object]) -> str:
        def f(key: str, digits: int = 4) -> str:
            v = result.get(key)
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) \
                else f"{v:.{digits}f}"
        return (f"mIoU {f('mIoU')}  ECE {f('ECE')}  NLL {f('NLL')}  Brier {f('Brier')}  "
                f"mUnc {f('mUnc')}  AUROC(sigma) {f('AUROC_sigma')}  "
                f"AUROC(1-conf) {f('AUROC_conf')}  AUROC(MI) {f('AUROC_MI')}  "
                f"AURC(sigma) {f('AURC_sigma')}  AURC(1-conf) {f('AURC_conf')}")

    def fmt_classes(result: dict[str, object]) -> str:
        return ", ".join(f"{name} {'n/a' if v is None else f'{v:.3f}'}"
                         for name, v in zip(classes, result["IoU"], strict=True))

    # Only the sample passes with --sample-bn running read the running statistics before
    # training has updated them (evaluation comes later).
    if (ckpt_path is None and args.bn_init_batches > 0 and criterion is not None
            and args.sample_bn == "running"):
        sampler.set_epoch(0)
        batches = (images.to(device, non_blocking=True) for images, _ in
                   itertools.islice(iter(train_loader), args.bn_init_batches))
        layers, used = init_batchnorm_statistics(model, batches, autocast=autocast)
        if layers:
            logger.print(f"BatchNorm running statistics of {layers} fresh layers set from {used} "
                         "training batches (the MC sample passes normalise with them)")

    # ---------------------------------------------------------------------------- main loop
    signal.signal(signal.SIGTERM, _on_sigterm)
    timer = StepTimer(device)
    progress = Progress(total, iteration, rank == 0, not args.no_progress)
    last_eval: dict[str, object] | None = None
    last_eval_iteration = -1
    stopped = None
    net.train()
    try:
        while iteration < total and stopped is None:
            sampler.set_epoch(epoch, step_in_epoch * per_rank_batch)
            timer.start()
            for images, labels in train_loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                timer.lap("data")
                check = (criterion is not None and args.check_every > 0
                         and (iteration + 1) % args.check_every == 0)
                with autocast():
                    parts = net(images, parts=True)
                logits = parts.logits
                timer.lap("forward")
                samples = stack = None
                alpha = alpha_at(args.alpha, iteration, warmup) if criterion is not None \
                    else 0.0
                if alpha == 0.0:  # all weights 1: plain CE, no sample passes to draw (the
                    check = False  # timing's "samples" is a mean over all steps, these at 0)
                if criterion is not None and alpha != 0.0:
                    samples, stack = draw_mc_samples(
                        model, images, args.beta, bn=args.sample_bn, autocast=autocast,
                        size=tuple(logits.shape[-2:]) if args.low_res_samples else None,
                        keep_stack=check, backend=args.backend, levers=levers, parts=parts)
                    timer.lap("samples")
                del parts
                if check:
                    logits.retain_grad()
                loss = compute_loss(args.loss, criterion, logits, labels, samples, IGNORE_INDEX,
                                    alpha=alpha if criterion is not None else None,
                                    ood_index=ood_index, ood_weight=ood_weight,
                                    backend=args.backend)
                timer.lap("loss")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                timer.lap("backward")
                parity = None
                failed = 0.0
                if check:
                    grad = logits.grad
                    if grad is None or not bool(torch.isfinite(grad).all()):
                        parity = {"skipped": "non-finite logits gradient (overflow; the "
                                             "GradScaler skips this step)"}
                    else:
                        result = parity_check(
                            loss, logits, grad, labels, stack, alpha=alpha,
                            ignore_index=IGNORE_INDEX, tol=args.check_tol,
                            grad_scale=float(scaler.get_scale()) if scaler.is_enabled() else 1.0,
                            ood_index=ood_index, ood_weight=ood_weight)
                        parity = result.as_dict()
                        if not result.ok:
                            failed = 1.0
                            print(f"rank {rank}: parity check FAILED at iteration "
                                  f"{iteration + 1}: {result.describe()}", file=sys.stderr,
                                  flush=True)
                            torch.save({"logits": logits.detach().cpu(), "target": labels.cpu(),
                                        "samples": stack.cpu(), "alpha": args.alpha,
                                        "result": parity},
                                       out_dir / f"parity_failure_rank{rank}.pt")
                    timer.lap("check")
                lrs = [group["lr"] for group in optimizer.param_groups]  # used by this step
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                timer.lap("optimizer")
                timer.end_step()
                del logits, samples, stack
                iteration += 1
                step_in_epoch += 1

                # one small collective per step: mean loss, stop requests, parity failures
                flags = torch.tensor([float(loss.detach()), float(_STOP_REQUESTED), failed],
                                     dtype=torch.float64, device=device)
                if info.distributed:
                    dist.all_reduce(flags)
                mean_loss = float(flags[0]) / world
                stop_requested, any_failed = flags[1] > 0, flags[2] > 0

                if check and info.distributed:  # the worst differences over all ranks
                    assert parity is not None
                    skipped = "skipped" in parity
                    keys = ("loss_rel", "grad_rel", "loss_abs", "grad_abs")
                    worst = torch.tensor([0.0 if skipped else parity[k] for k in keys]
                                         + [float(skipped)], dtype=torch.float64, device=device)
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                    if not skipped:
                        parity.update({k: float(v) for k, v in zip(keys, worst, strict=False)})
                        parity.update(ok=not bool(any_failed), ranks=world,
                                      skipped_on_a_rank=bool(worst[4] > 0))
                if any_failed:
                    logger.record("parity_failure", iteration, parity=parity)
                    raise ParityError(
                        f"parity check failed at iteration {iteration}: the {backend!r} backend "
                        f"and backend='torch' differ beyond --check-tol"
                        + (f": {parity}" if parity else " on another rank")
                        + f"; inputs saved to {out_dir}/parity_failure_rank*.pt")

                if (iteration % args.log_every == 0 or iteration == total or parity is not None
                        or stop_requested):
                    record = dict(epoch=epoch, loss=mean_loss, lr=lrs[0], lr_decoder=lrs[-1],
                                  time_ms=timer.summary())
                    if scaler.is_enabled():
                        record["grad_scale"] = float(scaler.get_scale())
                    if warmup > 0:
                        record["alpha"] = alpha
                    if parity is not None:
                        record["parity"] = parity
                        if "skipped" not in parity:
                            progress.write(
                                f"[{iteration}] parity vs torch: loss rel {parity['loss_rel']:.2e},"
                                f" grad rel {parity['grad_rel']:.2e} (tol "
                                f"{parity['tol']:g}) ok")
                    logger.record("train", iteration, **record)
                progress.update(iteration, loss=f"{mean_loss:.4f}",
                                step=f"{timer.last_step_ms():.0f}ms")

                if args.eval_every > 0 and iteration % args.eval_every == 0 and iteration < total:
                    last_eval = run_eval()
                    last_eval_iteration = iteration
                    progress.write(f"[{iteration}] eval: {fmt(last_eval)}")
                if stop_requested or (iteration == args.stop_after and iteration < total):
                    stopped = "SIGTERM" if stop_requested else f"--stop-after {args.stop_after}"
                    save_checkpoint()
                    break
                if (args.ckpt_every > 0 and iteration % args.ckpt_every == 0) or \
                        iteration == total:
                    save_checkpoint()
                if iteration >= total:
                    break
                timer.start()
            else:
                epoch, step_in_epoch = epoch + 1, 0
                continue
            if step_in_epoch >= iters_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
    finally:
        progress.close()

    if stopped is not None:
        logger.record("stopped", iteration, reason=stopped)
        logger.print(f"stopped at iteration {iteration} ({stopped}); checkpoint "
                     f"{out_dir / 'checkpoints' / 'last.pt'}; continue with --resume auto")
        logger.close()
        _barrier(info)
        return {"stopped": stopped, "iteration": iteration}

    if last_eval_iteration != iteration:
        last_eval = run_eval()
    assert last_eval is not None
    anomaly = run_anomaly_eval() if anomaly_loader is not None else None
    wall = time.perf_counter() - wall_start
    timing = timer.overall()
    summary = dict(last_eval, iterations=iteration, loss=args.loss, wall_seconds=wall,
                   time_ms_per_step=timing, classes=list(classes),
                   IoU_per_class=dict(zip(classes, last_eval["IoU"], strict=True)),
                   seed=args.seed,
                   alpha=args.alpha if criterion is not None else None,
                   alpha_warmup_iterations=warmup, dataset=args.dataset,
                   label_noise=args.label_noise, ood_proxies=args.ood_proxies,
                   ood_weight=ood_weight,
                   anomaly=anomaly)
    logger.record("final", iteration, **summary)
    if rank == 0:
        with open(out_dir / "final.json", "w") as f:
            json.dump(summary, f, indent=2, default=str)
    logger.print("time per step (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()))
    logger.print(f"final ({args.loss.upper()}, {iteration} iterations, {wall:.0f} s): "
                 f"{fmt(last_eval)}")
    logger.print(f"IoU per class: {fmt_classes(last_eval)}")
    if anomaly is not None:
        logger.print(f"anomaly track ({len(anomaly_set)} scenes): " + "; ".join(
            f"{name} AP {m['AP']:.3f} FPR95 {m['FPR95']:.3f} AUROC {m['AUROC']:.3f} "
            f"F1 {m['F1_mean']:.3f}" for name, m in anomaly.items()))
    logger.close()
    _barrier(info)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = setup_distributed(args)
    try:
        run(args, info)
    except ParityError as exc:
        print(f"error (rank {info.rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    except (FileNotFoundError, DatasetError) as exc:
        print(f"error (rank {info.rank}): {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if info.distributed and dist.is_initialized():
            # The DDP wrapper of the finished run holds the process group and sits in reference
            # cycles; free it now, while the interpreter is whole, so that the group's worker
            # threads are not torn down during interpreter finalisation (which can abort).
            gc.collect()
            dist.destroy_process_group()
    return 0
