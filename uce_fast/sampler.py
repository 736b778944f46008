"""``MCSampler``: MC-dropout samples of any eager model, every exact cost lever found by itself.

The sampler learns the model's structure from one sample pass (the probe), run under
:func:`~uce_fast.mc_dropout` with forward hooks on every submodule and a ``TorchFunctionMode``
that sees each torch call — dropout as modules or as functions, any random op (``bernoulli_`` of
timm's ``DropPath`` and torchvision's ``StochasticDepth``, ``rand``…), and ``F.interpolate``
(which ``nn.Upsample`` and ``UpsamplingBilinear2d`` call too). Hooks and a function mode work on
any eager model without rewriting it (``torch.fx`` cannot trace many segmentation models: data-
dependent shapes, ``ModelOutput`` classes). From the probe:

* **shared prefix**: every module call that finished before the first random op gives the same
  output in every pass (the same inputs, no randomness, BatchNorm as in the passes), so the
  outermost such calls are replayed from a cache in the other passes (each a fresh copy), and
  their outputs are taken from the training forward when it ran on the same inputs in the same
  modes;
* **low-resolution samples**: a bilinear ``F.interpolate`` whose output is the model's logits is
  skipped in the passes; the accumulator resamples inside its kernels with the call's size and
  ``align_corners`` (the same formula, float32);
* **training pass as the first sample**: the training forward's logits (before that final
  upsampling) are an MC sample when its dropout was active and everything else ran as in the
  passes;
* **batched passes** (``per_forward``), as :func:`~uce_fast.mc_sample`.

Each lever is used only where it is exact — the samples equal plain passes drawn under the same
random state — and reported in :attr:`MCSampler.levers`; asked for explicitly (``True``) where it
is not, it raises ``ValueError`` with the reason. A model with no active randomness, or with a
dropout called as a function with ``training=False`` (which :func:`~uce_fast.mc_dropout` cannot
switch on), is refused: its samples would all be equal, σ = 0 and U-CE = CE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from uce_fast.accumulator import MCAccumulator
from uce_fast.sampling import DROPOUT_TYPES, _batch_norm_per_group, forwards_replaced, mc_dropout

__all__ = ["LEVERS", "MCSampler", "add_dropout", "logits_of"]

#: The levers of :class:`MCSampler`, by option name.
LEVERS = ("shared_prefix", "low_res", "train_pass")

# Names (``__name__``) of the torch functions and Tensor methods that draw random numbers.
_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
             "feature_alpha_dropout"}
_RANDOM = _DROPOUTS | {
    "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint",
    "randint_like", "randperm", "normal", "normal_", "uniform_", "multinomial", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "random_", "rrelu", "rrelu_", "native_dropout",
    "poisson", "gumbel_softmax",
}


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor itself, ``output["out"]`` (torchvision) or
    ``["logits"]``, ``output.logits`` (transformers' ``ModelOutput``), or the first element of a
    tuple/list."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        for key in ("out", "logits"):
            if key in output:
                return logits_of(output[key])
    if hasattr(output, "logits"):
        return logits_of(output.logits)
    if isinstance(output, tuple | list) and output:
        return logits_of(output[0])
    raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}; "
                    f"give MCSampler(..., output=fn) with fn(output) -> logits")


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


@dataclass
class _Call:
    """One module call of the probe."""

    module: nn.Module
    name: str
    index: int                  # the how-many-th call of this module in the pass
    parent: _Call | None
    before_random: bool = False  # finished before the first random op
    output: Any = None


@dataclass
class _Interp:
    """One F.interpolate call of the probe."""

    index: int
    input: Tensor
    output: Tensor
    mode: str
    align_corners: bool | None
    scale_factor: Any
    antialias: bool
    feeder: _Call | None        # the module call that finished last before it
    feeder_is_input: bool       # that call's output is this call's input
    stack: tuple[_Call, ...]    # the module calls it ran inside


@dataclass
class _Plan:
    """What the probe found."""

    prefix: list[_Call] = field(default_factory=list)
    final_interp: _Interp | None = None
    random_ops: int = 0
    first_random: str = ""
    interps_in_prefix: int = 0   # F.interpolate calls before the final one, inside prefix calls
    reasons: dict[str, str] = field(default_factory=dict)


class _Probe(TorchFunctionMode):
    """Records random ops and F.interpolate calls, in order with the module calls."""

    def __init__(self, tracker: _Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        t = self.tracker
        if name in _RANDOM:
            if name in _DROPOUTS:
                p = float(_arg(args, kwargs, 1, "p", 0.5))
                training = bool(_arg(args, kwargs, 2, "training", True))
                if p > 0 and not training:
                    where = t.stack[-1].name if t.stack else "the model's forward"
                    t.inactive_dropout = t.inactive_dropout or f"F.{name} in {where!r}"
                    return func(*args, **kwargs)
                if p == 0:
                    return func(*args, **kwargs)
            t.random_ops += 1
            if not t.first_random:
                where = t.stack[-1].name if t.stack else "the model's forward"
                t.first_random = f"{name} in {where!r}"
        out = func(*args, **kwargs)
        if name == "interpolate" and isinstance(out, Tensor):
            t.interps.append(_Interp(
                len(t.interps), args[0], out, _arg(args, kwargs, 3, "mode", "nearest"),
                _arg(args, kwargs, 4, "align_corners", None),
                _arg(args, kwargs, 2, "scale_factor", None),
                bool(kwargs.get("antialias", False)), t.last_exit,
                t.last_output is args[0], tuple(t.stack)))
        return out


class _Tracker:
    """Module-call bookkeeping of the probe (hooks on every submodule)."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[_Call] = []
        self.calls: list[_Call] = []
        self.counts: dict[int, int] = {}
        self.interps: list[_Interp] = []
        self.random_ops = 0
        self.first_random = ""
        self.inactive_dropout = ""
        self.last_exit: _Call | None = None
        self.last_output: Any = None
        names = {id(m): name for name, m in model.named_modules()}
        self.handles = []
        for m in model.modules():
            if m is model:
                continue
            self.handles.append(m.register_forward_pre_hook(self._enter(names[id(m)])))
            self.handles.append(m.register_forward_hook(self._exit, always_call=True))

    def _enter(self, name: str) -> Callable:
        def hook(module, args):
            index = self.counts.get(id(module), 0)
            self.counts[id(module)] = index + 1
            call = _Call(module, name, index, self.stack[-1] if self.stack else None)
            self.stack.append(call)
            self.calls.append(call)
        return hook

    def _exit(self, module, args, output):
        call = self.stack.pop()
        call.before_random = not self.first_random
        if call.before_random:
            call.output = output
        self.last_exit, self.last_output = call, output

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (nested tuples, lists, dicts)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _map_tensors(v, fn)) for k, v in value.items())
    return value


def _repeat(value: Any, k: int, batch: int) -> Any:
    """A cached output for a batched pass of k samples: every batch-leading tensor repeated."""
    def repeat(t: Tensor) -> Tensor:
        if t.dim() == 0 or t.shape[0] != batch:
            raise ValueError("a cached output has no batch dim")
        return t.repeat(k, *([1] * (t.dim() - 1)))
    return _map_tensors(value, repeat)


def _state(model: nn.Module) -> tuple:
    """What must match between the training forward and the sample passes for any reuse: the
    BatchNorm modes and autocast."""
    norms = tuple(m.training for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm))
    autocast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                     for d in ("cpu", "cuda"))
    return norms, autocast


def _dropout_active(model: nn.Module) -> bool:
    return all(m.training for m in model.modules() if isinstance(m, DROPOUT_TYPES))


class _Skip(TorchFunctionMode):
    """In a sample pass: returns the input of the final F.interpolate instead of its output."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index, self.seen = index, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "interpolate":
            self.seen += 1
            if self.seen - 1 == self.index:
                return args[0]
        return func(*args, **kwargs)


class MCSampler:
    """MC-dropout samples of ``model`` into an :class:`MCAccumulator`, the exact levers automatic.

    ``sampler = MCSampler(model)``; in each training step, after the training forward
    ``logits = model(images)`` (logits extracted as :func:`logits_of` does), ``acc =
    sampler.sample(images, beta=10)`` draws the samples and ``criterion(logits, labels, acc)``
    takes them. The first call probes the model (see the module docstring); the levers found are
    in :attr:`levers`. Works in train mode (BatchNorm with batch statistics, never updated by the
    passes) and in eval mode (running statistics), with or without autocast (the caller's).

    Args:
        model: the segmentation network (eager ``nn.Module``).
        output: ``fn(model_output) -> logits``; default :func:`logits_of`.
        shared_prefix, low_res, train_pass: each ``"auto"`` (default: used where exact),
            ``True`` (required: ``ValueError`` where not exact) or ``False`` (off).
        per_forward: passes per batched forward (see :func:`~uce_fast.mc_sample`); default 1.
        backend: backend of the accumulator; default "auto".
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        output: Callable[[Any], Tensor] | None = None,
        shared_prefix: bool | str = "auto",
        low_res: bool | str = "auto",
        train_pass: bool | str = "auto",
        per_forward: int = 1,
        backend: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, value in (("shared_prefix", shared_prefix), ("low_res", low_res),
                            ("train_pass", train_pass)):
            if value not in ("auto", True, False):
                raise ValueError(f"{name} must be 'auto', True or False, got {value!r}")
        if isinstance(per_forward, bool) or not isinstance(per_forward, int) or per_forward < 1:
            raise ValueError(f"per_forward must be a positive int, got {per_forward!r}")
        self.model = model
        self.output = output or logits_of
        self.options = {"shared_prefix": shared_prefix, "low_res": low_res,
                        "train_pass": train_pass}
        self.per_forward = per_forward
        self.backend = backend
        self.levers: dict[str, str] = {}
        self._plan: _Plan | None = None
        self._recorded: dict[str, Any] | None = None
        self._handles: list = []
        self._sampling = False
        #: What the last ``sample`` call reused: ``train_pass`` (the training forward's logits
        #: were the first sample), ``prefix_from_training`` (the prefix outputs came from it),
        #: and ``reuse_refused``: why nothing was reused ("" when it was).
        self.last: dict[str, Any] = {}

    # ------------------------------------------------------------------ public

    def sample(self, inputs: Tensor, beta: int = 10, *, size: tuple[int, int] | None = None,
               align_corners: bool | None = None) -> MCAccumulator:
        """``beta`` MC-dropout samples of the model on ``inputs`` (B, ...), as an accumulator.

        Args:
            inputs: the batch the training forward ran on (the same tensor, for the levers
                that reuse that forward).
            beta: number of samples, >= 2, the training pass included when it is used.
            size, align_corners: for a model whose logits are at a lower resolution than the
                labels and that does not upsample them itself (e.g. SegFormer): the (H, W) to
                resample the samples to, and the bilinear convention the loss's input is
                upsampled with (required then). Not needed when the model upsamples its own
                logits: the sampler takes both from that call.

        Returns:
            An :class:`MCAccumulator` with ``beta`` samples, of the shape of the training
            forward's logits (``size`` given: ``(B, C, *size)``).
        """
        if isinstance(beta, bool) or not isinstance(beta, int) or beta < 2:
            raise ValueError(f"beta must be an int >= 2, got {beta!r}")
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if size is not None and align_corners is None:
            raise ValueError("size needs align_corners: give the align_corners your loss "
                             "upsamples the logits with")
        recorded, self._recorded = self._recorded, None
        with torch.no_grad(), mc_dropout(self.model):
            if self._plan is None:
                return self._probe(inputs, beta, size, align_corners)
            return self._draw(inputs, beta, size, align_corners, recorded)

    def close(self) -> None:
        """Removes the hooks the sampler put on the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ probe

    def _probe(self, inputs, beta, size, align_corners) -> MCAccumulator:
        tracker = _Tracker(self.model)
        self._sampling = True
        try:
            with _Probe(tracker):
                out = self.model(inputs)
        finally:
            tracker.remove()
            self._sampling = False
        logits = self.output(out)
        if tracker.inactive_dropout:
            raise ValueError(
                f"dropout called as a function with training=False ({tracker.inactive_dropout}) "
                f"cannot be switched on for MC sampling (mc_dropout switches dropout modules); "
                f"use an nn.Dropout module, or F.dropout(..., training=True)")
        if tracker.random_ops == 0:
            raise ValueError(
                "the model has no active dropout (no random op ran in a pass with dropout "
                "modules switched on): every MC sample would be the same, sigma = 0 and U-CE = "
                "CE; add dropout, e.g. uce_fast.add_dropout(encoder) after each encoder stage")
        plan = _Plan(random_ops=tracker.random_ops, first_random=tracker.first_random)
        plan.prefix = [c for c in tracker.calls if c.before_random
                       and (c.parent is None or not c.parent.before_random)]
        self._find_final_interp(plan, tracker, logits)
        if plan.final_interp is not None:
            prefix_ids = {id(c) for c in plan.prefix}
            plan.interps_in_prefix = sum(
                1 for i in tracker.interps[:plan.final_interp.index]
                if any(id(c) in prefix_ids for c in i.stack))
        self._plan = plan
        self._decide(plan)
        self._install_recording()
        first = logits
        if self.levers["low_res"] == "used":
            first = plan.final_interp.input
        acc = self._accumulator(first, beta, size, align_corners)
        acc.update(first.detach())
        self._passes(inputs, beta - 1, acc, None)
        self.last = {"train_pass": False, "prefix_from_training": False,
                     "reuse_refused": "the first call probes the model"}
        return acc

    def _find_final_interp(self, plan: _Plan, tracker: _Tracker, logits: Tensor) -> None:
        final = next((i for i in tracker.interps if i.output is logits), None)
        if final is None:
            plan.reasons["low_res"] = "the model does not upsample its logits itself"
            return
        plan.final_interp = final
        spatial = tuple(final.output.shape[2:])
        if final.mode != "bilinear" or final.antialias or final.input.dim() != 4:
            plan.reasons["low_res"] = (f"the final F.interpolate is mode={final.mode!r}"
                                       f"{', antialias' if final.antialias else ''}: the kernels "
                                       f"resample bilinearly")
        elif final.scale_factor is not None and not final.align_corners:
            scales = final.scale_factor
            scales = scales if isinstance(scales, tuple | list) else (scales, scales)
            if any(float(s) * n != o for s, n, o in zip(scales, final.input.shape[2:], spatial,
                                                        strict=True)):
                plan.reasons["low_res"] = ("the final F.interpolate's scale_factor does not "
                                           "divide its sizes: the kernels resample by size")

    def _decide(self, plan: _Plan) -> None:
        """Which levers are used; raises for a lever asked for (True) that is not exact."""
        if not plan.prefix:
            plan.reasons.setdefault(
                "shared_prefix", f"no module finishes before the first random op "
                                 f"({plan.first_random})")
        if self.per_forward > 1 and plan.prefix:
            batch_ok = all(_has_batch(c.output) for c in plan.prefix)
            if not batch_ok:
                plan.reasons.setdefault("shared_prefix", "a cached output has no batch dim to "
                                                         "repeat for per_forward > 1")
        for name in LEVERS:
            reason = plan.reasons.get(name)
            wanted = self.options[name]
            if wanted is False:
                self.levers[name] = "off"
            elif reason is None:
                self.levers[name] = "used"
            elif wanted is True:
                raise ValueError(f"{name}=True is not exact for this model: {reason}")
            else:
                self.levers[name] = f"not used: {reason}"
        if self.levers["shared_prefix"] == "used":
            self.levers["shared_prefix"] = (
                "used: " + ", ".join(f"{c.name}" + (f"[{c.index}]" if c.index else "")
                                     for c in plan.prefix))

    # ------------------------------------------------------------------ recording

    def _install_recording(self) -> None:
        """Hooks that keep, from each training forward, what the next ``sample`` may reuse."""
        plan = self._plan
        root = self.model

        def start(module, args, kwargs):
            if self._sampling or not torch.is_grad_enabled():
                self._recorded = None
                return
            x = args[0] if args else next(iter(kwargs.values()), None)
            self._recorded = {"input": x, "version": getattr(x, "_version", None),
                              "state": _state(root), "dropout": _dropout_active(root),
                              "prefix": {}, "counts": {}}

        def finish(module, args, kwargs, output):
            rec = self._recorded
            if rec is None or self._sampling or self.levers["low_res"].startswith("used"):
                return
            with contextlib.suppress(TypeError):
                rec["first"] = self.output(output).detach()

        self._handles.append(root.register_forward_pre_hook(start, with_kwargs=True))
        self._handles.append(root.register_forward_hook(finish, with_kwargs=True,
                                                        always_call=True))
        for call in plan.prefix:
            self._handles.append(call.module.register_forward_hook(self._keeper(call)))
        interp = plan.final_interp
        if (self.levers["low_res"].startswith("used") and interp.feeder is not None
                and interp.feeder_is_input):
            # The training forward's low-resolution logits: the output of the module call
            # whose output the final interpolation took as it was.
            feeder = interp.feeder

            def keep_low(module, args, output, feeder=feeder):
                rec = self._recorded
                if rec is None or self._sampling:
                    return
                n = rec["counts"].get(("low", id(module)), 0)
                rec["counts"][("low", id(module))] = n + 1
                if n == feeder.index and isinstance(output, Tensor):
                    rec["first"] = output.detach()
            self._handles.append(feeder.module.register_forward_hook(keep_low))

    def _keeper(self, call: _Call) -> Callable:
        def hook(module, args, output):
            rec = self._recorded
            if rec is None or self._sampling:
                return
            n = rec["counts"].get(id(module), 0)
            rec["counts"][id(module)] = n + 1
            if n == call.index:
                rec["prefix"][(id(module), n)] = _map_tensors(output, Tensor.detach)
        return hook

    # ------------------------------------------------------------------ passes

    def _accumulator(self, first: Tensor, beta: int, size, align_corners) -> MCAccumulator:
        interp = self._plan.final_interp
        if self.levers["low_res"].startswith("used"):
            out_size = tuple(interp.output.shape[2:])
            if size is not None and tuple(size) != out_size:
                raise ValueError(f"size={tuple(size)} but the model upsamples its logits to "
                                 f"{out_size} itself")
            ac = bool(interp.align_corners)
            if align_corners is not None and align_corners != ac:
                raise ValueError(f"align_corners={align_corners} but the model upsamples its "
                                 f"logits with align_corners={ac}")
            return MCAccumulator(out_size, align_corners=ac, backend=self.backend,
                                 capacity=beta)
        if size is not None:
            return MCAccumulator(tuple(size), align_corners=bool(align_corners),
                                 backend=self.backend, capacity=beta)
        return MCAccumulator(None, backend=self.backend, capacity=beta)

    def _reusable(self, recorded, inputs) -> str:
        """Why the recorded training forward cannot be reused for ``inputs`` ("" if it can)."""
        if recorded is None:
            return "no training forward (with grad) on these inputs since the last sample()"
        if recorded["input"] is not inputs or recorded["version"] != inputs._version:
            return "the last training forward ran on other inputs"
        if recorded["state"] != _state(self.model):
            return ("the BatchNorm modes or autocast differ between the training "
                    "forward and the sample passes")
        return ""

    def _draw(self, inputs, beta, size, align_corners, recorded) -> MCAccumulator:
        plan = self._plan
        why = self._reusable(recorded, inputs)
        first = None
        if (self.levers["train_pass"] == "used" and not why and recorded["dropout"]
                and recorded.get("first") is not None):
            first = recorded["first"]
        if self.options["train_pass"] is True and first is None:
            raise ValueError(
                "train_pass=True, but the training forward is not an MC sample here: "
                + (why or "its dropout was off (eval mode)"))
        cache = None
        reused_prefix = False
        if self.levers["shared_prefix"].startswith("used"):
            if not why and len(recorded["prefix"]) == len(plan.prefix):
                cache, reused_prefix = recorded["prefix"], True
            else:
                cache = self._prefix_outputs(inputs)
        self.last = {"train_pass": first is not None, "prefix_from_training": reused_prefix,
                     "reuse_refused": why}
        probe_like = first if first is not None else None
        if probe_like is None:
            out = self._pass(inputs, 1, cache)
            probe_like = out
        acc = self._accumulator(probe_like, beta, size, align_corners)
        acc.update(probe_like.detach())
        self._passes(inputs, beta - 1, acc, cache)
        return acc

    def _prefix_outputs(self, inputs) -> dict:
        """The prefix calls' outputs for ``inputs``: one pass of the model up to its first random
        op (its modules' outputs kept by hooks; the pass is stopped there)."""
        plan = self._plan
        wanted = {(id(c.module), c.index) for c in plan.prefix}
        got: dict = {}
        counts: dict = {}

        class _Stop(Exception):
            pass

        def keeper(module, args, output):
            n = counts.get(id(module), 0)
            counts[id(module)] = n + 1
            if (id(module), n) in wanted:
                got[(id(module), n)] = output
                if len(got) == len(wanted):
                    raise _Stop

        handles = [c.module.register_forward_hook(keeper) for c in
                   {id(c.module): c for c in plan.prefix}.values()]
        self._sampling = True
        try:
            self.model(inputs)
        except _Stop:
            pass
        finally:
            self._sampling = False
            for h in handles:
                h.remove()
        return got

    @contextlib.contextmanager
    def _replaying(self, cache: dict | None, k: int, batch: int) -> Iterator[None]:
        """Within the block the prefix calls return (copies of) their cached outputs."""
        if not cache:
            yield
            return
        replacements = []
        counts: dict = {}
        for module in {id(c.module): c.module for c in self._plan.prefix}.values():
            original = module.forward

            def forward(*args, _m=module, _f=original, **kwargs):
                n = counts.get(id(_m), 0)
                counts[id(_m)] = n + 1
                hit = cache.get((id(_m), n))
                if hit is None:
                    return _f(*args, **kwargs)
                return (_map_tensors(hit, Tensor.clone) if k == 1
                        else _repeat(hit, k, batch))

            replacements.append((module, forward))
        with forwards_replaced(replacements):
            yield

    @contextlib.contextmanager
    def _skipping_final_upsample(self, cache: dict | None) -> Iterator[None]:
        """Within the block the model's final upsampling returns its input. An ``nn.Upsample``
        module making that call is patched for it; otherwise a function mode skips the first
        F.interpolate after the module call that fed it (only from there to the end of the
        forward: a mode over the whole pass would cost a Python call per torch op)."""
        interp = self._plan.final_interp
        owner = interp.stack[-1] if interp.stack else None
        if owner is not None and isinstance(owner.module, nn.Upsample):
            module, calls = owner.module, [0]

            def forward(x, *args, **kwargs):
                calls[0] += 1
                return x if calls[0] - 1 == owner.index else original(x, *args, **kwargs)

            original = module.forward
            with forwards_replaced([(module, forward)]):
                yield
            return
        if interp.feeder is None:
            # Interpolations inside replayed prefix calls do not run in this pass.
            replayed = 0 if not cache else self._plan.interps_in_prefix
            with _Skip(interp.index - replayed):
                yield
            return
        feeder, calls, active = interp.feeder, [0], []

        def after_feeder(module, args, output):
            calls[0] += 1
            if calls[0] - 1 == feeder.index:
                mode = _Skip(0)
                mode.__enter__()
                active.append(mode)

        def at_end(module, args, output):
            while active:
                active.pop().__exit__(None, None, None)

        handles = [feeder.module.register_forward_hook(after_feeder),
                   self.model.register_forward_hook(at_end, always_call=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _pass(self, inputs: Tensor, k: int, cache: dict | None) -> Tensor:
        """One (batched) sample pass: logits (k·B, C, ...), the final upsampling skipped when
        the low-resolution lever is used."""
        x = inputs if k == 1 else inputs.repeat(k, *([1] * (inputs.dim() - 1)))
        skip = contextlib.nullcontext()
        if self.levers["low_res"].startswith("used"):
            skip = self._skipping_final_upsample(cache)
        self._sampling = True
        try:
            with self._replaying(cache, k, inputs.shape[0]), \
                    _batch_norm_per_group(self.model, k), skip:
                out = self.model(x)
        finally:
            self._sampling = False
        return self.output(out)

    def _passes(self, inputs: Tensor, n: int, acc: MCAccumulator, cache: dict | None) -> None:
        batch = inputs.shape[0]
        done = 0
        while done < n:
            k = min(self.per_forward, n - done)
            logits = self._pass(inputs, k, cache)
            if k == 1:
                acc.update(logits)
            else:
                acc.update_stack(logits.reshape(k, batch, *logits.shape[1:]))
            del logits
            done += k


def _has_batch(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.dim() > 0
    if isinstance(value, tuple | list | dict):
        values = value.values() if isinstance(value, dict) else value
        return all(_has_batch(v) for v in values)
    return True


def add_dropout(encoder: nn.Module, p: float = 0.1, *,
                stages: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4"),
                dropout: type[nn.Module] = nn.Dropout2d) -> nn.Module:
    """Puts ``dropout(p)`` after each residual stage of a ResNet-like encoder, as the U-CE paper
    does (after each of the four stages): ``encoder.layerN`` becomes
    ``nn.Sequential(layerN, dropout(p))``, in place. Works on torchvision ResNets, smp's
    ``ResNetEncoder`` (``model.encoder``) and timm ResNets. Returns ``encoder``.

    Raises ``ValueError`` when a stage is missing, naming the stages found."""
    found = [name for name in stages if isinstance(getattr(encoder, name, None), nn.Module)]
    if len(found) != len(stages):
        have = [n for n, _ in encoder.named_children()]
        raise ValueError(f"add_dropout: the encoder needs stages {list(stages)}; it has "
                         f"children {have}")
    for name in stages:
        setattr(encoder, name, nn.Sequential(getattr(encoder, name), dropout(p)))
    return encoder
