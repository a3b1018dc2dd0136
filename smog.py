"""SMoG: Synchronous Momentum Grouping for self-supervised visual representation learning.

Pang et al., "Unsupervised Visual Representation Learning by Synchronous Momentum Grouping", ECCV 2022,
https://arxiv.org/abs/2207.06167. Each image is contrasted against *group centroids* instead of other instances.
Every step, (1) the target branch labels each image with its nearest centroid, (2) the centroids move toward the
mean of the online features assigned to them (a momentum update, all-reduced so every GPU holds the same groups),
(3) the online branch is trained with a cross-entropy that pulls its prediction toward the labelled centroid.
At every epoch start the groups are re-clustered by spherical k-means on a bank of last epoch's features.

    python smog.py                                   # tiny preset: embedded data set, small ResNet, CPU, minutes
    torchrun --standalone --nproc_per_node=gpu --max-restarts=3 smog.py --preset imagenet-r50 --data /path/to/imagenet

Part 1, "SMoG", is the whole method, with torch and torchvision alone, for any backbone: the algorithm →
collectives → the multi-crop recipe → networks → MomentumGrouping and the memory bank → the epoch start → the loss →
LARS, schedules, EMA → train_step. Part 2, "Trainer", from its banner: config, backbones, data, the batched
augmentation, feeding the device, the run state, processes and faults, reports, train(). "The authors' code" is the
paper's released main_SMoG.py and src/.
"""
import copy
import math
import os
import signal
import sys
from contextlib import nullcontext
from typing import NamedTuple

if __name__ == "__main__":  # Ctrl-C while torch loads: exit 130 without a traceback (main() takes over from there)
    # At once, not by SystemExit: an import's broad `except` could swallow that and train on; nothing is written yet.
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# ===================================================================================================================
# Part 1 — SMoG: the method
# ===================================================================================================================
# The algorithm (the paper's Algorithm 1 as it runs here), in Part 1's names:
#
#   online = OnlineNet(f, *projector_and_predictor(dim))     # f: any backbone (N, 3, s, s) → (N, dim); g, q: MLPs
#   target = target_of(online)                               # a copy of f and g, trained only by EMA
#   grouping, bank = MomentumGrouping(K, D, H), MemoryBank(rows, D)
#   fill_bank(online.encoder, bank, global crops of one pass over the data)      # once, before the first epoch
#   for every epoch:
#       start_epoch(grouping, bank, online, target)          # c_k ← k-means of the bank; target ← online
#       for every batch of images, step t:
#           crops = MultiCrop(recipe)(image, t) per image     # 2 + 2 global, L local; pipelines q, k swap each step
#           loss, counts, z, _ = train_step(online, target, grouping, [crops], opt, scaler,
#                                           beta=beta_at(t, T), tau=τ, ema=m)
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

class MultiCrop:
    """(PIL image, step) → Crops of that image, by per-image torchvision pipelines: the definition of the recipe.
    extra: transforms of PIL images applied after solarize (Part 2 adds one for its own data)."""
    def __init__(self, recipe=CropRecipe(), extra=()):
        self.recipe = recipe
        T = torchvision.transforms

        def pipeline(size, scale, name):
            blur_p, solarize_p = PIPELINES[name]
            kernel = 2 * min(math.ceil(3 * recipe.blur_sigma[1]), (size - 1) // 2) + 1
            return T.Compose([T.RandomResizedCrop(size, scale=scale, ratio=ASPECT),  # bilinear, as the authors'
                              T.RandomHorizontalFlip(FLIP_P),
                              T.RandomApply([T.ColorJitter(*JITTER)], p=JITTER_P),
                              T.RandomGrayscale(p=GRAYSCALE_P),
                              T.RandomApply([T.GaussianBlur(kernel, recipe.blur_sigma)], p=blur_p),
                              T.RandomSolarize(128, p=solarize_p),
                              *extra,
                              T.ToTensor(),
                              T.Normalize(MEAN, STD)])
        self.global_pipelines = {name: pipeline(recipe.global_size, recipe.global_scale, name) for name in PIPELINES}
        self.local_pipelines = {name: pipeline(recipe.local_size, recipe.local_scale, name) for name in PIPELINES}

    def __call__(self, image, step):
        online_aug, target_aug = pipelines_for_step(step)
        n_local = self.recipe.num_local
        n_target_local = n_local if self.recipe.target_local else 0

        def crops(pipelines, name, n):  # (n, 3, s, s), or None
            return torch.stack([pipelines[name](image) for _ in range(n)]) if n else None
        return Crops(crops(self.global_pipelines, online_aug, 2), crops(self.local_pipelines, online_aug, n_local),
                     crops(self.global_pipelines, target_aug, 2),
                     crops(self.local_pipelines, target_aug, n_target_local))

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

def one_pass(mlp, feats):
    """An MLP over every crop size's features (n_i, d) at once → (Σ n_i, D): one set of BN statistics for all."""
    return mlp(torch.cat(feats))

class Encoder(nn.Module):
    """Backbone f, then projector g: a list of crops (n_i, 3, s_i, s_i), one tensor per size → z (Σ n_i, D).
    Hooks, for backbones that need them (Part 2 fills them): backbone_over_sizes(backbone, crops) → every size's
    features in one go (None: the backbone once per size); mlp_over_sizes(mlp, feats) → (Σ n_i, D)."""
    def __init__(self, backbone, projector, backbone_over_sizes=None, mlp_over_sizes=one_pass):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.backbone_over_sizes = backbone_over_sizes
        self.mlp_over_sizes = mlp_over_sizes

    def forward(self, crops):  # list of (n_i, 3, s_i, s_i) -> (Σ n_i, D)
        if self.backbone_over_sizes is not None and len(crops) > 1:
            feats = [x.flatten(1) for x in self.backbone_over_sizes(self.backbone, crops)]
        else:
            feats = [self.backbone(x) for x in crops]
        return self.mlp_over_sizes(self.projector, feats)

class OnlineNet(nn.Module):
    """The online branch: encoder (f, g) plus predictor q. Returns (z, p), both (Σ n_i, D), not yet normalised."""
    def __init__(self, backbone, projector, predictor, backbone_over_sizes=None, mlp_over_sizes=one_pass):
        super().__init__()
        self.encoder = Encoder(backbone, projector, backbone_over_sizes, mlp_over_sizes)
        self.predictor = predictor

    def forward(self, crops):
        z = self.encoder(crops)
        p = self.encoder.mlp_over_sizes(self.predictor, z.split([len(x) for x in crops]))
        return z, p

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
    epoch start's k-means clusters, head h crop h mod 2 (the authors')."""
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
def fill_bank(encoder, bank, global_crops):
    """Fills the bank with the initial encoder's z for the first k-means (the authors' init_memory): global_crops
    yields each batch's online global crops (2B, 3, S, S), each crop forwarded alone (BN sees one per image).
    encoder: the online encoder, or the function train_step's group_z hook names."""
    for both_crops in global_crops:
        bank.add(torch.stack([encoder([crop]).float() for crop in both_crops.chunk(2)]))  # (2, B, D)

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
               autocast=nullcontext(), group_z=None, step=True):
    """One SMoG step: EMA, label with the target, update the groups with online z, contrast online p with them, step.

    online: OnlineNet (or DDP around one), target: its encoder's EMA copy, scaler: a GradScaler (enabled for fp16),
    ema: the target's momentum, clip_grad: max gradient norm (0: off). passes: `accumulate` Crops, made as each runs;
    as main_SMoG.py's --multi_forward, each is labelled and backpropagated alone (1/N of the gradient), the groups
    move once, with every pass's z, before the last pass's loss, then one optimiser step. group_z: None, or a
    function crops → z that the group update and the bank see instead of the trained forward's z (Part 2: the
    online encoder without stochastic depth, as the authors'). step=False: fewer than `accumulate` passes, the
    ones that end an epoch without filling a step (main_SMoG.py, train): they add their gradients and make no
    group update and no optimiser step, so their gradients carry into the next step. Returns device tensors (no
    host sync): mean loss, counts (H, K) (None without a step), online global z (2, N·B, D), whether GradScaler
    skipped the step."""
    h, k = grouping.centroids.shape[:2]
    module = getattr(online, "module", online)  # the OnlineNet itself, also inside DDP
    # 0. target ← m·target + (1−m)·online, at the step's start as main_SMoG.py's model forward (update_k_encoder
    # on each step's first pass): the online network as the previous step left it
    ema_(target, module.encoder, ema)
    z_globals, losses = [], []
    for i, crops in enumerate(passes):
        last = step and i == accumulate - 1
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
                if group_z is not None:
                    z = group_z([crops.online_global])
            labels = grouping.assign(zt).view(h, 2, b)  # 1. y: nearest c_k before the update
            z_globals.append(z[:2 * b].detach().float().view(2, b, -1))  # (2, B, D)
            if last:  # 2. every pass's z moves the groups; head h with online global crop h mod 2
                z_global = torch.cat(z_globals, 1)  # (2, N·B, D)
                # repeat, not list indexing, which would copy indices from the host
                counts = grouping.update(z_global.repeat((h + 1) // 2, 1, 1)[:h], beta)
            loss = smog_loss(grouping.logits(p, tau).view(h, -1, b, k), labels)  # 3. p against the c_k
            scaler.scale(loss / accumulate).backward()
        losses.append(loss.detach())
    no_skip = torch.zeros((), dtype=torch.bool, device=grouping.centroids.device)
    if not step:
        if not 0 < len(losses) < accumulate:
            raise ValueError(f"train_step(step=False) got {len(losses)} passes, accumulate is {accumulate}")
        for param in module.parameters():  # averaged over processes as DDP's sync would: the same everywhere
            if param.grad is not None:
                all_reduce_(param.grad).div_(world_size())
        return torch.stack(losses).mean(), None, torch.cat(z_globals, 1), no_skip
    if len(losses) != accumulate:
        raise ValueError(f"train_step got {len(losses)} forward passes, accumulate is {accumulate}")
    scaler.unscale_(opt)  # 4. trust ratios and clipping need the true gradients; no host sync
    # only fp16 skips steps: no extra pass over the gradients for the other precisions
    skipped = overflowed(online.parameters()) if scaler.is_enabled() else no_skip
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(online.parameters(), clip_grad)
    scaler.step(opt)  # under fp16, skipped on the device when the gradients overflowed
    scaler.update()
    opt.zero_grad(set_to_none=True)  # after the step, as main_SMoG.py: passes without a step keep theirs
    return torch.stack(losses).mean(), counts, z_global, skipped

def overflowed(parameters):
    """Whether any gradient holds an inf or NaN, as a device tensor: the steps GradScaler skips under fp16."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())

# ===================================================================================================================
# Part 2 — Trainer: config, backbones, data, batched augmentation, feeding the device, run state, faults, reports
# ===================================================================================================================
import argparse
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import pickle
import re
import socket
import time
import types
from contextlib import contextmanager, suppress

import numpy as np
from torchvision.models.resnet import BasicBlock, Bottleneck

# ----- config: one dataclass, presets on top of it, explicit flags on top of the preset; one-line messages ---------
def option(default, help, section=None, auto=None):
    """A Config field: its default, its --help line, the --help section it opens, and what `auto` (None) means."""
    return dataclasses.field(default=default, metadata=dict(help=help, section=section, auto=auto))

@dataclasses.dataclass
class Config:
    """Every setting of a run. None means automatic (`auto` on the command line), 0 means off where a field says so."""
    preset: str = option("tiny", "the recipe to start from (listed below); flags given explicitly override it",
                         section="run")
    data: str = option("synthetic", "synthetic (the embedded set, no files) | cifar10 (downloaded by torchvision) | "
                       "PATH to class folders, or to train/ and val/")
    out_dir: str = option("out", "where checkpoint.pt, log.jsonl and the lock go")
    epochs: int = option(400, "passes over the training split")
    batch_size: int = option(64, "images per process and forward pass: the global batch is batch_size × "
                             "processes × accumulate")
    accumulate: int = option(1, "forward passes per optimiser step (the authors' --multi_forward): the paper's batch "
                             "on fewer GPUs")
    workers: int | None = option(None, "loader processes per training process (streamed folders)",
                                 auto="the cores / processes")
    memory_budget: float = option(2.0, "GiB: a folder whose decoded images fit is decoded once and cropped on the "
                                  "device; 0: always stream")
    seed: int = option(0, "the seed of weights, groups, data order and crops (and of the embedded data set)")
    resume: str | None = option(None, "none (a new run; earlier checkpoints are moved aside) | PATH",
                                auto="out_dir/checkpoint.pt if it exists")
    stop_after: int = option(0, "leave after this many epochs of this job, resumable (time-limited jobs); 0: off")
    checkpoint_every: int = option(0, "also checkpoint every N steps: bounds what a killed process loses; "
                                   "0: at epoch ends only")
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
    invert: float | None = option(0.0, "not in the paper: the probability of a crop's negative 1 − x",
                                  auto="0.5 for --data synthetic (shapes of both polarities), else 0")
    batched_aug: str | None = option(None, "on: crops drawn in batches on the device | off: MultiCrop per image in "
                                     "loader workers (folders only)", auto="on in memory or on a GPU")
    arch: str = option("resnet50", "the backbone (listed below)", section="networks")
    bn_over_sizes: bool = option(True, "ResNets: one set of BN statistics for all crop sizes of a branch (the "
                                 "authors')")
    feat_dim: int = option(128, "dimension D of z, p and the centroids")
    hidden_dim: int = option(2048, "hidden width of the projector and the predictor")
    drop_path: float = option(0.0, "stochastic depth of the online backbone (Swin: 0.2); never in the target, the "
                              "group update or the bank")
    swin_mlps: bool = option(False, "the authors' Swin projector and predictor: GELU in the projector, trunc-normal "
                             "init, run per crop size")
    ema: float = option(0.999, "the target's momentum m: target ← m·target + (1−m)·online after every step; lower "
                        "it (0.99) for short runs")
    num_groups: int = option(3000, "K, centroids per group set (the paper's 3000 for ImageNet)",
                             section="momentum grouping and loss")
    num_heads: int = option(3, "H, independent group sets (the paper's heads)")
    tau: float = option(0.1, "τ, the temperature of the group logits")
    beta_start: float = option(1.0, "β at the first step: the centroid momentum, linear per step to --beta-end")
    beta_end: float = option(0.99, "β at the last step")
    kmeans_iters: int = option(10, "spherical k-means iterations of the reset at every epoch start")
    optimizer: str = option("lars", "lars (ResNets) | adamw (Transformers)", section="optimisation")
    lr: float = option(0.3, "peak learning rate per 256 images of global batch (the paper's 4.8 at 4096); lower it "
                       "if the loss does not decrease")
    start_lr: float = option(0.01, "learning rate at step 0, warmed up linearly to the peak")
    final_lr: float = option(0.0048, "learning rate at the last step, after the cosine decay")
    warmup_epochs: int = option(10, "epochs of linear warm-up; raise it if the loss becomes NaN early")
    weight_decay: float = option(1e-6, "weight decay (inside LARS's trust ratio)")
    momentum: float = option(0.9, "SGD momentum of LARS")
    lars_eta: float = option(0.001, "LARS trust coefficient; lower it if the loss does not decrease with large "
                             "batches")
    clip_grad: float = option(0.0, "max gradient norm; 0: off")
    exclude_1d: bool = option(False, "no weight decay or LARS on biases, norms and position tables (the authors: "
                              "Swin only)")
    precision: str | None = option(None, "fp16 | bf16 | fp32: autocast dtype of the networks; grouping and loss are "
                                   "fp32", section="system",
                                   auto="fp16 on CUDA, bf16 on CPUs with AMX or AVX512-BF16, else fp32")
    channels_last: bool = option(True, "NHWC memory layout: the one tensor cores and oneDNN's convolutions prefer")
    compile: bool = option(False, "torch.compile the online and target networks (minutes of compilation)")
    log_every: int = option(20, "steps between log lines")
    knn: bool = option(True, "kNN top-1 on the held-out split at the end (labels are used only for these reports)")
    eval_every: int | None = option(0, "also a kNN report every N epochs (rank 0); 0: off",
                                    auto="about ten per run")

TRANSFORMER_RECIPE = dict(optimizer="adamw", feat_dim=256, lr=1e-3 * 256 / 4096, start_lr=4e-5, final_lr=4e-5,
                          warmup_epochs=10, weight_decay=0.05, clip_grad=3.0, exclude_1d=True, target_local=False)

class Preset(NamedTuple):
    about: str  # one line in --help
    values: dict  # only what differs from Config's defaults (the paper's ResNet-50 recipe)

PRESETS = {
    "tiny": Preset("the default: the embedded 32-px data set, a 0.3M-parameter ResNet, minutes on 2 CPU cores",
                   dict(data="synthetic", synthetic_size=2000, arch="resnet_tiny", epochs=160, batch_size=128,
                        global_size=32, global_scale=(0.5, 1.0), num_local=0, local_size=16, local_scale=(0.1, 0.4),
                        blur_sigma=(0.1, 0.6), hidden_dim=512, exclude_1d=True, num_groups=200, tau=0.05, lr=6.0,
                        start_lr=0.05, final_lr=0.01, warmup_epochs=2, ema=0.996, log_every=100, invert=None,
                        eval_every=None)),
    "cifar10-r18": Preset("CIFAR-10 (downloaded), ResNet-18 with a 3x3 stem on 32-px images, one GPU",
                          dict(data="cifar10", arch="resnet18_cifar", epochs=200, batch_size=256, workers=4,
                               global_size=32, global_scale=(0.2, 1.0), local_size=16, local_scale=(0.05, 0.2),
                               num_local=4, blur_sigma=(0.1, 0.5), hidden_dim=2048, num_groups=300, lr=1.2,
                               start_lr=0.05, warmup_epochs=10, ema=0.99, exclude_1d=True, eval_every=None)),
    # The paper's recipes (the authors' scripts/pretrain/*.sh): batch 4096 = 64 GPUs × 64, 400 epochs.
    "imagenet-r50": Preset("the paper's ResNet-50 recipe: 400 epochs at batch 4096 (64 GPUs × 64)", dict()),
    "imagenet-r50w2": Preset("the paper's ResNet-50w2 (every width doubled), the same recipe",
                             dict(arch="resnet50w2")),
    # The authors' Swin-T script and src/optimizer.py: AdamW 1e-3 at batch 4096 (= 6.25e-5 per 256) → 4e-5.
    "imagenet-swin-t": Preset("the paper's Swin-T: the authors' BN blocks and MLPs, AdamW, drop-path 0.2",
                              dict(arch="swin_t_bn", drop_path=0.2, swin_mlps=True, **TRANSFORMER_RECIPE)),
    "imagenet-vit-s16": Preset("not in the paper: ViT-S/16 on the Swin-T recipe (no drop-path)",
                               dict(arch="vit_s16", **TRANSFORMER_RECIPE)),
}
PRESETS["cifar10"] = Preset("the short name of cifar10-r18", PRESETS["cifar10-r18"].values)

def _flag(name):
    return "--" + name.replace("_", "-")

def _value_type(f):  # the type of a field's values: int for `int | None`
    if isinstance(f.type, types.UnionType):
        return next(t for t in f.type.__args__ if t is not type(None))
    return f.type

def _parse_value(f, text):  # parses one CLI value for dataclass field f (tuples are written '0.2,1.0')
    if text == "auto" and f.metadata["auto"]:
        return None
    kind = _value_type(f)
    if kind != tuple[float, float]:
        return kind(text)
    if text.count(",") != 1:
        raise ValueError("expected two comma-separated numbers, e.g. 0.2,1.0")
    return tuple(float(part) for part in text.split(","))

def _shown(value):  # a config value as --help and --print-config show it
    if value is None:
        return "auto"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)

def fail(message, prog="smog.py"):
    """Ends the program with the one line "prog: error: message" (exit status 1): no stack trace for bad input."""
    raise SystemExit(f"{prog}: error: {message}")

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        fail(message, self.prog)

def _help(f):  # a field's --help line: what it does, its default, the tiny preset's value where it differs
    text = f.metadata["help"] + f" (default {_shown(f.default)}"
    if f.metadata["auto"]:
        text += f"; auto: {f.metadata['auto']}"
    tiny = PRESETS["tiny"].values.get(f.name, f.default)
    if tiny != f.default:
        text += f"; tiny preset: {_shown(tiny)}"
    return (text + ")").replace("%", "%%")

def parse_command(argv=None):
    """(Config, args): defaults ← --preset ← flags given; args holds the one-off --print-config and --plot."""
    presets = "\n".join(f"  {name:<18} {preset.about}" for name, preset in PRESETS.items())
    parser = _Parser(prog="smog.py", description=__doc__.split("\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog=f"presets (--preset):\n{presets}\n\nbackbones (--arch): {', '.join(BACKBONES)}")
    group = parser
    for f in dataclasses.fields(Config):  # default None: not given, so the preset's value holds
        if f.metadata["section"]:
            group = parser.add_argument_group(f.metadata["section"])
        if f.type is bool:
            group.add_argument(_flag(f.name), default=None, action=argparse.BooleanOptionalAction, help=_help(f))
        else:
            metavar = "LOW,HIGH" if _value_type(f) == tuple[float, float] else _value_type(f).__name__.upper()
            group.add_argument(_flag(f.name), default=None, metavar=metavar, help=_help(f))
    actions = parser.add_argument_group("one-off actions")
    actions.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    actions.add_argument("--plot", metavar="OUT_DIR", default="", help="draw OUT_DIR/log.jsonl as curves.svg and exit")
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
    cfg = Config(**{**PRESETS[preset].values, **given, "preset": preset})
    check_config(cfg)
    return resolve_automatic(cfg), args

def resolve_automatic(cfg):  # the automatic values that the config alone decides (the others need the device)
    automatic = dict(invert=0.5 if cfg.data == "synthetic" else 0.0,  # the embedded data set's, not the preset's
                     eval_every=max(1, cfg.epochs // 10),
                     workers=max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return dataclasses.replace(cfg, **{name: v for name, v in automatic.items() if getattr(cfg, name) is None})

def parse_config(argv=None):  # the Config of a command line (parse_command without its one-off actions)
    return parse_command(argv)[0]

def config_text(cfg, indent=None):  # the config as JSON, automatic values shown as "auto" (as --help does)
    return json.dumps({k: "auto" if v is None else v for k, v in dataclasses.asdict(cfg).items()}, indent=indent)

def crop_recipe(cfg):  # Part 1's CropRecipe of a config
    return CropRecipe(**{name: getattr(cfg, name) for name in CropRecipe._fields})

def step_hyperparameters(cfg):  # train_step's hyperparameters of a config, all but β (which follows its schedule)
    return dict(tau=cfg.tau, ema=cfg.ema, accumulate=cfg.accumulate, clip_grad=cfg.clip_grad)

INT64 = 2**63 - 1

def check_config(cfg):  # rejects values the run cannot use, naming the flag
    choices = dict(arch=BACKBONES, optimizer=("lars", "adamw"), precision=(None, "bf16", "fp16", "fp32"),
                   batched_aug=(None, "on", "off"))
    rules = [(lambda v, allowed=allowed: v in allowed, f"unknown (choose from "
              f"{', '.join(_shown(a) for a in allowed)})", name) for name, allowed in choices.items()]
    def named(kind):  # the fields of values of this type that are set (not automatic)
        return " ".join(f.name for f in dataclasses.fields(Config)
                        if _value_type(f) == kind and getattr(cfg, f.name) is not None)
    rules += [
        (lambda v: math.isfinite(v), "must be a finite number", named(float)),
        (lambda v: all(map(math.isfinite, v)), "must be finite numbers", named(tuple[float, float])),
        (lambda v: abs(v) <= INT64, "is too large (at most 2^63 - 1)", named(int)),
        (lambda v: v >= 1, "must be at least 1", "epochs batch_size accumulate global_size local_size feat_dim "
         "hidden_dim num_groups num_heads log_every dist_timeout"),
        (lambda v: v >= 0, "must be at least 0", "num_local kmeans_iters warmup_epochs stop_after checkpoint_every"),
        (lambda v: v is None or v >= 0, "must be at least 0 (or auto)", "eval_every workers"),
        (lambda v: 0 <= v < 2**62, "must lie in [0, 2^62) (seeds are 64-bit)", "seed"),
        (lambda v: 1 <= v <= 2_000_000, "must lie in [1, 2000000] (2M images of 32x32 take 6 GiB)",
         "synthetic_size"),
        (lambda v: v is None or 0 <= v <= 1, "must lie in [0, 1] (or auto)", "invert"),
        (lambda v: 0 <= v <= 1, "must lie in [0, 1]", "ema beta_start beta_end drop_path momentum"),
        (lambda v: v > 0, "must be positive", "tau lr lars_eta"),
        (lambda v: v >= 0, "must be at least 0", "start_lr final_lr weight_decay clip_grad memory_budget"),
        (lambda v: 0 < v[0] <= v[1] <= 1, "needs 0 < low <= high <= 1", "global_scale local_scale"),
        (lambda v: 0 < v[0] <= v[1], "needs 0 < low <= high", "blur_sigma"),
        (lambda v: not cfg.arch.startswith("vit") or v % 16 == 0,
         f"--arch {cfg.arch} needs crop sizes that are multiples of its 16-px patches", "global_size local_size")]
    for ok, why, names in rules:
        for name in (name for name in names.split() if not ok(getattr(cfg, name))):
            fail(f"{_flag(name)} {_shown(getattr(cfg, name))}: {why}")

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

def _tiny_resnet(widths=(16, 32, 64, 128)):
    """A 0.3M-parameter ResNet of four strided BasicBlocks after a 3x3 full-resolution stem, for CPUs."""
    # The last block is 128 wide, not 256: at 2x2 pixels its 3x3 convolutions mostly read padding, and 256 made
    # it the costliest layer for no better kNN (the README's What to expect has the figures).
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
        q, k, v = self.qkv(x).view(b, n, 3, attn_heads, c // attn_heads).permute(2, 0, 3, 1, 4)  # (B, attn_heads, N, d)
        rows, cols = torch.arange(wh, device=x.device), torch.arange(ww, device=x.device)
        region = ((rows >= wh - sh)[:, None] * 2 + (cols >= ww - sw)[None]).flatten()  # (N,): wrapped or not
        mask = torch.where(region[:, None] == region[None], 0.0, -100.0).to(q.dtype)  # the masks' −100
        scores = (q * (c // attn_heads) ** -0.5) @ k.mT  # (B, attn_heads, N, N)
        attn = scores + self.get_relative_position_bias() + mask
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
    net.head = nn.Identity()  # torchvision's name for its classifier
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

def swin_mlps(dim, hidden_dim, feat_dim):
    """The authors' Swin projector (GELU) and predictor (ReLU), trunc-normal(0.02) (src/SwinTrans_multicrop.py)."""
    def trunc_normal(net):
        for linear in (m for m in net if isinstance(m, nn.Linear)):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        return net
    projector = trunc_normal(mlp(dim, hidden_dim, feat_dim, last_bn=True, activation=nn.GELU))
    predictor = trunc_normal(mlp(feat_dim, hidden_dim, feat_dim, last_bn=False))
    return projector, predictor

def per_size(mlp, feats):  # an MLP run on each crop size's features alone (the authors' Swin): (Σ n_i, D)
    return torch.cat([mlp(x) for x in feats])

def make_online(cfg):
    """OnlineNet around a fresh cfg.arch backbone, with Part 1's hooks filled: the ResNets' BN over crop sizes, the
    Swin MLPs run per size."""
    backbone, dim = BACKBONES[cfg.arch](cfg.drop_path)
    if cfg.swin_mlps:
        return OnlineNet(backbone, *swin_mlps(dim, cfg.hidden_dim, cfg.feat_dim), mlp_over_sizes=per_size)
    over_sizes = resnet_over_sizes if cfg.bn_over_sizes and cfg.arch.startswith("resnet") else None
    return OnlineNet(backbone, *projector_and_predictor(dim, cfg.hidden_dim, cfg.feat_dim), over_sizes)

def stochastic_depth(module):  # the module's stochastic-depth layers that drop (Swin's drop-path)
    return [m for m in module.modules() if isinstance(m, torchvision.ops.StochasticDepth) and m.p > 0]

def without_stochastic_depth(encoder):
    """encoder's forward without gradients and drop-path, what the authors' Swin groups and bank see
    (src/two_stream_network.py, TwoStreamNet.forward): train_step's group_z; None for an encoder without it."""
    dropping = stochastic_depth(encoder)
    if not dropping:
        return None

    @torch.no_grad()
    def forward(crops):
        for m in dropping:
            m.eval()
        try:
            return encoder(crops)
        finally:
            for m in dropping:
                m.train()
    return forward

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
    class_of = {}  # real path of a class folder -> its name
    for name in names:
        real = os.path.realpath(os.path.join(root, name))
        if real in class_of:
            fail(f"--data {printable(os.path.join(root, name))!r}: a link to the class folder "
                 f"{printable(class_of[real])!r}, whose images count once, as that class's; remove the link or "
                 f"copy the images")
        class_of[real] = name
    seen = {os.path.realpath(root), *class_of}  # folders and files read

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

    def fingerprint(self):
        """What identifies the data set in a checkpoint: image count, a hash of each relative path and file size (a
        copy of the folder elsewhere has the same; another folder with the same names has not)."""
        def size(path):  # -1 for a file that cannot be read (it is replaced when training reads it)
            try:
                return os.path.getsize(path)
            except OSError:
                return -1
        files = (f"{os.path.relpath(p, self.root)} {size(p)}" for p, _ in self.samples)
        digest = hashlib.sha1("\n".join(files).encode()).hexdigest()[:12]
        return f"{len(self.samples)} images in {len(self.classes)} classes, paths and sizes sha1 {digest}"

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
    source: "torch.Tensor | ImageFolderData | None"  # uint8 images (N, 3, H, W) in memory, or a folder that loader
    # workers read; None: there is no such split
    labels: torch.Tensor | None  # (N,)
    fingerprint: str  # what identifies the data set in a checkpoint (resume refuses another one)

    @property
    def in_memory(self):  # the one place that tells images in memory from a folder
        return isinstance(self.source, torch.Tensor)

def load_dataset(cfg, split):
    """The split train|val of cfg.data: uint8 images in memory (with labels), or a folder for loader workers."""
    if cfg.data == "synthetic":
        n = cfg.synthetic_size if split == "train" else 2000
        images, labels = synthetic_shapes(n, seed=cfg.seed * 2 + (split != "train"))
        return Split(images, labels, f"the embedded data set, {n} images, --seed {cfg.seed}")
    if cfg.data == "cifar10":
        root = os.path.join(cfg.out_dir, "cifar10")
        try:
            ds = torchvision.datasets.CIFAR10(root, train=split == "train", download=True)
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a damaged archive: all say the same
            fail(f"--data cifar10: could not download CIFAR-10 to {root} ({type(e).__name__}: {e}); put "
                 f"cifar-10-batches-py there by hand, or train on --data PATH")
        return Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets),
                     f"CIFAR-10 {split}, {len(ds)} images")
    if not os.path.isdir(cfg.data):
        fail(f"--data {cfg.data}: no such directory (or use synthetic | cifar10)")
    train_root, val_root = os.path.join(cfg.data, "train"), os.path.join(cfg.data, "val")
    if not os.path.isdir(train_root) and os.path.isdir(val_root):
        fail(f"--data {cfg.data}: has val/ but no train/ (a folder with val/ needs its training images in train/)")
    train_root = train_root if os.path.isdir(train_root) else cfg.data  # or a plain class-per-folder tree is it
    if split == "val" and not os.path.isdir(val_root):
        return Split(None, None, "")
    classes = None if split == "train" else scan_folder(train_root)[0]  # val/ labels follow train/'s class names
    ds = ImageFolderData(train_root if split == "train" else val_root, classes)
    budget = 0 if cfg.batched_aug == "off" else cfg.memory_budget  # MultiCrop runs in the workers that read files
    decoded = decode_into_memory(ds, budget, split)
    if decoded is None:
        return Split(ds, torch.tensor(ds.targets), ds.fingerprint())
    return Split(*decoded, ds.fingerprint())

def check_unreadable(unreadable, images, examples):
    """The one rule for unreadable images, decoded into memory or streamed: more than 1% of the data set's stops the
    run (under 1%, each is replaced by the next readable one and counted in the log)."""
    if unreadable > 0.01 * images:
        fail(f"{unreadable} of the {images} images are unreadable, more than 1%; e.g. {examples[0]}")

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
    t0 = time.time()
    images = []  # the decoded images
    labels = []  # their labels
    failed = []  # why each unreadable one is
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
    check_unreadable(len(failed), len(samples), failed)
    log(f"data ({split}): {len(images)} images of {first.shape[1]}x{first.shape[0]} decoded into memory "
        f"({len(images) * first.nbytes / 2**20:.0f} MiB, {time.time() - t0:.1f}s; --memory-budget {budget_gib:g} GiB)"
        + (f"; {len(failed)} unreadable left out, e.g. {failed[0]}" if failed else ""))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)

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
    """(n, size, length) rows resampling whole-pixel spans [start, stop) of an axis (stop < start: mirrored):
    bilinear, antialiased, reading the span's pixels only, as PIL resizes a crop (torchvision's resized_crop)."""
    dev = start.device
    step = (stop - start) / size  # (n,) source pixels per output pixel, negative when mirrored
    centre = start[:, None] + (torch.arange(size, device=dev) + 0.5) * step[:, None]  # (n, size)
    width = step.abs().clamp(min=1)[:, None, None]  # the filter's half-width: wider when shrinking (antialiasing)
    index = torch.arange(length, device=dev)
    weight = (1 - (index + 0.5 - centre[..., None]).abs() / width).clamp(min=0)  # (n, size, length)
    low, high = torch.minimum(start, stop)[:, None, None], torch.maximum(start, stop)[:, None, None]
    weight = weight * ((index >= low) & (index < high))  # no pixel outside the span
    return weight / weight.sum(-1, keepdim=True)  # renormalised at the span's edges, as PIL

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
    def __init__(self, cfg, device, draws=None):  # draws: an epoch of this many random images instead (bench.py)
        self.cfg = cfg
        self.device = device
        self.recipe = crop_recipe(cfg)
        split = load_dataset(cfg, "train")
        self.source, self.labels, self.fingerprint = split
        in_memory = split.in_memory
        per_step = cfg.batch_size * world_size() * cfg.accumulate
        if len(self.labels) < per_step:
            fail(f"--batch-size {cfg.batch_size} × {world_size()} process(es) × --accumulate {cfg.accumulate} = "
                 f"{per_step} is larger than the data set ({len(self.labels)} images in --data {cfg.data})")
        if in_memory and cfg.batched_aug == "off":
            fail(f"--batched-aug off: MultiCrop runs in the loader workers of a folder (--data PATH); --data "
                 f"{cfg.data} is held in memory and cropped in batches")
        if in_memory:
            self.path = "device"
            self.source = self.source.to(device)
        elif cfg.batched_aug == "on" or (cfg.batched_aug is None and device.type == "cuda"):
            self.path = "cut"
            self.source.transform = CutCrops(self.recipe)
        else:
            self.path = "pil"
            self.source.transform = MultiCrop(self.recipe, extra=inverted(cfg.invert))
        if draws is None:
            self.sampler = torch.utils.data.DistributedSampler(range(len(self.labels)), num_replicas=world_size(),
                                                               rank=rank(), shuffle=True, seed=cfg.seed,
                                                               drop_last=True)
        else:
            self.sampler = torch.utils.data.RandomSampler(range(len(self.labels)), replacement=True,
                                                          num_samples=draws)
        self.unreadable = set()  # the unreadable images met so far (streamed folders), each once
        self.passes_per_epoch = len(self.sampler) // cfg.batch_size  # this process's forward passes
        self.steps_per_epoch = self.passes_per_epoch // cfg.accumulate
        self.left_over = self.passes_per_epoch % cfg.accumulate  # passes after the epoch's last step
        self.epoch_images = self.passes_per_epoch * cfg.batch_size  # this process's, per epoch

    def steps(self, skip=0):
        """Yields (batches, carried, failed) for each step of this epoch after the first `skip` (a run resumed
        mid-epoch): the step's `accumulate` batches, and at the epoch's last step the `left_over` batches after it
        (whose gradients carry into the next step, as main_SMoG.py's), else []."""
        passes_per_step, b = self.cfg.accumulate, self.cfg.batch_size
        indices = list(self.sampler)
        # Each pass's (index, pass parity) pairs: the parity tells CPU workers which pipeline each branch uses.
        passes = []
        for p in range(skip * passes_per_step, self.passes_per_epoch):
            passes.append([(j, p % 2) for j in indices[p * b:(p + 1) * b]])
        batches = iter(self._batches(passes))
        for step in range(skip, self.steps_per_epoch):
            last = step == self.steps_per_epoch - 1
            taken = [next(batches) for _ in range(passes_per_step + self.left_over * last)]  # (batch, failed) pairs
            failed = [f for _, fs in taken for f in fs]
            self.unreadable.update(failed)
            check_unreadable(len(self.unreadable), len(self.labels), failed)
            batches_only = [batch for batch, _ in taken]
            yield batches_only[:passes_per_step], batches_only[passes_per_step:], failed

    def _batches(self, batches):  # (batch, failed paths) of lists of (index, parity) pairs
        if self.path == "device":  # in memory, augmented on the device: no loader processes needed
            # The epoch's indices go to the device in one copy: a copy per step would make the host wait for the GPU
            order = torch.tensor([j for batch in batches for j, _ in batch], dtype=torch.long)
            for part in order.to(self.source.device).split(self.cfg.batch_size) if len(order) else []:
                yield self.source[part], []
            return
        loader = torch.utils.data.DataLoader(self.source, batch_sampler=batches, num_workers=self.cfg.workers,
                                             collate_fn=collate, pin_memory=self.device.type == "cuda")
        batches = ((batch, failed) for batch, _, failed in loader)
        yield from copied_ahead(batches, self.device) if self.device.type == "cuda" else batches

    def crops(self, batch, index, reseed=True):
        """The Crops of forward pass `index` (counted over the run) from a batch of steps(), on the device, from seed
        (seed, process, pass)."""
        if reseed:
            torch.manual_seed(seed_for(self.cfg.seed, index, rank()))
        batch = tensors_to(batch, self.device)  # a no-op for batches that copied_ahead already moved
        in_epoch = index % self.passes_per_epoch  # the pipelines swap with the pass of the epoch
        if self.path == "device":
            crops = batch_multicrop(batch, in_epoch, self.recipe, self.cfg.invert)
        elif self.path == "cut":
            crops = cut_multicrop(batch, in_epoch, self.recipe, self.cfg.invert)
        else:
            crops = Crops(*batch)
        return Crops(*(None if x is None else channels_last(x, self.cfg) for x in crops))

    def global_crops(self):
        """The online global crops (2B, 3, S, S) of one pass over the data, for fill_bank: every batch's by the query
        pipeline (parity 0), as the authors' init_memory."""
        torch.manual_seed(seed_for(self.cfg.seed, -1, rank()))
        self.sampler.set_epoch(-1)
        indices, b = list(self.sampler), self.cfg.batch_size
        passes = [[(j, 0) for j in indices[p * b:(p + 1) * b]] for p in range(self.passes_per_epoch)]
        for batch, _ in self._batches(passes):
            yield self.crops(batch, 0, reseed=False).online_global

def inverted(p):  # MultiCrop's extra transforms for --invert p: the crop's negative with probability p
    return [torchvision.transforms.RandomInvert(p=p)] if p else []

def collate(batch):  # stacks (sample, label, failed path) triples; crop stacks come out crop-major (k·B, 3, s, s)
    samples, labels, failed = zip(*batch)
    out = torch.stack(samples) if isinstance(samples[0], torch.Tensor) else tuple(
        None if parts[0] is None else torch.stack(parts, 1).flatten(0, 1) for parts in zip(*samples))
    return out, torch.tensor(labels), [f for f in failed if f]

def channels_last(x, cfg):  # x in the NHWC memory layout when cfg.channels_last
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

def tensors_to(batch, device):  # a tensor, or a tuple of tensors and None, moved without waiting
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return tuple(None if x is None else tensors_to(x, device) for x in batch)

def copied_ahead(batches, device):
    """A loader's (batch, failed) pairs, batch i+1 copied to the GPU on a side stream while step i runs."""
    side, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def handed_over(moved, failed, ready):  # the step waits for the copy (the host does not) and keeps its memory
        compute.wait_event(ready)
        for t in moved if isinstance(moved, tuple) else [moved]:
            if t is not None:
                t.record_stream(compute)
        return moved, failed
    ahead = None  # (batch on the GPU, failed, the event its copy records)
    for batch, failed in batches:
        with torch.cuda.stream(side):
            moved, ready = tensors_to(batch, device), torch.cuda.Event()
            ready.record(side)
        if ahead is not None:
            yield handed_over(*ahead)
        ahead = (moved, failed, ready)
    if ahead is not None:
        yield handed_over(*ahead)

# ----- the run state and its checkpoints ---------------------------------------------------------------------------
def native_bf16_cpu():
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16): there bf16 autocast is faster than fp32."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))

def resolve_precision(cfg, device):
    """(name, autocast context, GradScaler): by default fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."""
    # fp16 rather than bf16 on CUDA: cuDNN runs fp16 BatchNorm, bf16 falls back to slower kernels (README,
    # Performance). CPUs without native bf16 emulate it, so fp32 stays their default. The scaler costs no host sync:
    # LARS and fused AdamW take its overflow flag as a tensor.
    if cfg.precision:
        precision = cfg.precision
    elif device.type == "cuda":
        precision = "fp16"
    else:
        precision = "bf16" if native_bf16_cpu() else "fp32"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else nullcontext())
    return precision, autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")

def make_optimizer(cfg, online):
    """LARS (the ResNet recipes) or AdamW (the Transformer recipes) over Part 1's parameter groups."""
    groups = parameter_groups([online], cfg.exclude_1d, NO_DECAY)
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
        self.online = online  # the plain module, what checkpoints hold
        self.target = target_of(online)
        for m in stochastic_depth(self.target):  # the authors' target has no drop-path
            m.p = 0.0
        self.group_z = without_stochastic_depth(online.encoder)  # what the groups and bank see (Swin), or None
        for net in (online, self.target) if cfg.compile else []:  # in place: no "_orig_mod." prefixes in state_dict
            net.compile(dynamic=False)
        self.grouping = MomentumGrouping(cfg.num_groups, cfg.feat_dim, cfg.num_heads).to(device)
        self.opt = make_optimizer(cfg, online)
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
        self.bank = MemoryBank(bank_rows, cfg.feat_dim, device)
        # online wrapped in DistributedDataParallel under torchrun: what train_step trains
        self.online_ddp = (nn.parallel.DistributedDataParallel(online, device_ids=[device] if device.type == "cuda"
                                                               else None) if world_size() > 1 else online)
        self.epoch = self.step = self.epoch_step = 0
        self.started = time.time()  # when this job built the run; elapsed_s() adds the jobs before (checkpointed)
        self.seconds_before = 0.0
        self.reset_pending = False  # after the last epoch: the groups are not reset (the authors reset at epoch starts)
        self.last_good = "none"  # the newest checkpoint this run wrote or resumed from, as the divergence message says

    def save(self, path, cfg, data):
        """Writes the run as a checkpoint (rank 0; a collective), keeping the one before as previous_of(path)."""
        keep_banks = self.epoch_step or self.reset_pending  # mid-epoch, or the last epoch's for a longer run
        banks = all_gather(self.bank.feats).cpu() if keep_banks else None  # every process's bank
        if rank() != 0:
            return
        carried = self.carried_gradients()
        # Written aside and read back before it replaces the old one: no kill at any moment, full disk or damaged
        # copy leaves the run without a checkpoint that loads. A write that fails ends the run in one line.
        tmp = path + ".tmp"
        try:
            torch.save(dict(config=dataclasses.asdict(cfg), epoch=self.epoch, step=self.step, processes=world_size(),
                            epoch_step=self.epoch_step, num_images=len(data.labels), data_fingerprint=data.fingerprint,
                            online=self.online.state_dict(), target=self.target.state_dict(), banks=banks,
                            grouping=self.grouping.state_dict(), optimizer=self.opt.state_dict(),
                            scaler=self.scaler.state_dict(), bank_filled=self.bank.filled,
                            reset_pending=self.reset_pending, carried=carried, elapsed_s=self.elapsed_s()), tmp)
            read_checkpoint(tmp)
            if os.path.exists(path):
                os.replace(path, previous_of(path))
            os.replace(tmp, path)
            self.last_good = f"{path} (after {self.epoch} epochs)"
        except (OSError, RuntimeError, ValueError) as e:  # torch.save says RuntimeError for a full disk
            fail(f"could not write the checkpoint {tmp} ({str(e).strip().splitlines()[0][:200]}); the ones before "
                 f"in --out-dir {cfg.out_dir} are as they were: free space there, or give another --out-dir")
        finally:  # a write that failed or was cut short (a second Ctrl-C) leaves no partial file
            with suppress(OSError):
                os.remove(tmp)

    def elapsed_s(self):  # wall-clock seconds of the run so far, over all its jobs: what log.jsonl's curves plot
        return self.seconds_before + time.time() - self.started

    def carried_gradients(self):  # the gradients passes without a step left for the next (by name, unscaled), or None
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        grads = {name: p.grad / scale for name, p in self.online.named_parameters() if p.grad is not None}
        return grads or None

    def load(self, state):  # copies a checkpoint into the run (and this process's bank, mid-epoch)
        for name, part in dict(online=self.online, target=self.target, grouping=self.grouping,
                               optimizer=self.opt).items():
            part.load_state_dict(state[name])
        if bool(state["scaler"]) == self.scaler.is_enabled():  # a disabled GradScaler's state is empty
            self.scaler.load_state_dict(state["scaler"])
        else:
            log(f"--precision: the checkpoint was written {'with' if state['scaler'] else 'without'} fp16's "
                f"GradScaler, this run is {'' if self.scaler.is_enabled() else 'not '}fp16: a fresh scaler")
        self.epoch = state["epoch"]
        self.step = state["step"]
        self.epoch_step = state.get("epoch_step", 0)
        self.reset_pending = state.get("reset_pending", False)
        self.seconds_before = state.get("elapsed_s", 0.0)
        carried = state.get("carried") or {}
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        for name, p in self.online.named_parameters():
            p.grad = torch.empty_like(p).copy_(carried[name] * scale) if name in carried else None
        if self.epoch_step or self.reset_pending:
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
        self.last_good = f"{path} (after {self.epoch} epochs)"
        log(f"resumed from {path} at epoch {self.epoch}, step {self.step}" + (
            f" (mid-epoch, after {self.epoch_step} steps)" if self.epoch_step else ""))

def seed_for(seed, index, process=0):
    """The seed of one step's (or epoch's) draws on one process, a function of these alone: resuming is exact."""
    return seed + 7919 * process + 104729 * (index + 1)

def previous_of(path):  # where the checkpoint before `path` is kept: checkpoint.pt → checkpoint.prev.pt
    return "{0}.prev{1}".format(*os.path.splitext(path))

def resolve_resume(cfg):  # checkpoints to try, newest first ([]: a fresh start); --resume none moves old ones aside
    path = cfg.resume if cfg.resume not in (None, "none") else os.path.join(cfg.out_dir, "checkpoint.pt")
    for p in (path, previous_of(path)):
        if os.path.exists(p) and not os.path.isfile(p):
            fail(f"--out-dir {cfg.out_dir}: {p} is not a file (a folder of that name?); move it away")
    if cfg.resume == "none":
        if rank() == 0:
            move_aside([path, previous_of(path), os.path.join(cfg.out_dir, "log.jsonl")], cfg.out_dir)
        return []
    if cfg.resume is not None and not os.path.isfile(path):
        fail(f"--resume {path}: no such checkpoint")
    return [p for p in (path, previous_of(path)) if os.path.isfile(p)]

def move_aside(paths, out_dir):  # an earlier run's files into a new folder out_dir/earlier-<time>[-n]: none overwritten
    old = [p for p in paths if os.path.isfile(p)]
    if not old:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count():
        aside = os.path.join(out_dir, f"earlier-{stamp}" + (f"-{n}" if n else ""))
        try:
            os.mkdir(aside)  # atomic: two runs in the same second get two folders
            break
        except FileExistsError:
            continue
    for p in old:
        os.replace(p, os.path.join(aside, os.path.basename(p)))
    log(f"--resume none: the earlier run's {', '.join(os.path.basename(p) for p in old)} moved to {aside}")

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
    for part in (*needs, "banks", "carried"):
        if not all_finite(state.get(part)):
            raise ValueError(f"damaged: its {part} holds NaN or inf")
    return state

def all_finite(tree):  # whether every floating-point tensor in a nest of dicts and lists is finite
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(all_finite(v) for v in tree)
    return True

# What a checkpoint's config must share with the run resuming it: the shapes of networks, groups and optimiser state
# (arch .. exclude_1d), and the seed of the data order and the crops.
RESUME_MUST_MATCH = ("arch", "feat_dim", "hidden_dim", "num_groups", "num_heads", "swin_mlps", "optimizer",
                     "exclude_1d", "seed")

def check_resumable(path, state, cfg, data):
    """Ends in one line when the run cannot continue the checkpoint (another recipe, data or global batch)."""
    saved = state["config"]
    for name in (name for name in RESUME_MUST_MATCH if saved.get(name) != getattr(cfg, name)):
        fail(f"--resume {path}: checkpoint has {_flag(name)} {saved.get(name)!r}, the config asks for "
             f"{getattr(cfg, name)!r}; keep the checkpoint's value, or start a new run (--resume none)")
    batch = saved.get("batch_size")
    processes = state.get("processes", world_size())
    passes = saved.get("accumulate", 1)
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
        if state.get("epoch_step", 0) or state.get("reset_pending", False):  # the banks are per process
            fail(f"--resume {path}: written with each process's bank (mid-epoch, or at the end) by {processes} "
                 f"process(es) × {passes} passes; resume it with "
                 f"as many (this run has {world_size()} × {cfg.accumulate}), or from the end of an epoch")
        if state.get("carried"):  # a gradient summed over `passes` passes' shares
            fail(f"--resume {path}: it holds the gradients of the passes that ended its epoch without a step, for "
                 f"{processes} process(es) × {passes} passes; resume it with as many (this run has "
                 f"{world_size()} × {cfg.accumulate})")
        log(f"resuming {processes} process(es) × {batch} images × {passes} passes as {world_size()} × "
            f"{cfg.batch_size} × {cfg.accumulate}: the same global batch and schedules; BN statistics now over "
            f"{cfg.batch_size} images per pass (SyncBN: all processes'), the data order unlike an uninterrupted run's")

# ----- processes and faults: preemption, the out-dir lock, divergence, failed collectives --------------------------
def setup_device(timeout=300):
    """Starts the process group under torchrun (NCCL on GPU, gloo on CPU) and picks this process's device (on the
    CPU, with freed memory kept for reuse)."""
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
        keep_freed_memory()
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device

def keep_freed_memory(pad=1 << 30):
    """CPU runs: lets glibc's malloc keep up to `pad` bytes of freed memory for reuse, instead of returning it to the
    OS at every free. Each CPU step frees and allocates its activations anew; memory returned comes back as page
    faults that the kernel zeroes (up to two million in 240 steps of the tiny preset: about a tenth of its time, the
    README's What to expect). Nothing is computed differently. Returns whether it applied (glibc only)."""
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_top_pad = -2  # glibc's malloc.h: the free space kept at the heap's top when it grows or shrinks
    return libc.mallopt(m_top_pad, pad) == 1

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
    error, lock = None, None
    if rank() == 0:
        error, lock = _take_lock(out_dir)
    if all_reduce_(torch.tensor(float(error is not None), device=device), op="max").item() > 0:
        fail(error or f"process {rank()}: process 0 could not take --out-dir {out_dir} (see its message)")
    try:
        yield
    finally:
        if lock is not None:
            with suppress(OSError):
                os.remove(lock.name)  # still holding it: a run starting now locks the next file, not this one
            lock.close()

def _take_lock(out_dir):
    """(why not, None) or (None, the open lock file): an flock on out_dir/lock, which the kernel (and an NFS server,
    when its client's lease runs out) releases when the holder dies, so a dead run's lock needs no taking over."""
    path = os.path.join(out_dir, "lock")
    me = f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        return f"--out-dir {out_dir}: cannot be created ({e.strerror}: {e.filename})", None
    try:
        while True:
            lock = open(path, "a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = printable(lock.read().strip()) or "another run"
                lock.close()
                return (f"--out-dir {out_dir}: in use by {holder} ({path}); wait for it, or give another "
                        f"--out-dir"), None
            if os.path.exists(path) and os.path.samefile(path, lock.fileno()):
                break
            lock.close()  # its holder removed the file as we locked it: lock the one now at path
        lock.seek(0)
        if earlier := printable(lock.read().strip()):  # a holder that died left its line
            log(f"--out-dir {out_dir}: taking over the lock of {earlier}, which is gone")
        lock.truncate(0)
        lock.write(me)
        lock.flush()
        return None, lock
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            return (f"--out-dir {out_dir}: its file system does not lock files ({e.strerror}), so two runs on it "
                    f"could not be told apart; give an --out-dir on a file system that does"), None
        return f"--out-dir {out_dir}: not writable ({e.strerror}: {e.filename or path})", None

def caught_by_any(caught, device):
    """Whether any process caught a preemption signal (all-reduced: all stop at one step; alone: no device sync)."""
    if not distributed():
        return bool(caught)
    return all_reduce_(torch.tensor(float(bool(caught)), device=device), op="max").item() > 0

DIVERGED = 1000.0  # the online weights' norm grown this many times over its value at the job's start: diverged

def weight_norm(module):  # the L2 norm of all of a module's parameters together, as a device tensor
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.detach() for p in module.parameters()])))

def stop_if_diverged(bad_step, run, start_norm):
    """Ends every process together after a non-finite loss, or non-finite or exploded online weights."""
    # bad_step: this process's first step with a non-finite loss, or −1, kept on the device (no host sync per step);
    # checked before every report and checkpoint, so no checkpoint holds such weights.
    first = all_reduce_(bad_step.clone(), op="max").item()
    norm = weight_norm(run.online).item()  # the same on every process: DDP keeps the weights identical
    if first >= 0:
        fail(f"the loss became NaN/inf at step {first}; every process stopped. Last good checkpoint: "
             f"{run.last_good}. Lower --lr or raise --warmup-epochs")
    if not math.isfinite(norm) or norm > DIVERGED * start_norm:
        fail(f"the online weights diverged by step {run.step}: their norm grew from {start_norm:.3g} to {norm:.3g} "
             f"while the loss stayed finite; every process stopped. Last good checkpoint: {run.last_good}. "
             f"Lower --lr")

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
    """Normalised centre views (n, 3, S, S) of a Split's source: uint8 images (N, 3, H, W), or an ImageFolderData."""
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
    if held_out.labels is None:
        if final:
            log("kNN report skipped: the data set has no held-out split (PATH/val)")
        return
    train_labels, test_labels = data.labels.to(device), held_out.labels.to(device)
    nets = [("knn_top1", "trained", run.online.encoder.backbone)]
    if final:
        torch.manual_seed(cfg.seed)
        nets.append(("knn_top1_random_init", "same architecture at random init",
                     BACKBONES[cfg.arch](0.0)[0].to(device)))
    result = {key: knn_top1(extract_features(net, data.source, cfg, device), train_labels,
                            extract_features(net, held_out.source, cfg, device), test_labels) for key, _, net in nets}
    if final and held_out.in_memory and data.path == "device":
        pixels = [F.normalize(x.flatten(1).float() - x.flatten(1).float().mean(1, keepdim=True), dim=1).to(device)
                  for x in (data.source, held_out.source)]  # centred per image: invariant to brightness and contrast
        result["knn_top1_raw_pixels"] = knn_top1(pixels[0], train_labels, pixels[1], test_labels)
        nets.append(("knn_top1_raw_pixels", "raw pixels", None))
    log(f"kNN top-1 on the held-out split{'' if final else f' after epoch {epoch}'}: " + " | ".join(
        f"{name} {result[key]:.1f}%" for key, name, _ in nets))
    progress.write(dict(step=run.step, epoch=epoch, **result))

class Progress:
    """The log line every cfg.log_every steps, on the console and in log.jsonl."""
    def __init__(self, cfg, total_steps, jsonl, first_step, scaler, clock=None):
        self.cfg = cfg
        self.total_steps = total_steps
        self.jsonl = jsonl
        self.scaler = scaler
        self.first_step = first_step
        self.t_start = time.time()
        # the run's elapsed seconds, which every record carries as elapsed_s (by default: since this Progress began)
        self.clock = clock or (lambda: time.time() - self.t_start)
        self.counts = 0  # group counts (H, K), summed on the device over each interval
        self.skipped = 0  # steps GradScaler skipped, likewise
        self.restart()

    def restart(self):  # at each epoch start: the k-means reset does not count as waiting for data
        self.t_log = time.time()
        self.data_time = 0.0
        self.images = 0
        self.bad_images = 0

    def timed(self, steps):  # TrainData.steps' batches, timing each wait for them and counting unreadable images
        t0 = time.time()
        for batches, carried, failed in steps:
            self.data_time += time.time() - t0
            self.bad_images += len(failed)
            self.images += self.cfg.batch_size * world_size() * (len(batches) + len(carried))
            yield batches, carried
            t0 = time.time()  # the loop asks for the next step's batches

    def add(self, counts, skipped):  # one step's group counts (H, K) and skip flag, summed on the device
        self.counts = self.counts + counts
        self.skipped = self.skipped + skipped

    def report(self, step, epoch, loss, lr, beta):  # prints and records one interval's figures (one wait for the GPU)
        used, entropy = group_health(self.counts)
        elapsed = time.time() - self.t_log
        fp16 = self.scaler.is_enabled()
        eta = (time.time() - self.t_start) / max(1, step - self.first_step) * (self.total_steps - step)
        skipped = int(self.skipped) if fp16 else 0
        record = dict(step=step, epoch=epoch, loss=loss.item(), lr=lr, beta=beta, img_per_s=self.images / elapsed,
                      data_time=self.data_time / elapsed, groups_used=used, assign_entropy=entropy,
                      assign_entropy_max=math.log(self.cfg.num_groups), eta_s=eta, bad_images=self.bad_images,
                      skipped_steps=skipped, grad_scale=self.scaler.get_scale() if fp16 else None)
        if torch.cuda.is_available():
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30  # peak so far, this process
        parts = [f"step {step}/{self.total_steps}", f"epoch {epoch}", f"loss {record['loss']:.4f}", f"lr {lr:.4f}",
                 f"β {beta:.4f}", f"{record['img_per_s']:.0f} img/s", f"data {100 * record['data_time']:.0f}%",
                 f"groups used {used:.0f}/{self.cfg.num_groups}, entropy {entropy:.2f}/"
                 f"{record['assign_entropy_max']:.2f}"]
        if fp16:  # a scale that keeps falling, with many skips, means gradients that keep overflowing
            parts.append(f"fp16 steps skipped {skipped}, scale {record['grad_scale']:g}")
        if self.bad_images:
            parts.append(f"unreadable images {self.bad_images} (replaced)")
        parts.append(f"ETA {datetime.timedelta(seconds=round(eta))}")
        log(" | ".join(parts))
        self.write(record)
        self.restart()  # each log line counts its own interval
        self.counts = 0
        self.skipped = 0

    def write(self, record):  # one line of log.jsonl, which rank 0 holds (the others have None)
        if self.jsonl:
            self.jsonl.write(json.dumps({**record, "elapsed_s": round(self.clock(), 1)}) + "\n")
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
    # (key, title, range: fixed, or the data's from "zero" or None: their own; reference line and its label or None;
    # x: "step", or "elapsed_s" for the time-to-accuracy panel, in minutes of the run's wall-clock)
    panels = [("loss", "loss", None, None, "step"), ("lr", "learning rate", "zero", None, "step"),
              ("beta", "β (centroid momentum)", None, (1.0, "1"), "step"),
              ("groups_used", "groups used", (0, 1.05 * k) if k else "zero", (k, f"K = {k}") if k else None, "step"),
              ("assign_entropy", "assignment entropy (nats)", (0, 1.05 * log_k) if k else "zero",
               (log_k, f"log K = {log_k:.2f}") if k else None, "step"),
              ("img_per_s", "throughput (img/s)", "zero", None, "step"),
              ("knn_top1", "kNN top-1 (%)", (0, 100), None, "step"),
              ("knn_top1", "kNN top-1 (%) against wall-clock", (0, 100), None, "elapsed_s")]
    x_hi = dict(step=max([r["step"] for r in records if "step" in r] + [1]),
                elapsed_s=max([r["elapsed_s"] for r in records if "elapsed_s" in r] + [60]))
    epoch_at = sorted((r["step"], r["epoch"]) for r in records if "step" in r and "epoch" in r)
    w, h = 380, 240  # one panel, in pixels
    left = 52  # the panel's margins
    top = 30
    bottom = 46
    pw, ph = w - left - 16, h - top - bottom
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{4 * w}" height="{2 * h}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for i, (key, title, fixed, ref, x) in enumerate(panels):
        x0, y0 = (i % 4) * w + left, (i // 4) * h + top
        points = [(r[x], r[key]) for r in records if r.get(key) is not None and x in r]
        values = [v for _, v in points] + ([ref[0]] if ref else [])
        lo, hi = fixed if isinstance(fixed, tuple) else (min(values, default=0), max(values, default=1))
        lo = min(lo, 0) if fixed == "zero" else lo
        if hi - lo < 1e-9 * max(1.0, abs(hi)):  # a constant series: a small band around it, not a jumping line
            lo, hi = lo - max(abs(lo) * 0.05, 1e-3), hi + max(abs(hi) * 0.05, 1e-3)
        pad = 0 if isinstance(fixed, tuple) else 0.05 * (hi - lo)
        lo, hi = lo - (pad if lo != 0 else 0), hi + pad
        sx = lambda s: x0 + pw * s / x_hi[x]  # noqa: E731
        sy = lambda v: y0 + ph - ph * (v - lo) / (hi - lo)  # noqa: E731
        svg.append(f'<text x="{x0}" y="{y0 - 10}" font-weight="bold">{title}</text><rect x="{x0}" y="{y0}" '
                   f'width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        svg += [f'<text x="{x0 - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.4g}</text><line x1="{x0}" '
                f'x2="{x0 + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>' for t in _ticks(lo, hi)]
        if x == "elapsed_s":  # ticks in minutes
            svg += [f'<text x="{sx(60 * t):.1f}" y="{y0 + ph + 14}" text-anchor="middle">{t:g} min</text>'
                    for t in _ticks(0, x_hi[x] / 60, 4)]
        else:  # ticks in steps, with the epoch under each
            for t in _ticks(0, x_hi[x], 4):
                epoch = max([e for s, e in epoch_at if s <= t], default=0 if epoch_at else None)
                svg.append(f'<text x="{sx(t):.1f}" y="{y0 + ph + 14}" text-anchor="middle">{t}</text>'
                           + (f'<text x="{sx(t):.1f}" y="{y0 + ph + 26}" text-anchor="middle" fill="#777">epoch '
                              f'{epoch}</text>' if epoch is not None else ""))
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

def reset_groups(run, cfg, epoch):  # the epoch start after `epoch`: k-means on its bank, BN buffers, target ← online
    start_epoch(run.grouping, run.bank, run.online, run.target, cfg.kmeans_iters,
                torch.Generator().manual_seed(seed_for(cfg.seed, epoch)))
    run.reset_pending = False

def open_log(cfg):  # out_dir/log.jsonl, appended to by rank 0; the other processes get None
    return open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank() == 0 else nullcontext()

def remaining_steps(data, run, cfg, progress):
    """(epoch, batches, carried) for every step from the run's current one to the end, epoch by epoch (TrainData.steps)."""
    for epoch in range(run.epoch, cfg.epochs):
        # Data order is a function of (seed, epoch), each pass's crops of (seed, process, pass): resuming at any
        # step is exact with batched augmentation (CPU workers draw from their own per-epoch seeds).
        data.sampler.set_epoch(epoch)
        torch.manual_seed(seed_for(cfg.seed, epoch, rank()))  # the loader's worker seeds
        progress.restart()
        for batches, carried in progress.timed(data.steps(run.epoch_step)):
            yield epoch, batches, carried

def _train(cfg, device):
    # ----- setup: precision, data, the run state (resumed, or a bank from the initial network and k-means) -----
    precision, autocast, scaler = resolve_precision(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"config: {config_text(cfg)}")
    why = ""
    if cfg.precision is None and device.type == "cpu":
        why = " (auto: this CPU computes bf16 natively)" if precision == "bf16" else " (auto: no native bf16 on this CPU)"
    log(f"device: {device}, processes: {world_size()}, precision: {precision}{why}")
    resume = resolve_resume(cfg)
    data = TrainData(cfg, device)
    passes_per_step = cfg.accumulate
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    # The schedules run over forward passes, set at each step's last, as main_SMoG.py's (per pass, over len(loader))
    passes_per_epoch = data.passes_per_epoch
    total_passes = cfg.epochs * passes_per_epoch
    warmup_passes = cfg.warmup_epochs * passes_per_epoch
    global_batch = cfg.batch_size * world_size() * passes_per_step
    batch_parts = f"{cfg.batch_size} × {world_size()} process(es)"
    if passes_per_step > 1:
        batch_parts += f" × {passes_per_step} passes"
    log(f"data: {len(data.labels)} images, {steps_per_epoch} steps per epoch, global batch {global_batch} "
        f"({batch_parts}), crops: {CROP_PATHS[data.path]}")
    if data.left_over:
        log(f"--accumulate {passes_per_step}: the last {data.left_over} of the {passes_per_epoch} passes of each "
            f"epoch fill no step; their gradients carry into the next epoch's first step, as the authors'")
    run = RunState(cfg, device, data.epoch_images, scaler)
    if resume:
        run.resume(resume, cfg, data)
        if run.reset_pending and run.epoch < cfg.epochs:  # a finished run resumed for more epochs
            reset_groups(run, cfg, run.epoch - 1)
    else:
        t0 = time.time()
        with autocast:
            fill_bank(run.group_z or run.online.encoder, run.bank, data.global_crops())
        start_epoch(run.grouping, run.bank, run.online, run.target, cfg.kmeans_iters,
                    torch.Generator().manual_seed(seed_for(cfg.seed, -1)))
        log(f"bank filled by the initial network, groups set by k-means ({time.time() - t0:.1f}s)")
    peak_lr = cfg.lr * global_batch / 256
    first_epoch = run.epoch
    hyper = step_hyperparameters(cfg)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    start_norm = weight_norm(run.online).item()
    held_out = load_dataset(cfg, "val") if rank() == 0 and (cfg.knn or cfg.eval_every) else None
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
    stop = None  # why the run leaves before its last step: "signal" or "stop-after"

    with open_log(cfg) as jsonl, catch_preemption() as caught, collective_failures_in_one_line(run, cfg.dist_timeout):
        progress = Progress(cfg, total_steps, jsonl, run.step, scaler, clock=run.elapsed_s)
        for epoch, batches, carried in remaining_steps(data, run, cfg, progress):
            # ----- one step: the schedules at this step, train_step, the bank, the interval's sums -----
            first_pass = epoch * passes_per_epoch + run.epoch_step * passes_per_step  # counted over the run
            last_pass = first_pass + passes_per_step - 1
            lr = lr_at(last_pass, total_passes, warmup_passes, peak_lr, cfg.start_lr, cfg.final_lr)
            beta = beta_at(last_pass, total_passes, cfg.beta_start, cfg.beta_end)
            for group in run.opt.param_groups:
                group["lr"] = lr
            passes = (data.crops(batch, first_pass + i) for i, batch in enumerate(batches))
            loss, counts, z_global, skipped = train_step(run.online_ddp, run.target, run.grouping, passes, run.opt,
                                                         run.scaler, beta=beta, autocast=autocast,
                                                         group_z=run.group_z, **hyper)
            run.bank.add(z_global)
            progress.add(counts, skipped)
            if carried:  # the epoch's last passes, too few for a step: gradients for the next step, z for the bank
                passes = (data.crops(batch, last_pass + 1 + i) for i, batch in enumerate(carried))
                _, _, z_carried, _ = train_step(run.online_ddp, run.target, run.grouping, passes, run.opt, run.scaler,
                                                beta=beta, autocast=autocast, group_z=run.group_z, step=False,
                                                **hyper)
                run.bank.add(z_carried)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), run.step, bad_step)
            run.step += 1
            run.epoch_step += 1
            epoch_done = run.epoch_step == steps_per_epoch
            # ----- stop here? A signal (checked every step alone, every 10 steps and at epoch ends under torchrun,
            # one host sync each), or --stop-after at an epoch end -----
            if (epoch_done or run.step % 10 == 0 or not distributed()) and caught_by_any(caught, device):
                stop = "signal"
            elif epoch_done and cfg.stop_after and epoch + 1 - first_epoch >= cfg.stop_after and epoch + 1 < cfg.epochs:
                stop = "stop-after"
            # ----- report and checkpoint, each after the one divergence check -----
            report = run.step % cfg.log_every == 0 or run.step == total_steps
            save = epoch_done or stop or (cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0)
            if report or save:
                stop_if_diverged(bad_step, run, start_norm)
            if report:
                progress.report(run.step, epoch, loss, lr, beta)
            if epoch_done:  # the next epoch's start: k-means on this epoch's bank, target ← online
                t0 = time.time()
                run.epoch, run.epoch_step = epoch + 1, 0
                if run.epoch < cfg.epochs:
                    reset_groups(run, cfg, epoch)
                else:  # none after the last epoch: its target stays the EMA's, as the authors' (they reset at starts)
                    run.reset_pending = True
                    for buffer in (*run.online.buffers(), *run.target.buffers()):  # BN statistics: every process's
                        broadcast_(buffer)  # the same, as at every epoch start (no SyncBN on CPUs)
                reset_seconds = time.time() - t0
            if save:
                run.save(ckpt_path, cfg, data)
            if epoch_done and ((epoch + 1) % max(1, cfg.epochs // 20) == 0 or epoch + 1 == cfg.epochs):
                reset = "the last" if run.reset_pending else f"groups reset by k-means ({reset_seconds:.1f}s)"
                log(f"epoch {epoch} done ({reset}), checkpoint {ckpt_path}")
            if epoch_done and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and rank() == 0:
                knn_report(run, cfg, device, data, held_out, progress, epoch)
            if stop:
                break
        # ----- the end: the final kNN report, or how to continue -----
        if stop == "signal":
            log(f"caught {'Ctrl-C' if signal.SIGINT in caught else 'a preemption signal'}: checkpoint "
                f"{ckpt_path} at epoch {run.epoch}, step {run.step}; run again to resume from there")
        elif stop == "stop-after":
            log(f"stopping after {cfg.stop_after} epoch(s) as asked; run again to resume from epoch {run.epoch}")
        elif cfg.knn and rank() == 0 and run.step == total_steps:  # the other processes need not wait for it
            knn_report(run, cfg, device, data, held_out, progress, cfg.epochs - 1, final=True)
    if signal.SIGINT in caught:
        raise SystemExit(130)  # the shell's status for a program stopped by Ctrl-C
    return run

def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt again, now torch is loaded
    cfg, args = parse_command(argv)
    if args.plot:
        print(f"wrote {plot_curves(args.plot)}")
        return
    if args.print_config:
        print(config_text(cfg, indent=2))
        print(f"parameters (millions): {json.dumps(parameter_counts(cfg))}")
        return
    try:
        train(cfg)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading data, filling the bank, the kNN report)
        print("smog.py: stopped by Ctrl-C; the run resumes from its last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None
    if distributed():
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
