"""SMoG: Synchronous Momentum Grouping for self-supervised visual representation learning.

Pang et al., "Unsupervised Visual Representation Learning by Synchronous Momentum Grouping", ECCV 2022,
https://arxiv.org/abs/2207.06167. Each image is contrasted against *group centroids* instead of other instances.
Every step, (1) the target branch labels each image with its nearest centroid, (2) the centroids move toward the
mean of the online features assigned to them (a momentum update, all-reduced so every GPU holds the same groups),
(3) the online branch is trained with a cross-entropy that pulls its prediction toward the labelled centroid.
At every epoch start the groups are re-clustered by spherical k-means on a bank of last epoch's features.

    python smog.py                                   # tiny preset: embedded data set, small ResNet, CPU, minutes
    torchrun --standalone --nproc_per_node=gpu --max-restarts=3 smog.py --preset imagenet-r50 --data /path/to/imagenet

Part 1, "SMoG", is the whole method for any backbone, with torch and torchvision alone; Part 2, "Trainer", makes it
a program. "The authors' code" is the paper's released main_SMoG.py and src/.
"""
import copy
import functools
import math
import os
import signal
import sys
from contextlib import nullcontext
from typing import NamedTuple

if __name__ == "__main__":  # Ctrl-C while torch loads: exit 130 without a traceback, at once (not by SystemExit,
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))  # which an import's broad `except` could swallow)

import PIL.ImageFilter
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

if __name__ == "__main__":  # torch is loaded: Ctrl-C raises KeyboardInterrupt again
    signal.signal(signal.SIGINT, signal.default_int_handler)

__all__ = ["distributed", "rank", "world_size", "all_reduce_", "broadcast_", "CropRecipe", "Crops", "MultiCrop",
           "stack_crops", "pipelines_for_step", "mlp", "projector_and_predictor", "Encoder", "OnlineNet", "target_of",
           "MomentumGrouping", "MemoryBank", "fill_bank", "start_epoch", "smog_loss", "LARS", "parameter_groups",
           "lr_at", "beta_at", "ema_", "train_step"]

# ===================================================================================================================
# Part 1 — SMoG: the method
# ===================================================================================================================
# The algorithm (the paper's Algorithm 1 as it runs here), in Part 1's names:
#
#   online = OnlineNet(f, *projector_and_predictor(dim))     # f: any backbone (N, 3, s, s) → (N, dim); g, q: MLPs
#   target = target_of(online)                               # a copy of f and g, trained only by EMA
#   grouping, bank = MomentumGrouping(K, D, H), MemoryBank(rows, D)
#   fill_bank(online, bank, global crops of one pass over the data)      # once, before the first epoch
#   for every epoch:
#       start_epoch(grouping, bank, online, target)          # c_k ← k-means of the bank; target ← online
#       for every batch of images, pass i of the epoch, step t of the run:
#           crops = stack_crops([MultiCrop(recipe)(image, i) for image in batch])  # 2 + 2 global, L local crops;
#           loss, counts, z, _ = train_step(online, target, grouping, [crops], opt, scaler,  # pipelines q, k swap
#                                           beta=beta_at(t, T), tau=τ, ema=m)              # at every pass
#               # 0. target ← m·target + (1−m)·online   1. y = argmax_k ⟨z_target, c_k⟩
#               # 2. c_k ← normalize(β·c_k + (1−β)·mean of the z in group k)   3. CE(p · Cᵀ / τ, y) → LARS step
#           bank.add(z)                                      # what the next epoch's k-means clusters

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

def broadcast_(t, src=0):  # copies rank src's t to every process, in place
    if distributed():
        dist.broadcast(t, src)
    return t

# ----- the multi-crop recipe (the authors' src/multicropdataset.py, MultiCropDataset) ------------------------------
# Every crop: RandomResizedCrop, flip, colour jitter, grayscale, then blur and solarize with its pipeline's
# probabilities. The pipelines "q" and "k" (query and key, MoCo's words for the online and target views) swap
# branches at every pass. These constants serve MultiCrop and Part 2's batched augmentation alike.

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation
JITTER = (0.4, 0.4, 0.2, 0.1)  # ColorJitter strengths: brightness, contrast, saturation, hue
JITTER_P = 0.8
GRAYSCALE_P = 0.2
FLIP_P = 0.5
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
    """(online pipeline, target pipeline) of forward pass `step` of an epoch: the two swap roles at every pass, and
    each epoch starts with q online (main_SMoG.py, train: `it % 2`; with accumulation too)."""
    return ("q", "k") if step % 2 == 0 else ("k", "q")

def pil_blur(image, sigma):
    """PIL's Gaussian blur of radius σ ~ U(sigma), as the authors' PILRandomGaussianBlurWithSolarize: it blurs at any
    σ (torchvision's sampled kernel barely blurs below σ ≈ 0.45)."""
    return image.filter(PIL.ImageFilter.GaussianBlur(float(torch.empty(()).uniform_(*sigma))))

class MultiCrop:
    """(PIL image, pass of the epoch) → Crops of that image, by per-image torchvision pipelines: the definition of
    the recipe."""
    def __init__(self, recipe=CropRecipe()):
        self.recipe = recipe
        T = torchvision.transforms

        def pipeline(size, scale, name):
            blur_p, solarize_p = PIPELINES[name]
            blur = T.Lambda(functools.partial(pil_blur, sigma=recipe.blur_sigma))
            return T.Compose([T.RandomResizedCrop(size, scale=scale, ratio=ASPECT),  # bilinear, as the authors'
                              T.RandomHorizontalFlip(FLIP_P),
                              T.RandomApply([T.ColorJitter(*JITTER)], p=JITTER_P),
                              T.RandomGrayscale(p=GRAYSCALE_P),
                              T.RandomApply([blur], p=blur_p),
                              T.RandomSolarize(128, p=solarize_p),
                              T.ToTensor(),
                              T.Normalize(MEAN, STD)])
        self.global_pipelines = {name: pipeline(recipe.global_size, recipe.global_scale, name) for name in PIPELINES}
        self.local_pipelines = {name: pipeline(recipe.local_size, recipe.local_scale, name) for name in PIPELINES}

    def __call__(self, image, step):
        (online_aug, target_aug), n_local = pipelines_for_step(step), self.recipe.num_local

        def crops(pipelines, name, n):  # (n, 3, s, s), or None
            return torch.stack([pipelines[name](image) for _ in range(n)]) if n else None
        return Crops(crops(self.global_pipelines, online_aug, 2), crops(self.local_pipelines, online_aug, n_local),
                     crops(self.global_pipelines, target_aug, 2),
                     crops(self.local_pipelines, target_aug, n_local * self.recipe.target_local))

def stack_crops(per_image):
    """One batch's Crops from MultiCrop's per-image Crops, crop-major (every image's first crop, then every second)."""
    return Crops(*(None if parts[0] is None else torch.stack(parts, 1).flatten(0, 1) for parts in zip(*per_image)))

# ----- networks: backbone f → projector g → predictor q online; a copy of f and g as the target branch -------------
def mlp(dim_in, hidden, dim_out, last_bn, activation=nn.ReLU):
    """Linear → BN → activation → Linear (→ affine-free BN, the projector's), as the authors' src/resnet50.py."""
    layers = [nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), activation(), nn.Linear(hidden, dim_out)]
    if last_bn:
        layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)

def projector_and_predictor(dim, hidden_dim=2048, feat_dim=128):
    """g: dim → hidden → D, ending in an affine-free BN; q: D → hidden → D (the authors' ResNet MLPs)."""
    return mlp(dim, hidden_dim, feat_dim, last_bn=True), mlp(feat_dim, hidden_dim, feat_dim, last_bn=False)

class Encoder(nn.Module):
    """Backbone f, then projector g: a list of crops (n_i, 3, s_i, s_i), one tensor per size → z (Σ n_i, D).
    backbone_over_sizes(backbone, crops): every size's features in one go (None: the backbone once per size; Part 2
    gives ResNets one); mlp_per_size: each size through the MLPs alone (the authors' Transformers), not in one batch."""
    def __init__(self, backbone, projector, backbone_over_sizes=None, mlp_per_size=False):
        super().__init__()
        self.backbone, self.projector = backbone, projector
        self.backbone_over_sizes, self.mlp_per_size = backbone_over_sizes, mlp_per_size

    def forward(self, crops):  # list of (n_i, 3, s_i, s_i) -> (Σ n_i, D)
        if self.backbone_over_sizes is not None and len(crops) > 1:
            feats = [x.flatten(1) for x in self.backbone_over_sizes(self.backbone, crops)]
        else:
            feats = [self.backbone(x) for x in crops]
        return self.mlp(self.projector, feats)

    def mlp(self, mlp, feats):  # every size's features (n_i, d) → (Σ n_i, D), one set of BN statistics or one per size
        return torch.cat([mlp(x) for x in feats]) if self.mlp_per_size else mlp(torch.cat(feats))

class OnlineNet(nn.Module):
    """The online branch: encoder (f, g) plus predictor q. Returns (z, p), both (Σ n_i, D), not yet normalised."""
    def __init__(self, backbone, projector, predictor, backbone_over_sizes=None, mlp_per_size=False):
        super().__init__()
        self.encoder = Encoder(backbone, projector, backbone_over_sizes, mlp_per_size)
        self.predictor = predictor

    def forward(self, crops):
        z = self.encoder(crops)
        return z, self.encoder.mlp(self.predictor, z.split([len(x) for x in crops]))

def target_of(online):
    """The target branch: a copy of the online encoder, without gradients (trained by EMA alone)."""
    return copy.deepcopy(online.encoder).requires_grad_(False)

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
    epoch start's k-means clusters, head h crop h mod 2 (the authors'). M must be the images this process trains on
    per epoch (after drop_last; under DDP its share, not the data set's size): rows never filled would join k-means."""
    def __init__(self, rows, dim, device):
        self.feats = torch.zeros(2, rows, dim, device=device)
        self.filled = 0  # where the next row goes: the oldest rows are overwritten first

    def add(self, z):  # z: (2, B, D), B at most M; past the last row it goes on from the first
        rows = self.feats.shape[1]
        b = z.shape[1]
        first = min(b, rows - self.filled)  # the rows before the end, then the rest from row 0
        z = F.normalize(z.float(), dim=-1)
        self.feats[:, self.filled:self.filled + first] = z[:, :first]
        self.feats[:, :b - first] = z[:, first:]
        self.filled = (self.filled + b) % rows

    def for_heads(self, num_heads):  # (H, M, D)
        return self.feats.repeat((num_heads + 1) // 2, 1, 1)[:num_heads]  # head h clusters crop h mod 2

# ----- the epoch start (main_SMoG.py, train: init_memory before the first epoch, then cluster_memory) --------------
@torch.no_grad()
def fill_bank(online, bank, global_crops):
    """Fills the bank with the initial network's z for the first k-means (the authors' init_memory): global_crops
    yields each batch's online global crops (2B, 3, S, S), each crop forwarded alone through the whole online
    network (BN sees one crop per image; the predictor runs too, as theirs)."""
    for both_crops in global_crops:
        bank.add(torch.stack([online([crop])[0].float() for crop in both_crops.chunk(2)]))  # (2, B, D)

@torch.no_grad()
def start_epoch(grouping, bank, online, target, kmeans_iters=10, generator=None):
    """Every epoch start: groups reset by k-means on last epoch's bank (cluster_memory), BN statistics made equal on
    every process, the target's parameters ← the online encoder's (--reset_k_encoder; its BN buffers are unused)."""
    grouping.kmeans_(bank.for_heads(grouping.centroids.shape[0]), kmeans_iters, generator=generator)
    for buffer in online.buffers():  # running statistics drift apart per process without SyncBN (CPU)
        broadcast_(buffer)
    torch._foreach_copy_(list(target.parameters()), list(online.encoder.parameters()))

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

def parameter_groups(modules, exclude_1d=False, no_decay_names=()):
    """Optimiser groups: weight decay and LARS for every parameter (the authors' LARC), except with exclude_1d (their
    Transformer recipe) for biases, 1-D (norm) parameters and the parameters whose names end in no_decay_names."""
    named = [(n, p) for m in modules for n, p in m.named_parameters() if p.requires_grad]
    excluded = [exclude_1d and (p.ndim <= 1 or n.endswith(tuple(no_decay_names))) for n, p in named]
    groups = [dict(params=[p for (_, p), x in zip(named, excluded) if not x]),
              dict(params=[p for (_, p), x in zip(named, excluded) if x], weight_decay=0.0, lars=False)]
    return [g for g in groups if g["params"]]

def lr_at(step, total_steps, warmup_steps, peak, start, final):
    """Linear warm-up from start to peak, reached at the last warm-up step (the authors' linspace), then cosine
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
def train_step(online, target, grouping, passes, opt, scaler, *, beta, tau, ema, accumulate=1, clip_grad=0.0,
               autocast=nullcontext()):
    """One SMoG step: EMA, label with the target, update the groups with online z, contrast online p with them, step.

    online: OnlineNet (or DDP around one), target: its encoder's EMA copy, scaler: a GradScaler (enabled for fp16),
    ema: the target's momentum, clip_grad: max gradient norm (0: off). passes: `accumulate` Crops, made as each runs;
    as main_SMoG.py's --multi_forward, each is labelled and backpropagated alone (1/N of the gradient), the groups
    move once, with every pass's z, before the last pass's loss, then one optimiser step. Returns device tensors
    (no host sync): mean loss, counts (H, K), online global z (2, N·B, D), whether GradScaler skipped the step."""
    h, k = grouping.centroids.shape[:2]
    module = getattr(online, "module", online)  # the OnlineNet itself, also inside DDP
    # 0. target ← m·target + (1−m)·online, at the step's start as main_SMoG.py's model forward (update_k_encoder
    # on each step's first pass): the online network as the previous step left it
    ema_(target, module.encoder, ema)
    z_globals, losses = [], []
    for i, crops in enumerate(passes):
        last = i == accumulate - 1
        b = crops.target_global.shape[0] // 2
        target_crops = [x for x in (crops.target_global, crops.target_local) if x is not None]
        online_crops = [x for x in (crops.online_global, crops.online_local) if x is not None]
        # DDP all-reduces the gradients once, in the last pass's backward
        gradients_synced = last or not hasattr(online, "no_sync")
        with nullcontext() if gradients_synced else online.no_sync():
            with autocast:
                with torch.no_grad():
                    zt = target(target_crops)[:2 * b].float()  # (2B, D): global crops' z
                z, p = online(online_crops)  # (C_online·B, D) each
            labels = grouping.assign(zt).view(h, 2, b)  # 1. y: nearest c_k before the update
            z_globals.append(z[:2 * b].detach().float().view(2, b, -1))  # (2, B, D)
            if last:  # 2. every pass's z moves the groups; head h with online global crop h mod 2
                z_global = torch.cat(z_globals, 1)  # (2, N·B, D)
                # repeat, not list indexing, which would copy indices from the host
                counts = grouping.update(z_global.repeat((h + 1) // 2, 1, 1)[:h], beta)
            loss = smog_loss(grouping.logits(p, tau).view(h, -1, b, k), labels)  # 3. p against the c_k
            scaler.scale(loss / accumulate).backward()
        losses.append(loss.detach())
    if len(losses) != accumulate:
        raise ValueError(f"train_step got {len(losses)} forward passes, accumulate is {accumulate}")
    scaler.unscale_(opt)  # 4. trust ratios and clipping need the true gradients; no host sync
    # only fp16 skips steps: no extra pass over the gradients for the other precisions
    skipped = overflowed(online.parameters()) if scaler.is_enabled() else torch.zeros((), dtype=torch.bool,
                                                                                       device=z_global.device)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(online.parameters(), clip_grad)
    scaler.step(opt)  # under fp16, skipped on the device when the gradients overflowed
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return torch.stack(losses).mean(), counts, z_global, skipped

def overflowed(parameters):
    """Whether any gradient holds an inf or NaN, as a device tensor: the steps GradScaler skips under fp16."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())

# ===================================================================================================================
# Part 2 — Trainer: config, backbones, data, batched augmentation, feeding the device, run state, faults, reports
# ===================================================================================================================
import argparse, ctypes, dataclasses, datetime, errno, fcntl, hashlib, json, re, socket, stat
import time, types, zipfile
from contextlib import contextmanager, suppress

import numpy as np
import PIL.Image
from torchvision.models.resnet import BasicBlock, Bottleneck

# ----- config: one dataclass, presets on top of it, explicit flags on top of the preset; one-line messages ---------
def option(default, help, section=None, auto=None):  # a Config field, its --help line and section, what auto means
    return dataclasses.field(default=default, metadata=dict(help=help, section=section, auto=auto))

@dataclasses.dataclass
class Config:
    """Every setting of a run. None means automatic (`auto` on the command line), 0 means off where a field says so."""
    preset: str = option("tiny", "the recipe to start from (listed below); flags given override it", section="run")
    data: str = option("synthetic", "synthetic | cifar10 (downloaded) | PATH to class folders, or to train/, val/")
    out_dir: str = option("out", "where checkpoint.pt, log.jsonl and the lock go")
    epochs: int = option(400, "passes over the training split")
    batch_size: int = option(64, "images per process and pass; the global batch: batch_size × processes × accumulate")
    accumulate: int = option(1, "forward passes per optimiser step (the authors' --multi_forward): fewer GPUs")
    workers: int | None = option(None, "loader processes per training process", auto="the cores / processes")
    seed: int = option(0, "the seed of weights, groups, data order, crops and the embedded data set")
    resume: str | None = option(None, "the checkpoint to continue", auto="out_dir/checkpoint.pt, if any")
    checkpoint_every: int = option(0, "also checkpoint every N steps (what a killed process loses); 0: epoch ends")
    dist_timeout: int = option(300, "seconds a process waits for the others in a collective before it fails")
    synthetic_size: int = option(8000, "training images of the embedded data set (its held-out split has 2000)")
    # The multi-crop fields are Part 1's CropRecipe, with its defaults (the paper's ResNet-50 recipe).
    global_size: int = option(224, "side of the 2 online and 2 target global crops", section="multi-crop")
    global_scale: tuple[float, float] = option((0.2, 1.0), "area range of the global crops (RandomResizedCrop)")
    local_size: int = option(96, "side of the local crops")
    local_scale: tuple[float, float] = option((0.05, 0.2), "area range of the local crops")
    num_local: int = option(4, "local crops per image (online; the target forwards as many)")
    target_local: bool = option(True, "the target forwards local crops too; they join only its BN statistics")
    blur_sigma: tuple[float, float] = option((0.1, 2.0), "range of the Gaussian blur's σ, in pixels of the crop")
    invert: float | None = option(0.0, "not in the paper: a crop's chance of its negative", auto="0.5 on synthetic")
    arch: str = option("resnet50", "the backbone (listed below)", section="networks")
    feat_dim: int = option(128, "dimension D of z, p and the centroids")
    hidden_dim: int = option(2048, "hidden width of the projector and the predictor")
    drop_path: float = option(0.0, "stochastic depth of the online backbone (Swin: 0.2), not of the target's")
    ema: float = option(0.999, "m: target ← m·target + (1−m)·online at each step's start; 0.99 for short runs")
    num_groups: int = option(3000, "K, centroids per group set", section="momentum grouping and loss")
    num_heads: int = option(3, "H, independent group sets (the paper's heads)")
    tau: float = option(0.1, "τ, the temperature of the group logits")
    beta_start: float = option(1.0, "β at the first step: the centroid momentum, linear per step to --beta-end")
    beta_end: float = option(0.99, "β at the last step")
    kmeans_iters: int = option(10, "spherical k-means iterations at every epoch start")
    optimizer: str = option("lars", "lars (ResNets) | adamw (Transformers)", section="optimisation")
    lr: float = option(0.3, "peak learning rate per 256 images of global batch (the paper's 4.8 at 4096)")
    start_lr: float = option(0.01, "learning rate at step 0, warmed up linearly to the peak")
    final_lr: float = option(0.0048, "learning rate at the last step, after the cosine decay")
    warmup_epochs: int = option(10, "epochs of linear warm-up; raise it if the loss becomes NaN early")
    weight_decay: float = option(1e-6, "weight decay (inside LARS's trust ratio)")
    momentum: float = option(0.9, "SGD momentum of LARS")
    lars_eta: float = option(0.001, "LARS trust coefficient; lower it if the loss does not decrease at large batch")
    clip_grad: float = option(0.0, "max gradient norm; 0: off")
    exclude_1d: bool = option(False, "no decay or LARS on biases, norms, position tables (the authors' Swin only)")
    precision: str | None = option(None, "fp16 | bf16 | fp32: autocast of the networks", section="system",
                                   auto="fp16 on CUDA, bf16 on CPUs with native bf16, else fp32")
    channels_last: bool = option(True, "NHWC memory layout: the one tensor cores and oneDNN's convolutions prefer")
    log_every: int = option(20, "steps between log lines")
    knn: bool = option(True, "kNN top-1 on the held-out split at the end (labels are used only for these reports)")
    eval_every: int | None = option(0, "also a kNN report every N epochs; 0: off", auto="about ten per run")

PRESETS = {  # name -> (one line for --help, what differs from Config's defaults: the paper's ResNet-50 recipe)
    "tiny": ("the default: the embedded 32-px data set, a 0.3M-parameter ResNet, minutes on 2 CPU cores",
             dict(data="synthetic", synthetic_size=2000, arch="resnet_tiny", epochs=160, batch_size=128, global_size=32,
                  global_scale=(0.5, 1.0), num_local=0, local_size=16, local_scale=(0.1, 0.4), blur_sigma=(0.01, 0.6),
                  hidden_dim=512, exclude_1d=True, num_groups=200, tau=0.05, lr=6.0, start_lr=0.05, final_lr=0.01,
                  warmup_epochs=2, ema=0.996, log_every=100, invert=None, eval_every=None)),
    "cifar10-r18": ("CIFAR-10 (downloaded), ResNet-18 with a 3x3 stem on 32-px images, one GPU",
                    dict(data="cifar10", arch="resnet18_cifar", epochs=200, batch_size=256, workers=4, global_size=32,
                         local_size=16, blur_sigma=(0.1, 0.5), num_groups=300, lr=1.2, start_lr=0.05, ema=0.99,
                         exclude_1d=True, eval_every=None)),
    # The paper's recipes (the authors' scripts/pretrain/*.sh): batch 4096 = 64 GPUs × 64, 400 epochs.
    "imagenet-r50": ("the paper's ResNet-50 recipe: 400 epochs at batch 4096 (64 GPUs × 64)", dict()),
    "imagenet-r50w2": ("the paper's ResNet-50w2 (every width doubled), the same recipe", dict(arch="resnet50w2")),
    # The authors' Swin-T script and src/optimizer.py: AdamW 1e-3 at batch 4096 (= 6.25e-5 per 256) → 4e-5.
    "imagenet-swin-t": ("the paper's Swin-T: the authors' BN blocks and MLPs, AdamW, drop-path 0.2",
                        dict(arch="swin_t_bn", drop_path=0.2, optimizer="adamw", feat_dim=256, lr=1e-3 * 256 / 4096,
                             start_lr=4e-5, final_lr=4e-5, weight_decay=0.05, clip_grad=3.0, exclude_1d=True,
                             target_local=False)),
}

def _flag(name):
    return "--" + name.replace("_", "-")

def _kind(f):  # the type of a field's values: int for `int | None`
    return f.type.__args__[0] if isinstance(f.type, types.UnionType) else f.type

def _shown(value):  # a config value as --help shows it
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return "auto" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

def _parse_value(f, text):  # one command-line value of field f (pairs are written '0.2,1.0'); ValueError: why not
    if text == "auto" and f.metadata["auto"]:
        return None
    pair = _kind(f) == tuple[float, float]
    if pair and text.count(",") != 1:
        raise ValueError("expected two comma-separated numbers, e.g. 0.2,1.0")
    value = tuple(map(float, text.split(","))) if pair else _kind(f)(text)
    if _kind(f) in (float, tuple[float, float]) and not all(map(math.isfinite, value if pair else [value])):
        raise ValueError("must be a finite number")
    if _kind(f) is int and abs(value) >= 2**63:
        raise ValueError("is too large (at most 2^63 - 1)")
    return value

def printable(text):  # text with control characters (newlines, terminal escapes) escaped, for the console
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))

def fail(message, prog="smog.py"):  # ends the program with one line "prog: error: message" (exit 1), no stack trace
    raise SystemExit(f"{prog}: error: {printable(message)}")

def log(*args):  # prints one escaped line on rank 0 only
    if rank() == 0:
        print(printable(" ".join(map(str, args))), flush=True)

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        fail(message, self.prog)

def parse_command(argv=None):
    """(Config, args): defaults ← --preset ← flags given; args holds the one-off --print-config and --plot."""
    presets = "\n".join(f"  {name:<18} {about}" for name, (about, _) in PRESETS.items())
    parser = _Parser(prog="smog.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog=f"presets (--preset):\n{presets}\n\nbackbones (--arch): {', '.join(BACKBONES)}")
    group = parser
    for f in dataclasses.fields(Config):  # default None: not given, so the preset's value holds
        group = parser.add_argument_group(f.metadata["section"]) if f.metadata["section"] else group
        text = f.metadata["help"] + f" (default {_shown(f.default)}"
        text += f"; auto: {f.metadata['auto']}" if f.metadata["auto"] else ""
        tiny = PRESETS["tiny"][1].get(f.name, f.default)
        text = (text + (f"; tiny preset: {_shown(tiny)})" if tiny != f.default else ")")).replace("%", "%%")
        how = (dict(action=argparse.BooleanOptionalAction) if f.type is bool else
               dict(metavar="LOW,HIGH" if _kind(f) == tuple[float, float] else _kind(f).__name__.upper()))
        group.add_argument(_flag(f.name), default=None, help=text, **how)
    actions = parser.add_argument_group("one-off actions")
    actions.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    actions.add_argument("--plot", metavar="OUT_DIR", default="",
                         help="draw OUT_DIR/log.jsonl as curves.png and exit (needs matplotlib)")
    flags = [a.split("=")[0].replace("--no-", "--") for a in (sys.argv[1:] if argv is None else argv)
             if a.startswith("--")]
    for flag in (flag for flag in flags if flags.count(flag) > 1):
        fail(f"{flag} is given {flags.count(flag)} times; give it once")
    args = parser.parse_args(argv)
    given = {}
    for f in (f for f in dataclasses.fields(Config) if getattr(args, f.name) is not None):
        text = getattr(args, f.name)
        try:
            given[f.name] = text if f.type is bool else _parse_value(f, text)
        except ValueError as e:
            fail(f"{_flag(f.name)} {text!r}: {e}")
    preset = given.get("preset", Config.preset)
    if preset not in PRESETS:
        fail(f"--preset {preset!r} is unknown (choose from {', '.join(PRESETS)})")
    cfg = Config(**{**PRESETS[preset][1], **given, "preset": preset})
    automatic = dict(invert=0.5 if cfg.data == "synthetic" else 0.0,  # the embedded data set's, not the preset's
                     eval_every=max(1, cfg.epochs // 10),
                     workers=max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in automatic.items() if getattr(cfg, k) is None})
    check_config(cfg)
    return cfg, args

def crop_recipe(cfg):  # Part 1's CropRecipe of a config
    return CropRecipe(**{name: getattr(cfg, name) for name in CropRecipe._fields})

def config_text(cfg, indent=None):  # the config as JSON, automatic values shown as "auto" (as --help does)
    return json.dumps({k: "auto" if v is None else v for k, v in dataclasses.asdict(cfg).items()}, indent=indent)

def class_roots(data):  # the folders of --data whose subfolders are read as classes
    if data in ("synthetic", "cifar10") or not os.path.isdir(data):
        return []
    train = os.path.join(data, "train")
    return [train, os.path.join(data, "val")] if os.path.isdir(train) else [data]

def check_config(cfg):  # rejects values the run cannot use, naming the flag
    choices = dict(arch=BACKBONES, optimizer=("lars", "adamw"), precision=(None, "bf16", "fp16", "fp32"))
    rules = [(lambda v, allowed=allowed: v in allowed, f"unknown (choose from {', '.join(map(_shown, allowed))})",
              name) for name, allowed in choices.items()] + [  # finite numbers within 64 bits: checked when parsed
        (lambda v: v >= 1, "must be at least 1", "epochs accumulate global_size local_size feat_dim hidden_dim "
         "num_groups num_heads log_every dist_timeout"),
        (lambda v: v >= 2, "must be at least 2 (BatchNorm needs two images a pass)", "batch_size"),
        (lambda v: v >= 0, "must be at least 0", "num_local kmeans_iters warmup_epochs checkpoint_every "
         "start_lr final_lr weight_decay clip_grad eval_every"),
        (lambda v: 0 <= v <= 256, "must lie in [0, 256]", "workers"),
        (lambda v: 0 <= v < 2**62, "must lie in [0, 2^62) (seeds are 64-bit)", "seed"),
        (lambda v: 1 <= v <= 2_000_000, "must lie in [1, 2000000] (2M images take 6 GiB)", "synthetic_size"),
        (lambda v: 0 <= v <= 1, "must lie in [0, 1]", "ema beta_start beta_end drop_path momentum invert"),
        (lambda v: v > 0, "must be positive", "tau lr lars_eta"),
        (lambda v: 0 < v[0] <= v[1] <= 1, "needs 0 < low <= high <= 1", "global_scale local_scale"),
        (lambda v: 0 < v[0] <= v[1], "needs 0 < low <= high", "blur_sigma"),
        (lambda v: not any(os.path.realpath(v).startswith(os.path.join(os.path.realpath(root), "")) for root in
                           class_roots(cfg.data)), f"lies in --data {cfg.data}, where it would be read as a class "
         f"folder: give an --out-dir outside it", "out_dir")]
    for ok, why, names in rules:
        for name in (name for name in names.split() if not ok(getattr(cfg, name))):
            fail(f"{_flag(name)} {_shown(getattr(cfg, name))}: {why}")

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
    for m in net.children():
        if isinstance(m, nn.Sequential):
            xs = resnet_over_sizes(m, xs)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            xs = bn_over_sizes(m, xs)
        elif isinstance(m, nn.ReLU):  # not in place: BN's outputs are views of one tensor
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

def _tiny_resnet(widths=(16, 32, 64, 128)):
    """A 0.3M-parameter ResNet of four strided BasicBlocks after a 3x3 full-resolution stem, for CPUs."""
    # The last block is 128 wide, not 256: at 2x2 pixels its 3x3 convolutions mostly read padding.
    layers, c_in = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True)], widths[0]
    for c in widths:  # the full-resolution stem sees the corners that tell a 6-px square from a disk
        layers.append(BasicBlock(c_in, c, 2, nn.Sequential(nn.Conv2d(c_in, c, 1, 2, bias=False), nn.BatchNorm2d(c))))
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c_in

def _resnet50_wide(widen=2):
    """ResNet-50 with every width × widen (SwAV's and the authors' ResNet-50w2, 4096-d) in torchvision's modules."""
    net, width = torchvision.models.ResNet(Bottleneck, [3, 4, 6, 3]), 64 * widen
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    for i, (blocks, stride) in enumerate(zip([3, 4, 6, 3], [1, 2, 2, 2])):
        setattr(net, f"layer{i + 1}", net._make_layer(Bottleneck, width * 2 ** i, blocks, stride=stride))
    for m in net.modules():  # torchvision's initialisation of the convolutions made anew (BN's is the default)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net, 2048 * widen

class SwinBlockBN(torchvision.models.swin_transformer.SwinTransformerBlock):
    """The authors' Swin block (norm_before_mlp='bn', as MoBY): BatchNorm, not LayerNorm, before the MLP."""
    def __init__(self, dim, *args, **kwargs):  # torchvision's block, its second LayerNorm replaced
        super().__init__(dim, *args, **kwargs)
        self.norm2 = nn.BatchNorm1d(dim)

    def forward(self, x):  # (N, H, W, C)
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        x = self.norm2(x.flatten(0, 2)).view_as(x)
        return x + self.stochastic_depth(self.mlp(x))

def _swin_t(drop_path):
    """The authors' Swin-T in torchvision's modules (768-d pooled output; pads 96-px crops' maps to 7x7 windows)."""
    net = torchvision.models.SwinTransformer([4, 4], 96, [2, 2, 6, 2], [3, 6, 12, 24], [7, 7],  # patch, width, depths,
                                             stochastic_depth_prob=drop_path, block=SwinBlockBN)  # heads, window
    net.head = nn.Identity()  # torchvision's name for its classifier
    return net, 768

# name -> (drop_path) -> (backbone module mapping (N, 3, s, s) to (N, dim), dim). drop_path (stochastic depth) is
# used by Swin only: torchvision's ResNets have none.
BACKBONES = {
    "resnet_tiny": lambda drop_path: _tiny_resnet(), "resnet18": lambda drop_path: _torchvision_resnet("resnet18"),
    "resnet18_cifar": lambda drop_path: _torchvision_resnet("resnet18", small_stem=True),
    "resnet50": lambda drop_path: _torchvision_resnet("resnet50"), "resnet50w2": lambda drop_path: _resnet50_wide(2),
    "swin_t_bn": _swin_t,
}

def swin_mlps(dim, hidden_dim, feat_dim):
    """The authors' Swin projector (GELU) and predictor (ReLU), trunc-normal(0.02) (src/SwinTrans_multicrop.py)."""
    nets = mlp(dim, hidden_dim, feat_dim, last_bn=True, activation=nn.GELU), mlp(feat_dim, hidden_dim, feat_dim, False)
    for linear in (m for net in nets for m in net if isinstance(m, nn.Linear)):
        nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
    return nets

def make_online(cfg):
    """OnlineNet around a new cfg.arch backbone: ResNets' BN over sizes; the authors' Swin with their MLPs."""
    backbone, dim = BACKBONES[cfg.arch](cfg.drop_path)
    if cfg.arch == "swin_t_bn":
        net = SwinOnlineNet if cfg.drop_path else OnlineNet  # the online z without drop-path: with none, as it is
        return net(backbone, *swin_mlps(dim, cfg.hidden_dim, cfg.feat_dim), mlp_per_size=True)
    return OnlineNet(backbone, *projector_and_predictor(dim, cfg.hidden_dim, cfg.feat_dim), resnet_over_sizes)

def stochastic_depth(module):  # the module's stochastic-depth layers that drop (Swin's drop-path)
    return [m for m in module.modules() if isinstance(m, torchvision.ops.StochasticDepth) and m.p > 0]

class SwinOnlineNet(OnlineNet):
    """The authors' Swin online branch under drop-path: the global crops' z, which the groups and the bank see,
    forwarded again without drop-path or gradients (src/two_stream_network.py, TwoStreamNet.forward)."""
    def forward(self, crops):
        z, p = super().forward(crops)
        dropping = stochastic_depth(self)
        for m in dropping:
            m.eval()
        with torch.no_grad():
            z_global = self.encoder(crops[:1])  # (n_0, D), its BNs in training mode as the authors'
        for m in dropping:
            m.train(self.training)
        return torch.cat([z_global, z[len(z_global):]]), p

# The authors' Swin keeps these out of weight decay with the biases and norms (src/optimizer.py)
NO_DECAY = ("relative_position_bias_table", "absolute_pos_embed")

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
    if image.mode.startswith("I") or image.mode == "F":  # PIL's convert("RGB") clips these, most 16-bit images white
        x = np.asarray(image, dtype=np.float64)
        top = x.max(initial=0)
        full = (1.0 if image.mode == "F" and top <= 1 else 65535.0 if image.mode.startswith("I;16") or top <= 65535
                else 2.0 ** 31 - 1)  # 32-bit "I" files often hold 16-bit values
        image = PIL.Image.fromarray(np.clip(x / full * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")

def decode_cap(cfg):
    """The shorter side larger images decode to: the recipe's least crop (area, aspect 3:4) keeps its size."""
    return math.ceil(max(size / math.sqrt(scale[0] * ASPECT[0]) for size, scale in
                         ((cfg.global_size, cfg.global_scale), (cfg.local_size, cfg.local_scale))))

def decode(path, cap):
    """The image at path as uint8 RGB (3, h, w), shorter side ≤ cap, longer ≤ 2·cap (JPEGs by PIL's draft mode)."""
    with PIL.Image.open(path) as image:
        w, h = image.size
        scale = min(1.0, cap / min(w, h), 2 * cap / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if scale < 1:
            image.draft(None, size)  # JPEG: decodes at 1/2, 1/4 or 1/8, no smaller than size
        image = rgb8(image)
        image = image.resize(size, PIL.Image.BILINEAR) if image.size != size else image
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)

EXTENSIONS = (*torchvision.datasets.folder.IMG_EXTENSIONS, ".gif")  # an animated GIF gives its first frame

def scan_folder(root, classes=None):
    """(class names, [(path, class index)]) of a class-per-folder tree, each real file once."""
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
    samples, seen = [], {os.path.realpath(root)}  # real paths read: a link to a parent would repeat without end

    def first_time(path):  # whether the real file or folder behind path is new; it is marked as read
        real = os.path.realpath(path)
        return real not in seen and seen.add(real) is None
    for name in names:
        found, top = len(samples), os.path.join(root, name)
        if not first_time(top):
            fail(f"--data {top!r}: a link to another class folder, whose images count once; remove the link")
        for folder, subfolders, files in os.walk(top, followlinks=True):
            subfolders[:] = [s for s in sorted(subfolders) if first_time(os.path.join(folder, s))]
            paths = [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(EXTENSIONS)]
            samples += [(path, classes.index(name)) for path in paths if first_time(path)]
        if len(samples) == found:
            fail(f"--data {top!r}: a class folder without images ({', '.join(EXTENSIONS)})")
    return classes, samples

class ImageFolderData(torch.utils.data.Dataset):
    """A class-per-folder tree: item i is (uint8 (3, h, w), label, why an image was unreadable or "")."""
    def __init__(self, root, classes=None, cap=2**31, view=None):
        self.root, self.view = root, view  # view: a transform of the decoded image (the kNN's centre crop)
        self.cap = cap  # the shorter side larger images are decoded to
        self.classes, self.samples = scan_folder(root, classes)
        self.targets = [label for _, label in self.samples]

    def fingerprint(self):
        """What identifies the data set in a checkpoint: its image count and a hash of relative paths and sizes."""
        files = (f"{os.path.relpath(p, self.root)} {os.path.getsize(p) if os.path.isfile(p) else -1}"
                 for p, _ in self.samples)
        digest = hashlib.sha1("\n".join(files).encode()).hexdigest()[:12]
        return f"{len(self.samples)} images in {len(self.classes)} classes, paths and sizes sha1 {digest}"

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        failed = ""
        for attempt in range(len(self)):
            path, label = self.samples[(index + attempt) % len(self)]
            try:
                image = decode(path, self.cap)
                return (self.view(image) if self.view else image), label, failed
            except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable image"
                failed = failed or printable(f"{path} ({type(e).__name__}: {e})")
        fail(f"--data {self.root}: no readable image")

def load_dataset(cfg, split):
    """(images, labels, fingerprint) of split train|val: uint8 (N, 3, H, W), an ImageFolderData, or None."""
    if cfg.data == "synthetic":
        n = cfg.synthetic_size if split == "train" else 2000
        return (*synthetic_shapes(n, seed=cfg.seed * 2 + (split != "train")),
                f"the embedded data set, {n} images, --seed {cfg.seed}")
    if cfg.data == "cifar10":
        root = os.path.join(cfg.out_dir, "cifar10")
        try:
            ds = torchvision.datasets.CIFAR10(root, train=split == "train", download=True)
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a damaged archive: all say the same
            fail(f"--data cifar10: could not download CIFAR-10 to {root} ({type(e).__name__}: {e}); put "
                 f"cifar-10-batches-py there by hand, or train on --data PATH")
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets),
                f"CIFAR-10 {split}, {len(ds)} images")
    if not os.path.isdir(cfg.data):
        fail(f"--data {cfg.data}: no such directory (or use synthetic | cifar10)")
    if not os.path.isdir(os.path.join(cfg.data, "train")) and os.path.isdir(os.path.join(cfg.data, "val")):
        fail(f"--data {cfg.data}: has val/ but no train/ (a folder with val/ needs its training images in train/)")
    roots = class_roots(cfg.data)  # train/ and val/, or PATH alone
    if split == "val" and (len(roots) == 1 or not os.path.isdir(roots[1])):
        return None, None, ""
    classes = None if split == "train" else scan_folder(roots[0])[0]  # val/ labels follow train/'s class names
    ds = ImageFolderData(roots[split == "val"], classes, decode_cap(cfg))
    return ds, torch.tensor(ds.targets), ds.fingerprint()

# ----- batched augmentation: the multi-crop recipe on whole batches, on the training device ------------------------
# Part 1's MultiCrop as tensor work on the device, each crop with its own random parameters: each box is drawn from
# its own image's size in a padded uint8 canvas and resampled from that box's pixels alone. It differs from MultiCrop
# in the hue jitter (a turn about YIQ's grey axis, not an HSV shift), the jitter's fixed order (brightness, contrast,
# saturation, hue) and floats where PIL rounds to 8 bits (the README's fidelity table has their measured size).
def _gray(x):  # (n, 3, h, w) -> (n, 1, h, w), ITU-R 601 luma as torchvision
    return (x * _constants(x.device)["luma"].to(x.dtype)).sum(1, keepdim=True)  # (a 1x1 conv is far slower on CPU)

def _uniform(n, lo, hi, device):
    return torch.empty(n, device=device).uniform_(lo, hi)

def random_resized_boxes(sizes, scale, ratio=ASPECT, tries=10):
    """(n, 4) whole-pixel boxes x0, y0, x1, y1 in images of sizes (n, 2), as RandomResizedCrop.get_params."""
    n, device = len(sizes), sizes.device
    height, width = sizes.float().unbind(1)  # (n,) each
    area = _uniform(n * tries, *scale, device).view(n, tries) * (height * width)[:, None]
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), device)).view(n, tries)
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()  # (n, tries), whole pixels
    fits = (w > 0) & (h > 0) & (w <= width[:, None]) & (h <= height[:, None])
    first, ok = fits.int().argmax(1, keepdim=True), fits.any(1)  # the first try that fits, else torchvision's fallback
    w = torch.where(ok, w.gather(1, first)[:, 0], torch.minimum(width, height * ratio[1]).round())
    h = torch.where(ok, h.gather(1, first)[:, 0], torch.minimum(height, width / ratio[0]).round())
    # whole-pixel offsets, uniform over the places the box fits (torch.randint's), else the centre rounded down
    x0 = torch.where(ok, (torch.rand(n, device=device) * (width - w + 1)).floor(), ((width - w) / 2).floor())
    y0 = torch.where(ok, (torch.rand(n, device=device) * (height - h + 1)).floor(), ((height - h) / 2).floor())
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
    """(n, size, length) antialiased bilinear rows over spans [start, stop) of an axis (mirrored if stop < start)."""
    dev = start.device
    step = (stop - start) / size  # (n,) source pixels per output pixel, negative when mirrored
    centre = start[:, None] + (torch.arange(size, device=dev) + 0.5) * step[:, None]  # (n, size)
    width = step.abs().clamp(min=1)[:, None, None]  # the filter's half-width: wider when shrinking (antialiasing)
    index = torch.arange(length, device=dev)
    weight = (1 - (index + 0.5 - centre[..., None]).abs() / width).clamp(min=0)  # (n, size, length)
    low, high = torch.minimum(start, stop)[:, None, None], torch.maximum(start, stop)[:, None, None]
    weight = weight * ((index >= low) & (index < high))  # no pixel outside the span: padding is never read
    return weight / weight.sum(-1, keepdim=True)  # renormalised at the span's edges, as PIL

def cut(x, boxes, size, flip):
    """Crops (n, 3, size, size) of boxes (n, 4) in images x (B, 3, H, W), n = k·B crop-major, mirrored where flip."""
    # Cropping, resizing and flipping are linear in rows and columns: each crop is R · image · Cᵀ with its own
    # (size, H) R and (size, W) C, two batched matrix products on tensor cores instead of a gather per pixel.
    (b, c, h, w), k = x.shape, len(boxes) // len(x)
    x0, y0, x1, y1 = boxes.unbind(1)
    x0, x1 = torch.where(flip, x1, x0), torch.where(flip, x0, x1)  # columns read right to left: mirrored
    rows = _resampling_matrix(y0, y1, size, h).to(x.dtype).view(k, b, 1, size, h)
    cols = _resampling_matrix(x0, x1, size, w).to(x.dtype).view(k, b, 1, size, w)
    return (rows @ x @ cols.mT).view(k * b, c, size, size)  # (k, B, 1, s, H) @ (B, 3, H, W) @ (k, B, 1, W, s)

def random_resized_crops(x, sizes, size, scale, crops_per_image=1):
    """RandomResizedCrop + flip of x (B, 3, H, W) at sizes (B, 2) → (crops_per_image·B, 3, size, size)."""
    boxes = random_resized_boxes(sizes.repeat(crops_per_image, 1), scale)
    return cut(x, boxes, size, torch.rand(len(boxes), device=x.device) < FLIP_P)

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

def blur_matrices(sigma, length, sigma_max):
    """(n, length, length) matrices of PIL's GaussianBlur(σ) along an axis, σ (n,) ≤ sigma_max (0: identity)."""
    # Pillow's BoxBlur.c: three passes of a box of fractional radius, variance σ²/3 each, edge pixels repeated, so
    # B = P³. It blurs at any σ, as the authors' blur; a sampled Gaussian kernel barely blurs below σ ≈ 0.45 px.
    var, dev = (sigma.float() ** 2 / 3)[:, None], sigma.device  # (n, 1): each pass's variance
    whole = ((torch.sqrt(12 * var + 1) - 1) / 2).floor()  # the box's radius: whole pixels, then a fraction
    radius = whole + (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))
    reach = math.floor((math.sqrt(4 * sigma_max ** 2 + 1) - 1) / 2) + 2  # known on the host (no wait for the
    # device): the box reaches whole + 1 pixels, and one spare tap (of weight 0) covers float32's rounding
    taps = torch.arange(-reach, reach + 1, device=dev)  # (t,)
    edge = (radius - whole) * (taps.abs() == whole + 1)  # the fraction of a pixel at whole + 1
    weight = torch.where(taps.abs() <= whole, 1.0, edge) / (2 * radius + 1)  # (n, t)
    source = (torch.arange(length, device=dev)[:, None] + taps).clamp(0, length - 1)  # (length, t): edges repeated
    one_hot = (source[..., None] == torch.arange(length, device=dev)).float()  # (length, t, length)
    return torch.linalg.matrix_power(torch.einsum("nt,itj->nij", weight, one_hot), 3)

def _gaussian_blur(x, p, sigma):
    """Gaussian blur as PIL's with probability p and σ ~ U(sigma) per image: x (n, 3, h, w)."""
    n, _, h, w = x.shape
    s = torch.where(torch.rand(n, device=x.device) < p, _uniform(n, *sigma, x.device), 0.0)
    rows, cols = blur_matrices(s, h, sigma[1]).to(x.dtype), blur_matrices(s, w, sigma[1]).to(x.dtype)
    return rows[:, None] @ x @ cols[:, None].mT  # separable B_h · x · B_wᵀ: no per-image convolution kernels

def imagenet_normalize(x):  # (n, 3, h, w) in [0, 1] -> (x − mean) / std in float32
    const = _constants(x.device)
    return torch.addcmul(const["shift"], x, const["scale"])

def photometric(x, pipeline, blur_sigma, invert=0.0):
    """The recipe after the cut, per crop: jitter, grayscale, blur, solarize, (invert), normalisation."""
    n, (blur_p, solarize_p) = x.shape[0], PIPELINES[pipeline]
    x = _color_jitter(x)
    gray = torch.rand(n, device=x.device) < GRAYSCALE_P
    x = torch.where(gray.view(n, 1, 1, 1), _gray(x), x)
    x = _gaussian_blur(x, blur_p, blur_sigma)
    solarize = torch.rand(n, device=x.device) < solarize_p  # threshold 0.5, or 2 (never) for crops not solarized
    x = torch.where(x >= torch.where(solarize, 0.5, 2.0).view(n, 1, 1, 1), 1 - x, x)
    if invert:  # not in the paper: for data whose objects come light on dark and dark on light alike
        x = torch.where((torch.rand(n, device=x.device) < invert).view(n, 1, 1, 1), 1 - x, x)
    return imagenet_normalize(x)

def batch_augment(x, sizes, size, scale, pipeline, blur_sigma, crops_per_image=1, invert=0.0):
    """(crops_per_image·B, 3, size, size) normalised crops of [0, 1] images x (B, 3, H, W) of sizes (B, 2)."""
    return photometric(random_resized_crops(x, sizes, size, scale, crops_per_image), pipeline, blur_sigma, invert)

def unit_pixels(images):  # uint8 images as floats in [0, 1]: float16 on GPUs (half the traffic, 8 bits exact)
    return images.to(torch.float16 if images.is_cuda else torch.float32) / 255

def batch_multicrop(images, sizes, step, recipe, invert=0.0):
    """One step's Crops of uint8 images (B, 3, H, W) of sizes (B, 2), as MultiCrop's; step: the pass of the epoch."""
    r, (online_aug, target_aug) = recipe, pipelines_for_step(step)
    x = unit_pixels(images)  # converted once for the four calls
    def crops(size, scale, pipeline, n):  # (n·B, 3, size, size), or None
        return batch_augment(x, sizes, size, scale, pipeline, r.blur_sigma, n, invert) if n else None
    return Crops(crops(r.global_size, r.global_scale, online_aug, 2),
                 crops(r.local_size, r.local_scale, online_aug, r.num_local),
                 crops(r.global_size, r.global_scale, target_aug, 2),
                 crops(r.local_size, r.local_scale, target_aug, r.num_local * r.target_local))

# ----- feeding the device: one crop path for every source ----------------------------------------------------------
class TrainData:
    """The training split as batches of uint8 images on the device, and the Crops cut from them there."""
    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.recipe = crop_recipe(cfg)
        self.source, self.labels, self.fingerprint = load_dataset(cfg, "train")
        self.in_memory = isinstance(self.source, torch.Tensor)
        if self.in_memory:
            self.source = self.source.to(device)
        self.global_batch = cfg.batch_size * world_size() * cfg.accumulate
        if len(self.labels) < self.global_batch:
            fail(f"--batch-size {cfg.batch_size} × {world_size()} process(es) × --accumulate {cfg.accumulate} = "
                 f"{self.global_batch} is larger than the data set ({len(self.labels)} images in --data {cfg.data})")
        # As the authors': each process a share of every epoch, padded to a multiple of the processes, and the
        # batches that fill no step dropped (an epoch's last passes under --accumulate too).
        self.sampler = torch.utils.data.DistributedSampler(range(len(self.labels)), num_replicas=world_size(),
                                                           rank=rank(), shuffle=True, seed=cfg.seed)
        self.steps_per_epoch = len(self.sampler) // (cfg.batch_size * cfg.accumulate)
        self.passes_per_epoch = self.steps_per_epoch * cfg.accumulate  # this process's forward passes
        self.epoch_images = self.passes_per_epoch * cfg.batch_size  # this process's, per epoch: the bank's rows
        self.unreadable = set()  # the unreadable images met so far (streamed folders), each once

    def _passes(self, epochs, skip):  # each epoch's image indices (passes, B), from pass `skip` of the first on
        for epoch in epochs:  # the order is a function of (seed, epoch) alone
            self.sampler.set_epoch(epoch)
            yield torch.tensor(list(self.sampler)[:self.epoch_images]).view(-1, self.cfg.batch_size)[skip:]
            skip = 0

    def batches(self, epochs, skip=0):
        """(images uint8 (B, 3, H, W), sizes (B, 2), reasons unreadable) on the device for each pass after `skip`."""
        # One loader for every epoch: its workers start once and decode the next epoch's first batches meanwhile.
        if self.in_memory:  # an epoch's indices go to the device in one copy, not one copy (and host sync) a step
            sizes = torch.tensor(self.source.shape[2:], device=self.device).expand(self.cfg.batch_size, 2)
            for order in self._passes(epochs, skip):
                for part in order.to(self.device):
                    yield self.source[part], sizes, []
            return
        passes = (part.tolist() for order in self._passes(epochs, skip) for part in order)
        loader = torch.utils.data.DataLoader(self.source, batch_sampler=passes, num_workers=self.cfg.workers,
                                             collate_fn=collate, pin_memory=self.device.type == "cuda")
        for images, sizes, _, failed in loader:
            self.unreadable.update(failed)
            if len(self.unreadable) > 0.01 * len(self.labels):  # the data set's 1%: too many to stand in for
                fail(f"{len(self.unreadable)} of the {len(self.labels)} images are unreadable, more than 1%; e.g. "
                     f"{failed[0]}")
            # pinned: the copy runs while the host goes on (it joins the GPU's queue behind the previous step)
            yield images.to(self.device, non_blocking=True), sizes.to(self.device, non_blocking=True), failed

    def crops(self, batch, index):
        """The Crops of forward pass `index` of the run, seeded by (seed, pass, process): a resume cuts the same."""
        torch.manual_seed(seed_for(self.cfg.seed, index, rank()))
        crops = batch_multicrop(*batch[:2], index % self.passes_per_epoch, self.recipe, self.cfg.invert)
        return Crops(*(None if x is None else channels_last(x, self.cfg) for x in crops))

    def global_crops(self):
        """The online global crops (2B, 3, S, S) of one pass over the data, for fill_bank (init_memory)."""
        torch.manual_seed(seed_for(self.cfg.seed, -1, rank()))
        r = self.recipe
        for images, sizes, _ in self.batches([-1]):
            crops = batch_augment(unit_pixels(images), sizes, r.global_size, r.global_scale, "q", r.blur_sigma, 2,
                                  self.cfg.invert)
            yield channels_last(crops, self.cfg)

def collate(batch):
    """(image, label, why unreadable) triples → (uint8 canvas (B, 3, H, W), sizes (B, 2), labels, reasons)."""
    images, labels, failed = zip(*batch)
    sizes = torch.tensor([image.shape[1:] for image in images])
    canvas = torch.zeros(len(images), 3, *sizes.amax(0).tolist(), dtype=torch.uint8)
    for place, image in zip(canvas, images):
        place[:, :image.shape[1], :image.shape[2]] = image
    return canvas, sizes, torch.tensor(labels), [f for f in failed if f]

def channels_last(x, cfg):  # x in the NHWC memory layout when cfg.channels_last
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

# ----- the run state and its checkpoints ---------------------------------------------------------------------------
def resolve_precision(cfg, device):
    """(name, autocast context, GradScaler): by default fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."""
    # fp16 rather than bf16 on CUDA: cuDNN runs fp16 BatchNorm, bf16 falls back to slower kernels. CPUs without AMX
    # or AVX512-BF16 emulate bf16, so fp32 stays their default.
    native_bf16 = any(torch.cpu.get_capabilities().get(name) for name in ("amx_bf16", "avx512_bf16"))
    precision = cfg.precision or ("fp16" if device.type == "cuda" else "bf16" if native_bf16 else "fp32")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else nullcontext())
    return precision, autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")

def make_optimizer(cfg, online):
    """LARS (the ResNet recipes) or AdamW (the Transformer recipes) over Part 1's parameter groups."""
    groups = parameter_groups([online], cfg.exclude_1d, NO_DECAY)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

def gather_to_0(t):  # every process's t stacked on rank 0, (processes, *t.shape); None on the others
    if not distributed():
        return t[None]
    out = [torch.empty_like(t) for _ in range(world_size())] if rank() == 0 else None
    dist.gather(t, out, dst=0)
    return torch.stack(out) if out else None

class RunState:
    """What a run continues from: nets, groups, optimiser, scaler, this process's bank, epoch, step."""
    def __init__(self, cfg, device, bank_rows=0, scaler=None):
        torch.manual_seed(cfg.seed)  # the same on every process: identical initial weights and groups
        online = make_online(cfg).to(device)
        if world_size() > 1 and device.type == "cuda":
            online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
        self.online = online.to(memory_format=torch.channels_last) if cfg.channels_last else online  # the module
        self.target = target_of(self.online)
        for m in stochastic_depth(self.target):  # the authors' target has no drop-path
            m.p = 0.0
        self.grouping = MomentumGrouping(cfg.num_groups, cfg.feat_dim, cfg.num_heads).to(device)
        self.opt = make_optimizer(cfg, self.online)
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
        self.bank = MemoryBank(bank_rows, cfg.feat_dim, device)
        self.step_args = dict(tau=cfg.tau, ema=cfg.ema, accumulate=cfg.accumulate, clip_grad=cfg.clip_grad)  # but β
        self.online_ddp = self.online if world_size() == 1 else nn.parallel.DistributedDataParallel(
            self.online, device_ids=[device] if device.type == "cuda" else None)  # what train_step trains
        self.epoch = self.step = self.epoch_step = 0
        self.started, self.seconds_before = time.time(), 0.0  # elapsed_s() adds the jobs before (checkpointed)
        self.last_good = "none"  # the newest checkpoint this run wrote or resumed from, as the divergence message says

    def elapsed_s(self):  # wall-clock seconds of the run so far, over all its jobs: what log.jsonl's curves plot
        return self.seconds_before + time.time() - self.started

    def parts(self):  # what a checkpoint holds a state_dict of
        return dict(online=self.online, target=self.target, grouping=self.grouping, optimizer=self.opt,
                    scaler=self.scaler)

    def save(self, path, cfg, data):
        """Writes the run to path (a collective: banks gathered to rank 0): aside, read back, the old one kept."""
        banks = gather_to_0(self.bank.feats)  # (processes, 2, M, D) on rank 0
        if rank() != 0:
            return
        tmp = path + ".tmp"
        try:
            with open_in_out_dir(tmp, "wb") as f:
                torch.save(dict(config=dataclasses.asdict(cfg), epoch=self.epoch, step=self.step,
                                epoch_step=self.epoch_step, processes=world_size(), num_images=len(data.labels),
                                data_fingerprint=data.fingerprint, banks=banks.cpu(), bank_filled=self.bank.filled,
                                elapsed_s=self.elapsed_s(), **{k: v.state_dict() for k, v in self.parts().items()}), f)
            read_checkpoint(tmp)
            if os.path.lexists(path):
                os.replace(path, previous_of(path))  # renames whatever is there, a link too: nothing written through
            os.replace(tmp, path)
            self.last_good = f"{path} (after {self.epoch} epochs)"
        except (OSError, RuntimeError, ValueError) as e:  # torch.save says RuntimeError for a full disk
            fail(f"could not write the checkpoint {tmp} ({str(e).strip().splitlines()[0][:200]}); the ones before "
                 f"in --out-dir {cfg.out_dir} are as they were: free space there, or give another --out-dir")
        finally:  # a write that failed or was cut short (a second Ctrl-C) leaves no partial file
            with suppress(OSError):
                os.remove(tmp)

    def load(self, state):  # copies a checkpoint into the run, this process's bank included
        parts = self.parts()
        if bool(state["scaler"]) != self.scaler.is_enabled():  # a disabled GradScaler's state is empty
            log("--precision: fp16 in the checkpoint or in this run, not both: a fresh scaler")
            del parts["scaler"]
        for name, part in parts.items():
            part.load_state_dict(state[name])
        self.epoch, self.step = state["epoch"], state["step"]
        self.epoch_step, self.seconds_before = state["epoch_step"], state["elapsed_s"]
        bank = state["banks"][rank()]  # (processes, 2, M, D): this process's
        if bank.shape != self.bank.feats.shape:
            raise ValueError(f"memory bank of shape {tuple(bank.shape)}, this run's is {tuple(self.bank.feats.shape)}")
        self.bank.feats.copy_(bank)
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
                why = " ".join(str(e).split())[:300] or type(e).__name__  # every line of it: keys are named there
                errors.append(f"{path} ({why})")
                log(f"checkpoint {path} does not load ({why})" + ("; trying the one before it" if path != paths[-1]
                                                                  else ""))
        else:
            fail(f"--resume: no checkpoint loads: {'; '.join(errors)}")
        self.last_good = f"{path} (after {self.epoch} epochs)"
        log(f"resumed from {path} at epoch {self.epoch}, step {self.step}" + (
            f" (mid-epoch, after {self.epoch_step} steps)" if self.epoch_step else ""))

def seed_for(seed, index, process=0):  # the seed of one step's (or epoch's) draws on one process: resumes are exact
    return seed + 7919 * process + 104729 * (index + 1)

def previous_of(path):  # where the checkpoint before `path` is kept: checkpoint.pt → checkpoint.prev.pt
    return "{0}.prev{1}".format(*os.path.splitext(path))

def resolve_resume(cfg):  # checkpoints to try, newest first ([]: a fresh start)
    path = cfg.resume or os.path.join(cfg.out_dir, "checkpoint.pt")
    for p in (path, previous_of(path)):
        if os.path.exists(p) and not os.path.isfile(p):
            fail(f"--out-dir {cfg.out_dir}: {p} is not a file (a folder of that name?); move it away")
    if cfg.resume is not None and not os.path.isfile(path):
        fail(f"--resume {path}: no such checkpoint")
    return [p for p in (path, previous_of(path)) if os.path.isfile(p)]

def read_checkpoint(path, needs=("online", "target", "grouping", "optimizer", "scaler", "banks", "epoch", "step")):
    """A checkpoint's contents (weights_only: tensors and plain data); ValueError saying why it is refused."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a checkpoint (torch.save writes zip archives)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means a damaged or foreign file
        if "Weights only load failed" in str(e):
            raise ValueError("refused: it holds objects other than tensors and plain data, and unpickling those "
                             "could run code") from None
        raise ValueError(f"not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError("not a smog.py checkpoint")
    if missing := set(needs) - state.keys():
        raise ValueError(f"incomplete: no {', '.join(sorted(missing))}")
    return state

# What a checkpoint's config must share with the run resuming it: the shapes of networks, groups and optimiser state
# (arch .. exclude_1d), the seed of the data order and the crops, and the global batch's layout (the per-process
# banks and data order, the steps and their schedules).
RESUME_MUST_MATCH = ("arch", "feat_dim", "hidden_dim", "num_groups", "num_heads", "optimizer", "exclude_1d", "seed",
                     "batch_size", "accumulate")

def check_resumable(path, state, cfg, data):
    """Ends in one line when the run cannot continue the checkpoint (another recipe, data or process count)."""
    saved = state["config"]
    for name in (name for name in RESUME_MUST_MATCH if saved.get(name) != getattr(cfg, name)):
        fail(f"--resume {path}: checkpoint has {_flag(name)} {saved.get(name)!r}, the config asks for "
             f"{getattr(cfg, name)!r}; keep the checkpoint's value, or start a new run in another --out-dir")
    if state.get("processes") != world_size():
        fail(f"--resume {path}: written by {state.get('processes')} process(es), this run has {world_size()}; resume "
             f"it with as many, or start a new run in another --out-dir")
    if state.get("data_fingerprint") != data.fingerprint or state.get("num_images") != len(data.labels):
        fail(f"--resume {path}: written for another data set ({state.get('data_fingerprint')}); --data {cfg.data} "
             f"is {data.fingerprint}: restore that data set, or start a new run in another --out-dir")

# ----- processes and faults: preemption, the out-dir lock, links, divergence, failed collectives -------------------
def setup_device(timeout=300):
    """Starts the process group under torchrun (NCCL on GPU, gloo on CPU) and returns this process's device."""
    if "RANK" in os.environ and not distributed():  # timeout: a dead peer ends the run (for torchrun to restart)
        wait = datetime.timedelta(seconds=timeout)
        store, rank_, world = next(dist.rendezvous("env://", timeout=wait))
        # After a restart (torchrun --max-restarts) the store may still hold the addresses the dead processes
        # published: the new group reads and writes its own keys.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=wait, rank=rank_,
                                world_size=world, store=dist.PrefixStore(f"attempt{attempt}/", store))
    if not torch.cuda.is_available():
        # glibc keeps 1 GiB of freed memory (M_TOP_PAD, -2): a step's activations come back without page faults
        with suppress(OSError, AttributeError):  # not glibc: as it is
            ctypes.CDLL(None).mallopt(-2, 1 << 30)
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device

def interrupted(signum, frame):  # SIGINT or SIGTERM outside the training loop (data, the bank, kNN): one line
    print(f"smog.py: stopped by {signal.Signals(signum).name} outside the training loop; the run resumes from its "
          f"last checkpoint", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)  # the shell's status for a program stopped by that signal

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

def on_any_process(flag, device):  # whether flag holds on some process (a collective; alone, no device sync)
    if not distributed():
        return bool(flag)
    return all_reduce_(torch.tensor(float(bool(flag)), device=device), op="max").item() > 0

def open_in_out_dir(path, mode):
    """path opened to write, never through a link: "a+" refuses one (or a non-file), "wb" replaces it."""
    if mode == "wb":
        with suppress(FileNotFoundError):
            os.unlink(path)  # the link itself, not what it points to
    try:  # O_NONBLOCK: a FIFO planted there cannot block the open
        fd = os.open(path, os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | (
            os.O_RDWR | os.O_APPEND if mode == "a+" else os.O_WRONLY | os.O_EXCL), 0o644)
    except OSError as e:
        raise OSError(e.errno, "a link, which smog.py never writes through; remove it" if e.errno == errno.ELOOP
                      else e.strerror, path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file; remove it", path)
    return os.fdopen(fd, mode)

def take_lock(out_dir):
    """(why not, None) or (None, the lock file): an flock on out_dir/lock, which the kernel (NFS: when the lease runs
    out) releases when its holder dies; the file stays, with its holder's line."""
    path, lock = os.path.join(out_dir, "lock"), None
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open_in_out_dir(path, "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another run"
        lock.close()
        return f"--out-dir {out_dir}: in use by {holder} ({path}); wait for it, or give another --out-dir", None
    except OSError as e:  # no locks on its file system (ENOLCK) too: two runs there could not be told apart
        if lock is not None:
            lock.close()
        return f"--out-dir {out_dir}: cannot {'lock' if lock else 'write'} {e.filename or path} ({e.strerror})", None
    lock.truncate(0)
    lock.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    lock.flush()
    return None, lock

@contextmanager
def holding_out_dir(out_dir, device):
    """Creates out_dir and holds its lock for the run (rank 0, a collective): one run per out-dir."""
    error, lock = take_lock(out_dir) if rank() == 0 else (None, None)
    if on_any_process(error, device):
        fail(error or f"process {rank()}: process 0 could not take --out-dir {out_dir} (see its message)")
    try:
        yield
    finally:
        if lock is not None:  # the file stays, without a holder: a run starting now locks this very file
            lock.truncate(0)
            lock.close()

def stop_if_diverged(bad_step, run):
    """Ends every process together after a non-finite loss: bad_step is this process's first such step, or −1, kept
    on the device (no host sync per step) and checked before every report and checkpoint, so none holds its weights."""
    first = all_reduce_(bad_step.clone(), op="max").item()
    if first >= 0:
        fail(f"the loss became NaN/inf at step {first}; every process stopped. Last good checkpoint: "
             f"{run.last_good}. Lower --lr or raise --warmup-epochs")

@contextmanager
def collective_failures_in_one_line(run, cfg):
    """A failed collective (a peer dead or stalled) as one line naming this process and step, not a backend trace."""
    try:
        yield
    except RuntimeError as error:  # NCCL's are DistErrors; gloo's, RuntimeErrors naming a timeout or a closed pair
        lost = isinstance(error, dist.DistError) or re.search("gloo|time(d )?out|connection|clos", str(error), re.I)
        if not (distributed() and lost):
            raise
        fail(f"process {rank()} of {world_size()} stopped at step {run.step}: a collective failed, so another "
             f"process died or did not answer within --dist-timeout {cfg.dist_timeout} s ({str(error)[:240]})")

# ----- reports: the log line, group health, kNN on the held-out split, the plot ------------------------------------
def eval_batches(source, cfg, batch=256, indices=None):
    """Normalised centre views (n, 3, S, S) of a split: images in memory resized, folders as the authors'."""
    if isinstance(source, torch.Tensor):
        source = source if indices is None else source[indices.to(source.device)]
        for i in range(0, len(source), batch):
            x = source[i:i + batch].float().cpu() / 255
            if x.shape[-1] != cfg.global_size:
                x = F.interpolate(x, size=cfg.global_size, mode="bilinear", antialias=True, align_corners=False)
            yield imagenet_normalize(x)
        return
    T = torchvision.transforms
    folder = copy.copy(source)
    folder.view = T.Compose([T.Resize(round(cfg.global_size * 8 / 7), antialias=True), T.CenterCrop(cfg.global_size)])
    part = folder if indices is None else torch.utils.data.Subset(folder, indices.tolist())
    for x, _, _, _ in torch.utils.data.DataLoader(part, batch_size=batch, num_workers=cfg.workers, collate_fn=collate):
        yield imagenet_normalize(x.float() / 255)

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

def open_log(cfg):
    """out_dir/log.jsonl, appended to by rank 0 (the others get None), a last line that a kill cut short ended first."""
    if rank() != 0:
        return nullcontext()
    try:
        jsonl = open_in_out_dir(os.path.join(cfg.out_dir, "log.jsonl"), "a+")
    except OSError as e:
        fail(f"--out-dir {cfg.out_dir}: cannot write {e.filename} ({e.strerror})")
    size = os.fstat(jsonl.fileno()).st_size
    if size and os.pread(jsonl.fileno(), 1, size - 1) != b"\n":
        jsonl.write("\n")
    return jsonl

class Progress:
    """The log line every cfg.log_every steps of a run, on the console and in log.jsonl (rank 0's; None elsewhere)."""
    def __init__(self, cfg, run, total_steps, jsonl):
        self.cfg, self.run = cfg, run
        self.total_steps, self.jsonl = total_steps, jsonl
        self.first_step = run.step  # this job's first step, for the ETA
        self.t_start = self.t_log = time.time()
        self.data_time = self.images = self.bad_images = self.skipped = self.counts = 0  # this interval's

    def timed(self, batches):  # TrainData.batches, timing each wait for them and counting images
        t0 = time.time()
        for batch in batches:
            self.data_time += time.time() - t0
            self.bad_images += len(batch[2])
            self.images += self.cfg.batch_size * world_size()
            yield batch
            t0 = time.time()  # the loop asks for the next batch

    def add(self, counts, skipped):  # one step's group counts (H, K) and skip flag, summed on the device
        self.counts, self.skipped = self.counts + counts, self.skipped + skipped

    def report(self, epoch, loss, lr, beta):  # prints and records one interval's figures (one wait for the GPU)
        step, scaler = self.run.step, self.run.scaler
        # group health: groups used per head, and the assignments' entropy in nats (at most log K), heads averaged
        prob = self.counts / self.counts.sum(1, keepdim=True).clamp(min=1)  # (H, K)
        used = (self.counts > 0).sum(1).float().mean().item()
        entropy = -(prob * prob.clamp(min=1e-12).log()).sum(1).mean().item()
        seconds = time.time() - self.t_log
        eta = (time.time() - self.t_start) / max(1, step - self.first_step) * (self.total_steps - step)
        fp16 = scaler.is_enabled()
        r = dict(step=step, epoch=epoch, loss=loss.item(), lr=lr, beta=beta, img_per_s=self.images / seconds,
                 data_time=self.data_time / seconds, groups_used=used, assign_entropy=entropy,
                 assign_entropy_max=math.log(self.cfg.num_groups), eta_s=eta, bad_images=self.bad_images,
                 skipped_steps=int(self.skipped) if fp16 else 0, grad_scale=scaler.get_scale() if fp16 else None,
                 **(dict(gpu_mem_gib=torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else {}))
        log(f"step {step}/{self.total_steps} | epoch {epoch} | loss {r['loss']:.4f} | lr {lr:.4f} | β {beta:.4f} | "
            f"{r['img_per_s']:.0f} img/s | data {100 * r['data_time']:.0f}% | groups used {used:.0f}/"
            f"{self.cfg.num_groups}, entropy {entropy:.2f}/{r['assign_entropy_max']:.2f} | "
            # under fp16, a scale that keeps falling with many skips means gradients that keep overflowing
            + (f"fp16 steps skipped {r['skipped_steps']}, scale {r['grad_scale']:g} | " if fp16 else "")
            + (f"unreadable images {self.bad_images} (replaced) | " if self.bad_images else "")
            + f"ETA {datetime.timedelta(seconds=round(eta))}")
        self.write(r)
        self.t_log = time.time()  # each log line counts its own interval
        self.data_time = self.images = self.bad_images = self.skipped = self.counts = 0

    def write(self, record):  # one line of log.jsonl, with the run's elapsed seconds over all its jobs
        if self.jsonl:
            self.jsonl.write(json.dumps({**record, "elapsed_s": round(self.run.elapsed_s(), 1)}) + "\n")
            self.jsonl.flush()

def plot_curves(out_dir):
    """Draws out_dir/log.jsonl as out_dir/curves.png; returns its path and the damaged lines skipped."""
    try:  # optional: the only use of matplotlib (its Figure draws without pyplot's windows)
        from matplotlib.figure import Figure
    except ImportError:
        fail("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    try:
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        fail(f"--plot {out_dir}: no readable log.jsonl ({e.strerror})")
    records = []
    for line in lines:  # a line cut by a kill is skipped
        with suppress(ValueError):
            records += [r for r in [json.loads(line)] if isinstance(r, dict)]
    log_k = max([r.get("assign_entropy_max", 0) for r in records] + [0])
    dashed = dict(groups_used=round(math.exp(log_k)), assign_entropy=log_k) if log_k else {}  # K and log K
    fig = Figure(figsize=(16, 6.5), layout="tight")
    axes = fig.subplots(2, 4)
    panels = [(key, "step") for key in ("loss", "lr", "beta", "groups_used", "assign_entropy", "img_per_s",
                                        "knn_top1")] + [("knn_top1", "elapsed_s")]  # the time-to-accuracy curve
    for ax, (key, x) in zip(axes.flat, panels):
        points = [(r[x] / (60 if x == "elapsed_s" else 1), r[key]) for r in records
                  if isinstance(r.get(key), (int, float)) and isinstance(r.get(x), (int, float))]
        if points:
            ax.plot(*zip(*points), "o-" if key == "knn_top1" else "-")
        if key in dashed:
            ax.axhline(dashed[key], color="tab:red", linestyle="--")
        ax.set(title=key, xlabel="minutes" if x == "elapsed_s" else "step")
    path = os.path.join(out_dir, "curves.png")
    with open_in_out_dir(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    return path, len(lines) - len(records)

# ----- training: train() and the command line ----------------------------------------------------------------------
def train(cfg):
    """The whole run, holding its out-dir: setup, then the paper's Algorithm 1 epoch by epoch; returns the RunState."""
    device = setup_device(cfg.dist_timeout)
    with holding_out_dir(cfg.out_dir, device):
        # ----- setup: precision, data, the run state (resumed, or a bank filled by the initial network) -----
        precision, autocast, scaler = resolve_precision(cfg, device)
        log(f"config: {config_text(cfg)}")
        log(f"device: {device}, processes: {world_size()}, precision: {precision}")
        resume = resolve_resume(cfg)
        data = TrainData(cfg, device)
        where = "held in memory" if data.in_memory else f"streamed by {cfg.workers} loader workers"
        log(f"data: {len(data.labels)} images ({where}; every crop cut on the {device.type}), "
            f"{data.steps_per_epoch} steps per epoch, global batch {data.global_batch} ({cfg.batch_size} × "
            f"{world_size()} process(es) × {cfg.accumulate} passes)")
        run = RunState(cfg, device, data.epoch_images, scaler)
        if resume:
            run.resume(resume, cfg, data)
        else:
            with autocast:
                fill_bank(run.online, run.bank, data.global_crops())
        passes_per_epoch, total_steps = data.passes_per_epoch, cfg.epochs * data.steps_per_epoch
        peak_lr = cfg.lr * data.global_batch / 256
        held_out = load_dataset(cfg, "val") if rank() == 0 and (cfg.knn or cfg.eval_every) else (None, None, "")
        if rank() == 0 and (cfg.knn or cfg.eval_every) and held_out[1] is None:
            log("no kNN reports: the data set has no held-out split (PATH/val)")
        checkpoint = os.path.join(cfg.out_dir, "checkpoint.pt")
        bad_step = torch.full((), -1, dtype=torch.long, device=device)  # the first step with a non-finite loss
        stop = False  # whether a signal asks the run to leave before its end
        with open_log(cfg) as jsonl, catch_preemption() as caught, collective_failures_in_one_line(run, cfg):
            progress = Progress(cfg, run, total_steps, jsonl)
            batches = progress.timed(data.batches(range(run.epoch, cfg.epochs), run.epoch_step * cfg.accumulate))
            for epoch in range(run.epoch, cfg.epochs):
                if run.epoch_step == 0:  # ----- the epoch start: c_k ← k-means of last epoch's bank, target ← online
                    start_epoch(run.grouping, run.bank, run.online, run.target, cfg.kmeans_iters,
                                torch.Generator().manual_seed(seed_for(cfg.seed, epoch - 1)))
                while run.epoch_step < data.steps_per_epoch and not stop:
                    # ----- one step: the schedules over forward passes (main_SMoG.py's), train_step, the bank -----
                    first_pass = epoch * passes_per_epoch + run.epoch_step * cfg.accumulate  # counted over the run
                    last_pass = first_pass + cfg.accumulate - 1  # a step takes its last pass's lr and β
                    lr = lr_at(last_pass, cfg.epochs * passes_per_epoch, cfg.warmup_epochs * passes_per_epoch,
                               peak_lr, cfg.start_lr, cfg.final_lr)
                    beta = beta_at(last_pass, cfg.epochs * passes_per_epoch, cfg.beta_start, cfg.beta_end)
                    for group in run.opt.param_groups:
                        group["lr"] = lr
                    passes = (data.crops(next(batches), first_pass + i) for i in range(cfg.accumulate))
                    loss, counts, z, skipped = train_step(run.online_ddp, run.target, run.grouping, passes, run.opt,
                                                          run.scaler, beta=beta, autocast=autocast, **run.step_args)
                    run.bank.add(z)
                    progress.add(counts, skipped)
                    bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), run.step, bad_step)
                    run.step, run.epoch_step = run.step + 1, run.epoch_step + 1
                    # ----- a signal (under torchrun checked every 10 steps: one host sync), the log, a checkpoint
                    if (run.step % 10 == 0 or not distributed()) and on_any_process(caught, device):
                        stop = True
                    report = run.step % cfg.log_every == 0 or run.step == total_steps
                    save = run.epoch_step < data.steps_per_epoch and (
                        stop or cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0)
                    if report or save:
                        stop_if_diverged(bad_step, run)
                    if report:
                        progress.report(epoch, loss, lr, beta)
                    if save:
                        run.save(checkpoint, cfg, data)
                if run.epoch_step < data.steps_per_epoch:  # stopped mid-epoch, with its checkpoint
                    break
                # ----- the epoch end: a checkpoint holding this epoch's bank, a kNN report -----
                run.epoch, run.epoch_step = epoch + 1, 0
                stop = on_any_process(caught, device)
                stop_if_diverged(bad_step, run)
                run.save(checkpoint, cfg, data)
                if held_out[1] is not None and (cfg.eval_every and run.epoch % cfg.eval_every == 0
                                                or cfg.knn and run.epoch == cfg.epochs):  # on rank 0 alone
                    backbone = run.online.encoder.backbone  # kNN: the only use of labels (the others wait meanwhile)
                    top1 = knn_top1(extract_features(backbone, data.source, cfg, device), data.labels.to(device),
                                    extract_features(backbone, held_out[0], cfg, device), held_out[1].to(device))
                    log(f"kNN top-1 on the held-out split after epoch {epoch}: {top1:.1f}%")
                    progress.write(dict(step=run.step, epoch=epoch, knn_top1=top1))
                if stop:
                    break
            if stop:  # ----- how to continue
                log(f"caught {'Ctrl-C' if signal.SIGINT in caught else 'a preemption signal'}: checkpoint "
                    f"{checkpoint} at epoch {run.epoch}, step {run.step}; run again to resume from there")
    if signal.SIGINT in caught:
        raise SystemExit(130)  # the shell's status for a program stopped by Ctrl-C
    return run

def main(argv=None):
    cfg, args = parse_command(argv)
    if args.plot:
        path, damaged = plot_curves(args.plot)
        print(printable(f"wrote {path}" + (f" ({damaged} damaged lines of log.jsonl skipped)" if damaged else "")))
    elif args.print_config:
        print(config_text(cfg, indent=2))
    else:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, interrupted)
        train(cfg)
        if distributed():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
