"""SMoG: Synchronous Momentum Grouping for self-supervised visual representation learning.

Pang et al., "Unsupervised Visual Representation Learning by Synchronous Momentum Grouping", ECCV 2022,
https://arxiv.org/abs/2207.06167. Each image is contrasted against *group centroids* instead of other instances.
Every step, (1) the target branch labels each image with its nearest centroid, (2) the centroids move toward the
mean of the online features assigned to them (a momentum update, all-reduced so every GPU holds the same groups),
(3) the online branch is trained with a cross-entropy that pulls its prediction toward the labelled centroid.
At every epoch start the groups are re-clustered by spherical k-means on a bank of last epoch's features.

    python smog.py                                   # tiny preset: embedded data set, small ResNet, CPU, minutes
    torchrun --standalone --nproc_per_node=gpu --max-restarts=3 smog.py --preset imagenet-r50 --data /path/to/imagenet

Part 1, "SMoG", is the whole method, with torch and torchvision alone: collectives → the multi-crop recipe →
networks → MomentumGrouping and the memory bank → the epoch start → the loss → LARS, schedules, EMA → train_step.
Part 2, "Trainer", from `class Config`: config, backbones, data, the batched augmentation, feeding the device, the
run state, processes and faults, reports, train(). "The authors' code" is the paper's released main_SMoG.py and src/.
"""
import copy
import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# ===================================================================================================================
# Part 1 — SMoG: the method
# ===================================================================================================================
# ----- collectives: every one is a no-op in a single process, so the same code runs with and without torchrun ------
def distributed():  # whether a process group is running (torchrun)
    return dist.is_available() and dist.is_initialized()

def rank():  # this process's index, 0 without torchrun
    return dist.get_rank() if distributed() else 0

def world_size():  # the number of processes, 1 without torchrun
    return dist.get_world_size() if distributed() else 1

def all_reduce_(t, op="sum"):  # sums (or takes the max of) t over all processes, in place
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t

def all_gather(t):  # every process's t, stacked in rank order: (world_size, *t.shape)
    if not distributed():
        return t[None]
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return torch.stack(out)

def broadcast_(t, src=0):  # copies rank src's t to every process, in place
    if distributed():
        dist.broadcast(t, src)
    return t

# ----- the multi-crop recipe (the authors' src/multicropdataset.py, MultiCropDataset) ------------------------------
# Every crop: RandomResizedCrop, flip, colour jitter, grayscale, then blur and solarize with its pipeline's
# probabilities. The pipelines "q" and "k" (query and key, MoCo's words for the online and target views) swap
# branches every other step. These constants serve MultiCrop and Part 2's batched augmentation alike.

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation
JITTER = (0.4, 0.4, 0.2, 0.1)  # ColorJitter strengths: brightness, contrast, saturation, hue
JITTER_P, GRAYSCALE_P, FLIP_P = 0.8, 0.2, 0.5
ASPECT = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
PIPELINES = {"q": (1.0, 0.0), "k": (0.1, 0.2)}  # pipeline -> (blur probability, solarize probability)

class CropRecipe(NamedTuple):
    """Which crops a step takes of each image; the defaults are the paper's ResNet-50 recipe (2×224 + 4×96)."""
    global_size: int = 224  # S: 2 online and 2 target global crops
    global_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range of the global crops
    local_size: int = 96  # s: L online local crops
    local_scale: tuple[float, float] = (0.05, 0.2)
    num_local: int = 4  # L
    target_local: bool = True  # the target forwards L local crops too; they join only its BN statistics
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # Gaussian blur σ range, pixels of the crop

class Crops(NamedTuple):
    """One step's crops of B images, crop-major (every image's first crop, then every image's second, ...)."""
    online_global: torch.Tensor  # (2B, 3, S, S)
    online_local: torch.Tensor | None  # (L·B, 3, s, s), None without local crops
    target_global: torch.Tensor  # (2B, 3, S, S)
    target_local: torch.Tensor | None  # (L·B, 3, s, s), None unless recipe.target_local

def pipelines_for_step(step):
    """(online pipeline, target pipeline): the two swap roles every other step (main_SMoG.py, train)."""
    return ("q", "k") if step % 2 == 0 else ("k", "q")

class MultiCrop:
    """(PIL image, step) → Crops of that image, by per-image torchvision pipelines: the definition of the recipe.
    invert: the probability of a crop's negative 1 − x, not in the paper (for Part 2's embedded data set)."""
    def __init__(self, recipe=CropRecipe(), invert=0.0):
        T, r, self.recipe = torchvision.transforms, recipe, recipe

        def pipeline(size, scale, name):
            blur_p, solarize_p = PIPELINES[name]
            kernel = 2 * min(math.ceil(3 * r.blur_sigma[1]), (size - 1) // 2) + 1
            return T.Compose([T.RandomResizedCrop(size, scale=scale, ratio=ASPECT),  # bilinear, as the authors'
                              T.RandomHorizontalFlip(FLIP_P), T.RandomApply([T.ColorJitter(*JITTER)], p=JITTER_P),
                              T.RandomGrayscale(p=GRAYSCALE_P),
                              T.RandomApply([T.GaussianBlur(kernel, r.blur_sigma)], p=blur_p),
                              T.RandomSolarize(128, p=solarize_p), *([T.RandomInvert(p=invert)] if invert else []),
                              T.ToTensor(), T.Normalize(MEAN, STD)])
        self.global_pipelines = {name: pipeline(r.global_size, r.global_scale, name) for name in PIPELINES}
        self.local_pipelines = {name: pipeline(r.local_size, r.local_scale, name) for name in PIPELINES}

    def __call__(self, image, step):
        online_aug, target_aug = pipelines_for_step(step)
        n_local, n_target_local = self.recipe.num_local, self.recipe.num_local * self.recipe.target_local

        def crops(pipelines, name, n):  # (n, 3, s, s), or None
            return torch.stack([pipelines[name](image) for _ in range(n)]) if n else None
        return Crops(crops(self.global_pipelines, online_aug, 2), crops(self.local_pipelines, online_aug, n_local),
                     crops(self.global_pipelines, target_aug, 2),
                     crops(self.local_pipelines, target_aug, n_target_local))

# ----- networks: backbone f → projector g → predictor q online; a copy of f and g as the target branch -------------
def mlp(dim_in, hidden, dim_out, last_bn, gelu=False, trunc_init=False):
    """Linear → BN → ReLU (or GELU) → Linear (→ affine-free BN: projector) as src/resnet50.py; trunc_init as Swin's."""
    layers = [nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.GELU() if gelu else nn.ReLU(True),
              nn.Linear(hidden, dim_out)]
    if last_bn:
        layers.append(nn.BatchNorm1d(dim_out, affine=False))
    for linear in layers[::3] if trunc_init else []:
        nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
    return nn.Sequential(*layers)

def mlp_over_sizes(mlp, xs, swin_heads=False):
    """A head on every crop size's features xs (n_i, d) → (Σ n_i, D): one pass (the authors' ResNets), or one per size
    (swin_heads, their Swin)."""
    return torch.cat([mlp(x) for x in xs]) if swin_heads else mlp(torch.cat(xs))

class Encoder(nn.Module):
    """Backbone (N, 3, s, s) → (N, dim), then projector: crops → z, each crop size as one batch. over_sizes: None, or
    (backbone, crops) → all sizes' features at once (Part 2's resnet_over_sizes: the authors' ResNets share BN
    statistics over sizes). swin_heads: the authors' Swin heads (GELU projector, ReLU predictor, trunc-normal)."""
    def __init__(self, backbone, dim, hidden_dim, feat_dim, swin_heads=False, over_sizes=None):
        super().__init__()
        self.backbone, self.swin_heads, self.over_sizes = backbone, swin_heads, over_sizes
        self.projector = mlp(dim, hidden_dim, feat_dim, last_bn=True, gelu=swin_heads, trunc_init=swin_heads)

    def forward(self, crops):  # list of (n_i, 3, s_i, s_i) -> (Σ n_i, D)
        if self.over_sizes is not None and len(crops) > 1:
            feats = [x.flatten(1) for x in self.over_sizes(self.backbone, crops)]
        else:
            feats = [self.backbone(x) for x in crops]
        return mlp_over_sizes(self.projector, feats, self.swin_heads)

class OnlineNet(nn.Module):
    """The online branch: encoder plus predictor. Returns (z, p), both (Σ n_i, D), not yet normalised."""
    def __init__(self, backbone, dim, hidden_dim, feat_dim, swin_heads=False, over_sizes=None):
        super().__init__()
        self.encoder = Encoder(backbone, dim, hidden_dim, feat_dim, swin_heads, over_sizes)
        # ReLU in the predictor for Swin too (the authors' src/SwinTrans_multicrop.py, predictor_head)
        self.predictor = mlp(feat_dim, hidden_dim, feat_dim, last_bn=False, trunc_init=swin_heads)

    def forward(self, crops):
        z = self.encoder(crops)
        return z, mlp_over_sizes(self.predictor, z.split([len(x) for x in crops]), self.encoder.swin_heads)

def target_of(online):
    """The target branch: a copy of the online encoder without gradients and without stochastic depth."""
    target = copy.deepcopy(online.encoder).requires_grad_(False)
    for m in target.modules():  # the authors' Swin target has no drop-path
        if isinstance(m, torchvision.ops.StochasticDepth):
            m.p = 0.0
    return target

# ----- momentum grouping: c_k moved every step by an all-reduced mean (main_SMoG.py, M_step), reset by k-means -----
class MomentumGrouping(nn.Module):
    """H independent sets of K unit-norm group centroids c_k, updated by momentum in the same step as the network.
    A buffer, not parameters: the authors detach them (main_SMoG.py, train), so the optimiser never moves them."""
    def __init__(self, num_groups, dim, num_heads=1):
        super().__init__()
        self.register_buffer("centroids", F.normalize(torch.randn(num_heads, num_groups, dim), dim=-1))  # (H, K, D)

    @torch.no_grad()
    def assign(self, x, chunk=8192):
        """Nearest centroid by cosine similarity: x (N, D) for every head, or (H, N, D) per head → (H, N) long."""
        c = self.centroids
        x = x.to(c.dtype)  # (N, D) or (H, N, D)
        labels = [torch.matmul(x[..., i:i + chunk, :], c.transpose(1, 2)).argmax(-1)  # (H, n, K) -> (H, n)
                  for i in range(0, x.shape[-2], chunk)]  # chunks bound the (H, n, K) scores for a large bank
        return labels[0] if len(labels) == 1 else torch.cat(labels, -1)

    @torch.no_grad()
    def update(self, z, beta):
        """c_k ← normalize(β·c_k + (1−β)·mean of the z assigned to k), over all processes; returns counts (H, K).
        z: (N, D) for every head, or (H, N, D); assigned by the centroids before the update; empty groups stay."""
        c = self.centroids
        h, k, d = c.shape
        z = F.normalize(z.to(c.dtype), dim=-1).expand(h, -1, -1)  # (H, N, D)
        labels = self.assign(z) + torch.arange(h, device=c.device)[:, None] * k  # (H, N), index into H·K rows
        # One scatter for all heads: rows [Σ z | count] per group, then one all-reduce of the whole buffer (the
        # authors' M_step loops over the K groups in Python).
        rows = torch.cat([z, torch.ones_like(z[..., :1])], -1).reshape(-1, d + 1)  # (H·N, D+1)
        sums = torch.zeros(h * k, d + 1, device=c.device, dtype=c.dtype).index_add_(0, labels.reshape(-1), rows)
        all_reduce_(sums)
        sums, counts = sums.view(h, k, d + 1).split([d, 1], -1)  # (H, K, D), (H, K, 1)
        moved = F.normalize(beta * c + (1 - beta) * sums / counts.clamp(min=1), dim=-1)
        c.copy_(torch.where(counts > 0, moved, c))
        return counts.squeeze(-1)

    @torch.no_grad()
    def kmeans_(self, bank, iters=10, generator=None):
        """Spherical k-means on a bank (M, D) or (H, M, D) split across processes, as main_SMoG.py, cluster_memory:
        K random rows of rank 0's bank, broadcast, then `iters` times assign and all-reduced mean (update, β = 0)."""
        c = self.centroids
        h, k, d = c.shape
        bank = bank.to(c.dtype).expand(h, -1, -1)  # (H, M, D)
        m = bank.shape[1]
        init = torch.empty_like(c)
        if rank() == 0:  # fewer rows than groups: drawn with replacement, duplicates split by training's noise
            idx = (torch.stack([torch.randperm(m, generator=generator)[:k] for _ in range(h)]) if m >= k else
                   torch.randint(m, (h, k), generator=generator))
            init.copy_(torch.gather(bank, 1, idx.to(c.device)[..., None].expand(h, k, d)))
        c.copy_(F.normalize(broadcast_(init), dim=-1))
        for _ in range(iters):
            self.update(bank, beta=0.0)

    def logits(self, p, tau):  # scores of predictions p (N, D) against every group: normalize(p) · Cᵀ / τ → (H, N, K)
        return torch.matmul(F.normalize(p.float(), dim=-1), self.centroids.transpose(1, 2)) / tau

class MemoryBank:
    """This process's normalised online z of both online global crops over one epoch, (2, M, D): what the next
    epoch start's k-means clusters, head h crop h mod 2 (the authors')."""
    def __init__(self, rows, dim, device):
        self.feats, self.filled = torch.zeros(2, rows, dim, device=device), 0

    def add(self, z):  # z: (2, B, D)
        b = z.shape[1]
        self.feats[:, self.filled:self.filled + b] = F.normalize(z.float(), dim=-1)
        self.filled = (self.filled + b) % self.feats.shape[1]

    def for_heads(self, num_heads):  # (H, M, D)
        return self.feats.repeat((num_heads + 1) // 2, 1, 1)[:num_heads]  # head h clusters crop h mod 2

# ----- the epoch start (main_SMoG.py, train: init_memory before the first epoch, then cluster_memory) --------------
@torch.no_grad()
def fill_bank(encoder, bank, global_crops):
    """Fills the bank with the initial encoder's z for the first k-means (the authors' init_memory): global_crops
    yields each batch's online global crops (2B, 3, S, S), each crop forwarded alone (BN sees one per image)."""
    for g in global_crops:
        bank.add(torch.stack([encoder([crop]).float() for crop in g.chunk(2)]))  # (2, B, D)

@torch.no_grad()
def start_epoch(grouping, bank, online, target, kmeans_iters=10, generator=None):
    """Every epoch start: groups reset by k-means on last epoch's bank (cluster_memory), BN statistics made equal on
    every process, target ← online (--reset_k_encoder)."""
    grouping.kmeans_(bank.for_heads(grouping.centroids.shape[0]), kmeans_iters, generator=generator)
    for buffer in online.buffers():  # running statistics drift apart per process without SyncBN (CPU)
        broadcast_(buffer)
    target.load_state_dict(online.encoder.state_dict())

# ----- the loss (main_SMoG.py, train) ------------------------------------------------------------------------------
def smog_loss(logits, labels):
    """Mean over heads h and target crops i of CE(p · C_hᵀ / τ, y_h,i), every online crop against each target crop's
    label, as the authors average their cross-entropies. logits: (H, C_online, B, K) against the updated centroids;
    labels: (H, C_target, B) by the centroids before the update (3·2·6 = 36 terms per image in the paper's recipe)."""
    h, c_online, b, k = logits.shape
    scores = logits.reshape(h * c_online * b, k)
    return torch.stack([F.cross_entropy(scores, y[:, None].expand(h, c_online, b).reshape(-1))  # y: (H, B)
                        for y in labels.unbind(1)]).mean()

# ----- optimisation: LARS, parameter groups, schedules as pure functions of the step, EMA --------------------------
class LARS(torch.optim.SGD):
    """Momentum SGD on gradients scaled by a layer-wise trust ratio (You et al., 2017), as apex's LARC(clip=False)
    around SGD in main_SMoG.py: g ← (g + wd·w) · η‖w‖ / (‖g‖ + wd·‖w‖ + ε), g as it is where ‖w‖ or ‖g‖ is 0.
    Groups with lars=False: plain momentum SGD. Takes true gradients (under fp16, GradScaler.unscale_ first); the
    step is torch's fused SGD, which skips on the device when GradScaler saw an overflow (no host sync)."""
    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        groups = [dict(g) for g in params]  # a list of parameter groups
        for g in groups:  # the decay enters the trust ratio, so SGD itself must not apply it again
            g["lars_weight_decay"] = g.pop("weight_decay", weight_decay)
            g.setdefault("lars", True)
            g.setdefault("eta", eta)
        super().__init__(groups, lr=lr, momentum=momentum, weight_decay=0.0, fused=True)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            # Momentum buffers start as zeros: the fused kernel makes them with empty_like and, when GradScaler skips
            # the first step, leaves that garbage for the next real step. A host-side check after the first step.
            for p in params if group["momentum"] else []:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            if not params or not group["lars"]:
                continue
            grads, wd = [p.grad for p in params], group["lars_weight_decay"]
            w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
            trust = group["eta"] * w_norm / (g_norm + wd * w_norm + 1e-8)
            # Where a norm is 0, LARC leaves g alone: g + wd·w is g when w = 0, and times 0 is g when g = 0.
            trust = torch.where((w_norm > 0) & (g_norm > 0), trust, (g_norm > 0).to(trust.dtype))
            torch._foreach_add_(grads, params, alpha=wd)
            torch._foreach_mul_(grads, list(trust.unbind()))
        return super().step()

NO_DECAY = ("relative_position_bias_table", "absolute_pos_embed")  # the authors' Swin skip list (src/optimizer.py)

def parameter_groups(modules, exclude_1d=False):
    """Optimiser groups: weight decay and LARS for every parameter (the authors' LARC), except with exclude_1d (their
    Swin recipe) for biases, 1-D (norm) parameters and Swin's position tables."""
    named = [(n, p) for m in modules for n, p in m.named_parameters() if p.requires_grad]
    excluded = [exclude_1d and (p.ndim <= 1 or n.endswith(NO_DECAY)) for n, p in named]
    groups = [dict(params=[p for (_, p), x in zip(named, excluded) if not x]),
              dict(params=[p for (_, p), x in zip(named, excluded) if x], weight_decay=0.0, lars=False)]
    return [g for g in groups if g["params"]]

def lr_at(step, total_steps, warmup_steps, peak, start, final):
    """Linear warm-up from start to peak, reached at the last warm-up step (the authors' np.linspace), then cosine
    down to final at the last step, and final after it. The paper's peak: 0.3 × global batch / 256."""
    if step < warmup_steps:
        return start + (peak - start) * step / max(1, warmup_steps - 1)
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * t))

def beta_at(step, total_steps, start=1.0, end=0.99):
    """Centroid momentum β: linear per step from start (1.0: groups held still) to end at the last step, one
    decrement already taken at step 0 (as the authors' main_SMoG.py, train, lowers it before each use)."""
    return start + (end - start) * min(1.0, (step + 1) / max(1, total_steps))

@torch.no_grad()
def ema_(target, online, m):  # target ← m·target + (1−m)·online for every parameter, in one fused op
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - m)

# ----- one training step -------------------------------------------------------------------------------------------
@torch.no_grad()
def without_drop_path(encoder, crops, dropping):
    """encoder(crops) without gradients and stochastic depth: the authors' Swin z for the group update and the bank
    (src/two_stream_network.py, TwoStreamNet.forward)."""
    for m in dropping:
        m.eval()
    try:
        return encoder(crops)
    finally:
        for m in dropping:
            m.train()

def train_step(online, target, grouping, passes, opt, scaler, *, beta, tau, ema, accumulate=1, clip_grad=0.0,
               autocast=nullcontext()):
    """One SMoG step: label with the target, update the groups with online z, contrast online p with them, step, EMA.

    online: OnlineNet (or DDP around one), target: its encoder's EMA copy, scaler: a GradScaler (enabled for fp16),
    ema: the target's momentum, clip_grad: max gradient norm (0: off). passes: `accumulate` Crops, made as each runs;
    as main_SMoG.py's --multi_forward, each is labelled and backpropagated alone (1/N of the gradient), the groups
    move once, with every pass's z, before the last pass's loss, then one optimiser step and one EMA. Returns device
    tensors (no host sync): mean loss, counts (H, K), online global z (2, N·B, D), whether GradScaler skipped it."""
    h, k = grouping.centroids.shape[:2]
    module = getattr(online, "module", online)  # the OnlineNet itself, also inside DDP
    dropping = [m for m in module.encoder.modules() if isinstance(m, torchvision.ops.StochasticDepth) and m.p > 0]
    opt.zero_grad(set_to_none=True)
    z_globals, losses = [], []
    for i, crops in enumerate(passes):
        last = i == accumulate - 1
        b = crops.target_global.shape[0] // 2
        target_crops = [x for x in (crops.target_global, crops.target_local) if x is not None]
        online_crops = [x for x in (crops.online_global, crops.online_local) if x is not None]
        # DDP all-reduces the gradients once, in the last pass's backward
        with nullcontext() if last or not hasattr(online, "no_sync") else online.no_sync():
            with autocast:
                with torch.no_grad():
                    zt = target(target_crops)[:2 * b].float()  # (2B, D): global crops' z
                z, p = online(online_crops)  # (C_online·B, D) each
            labels = grouping.assign(zt).view(h, 2, b)  # 1. y: nearest c_k before the update
            if dropping:  # the update and the bank see the online global crops without stochastic depth
                with autocast:
                    z = without_drop_path(module.encoder, [crops.online_global], dropping)
            z_globals.append(z[:2 * b].detach().float().view(2, b, -1))  # (2, B, D)
            if last:  # 2. head h moves with online global crop h mod 2, of every pass (a repeat: list indexing
                z_global = torch.cat(z_globals, 1)  # would copy indices from the host)
                counts = grouping.update(z_global.repeat((h + 1) // 2, 1, 1)[:h], beta)
            loss = smog_loss(grouping.logits(p, tau).view(h, -1, b, k), labels)  # 3. p against the c_k
            scaler.scale(loss / accumulate).backward()
        losses.append(loss.detach())
    if len(losses) != accumulate:
        raise ValueError(f"train_step got {len(losses)} forward passes, accumulate is {accumulate}")
    scaler.unscale_(opt)  # trust ratios and clipping need the true gradients; no host sync
    # An inf or NaN in any unscaled gradient makes the norm non-finite: the steps GradScaler skips (fp16 only; the
    # other precisions skip nothing and need no extra pass over the gradients).
    grads = [q.grad for q in online.parameters() if q.grad is not None] if scaler.is_enabled() else []
    skipped = (~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()) if grads else
               torch.zeros((), dtype=torch.bool, device=grouping.centroids.device))
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(online.parameters(), clip_grad)
    scaler.step(opt)  # under fp16, skipped on the device when the gradients overflowed
    scaler.update()
    ema_(target, module.encoder, ema)
    return torch.stack(losses).mean(), counts, z_global, skipped

# ===================================================================================================================
# Part 2 — Trainer: config, backbones, data, batched augmentation, feeding the device, run state, faults, reports
# ===================================================================================================================
import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import pickle
import re
import signal
import socket
import sys
import time
from contextlib import contextmanager, suppress

import numpy as np
from torchvision.models.resnet import BasicBlock, Bottleneck

# ----- config: one dataclass, presets on top of it, explicit flags on top of the preset; one-line messages ---------
@dataclasses.dataclass
class Config:
    # --- run ---
    preset: str = "tiny"  # recipe to start from (see PRESETS); flags given explicitly override it
    data: str = "synthetic"  # synthetic (embedded, no files) | cifar10 (torchvision download) | PATH to an ImageFolder
    out_dir: str = "out"  # checkpoint.pt and log.jsonl go here
    epochs: int = 400
    batch_size: int = 64  # images per process and pass; the global batch is batch_size × processes × accumulate
    accumulate: int = 1  # forward passes per optimiser step (the authors' --multi_forward): a large batch on few GPUs
    workers: int = -1  # loader processes per training process (streamed ImageFolder); -1: the cores / processes
    memory_budget: float = 2.0  # GiB: an ImageFolder whose decoded images fit is decoded once and held in memory
    seed: int = 0
    resume: str = "auto"  # auto (out_dir/checkpoint.pt if present) | none | PATH
    stop_after: int = 0  # leave after this many epochs in this job, resumable (for time-limited jobs); 0 = run all
    checkpoint_every: int = 0  # also checkpoint every N steps (bounds what a killed process loses); 0 = epoch ends only
    dist_timeout: int = 300  # seconds a process waits for the others in a collective before it fails (torchrun)
    synthetic_size: int = 8000  # training images of the embedded data set (its held-out split has 2000)
    # --- multi-crop: the fields of Part 1's CropRecipe (its comments say what each is), with its defaults ---
    global_size: int = 224
    global_scale: tuple[float, float] = (0.2, 1.0)
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.2)
    num_local: int = 4
    target_local: bool = True
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    invert: float = 0.0  # not in the paper: P(crop → 1 − x); -1: 0.5 for --data synthetic (shapes of both polarities)
    batched_aug: str = "auto"  # on: crops drawn on the device | off: MultiCrop in CPU workers | auto: on in memory, GPU
    # --- networks ---
    arch: str = "resnet50"  # see BACKBONES
    bn_over_sizes: bool = True  # ResNets: one set of BN statistics for all crop sizes of a branch (the authors')
    feat_dim: int = 128  # dimension D of z, p and the centroids
    hidden_dim: int = 2048  # hidden width of projector and predictor
    drop_path: float = 0.0  # stochastic depth of the online backbone (Swin: 0.2); the target, update and bank: none
    swin_heads: bool = False  # the authors' Swin heads: GELU projector, ReLU predictor, trunc-normal, per crop size
    ema: float = 0.999  # target ← ema·target + (1−ema)·online after every step
    # --- momentum grouping and loss ---
    num_groups: int = 3000  # K centroids per head
    num_heads: int = 3  # H independent group sets
    tau: float = 0.1  # temperature of the group logits
    beta_start: float = 1.0  # momentum β of the centroid update, linear per step from beta_start to beta_end
    beta_end: float = 0.99
    kmeans_iters: int = 10  # spherical k-means iterations of the reset at every epoch start
    # --- optimisation ---
    optimizer: str = "lars"  # lars (ResNets) | adamw (Transformers)
    lr: float = 0.3  # peak learning rate per 256 images of global batch (4.8 at 4096)
    start_lr: float = 0.01  # learning rate at step 0, warmed up linearly to the peak
    final_lr: float = 0.0048  # learning rate at the last step, after the cosine decay
    warmup_epochs: int = 10
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lars_eta: float = 0.001  # LARS trust coefficient; lower it if the loss does not decrease with large batches
    clip_grad: float = 0.0  # max gradient norm, 0 = off
    exclude_1d: bool = False  # no weight decay or LARS on biases, norms, Swin's position tables (authors: Swin only)
    # --- system ---
    precision: str = "auto"  # auto (CUDA: fp16, see resolve_precision; CPU: fp32) | bf16 | fp16 | fp32
    channels_last: bool = True  # NHWC memory layout: the one tensor cores and oneDNN's convolutions prefer
    compile: bool = False  # torch.compile the online and target networks (opt-in: see README, Performance)
    log_every: int = 20  # steps between log lines
    knn: bool = True  # report kNN top-1 on the held-out split at the end (labels are used only for these reports)
    eval_every: int = 0  # also every N epochs during training (online backbone, rank 0); -1: about ten per run

TRANSFORMER_RECIPE = dict(optimizer="adamw", feat_dim=256, lr=1e-3 * 256 / 4096, start_lr=4e-5, final_lr=4e-5,
                          warmup_epochs=10, weight_decay=0.05, clip_grad=3.0, exclude_1d=True, target_local=False)

# Each preset lists only what differs from the defaults above (which are the paper's ResNet-50 recipe).
PRESETS = {
    # CPU-friendly: embedded 32-px data set, small ResNet, a few minutes on 2 cores.
    "tiny": dict(data="synthetic", synthetic_size=2000, arch="resnet_tiny", epochs=160, batch_size=64,
                 global_size=32, global_scale=(0.5, 1.0), num_local=0, local_size=16, local_scale=(0.1, 0.4),
                 blur_sigma=(0.1, 0.6), invert=-1, hidden_dim=512, exclude_1d=True, eval_every=-1, num_groups=200,
                 tau=0.05, lr=6.0, start_lr=0.05, final_lr=0.01, warmup_epochs=2, ema=0.996, log_every=100),
    # ResNet-18 with a 3x3 stem on 32-px images.
    "cifar10-r18": dict(data="cifar10", arch="resnet18_cifar", epochs=200, batch_size=256, workers=4, global_size=32,
                        global_scale=(0.2, 1.0), local_size=16, local_scale=(0.05, 0.2), num_local=4,
                        blur_sigma=(0.1, 0.5), hidden_dim=2048, num_groups=300, lr=1.2, start_lr=0.05,
                        warmup_epochs=10, ema=0.99, exclude_1d=True, eval_every=-1),
    # The paper's recipes (the authors' scripts/pretrain/*.sh): batch 4096 = 64 GPUs × 64, 400 epochs.
    "imagenet-r50": dict(), "imagenet-r50w2": dict(arch="resnet50w2"),
    # Transformers (the authors' Swin-T script and src/optimizer.py): AdamW 1e-3 at batch 4096 (= 6.25e-5 per 256)
    # → 4e-5, weight decay 0.05, clipping 3.0.
    "imagenet-swin-t": dict(arch="swin_t_bn", drop_path=0.2, swin_heads=True, **TRANSFORMER_RECIPE),
    # Not in the paper: ViT-S/16 on the Swin-T recipe (torchvision's ViT has no drop-path).
    "imagenet-vit-s16": dict(arch="vit_s16", **TRANSFORMER_RECIPE),
}
PRESETS["cifar10"] = PRESETS["cifar10-r18"]  # the short name

def _flag(name):
    return "--" + name.replace("_", "-")

def _parse_value(f, text):  # parses one CLI value for dataclass field f (tuples are written '0.2,1.0')
    if f.type != tuple[float, float]:
        return f.type(text)
    if text.count(",") != 1:
        raise ValueError("expected two comma-separated numbers, e.g. 0.2,1.0")
    return tuple(float(part) for part in text.split(","))

def fail(message, prog="smog.py"):
    """Ends the program with the one line "prog: error: message" (exit status 1): no stack trace for bad input."""
    raise SystemExit(f"{prog}: error: {message}")

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        fail(message, self.prog)

def parse_command(argv=None):
    """(Config, args): defaults ← --preset ← flags given; args holds the one-off --print-config and --plot."""
    parser = _Parser(prog="smog.py", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):  # default None: not given, so the preset's value holds
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(metavar=f.type.__name__.upper())
        parser.add_argument(_flag(f.name), default=None, **kind)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--plot", metavar="OUT_DIR", default="", help="draw OUT_DIR/log.jsonl as curves.svg and exit")
    args, given = parser.parse_args(argv), {}
    for f in (f for f in dataclasses.fields(Config) if getattr(args, f.name) is not None):
        text = getattr(args, f.name)
        try:
            given[f.name] = text if f.type is bool else _parse_value(f, text)
        except ValueError as e:
            fail(f"{_flag(f.name)} {text!r}: {e}")
    preset = given.get("preset", Config.preset)
    if preset not in PRESETS:
        fail(f"--preset {preset!r} is unknown (choose from {', '.join(PRESETS)})")
    cfg = Config(**{**PRESETS[preset], **given, "preset": preset})
    check_config(cfg)
    auto = dict(invert=0.5 if cfg.data == "synthetic" else 0.0,  # a property of the embedded data set, not the preset
                eval_every=max(1, cfg.epochs // 10),
                workers=max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return dataclasses.replace(cfg, **{name: v for name, v in auto.items() if getattr(cfg, name) == -1}), args

def parse_config(argv=None):  # the Config of a command line (parse_command without its one-off actions)
    return parse_command(argv)[0]

def crop_recipe(cfg):  # Part 1's CropRecipe of a config
    return CropRecipe(**{name: getattr(cfg, name) for name in CropRecipe._fields})

def step_hyperparameters(cfg):  # train_step's hyperparameters of a config, all but β (which follows its schedule)
    return dict(tau=cfg.tau, ema=cfg.ema, accumulate=cfg.accumulate, clip_grad=cfg.clip_grad)

def check_config(cfg):  # rejects values the run cannot use, naming the flag
    choices = dict(arch=BACKBONES, optimizer=("lars", "adamw"), precision=("auto", "bf16", "fp16", "fp32"),
                   batched_aug=("auto", "on", "off"))
    rules = [(lambda v, allowed=allowed: v in allowed, f"unknown (choose from {', '.join(allowed)})", name)
             for name, allowed in choices.items()]
    rules += [(lambda v: v >= 1, "must be at least 1", "epochs batch_size accumulate global_size local_size feat_dim "
               "hidden_dim num_groups num_heads log_every synthetic_size"),
              (lambda v: v >= 0, "must be at least 0", "num_local kmeans_iters warmup_epochs stop_after "
               "checkpoint_every"),
              (lambda v: v >= -1, "must be at least 0 (or -1: about ten reports per run)", "eval_every"),
              (lambda v: v >= -1, "must be at least 0 (or -1: the cores per process)", "workers"),
              (lambda v: v == -1 or 0 <= v <= 1, "must lie in [0, 1] (or -1: 0.5 for --data synthetic, else 0)",
               "invert"),
              (lambda v: 0 <= v <= 1, "must lie in [0, 1]", "ema beta_start beta_end drop_path"),
              (lambda v: v > 0, "must be positive", "tau lr dist_timeout"),
              (lambda v: 0 < v[0] <= v[1] <= 1, "needs 0 < low <= high <= 1", "global_scale local_scale"),
              (lambda v: 0 < v[0] <= v[1], "needs 0 < low <= high", "blur_sigma"),
              (lambda v: math.isfinite(v) and v >= 0, "must be a finite number of GiB, at least 0 (0: always stream "
               "through workers)", "memory_budget"),
              (lambda v: not cfg.arch.startswith("vit") or v % 16 == 0,
               f"--arch {cfg.arch} needs crop sizes that are multiples of its 16-px patches", "global_size local_size")]
    for ok, why, names in rules:
        for name in (name for name in names.split() if not ok(getattr(cfg, name))):
            fail(f"{_flag(name)} {getattr(cfg, name)!r}: {why}")

def log(*args):  # prints on rank 0 only
    if rank() == 0:
        print(*args, flush=True)

# ----- backbones, and the authors' machinery that some of them need ------------------------------------------------
def bn_over_sizes(bn, xs, relu=False):
    """One BN (and ReLU) over crops of several sizes, xs (N_i, C, H_i, W_i), as the authors' list_bn_forward."""
    if len(xs) == 1:
        return [F.relu(bn(xs[0]), inplace=True) if relu else bn(xs[0])]
    # The authors pack all crops as one (1, C, Σ N·H·W, 1) batch: one set of statistics over every pixel of every
    # size. Channels-last crops already are (N·H·W, C) rows in memory, so the batch is their concatenation, seen as
    # (1, C, L, 1) channels-last by view + permute (rows.t()[None, ..., None] has strides on which CPU BatchNorm's
    # backward is wrong, torch 2.14); the outputs are views of it.
    c = xs[0].shape[1]
    rows = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, c) for x in xs])  # (Σ N·H·W, C); views of NHWC crops
    out = bn(rows.view(1, -1, 1, c).permute(0, 3, 1, 2))
    out = (F.relu(out, inplace=True) if relu else out).permute(0, 2, 3, 1).reshape(-1, c)  # (L, C)
    out = [o.reshape(x.shape[0], x.shape[2], x.shape[3], c).permute(0, 3, 1, 2)  # (N_i, C, H_i, W_i), NHWC
           for o, x in zip(out.split([x.numel() // c for x in xs]), xs)]
    return [o if x.is_contiguous(memory_format=torch.channels_last) else o.contiguous() for o, x in zip(out, xs)]

def resnet_over_sizes(net, xs):
    """A torchvision ResNet on crops of several sizes (N_i, 3, s_i, s_i), each BN over all (shortcuts' per size)."""
    children = list(net.children())
    for i, m in enumerate(children):
        if isinstance(m, nn.Sequential):
            xs = resnet_over_sizes(m, xs)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):  # and the ReLU after it (the stem's), in place
            xs = bn_over_sizes(m, xs, relu=i + 1 < len(children) and isinstance(children[i + 1], nn.ReLU))
        elif isinstance(m, nn.ReLU):
            if not isinstance(children[i - 1], nn.modules.batchnorm._BatchNorm):
                xs = [F.relu(x) for x in xs]
        elif isinstance(m, (BasicBlock, Bottleneck)):  # torchvision's forward, with BNs over all sizes
            out = bn_over_sizes(m.bn1, [m.conv1(x) for x in xs], relu=True)
            out = bn_over_sizes(m.bn2, [m.conv2(o) for o in out], relu=isinstance(m, Bottleneck))
            if isinstance(m, Bottleneck):
                out = bn_over_sizes(m.bn3, [m.conv3(o) for o in out])
            shortcut = xs if m.downsample is None else [m.downsample(x) for x in xs]
            xs = [(o + x).relu_() for o, x in zip(out, shortcut)]
        else:
            xs = [m(x) for x in xs]
    return xs

def _torchvision_resnet(name, small_stem=False):
    """torchvision ResNet without its classifier; small_stem: 3x3 stride-1 first conv and no max-pool (32-px images)."""
    net = getattr(torchvision.models, name)()
    if small_stem:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    dim, net.fc = net.fc.in_features, nn.Identity()
    return net, dim

def _tiny_resnet(widths=(16, 32, 64, 256)):
    """A 0.8M-parameter ResNet of four strided BasicBlocks after a 3x3 full-resolution stem, for CPUs."""
    layers, c_in = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True)], widths[0]
    for c in widths:  # the full-resolution stem sees the corners that tell a 6-px square from a disk
        layers.append(BasicBlock(c_in, c, 2, nn.Sequential(nn.Conv2d(c_in, c, 1, 2, bias=False), nn.BatchNorm2d(c))))
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c_in

def _resnet50_wide(widen=2):
    """ResNet-50 with every width × widen (SwAV's and the authors' ResNet-50w2, 4096-d) in torchvision's modules."""
    net, width = torchvision.models.ResNet(Bottleneck, [3, 4, 6, 3]), 64 * widen
    net.inplanes, net.conv1, net.bn1 = width, nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
    for i, (blocks, stride) in enumerate(zip([3, 4, 6, 3], [1, 2, 2, 2])):
        setattr(net, f"layer{i + 1}", net._make_layer(Bottleneck, width * 2 ** i, blocks, stride=stride))
    for m in net.modules():  # torchvision's initialisation of the convolutions made anew (BN's is the default)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net, 2048 * widen

class KeptShiftWindowAttention(torchvision.models.swin_transformer.ShiftedWindowAttention):
    """torchvision's shifted-window attention that still shifts a map padded to one window, as the authors'."""
    def forward(self, x):  # (B, H, W, C)
        # The authors fix each block's shift when they build it (src/SwinTrans_multicrop.py, SwinTransformerBlock):
        # a 96-px crop's 6x6 stage-3 maps are padded to 7x7 and rolled by 3, where torchvision drops the shift.
        b, h, w, c = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        if not (sh or sw) or h > wh or w > ww:  # several windows, or no shift: torchvision's own computation
            return super().forward(x)
        n, attn_heads = wh * ww, self.num_heads
        x = torch.roll(F.pad(x, (0, 0, 0, ww - w, 0, wh - h)), (-sh, -sw), (1, 2)).reshape(b, n, c)
        q, k, v = self.qkv(x).view(b, n, 3, attn_heads, c // attn_heads).permute(2, 0, 3, 1, 4)  # (B, heads, N, d)
        rows, cols = torch.arange(wh, device=x.device), torch.arange(ww, device=x.device)
        region = ((rows >= wh - sh)[:, None] * 2 + (cols >= ww - sw)[None]).flatten()  # (N,): wrapped or not
        mask = torch.where(region[:, None] == region[None], 0.0, -100.0).to(q.dtype)  # the masks' −100
        attn = (q * (c // attn_heads) ** -0.5) @ k.mT + self.get_relative_position_bias() + mask  # (B, heads, N, N)
        attn = F.dropout(attn.softmax(-1), self.attention_dropout, self.training)
        out = F.dropout(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)), self.dropout, self.training)
        return torch.roll(out.view(b, wh, ww, c), (sh, sw), (1, 2))[:, :h, :w]

class SwinBlockBN(torchvision.models.swin_transformer.SwinTransformerBlock):
    """The authors' Swin block (norm_before_mlp='bn', as MoBY): BatchNorm, not LayerNorm, before the MLP."""
    def __init__(self, dim, *args, **kwargs):
        super().__init__(dim, *args, attn_layer=KeptShiftWindowAttention, **kwargs)
        self.norm2 = nn.BatchNorm1d(dim)

    def forward(self, x):  # (N, H, W, C)
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        x = self.norm2(x.flatten(0, 2)).view_as(x)
        return x + self.stochastic_depth(self.mlp(x))

def _swin_t(drop_path, bn_blocks=False):
    """torchvision's Swin-T (768-d pooled output; pads 96-px crops' maps to whole 7x7 windows), or the authors'."""
    block = dict(block=SwinBlockBN) if bn_blocks else {}
    net = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], window_size=[7, 7],
                                             num_heads=[3, 6, 12, 24], stochastic_depth_prob=drop_path, **block)
    net.head = nn.Identity()
    if bn_blocks:  # the authors build each block for 224 px: one whose map fits one window there is never shifted
        for stage, side in zip(net.features[1::2], (56, 28, 14, 7)):
            for block in stage:
                if side <= block.attn.window_size[0]:
                    block.attn.shift_size = [0, 0]
    return net, 768

class ViT(torchvision.models.VisionTransformer):
    """torchvision's ViT returning the class token, its position embedding interpolated to any input size (as DINO)."""
    def __init__(self, depth, attention_heads, dim):
        super().__init__(image_size=224, patch_size=16, num_layers=depth, num_heads=attention_heads, hidden_dim=dim,
                         mlp_dim=4 * dim)
        self.heads = nn.Identity()  # torchvision's name for its classifier

    def position_embedding(self, rows, cols):  # (1, 1 + rows·cols, dim)
        pos, side = self.encoder.pos_embedding, self.image_size // self.patch_size
        if (rows, cols) == (side, side):
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], 1)

    def forward(self, x):  # (N, 3, H, W) -> (N, dim), H and W multiples of 16
        rows, cols = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, rows·cols, dim)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.position_embedding(rows, cols)
        return self.encoder.ln(self.encoder.layers(self.encoder.dropout(x)))[:, 0]

# name -> (drop_path) -> (backbone module mapping (N, 3, s, s) to (N, dim), dim). drop_path (stochastic depth) is
# used by Swin only: torchvision's ResNets and ViTs have none.
BACKBONES = {
    "resnet_tiny": lambda drop_path: _tiny_resnet(), "resnet18": lambda drop_path: _torchvision_resnet("resnet18"),
    "resnet18_cifar": lambda drop_path: _torchvision_resnet("resnet18", small_stem=True),
    "resnet50": lambda drop_path: _torchvision_resnet("resnet50"), "resnet50w2": lambda drop_path: _resnet50_wide(2),
    "swin_t": _swin_t, "swin_t_bn": lambda drop_path: _swin_t(drop_path, bn_blocks=True),
    "vit_s16": lambda drop_path: (ViT(depth=12, attention_heads=6, dim=384), 384),
    "vit_b16": lambda drop_path: (ViT(depth=12, attention_heads=12, dim=768), 768),
}

def make_online(cfg):  # OnlineNet around a fresh cfg.arch backbone, ResNets with BN over sizes
    over_sizes = resnet_over_sizes if cfg.bn_over_sizes and cfg.arch.startswith("resnet") else None
    return OnlineNet(*BACKBONES[cfg.arch](cfg.drop_path), cfg.hidden_dim, cfg.feat_dim, cfg.swin_heads, over_sizes)

# ----- data: the embedded synthetic data set, ImageFolder, CIFAR-10 ------------------------------------------------
SHAPES = ("disk", "square", "triangle", "plus", "ring", "star", "frame", "crescent", "bar", "half-disk")

def _shape_masks(kind, u, v):  # inside-masks of one shape class at rotated, unit-scaled coordinates u, v
    r, th = np.hypot(u, v), np.arctan2(v, u)
    box = np.maximum(abs(u), abs(v))
    return {"disk": r < 0.9, "square": box < 0.75,
            "triangle": (v > -0.5) & (np.sqrt(3) * u + v < 1) & (-np.sqrt(3) * u + v < 1),
            "plus": ((abs(u) < 0.28) & (abs(v) < 1)) | ((abs(v) < 0.28) & (abs(u) < 1)),
            "ring": (r > 0.55) & (r < 0.95), "star": r < 0.55 + 0.4 * np.cos(5 * th),
            "frame": (box > 0.5) & (box < 0.85), "crescent": (r < 0.95) & (np.hypot(u - 0.5, v) > 0.75),
            "bar": (abs(u) < 1) & (abs(v) < 0.3), "half-disk": (r < 0.95) & (v > -0.2)}[kind]

def synthetic_shapes(n, seed, size=32):
    """The embedded data set: n uint8 images (n, 3, size, size) of 10 shape classes and their labels (n,)."""
    # Position, size, rotation, polarity, contrast and noise are random: the shape is what two views share. Drawn at
    # twice the resolution and averaged, for anti-aliased edges; deterministic from (n, seed, size).
    rng = np.random.default_rng(seed)
    labels, s2 = rng.integers(0, len(SHAPES), n), 2 * size
    yy, xx = np.meshgrid(np.arange(s2) + 0.5, np.arange(s2) + 0.5, indexing="ij")
    images = np.empty((n, 3, size, size), np.uint8)
    for start in range(0, n, 512):
        b = min(512, n - start)
        radius = rng.uniform(0.2, 0.36, b) * s2
        cx, cy = rng.uniform(radius, s2 - radius), rng.uniform(radius, s2 - radius)
        angle = rng.uniform(0, 2 * np.pi, b)
        dx = (xx[None] - cx[:, None, None]) / radius[:, None, None]
        dy = (yy[None] - cy[:, None, None]) / radius[:, None, None]
        cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        mask = np.zeros((b, s2, s2))
        for k, kind in enumerate(SHAPES):
            rows = labels[start:start + b] == k
            mask[rows] = _shape_masks(kind, u[rows], v[rows])
        contrast = rng.uniform(0.4, 0.6, (b, 1, 1)) * rng.choice([-1.0, 1.0], (b, 1, 1))
        gray = rng.uniform(0.35, 0.65, (b, 1, 1)) + contrast * (mask - 0.3)
        img = gray.reshape(b, 1, size, 2, size, 2).mean((3, 5)) + rng.normal(0, 0.05, (b, 3, size, size))
        images[start:start + b] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels)

def rgb8(image):
    """A PIL image of any mode as 8-bit RGB, 16- and 32-bit and float grey scaled to 0–255, not clipped at 255."""
    import PIL.Image
    if image.mode.startswith("I") or image.mode == "F":  # PIL's convert("RGB") clips these, most 16-bit images white
        x = np.asarray(image, dtype=np.float64)
        top = x.max(initial=0)
        full = (1.0 if image.mode == "F" and top <= 1 else 65535.0 if image.mode.startswith("I;16") or top <= 65535
                else 2.0 ** 31 - 1)  # 32-bit "I" files often hold 16-bit values
        image = PIL.Image.fromarray(np.clip(x / full * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")

def scan_folder(root, classes=None):
    """(class names, [(path, class index)]) of a class-per-folder tree; classes: the names to index by (train/'s)."""
    try:
        names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as e:
        fail(f"--data {root}: not a readable folder ({e.strerror})")
    if not names:
        fail(f"--data {root}: no class folders (expected one subfolder of images per class)")
    classes = names if classes is None else classes
    for name in (n for n in names if n not in classes):
        fail(f"--data {os.path.join(root, name)!r}: a class the training split {os.path.dirname(root)}/train "
             f"does not have (its classes: {', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
    # Links are followed, but every real folder and file is read once: a link to a parent would repeat without end.
    seen = {os.path.realpath(root)} | {os.path.realpath(os.path.join(root, n)) for n in names}  # folders and files

    def unseen(path):  # a real folder or file not read yet; marked as read
        real = os.path.realpath(path)
        new = real not in seen
        seen.add(real)
        return new
    samples, extensions = [], torchvision.datasets.folder.IMG_EXTENSIONS
    for name in names:
        found, label = len(samples), classes.index(name)
        for folder, subfolders, files in os.walk(os.path.join(root, name), followlinks=True):
            subfolders[:] = [s for s in sorted(subfolders) if unseen(os.path.join(folder, s))]  # os.walk's next ones
            paths = [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(extensions)]
            samples += [(path, label) for path in paths if unseen(path)]
        if len(samples) == found:
            fail(f"--data {os.path.join(root, name)!r}: a class folder without images ({', '.join(extensions)})")
    return classes, samples

class ImageFolderData(torch.utils.data.Dataset):
    """A class-per-folder tree of 8-bit RGB images; an unreadable one is replaced by the next, and reported."""
    def __init__(self, root, classes=None, transform=None):
        self.root, self.transform = root, transform
        self.classes, self.samples = scan_folder(root, classes)
        self.targets = [label for _, label in self.samples]

    @staticmethod
    def load(path):  # the image at path as 8-bit RGB
        import PIL.Image
        with open(path, "rb") as f:
            return rgb8(PIL.Image.open(f))

    def fingerprint(self):  # what identifies the data set in a checkpoint: image count, hash of the relative paths
        digest = hashlib.sha1("\n".join(os.path.relpath(p, self.root) for p, _ in self.samples).encode())
        return f"{len(self.samples)} images in {len(self.classes)} classes, paths sha1 {digest.hexdigest()[:12]}"

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):  # (index, step parity) → (transform(image, parity), label, failed path or "")
        (index, parity), failed = key if isinstance(key, tuple) else (key, 0), ""
        for attempt in range(len(self)):
            path, label = self.samples[(index + attempt) % len(self)]
            try:
                image = self.load(path)
                return (self.transform(image, parity) if self.transform else image), label, failed
            except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable image"
                failed = failed or f"{printable(path)} ({type(e).__name__}: {e})"
        fail(f"--data {printable(self.root)}: no readable image")

def printable(text):  # text with control characters (newlines, terminal escapes) escaped, for names in messages
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))

class Split(NamedTuple):  # one split of a data set, as load_dataset returns it
    images: torch.Tensor | None  # uint8 (N, 3, H, W) held in memory, or None: read from `folder` by workers
    labels: torch.Tensor | None  # (N,); None: there is no such split
    folder: "ImageFolderData | None"
    fingerprint: str  # what identifies the data set in a checkpoint (resume refuses another one)

def load_dataset(cfg, split):
    """The split train|val of cfg.data: uint8 images in memory (with labels), or a folder for loader workers."""
    if cfg.data == "synthetic":
        n = cfg.synthetic_size if split == "train" else 2000
        need = n * 3 * 32 * 32 / 2**30
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30  # memory free now (Linux)
        except (ValueError, OSError, AttributeError):
            free = math.inf
        if need > free:
            fail(f"--synthetic-size {n}: its images need {need:.1f} GiB, more than the {free:.1f} GiB of memory free")
        images, labels = synthetic_shapes(n, seed=cfg.seed * 2 + (split != "train"))
        return Split(images, labels, None, f"the embedded data set, {n} images, --seed {cfg.seed}")
    if cfg.data == "cifar10":
        root = os.path.join(cfg.out_dir, "cifar10")
        try:
            ds = torchvision.datasets.CIFAR10(root, train=split == "train", download=True)
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a damaged archive: all say the same
            fail(f"--data cifar10: could not download CIFAR-10 to {root} ({type(e).__name__}: {e}); put "
                 f"cifar-10-batches-py there by hand, or train on --data PATH")
        return Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), None,
                     f"CIFAR-10 {split}, {len(ds)} images")
    if not os.path.isdir(cfg.data):
        fail(f"--data {cfg.data}: no such directory (or use synthetic | cifar10)")
    train_root, val_root = os.path.join(cfg.data, "train"), os.path.join(cfg.data, "val")
    if not os.path.isdir(train_root) and os.path.isdir(val_root):
        fail(f"--data {cfg.data}: has val/ but no train/ (a folder with val/ needs its training images in train/)")
    train_root = train_root if os.path.isdir(train_root) else cfg.data  # or a plain class-per-folder tree is it
    if split == "val" and not os.path.isdir(val_root):
        return Split(None, None, None, "")
    classes = None if split == "train" else scan_folder(train_root)[0]  # val/ labels follow train/'s class names
    ds = ImageFolderData(train_root if split == "train" else val_root, classes)
    images, labels = decode_into_memory(ds, cfg.memory_budget, split) or (None, torch.tensor(ds.targets))
    return Split(images, labels, ds if images is None else None, ds.fingerprint())

def decode_into_memory(ds, budget_gib, split):
    """(images (N, 3, H, W) uint8, labels) of a folder whose images share a size and fit in budget_gib, or None."""
    def read(path):  # (H, W, 3) uint8, or why it is unreadable
        try:
            return np.asarray(ds.load(path))
        except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable image"
            return f"{printable(path)} ({type(e).__name__}: {e})"
    samples = ds.samples
    first = next((x for x in (read(path) for path, _ in samples[:20]) if not isinstance(x, str)), None)  # the size
    if first is None or len(samples) * first.nbytes > budget_gib * 2**30:
        if first is not None and budget_gib > 0:
            log(f"data ({split}): {len(samples)} images would take {len(samples) * first.nbytes / 2**30:.1f} GiB "
                f"decoded, over --memory-budget {budget_gib:g}: streamed through loader workers")
        return None
    t0, images, labels, failed = time.time(), [], [], []
    for path, label in samples:
        pixels = read(path)
        if isinstance(pixels, str):
            failed.append(pixels)
        elif pixels.shape != first.shape:
            log(f"data ({split}): images of several sizes ({printable(path)}: {pixels.shape[1]}x{pixels.shape[0]}, "
                f"others {first.shape[1]}x{first.shape[0]}): streamed through loader workers")
            return None
        else:
            images.append(pixels)
            labels.append(label)
    if len(failed) > 0.01 * len(samples):
        fail(f"{len(failed)} of {len(samples)} images are unreadable, e.g. {failed[0]}")
    log(f"data ({split}): {len(images)} images of {first.shape[1]}x{first.shape[0]} decoded into memory "
        f"({len(images) * first.nbytes / 2**20:.0f} MiB, {time.time() - t0:.1f}s; --memory-budget {budget_gib:g} GiB)"
        + (f"; {len(failed)} unreadable left out, e.g. {failed[0]}" if failed else ""))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)

class InMemoryData(torch.utils.data.Dataset):
    """uint8 images (N, 3, S, S) as a Dataset of (crops, label, "") for CPU workers (used with --batched-aug off)."""
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):  # (index, step parity)
        image = torchvision.transforms.functional.to_pil_image(self.images[key[0]])
        return self.transform(image, key[1]), int(self.labels[key[0]]), ""

# ----- batched augmentation: the multi-crop recipe on whole batches, on the training device ------------------------
# The fast equivalent of Part 1's MultiCrop, from its constants and CropRecipe, with independent random parameters
# for every crop, as tensor work on the device (no per-image Python); resizing is antialiased bilinear as
# torchvision's on PIL images. It differs from MultiCrop in the hue jitter (a rotation about the grey axis in YIQ,
# not an HSV shift) and the jitter's fixed order (brightness → contrast → saturation → hue). ImageFolder images are
# cut at full resolution in the loader workers that decode them (CutCrops); the rest runs on the device.

def _gray(x):  # (n, 3, h, w) -> (n, 1, h, w), ITU-R 601 luma as torchvision
    return (x * _constants(x.device)["luma"].to(x.dtype)).sum(1, keepdim=True)  # (a 1x1 conv is far slower on CPU)

def _uniform(n, lo, hi, device):
    return torch.empty(n, device=device).uniform_(lo, hi)

def random_resized_boxes(n, scale, height, width, device, ratio=ASPECT, tries=10):
    """(n, 4) crop boxes x0, y0, x1, y1 in pixels, drawn as torchvision's RandomResizedCrop draws them."""
    area = _uniform(n * tries, *scale, device).view(n, tries) * height * width
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), device)).view(n, tries)
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()  # (n, tries), whole pixels
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first, ok = fits.int().argmax(1, keepdim=True), fits.any(1)  # the first try that fits
    w = torch.where(ok, w.gather(1, first)[:, 0], round(min(width, height * ratio[1])))  # else torchvision's fallback
    h = torch.where(ok, h.gather(1, first)[:, 0], round(min(height, width / ratio[0])))
    x0 = torch.where(ok, torch.rand(n, device=device) * (width - w), (width - w) / 2)
    y0 = torch.where(ok, torch.rand(n, device=device) * (height - h), (height - h) / 2)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)

@functools.lru_cache(maxsize=None)
def _constants(device):
    """The batched augmentation's constant tensors, made once per device (not a host-to-device copy per step)."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    rgb, turn = torch.linalg.inv(yiq), torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    # hue rotation by θ = P0 + cos θ·P1 + sin θ·P2: YIQ's chroma plane (I, Q) turns, luma Y stays
    hue = torch.stack([rgb[:, :1] @ yiq[:1], rgb[:, 1:] @ yiq[1:], rgb[:, 1:] @ turn @ yiq[1:]])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return dict(scale=(1 / std).to(device), shift=(-mean / std).to(device), hue=hue.float().to(device),
                luma=torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).to(device))

def _resampling_matrix(start, stop, size, length):
    """(n, size, length) rows resampling spans [start, stop) of an axis: bilinear, antialiased as PIL's resize."""
    dev = start.device
    step = (stop - start) / size  # (n,) source pixels per output pixel, negative when mirrored
    centre = start[:, None] + (torch.arange(size, device=dev) + 0.5) * step[:, None]  # (n, size)
    width, pixel = step.abs().clamp(min=1)[:, None, None], torch.arange(length, device=dev) + 0.5
    weight = (1 - (pixel - centre[..., None]).abs() / width).clamp(min=0)  # (n, size, length)
    return weight / weight.sum(-1, keepdim=True)  # pixels beyond the edge get no weight: renormalised, as PIL

def random_resized_crops(x, size, scale, crops_per_image=1):
    """RandomResizedCrop + flip, batched: x (B, 3, H, W) float → (crops_per_image·B, 3, size, size)."""
    # Cropping, resizing and flipping are linear in rows and columns: each crop is R · image · Cᵀ with its own
    # (size, H) R and (size, W) C, two batched matrix products on tensor cores instead of a gather per pixel.
    b, c, h, w = x.shape
    n = b * crops_per_image
    x0, y0, x1, y1 = random_resized_boxes(n, scale, h, w, x.device).unbind(1)
    flip = torch.rand(n, device=x.device) < FLIP_P
    x0, x1 = torch.where(flip, x1, x0), torch.where(flip, x0, x1)  # columns read right to left: mirrored
    rows = _resampling_matrix(y0, y1, size, h).to(x.dtype).view(crops_per_image, b, 1, size, h)
    cols = _resampling_matrix(x0, x1, size, w).to(x.dtype).view(crops_per_image, b, 1, size, w)
    return (rows @ x @ cols.mT).view(n, c, size, size)  # (k, B, 1, s, H) @ (B, 3, H, W) @ (k, B, 1, W, s)

def _color_jitter(x, p=JITTER_P, strengths=JITTER):
    """ColorJitter(*strengths) with probability p, factors per image: x (n, 3, h, w) in [0, 1]."""
    n, dev = x.shape[0], x.device
    brightness, contrast, saturation, hue = strengths
    on = torch.rand(n, device=dev) < p

    def factor(amount):  # (n, 1, 1, 1) in x's dtype: a float32 factor would promote the whole image to float32
        return torch.where(on, _uniform(n, 1 - amount, 1 + amount, dev), 1.0).view(n, 1, 1, 1).to(x.dtype)
    # Each blend written as one addcmul: (x − a)·f + a = x·f + a·(1 − f), fewer passes over the crops.
    x = (x * factor(brightness)).clamp_(0, 1)
    c = factor(contrast)
    x = torch.addcmul(_gray(x).mean((1, 2, 3), keepdim=True) * (1 - c), x, c).clamp_(0, 1)
    s = factor(saturation)
    x = torch.addcmul(_gray(x) * (1 - s), x, s).clamp_(0, 1)
    theta = (torch.where(on, _uniform(n, -hue, hue, dev), 0.0) * 2 * math.pi).view(n, 1, 1)
    basis = _constants(dev)["hue"]
    matrix = basis[0] + torch.cos(theta) * basis[1] + torch.sin(theta) * basis[2]  # (n, 3, 3)
    return torch.einsum("nij,njhw->nihw", matrix.to(x.dtype), x).clamp_(0, 1)

def _blur_matrix(kernel, length):
    """(n, length, length) blur along one axis: row i holds kernel n (n, 2r+1) centred on pixel i, reflect-padded."""
    r, dev = kernel.shape[1] // 2, kernel.device
    source = (torch.arange(length, device=dev)[:, None] + torch.arange(-r, r + 1, device=dev)).abs()
    source = torch.where(source > length - 1, 2 * (length - 1) - source, source)  # (length, 2r+1), reflected
    taps = (source[..., None] == torch.arange(length, device=dev)).to(kernel.dtype)  # (length, 2r+1, length)
    return torch.einsum("nt,itj->nij", kernel, taps)

def _gaussian_blur(x, p, sigma):
    """Gaussian blur with probability p and σ ~ U(sigma) per image, reflect-padded: (n, 3, h, w)."""
    n, _, h, w = x.shape
    on, s = torch.rand(n, device=x.device) < p, _uniform(n, *sigma, x.device)
    radius = min(math.ceil(3 * sigma[1]), (min(h, w) - 1) // 2)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-t[None] ** 2 / (2 * s[:, None] ** 2))
    kernel = torch.where(on[:, None], kernel / kernel.sum(1, keepdim=True), (t == 0).float()[None])  # (n, 2r+1)
    rows, cols = _blur_matrix(kernel, h).to(x.dtype), _blur_matrix(kernel, w).to(x.dtype)
    return rows[:, None] @ x @ cols[:, None].mT  # separable, banded B_h · x · B_wᵀ: no per-image convolution kernels

def imagenet_normalize(x):  # (n, 3, h, w) in [0, 1] -> (x − mean) / std in float32
    const = _constants(x.device)
    return torch.addcmul(const["shift"], x, const["scale"])

def photometric(x, pipeline, blur_sigma, invert=0.0, flip=False):
    """The recipe after the cut, per crop: (flip), jitter, grayscale, blur, solarize, (invert), normalisation."""
    n, (blur_p, solarize_p) = x.shape[0], PIPELINES[pipeline]
    if flip:
        x = torch.where((torch.rand(n, device=x.device) < FLIP_P).view(n, 1, 1, 1), x.flip(-1), x)
    x = _color_jitter(x)
    gray = torch.rand(n, device=x.device) < GRAYSCALE_P
    x = torch.where(gray.view(n, 1, 1, 1), _gray(x), x)
    x = _gaussian_blur(x, blur_p, blur_sigma)
    solarize = torch.rand(n, device=x.device) < solarize_p  # threshold 0.5, or 2 (never) for crops not solarized
    x = torch.where(x >= torch.where(solarize, 0.5, 2.0).view(n, 1, 1, 1), 1 - x, x)
    if invert:  # not in the paper: for data whose objects come light on dark and dark on light alike
        x = torch.where((torch.rand(n, device=x.device) < invert).view(n, 1, 1, 1), 1 - x, x)
    return imagenet_normalize(x)

def batch_augment(images, size, scale, pipeline, blur_sigma, crops_per_image=1, invert=0.0):
    """(crops_per_image·B, 3, size, size) normalised crops of uint8 or [0, 1] float images (B, 3, H, W)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    return photometric(random_resized_crops(x, size, scale, crops_per_image), pipeline, blur_sigma, invert)

def _work_dtype(x):  # float16 on GPUs halves the memory traffic (8-bit pixels are exact); CPUs' float16 is slow
    return torch.float16 if x.is_cuda else torch.float32

def batch_multicrop(images, step, recipe, invert=0.0):
    """All Crops of one step from a uint8 batch (B, 3, H, W), as MultiCrop(recipe, invert)'s, on its device."""
    r, (online_aug, target_aug) = recipe, pipelines_for_step(step)
    x = images.to(_work_dtype(images)) / 255  # converted once for the four calls
    def crops(size, scale, pipeline, n):  # (n·B, 3, size, size), or None
        return batch_augment(x, size, scale, pipeline, r.blur_sigma, n, invert) if n else None
    return Crops(crops(r.global_size, r.global_scale, online_aug, 2),
                 crops(r.local_size, r.local_scale, online_aug, r.num_local),
                 crops(r.global_size, r.global_scale, target_aug, 2),
                 crops(r.local_size, r.local_scale, target_aug, r.num_local * r.target_local))

class CutCrops:
    """(PIL image, step) → uint8 (global (4, 3, S, S), local (L + L_t, 3, s, s) or None), cut at full resolution."""
    def __init__(self, recipe):
        self.recipe = recipe

    def _cut(self, image, size, scale, n):  # (n, 3, size, size) uint8
        import PIL.Image
        crops = []
        for _ in range(n):
            top, left, h, w = torchvision.transforms.RandomResizedCrop.get_params(image, scale, ASPECT)
            crop = image.crop((left, top, left + w, top + h))  # then resized: no pixel beyond the box is read
            crops.append(np.asarray(crop.resize((size, size), PIL.Image.BILINEAR)))
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)

    def __call__(self, image, step=0):
        r, image = self.recipe, image.convert("RGB")
        n_local = r.num_local * (1 + r.target_local)
        return (self._cut(image, r.global_size, r.global_scale, 4),
                self._cut(image, r.local_size, r.local_scale, n_local) if n_local else None)

def cut_multicrop(cut, step, recipe, invert=0.0):
    """batch_multicrop's Crops from a batch of CutCrops' cuts (flips and photometric work on the device)."""
    (glob, loc), (online_aug, target_aug) = cut, pipelines_for_step(step)
    n = recipe.num_local * len(glob) // 4  # L·B
    def augment(x, pipeline):  # (k·B, 3, s, s) uint8 -> normalised float
        return photometric(x.to(_work_dtype(x)) / 255, pipeline, recipe.blur_sigma, invert, flip=True)
    return Crops(augment(glob[:len(glob) // 2], online_aug), augment(loc[:n], online_aug) if n else None,
                 augment(glob[len(glob) // 2:], target_aug), augment(loc[n:], target_aug) if n and recipe.target_local
                 else None)

# ----- feeding the device: one interface over the three crop paths -------------------------------------------------
CROP_PATHS = dict(device="batched on the device", cut="cut by workers (CutCrops), finished on the device",
                  pil="per image in workers (MultiCrop)")

class TrainData:
    """The training split as steps of Crops on the device, by one of the three crop paths (CROP_PATHS)."""
    def __init__(self, cfg, device):
        self.cfg, self.device, self.recipe = cfg, device, crop_recipe(cfg)
        self.images, self.labels, self.folder, self.fingerprint = load_dataset(cfg, "train")
        per_step = cfg.batch_size * world_size() * cfg.accumulate
        if len(self.labels) < per_step:
            fail(f"--batch-size {cfg.batch_size} × {world_size()} process(es) × --accumulate {cfg.accumulate} = "
                 f"{per_step} is larger than the data set ({len(self.labels)} images in --data {cfg.data})")
        batched = cfg.batched_aug == "on" or (cfg.batched_aug == "auto" and (device.type == "cuda" or
                                                                             self.images is not None))
        self.path = ("device" if self.images is not None else "cut") if batched else "pil"
        if self.folder is not None:
            self.folder.transform = CutCrops(self.recipe) if batched else MultiCrop(self.recipe, cfg.invert)
        self.loader_data = self.folder  # what loader workers read; None: batches sliced from self.images
        if self.path == "device":
            self.images = self.images.to(device)
        elif self.images is not None:
            self.loader_data = InMemoryData(self.images, self.labels, MultiCrop(self.recipe, cfg.invert))
        self.sampler = torch.utils.data.DistributedSampler(range(len(self.labels)), num_replicas=world_size(),
                                                           rank=rank(), shuffle=True, seed=cfg.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size // cfg.accumulate
        self.epoch_images = self.steps_per_epoch * cfg.accumulate * cfg.batch_size  # this process's, per epoch

    def steps(self, first_step, skip=0):
        """Yields (batches, failed) for each step of this epoch after the first `skip` (a run resumed mid-epoch)."""
        n, b, bad, indices = self.cfg.accumulate, self.cfg.batch_size, [], list(self.sampler)
        # Each pass's (index, pass parity) pairs: the parity tells CPU workers which pipeline each branch uses.
        passes = [[(j, (first_step * n + p - skip * n) % 2) for j in indices[p * b:(p + 1) * b]]
                  for p in range(skip * n, self.steps_per_epoch * n)]
        batches = iter(self._batches(passes))
        for step in zip(*[batches] * n):  # each step's n (batch, failed) pairs
            failed = [f for _, fs in step for f in fs]
            bad += failed
            if len(bad) > 0.01 * self.epoch_images:
                fail(f"{len(bad)} images unreadable in one epoch, more than 1% of the {self.epoch_images} this "
                     f"process reads per epoch; e.g. {bad[0]}")
            yield [batch for batch, _ in step], failed

    def _batches(self, batches):  # (batch, failed paths) of lists of (index, parity) pairs
        if self.loader_data is None:  # in memory, augmented on the device: no loader processes needed
            # The epoch's indices go to the device in one copy: a copy per step would make the host wait for the GPU
            order = torch.tensor([j for batch in batches for j, _ in batch], dtype=torch.long)
            for part in order.to(self.images.device).split(self.cfg.batch_size) if len(order) else []:
                yield self.images[part], []
            return
        loader = torch.utils.data.DataLoader(self.loader_data, batch_sampler=batches, num_workers=self.cfg.workers,
                                             collate_fn=collate, pin_memory=self.device.type == "cuda")
        batches = ((batch, failed) for batch, _, failed in loader)
        yield from copied_ahead(batches, self.device) if self.device.type == "cuda" else batches

    def crops(self, batch, index, reseed=True):
        """The Crops of forward pass `index` from a batch of steps(), on the device, from seed (seed, process, pass)."""
        if reseed:
            torch.manual_seed(seed_for(self.cfg.seed, index, rank()))
        batch = _tensors_to(batch, self.device)  # a no-op for batches that copied_ahead already moved
        finish = dict(device=batch_multicrop, cut=cut_multicrop).get(self.path)
        crops = finish(batch, index, self.recipe, self.cfg.invert) if finish else Crops(*batch)
        return Crops(*(None if x is None else channels_last(x, self.cfg) for x in crops))

    def global_crops(self):  # the online global crops (2B, 3, S, S) of one pass over the data, for fill_bank
        torch.manual_seed(seed_for(self.cfg.seed, -1, rank()))
        self.sampler.set_epoch(-1)
        for batches, _ in self.steps(0):
            for batch in batches:
                yield self.crops(batch, 0, reseed=False).online_global

def collate(batch):  # stacks (sample, label, failed path) triples; crop stacks come out crop-major (k·B, 3, s, s)
    samples, labels, failed = zip(*batch)
    out = torch.stack(samples) if isinstance(samples[0], torch.Tensor) else tuple(
        None if parts[0] is None else torch.stack(parts, 1).flatten(0, 1) for parts in zip(*samples))
    return out, torch.tensor(labels), [f for f in failed if f]

def channels_last(x, cfg):  # x in the NHWC memory layout when cfg.channels_last
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

def _tensors_to(batch, device):  # a tensor, or a tuple of tensors and None, moved without waiting
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return tuple(None if x is None else _tensors_to(x, device) for x in batch)

def copied_ahead(batches, device):
    """A loader's (batch, failed) pairs, batch i+1 copied to the GPU on a side stream while step i runs."""
    stream, ahead = torch.cuda.Stream(device), None
    for batch, failed in batches:
        with torch.cuda.stream(stream):
            moved, ready = _tensors_to(batch, device), torch.cuda.Event()
            ready.record(stream)
        if ahead is not None:
            yield _handed_over(*ahead)
        ahead = (moved, failed, ready)
    if ahead is not None:
        yield _handed_over(*ahead)

def _handed_over(batch, failed, ready):
    """Makes the compute stream wait for a copied batch and keep its memory until done with it."""
    stream = torch.cuda.current_stream()
    stream.wait_event(ready)
    for t in batch if isinstance(batch, tuple) else [batch]:
        if t is not None:
            t.record_stream(stream)
    return batch, failed

# ----- the run state and its checkpoints ---------------------------------------------------------------------------
def resolve_precision(cfg, device):
    """(name, autocast context, GradScaler): fp16 on CUDA by default, fp32 on CPU; a scaler for fp16 only."""
    # fp16 rather than bf16: cuDNN runs fp16 BatchNorm, bf16 falls back to slower kernels (README, Performance). The
    # scaler costs no host sync: LARS and fused AdamW take its overflow flag as a tensor.
    precision = cfg.precision if cfg.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else nullcontext())
    return precision, autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")

def make_optimizer(cfg, online):
    """LARS (the ResNet recipes) or AdamW (the Transformer recipes) over Part 1's parameter groups."""
    groups = parameter_groups([online], cfg.exclude_1d)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

class RunState:
    """What a run continues from: nets, groups, optimiser, scaler, this process's bank, epoch, step."""
    def __init__(self, cfg, device, bank_rows=0, scaler=None):
        torch.manual_seed(cfg.seed)  # the same on every process: identical initial weights and groups
        online = make_online(cfg).to(device)
        if world_size() > 1 and device.type == "cuda":
            online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
        if cfg.channels_last:
            online = online.to(memory_format=torch.channels_last)
        self.online, self.target = online, target_of(online)  # online: the plain module, what checkpoints hold
        for net in (online, self.target) if cfg.compile else []:  # in place: no "_orig_mod." prefixes in state_dict
            net.compile(dynamic=False)
        self.grouping = MomentumGrouping(cfg.num_groups, cfg.feat_dim, cfg.num_heads).to(device)
        self.opt, self.scaler = make_optimizer(cfg, online), scaler or torch.amp.GradScaler(device.type, enabled=False)
        self.bank = MemoryBank(bank_rows, cfg.feat_dim, device)
        # online wrapped in DistributedDataParallel under torchrun: what train_step trains
        self.online_ddp = (nn.parallel.DistributedDataParallel(online, device_ids=[device] if device.type == "cuda"
                                                               else None) if world_size() > 1 else online)
        self.epoch = self.step = self.epoch_step = 0

    def save(self, path, cfg, data):
        """Writes the run as a checkpoint (rank 0; a collective), keeping the one before as previous_of(path)."""
        banks = all_gather(self.bank.feats).cpu() if self.epoch_step else None  # mid-epoch: every process's bank
        if rank() != 0:
            return
        # Written aside and read back before it replaces the old one: no kill at any moment, full disk or damaged
        # copy leaves the run without a checkpoint that loads. A write that fails ends the run in one line.
        tmp = path + ".tmp"
        try:
            torch.save(dict(config=dataclasses.asdict(cfg), epoch=self.epoch, step=self.step, processes=world_size(),
                            epoch_step=self.epoch_step, num_images=len(data.labels), data_fingerprint=data.fingerprint,
                            online=self.online.state_dict(), target=self.target.state_dict(), banks=banks,
                            grouping=self.grouping.state_dict(), optimizer=self.opt.state_dict(),
                            scaler=self.scaler.state_dict(), bank_filled=self.bank.filled), tmp)
            read_checkpoint(tmp)
            if os.path.exists(path):
                os.replace(path, previous_of(path))
            os.replace(tmp, path)
        except (OSError, RuntimeError, ValueError) as e:  # torch.save says RuntimeError for a full disk
            if os.path.isfile(tmp):
                os.remove(tmp)
            fail(f"could not write the checkpoint {tmp} ({str(e).strip().splitlines()[0][:200]}); the ones before "
                 f"in --out-dir {cfg.out_dir} are as they were: free space there, or give another --out-dir")

    def load(self, state):  # copies a checkpoint into the run (and this process's bank, mid-epoch)
        for name, part in dict(online=self.online, target=self.target, grouping=self.grouping, optimizer=self.opt,
                               scaler=self.scaler).items():
            part.load_state_dict(state[name])
        self.epoch, self.step, self.epoch_step = state["epoch"], state["step"], state.get("epoch_step", 0)
        if self.epoch_step:
            if state["banks"][rank()].shape != self.bank.feats.shape:
                raise ValueError(f"memory bank of shape {tuple(state['banks'][rank()].shape)}, this run's is "
                                 f"{tuple(self.bank.feats.shape)}")
            self.bank.feats.copy_(state["banks"][rank()])
            self.bank.filled = state["bank_filled"]

    def resume(self, paths, cfg, data):
        """Restores the run from the first of `paths` that loads and fits, or ends in one line."""
        errors = []
        for path in paths:
            try:
                state = read_checkpoint(path)
                check_resumable(path, state, cfg, data)
                self.load(state)
                break
            except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:  # damaged, foreign, cut short
                why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                errors.append(f"{path} ({why})")
                log(f"checkpoint {path} does not load ({why})" + ("; trying the one before it" if path != paths[-1]
                                                                  else ""))
        else:
            fail(f"--resume: no checkpoint loads: {'; '.join(errors)}")
        log(f"resumed from {path} at epoch {self.epoch}, step {self.step}" + (
            f" (mid-epoch, after {self.epoch_step} steps)" if self.epoch_step else ""))

def seed_for(seed, index, process=0):
    """The seed of one step's (or epoch's) draws on one process, a function of these alone: resuming is exact."""
    return seed + 7919 * process + 104729 * (index + 1)

def previous_of(path):  # where the checkpoint before `path` is kept: checkpoint.pt → checkpoint.prev.pt
    return "{0}.prev{1}".format(*os.path.splitext(path))

def resolve_resume(cfg):  # checkpoints to try, newest first ([]: a fresh start); --resume none moves old ones aside
    path = os.path.join(cfg.out_dir, "checkpoint.pt") if cfg.resume in ("auto", "none") else cfg.resume
    for p in (path, previous_of(path)):
        if os.path.exists(p) and not os.path.isfile(p):
            fail(f"--out-dir {cfg.out_dir}: {p} is not a file (a folder of that name?); move it away")
    if cfg.resume == "none":
        old = [p for p in (path, previous_of(path), os.path.join(cfg.out_dir, "log.jsonl")) if os.path.isfile(p)]
        if old and rank() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for p in old:
                root, ext = os.path.splitext(p)
                os.replace(p, f"{root}.{stamp}{ext}")
            log(f"--resume none: the earlier run's {', '.join(os.path.basename(p) for p in old)} moved aside as "
                f"*.{stamp}.* in {cfg.out_dir}")
        return []
    if cfg.resume != "auto" and not os.path.isfile(path):
        fail(f"--resume {path}: no such checkpoint")
    return [p for p in (path, previous_of(path)) if os.path.isfile(p)]

def read_checkpoint(path, needs=("online", "target", "grouping", "optimizer", "scaler", "epoch", "step")):
    """A checkpoint's contents (weights_only: tensors and plain data); ValueError saying why it is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means a damaged or foreign file
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise ValueError("refused: it holds objects other than tensors and plain data, and unpickling those "
                             "could run code") from None
        raise ValueError(f"not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError("not a smog.py checkpoint")
    if missing := set(needs) - state.keys():
        raise ValueError(f"incomplete: no {', '.join(sorted(missing))}")
    return state

# What a checkpoint's config must share with the run resuming it: the shapes of networks, groups and optimiser state
# (arch .. exclude_1d), and the seed of the data order and the crops.
RESUME_MUST_MATCH = ("arch", "feat_dim", "hidden_dim", "num_groups", "num_heads", "swin_heads", "optimizer",
                     "exclude_1d", "seed")

def check_resumable(path, state, cfg, data):
    """Ends in one line when the run cannot continue the checkpoint (another recipe, data or global batch)."""
    saved = state["config"]
    for name in (name for name in RESUME_MUST_MATCH if saved.get(name) != getattr(cfg, name)):
        fail(f"--resume {path}: checkpoint has {_flag(name)} {saved.get(name)!r}, the config asks for "
             f"{getattr(cfg, name)!r}; keep the checkpoint's value, or start a new run (--resume none)")
    batch, processes, passes = saved.get("batch_size"), state.get("processes", world_size()), saved.get("accumulate", 1)
    if batch * processes * passes != cfg.batch_size * world_size() * cfg.accumulate:  # steps, schedules would differ
        fail(f"--resume {path}: written with a global batch of {batch * processes * passes} ({batch} × {processes} "
             f"process(es) × {passes} passes), this run has {cfg.batch_size * world_size() * cfg.accumulate}; keep "
             f"--batch-size × processes × --accumulate, or start a new run")
    written_for = state.get("data_fingerprint", f"{state.get('num_images')} images")
    other_paths = "data_fingerprint" in state and written_for != data.fingerprint
    if other_paths or state.get("num_images") != len(data.labels):
        fail(f"--resume {path}: written for another data set ({written_for}); --data {printable(cfg.data)} is "
             f"{data.fingerprint}: restore that data set, or start a new run (--resume none)")
    if (processes, passes) != (world_size(), cfg.accumulate):
        if state.get("epoch_step", 0):
            fail(f"--resume {path}: written mid-epoch by {processes} process(es) × {passes} passes; resume it with "
                 f"as many (this run has {world_size()} × {cfg.accumulate}), or from the end of an epoch")
        log(f"resuming {processes} process(es) × {batch} images × {passes} passes as {world_size()} × "
            f"{cfg.batch_size} × {cfg.accumulate}: the same global batch and schedules; BN statistics now over "
            f"{cfg.batch_size} images per pass (SyncBN: all processes'), the data order unlike an uninterrupted run's")

# ----- processes and faults: preemption, the out-dir lock, divergence, failed collectives --------------------------
def setup_device(timeout=300):
    """Starts the process group under torchrun (NCCL on GPU, gloo on CPU) and picks this process's device."""
    if "RANK" in os.environ and not distributed():  # timeout: a dead peer ends the run (for torchrun to restart)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # NCCL: a timed-out collective ends the process
        wait = datetime.timedelta(seconds=timeout)
        store, rank_, world = next(dist.rendezvous("env://", timeout=wait))
        # After a restart (torchrun --max-restarts) the store may still hold the addresses the dead processes
        # published: the new group reads and writes its own keys.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=wait, rank=rank_,
                                world_size=world, store=dist.PrefixStore(f"attempt{attempt}/", store))
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device

@contextmanager
def catch_preemption():
    """Yields the list of caught SIGTERM, SIGUSR1 (SLURM) and SIGINT: a checkpoint, then exit, not death."""
    caught = []

    def record(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in caught:
            print("smog.py: stopped at once by a second Ctrl-C, without a checkpoint", file=sys.stderr, flush=True)
            raise SystemExit(130)
        if signum == signal.SIGINT:
            log("Ctrl-C: a checkpoint at the next agreed step, then exit (Ctrl-C again: stop at once, without one)")
        caught.append(signum)
    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

@contextmanager
def holding_out_dir(out_dir, device):
    """Creates out_dir and holds its lock for the run (rank 0, a collective): one run per out-dir."""
    path, error, mine = os.path.join(out_dir, "lock"), None, None
    if rank() == 0:
        error = _take_lock(out_dir, path)
        mine = None if error else open(path).read()
    if all_reduce_(torch.tensor(float(error is not None), device=device), op="max").item() > 0:
        fail(error or f"process {rank()}: process 0 could not take --out-dir {out_dir} (see its message)")
    try:
        yield
    finally:
        with suppress(OSError):
            if mine is not None and open(path).read() == mine:
                os.remove(path)

def _take_lock(out_dir, path):
    """Creates the lock file at path holding this process's host, pid and start time; returns why it could not."""
    me = dict(host=socket.gethostname(), pid=os.getpid(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        return f"--out-dir {out_dir}: cannot be created ({e.strerror}: {e.filename})"
    for _ in range(2):
        try:
            with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
                json.dump(me, f)
            return None
        except FileExistsError:
            try:
                holder = json.load(open(path))
                host, pid, since = holder["host"], int(holder["pid"]), holder.get("since", "?")
            except (OSError, ValueError, KeyError, TypeError):
                return f"--out-dir {out_dir}: holds a lock file {path} that does not read; delete it if no run uses it"
            if host != me["host"] or _alive(pid):
                return (f"--out-dir {out_dir}: in use by process {pid} on {host} since {since} ({path}); wait for "
                        f"it, give another --out-dir, or delete the lock if that run is gone")
            log(f"--out-dir {out_dir}: taking over the lock of process {pid} on {host} (since {since}), which is gone")
            os.remove(path)
        except OSError as e:
            return f"--out-dir {out_dir}: not writable ({e.strerror})"
    return f"--out-dir {out_dir}: could not take its lock {path}"

def _alive(pid):  # whether a process with this pid runs on this host (another user's counts)
    try:
        os.kill(pid, 0)
        return True
    except OSError as e:  # PermissionError: another user's, alive
        return not isinstance(e, ProcessLookupError)

def caught_by_any(caught, device):
    """Whether any process caught a preemption signal (all-reduced: all stop at one step; alone: no device sync)."""
    if not distributed():
        return bool(caught)
    return all_reduce_(torch.tensor(float(bool(caught)), device=device), op="max").item() > 0

DIVERGED = 1000.0  # the online weights' norm grown this many times over its value at the job's start: diverged

def weight_norm(module):  # the L2 norm of all of a module's parameters together, as a device tensor
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.detach() for p in module.parameters()])))

def stop_if_diverged(bad_step, run, start_norm, ckpt_path):
    """Ends every process together after a non-finite loss, or non-finite or exploded online weights."""
    # bad_step: this process's first step with a non-finite loss, or −1, kept on the device (no host sync per step);
    # checked at log intervals and before each checkpoint, so no checkpoint holds such weights.
    first = all_reduce_(bad_step.clone(), op="max").item()
    norm = weight_norm(run.online).item()  # the same on every process: DDP keeps the weights identical
    last = f"{ckpt_path} (after {run.epoch} epochs)" if os.path.exists(ckpt_path) else "none"
    if first >= 0:
        fail(f"the loss became NaN/inf at step {first}; every process stopped. Last good checkpoint: {last}. "
             f"Lower --lr or raise --warmup-epochs")
    if not math.isfinite(norm) or norm > DIVERGED * start_norm:
        fail(f"the online weights diverged by step {run.step}: their norm grew from {start_norm:.3g} to {norm:.3g} "
             f"while the loss stayed finite; every process stopped. Last good checkpoint: {last}. Lower --lr")

# What gloo and NCCL say when a peer died or a collective timed out (not all of them raise dist.DistError).
COLLECTIVE_FAILURE = re.compile("gloo|nccl|timed out|timeout|connection (reset|closed|refused)|closed by peer", re.I)

@contextmanager
def collective_failures_in_one_line(run, timeout):
    """A failed collective as one line naming this process and step, not a backend trace."""
    try:
        yield
    except RuntimeError as error:
        if distributed() and (isinstance(error, dist.DistError) or COLLECTIVE_FAILURE.search(str(error))):
            why = str(error).strip().splitlines()[0][:240]
            fail(f"process {rank()} of {world_size()} stopped at step {run.step}: a collective failed, so another "
                 f"process died or did not answer within --dist-timeout {timeout} s ({why})")
        raise

# ----- reports: the log line, group health, kNN on the held-out split, the plot ------------------------------------
def group_health(counts):
    """(mean groups used per head, mean assignment entropy in nats, at most log K) of counts (H, K) over steps."""
    used, prob = (counts > 0).sum(1).float().mean(), counts / counts.sum(1, keepdim=True).clamp(min=1)
    entropy = -(prob * prob.clamp(min=1e-12).log()).sum(1).mean()
    return used.item(), entropy.item()

def eval_batches(data, cfg, batch=256, indices=None):
    """Normalised centre views (n, 3, S, S) of uint8 images (N, 3, H, W) or an ImageFolderData."""
    if isinstance(data, torch.Tensor):
        data = data if indices is None else data[indices.to(data.device)]
        for i in range(0, len(data), batch):
            x = data[i:i + batch].float().cpu() / 255
            if x.shape[-1] != cfg.global_size:
                x = F.interpolate(x, size=cfg.global_size, mode="bilinear", antialias=True, align_corners=False)
            yield imagenet_normalize(x)
        return
    T = torchvision.transforms
    view = T.Compose([T.Resize(round(cfg.global_size * 8 / 7)), T.CenterCrop(cfg.global_size), T.ToTensor(),
                      T.Normalize(MEAN, STD)])
    folder = copy.copy(data)
    folder.transform = lambda image, parity: view(image.convert("RGB"))
    part = folder if indices is None else torch.utils.data.Subset(folder, indices.tolist())
    for x, _, _ in torch.utils.data.DataLoader(part, batch_size=batch, num_workers=cfg.workers, collate_fn=collate):
        yield x

@torch.no_grad()
def extract_features(backbone, data, cfg, device, normalize=True, indices=None):
    """Backbone features (N, dim) of a data set's centre views in eval mode, L2-normalised by default."""
    was_training = backbone.training
    feats = torch.cat([backbone.eval()(channels_last(x.to(device), cfg)).float()
                       for x in eval_batches(data, cfg, indices=indices)])
    backbone.train(was_training)
    return F.normalize(feats, dim=1) if normalize else feats

@torch.no_grad()
def knn_top1(train_feats, train_labels, test_feats, test_labels, k=20, t=0.07, num_classes=None):
    """Weighted kNN (cosine similarity, votes exp(s/t)) top-1 accuracy in %, as in InstDisc/DINO."""
    num_classes, correct = num_classes or int(train_labels.max()) + 1, 0
    for i in range(0, len(test_feats), 1024):
        sim, idx = (test_feats[i:i + 1024] @ train_feats.T).topk(min(k, len(train_feats)), dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device).scatter_add_(1, train_labels[idx],
                                                                                   (sim / t).exp())
        correct += (votes.argmax(1) == test_labels[i:i + 1024]).sum().item()
    return 100.0 * correct / len(test_feats)

def knn_report(run, cfg, device, data, held_out, progress, epoch, final=False):
    """kNN top-1 of the online backbone on the held-out split, printed and logged; at the end with baselines."""
    # Labels are used only here. Rank 0 alone: the others wait at their next collective (within --dist-timeout).
    test_images, test_labels, test_folder, _ = held_out
    if test_labels is None:
        if final:
            log("kNN report skipped: the data set has no held-out split (PATH/val)")
        return
    train_data = data.images if data.folder is None else data.folder
    test_data = test_images if test_images is not None else test_folder
    train_labels, test_labels = data.labels.to(device), test_labels.to(device)
    nets = [("knn_top1", "trained", run.online.encoder.backbone)]
    if final:
        torch.manual_seed(cfg.seed)
        nets.append(("knn_top1_random_init", "same architecture at random init",
                     BACKBONES[cfg.arch](0.0)[0].to(device)))
    result = {key: knn_top1(extract_features(net, train_data, cfg, device), train_labels,
                            extract_features(net, test_data, cfg, device), test_labels) for key, _, net in nets}
    if final and test_images is not None:
        pixels = [F.normalize(x.flatten(1).float() - x.flatten(1).float().mean(1, keepdim=True), dim=1).to(device)
                  for x in (train_data, test_images)]  # centred per image: invariant to brightness and contrast
        result["knn_top1_raw_pixels"] = knn_top1(pixels[0], train_labels, pixels[1], test_labels)
        nets.append(("knn_top1_raw_pixels", "raw pixels", None))
    log(f"kNN top-1 on the held-out split{'' if final else f' after epoch {epoch}'}: " + " | ".join(
        f"{name} {result[key]:.1f}%" for key, name, _ in nets))
    progress.write(dict(step=run.step, epoch=epoch, **result))

class Progress:
    """The log line every cfg.log_every steps, on the console and in log.jsonl."""
    def __init__(self, cfg, total_steps, jsonl, first_step, scaler):
        self.cfg, self.total_steps, self.jsonl, self.scaler = cfg, total_steps, jsonl, scaler
        self.first_step, self.t_start, self.skipped_in_job, self.warned = first_step, time.time(), 0, False
        self.counts = self.skipped = 0  # summed on the device over each interval
        self.restart()

    def restart(self):  # at each epoch start: the k-means reset does not count as waiting for data
        self.t_log, self.data_time, self.images, self.bad_images = time.time(), 0.0, 0, 0

    def timed(self, steps):  # TrainData.steps' batches, timing each wait for them and counting unreadable images
        t0 = time.time()
        for batches, failed in steps:
            self.data_time += time.time() - t0
            self.bad_images += len(failed)
            self.images += self.cfg.batch_size * world_size() * len(batches)
            yield batches
            t0 = time.time()  # the loop asks for the next step's batches

    def add(self, counts, skipped):  # one step's group counts (H, K) and skip flag, summed on the device
        self.counts, self.skipped = self.counts + counts, self.skipped + skipped

    def report(self, step, epoch, loss, lr, beta):  # prints and records one interval's figures (one wait for the GPU)
        (used, entropy), elapsed, fp16 = group_health(self.counts), time.time() - self.t_log, self.scaler.is_enabled()
        eta = (time.time() - self.t_start) / max(1, step - self.first_step) * (self.total_steps - step)
        skipped = int(self.skipped) if fp16 else 0
        record = dict(step=step, epoch=epoch, loss=loss.item(), lr=lr, beta=beta, img_per_s=self.images / elapsed,
                      data_time=self.data_time / elapsed, groups_used=used, assign_entropy=entropy,
                      assign_entropy_max=math.log(self.cfg.num_groups), eta_s=eta, bad_images=self.bad_images,
                      skipped_steps=skipped, grad_scale=self.scaler.get_scale() if fp16 else None)
        if torch.cuda.is_available():
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30  # peak so far, this process
        log(f"step {step}/{self.total_steps} | epoch {epoch} | loss {record['loss']:.4f} | lr {lr:.4f} | "
            f"β {beta:.4f} | {record['img_per_s']:.0f} img/s | data {100 * record['data_time']:.0f}% | groups used "
            f"{used:.0f}/{self.cfg.num_groups}, entropy {entropy:.2f}/{record['assign_entropy_max']:.2f} | "
            + (f"fp16 steps skipped {skipped}, scale {record['grad_scale']:g} | " if fp16 else "")
            + (f"unreadable images {self.bad_images} (replaced) | " if self.bad_images else "")
            + f"ETA {datetime.timedelta(seconds=round(eta))}")
        self.write(record)
        self.skipped_in_job, steps_in_job = self.skipped_in_job + skipped, step - self.first_step
        # From its initial 2^16 the scale finds its level within ~20 skipped steps; more than 3% after that is not
        # calibration but gradients that keep overflowing.
        if not self.warned and self.skipped_in_job > 20 + 0.03 * steps_in_job:
            self.warned = True
            log(f"warning: GradScaler skipped {self.skipped_in_job} of the {steps_in_job} optimiser steps of this job "
                f"(fp16 overflows; scale {record['grad_scale']:g}): lower --lr, or use --precision bf16 or fp32")
        self.restart()  # each log line counts its own interval
        self.counts, self.skipped = 0, 0

    def write(self, record):  # one line of log.jsonl, which rank 0 holds (the others have None)
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

def parameter_counts(cfg):
    """Millions of parameters of the networks a config builds (made on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        online = make_online(cfg)
    millions = lambda module: sum(p.numel() for p in module.parameters()) / 1e6  # noqa: E731
    backbone = millions(online.encoder.backbone)
    classifier = (online.encoder.projector[0].in_features + 1) * 1000 / 1e6  # papers count it (ResNet-50: 25.6M)
    return dict(backbone=round(backbone, 2), backbone_with_1000_class_classifier=round(backbone + classifier, 2),
                projector=round(millions(online.encoder.projector), 2),
                predictor=round(millions(online.predictor), 2), online=round(millions(online), 2))

def _ticks(lo, hi, most=5):  # round tick values from lo to hi, at most `most` of them (steps of 1, 2 or 5 × 10^n)
    raw = (hi - lo) / most
    unit = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next(unit * m for m in (1, 2, 5, 10) if unit * m >= raw)
    return [i * step for i in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]

def plot_curves(out_dir):
    """Writes out_dir/curves.svg from its log.jsonl (plain SVG, no plotting package); returns its path."""
    try:
        records = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl")) if line.strip()]
    except (OSError, ValueError) as e:
        fail(f"--plot {out_dir}: no readable log.jsonl ({type(e).__name__}: {e})")
    log_k = max([r.get("assign_entropy_max", 0) for r in records] + [0])
    k = round(math.exp(log_k)) if log_k else None
    # (key, title, range: fixed, or the data's from "zero" or None: their own; reference line and its label or None)
    panels = [("loss", "loss", None, None), ("lr", "learning rate", "zero", None),
              ("beta", "β (centroid momentum)", None, (1.0, "1")),
              ("groups_used", "groups used", (0, 1.05 * k) if k else "zero", (k, f"K = {k}") if k else None),
              ("assign_entropy", "assignment entropy (nats)", (0, 1.05 * log_k) if k else "zero",
               (log_k, f"log K = {log_k:.2f}") if k else None),
              ("knn_top1", "kNN top-1 (%)", (0, 100), None)]
    s_hi = max([r["step"] for r in records if "step" in r] + [1])
    epoch_at = sorted((r["step"], r["epoch"]) for r in records if "step" in r and "epoch" in r)
    w, h, left, top, bottom = 380, 240, 52, 30, 46
    pw, ph = w - left - 16, h - top - bottom
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{3 * w}" height="{2 * h}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for i, (key, title, fixed, ref) in enumerate(panels):
        x0, y0 = (i % 3) * w + left, (i // 3) * h + top
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
        values = [v for _, v in points] + ([ref[0]] if ref else [])
        lo, hi = fixed if isinstance(fixed, tuple) else (min(values, default=0), max(values, default=1))
        lo = min(lo, 0) if fixed == "zero" else lo
        if hi - lo < 1e-9 * max(1.0, abs(hi)):  # a constant series: a small band around it, not a jumping line
            lo, hi = lo - max(abs(lo) * 0.05, 1e-3), hi + max(abs(hi) * 0.05, 1e-3)
        pad = 0 if isinstance(fixed, tuple) else 0.05 * (hi - lo)
        lo, hi = lo - (pad if lo != 0 else 0), hi + pad
        sx = lambda s: x0 + pw * s / s_hi  # noqa: E731
        sy = lambda v: y0 + ph - ph * (v - lo) / (hi - lo)  # noqa: E731
        svg.append(f'<text x="{x0}" y="{y0 - 10}" font-weight="bold">{title}</text><rect x="{x0}" y="{y0}" '
                   f'width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        svg += [f'<text x="{x0 - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.4g}</text><line x1="{x0}" '
                f'x2="{x0 + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>' for t in _ticks(lo, hi)]
        for t in _ticks(0, s_hi, 4):
            epoch = max([e for s, e in epoch_at if s <= t], default=0 if epoch_at else None)
            svg.append(f'<text x="{sx(t):.1f}" y="{y0 + ph + 14}" text-anchor="middle">{t}</text>'
                       + (f'<text x="{sx(t):.1f}" y="{y0 + ph + 26}" text-anchor="middle" fill="#777">epoch {epoch}'
                          f'</text>' if epoch is not None else ""))
        if ref:
            svg.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{sy(ref[0]):.1f}" y2="{sy(ref[0]):.1f}" stroke="#c33" '
                       f'stroke-dasharray="4 3"/><text x="{x0 + pw - 4}" y="{sy(ref[0]) - 4:.1f}" text-anchor="end" '
                       f'fill="#c33">{ref[1]}</text>')
        marked = key == "knn_top1" or len(points) == 1  # reports: marked points, labelled; series: a line
        if not marked and points:
            line = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in points)
            svg.append(f'<polyline points="{line}" fill="none" stroke="#1f5fa8" stroke-width="1.5"/>')
        svg += [f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="3" fill="#1f5fa8"/><text x="{sx(a):.1f}" '
                f'y="{sy(b) - 6:.1f}" text-anchor="middle">{b:.1f}</text>' for a, b in points if marked]
    path = os.path.join(out_dir, "curves.svg")
    with open(path, "w") as f:
        f.write("\n".join(svg + ["</svg>"]) + "\n")
    return path

# ----- training: train() and the command line ----------------------------------------------------------------------
def train(cfg):  # the whole run, holding its out-dir; returns the RunState
    device = setup_device(cfg.dist_timeout)
    with holding_out_dir(cfg.out_dir, device):
        return _train(cfg, device)

def _train(cfg, device):
    precision, autocast, scaler = resolve_precision(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    log(f"device: {device}, processes: {world_size()}, precision: {precision}")
    resume = resolve_resume(cfg)
    data = TrainData(cfg, device)
    n, steps_per_epoch = cfg.accumulate, data.steps_per_epoch  # n: forward passes per step
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    global_batch = cfg.batch_size * world_size() * n
    log(f"data: {len(data.labels)} images, {steps_per_epoch} steps per epoch, global batch {global_batch} "
        f"({cfg.batch_size} × {world_size()} process(es)" + (f" × {n} passes" if n > 1 else "")
        + f"), crops: {CROP_PATHS[data.path]}")
    run = RunState(cfg, device, data.epoch_images, scaler)
    if resume:
        run.resume(resume, cfg, data)
    else:
        t0 = time.time()
        with autocast:
            fill_bank(run.online.encoder, run.bank, data.global_crops())
        start_epoch(run.grouping, run.bank, run.online, run.target, cfg.kmeans_iters,
                    torch.Generator().manual_seed(seed_for(cfg.seed, -1)))
        log(f"bank filled by the initial network, groups set by k-means ({time.time() - t0:.1f}s)")
    peak_lr, first_epoch, hyper = cfg.lr * global_batch / 256, run.epoch, step_hyperparameters(cfg)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    start_norm = weight_norm(run.online).item()
    held_out = load_dataset(cfg, "val") if rank() == 0 and (cfg.knn or cfg.eval_every) else None
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")

    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank() == 0 else nullcontext() as jsonl, \
            catch_preemption() as caught, collective_failures_in_one_line(run, cfg.dist_timeout):
        progress = Progress(cfg, total_steps, jsonl, run.step, scaler)
        for epoch in range(run.epoch, cfg.epochs):
            # Data order is a function of (seed, epoch), each pass's crops of (seed, process, pass): resuming at any
            # step is exact with batched augmentation (CPU workers draw from their own per-epoch seeds).
            data.sampler.set_epoch(epoch)
            torch.manual_seed(seed_for(cfg.seed, epoch, rank()))  # the loader's worker seeds
            progress.restart()
            preempted = False
            for batches in progress.timed(data.steps(run.step, run.epoch_step)):
                lr = lr_at(run.step, total_steps, warmup_steps, peak_lr, cfg.start_lr, cfg.final_lr)
                beta = beta_at(run.step, total_steps, cfg.beta_start, cfg.beta_end)
                for group in run.opt.param_groups:
                    group["lr"] = lr
                passes = (data.crops(batch, run.step * n + i) for i, batch in enumerate(batches))
                loss, counts, z_global, skipped = train_step(run.online_ddp, run.target, run.grouping, passes, run.opt,
                                                             run.scaler, beta=beta, autocast=autocast, **hyper)
                run.bank.add(z_global)
                progress.add(counts, skipped)
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), run.step, bad_step)
                run.step, run.epoch_step = run.step + 1, run.epoch_step + 1
                if run.step % cfg.log_every == 0 or run.step == total_steps:
                    stop_if_diverged(bad_step, run, start_norm, ckpt_path)
                    progress.report(run.step, epoch, loss, lr, beta)
                if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.epoch_step < steps_per_epoch:
                    stop_if_diverged(bad_step, run, start_norm, ckpt_path)
                    run.save(ckpt_path, cfg, data)
                # Checked every step in one process (free), every 10 steps under torchrun (one host sync each).
                if (run.step % 10 == 0 or not distributed()) and caught_by_any(caught, device):
                    preempted = True
                    break
            stop_if_diverged(bad_step, run, start_norm, ckpt_path)  # exit: before any checkpoint
            t0 = time.time()
            if run.epoch_step == steps_per_epoch:  # next epoch's start: k-means on this epoch's bank, target ← online
                start_epoch(run.grouping, run.bank, run.online, run.target, cfg.kmeans_iters,
                            torch.Generator().manual_seed(seed_for(cfg.seed, epoch)))
                run.epoch, run.epoch_step = epoch + 1, 0
            reset_seconds = time.time() - t0
            run.save(ckpt_path, cfg, data)
            if preempted or caught_by_any(caught, device):  # exit: preempted or Ctrl-C (mid-epoch or at its end)
                log(f"caught {'Ctrl-C' if signal.SIGINT in caught else 'a preemption signal'}: checkpoint "
                    f"{ckpt_path} at epoch {run.epoch}, step {run.step}; run again to resume from there")
                break
            if (epoch + 1) % max(1, cfg.epochs // 20) == 0 or epoch + 1 == cfg.epochs:  # at most ~20 such lines
                log(f"epoch {epoch} done: groups reset by k-means ({reset_seconds:.1f}s), checkpoint {ckpt_path}")
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and rank() == 0:
                knn_report(run, cfg, device, data, held_out, progress, epoch)
            if cfg.stop_after and epoch + 1 - first_epoch >= cfg.stop_after and epoch + 1 < cfg.epochs:  # exit
                log(f"stopping after {cfg.stop_after} epoch(s) as asked; run again to resume from epoch {epoch + 1}")
                break
        if cfg.knn and rank() == 0 and run.step == total_steps:  # the other processes need not wait for it
            knn_report(run, cfg, device, data, held_out, progress, cfg.epochs - 1, final=True)
    if signal.SIGINT in caught:
        raise SystemExit(130)  # the shell's status for a program stopped by Ctrl-C
    return run

def main(argv=None):
    cfg, args = parse_command(argv)
    if args.plot:
        print(f"wrote {plot_curves(args.plot)}")
        return
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"parameters (millions): {json.dumps(parameter_counts(cfg))}")
        return
    try:
        train(cfg)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading data, filling the bank, the kNN report)
        raise SystemExit("smog.py: stopped by Ctrl-C; the run resumes from its last checkpoint") from None
    if distributed():
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
