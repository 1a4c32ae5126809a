"""``trades_step``: images/s of one TRADES training step (METHOD.md §10).

One step = the K-step KL attack, the TRADES loss on x and x_adv, backward, SGD (Nesterov) step and
the EMA update, on a random batch already on the device (no data loading).

- reference (``reference_ms``): our trainer's code path (``cdp_fast.trades.trades_loss``) in fp32,
  eager, contiguous (NCHW) layout, for-each SGD: the same algorithm as the fast path, so the
  speed-up is due to precision / layout / compilation only. cuDNN's default TF32 setting is left
  as it is and reported (``cudnn_allow_tf32``).
- also in ``metric``: the original TRADES code's step (Zhang et al.'s ``trades_loss``: x + 0.001 N(0,1)
  start, p(x) recomputed at every attack step, nn.KLDivLoss(sum)), fp32 eager, without EMA
  (``original_trades_ms`` and the speed-up against it).
- ours (``fused_ms``), per ``params.variant``: "bf16-cl" (bf16 autocast, channels_last, fused SGD)
  and "bf16-cl-compile" (+ ``torch.compile(model)``; compile time is the first call, reported as
  ``first_call_ms``, never in the timed median). The trainer has no CUDA-graph path, so none is
  timed here.

Settings: WRN-28-10 on 3x32x32 (CIFAR-10: eps 8/255, step 2/255, K 10, beta 6, batch 256 on the
GPU) and small-cnn on 1x28x28 (MNIST: eps 0.3, step 0.01, K 40, beta 1, batch 512).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timing import BenchTimeout, Ctx, bench_long, free_memory, is_oom, make_result, peak_extra_mb

TRADES_MODULES = ("cdp_fast.trades", "cdp_fast.attacks", "cdp_fast.models")

SETTINGS = {
    # model: (in_channels, image_size, eps, step_size, K, beta)
    "wrn-28-10": (3, 32, 8 / 255, 2 / 255, 10, 6.0),
    "small-cnn": (1, 28, 0.3, 0.01, 40, 1.0),
}


def setting_for(ctx: Ctx, model: str) -> dict:
    cin, size, eps, step, K, beta = SETTINGS[model]
    arch = model
    if ctx.suite == "quick":
        K, size = 2, (8 if model.startswith("wrn") else 28)
        arch = "wrn-10-1" if model.startswith("wrn") else model
    elif ctx.suite == "cpu":
        K = min(K, 3)
        arch = "wrn-16-2" if model.startswith("wrn") else model
    return dict(arch=arch, in_channels=cin, image_size=size, eps=eps, step_size=step, steps=K, beta=beta)


def default_batch(ctx: Ctx, model: str) -> int:
    if ctx.suite == "gpu":
        return 256 if model.startswith("wrn") else 512
    if ctx.suite == "cpu":
        return 16 if model.startswith("wrn") else 64
    return 4


def _original_trades_step(model, opt, x, y, *, eps, step_size, steps, beta):
    """Zhang et al. 2019, trades.py as published (fp32), plus the optimiser step."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    batch_size = len(x)
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=x.device).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = x_adv.detach()
    opt.zero_grad()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1))
    loss = loss_natural + beta * loss_robust
    loss.backward()
    opt.step()


def trades_case(ctx: Ctx, *, model: str, variant: str, batch: int | None = None) -> dict:
    from cdp_fast.models import build
    from cdp_fast.trades import ema_decay_at, ema_update, make_optimizer, trades_loss

    st = setting_for(ctx, model)
    batch = batch or default_batch(ctx, model)
    dev = ctx.device
    torch.manual_seed(0)
    base = build(st["arch"], num_classes=10, in_channels=st["in_channels"], image_size=st["image_size"])
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(batch, st["in_channels"], st["image_size"], st["image_size"], generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    kw = dict(eps=st["eps"], step_size=st["step_size"], steps=st["steps"], beta=st["beta"])

    def our_step_fn(net, precision, channels_last, fused_opt, compile_model):
        net = net.to(dev)
        xx = x
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            xx = x.contiguous(memory_format=torch.channels_last)
        ema = copy.deepcopy(net).eval()
        opt = make_optimizer(net, 0.1, 0.9, 5e-4, fused=fused_opt)
        train_net = torch.compile(net) if compile_model else net
        gen = torch.Generator(device=dev).manual_seed(0)

        def step():
            train_net.train()
            loss = trades_loss(train_net, xx, y, precision=precision, generator=gen, **kw)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(ema, net, ema_decay_at(10_000, 0))
        return step

    metric: dict = {"arch": st["arch"], "attack_steps": st["steps"], "eps": st["eps"], "beta": st["beta"],
                    "image_size": st["image_size"], "reference_kind": "our trades_loss, fp32 eager, NCHW, foreach SGD"}
    if ctx.is_cuda:
        metric["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        metric["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    reps = 3 if ctx.suite == "gpu" else (2 if ctx.suite == "cpu" else 1)

    # ours
    precision = "bf16" if ctx.is_cuda else "fp32"  # CPU bf16 autocast is slow; the trainer's "auto"
    compile_model = variant.endswith("compile")
    fast = our_step_fn(copy.deepcopy(base), precision, True, True, compile_model)
    tf = bench_long(ctx, fast, reps=reps)
    metric["first_call_ms"] = tf["first_call_ms"]
    metric["timer"] = tf["timer"]
    metric["precision"] = precision
    mem_f = None
    if ctx.is_cuda:
        mem_f = peak_extra_mb(ctx, fast)
    del fast
    free_memory()

    # fp32 eager of the same code path
    ref_ms = mem_r = None
    try:
        ref = our_step_fn(copy.deepcopy(base), "fp32", False, False, False)
        tr = bench_long(ctx, ref, reps=reps)
        ref_ms = tr["ms"]
        metric["reference_first_call_ms"] = tr["first_call_ms"]
        if ctx.is_cuda:
            mem_r = peak_extra_mb(ctx, ref)
        del ref
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        metric["reference_oom"] = True
        metric["note"] = "fp32 eager reference ran out of memory"
    free_memory()

    # the original TRADES code (once per model: the variant does not change it)
    if variant == "bf16-cl":
        try:
            net = copy.deepcopy(base).to(dev)
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            to = bench_long(ctx, lambda: _original_trades_step(net, opt, x, y, **kw), reps=reps)
            metric["original_trades_ms"] = to["ms"]
            metric["speedup_vs_original_trades"] = to["ms"] / tf["ms"]
            del net, opt
        except BenchTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - a side baseline: recorded, the entry survives
            metric["original_trades_oom" if is_oom(e) else "original_trades_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        free_memory()

    metric["images_per_s"] = batch / (tf["ms"] * 1e-3)
    if ref_ms:
        metric["reference_images_per_s"] = batch / (ref_ms * 1e-3)
    params = {"model": model, "arch": st["arch"], "batch": batch, "variant": variant,
              "image_size": st["image_size"], "attack_steps": st["steps"]}
    return make_result("trades_step", params, precision if precision == "fp32" else "bf16-autocast",
                       reference_ms=ref_ms, fused_ms=tf["ms"], peak_mem_mb_reference=mem_r,
                       peak_mem_mb_fused=mem_f, metric=metric)
