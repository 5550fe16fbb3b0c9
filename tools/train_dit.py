#!/usr/bin/env python3
"""Train the class-conditional DiT in ``models/dit.py`` on Fashion-MNIST (noise prediction, DDPM objective).

The weights written to ``models/weights/dit_fashion.pt`` are the project's own: trained from scratch by this
script (fixed seeds, CPU, 2 threads) on the 60k Fashion-MNIST training images. What is saved is the EMA of the
weights (float16 when the float32 state dict would be over ~8 MB; ``models.dit.build`` loads it back as float32).

Objective: x_0 = image scaled to [-1, 1] (random horizontal flip), t ~ U{0..999}, x_t = sqrt(a_t) x_0 +
sqrt(1 - a_t) eps with the linear schedule of ``models/dit_sampler.py``, loss = MSE(model(x_t, t, y), eps). The
label is replaced by the null class with probability ``--cfg-dropout`` (10 %) for classifier-free guidance.
Matmuls run under bfloat16 autocast (``--no-bf16`` to turn off); weights, optimiser state and EMA are float32.
AdamW (lr 5e-4 after a 200-step linear warm-up, no weight decay, gradient norm clipped to 1), batch 128, EMA
decay min(0.999, (1+n)/(10+n)).

Training is time-boxed: it stops after ``--max-minutes`` or ``--steps``, whichever comes first, and writes the EMA
checkpoint atomically every ``--save-every-minutes`` and at the end, so an interrupted run still leaves a usable
checkpoint. Run it in the background and watch the log:

    nohup python tools/train_dit.py --max-minutes 55 > dit_train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.datasets import fashion_mnist  # noqa: E402
from models import dit_sampler  # noqa: E402
from models.dit import NULL_CLASS, WEIGHTS, DiT  # noqa: E402
from graphopt.core.files import write_atomic  # noqa: E402

SEED = 20261122
FP16_ABOVE_BYTES = 8 * 1024 * 1024


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_save(obj, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    if nbytes > FP16_ABOVE_BYTES:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return state


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-minutes", type=float, default=55.0)
    ap.add_argument("--steps", type=int, default=1_000_000, help="upper bound on optimiser steps")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=None, help="override models.dit.HIDDEN (e.g. timing runs)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bfloat16 autocast for the forward/backward (weights, optimiser and EMA stay float32); "
                         "about 1.5x faster on this CPU (AVX512-BF16)")
    ap.add_argument("--save-every-minutes", type=float, default=10.0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out", default=str(WEIGHTS))
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    seed_everything(args.seed)
    images, labels = fashion_mnist("train")
    x_all = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]       # [N, 1, 28, 28] in [-1, 1]
    y_all = torch.from_numpy(labels)
    ac = torch.from_numpy(dit_sampler.alphas_cumprod()).float()
    sqrt_ac, sqrt_1mac = ac.sqrt(), (1.0 - ac).sqrt()

    model = DiT() if args.hidden is None else DiT(hidden=args.hidden)
    model.train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"DiT: {n_params} parameters; train {tuple(x_all.shape)}; batch {args.batch_size}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)

    t_start = last_save = time.time()
    step, epoch = 0, 0
    loss_acc, n_acc = 0.0, 0
    done = False
    while not done:
        perm = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            idx = perm[i:i + args.batch_size]
            x0, y = x_all[idx], y_all[idx].clone()
            b = len(idx)
            flip = torch.rand(b, generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
            y[torch.rand(b, generator=gen) < args.cfg_dropout] = NULL_CLASS
            t = torch.randint(0, len(ac), (b,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            xt = sqrt_ac[t][:, None, None, None] * x0 + sqrt_1mac[t][:, None, None, None] * noise

            for g in opt.param_groups:
                g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                pred = model(xt, t.float(), y)
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
            loss_acc += loss.item()
            n_acc += 1

            elapsed = time.time() - t_start
            if step % args.log_every == 0:
                print(f"step {step} epoch {epoch} loss {loss_acc / n_acc:.4f} "
                      f"({step / elapsed:.2f} it/s, {elapsed / 60:.1f} min)", flush=True)
                loss_acc, n_acc = 0.0, 0
            if time.time() - last_save > args.save_every_minutes * 60:
                atomic_save(checkpoint_state(ema), out)
                last_save = time.time()
                print(f"saved EMA checkpoint at step {step}", flush=True)
            if elapsed > args.max_minutes * 60 or step >= args.steps:
                done = True
                break
        epoch += 1

    wall = time.time() - t_start
    atomic_save(checkpoint_state(ema), out)
    print(f"training done: {step} steps, {step * args.batch_size / len(x_all):.2f} epochs, {wall / 60:.1f} min; "
          f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
