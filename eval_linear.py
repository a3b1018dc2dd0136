"""Linear probe and kNN on frozen SMoG features, and a backbone export.

    python eval_linear.py --checkpoint out/checkpoint.pt --cache-features --knn      # the embedded data set
    python eval_linear.py --random-init --arch resnet_tiny --cache-features --knn   # the baseline every report needs
    python eval_linear.py --checkpoint out/checkpoint.pt --export backbone.pt       # torchvision-style state_dict

Runs in one process or under torchrun (DDP: each process extracts and trains on its share of the data).

Protocol (the authors' eval_linear.py and scripts/linear.sh): the online backbone of a smog.py checkpoint, loaded
with strict key matching, frozen and in eval mode; global-pooled features, raw for the paper's
ImageNet presets as the authors, standardised with the training split's statistics for the others (ours:
--standardize); one nn.Linear (weights
N(0, 0.01), bias 0) trained with SGD, momentum 0.9, lr 0.3 × batch / 256, weight decay 1e-6, cosine schedule,
100 epochs (Swin: lr 0.1, no weight decay, 150 epochs); RandomResizedCrop + flip for training, Resize + CenterCrop
for validation. --cache-features extracts the centre-view features once and trains on them (no train-time
augmentation: the fast path for small data and CPUs). kNN: cosine similarity of L2-normalised features,
k = 20 and 200, temperature 0.07, weighted vote. The reported top-1/top-5 are those of the final epoch; the best
epoch (what the authors' script reports) is shown too, labelled as such. The last line printed is one JSON object.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import smog

fail = functools.partial(smog.fail, prog="eval_linear.py")

# arch -> the torchvision model an exported backbone loads into with strict key matching (its classifier replaced by
# an identity); archs not listed have no torchvision twin and load into smog.py's own builder.
EXPORT_INTO = {
    "resnet18": "m = torchvision.models.resnet18(); m.fc = torch.nn.Identity()",
    "resnet18_cifar": "m = torchvision.models.resnet18(); m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
                      "m.maxpool = torch.nn.Identity(); m.fc = torch.nn.Identity()",
    "resnet50": "m = torchvision.models.resnet50(); m.fc = torch.nn.Identity()",
}


def export_advice(arch, path):
    """One line saying how to load an exported backbone of this arch."""
    build = EXPORT_INTO.get(arch, f"import smog; m = smog.BACKBONES[{arch!r}](0.0)[0]")
    where = "torchvision" if arch in EXPORT_INTO else f"smog.py's builder (no torchvision model is {arch})"
    return (f"backbone ({arch}) written to {path}; it loads into {where} with strict key matching: "
            f"{build}; m.load_state_dict(torch.load({str(path)!r}, weights_only=True))")


def export(backbone, arch, args):
    """Writes the backbone's state_dict to --export: into an existing folder, over an existing file only with
    --force, and never over a smog.py checkpoint (which a resume would otherwise find damaged)."""
    path = args.export
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(f"--export {path}: the folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        fail(f"--export {path}: a folder; give the path of the file to write")
    if os.path.lexists(path):
        if os.path.abspath(path) == os.path.abspath(args.checkpoint) or is_checkpoint(path):
            fail(f"--export {path}: that is a smog.py checkpoint; give another path")
        if not args.force:
            fail(f"--export {path}: the file exists; add --force to replace it")
    tmp = path + ".tmp"
    try:
        with smog.open_in_out_dir(tmp, "wb") as f:  # never through a link planted there
            torch.save({k: v.clone() for k, v in backbone.state_dict().items()}, f)
        os.replace(tmp, path)  # replaces a link at path, never writes through it
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        fail(f"--export {path}: could not write it ({' '.join(str(e).split())[:200]})")
    print(export_advice(arch, path))


def is_checkpoint(path):  # whether path holds a smog.py checkpoint (a dict with its config and online weights)
    try:
        smog.read_checkpoint(path, needs=("online",))
        return True
    except ValueError:
        return False


def parse_args(argv=None):
    p = smog._Parser(prog="eval_linear.py", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="", help="smog.py checkpoint whose online backbone is evaluated")
    p.add_argument("--random-init", action="store_true", help="evaluate the architecture untrained instead")
    p.add_argument("--arch", default="", help="with --random-init: the architecture (default: the tiny preset's)")
    p.add_argument("--data", default="", help="synthetic | cifar10 | PATH with train/ and val/ (default: synthetic "
                   "for a run on the embedded data set; other runs must name it: paths come only from these flags)")
    p.add_argument("--download-dir", default="data", help="--data cifar10 is downloaded to DOWNLOAD_DIR/cifar10")
    p.add_argument("--epochs", type=int, default=None, help="default 100 (Swin: 150)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="per 256 images of batch; default 0.3 (Swin: 0.1)")
    p.add_argument("--weight-decay", type=float, default=None, help="default 1e-6 (Swin: 0)")
    p.add_argument("--cache-features", action="store_true",
                   help="train on centre-view features extracted once (default: RandomResizedCrop + flip each epoch)")
    p.add_argument("--knn", action="store_true", help="also report kNN top-1 (k = 20 and 200)")
    p.add_argument("--standardize", choices=("auto", "on", "off"), default="auto",
                   help="standardise features with the training split's statistics before the probe (ours); auto: "
                        "off for the paper's ImageNet presets (the authors' protocol), on for the others")
    p.add_argument("--export", default="", help="write the backbone as a plain state_dict to this path and exit")
    p.add_argument("--force", action="store_true", help="with --export: replace an existing file (never a smog.py "
                   "checkpoint)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="the probe's; with --random-init also the weights' and the "
                   "embedded data set's, as smog.py --seed")
    args = p.parse_args(argv)
    if bool(args.checkpoint) == args.random_init:
        fail("give exactly one of --checkpoint PATH and --random-init")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        fail(f"--lr {args.lr}: must be a finite positive number")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        fail(f"--weight-decay {args.weight_decay}: must be a finite number, at least 0")
    if args.workers < 0:
        fail(f"--workers {args.workers}: must be at least 0")
    if args.arch and args.arch not in smog.BACKBONES:
        fail(f"--arch {args.arch!r} is unknown (choose from {', '.join(smog.BACKBONES)})")
    return args


def protocol_defaults(args, arch):
    """Fills --lr, --weight-decay and --epochs not given with the authors' values for the architecture."""
    swin = arch.startswith("swin")
    for name, value in (("lr", 0.1 if swin else 0.3), ("weight_decay", 0.0 if swin else 1e-6),
                        ("epochs", 150 if swin else 100)):
        if getattr(args, name) is None:
            setattr(args, name, value)


def load_backbone(args):
    """(backbone, smog Config) from a checkpoint's online encoder with strict key matching, or at random init."""
    if args.random_init:
        cfg = smog.parse_command(["--seed", str(args.seed)] + (["--arch", args.arch] if args.arch else []))[0]
        torch.manual_seed(args.seed)
        return smog.BACKBONES[cfg.arch](0.0)[0], cfg
    if not os.path.isfile(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint}: no such file")
    try:
        state = smog.read_checkpoint(args.checkpoint, needs=("online",))
    except ValueError as e:
        fail(f"--checkpoint {args.checkpoint}: {e}")
    try:
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()}
        cfg = smog.Config(**{k: v for k, v in saved.items() if k in smog.Config.__dataclass_fields__})
        online = state["online"]
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a smog.py checkpoint
        fail(f"--checkpoint {args.checkpoint}: not a smog.py checkpoint ({type(e).__name__}: {e})")
    if cfg.arch not in smog.BACKBONES:
        fail(f"--checkpoint {args.checkpoint}: trained with --arch {cfg.arch!r}, which this smog.py does not have")
    if args.arch and args.arch != cfg.arch:
        fail(f"--arch {args.arch}: the checkpoint {args.checkpoint} holds a {cfg.arch}; leave --arch out (it is "
             f"for --random-init)")
    prefix = "encoder.backbone."
    weights = {k[len(prefix):]: v for k, v in online.items() if k.startswith(prefix)}
    backbone = smog.BACKBONES[cfg.arch](0.0)[0]
    missing, unexpected = backbone.state_dict().keys() - weights.keys(), weights.keys() - backbone.state_dict().keys()
    if missing or unexpected:
        fail(f"--checkpoint {args.checkpoint} does not match --arch {cfg.arch}: "
             f"{len(missing)} missing keys (e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected")
    backbone.load_state_dict(weights, strict=True)
    return backbone, cfg


def all_gather(t):  # every process's t, in rank order: (processes, *t.shape)
    out = [torch.empty_like(t) for _ in range(smog.world_size())]
    smog.dist.all_gather(out, t)
    return torch.stack(out)


def gather_rows(x):
    """Every process's rows of x, concatenated in rank order (processes may hold different numbers of rows)."""
    if not smog.distributed():
        return x
    sizes = all_gather(torch.tensor(len(x), device=x.device)).tolist()
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    return torch.cat([rows[:n] for rows, n in zip(all_gather(padded), sizes)])


def split_features(backbone, data, labels, cfg, device):
    """Centre-view features (N, dim) and labels (N,) of a whole split in data set order, on every process; each
    process extracts every world-th row."""
    mine = torch.arange(smog.rank(), len(labels), smog.world_size())
    feats = smog.extract_features(backbone, data, cfg, device, normalize=False, indices=mine)
    order = gather_rows(mine.to(device)).argsort()
    return gather_rows(feats)[order], gather_rows(labels[mine].to(device))[order]


def train_views(images, sizes, size):
    """RandomResizedCrop(size, scale 0.08–1) + horizontal flip of uint8 images (B, 3, H, W) of sizes (B, 2), cut on
    their device as smog.py cuts its crops, normalised."""
    return smog.imagenet_normalize(smog.random_resized_crops(images.float() / 255, sizes, size, (0.08, 1.0)))


def augmented_batches(data, labels, cfg, args, sampler, device):
    """One epoch of this process's (RandomResizedCrop + flip views (B, 3, S, S), labels (B,)) training batches."""
    if isinstance(data, torch.Tensor):  # in memory
        order = torch.tensor(list(sampler))
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            images = data[idx.to(data.device)].to(device)
            sizes = torch.tensor(images.shape[2:], device=device).expand(len(images), 2)
            yield train_views(images, sizes, cfg.global_size), labels[idx].to(device)
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, list(sampler)), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=smog.collate)
    for images, sizes, y, _ in loader:  # decoded by the workers, cut on the device
        yield train_views(images.to(device), sizes.to(device), cfg.global_size), y.to(device)


def topk_correct(logits, labels, ks=(1, 5)):
    top = logits.topk(max(ks), dim=1).indices
    return [(top[:, :k] == labels[:, None]).any(1).float().sum().item() for k in ks]


def new_head(dim, num_classes, args, device, steps_per_epoch, global_batch):
    """The probe: one nn.Linear (N(0, 0.01), bias 0), SGD momentum 0.9 with lr × global batch / 256, cosine."""
    torch.manual_seed(args.seed)
    head = nn.Linear(dim, num_classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=args.lr * global_batch / 256, momentum=0.9,
                          weight_decay=args.weight_decay)
    return head, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps_per_epoch)


def sgd_step(head, opt, sched, x, y):
    loss = F.cross_entropy(head(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


@torch.no_grad()
def accuracy(head, test_x, test_y, num_classes):
    top1, top5 = topk_correct(head(test_x), test_y, (1, min(5, num_classes)))
    return 100 * top1 / len(test_x), 100 * top5 / len(test_x)


def linear_probe(train_x, train_y, test_x, test_y, num_classes, args, device):
    """Trains the probe on fixed features (N, dim), the same in every process; per-epoch (top1, top5) in %."""
    head, opt, sched = new_head(train_x.shape[1], num_classes, args, device,
                                math.ceil(len(train_x) / args.batch_size), args.batch_size)
    history = []
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x), device=device)
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            sgd_step(head, opt, sched, train_x[idx], train_y[idx])
        history.append(accuracy(head, test_x, test_y, num_classes))
    return history


def augmented_probe(backbone, standardise, train_data, train_y, test_x, test_y, num_classes, cfg, args, device):
    """Trains the probe on features of fresh RandomResizedCrop + flip views every epoch, each process on its share
    (the head's gradients averaged by DDP); evaluated on the centre-view test features; per-epoch (top1, top5)."""
    sampler = torch.utils.data.DistributedSampler(range(len(train_y)), num_replicas=smog.world_size(),
                                                  rank=smog.rank(), shuffle=True, seed=args.seed)
    steps_per_epoch = math.ceil(len(sampler) / args.batch_size)
    head, opt, sched = new_head(test_x.shape[1], num_classes, args, device, steps_per_epoch,
                                args.batch_size * smog.world_size())
    model = nn.parallel.DistributedDataParallel(head) if smog.distributed() else head
    history = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(smog.seed_for(args.seed, epoch, smog.rank()))
        for views, y in augmented_batches(train_data, train_y, cfg, args, sampler, device):
            with torch.no_grad():
                feats = standardise(backbone(smog.channels_last(views, cfg)).float())
            sgd_step(model, opt, sched, feats, y)
        history.append(accuracy(head, test_x, test_y, num_classes))
        if (epoch + 1) % max(1, args.epochs // 10) == 0:
            smog.log(f"epoch {epoch + 1}/{args.epochs}: top-1 {history[-1][0]:.2f}%")
    return history


def main(argv=None):
    args = parse_args(argv)
    backbone, cfg = load_backbone(args)
    protocol_defaults(args, cfg.arch)
    if args.export:
        export(backbone, cfg.arch, args)
        return
    # Paths come from this script's flags only: a shared checkpoint's out_dir and data are never used for files.
    if not args.data and cfg.data != "synthetic" and not args.random_init:
        fail(f"--data: give the data set to evaluate on (the checkpoint was trained on "
             f"{smog.printable(cfg.data)!r}; paths are taken only from this script's flags)")
    cfg = dataclasses.replace(cfg, data=args.data or "synthetic", out_dir=args.download_dir, workers=args.workers,
                              channels_last=False)
    device = smog.setup_device()
    backbone = backbone.to(device).eval().requires_grad_(False)
    if any(p.requires_grad for p in backbone.parameters()):  # only the classifier is trained
        raise RuntimeError("the backbone still has trainable parameters")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}

    train_data, train_y, _ = smog.load_dataset(cfg, "train")
    test_data, test_y, _ = smog.load_dataset(cfg, "val")
    if test_y is None:
        fail(f"--data {cfg.data}: no val/ split to evaluate on")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x, train_y_all = split_features(backbone, train_data, train_y, cfg, device)
    test_x, test_y = split_features(backbone, test_data, test_y, cfg, device)
    smog.log(f"features: {tuple(train_x.shape)} train, {tuple(test_x.shape)} val, {cfg.arch}, "
             f"{'random init' if args.random_init else args.checkpoint}, processes: {smog.world_size()}")

    # Ours, not the authors': each feature standardised with the training split's statistics (a BatchNorm without
    # affine, as in MAE's probe), so that the same lr suits trained and untrained backbones of small runs, whose
    # feature scales differ by orders of magnitude. The paper's presets keep the authors' raw features.
    standardized = args.standardize == "on" or (args.standardize == "auto" and not cfg.preset.startswith("imagenet"))
    mean, std = (train_x.mean(0), train_x.std(0).clamp(min=1e-6)) if standardized else (0.0, 1.0)
    standardise = lambda f: (f - mean) / std  # noqa: E731
    if args.cache_features:
        history = linear_probe(standardise(train_x), train_y_all, standardise(test_x), test_y, num_classes, args,
                               device)
    else:
        history = augmented_probe(backbone, standardise, train_data, train_y, standardise(test_x), test_y, num_classes,
                                  cfg, args, device)
    after = backbone.state_dict()
    if not all(torch.equal(before[k], after[k]) for k in before):
        raise RuntimeError("a backbone tensor changed during the probe")
    top1, top5 = history[-1]
    best = max(range(len(history)), key=lambda e: history[e][0])
    smog.log(f"linear probe, final epoch {len(history)}: top-1 {top1:.2f}%  top-5 {top5:.2f}%  "
             f"(best epoch {best + 1}: top-1 {history[best][0]:.2f}%, the number the authors' script reports)")
    result = dict(top1=top1, top5=top5, best_top1=history[best][0], best_epoch=best + 1, knn_top1=None,
                  checkpoint=args.checkpoint or "random-init", epochs=args.epochs, standardized=standardized)
    if args.knn:
        tr, te = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
        knn = {k: smog.knn_top1(tr, train_y_all, te, test_y, k=k, t=0.07) for k in (20, 200)}
        smog.log(f"kNN top-1: k=20 {knn[20]:.2f}%  k=200 {knn[200]:.2f}%")
        result.update(knn_top1=knn[20], knn_top1_k200=knn[200])
    smog.log(json.dumps(result))
    if smog.distributed():
        smog.dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
