"""Throughput benchmark of smog.py on the current device; the last line printed is one JSON object.

    python bench.py                        # GPU: ResNet-50, paper recipe, 128 images; CPU: the same paths at tiny sizes
    python bench.py --arch resnet50 --batch-size 128 --steps 30 --out results.json
    python bench.py --precision fp16 --skip c,d     # GPU: the other precision
    python bench.py --acceptance OUT_DIR            # GPU acceptance: speed, then fp16 training runs (see acceptance)

Measures, in one process:
  (a) ceiling   the bare backbone: forward+backward over the online crops, forward over the target crops
  (b) step      the full SMoG training step on device tensors (heads, grouping, loss, optimiser, EMA)
  (c) e2e       end to end from an ImageFolder of generated 500x375 JPEGs through the real DataLoader (workers decode,
                the device cuts every crop), as many workers as cores; the device's augmentation alone; and the
                loader's CPU cost per image on one core: decoding alone, and decoding + cutting six crops with PIL
                (what the workers did before the device cut the crops)
  (bn)          the ResNet-50 encoder with one BN over all crop sizes against a BN per size (smog.bn_over_sizes)
  (d) grouping  MomentumGrouping.update alone (K = 3000, D = 128, 3 heads, N = 4096) against its floor, the
                assignment matmul plus argmax for all heads
and prints img/s for each, (b)/(a), (c)/(b), the share of grouping + loss in (b) at the step's own sizes, and the
peak GPU memory.
"""
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

import smog

fail = functools.partial(smog.fail, prog="bench.py")


def timed(fn, steps, warmup, device):
    """Mean seconds per call of fn over `steps` back-to-back calls after `warmup` calls, as in training: the host
    queues work ahead of the device, and the device is synchronised only before and after."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def fake_crops(cfg, device):
    """Random device tensors shaped like one step's crops: (online global, online local or None, target global,
    target local or None)."""
    b = cfg.batch_size

    def make(n, size):
        return torch.randn(n * b, 3, size, size, device=device) if n else None

    return (make(2, cfg.global_size), make(cfg.num_local, cfg.local_size), make(2, cfg.global_size),
            make(cfg.num_local if cfg.target_local else 0, cfg.local_size))


def bench_ceiling(cfg, device, autocast, steps, warmup):
    """(a) backbone alone: forward+backward on online crops, forward on target crops, one batch per resolution and
    BN statistics per resolution (the step's BN over all sizes is part of (b))."""
    torch.manual_seed(0)
    backbone = smog.BACKBONES[cfg.arch](cfg.drop_path)[0].to(device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    g, loc, t, t_loc = (None if x is None else smog.channels_last(x, cfg) for x in fake_crops(cfg, device))

    def run():
        with autocast:
            with torch.no_grad():
                for x in (t, t_loc):
                    if x is not None:
                        backbone(x)
            out = backbone(g).float().sum() + (backbone(loc).float().sum() if loc is not None else 0)
        out.backward()

    return timed(run, steps, warmup, device)


def bench_step(cfg, device, autocast, scaler, steps, warmup, profile=""):
    """(b) the full training step of smog.py on fixed device tensors; profile: write its top operators there."""
    run = smog.RunState(cfg, device, scaler=scaler)
    crops = smog.Crops(*(None if x is None else smog.channels_last(x, cfg) for x in fake_crops(cfg, device)))

    def step():
        smog.train_step(run.online_ddp, run.target, run.grouping, [crops], run.opt, run.scaler, beta=0.995,
                        autocast=autocast, **run.step_args)

    seconds = timed(step, steps, warmup, device)
    if profile:
        write_profile(step, device, profile, "the full step (b)")
    return seconds


def write_profile(fn, device, path, title):
    """Appends the top operators of 3 calls of fn to the file at path."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(path, "a") as f:
        f.write(f"{title}, 3 calls\n{prof.key_averages().table(sort_by=sort, row_limit=40)}\n")


def bench_augment(cfg, device, steps, warmup, profile=""):
    """The device's whole augmentation of one streamed step: every crop cut from a canvas of 500x375 and 375x500
    uint8 images (as the workers decode them for the recipe: smaller where it needs less), then flips and
    photometric work (smog.batch_multicrop)."""
    b, cap = cfg.batch_size, smog.decode_cap(cfg)
    h, w = (max(1, round(side * min(1, cap / 375, 2 * cap / 500))) for side in (375, 500))
    canvas = torch.randint(0, 256, (b, 3, w, w), dtype=torch.uint8, device=device)
    sizes = torch.tensor([[h, w], [w, h]], device=device).repeat(b // 2 + 1, 1)[:b]
    recipe = smog.crop_recipe(cfg)

    def augment():
        smog.batch_multicrop(canvas, sizes, 0, recipe)
    seconds = timed(augment, steps, warmup, device)
    if profile:
        write_profile(augment, device, profile, "batched augmentation")
    return seconds


def bench_loader_cost(root, seconds=5.0):
    """The loader workers' CPU milliseconds per image of the paper's recipe (2x224 + 4x96 online, as many target
    crops) on one core: (decoding alone, as the workers do now; decoding and cutting those crops with PIL at full
    resolution, as they did before the device cut them)."""
    import PIL.Image
    import torchvision
    cfg = smog.parse_command(["--preset", "imagenet-r50", "--data", root])[0]
    folder = smog.load_dataset(cfg, "train")[0]
    rrc = torchvision.transforms.RandomResizedCrop.get_params

    def decode_and_cut(path):  # the six crops (and the target's local ones) of one image, as uint8 arrays
        with PIL.Image.open(path) as image:
            image = smog.rgb8(image)
        for size, scale, n in ((cfg.global_size, cfg.global_scale, 4),
                               (cfg.local_size, cfg.local_scale, cfg.num_local * (1 + cfg.target_local))):
            for _ in range(n):
                top, left, h, w = rrc(image, scale, smog.ASPECT)
                np.asarray(image.crop((left, top, left + w, top + h)).resize((size, size), PIL.Image.BILINEAR))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ms = []
    for work in (lambda i: folder[i], lambda i: decode_and_cut(folder.samples[i][0])):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            work(done % len(folder))
            done += 1
        ms.append(1000 * (time.perf_counter() - t0) / done)
    torch.set_num_threads(threads)
    return ms


def bench_bn_over_sizes(cfg, device, autocast, reps):
    """The cost of one set of BN statistics for all crop sizes (smog.bn_over_sizes): the ResNet-50 online encoder's
    forward+backward on one step's online crops with every BN over all sizes, over the same with a BN per size.
    Returns (shared seconds, per-size seconds, ratio of medians), the two measured alternately. On a CPU: 2 images of
    2x112 + 4x48 crops on one thread; on a GPU: the config's crops and batch."""
    cpu = device.type == "cpu"
    b, big, small, n_local = (2, 112, 48, 4) if cpu else (cfg.batch_size, cfg.global_size, cfg.local_size,
                                                             cfg.num_local)
    threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    def encoder(shared):  # the ResNet-50 online encoder, its BNs over all sizes or per size
        backbone, dim = smog.BACKBONES["resnet50"](0.0)
        projector, _ = smog.projector_and_predictor(dim, cfg.hidden_dim, cfg.feat_dim)
        over_sizes = smog.resnet_over_sizes if shared else None
        return smog.Encoder(backbone, projector, over_sizes).to(device).to(memory_format=torch.channels_last)
    encoders = {shared: encoder(shared) for shared in (True, False)}
    crops = [torch.randn(2 * b, 3, big, big, device=device), torch.randn(n_local * b, 3, small, small, device=device)]
    crops = [x.contiguous(memory_format=torch.channels_last) for x in crops]

    def run(shared):
        with autocast:
            z = encoders[shared](crops)
        z.float().sum().backward()

    times = {True: [], False: []}
    for rep in range(reps + 1):
        for shared in (True, False) if rep % 2 else (False, True):
            seconds = timed(lambda: run(shared), 1 if cpu else 5, 0, device)
            if rep:  # the first round warms up both
                times[shared].append(seconds)
    torch.set_num_threads(threads)
    shared, per_size = float(np.median(times[True])), float(np.median(times[False]))
    return shared, per_size, shared / per_size


def write_jpegs(root, count, classes=4, size=(500, 375)):
    """An ImageFolder of `count` random-content JPEGs of about ImageNet's size."""
    import PIL.Image
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        small = rng.integers(0, 256, (size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(small).resize(size, PIL.Image.BICUBIC)
        image.save(os.path.join(folder, f"{i}.jpg"), quality=90)


def bench_e2e(cfg, device, autocast, scaler, steps, warmup, root):
    """(c) seconds per step from JPEG files through the DataLoader to the finished step, over epoch boundaries.

    Workers deliver batches in bursts (each prepares a whole batch), so this is the mean over the measured steps,
    after a warm-up long enough for every worker to have delivered once.
    """
    warmup, steps = max(warmup, cfg.workers), max(steps, 3 * cfg.workers)
    cfg = dataclasses.replace(cfg, data=root, accumulate=1, epochs=10**6)  # streamed
    data = smog.TrainData(cfg, device)
    run = smog.RunState(cfg, device, scaler=scaler)
    for step, batch in zip(range(warmup + steps), data.batches(range(cfg.epochs))):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        smog.train_step(run.online_ddp, run.target, run.grouping, [data.crops(batch, step)], run.opt, run.scaler,
                        beta=0.995, autocast=autocast, **run.step_args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_grouping(device, steps, warmup, k=3000, d=128, h=3, n=4096):
    """(d) MomentumGrouping.update against its floor (assignment matmul + argmax), in ms."""
    torch.manual_seed(0)
    grouping = smog.MomentumGrouping(k, d, h).to(device)
    z = torch.nn.functional.normalize(torch.randn(h, n, d, device=device), dim=-1)
    update = timed(lambda: grouping.update(z, 0.99), steps, warmup, device)
    floor = timed(lambda: torch.matmul(z, grouping.centroids.transpose(1, 2)).argmax(-1), steps, warmup, device)
    return update, floor


def bench_grouping_in_step(cfg, device, steps, warmup):
    """Grouping and loss at the step's own sizes (assign, update, logits, loss forward+backward), in seconds per call:
    (wall time of back-to-back calls alone, device kernel time). Alone, these ~50 small kernels are bound by the
    host's launch rate; inside the step the host queues them while the device still runs the backbone, so the
    kernel time (read by the profiler on CUDA) is what they add to the step there."""
    torch.manual_seed(0)
    b, h, d = cfg.batch_size, cfg.num_heads, cfg.feat_dim
    grouping = smog.MomentumGrouping(cfg.num_groups, d, h).to(device)
    zt, z = torch.randn(2 * b, d, device=device), torch.randn(2, b, d, device=device)
    p = torch.randn((2 + cfg.num_local) * b, d, device=device, requires_grad=True)

    def run():
        labels = grouping.assign(zt).view(h, 2, b)
        grouping.update(z.repeat((h + 1) // 2, 1, 1)[:h], 0.99)
        smog.smog_loss(grouping.logits(p, cfg.tau).view(h, -1, b, cfg.num_groups), labels).backward()

    wall = timed(run, steps, warmup, device)
    if device.type != "cuda":
        return wall, wall
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    micros = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    return wall, micros / 1e6 / steps


def parse_args(argv=None):
    """bench.py's flags: GPU defaults are the paper's ResNet-50 at 128 images per step, CPU defaults tiny sizes."""
    cuda = torch.cuda.is_available()
    parser = smog._Parser(prog="bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="imagenet-r50" if cuda else "tiny")
    parser.add_argument("--arch", default=None, help="default: the preset's (resnet50 on GPU)")
    parser.add_argument("--batch-size", type=int, default=128 if cuda else 16, help="images per step")
    parser.add_argument("--steps", type=int, default=20 if cuda else 3)
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])  # smog.py's
    parser.add_argument("--images", type=int, default=0, help="JPEGs to generate for (c); default 4 batches")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: a, b, bn, c, d")
    parser.add_argument("--bn-reps", type=int, default=7, help="(bn): rounds of the two encoders, medians compared")
    parser.add_argument("--out", default="", help="also write the JSON line to this file")
    parser.add_argument("--profile", default="", help="write the top operators of (b) and of the augmentation here")
    parser.add_argument("--acceptance", default="", metavar="OUT_DIR",
                        help="the acceptance run instead: speed (a, b, bn, c) and two training runs of smog.py, "
                             "results in OUT_DIR/acceptance.json and OUT_DIR/summary.txt (see acceptance())")
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "images", "bn_reps"):
        if getattr(args, name) < (0 if name == "images" else 1):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {0 if name == 'images' else 1}")
    if args.warmup < 0 or args.workers < 0:
        fail(f"--warmup {args.warmup} and --workers {args.workers}: must be at least 0")
    if args.arch and args.arch not in smog.BACKBONES:
        fail(f"--arch {args.arch!r} is unknown (choose from {', '.join(smog.BACKBONES)})")
    return args


def measure(args):
    """Runs the parts of the benchmark that args asks for; prints a line per figure and returns them as a dict."""
    cuda = torch.cuda.is_available()

    flags = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--precision", args.precision,
             "--workers", str(args.workers)]
    if args.arch:
        flags += ["--arch", args.arch]
    cfg = smog.parse_command(flags)[0]
    device = smog.setup_device()  # as smog.py picks it (and sets up the CPU allocator as it does)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision, autocast, scaler = smog.resolve_precision(cfg, device)
    skip = set(filter(None, args.skip.split(",")))
    if args.profile:
        open(args.profile, "w").close()  # the parts append their tables
    b = cfg.batch_size
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, arch=cfg.arch,
                  batch_size=b, precision=precision, workers=cfg.workers,
                  crops=f"2x{cfg.global_size}+{cfg.num_local}x{cfg.local_size} online, 2x{cfg.global_size}"
                  + (f"+{cfg.num_local}x{cfg.local_size}" if cfg.target_local and cfg.num_local else "") + " target",
                  num_groups=cfg.num_groups, num_heads=cfg.num_heads)
    print(f"bench: {json.dumps(result)}", flush=True)

    def report(name, seconds):
        result[f"{name}_img_per_s"] = b / seconds
        print(f"({name[0]}) {name:<14} {b / seconds:9.1f} img/s  ({1000 * seconds:.1f} ms/step)", flush=True)

    if "a" not in skip:
        report("a_ceiling", bench_ceiling(cfg, device, autocast, args.steps, args.warmup))
    if "b" not in skip:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        report("b_step", bench_step(cfg, device, autocast, scaler, args.steps, args.warmup, args.profile))
        if cuda:
            result["b_peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if "bn" not in skip:
        shared, per_size, ratio = bench_bn_over_sizes(cfg, device, autocast, args.bn_reps)
        result.update(bn_over_sizes_ms=1000 * shared, bn_per_size_ms=1000 * per_size, bn_over_sizes_ratio=ratio)
        print(f"(b) BN over all crop sizes: ResNet-50 encoder forward+backward {1000 * shared:.1f} ms vs "
              f"{1000 * per_size:.1f} ms with a BN per size, ratio {ratio:.3f}", flush=True)
    if "c" not in skip:
        with tempfile.TemporaryDirectory() as root:
            write_jpegs(root, args.images or 4 * b)
            report("c_e2e", bench_e2e(cfg, device, autocast, scaler, args.steps, args.warmup, root))
            decode, decode_cut = bench_loader_cost(root, seconds=5.0 if cuda else 2.0)
            result.update(c_loader_decode_ms_per_img=decode, c_loader_decode_and_cut_ms_per_img=decode_cut,
                          c_loader_cost_ratio=decode_cut / decode)
            print(f"(c) loader, one core, the paper's crops of 500x375 JPEGs: decoding {decode:.2f} ms an image "
                  f"({os.cpu_count()} cores: "
                  f"{1000 * os.cpu_count() / decode:.0f} img/s); decoding + cutting the crops with PIL in the worker "
                  f"{decode_cut:.2f} ms ({decode_cut / decode:.1f}x)", flush=True)
        aug = bench_augment(cfg, device, args.steps, args.warmup, args.profile)
        result["c_device_aug_ms_per_step"] = 1000 * aug
        print(f"(c) the device's augmentation alone (cutting every crop too): {1000 * aug:.1f} ms/step on "
              f"{device.type}", flush=True)
    if "d" not in skip:
        update, floor = bench_grouping(device, max(args.steps, 5), args.warmup)
        result.update(d_grouping_update_ms=1000 * update, d_grouping_floor_ms=1000 * floor,
                      d_update_over_floor=update / floor)
        print(f"(d) grouping update {1000 * update:.2f} ms, floor (matmul + argmax) {1000 * floor:.2f} ms, "
              f"ratio {update / floor:.2f}", flush=True)
        if "b_step_img_per_s" in result:
            wall, kernels = bench_grouping_in_step(cfg, device, max(args.steps, 5), args.warmup)
            step = b / result["b_step_img_per_s"]
            result.update(d_grouping_loss_share_of_step=kernels / step, d_grouping_loss_alone_wall_share=wall / step)
            print(f"(d) grouping + loss at the step's sizes: {1000 * kernels:.2f} ms of device time, "
                  f"{100 * kernels / step:.1f}% of the step ({1000 * wall:.2f} ms = {100 * wall / step:.1f}% "
                  f"when timed alone, bound by kernel launches)", flush=True)
    if "a_ceiling_img_per_s" in result and "b_step_img_per_s" in result:
        result["b_over_a"] = result["b_step_img_per_s"] / result["a_ceiling_img_per_s"]
    if "c_e2e_img_per_s" in result and "b_step_img_per_s" in result:
        result["c_over_b"] = result["c_e2e_img_per_s"] / result["b_step_img_per_s"]
    if cuda:
        result["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result




# =================================================================================================================
# The acceptance check (--acceptance OUT_DIR): the speed above, then two fp16 training runs of smog.py, checked
# =================================================================================================================

def shapes_folder(root, n, size):
    """root/train: an ImageFolder of n JPEGs of the embedded data set's shapes (smog.synthetic_shapes) at size px."""
    import PIL.Image
    images, labels = smog.synthetic_shapes(n, seed=0, size=size)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, "train", smog.SHAPES[label])
        os.makedirs(folder, exist_ok=True)
        PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def acceptance_runs(cuda, data_root):
    """The two training runs of the acceptance check: (name, smog.py flags, seconds allowed). On a GPU, the default
    run in fp16, and the paper's ResNet-50 recipe for 300 steps of 128 streamed JPEGs; on a CPU, the same commands
    at sizes that check the plumbing in seconds."""
    tiny = ["--preset", "tiny", "--precision", "fp16"]
    r50 = ["--preset", "imagenet-r50", "--precision", "fp16", "--data", data_root,
           "--warmup-epochs", "1", "--no-knn", "--eval-every", "0"]
    if cuda:  # 3200 images: 25 steps of 128 per epoch, 12 epochs
        return [("tiny", tiny, 240), ("r50", r50 + ["--batch-size", "128", "--epochs", "12", "--log-every", "10"], 240)]
    return [("tiny", tiny + ["--synthetic-size", "128", "--batch-size", "32", "--epochs", "1", "--global-size", "16",
                     "--log-every", "2"], 240),  # 16-px crops: CPUs compute fp16 slowly
            ("r50", r50 + ["--arch", "resnet_tiny", "--global-size", "16", "--local-size", "8", "--hidden-dim", "64",
                           "--feat-dim", "32", "--num-groups", "50", "--batch-size", "16", "--epochs", "1",
                           "--log-every", "2", "--workers", "0"], 240)]


def train_and_read(name, flags, limit, out_dir, work_dir):
    """Runs `python smog.py FLAGS` (at most `limit` seconds), keeps its console output and log.jsonl under out_dir,
    and returns what the checks read from them."""
    import subprocess
    run_dir = os.path.join(work_dir, name)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "smog.py"),
                               *flags, "--out-dir", run_dir], capture_output=True, text=True, timeout=limit)
        rc, console = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, console = "timeout", (e.stdout or b"").decode() + (e.stderr or b"").decode()
    seconds = time.perf_counter() - t0
    with open(os.path.join(out_dir, f"{name}.log"), "w") as f:
        f.write(console)
    log_path = os.path.join(run_dir, "log.jsonl")
    records = [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []
    if records:
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    steps = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in steps]
    knn = ([r for r in records if "knn_top1" in r] or [{}])[-1]  # the final report
    rates = [r["img_per_s"] for r in steps[1:]] or [r["img_per_s"] for r in steps]
    waits = [r["data_time"] for r in steps]  # each log interval's share of time spent waiting for the loader
    return dict(command="python smog.py " + " ".join(flags), exit=rc, seconds=round(seconds, 1),
                steps=steps[-1]["step"] if steps else 0, first_loss=losses[0] if losses else None,
                last_loss=losses[-1] if losses else None, finite=bool(losses) and all(map(math.isfinite, losses)),
                skipped_steps=sum(r.get("skipped_steps", 0) for r in steps),
                grad_scale=steps[-1].get("grad_scale") if steps else None,
                img_per_s=float(np.median(rates)) if rates else None,
                data_wait_mean=float(np.mean(waits)) if waits else None, data_wait_max=max(waits, default=None),
                peak_gpu_mem_gib=max((r["gpu_mem_gib"] for r in steps if "gpu_mem_gib" in r), default=None),
                knn_top1=knn.get("knn_top1"),
                console_tail=console.strip().splitlines()[-3:])


def random_init_knn(flags):
    """kNN top-1 of the backbone of a run with these flags at random init (its seed): what its training must beat."""
    cfg, cpu = smog.parse_command(flags)[0], torch.device("cpu")
    torch.manual_seed(cfg.seed)
    backbone = smog.BACKBONES[cfg.arch](0.0)[0]
    (train, train_labels, _), (val, val_labels, _) = (smog.load_dataset(cfg, split) for split in ("train", "val"))
    feats = [smog.extract_features(backbone, images, cfg, cpu) for images in (train, val)]
    return smog.knn_top1(feats[0], train_labels, feats[1], val_labels)


def acceptance(args):
    """The acceptance check of the default GPU path, one command: speed of today's code for --preset imagenet-r50
    (fp16, eager: (a) ceiling, (b) step with its peak memory, BN over crop sizes, (c) JPEG end to end), then two
    training runs of smog.py in fp16 (the default tiny run, kNN against random init; the ResNet-50 recipe for 300
    steps on generated JPEGs: the loss falls, nothing is NaN, skipped steps are counted; how long each run waits for
    its loader is reported). Writes OUT_DIR/acceptance.json (everything), OUT_DIR/summary.txt (what a person reads)
    and each run's console log and log.jsonl; exit status 0 when every check holds. On a GPU it takes about 5
    minutes; on a CPU the same at tiny sizes (the checks that need a real run, falling loss and kNN, are then
    reported but not required)."""
    cuda = torch.cuda.is_available()
    out_dir = args.acceptance
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    args.skip = ",".join(filter(None, [args.skip, "d"]))
    speed = measure(args)
    runs, checks = {}, {}
    with tempfile.TemporaryDirectory() as work:
        data_root = shapes_folder(os.path.join(work, "data"), 3200 if cuda else 64, 96 if cuda else 32)
        for name, flags, limit in acceptance_runs(cuda, data_root):
            print(f"acceptance: training {name}: python smog.py {' '.join(flags)}", flush=True)
            runs[name] = run = train_and_read(name, flags, limit, out_dir, work)
            run["knn_top1_random_init"] = random_init_knn(flags) if name == "tiny" else None
            checks[f"{name}_finished"] = run["exit"] == 0
            checks[f"{name}_loss_finite"] = run["finite"]
            checks[f"{name}_skipped_steps_counted"] = run["grad_scale"] is not None
            falls = run["finite"] and run["last_loss"] < run["first_loss"]
            checks[f"{name}_loss_falls" + ("" if cuda else "_not_required")] = falls
    if "c_over_b" in speed:  # JPEGs streamed at the step's speed: the loader keeps up
        checks["c_over_b_at_least_0.95" + ("" if cuda else "_not_required")] = speed["c_over_b"] >= 0.95
    waits = runs["r50"]["data_wait_max"]  # at most a few percent of any log interval, epoch starts included
    checks["r50_never_waits_on_its_loader" + ("" if cuda else "_not_required")] = waits is not None and waits < 0.05
    tiny = runs["tiny"]
    learned = None not in (tiny["knn_top1"], tiny["knn_top1_random_init"]) and (
        tiny["knn_top1"] > tiny["knn_top1_random_init"] + 20)
    checks["tiny_knn_20_points_over_random_init" + ("" if cuda else "_not_required")] = learned
    required = {k: v for k, v in checks.items() if not k.endswith("_not_required")}
    report = dict(passed=all(required.values()), checks=checks, speed=speed, runs=runs,
                  seconds=round(time.perf_counter() - t0, 1), device=speed["device"], torch=torch.__version__,
                  cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"))
    with open(os.path.join(out_dir, "acceptance.json"), "w") as f:
        json.dump(report, f, indent=1)
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"acceptance {verdict} on {report['device']}, torch {torch.__version__},"
             f" {report['date']}, {report['seconds']:.0f} s"]
    for key in ("a_ceiling_img_per_s", "b_step_img_per_s", "b_over_a", "b_peak_gpu_mem_gib", "bn_over_sizes_ratio",
                "c_e2e_img_per_s", "c_over_b", "c_loader_decode_ms_per_img", "c_loader_decode_and_cut_ms_per_img",
                "c_device_aug_ms_per_step"):
        if key in speed:
            lines.append(f"  {key:<34} {speed[key]:.3f}")
    def show(x, digits=2):
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)

    for name, run in runs.items():
        lines.append(f"  run {name}: exit {run['exit']}, {run['steps']} steps in {run['seconds']:.0f} s, loss "
                     f"{show(run['first_loss'])} -> {show(run['last_loss'])}, skipped {run['skipped_steps']}, scale "
                     f"{show(run['grad_scale'], 0)}, {show(run['img_per_s'], 0)} img/s, waiting for data "
                     f"{show(run['data_wait_mean'])} of a log interval (at most {show(run['data_wait_max'])}), peak "
                     f"GPU memory {show(run['peak_gpu_mem_gib'])} GiB, kNN {show(run['knn_top1'], 1)} vs random init "
                     f"{show(run['knn_top1_random_init'], 1)}")
    lines += [f"  {'info' if name.endswith('_not_required') else 'ok  ' if ok else 'FAIL'} {name}: {ok}"
              for name, ok in checks.items()]
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if report["passed"] else 1


def main(argv=None):
    args = parse_args(argv)
    if args.acceptance:
        return acceptance(args)
    line = json.dumps(measure(args))
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
