"""Tests for smog.py, eval_linear.py, bench.py and launch.sh, in the order of smog.py's sections: Part 1's invariants
(hypothesis) and its training step, Part 1 alone; then the trainer's config, backbones (the authors' BN over sizes
and Swin), data, the batched augmentation against MultiCrop, the crop paths, the run state with save → resume →
continue, faults (preemption, killed and stalled processes, damaged checkpoints, the lock, the NaN guard), two gloo
processes under torchrun, reports and one-line errors; eval_linear.py, bench.py and launch.sh last.

Run: python -m pytest -q   (under 10 minutes on 2 CPU cores)
"""
import copy
import dataclasses
import errno
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import smog

REPO = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("ci")  # the marker `slow` is registered in pytest.ini


# ----- helpers: the configs, runs, crops and processes that many tests build ---------------------------------------

def config_of(argv):
    """The Config of a smog.py command line."""
    return smog.parse_command(list(argv))[0]


def merged(*groups):
    """One command line of flag groups, a later group's flag replacing an earlier one's (smog.py refuses a flag given
    twice)."""
    flags = {}
    for group in groups:
        i = 0
        while i < len(group):
            n = 2 if i + 1 < len(group) and not group[i + 1].startswith("--") else 1  # a flag, and its value
            flags[group[i].replace("--no-", "--")] = group[i:i + n]
            i += n
    return [part for flag in flags.values() for part in flag]


def tiny_cfg(tmp_path, *extra):
    return config_of(merged(["--out-dir", str(tmp_path), "--synthetic-size", "256", "--batch-size", "32",
                             "--num-groups", "10", "--hidden-dim", "32", "--feat-dim", "16", "--epochs", "2",
                             "--num-local", "2", "--log-every", "1"], extra))


def build_nets(cfg):
    return smog.RunState(cfg, torch.device("cpu"))


def whole(images):
    """The sizes (B, 2) of images (B, 3, H, W) that fill their tensor: no padding."""
    return torch.tensor(images.shape[2:]).expand(len(images), 2)


def multicrop(images, step, recipe):
    """smog.batch_multicrop of uint8 images without padding."""
    return smog.batch_multicrop(images, whole(images), step, recipe)


def step_of(run, passes, beta=0.9):
    """train_step on `passes` with the run's hyperparameters."""
    return smog.train_step(run.online_ddp, run.target, run.grouping, passes, run.opt, run.scaler, beta=beta,
                           **run.step_args)


def one_step(cfg, run, step=0):
    images, _ = smog.synthetic_shapes(cfg.batch_size, seed=1)
    return step_of(run, [multicrop(images, step, smog.crop_recipe(cfg))])


SMALL = ["--synthetic-size", "384", "--batch-size", "64", "--num-groups", "12", "--hidden-dim", "64",
         "--feat-dim", "32", "--log-every", "2", "--kmeans-iters", "3", "--warmup-epochs", "1", "--num-local", "1",
         "--eval-every", "0"]


def run_script(script, *args):
    """Runs one of the project's scripts in a fresh interpreter on 2 threads; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})


def run_smog(*args):
    return run_script("smog.py", *args)


def final_state(out_dir):
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)


def run_signalled(sig, out, *flags, at="step 8/"):
    """Runs smog.py FLAGS --out-dir OUT, sends it `sig` when it logs step 8 (or what `at` says); returns (exit status,
    stdout lines, stderr)."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "smog.py"), *flags, "--out-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(at):
            proc.send_signal(sig)
    return proc.wait(timeout=300), lines, proc.stderr.read()


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0]


# ----- Part 1, momentum grouping: MomentumGrouping (assign, update, kmeans_) ---------------------------------------

def grouping_with(seed, k, d, h):
    torch.manual_seed(seed)
    return smog.MomentumGrouping(k, d, h)


shapes = st.tuples(st.integers(1, 12), st.integers(2, 8), st.integers(1, 3), st.integers(1, 40))  # K, D, H, N


def near_tie(x, c, eps=1e-4):
    """(H, N) mask of rows whose two best groups score within eps: argmax may legitimately differ there."""
    top = torch.matmul(F.normalize(x, dim=-1), c.transpose(1, 2)).topk(min(2, c.shape[1]), -1).values
    return (top[..., 0] - top[..., -1] < eps) & (c.shape[1] > 1)


@given(shapes, st.integers(0, 10**6), st.floats(0.0, 1.0))
def test_update_keeps_unit_norm(shape, seed, beta):
    k, d, h, n = shape
    g = grouping_with(seed, k, d, h)
    g.update(torch.randn(n, d), beta)
    assert torch.allclose(g.centroids.norm(dim=-1), torch.ones(h, k), atol=1e-5)


@given(shapes, st.integers(0, 10**6))
def test_kmeans_keeps_unit_norm_and_uses_bank_rows(shape, seed):
    k, d, h, n = shape
    g = grouping_with(seed, k, d, h)
    bank = torch.randn(h, n + k, d)
    g.kmeans_(bank, iters=0, generator=torch.Generator().manual_seed(seed))
    # with no iterations the centroids are normalised rows of the bank
    rows = F.normalize(bank, dim=-1)
    for head in range(h):
        dist_to_rows = (g.centroids[head][:, None] - rows[head][None]).norm(dim=-1).min(1).values
        assert dist_to_rows.max() < 1e-5
    g.kmeans_(bank, iters=3, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(g.centroids.norm(dim=-1), torch.ones(h, k), atol=1e-5)


@given(shapes, st.integers(0, 10**6))
def test_beta_one_leaves_centroids_unchanged(shape, seed):
    k, d, h, n = shape
    g = grouping_with(seed, k, d, h)
    before = g.centroids.clone()
    g.update(torch.randn(n, d), beta=1.0)
    assert torch.allclose(g.centroids, before, atol=1e-6)


@given(shapes, st.integers(0, 10**6), st.floats(0.0, 0.999))
def test_empty_groups_unchanged_and_others_move_toward_mean(shape, seed, beta):
    k, d, h, n = shape
    g = grouping_with(seed, k, d, h)
    before = g.centroids.clone()
    z = torch.randn(h, n, d)
    labels = g.assign(z)
    counts = g.update(z, beta)
    for head in range(h):
        used = torch.bincount(labels[head], minlength=k)
        assert torch.equal(counts[head].long(), used)
        assert torch.equal(g.centroids[head][used == 0], before[head][used == 0])
        for j in used.nonzero().flatten().tolist():
            mean = F.normalize(z[head], dim=-1)[labels[head] == j].mean(0)
            expected = F.normalize(beta * before[head, j] + (1 - beta) * mean, dim=0)
            assert torch.allclose(g.centroids[head, j], expected, atol=1e-5)


@given(shapes, st.integers(0, 10**6), st.floats(0.0, 1.0))
def test_update_independent_of_batch_order(shape, seed, beta):
    k, d, h, n = shape
    g1 = grouping_with(seed, k, d, h)
    g2 = copy.deepcopy(g1)
    z = torch.randn(n, d)
    g1.update(z, beta)
    g2.update(z[torch.randperm(n)], beta)
    assert torch.allclose(g1.centroids, g2.centroids, atol=1e-5)


@given(shapes, st.integers(0, 10**6), st.floats(0.0, 1.0), st.integers(1, 4))
def test_chunk_sums_added_equal_whole_batch(shape, seed, beta, chunks):
    """What the all-reduce does across ranks: every chunk's [sums | counts] added gives the whole batch's update."""
    k, d, h, n = shape
    g = grouping_with(seed, k, d, h)
    whole = copy.deepcopy(g)
    z = torch.randn(n, d)
    parts = z.chunk(chunks)
    buffers = []
    original = smog.all_reduce_
    try:
        smog.all_reduce_ = lambda t: buffers.append(t.clone()) or t  # capture each chunk's local buffer
        for part in parts[1:]:
            copy.deepcopy(g).update(part, beta)
        smog.all_reduce_ = lambda t: t.add_(sum(buffers))  # rank 0 of a simulated all-reduce
        g.update(parts[0], beta)
    finally:
        smog.all_reduce_ = original
    whole.update(z, beta)
    assert torch.allclose(g.centroids, whole.centroids, atol=1e-5)


@given(shapes, st.integers(0, 10**6), st.floats(1e-3, 1e3))
def test_assignment_invariant_to_positive_rescaling(shape, seed, scale):
    k, d, h, n = shape
    g = grouping_with(seed, k, d, h)
    x = torch.randn(n, d)
    same = g.assign(x) == g.assign(x * scale)
    assert (same | near_tie(x, g.centroids)).all()


@given(shapes, st.integers(0, 10**6))
def test_a_kmeans_iteration_never_lowers_the_mean_similarity_to_the_assigned_centroids(shape, seed):
    k, d, h, n = shape
    g = grouping_with(seed, k, d, h)  # any start
    bank = F.normalize(torch.randn(h, n, d, generator=torch.Generator().manual_seed(seed + 1)), dim=-1)

    def similarity():  # mean over the bank of the cosine to its nearest (assigned) centroid, per head
        return torch.matmul(bank, g.centroids.transpose(1, 2)).max(-1).values.mean(-1)
    before = similarity()
    g.update(bank, beta=0.0)  # one iteration: assign, then each group's mean direction
    assert (similarity() >= before - 1e-5).all()


@given(st.integers(1, 12), st.integers(0, 11), st.lists(st.integers(0, 12), max_size=4), st.integers(0, 10**6))
def test_memory_bank_adds_in_any_split_as_in_one_add_also_across_its_end(rows, filled, cuts, seed):
    filled %= rows
    z = torch.randn(2, rows, 3, generator=torch.Generator().manual_seed(seed))  # up to M rows at once
    b = int(torch.randint(1, rows + 1, (1,), generator=torch.Generator().manual_seed(seed)))
    z = z[:, :b]
    whole, parts = smog.MemoryBank(rows, 3, "cpu"), smog.MemoryBank(rows, 3, "cpu")
    for bank in (whole, parts):
        bank.feats.fill_(7.0)
        bank.filled = filled
    whole.add(z)
    edges = [0, *sorted(min(c, b) for c in cuts), b]
    for lo, hi in zip(edges, edges[1:]):
        parts.add(z[:, lo:hi])
    assert torch.equal(whole.feats, parts.feats) and whole.filled == parts.filled == (filled + b) % rows
    written = (filled + torch.arange(b)) % rows  # the rows, in order, that the batch went to
    assert torch.allclose(whole.feats[:, written], F.normalize(z, dim=-1))


def test_assign_matches_cosine_argmax_and_chunks():
    g = grouping_with(0, 50, 16, 3)
    x = torch.randn(1000, 16) * torch.rand(1000, 1) * 10
    cos = F.cosine_similarity(x[None, :, None, :], g.centroids[:, None, :, :], dim=-1)  # (H, N, K)
    assert torch.equal(g.assign(x), cos.argmax(-1)) or (
        (g.assign(x) == cos.argmax(-1)) | near_tie(x, g.centroids)).all()
    assert torch.equal(g.assign(x, chunk=7), g.assign(x))


# ----- Part 1, the epoch start: fill_bank --------------------------------------------------------------------------

def test_the_initial_bank_forwards_each_online_global_crop_alone(tmp_path):
    cfg = tiny_cfg(tmp_path)
    run = build_nets(cfg)
    data = smog.TrainData(cfg, torch.device("cpu"))
    bank = smog.MemoryBank(data.epoch_images, cfg.feat_dim, "cpu")
    sizes, forward, predicted = [], run.online.encoder.forward, []
    run.online.encoder.forward = lambda crops: sizes.append([len(x) for x in crops]) or forward(crops)
    run.online.predictor.register_forward_hook(lambda module, args, out: predicted.append(len(out)))
    smog.fill_bank(run.online, bank, data.global_crops())
    assert sizes == [[cfg.batch_size]] * (2 * len(data.sampler) // cfg.batch_size)  # its BN sees B images, not 2B
    assert predicted == [cfg.batch_size] * len(sizes)  # the predictor runs too, as in the authors' init_memory
    assert bank.filled == 0 and torch.allclose(bank.feats.norm(dim=-1), torch.ones(2, bank.feats.shape[1]))


# ----- Part 1, the loss --------------------------------------------------------------------------------------------

@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(2, 9), st.integers(0, 10**6))
def test_loss_is_the_mean_of_every_cross_entropy_term(h, c_online, b, k, seed):
    torch.manual_seed(seed)
    logits, labels = 3 * torch.randn(h, c_online, b, k), torch.randint(k, (h, 2, b))
    terms = [-F.log_softmax(logits[i, j, n], -1)[labels[i, t, n]]  # head i, target crop t, online crop j, image n
             for i in range(h) for t in range(2) for j in range(c_online) for n in range(b)]
    assert smog.smog_loss(logits, labels).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 8), st.integers(2, 50), st.floats(-5, 5))
def test_loss_is_log_k_when_logits_equal(h, c_online, b, k, value):
    logits = torch.full((h, c_online, b, k), value)
    labels = torch.randint(k, (h, 2, b))
    assert math.isclose(smog.smog_loss(logits, labels).item(), math.log(k), rel_tol=1e-5)


@given(st.integers(0, 10**6), st.integers(2, 30))
def test_loss_finite_and_decreases_as_p_moves_to_its_group(seed, k):
    g = grouping_with(seed, k, 8, 2)
    torch.manual_seed(seed)
    labels = torch.randint(k, (2, 1, 1))
    label_centroid = g.centroids[0, labels[0, 0, 0]]
    labels[1] = g.assign(label_centroid[None])[1]  # the same point's label for the second head
    start = torch.randn(8)
    losses = []
    for t in torch.linspace(0, 1, 6):
        p = ((1 - t) * F.normalize(start, dim=0) + t * label_centroid)[None]
        losses.append(smog.smog_loss(g.logits(p, 0.1).view(2, 1, 1, k), labels).item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    # at p = c_y the label's logit 1/τ is each head's largest: every term of the softmax ≤ 1, so the loss < log K
    assert losses[-1] < math.log(k)


def test_loss_huge_features_stay_finite():
    g = grouping_with(0, 20, 8, 3)
    p = torch.randn(4, 8) * 1e30
    assert torch.isfinite(smog.smog_loss(g.logits(p, 0.1).view(3, 1, 4, 20), torch.zeros(3, 2, 4, dtype=torch.long)))


# ----- Part 1, optimisation: LARS, parameter groups, schedules -----------------------------------------------------

def test_lars_trust_ratio_and_exclusions():
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))
    b = torch.nn.Parameter(torch.ones(4))
    opt = smog.LARS([dict(params=[w]), dict(params=[b], weight_decay=0.0, lars=False)], lr=1.0, momentum=0.0,
                    weight_decay=0.1, eta=0.001)
    w.grad, b.grad = torch.full((4, 4), 0.5), torch.full((4,), 0.5)
    opt.step()
    trust = 0.001 * 8.0 / (2.0 + 0.1 * 8.0 + 1e-8)  # ‖w‖ = 8, ‖g‖ = 2
    assert torch.allclose(w, torch.full((4, 4), 2.0 - trust * (0.5 + 0.1 * 2.0)))
    assert torch.allclose(b, torch.full((4,), 0.5))
    w.grad = torch.zeros(4, 4)  # a zero gradient: LARC leaves it alone, so no decay either
    before = w.clone()
    opt.step()
    assert torch.equal(w, before)


def lars_pair(side):
    """(w, b, LARS): a (side, side) weight in a LARS group and a (side,) bias in a plain-SGD group, momentum 0.9."""
    w, b = torch.nn.Parameter(torch.full((side, side), 2.0)), torch.nn.Parameter(torch.ones(side))
    opt = smog.LARS([dict(params=[w]), dict(params=[b], weight_decay=0.0, lars=False)], lr=1.0, momentum=0.9,
                    weight_decay=0.1, eta=0.001)
    return w, b, opt


def test_lars_under_grad_scaler_unscales_and_skips_overflow():
    w0, b0, plain = lars_pair(4)
    w1, b1, scaled = lars_pair(4)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert scaled._step_supports_amp_scaling  # GradScaler hands over tensors instead of reading the flag on the host
    for i in range(2):
        for p in (w0, b0):
            p.grad = torch.full_like(p, 0.5 + i)
        plain.step()
        for p in (w1, b1):  # what backward of scaler.scale(loss) gives
            p.grad = scaler.scale(torch.full_like(p, 0.5 + i))
        scaler.unscale_(scaled)  # as train_step: LARS sees true gradients
        scaler.step(scaled)
        scaler.update()
    assert torch.allclose(w0, w1, atol=1e-6) and torch.allclose(b0, b1, atol=1e-6)
    assert not torch.equal(w0, torch.full_like(w0, 2.0))  # the steps moved the weights
    before = [t.clone() for t in (w1, b1, scaled.state[w1]["momentum_buffer"], scaled.state[b1]["momentum_buffer"])]
    w1.grad, b1.grad = torch.full_like(w1, float("inf")), scaler.scale(torch.full_like(b1, 0.5))
    scaler.unscale_(scaled)
    scaler.step(scaled)
    scaler.update()
    after = (w1, b1, scaled.state[w1]["momentum_buffer"], scaled.state[b1]["momentum_buffer"])
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # an overflow step changes nothing
    assert scaler.get_scale() == 512.0


def test_lars_first_step_skipped_by_grad_scaler_then_a_normal_one_equals_one_clean_step():
    # torch's fused SGD would create its momentum buffers uninitialised on a first step that the scaler skips; memory
    # freed just before is filled with garbage so that such a buffer would hold it.
    def fill_freed_memory():
        for _ in range(4):
            del_me = torch.full((1 << 16,), 1e30)
            del del_me

    w0, b0, clean = lars_pair(64)
    w0.grad, b0.grad = torch.full_like(w0, 0.5), torch.full_like(b0, 0.5)
    clean.step()
    w1, b1, opt = lars_pair(64)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for grad in (float("inf"), 0.5):  # the first step overflows and is skipped, the second is an ordinary one
        fill_freed_memory()
        w1.grad, b1.grad = scaler.scale(torch.full_like(w1, grad)), scaler.scale(torch.full_like(b1, grad))
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 15  # the first step was skipped
    assert torch.allclose(w0, w1, atol=1e-6, rtol=0) and torch.allclose(b0, b1, atol=1e-6, rtol=0)
    assert not torch.equal(w0, torch.full_like(w0, 2.0)) and not torch.equal(b0, torch.ones_like(b0))


@pytest.mark.parametrize("preset", ["imagenet-r50", "imagenet-r50w2"])
def test_paper_resnet_recipes_give_every_parameter_weight_decay_and_a_trust_ratio(preset):
    cfg = config_of(["--preset", preset, "--num-groups", "8"])
    with torch.device("meta"):
        online = smog.make_online(cfg)
        opt = smog.make_optimizer(cfg, online)
    assert isinstance(opt, smog.LARS) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["lars"] and group["lars_weight_decay"] == 1e-6 and group["eta"] == 0.001
    assert {id(p) for p in group["params"]} == {id(p) for p in online.parameters()}  # biases and BN included
    assert any(p.ndim == 1 for p in group["params"])


def test_swin_recipe_spares_biases_norms_and_position_tables():
    cfg = config_of(["--preset", "imagenet-swin-t", "--num-groups", "8"])
    with torch.device("meta"):
        online = smog.make_online(cfg)
        opt = smog.make_optimizer(cfg, online)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in online.named_parameters():
        spared = p.ndim <= 1 or name.endswith("relative_position_bias_table")
        assert decay[id(p)] == (0.0 if spared else 0.05), name
    assert any(name.endswith("relative_position_bias_table") for name, _ in online.named_parameters())


def test_adamw_recipe_decays_only_matrices_and_clips(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "--optimizer", "adamw", "--weight-decay", "0.05", "--clip-grad", "3.0", "--lr", "1e-3",
                   "--exclude-1d")
    run = build_nets(cfg)
    assert isinstance(run.opt, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in run.opt.param_groups for p in g["params"]}
    assert all(decay[id(p)] == (0.05 if p.ndim > 1 else 0.0) for p in run.online.parameters())
    clipped, original = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: clipped.append(max_norm) or original(params, max_norm))
    before = [p.clone() for p in run.online.parameters()]
    loss, _, _, _ = one_step(cfg, run)
    assert torch.isfinite(loss) and clipped == [3.0]
    assert all(not torch.equal(a, b) for a, b in zip(before, run.online.parameters()))


def test_schedules():
    lr = functools.partial(smog.lr_at, total_steps=100, warmup_steps=10, peak=0.3, start=0.01, final=0.001)
    assert lr(0) == pytest.approx(0.01) and lr(5) == pytest.approx(0.01 + 0.29 * 5 / 9)
    assert lr(9) == lr(10) == pytest.approx(0.3)  # np.linspace's end
    assert lr(55) == pytest.approx(0.001 + 0.5 * 0.299 * (1 + math.cos(math.pi * 0.5)))
    assert lr(100) == lr(150) == pytest.approx(0.001)  # at its end from the last step on: no second cosine
    # β as the authors' C_momentum, lowered by (1 - 0.99) / steps before each use: below 1 from the first step
    assert smog.beta_at(0, 100, 1.0, 0.99) == pytest.approx(1 - 0.01 / 100)
    assert smog.beta_at(99, 100, 1.0, 0.99) == smog.beta_at(150, 100, 1.0, 0.99) == pytest.approx(0.99)


# ----- Part 1, one training step, and Part 1 alone -----------------------------------------------------------------

def test_gradient_reaches_only_online_branch(tmp_path):
    cfg = tiny_cfg(tmp_path)
    run = build_nets(cfg)
    grads = {}
    original_step = run.opt.step
    run.opt.step = lambda: grads.update({n: p.grad for n, p in run.online.named_parameters()}) or original_step()
    one_step(cfg, run)
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads.values())
    assert any(gr.abs().sum() > 0 for n, gr in grads.items() if n.startswith("encoder.backbone"))
    assert all(p.grad is None for p in run.target.parameters())
    assert not run.grouping.centroids.requires_grad and run.grouping.centroids.grad is None
    assert not any(True for _ in run.grouping.parameters())


def test_step_changes_online_and_moves_target_by_ema(tmp_path):
    cfg = tiny_cfg(tmp_path, "--ema", "0.9")
    run = build_nets(cfg)
    run.target.load_state_dict(run.online.encoder.state_dict())
    for p in run.target.parameters():  # a target different from the online weights, so the EMA is visible
        p.add_(0.01 * torch.randn_like(p))
    online_before = [p.clone() for p in run.online.encoder.parameters()]
    target_before = [p.clone() for p in run.target.parameters()]
    centroids_before = run.grouping.centroids.clone()
    loss, counts, _, _ = one_step(cfg, run)
    assert torch.isfinite(loss)
    online_after = list(run.online.encoder.parameters())
    changed = sum(not torch.equal(a, b) for a, b in zip(online_before, online_after))
    assert changed == len(online_before)  # every weight of the encoder receives an update
    # The EMA runs at the step's start, as in the authors' forward: it blends in the online weights from before the
    # update.
    for t0, o0, t1 in zip(target_before, online_before, run.target.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * o0, atol=1e-6, rtol=0)
    assert not torch.equal(run.grouping.centroids, centroids_before)
    assert counts.sum().item() == cfg.num_heads * cfg.batch_size


def test_accumulated_passes_equal_a_reference_loop(tmp_path):
    # Two passes of 32 images: each labelled by the target with the groups as they were, one group update with both
    # passes' z before the second pass's loss (the first pass's loss saw the groups before it), the gradients
    # averaged, one LARS step; one EMA first. The reference builds one graph of both passes and backpropagates once.
    cfg = tiny_cfg(tmp_path, "--accumulate", "2", "--ema", "0.9")
    run, ref = build_nets(cfg), build_nets(cfg)
    with torch.no_grad():  # a target unlike the online network, as after a step: the EMA first moves it
        for p in [*run.target.parameters(), *ref.target.parameters()]:
            p.mul_(0.5)
    images, _ = smog.synthetic_shapes(64, seed=3)
    passes = []
    for i in range(2):
        torch.manual_seed(i)
        passes.append(multicrop(images[32 * i:32 * (i + 1)], i, smog.crop_recipe(cfg)))
    loss, counts, z_global, _ = step_of(run, iter(passes))
    h, k, b = cfg.num_heads, cfg.num_groups, 32
    smog.ema_(ref.target, ref.online.encoder, 0.9)
    losses, zs = [], []
    for i, crops in enumerate(passes):
        with torch.no_grad():
            zt = ref.target([crops.target_global, crops.target_local])[:2 * b]
            labels = ref.grouping.assign(zt).view(h, 2, b)
        z, p = ref.online([crops.online_global, crops.online_local])
        zs.append(z[:2 * b].detach().view(2, b, -1))
        if i == 1:
            ref.grouping.update(torch.cat(zs, 1).repeat(2, 1, 1)[:h], 0.9)
        c = ref.grouping.centroids.clone()  # as they are for this pass's loss (the update works in place)
        logits = torch.matmul(torch.nn.functional.normalize(p, dim=-1), c.transpose(1, 2)) / cfg.tau
        losses.append(smog.smog_loss(logits.view(h, -1, b, k), labels))
    ref.opt.zero_grad()
    (sum(losses) / 2).backward()
    ref.opt.step()
    assert loss.item() == pytest.approx(sum(losses).item() / 2, abs=1e-6)
    assert counts.sum().item() == h * 64 and z_global.shape == (2, 64, cfg.feat_dim)
    assert torch.allclose(run.grouping.centroids, ref.grouping.centroids, atol=1e-6)
    for a, r in zip([*run.online.parameters(), *run.target.parameters()],
                    [*ref.online.parameters(), *ref.target.parameters()]):
        assert torch.allclose(a, r, atol=1e-6)
    with pytest.raises(ValueError, match="1 forward passes"):  # a step needs exactly --accumulate passes
        step_of(run, passes[:1])


def test_target_forwards_its_local_crops_and_labels_come_from_its_global_crops(tmp_path):
    cfg = tiny_cfg(tmp_path)
    assert cfg.target_local and cfg.num_local == 2
    run, seen = build_nets(cfg), {}
    forward, assign = run.target.forward, run.grouping.assign
    run.target.forward = lambda crops: seen.setdefault("target", [c.shape for c in crops]) and forward(crops)
    run.grouping.assign = lambda x: seen.setdefault("assign", x.shape) and assign(x)
    one_step(cfg, run)
    b = cfg.batch_size
    assert seen["target"] == [(2 * b, 3, 32, 32), (2 * b, 3, 16, 16)]  # 2 global and num_local local crops
    assert seen["assign"] == (2 * b, cfg.feat_dim)  # labels: the 2 global crops only


ADAMW = ("--optimizer", "adamw", "--lr", "0.02", "--start-lr", "1e-4", "--final-lr", "1e-4", "--weight-decay", "0.05",
         "--clip-grad", "3")


@pytest.mark.parametrize("recipe", [(), ADAMW], ids=["lars", "adamw"])
@pytest.mark.slow
def test_fp16_with_grad_scaler_and_bf16_train_like_fp32(recipe, tmp_path):
    # The tiny preset on 128 embedded images for 3 epochs (12 steps of 32), on 16-px crops (CPU fp16 is slow): the
    # CUDA default (fp16 autocast, a GradScaler that skips its first overflowing steps) runs the same code on the CPU.
    losses, skipped = {}, {}
    for precision in ("fp32", "fp16", "bf16"):
        out = tmp_path / precision
        smog.main(["--synthetic-size", "128", "--batch-size", "32", "--epochs", "3", "--global-size", "16",
                   "--log-every", "2", "--eval-every", "0", "--no-knn", "--precision", precision, "--out-dir", str(out),
                   *recipe])
        records = [json.loads(line) for line in open(out / "log.jsonl")]
        losses[precision] = [r["loss"] for r in records]
        skipped[precision] = sum(r["skipped_steps"] for r in records)
        assert all(math.isfinite(v) for v in losses[precision]) and len(losses[precision]) == 6
    assert skipped["fp16"] >= 1 and skipped["fp32"] == skipped["bf16"] == 0  # the scaler found its scale
    end = {p: np.mean(v[-2:]) for p, v in losses.items()}  # the last two log intervals
    for precision, v in losses.items():
        assert end[precision] < v[0] - 0.3, (precision, v)  # the loss falls (measured: by 0.7-1.0 from 6.8)
    # Stated tolerance: the reduced-precision runs end within 0.6 nats of fp32 (measured: 0.05-0.09).
    assert abs(end["fp16"] - end["fp32"]) < 0.6 and abs(end["bf16"] - end["fp32"]) < 0.6, end


def test_part_1_alone_trains_a_small_network():
    # Part 1 of smog.py, run on its own (torch and torchvision only, nothing of Part 2), trains a few steps: the
    # recipe's crops, the initial bank, k-means, LARS with its parameter groups, the schedules, train_step.
    source = open(os.path.join(REPO, "smog.py")).read()
    part1 = source[:source.index("# Part 2 — Trainer")]
    code = "\n".join(line.split("#")[0] for line in part1.splitlines())  # its code, not its comments
    assert not re.search(r"swin|invert|numpy|np\.", code, re.I)  # the method only: no backbone or data specifics
    ns = {"__name__": "part1"}
    exec(compile(part1, "smog.py (Part 1)", "exec"), ns)
    import PIL.Image
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(16)]
    recipe = ns["CropRecipe"](global_size=16, local_size=8, num_local=1, blur_sigma=(0.1, 0.5))
    multicrop = ns["MultiCrop"](recipe)

    def crops(step, batch):  # per-image MultiCrop, stacked crop-major
        return ns["stack_crops"]([multicrop(image, step) for image in batch])

    import torchvision
    backbone = torchvision.models.resnet18()  # any backbone (N, 3, s, s) -> (N, dim): torchvision's, unchanged
    backbone.fc = torch.nn.Identity()
    online = ns["OnlineNet"](backbone, *ns["projector_and_predictor"](512, hidden_dim=32, feat_dim=16))
    target = ns["target_of"](online)
    grouping, bank = ns["MomentumGrouping"](6, 16, num_heads=3), ns["MemoryBank"](16, 16, "cpu")
    ns["fill_bank"](online, bank, (crops(0, images[i:i + 8]).online_global for i in (0, 8)))
    ns["start_epoch"](grouping, bank, online, target, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bank.feats.norm(dim=-1).round(), torch.ones(2, 16))
    opt = ns["LARS"](ns["parameter_groups"]([online]), lr=0.1, weight_decay=1e-6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    weights, centroids, losses = copy.deepcopy(online.state_dict()), grouping.centroids.clone(), []
    for step in range(4):
        for group in opt.param_groups:
            group["lr"] = ns["lr_at"](step, 4, 1, peak=0.1, start=0.01, final=0.001)
        loss, counts, z, skipped = ns["train_step"](online, target, grouping, [crops(step, images[:8])], opt, scaler,
                                                    beta=ns["beta_at"](step, 4), tau=0.1, ema=0.99)
        bank.add(z)
        losses.append(loss.item())
        assert counts.sum().item() == 3 * 8 and z.shape == (2, 8, 16) and not skipped
    assert all(math.isfinite(x) for x in losses)
    assert not torch.equal(grouping.centroids, centroids)  # the groups moved with the network
    assert all(not torch.equal(v, online.state_dict()[k]) for k, v in weights.items() if v.is_floating_point())


# ----- Part 2, config ----------------------------------------------------------------------------------------------

def test_flags_override_preset():
    cfg = config_of(["--preset", "imagenet-r50", "--batch-size", "32"])
    assert cfg.batch_size == 32 and cfg.arch == "resnet50" and cfg.num_groups == 3000 and cfg.global_size == 224
    tiny = config_of([])
    assert tiny.preset == "tiny" and tiny.data == "synthetic"


R50_RECIPE = dict(epochs=400, global_size=224, global_scale=(0.2, 1.0), local_size=96, local_scale=(0.05, 0.2),
                  num_local=4, feat_dim=128, hidden_dim=2048, ema=0.999, num_groups=3000, num_heads=3, tau=0.1,
                  beta_start=1.0, beta_end=0.99, kmeans_iters=10, optimizer="lars", lr=0.3, start_lr=0.01,
                  final_lr=0.0048, warmup_epochs=10, weight_decay=1e-6, momentum=0.9, lars_eta=0.001, clip_grad=0.0,
                  drop_path=0.0, blur_sigma=(0.1, 2.0), invert=0.0, exclude_1d=False)


# The authors' Swin-T recipe: AdamW 1e-3 at batch 4096 (per 256: 1e-3 / 16), warm-up from 4e-5, cosine to 4e-5,
# 10 warm-up epochs, wd 0.05 except biases, 1-D parameters and position tables, clip 3.0, D = 256.
SWIN_RECIPE = {**R50_RECIPE, **dict(optimizer="adamw", lr=1e-3 / 16, start_lr=4e-5, final_lr=4e-5, weight_decay=0.05,
                                    clip_grad=3.0, feat_dim=256, exclude_1d=True)}


@pytest.mark.parametrize("preset, expected, published", [
    ("imagenet-r50", dict(R50_RECIPE, arch="resnet50"), 25.6),
    ("imagenet-r50w2", dict(R50_RECIPE, arch="resnet50w2"), 94.0),
    ("imagenet-swin-t", dict(SWIN_RECIPE, arch="swin_t_bn", drop_path=0.2, target_local=False),
     28.0),
    ("cifar10-r18", dict(arch="resnet18_cifar", data="cifar10", global_size=32), 11.7),
])
def test_presets_print_the_spec_config_and_build_the_published_backbones(preset, expected, published, capsys):
    smog.main(["--preset", preset, "--print-config"])
    config = json.loads(capsys.readouterr().out)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in expected} == expected
    with torch.device("meta"):  # nothing allocated
        backbone, dim = smog.BACKBONES[config["arch"]](0.0)
    # ResNet-50w2's 94M (SwAV) counts no classifier; the others are quoted with their 1000-class classifier.
    millions = (sum(p.numel() for p in backbone.parameters()) + (0 if preset == "imagenet-r50w2" else
                                                                 (dim + 1) * 1000)) / 1e6
    assert abs(millions - published) <= 0.02 * published


@pytest.mark.parametrize("argv, flag", [
    (["--arch", "resnet9000"], "--arch"), (["--preset", "huge"], "--preset"), (["--batch-size", "x"], "--batch-size"),
    (["--global-scale", "0.5"], "--global-scale"), (["--tau", "0"], "--tau"), (["--invert", "1.5"], "--invert"),
    (["--no-such-flag"], "--no-such-flag"),
    # each numeric flag against its real range: finite, positive or non-negative, the seed within 64 bits
    (["--tau", "inf"], "--tau"), (["--momentum", "nan"], "--momentum"), (["--lars-eta", "-1"], "--lars-eta"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--start-lr", "-5"], "--start-lr"),
    (["--clip-grad", "-3"], "--clip-grad"), (["--seed", str(10**23)], "--seed"), (["--seed", "1e23"], "--seed"),
    (["--blur-sigma", "inf,inf"], "--blur-sigma"), (["--synthetic-size", str(10**9)], "--synthetic-size"),
    (["--precision", "fp8"], "--precision"), (["--workers", "-1"], "--workers"),
])
def test_bad_flags_name_the_flag(argv, flag):
    with pytest.raises(SystemExit) as e:
        config_of(argv)
    assert re.match(f"smog.py: error: (unrecognized arguments: )?{flag}", str(e.value)) and "\n" not in str(e.value)


def test_help_describes_every_flag_with_its_default_and_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        smog.parse_command(["--help"])
    text = " ".join(capsys.readouterr().out.split("show this help message and exit")[1].split())  # lines joined
    for f in dataclasses.fields(smog.Config):  # "--flag METAVAR what it does (default X" or "--flag, --no-flag ..."
        described = re.search(re.escape(smog._flag(f.name)) + r"(?: [A-Z,]+|, --no-\S+) (\S.*?)\(default ([^;)]+)",
                              text)
        assert described and len(described[1]) > 10, f.name
        assert described[2] == smog._shown(f.default), f.name
    for name, (about, _) in smog.PRESETS.items():
        assert f"{name} {about}" in text
    cfg = config_of(["--workers", "auto", "--precision", "auto", "--resume", "auto"])
    assert cfg.precision is None and cfg.resume is None and cfg.workers >= 1  # auto: None, resolved where it can be
    assert json.loads(smog.config_text(cfg))["precision"] == "auto"  # shown as --help shows it


# ----- Part 2, backbones: BN over crop sizes, Swin, every arch -----------------------------------------------------

@given(st.lists(st.tuples(st.integers(1, 3), st.integers(2, 5)), min_size=1, max_size=3), st.integers(0, 10**6),
       st.booleans())
def test_bn_over_sizes_normalises_with_the_statistics_of_every_pixel_of_every_crop(shapes, seed, nhwc):
    torch.manual_seed(seed)
    layout = torch.channels_last if nhwc else torch.contiguous_format
    xs = [(torch.randn(n, 4, s, s) * (1 + i) + i).contiguous(memory_format=layout).requires_grad_()
          for i, (n, s) in enumerate(shapes)]  # (N_i, C, s_i, s_i)
    bn = torch.nn.BatchNorm2d(4)
    torch.nn.init.uniform_(bn.weight, 0.5, 2.0)
    out = smog.bn_over_sizes(bn, xs)
    pixels = torch.cat([x.transpose(0, 1).reshape(4, -1) for x in xs], 1)  # (C, Σ N·H·W)
    mean, var = pixels.mean(1).view(1, 4, 1, 1), pixels.var(1, unbiased=False).view(1, 4, 1, 1)
    expected = [(x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, 4, 1, 1) for x in xs]
    for x, o, e in zip(xs, out, expected):
        assert o.shape == x.shape and o.is_contiguous(memory_format=layout)  # in the layout the crop came in
        assert torch.allclose(o, e, atol=1e-4)
    assert bn.num_batches_tracked.item() == 1 and torch.allclose(bn.running_mean, 0.1 * mean.flatten(), atol=1e-5)
    n = pixels.shape[1]
    unbiased = pixels.var(1, unbiased=n > 1) if n > 1 else torch.zeros(4)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * unbiased, atol=1e-4)
    # Gradients through the shared statistics, against autograd through the explicit formula.
    weights = [torch.randn_like(x) for x in xs]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), xs)
    want = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), xs)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, want))


@pytest.mark.parametrize("arch", ["resnet_tiny", "resnet18_cifar", "resnet50"])
def test_resnet_over_sizes_is_torchvisions_forward_with_bn_shared_by_sizes(arch):
    torch.manual_seed(0)
    net = smog.BACKBONES[arch](0.0)[0]
    xs = [torch.randn(2, 3, 64, 64), torch.randn(3, 3, 32, 32)]
    with torch.no_grad():
        net.eval()  # running statistics: every crop alone must give the plain forward's features
        for got, x in zip(smog.resnet_over_sizes(net, xs), xs):
            assert torch.allclose(got.flatten(1), net(x), atol=1e-4)
        net.train()  # one crop size: the plain forward of that batch
        assert torch.allclose(smog.resnet_over_sizes(net, xs[:1])[0].flatten(1), net(xs[0]), atol=1e-4)
    cfg = config_of(["--arch", arch, "--hidden-dim", "32", "--feat-dim", "16"])
    encoder = smog.make_online(cfg).encoder
    assert encoder.backbone_over_sizes is smog.resnet_over_sizes
    encoder(xs)  # statistics move once per forward, per size only in the downsample shortcuts
    for name, m in encoder.backbone.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.num_batches_tracked.item() == (2 if "downsample" in name else 1), name


def swin_cfg():
    return config_of(["--preset", "imagenet-swin-t", "--global-size", "64", "--local-size", "32",
                              "--num-local", "1", "--batch-size", "4", "--num-groups", "8", "--hidden-dim", "32",
                              "--feat-dim", "16"])


def test_swin_update_and_bank_see_the_online_z_without_drop_path():
    cfg = swin_cfg()
    assert cfg.drop_path == 0.2 and cfg.arch == "swin_t_bn"
    run = build_nets(cfg)
    assert smog.stochastic_depth(run.online) and not smog.stochastic_depth(run.target)  # the target has none
    crops = multicrop(smog.synthetic_shapes(4, seed=1)[0], 0, smog.crop_recipe(cfg))
    before = copy.deepcopy(run.online)
    for m in smog.stochastic_depth(before):
        m.eval()
    expected = before.encoder([crops[0]]).detach()  # (2B, D), weights before the step, without drop-path
    _, _, z_global, _ = step_of(run, [crops])
    assert torch.allclose(z_global.flatten(0, 1), expected, atol=1e-5)
    for m in smog.stochastic_depth(before):
        m.train()
    torch.manual_seed(1)
    assert not torch.allclose(before.encoder([crops[0]]), expected, atol=1e-3)  # drop-path on: another z
    # The initial bank, through the same forward (the authors' init_memory runs without drop-path): the same z twice.
    banks = []
    for _ in range(2):
        bank = smog.MemoryBank(4, cfg.feat_dim, "cpu")
        smog.fill_bank(run.online, bank, [crops[0]])
        banks.append(bank.feats)
    assert torch.equal(banks[0], banks[1])


def test_swin_block_and_mlps_are_the_authors():
    torch.manual_seed(0)
    backbone = smog.BACKBONES["swin_t_bn"](0.0)[0]
    block = backbone.features[1][0]
    assert isinstance(block, smog.SwinBlockBN) and isinstance(block.norm2, torch.nn.BatchNorm1d)
    torch.nn.init.zeros_(block.mlp[-2].weight), torch.nn.init.zeros_(block.mlp[-2].bias)  # MLP out: 0
    x = torch.randn(2, 8, 8, 96)
    after_attention = x + block.attn(block.norm1(x))
    normalised = block.norm2(after_attention.flatten(0, 2)).view_as(x)  # the residual is the normalised tensor
    assert torch.allclose(block(x), normalised, atol=1e-5)
    online = smog.make_online(dataclasses.replace(swin_cfg(), drop_path=0.0))  # deterministic forwards
    assert isinstance(online.encoder.projector[2], torch.nn.GELU)
    assert online.encoder.mlp_per_size
    assert isinstance(online.predictor[2], torch.nn.ReLU)  # the authors' Swin predictor: ReLU, projector: GELU
    for mlp in (online.encoder.projector, online.predictor):
        assert abs(mlp[0].weight.std().item() - 0.02) < 0.002  # trunc-normal(0.02), bias 0
        assert not mlp[0].bias.any() and not mlp[3].bias.any()
    crops = [torch.randn(4, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    z, p = online(crops)
    alone = online.encoder.projector(online.encoder.backbone(crops[1]))  # the MLPs run per crop size
    assert z.shape == p.shape == (6, 16) and torch.allclose(z[4:], alone, atol=1e-5)


TORCHVISION_TWINS = {  # arch -> (torchvision model with the same backbone keys, keys that only it has)
    "resnet50": (lambda tv: tv.models.resnet50(), {"fc.weight", "fc.bias"}),
    "resnet50w2": (None, set()),  # no torchvision twin: compared with smog.py's own builder
    "swin_t_bn": (None, set()),
}


@pytest.mark.parametrize("arch", list(TORCHVISION_TWINS))
@pytest.mark.slow
def test_backbone_trains_a_step_at_both_crop_sizes_reloads_and_exports(arch, tmp_path, capsys):
    import torchvision
    cfg = config_of(["--arch", arch, "--global-size", "64", "--local-size", "32", "--num-local", "1",
                             "--batch-size", "4", "--num-groups", "8", "--hidden-dim", "32", "--feat-dim", "16",
                             "--drop-path", "0.2" if arch.startswith("swin") else "0", "--channels-last"])
    run = build_nets(cfg)
    if arch.startswith("swin"):  # drop-path in the online branch only
        depths = [m.p for m in run.online.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
        assert max(depths) == pytest.approx(0.2)
        assert all(m.p == 0 for m in run.target.modules() if isinstance(m, torchvision.ops.StochasticDepth))
    backbone = run.online.encoder.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images, _ = smog.synthetic_shapes(4, seed=1)
    crops = multicrop(images, 0, smog.crop_recipe(cfg))  # online: 64 and 32 px in one forward
    loss, _, _, _ = step_of(run, [crops])
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    # save → strict reload (eval_linear.py) → export into the torchvision model
    torch.save(dict(config=dataclasses.asdict(cfg), online=run.online.state_dict()), tmp_path / "ck.pt")
    r = export_in_process(capsys, tmp_path / "ck.pt", tmp_path / "backbone.pt")
    assert r.returncode == 0, r.stderr
    sd = torch.load(tmp_path / "backbone.pt", weights_only=True)
    make, only_twin = TORCHVISION_TWINS[arch]
    model = make(torchvision) if make else smog.BACKBONES[arch](0.0)[0]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert set(missing) == only_twin and not unexpected  # the twin differs only by its classifier
    model = load_export_as_advised(r, arch)  # and the printed advice loads it with strict key matching
    for k, v in model.state_dict().items():
        assert torch.equal(v, backbone.state_dict()[k]), k


# ----- Part 2, data: the embedded set, folders, image modes, unreadable files --------------------------------------

def test_synthetic_data_is_deterministic_and_balanced():
    a, la = smog.synthetic_shapes(300, seed=3)
    b, lb = smog.synthetic_shapes(300, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (300, 3, 32, 32)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert torch.bincount(la, minlength=10).min() > 10
    assert not torch.equal(a, smog.synthetic_shapes(300, seed=4)[0])


def shapes_png(path, i=0, size=None):
    import PIL.Image
    image = PIL.Image.fromarray(smog.synthetic_shapes(i + 1, seed=0)[0][i].permute(1, 2, 0).numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    (image.resize(size) if size else image).save(path)


def test_a_folder_is_known_by_its_paths_and_sizes_so_a_copy_resumes_and_another_folder_does_not(tmp_path):
    import shutil
    for c in ("c0", "c1"):
        for i in range(2):
            shapes_png(tmp_path / "a" / c / f"{i:03d}.png", i)
            shapes_png(tmp_path / "b" / c / f"{i:03d}.png", i + 2, size=(40, 40))  # same names, other images
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "a")
    fingerprint = {name: smog.ImageFolderData(str(tmp_path / name)).fingerprint() for name in ("a", "b", "elsewhere/a")}
    assert fingerprint["a"] == fingerprint["elsewhere/a"] and fingerprint["a"] != fingerprint["b"]
    assert fingerprint["a"].startswith("4 images in 2 classes")


@pytest.mark.slow
def test_folders_are_read_as_a_user_expects(tmp_path):
    for c in ("a", "b", "c"):
        for i in range(3):
            shapes_png(tmp_path / "train" / c / f"{i}.png", i)
    (tmp_path / "train" / "a" / "up").symlink_to("..")  # a link to the parent: read once, not without end
    (tmp_path / "train" / "b" / "same.png").symlink_to(tmp_path / "train" / "b" / "0.png")  # the same file twice
    ds = smog.ImageFolderData(str(tmp_path / "train"))
    assert len(ds) == 9 and ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    (tmp_path / "train" / "d").symlink_to(tmp_path / "train" / "a")  # a class that is a link to another one
    with pytest.raises(SystemExit, match="train/d'?: a link to another class folder"):
        smog.ImageFolderData(str(tmp_path / "train"))
    (tmp_path / "train" / "d").unlink()
    # val/ is labelled by train/'s class names, whatever it lacks; a class train/ lacks is one line naming it
    for c in ("c", "b"):
        shapes_png(tmp_path / "val" / c / "0.png")
    val = smog.load_dataset(config_of(["--data", str(tmp_path)]), "val")
    assert val[1].tolist() == [1, 2]
    shapes_png(tmp_path / "val" / "d" / "0.png")
    with pytest.raises(SystemExit, match="val/d.* a class the training split .*train does not have"):
        smog.load_dataset(config_of(["--data", str(tmp_path)]), "val")
    # a held-out split alone is not a training set
    (tmp_path / "only_val" / "val").mkdir(parents=True)
    (tmp_path / "train").rename(tmp_path / "only_val" / "val" / "x")
    assert_one_line_error(run_smog("--data", str(tmp_path / "only_val"), "--out-dir", str(tmp_path / "o")),
                          "--data", "has val/ but no train/")


def test_every_image_mode_becomes_8_bit_rgb_without_clipping(tmp_path):
    import PIL.Image
    ramp = np.arange(256 * 4).reshape(4, 256)
    cases = {"g16.png": ((ramp * 64).astype(np.uint16), lambda v: v * 64 / 65535 * 255),  # I;16: 0-65535
             "g32.tif": ((ramp * 2**21).astype(np.int32), lambda v: v * 2**21 / (2**31 - 1) * 255),  # I: 0-2^31-1
             "f32.tif": ((ramp / 1023).astype(np.float32), lambda v: v / 1023 * 255)}  # F: 0-1
    for name, (pixels, expected) in cases.items():
        PIL.Image.fromarray(pixels).save(tmp_path / name)
        rgb = smog.decode(tmp_path / name, cap=10**6).permute(1, 2, 0).numpy().astype(float)
        assert rgb.shape == (4, 256, 3) and np.abs(rgb[..., 0] - expected(ramp)).max() <= 0.51, name
        assert np.all(rgb[..., 0] == rgb[..., 2]) and rgb.max() > 250, name  # grey, and not all white
    for mode in ("L", "P", "RGBA", "CMYK", "1", "LA"):
        image = PIL.Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).convert(mode)
        assert np.asarray(smog.rgb8(image)).shape == (4, 4, 3) and smog.rgb8(image).mode == "RGB", mode


@pytest.mark.slow
def test_file_names_in_messages_are_printed_escaped(tmp_path):
    assert smog.printable("a\nb\x1b[31mc") == "a\\nb\\x1b[31mc"
    for c in ("a", "b"):
        for i in range(4):
            shapes_png(tmp_path / "train" / c / f"{i}.png", i)
    (tmp_path / "train" / "a" / "evil\n\x1b[2J.png").write_text("not an image")
    r = run_smog("--data", str(tmp_path), "--batch-size", "9", "--epochs", "1", "--num-groups", "4",
                 "--hidden-dim", "16", "--feat-dim", "8", "--out-dir", str(tmp_path / "out"))
    assert_one_line_error(r, "evil\\n\\x1b[2J.png", "unreadable")
    assert "\x1b" not in r.stderr


@pytest.mark.slow
def test_data_that_cannot_be_had_is_one_line(tmp_path, monkeypatch):
    assert_one_line_error(run_smog("--synthetic-size", "100000000000", "--out-dir", str(tmp_path)),
                          "--synthetic-size", "GiB")

    def offline(*args, **kwargs):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(smog.torchvision.datasets, "CIFAR10", offline)  # no network in tests: a stand-in
    with pytest.raises(SystemExit, match="--data cifar10: could not download CIFAR-10 .* name resolution"):
        smog.load_dataset(config_of(["--data", "cifar10", "--out-dir", str(tmp_path)]), "train")


@pytest.mark.slow
def test_non_image_file_in_folder_is_reported(tmp_path):
    import PIL.Image
    images, _ = smog.synthetic_shapes(8, seed=0)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(4):
            PIL.Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(tmp_path / "train" / c / f"{i}.png")
    (tmp_path / "train" / "a" / "notes.png").write_text("not an image")
    r = run_smog("--data", str(tmp_path), "--batch-size", "9", "--epochs", "1", "--num-groups", "4",
                 "--hidden-dim", "16", "--feat-dim", "8", "--out-dir", str(tmp_path / "out"))
    assert_one_line_error(r, "notes.png", "unreadable")


@pytest.mark.slow
def test_unreadable_images_up_to_1_percent_of_the_data_set_are_replaced_on_both_paths(tmp_path, capsys):
    import PIL.Image
    images, _ = smog.synthetic_shapes(200, seed=0)  # 3 steps of 64 per epoch: 8 images dropped each epoch
    for i in range(200):
        folder = tmp_path / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg", quality=90)
    whole = (tmp_path / "train" / "c0" / "0.jpg").read_bytes()
    (tmp_path / "train" / "c0" / "0.jpg").write_bytes(whole[:len(whole) // 2])  # truncated
    (tmp_path / "train" / "c1" / "1.jpg").write_bytes(b"")  # 2 of 200: exactly 1%, still trained
    flags = ["--data", str(tmp_path), "--batch-size", "64", "--num-groups", "8", "--hidden-dim", "16", "--feat-dim",
             "8", "--log-every", "1", "--no-knn", "--workers", "1"]
    smog.main([*flags, "--epochs", "2", "--out-dir", str(tmp_path / "out")])
    records = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert "streamed by 1 loader workers" in capsys.readouterr().out
    # each epoch meets some of the two (a batch's failed image is replaced by the next)
    assert 1 <= sum(rec.get("bad_images", 0) for rec in records) <= 4
    (tmp_path / "train" / "c1" / "3.jpg").write_bytes(b"not a jpeg")  # 3 of 200: more than 1%
    with pytest.raises(SystemExit, match="3 of the 200 images are unreadable, more than 1%"):
        smog.main([*flags, "--epochs", "20", "--out-dir", str(tmp_path / "out3")])


def png_folder(root, n=96, sizes=None):
    """An ImageFolder of the embedded data set's images as PNGs (train/ and val/); returns (images, labels) of train."""
    import PIL.Image
    images, labels = smog.synthetic_shapes(n, seed=0)
    for split in ("train", "val"):
        for i in range(n):
            folder = root / split / f"c{int(labels[i]):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            image = PIL.Image.fromarray(images[i].permute(1, 2, 0).numpy())
            if sizes and i in sizes:
                image = image.resize(sizes[i])
            image.save(folder / f"{i:04d}.png")
    return images, labels


@pytest.mark.slow
def test_a_folder_decodes_to_its_exact_pixels_and_trains_watched_as_it_goes(tmp_path):
    images, labels = png_folder(tmp_path / "data")
    cfg = config_of(["--data", str(tmp_path / "data")])
    assert cfg.invert == 0.0 and config_of([]).invert == 0.5  # the embedded set's polarity trick only
    folder, folder_labels, _ = smog.load_dataset(cfg, "train")
    decoded = torch.stack([folder[i][0] for i in range(len(folder))])
    assert decoded.dtype == torch.uint8 and decoded.shape == (96, 3, 32, 32)
    order = [int(os.path.basename(p)[:4]) for p, _ in
             __import__("torchvision").datasets.ImageFolder(str(tmp_path / "data" / "train")).samples]
    assert torch.equal(decoded, images[order]) and torch.equal(folder_labels, labels[order])  # the exact pixels
    out = tmp_path / "out"
    r = run_smog("--data", str(tmp_path / "data"), "--batch-size", "32", "--epochs", "2", "--num-groups", "8",
                 "--hidden-dim", "16", "--feat-dim", "8", "--log-every", "1", "--eval-every", "1", "--workers", "1",
                 "--out-dir", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "streamed by 1 loader workers; every crop cut on the cpu" in r.stdout
    steps = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert steps and all("ETA " in line and "entropy " in line for line in steps)
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert all(0 < rec["groups_used"] <= 8 and rec["assign_entropy"] <= rec["assign_entropy_max"] + 1e-6
               for rec in records if "loss" in rec)
    reports = [rec for rec in records if "knn_top1" in rec]  # every epoch's, the last one the final number, once
    assert [rec["epoch"] for rec in reports] == [0, 1] and "after epoch 0" in r.stdout


@pytest.mark.slow
def test_the_initial_bank_takes_the_query_pipeline_in_memory_and_streamed(tmp_path, monkeypatch):
    png_folder(tmp_path / "data", n=96)
    pipelines, augment = [], smog.batch_augment
    monkeypatch.setattr(smog, "batch_augment", lambda *a, **k: pipelines.append(a[4]) or augment(*a, **k))
    for data in (str(tmp_path / "data"), "synthetic"):
        cfg = config_of(["--data", data, "--synthetic-size", "96", "--batch-size", "16", "--workers", "0",
                         "--num-local", "0"])
        data = smog.TrainData(cfg, torch.device("cpu"))
        assert data.in_memory == (cfg.data == "synthetic")
        assert [x.shape[0] for x in data.global_crops()] == [32] * 6  # both online global crops of every image
    assert pipelines == ["q"] * 12  # as the authors' init_memory; training alternates


# ----- Part 2, batched augmentation, run on CPU tensors, and its match with MultiCrop ------------------------------

N_AUG = 2000


def unnormalise(x):
    return x * torch.tensor(smog.STD).view(1, 3, 1, 1) + torch.tensor(smog.MEAN).view(1, 3, 1, 1)


def constant_images(rgb, n=N_AUG, size=16):
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(n, 3, size, size).contiguous()


def within_binomial(count, n, p, sds=5):
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p)) + 1


def torchvision_pil(x):
    import torchvision
    return torchvision.transforms.functional.to_pil_image(x)


def augment(images, size, scale, pipeline, blur_sigma, **kwargs):
    """smog.batch_augment of unpadded images, uint8 or in [0, 1]."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    return smog.batch_augment(x, whole(images), size, scale, pipeline, blur_sigma, **kwargs)


def test_batch_multicrop_shapes_and_per_image_randomness(tmp_path):
    cfg = tiny_cfg(tmp_path)
    img = smog.synthetic_shapes(1, seed=0)[0].expand(8, -1, -1, -1)  # eight copies of one image
    g, loc, t, t_loc = multicrop(img, 0, smog.crop_recipe(cfg))
    assert g.shape == (16, 3, 32, 32) and t.shape == (16, 3, 32, 32) and loc.shape == t_loc.shape == (16, 3, 16, 16)
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in (g, loc, t, t_loc))
    assert multicrop(img, 0, smog.crop_recipe(cfg)._replace(target_local=False))[3] is None
    assert len({tuple(x.flatten()[:50].tolist()) for x in g}) == 16  # no two copies get the same crop


def test_batch_augment_in_float16_as_on_gpus_matches_float32():
    images = smog.synthetic_shapes(32, seed=0)[0]
    torch.manual_seed(0)
    full = augment(images, 24, (0.2, 1.0), "k", (0.1, 1.0), crops_per_image=2)
    torch.manual_seed(0)
    half = augment(images.half() / 255, 24, (0.2, 1.0), "k", (0.1, 1.0), crops_per_image=2)
    assert half.dtype == torch.float32 and half.shape == full.shape  # normalised output in float32 either way
    assert (half - full).abs().mean() < 0.01 and (half - full).abs().max() < 0.2


def test_batch_augment_flip_frequency():
    torch.manual_seed(1)
    img = torch.zeros(N_AUG, 3, 16, 16)
    img[..., :8] = 0.8  # bright left half
    out = unnormalise(augment(img, 16, (1.0, 1.0), "q", (0.1, 0.2)))
    flipped = (out[..., 8:].mean((1, 2, 3)) > out[..., :8].mean((1, 2, 3))).sum().item()
    assert within_binomial(flipped, N_AUG, 0.5)


def test_batch_augment_grayscale_frequency():
    torch.manual_seed(2)
    out = unnormalise(augment(constant_images((0.9, 0.5, 0.1)), 8, (0.5, 1.0), "q", (0.1, 0.2)))
    gray = ((out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 1e-4).sum().item()
    assert within_binomial(gray, N_AUG, 0.2)


@pytest.mark.parametrize("pipeline, p", [("q", 0.0), ("k", 0.2)])
def test_batch_augment_solarize_frequency_per_pipeline(pipeline, p):
    torch.manual_seed(3)
    # white stays >= 0.6 under every colour change; only solarize sends it below 0.5
    out = unnormalise(augment(constant_images((1.0, 1.0, 1.0)), 8, (0.5, 1.0), pipeline, (0.1, 0.2)))
    solarized = (out.mean((1, 2, 3)) < 0.5).sum().item()
    assert within_binomial(solarized, N_AUG, p) if p else solarized == 0


@pytest.mark.parametrize("invert", [0.0, 0.5])
def test_batch_augment_invert_frequency(invert):
    torch.manual_seed(8)
    # white stays >= 0.6 under every colour change of the "q" pipeline (no solarize): only its negative is dark
    out = unnormalise(augment(constant_images((1.0, 1.0, 1.0)), 8, (0.5, 1.0), "q", (0.1, 0.2),
                                         invert=invert))
    negatives = (out.mean((1, 2, 3)) < 0.4).sum().item()
    assert within_binomial(negatives, N_AUG, invert) if invert else negatives == 0


def test_hue_rotation_keeps_luma_and_inverts():
    basis = smog._constants(torch.device("cpu"))["hue"]

    def rotation(theta):
        return basis[0] + math.cos(theta) * basis[1] + math.sin(theta) * basis[2]

    assert torch.allclose(rotation(0.0), torch.eye(3), atol=1e-6)
    assert torch.allclose(rotation(0.7) @ rotation(-0.7), torch.eye(3), atol=1e-5)
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert torch.allclose(luma @ rotation(1.1), luma, atol=1e-5)  # gray level of every colour unchanged
    assert not torch.allclose(rotation(1.1), torch.eye(3), atol=0.1)


def edge_sigma(row):
    """The standard deviation in pixels of the blur that turned a step edge into this profile (its derivative's)."""
    d = np.diff(np.asarray(row, dtype=float))
    t = np.arange(len(d))
    mean = (d * t).sum() / d.sum()
    return math.sqrt((d * (t - mean) ** 2).sum() / d.sum())


def test_the_blur_blurs_as_pils_gaussian_blur_at_every_sigma():
    import PIL.Image
    import PIL.ImageFilter
    edge = np.zeros((24, 48), np.uint8)
    edge[:, 24:] = 255
    x = torch.tensor(edge).float().div(255).expand(1, 3, -1, -1)
    for sigma in (0.1, 0.2, 0.3, 0.45, 0.6, 1.0, 2.0):  # the authors' blur: PIL's GaussianBlur(radius σ)
        pil = np.asarray(PIL.Image.fromarray(edge).filter(PIL.ImageFilter.GaussianBlur(sigma)), dtype=float)[12]
        ours = smog._gaussian_blur(x, p=1.0, sigma=(sigma, sigma))[0, 0, 12] * 255
        assert abs(edge_sigma(ours) - sigma) < 0.01, (sigma, edge_sigma(ours))
        # Measured: within 0.017 px of PIL's from σ = 0.2 on; PIL rounds to 8 bits after each of its three passes,
        # which leaves an edge unblurred at σ = 0.1. A sampled Gaussian kernel gave 0.003 px at σ = 0.2, 0.09 at 0.3.
        if sigma >= 0.2:
            assert abs(edge_sigma(ours) - edge_sigma(pil)) < 0.03, (sigma, edge_sigma(ours), edge_sigma(pil))
    noise = torch.rand(2, 3, 20, 30)
    pil = np.asarray(PIL.Image.fromarray((noise[0] * 255).round().byte().permute(1, 2, 0).numpy()).filter(
        PIL.ImageFilter.GaussianBlur(1.3)), dtype=float)
    ours = smog._gaussian_blur(noise[:1].mul(255).round().div(255), p=1.0, sigma=(1.3, 1.3))[0] * 255
    assert np.abs(ours.permute(1, 2, 0).numpy() - pil).max() <= 2.5  # edges too: PIL repeats the edge pixels
    assert torch.equal(smog._gaussian_blur(noise, p=0.0, sigma=(1.3, 1.3)), noise)


def test_crop_matrices_resample_as_antialiased_bilinear_and_mirror():
    import torchvision.transforms.functional as TF
    torch.manual_seed(4)
    x = torch.rand(2, 3, 40, 30)
    zeros, n = torch.zeros(2), 2
    for size in (16, 64):  # shrinking (antialiased) and enlarging: the whole image equals torch's resize
        rows = smog._resampling_matrix(zeros, torch.full((n,), 40.0), size, 40)
        cols = smog._resampling_matrix(zeros, torch.full((n,), 30.0), size, 30)
        ours = rows[:, None] @ x @ cols[:, None].mT
        ref = F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False)
        assert torch.allclose(ours, ref, atol=1e-5)
        mirrored = smog._resampling_matrix(torch.full((n,), 30.0), zeros, size, 30)
        assert torch.allclose(rows[:, None] @ x @ mirrored[:, None].mT, ours.flip(-1), atol=1e-5)
    # A box inside the image: torchvision's crop-then-resize, except on the border pixels, which ours interpolates
    # from the image around the box instead of repeating the box's edge.
    rows = smog._resampling_matrix(torch.tensor([5.0]), torch.tensor([25.0]), 10, 40)
    cols = smog._resampling_matrix(torch.tensor([7.0]), torch.tensor([23.0]), 8, 30)
    ours = rows[:, None] @ x[:1] @ cols[:, None].mT
    ref = TF.resized_crop(x[:1], 5, 7, 20, 16, [10, 8], antialias=True)
    assert torch.allclose(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)


# The batched augmentation against MultiCrop, statistic by statistic, on images made so that each statistic can be read
# off the crops. Tolerance: rates within 5 binomial standard deviations of the pair's difference (n crops each), means
# within the stated bounds; both must also match the recipe's own constant.
N_STAT = 600


def crops_of(image, recipe, pipeline, batched, n=N_STAT):
    """n global crops of one uint8 image (3, H, W) through one pipeline, back in [0, 1] pixels."""
    torch.manual_seed(0)
    if batched:
        x = augment(image.expand(n, -1, -1, -1), recipe.global_size, recipe.global_scale, pipeline,
                    recipe.blur_sigma)
    else:
        transform, pil = smog.MultiCrop(recipe).global_pipelines[pipeline], torchvision_pil(image)
        x = torch.stack([transform(pil) for _ in range(n)])
    return unnormalise(x)


def same_rate(a, b, p, n=N_STAT):
    """Two observed rates a, b of n draws agree with each other and with the recipe's p."""
    sd = math.sqrt(max(p * (1 - p), 1 / n) / n)
    return abs(a - b) <= 5 * math.sqrt(2) * sd + 1 / n and abs(a - p) <= 5 * sd + 1 / n and abs(b - p) <= 5 * sd + 1 / n


def gray_image(value, size=32):
    return torch.full((3, size, size), round(255 * value), dtype=torch.uint8)


def checkerboard(size=32):
    """A 1-px checkerboard of dark levels 10 and 70 (uint8, (3, size, size)): blurred by σ ≥ 1, its contrast is gone;
    jittered, it stays below the solarize threshold."""
    board = torch.full((3, size, size), 10, dtype=torch.uint8)
    board[:, ::2, ::2] = board[:, 1::2, 1::2] = 70
    return board


WHOLE = smog.CropRecipe(global_size=32, global_scale=(1.0, 1.0), num_local=0, blur_sigma=(1.0, 2.0))  # no crop


def torchvision_rrc_params(image, scale):
    import torchvision
    return torchvision.transforms.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.05, 0.2), (0.5, 1.0)])
def test_crop_boxes_drawn_per_image_size_have_torchvisions_area_and_aspect(scale):
    import PIL.Image
    shapes = [(150, 200), (375, 500), (500, 375), (32, 32)]  # one batch of images of these sizes, padded or not
    sizes = torch.tensor(shapes).repeat(4000, 1)  # (16000, 2)
    torch.manual_seed(0)
    boxes = smog.random_resized_boxes(sizes, scale)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 3] <= sizes[:, 0]).all()
    for i, (h, w) in enumerate(shapes):
        mine = boxes[i::len(shapes)]
        ours = torch.stack([(mine[:, 2] - mine[:, 0]) * (mine[:, 3] - mine[:, 1]) / (h * w),
                            torch.log((mine[:, 2] - mine[:, 0]) / (mine[:, 3] - mine[:, 1]))])  # (area, log aspect)
        image = PIL.Image.new("RGB", (w, h))
        theirs = torch.tensor([[bh * bw / (h * w), math.log(bw / bh)] for _, _, bh, bw in
                               (torchvision_rrc_params(image, scale) for _ in range(4000))]).T
        # Stated tolerance: means and standard deviations within 0.012 (4 standard errors of the mean area).
        assert torch.allclose(ours.mean(1), theirs.mean(1), atol=0.012), (h, w, ours.mean(1), theirs.mean(1))
        assert torch.allclose(ours.std(1), theirs.std(1), atol=0.012), (h, w, ours.std(1), theirs.std(1))


@pytest.mark.parametrize("pipeline", ["q", "k"])
def test_batched_augmentation_has_multicrops_rates_per_pipeline(pipeline):
    blur_p, solarize_p = smog.PIPELINES[pipeline]
    rates = {}
    for batched in (True, False):
        colour = crops_of(torch.tensor([180, 100, 50], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32), WHOLE,
                          pipeline, batched)  # grey only when grayscaled (saturation ≥ 0.8 keeps the colour)
        bright = crops_of(gray_image(0.9), WHOLE, pipeline, batched)  # ≥ 0.54 after brightness: < 0.5 only solarized
        # Below the solarize threshold however jittered: a dark left half, brighter only when flipped; a 1-px
        # checkerboard, whose contrast a blur of σ ≥ 1 takes away
        halves = gray_image(0.3)
        halves[:, :, :16] = 25
        halves = crops_of(halves, WHOLE, pipeline, batched)
        board = crops_of(checkerboard(), WHOLE, pipeline, batched)
        mid = crops_of(gray_image(0.5), WHOLE, pipeline, batched)  # only brightness moves a grey constant
        unsolarized = bright.mean((1, 2, 3)) > 0.5
        rates[batched] = dict(
            gray=(colour.amax(1) - colour.amin(1)).mean((1, 2)).lt(0.02).float().mean().item(),
            solarize=(~unsolarized).float().mean().item(),
            flip=(halves[..., :16].mean((1, 2, 3)) > halves[..., 16:].mean((1, 2, 3))).float().mean().item(),
            blur=(board.std((2, 3)).mean(1) < 0.01).float().mean().item(),
            jitter=((mid - 0.5).abs().mean((1, 2, 3)) > 0.004).float().mean().item(),
            strength=(mid - 0.5).abs().mean((1, 2, 3))[(mid - 0.5).abs().mean((1, 2, 3)) > 0.004].mean().item())
    expected = dict(gray=smog.GRAYSCALE_P, solarize=solarize_p, flip=smog.FLIP_P, blur=blur_p, jitter=smog.JITTER_P)
    for name, p in expected.items():
        assert same_rate(rates[True][name], rates[False][name], p), (name, rates)
    # Brightness strength: |b − 1| / 2 with b ~ U(1 − 0.4, 1 + 0.4) has mean 0.1 at grey 0.5, within 0.01 of each other.
    assert abs(rates[True]["strength"] - rates[False]["strength"]) < 0.01, rates
    assert abs(rates[True]["strength"] - smog.JITTER[0] / 4) < 0.01, rates


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "MultiCrop"])
def test_the_branches_swap_pipelines_every_other_step(batched):
    # "q" blurs every crop and "k" one in ten: a 1-px checkerboard tells them apart (its contrast gone when blurred)
    board = checkerboard()
    recipe = WHOLE._replace(num_local=1, local_size=32, local_scale=(1.0, 1.0))
    for step in (0, 1):
        torch.manual_seed(step)
        if batched:
            crops = multicrop(board.expand(64, -1, -1, -1), step, recipe)
        else:
            crops = smog.stack_crops([smog.MultiCrop(recipe)(torchvision_pil(board), step) for _ in range(64)])
        assert crops.target_local.shape == crops.online_local.shape == (64, 3, 32, 32)
        blurred = {name: (unnormalise(x).std((2, 3)).mean(1) < 0.01).float().mean().item()
                   for name, x in crops._asdict().items()}
        q, k = ("online", "target") if step == 0 else ("target", "online")
        assert blurred[q + "_global"] == blurred[q + "_local"] == 1.0, blurred
        assert blurred[k + "_global"] < 0.3 and blurred[k + "_local"] < 0.3, blurred


# ----- Part 2, feeding the device: the crop paths ------------------------------------------------------------------

def test_padding_never_enters_a_crop():
    # Three images of other sizes in one canvas (collate's): padded with zeros or with a sentinel, the crops are the
    # same, and the same as the crops of each image alone by the same boxes.
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in ((30, 40), (50, 20),
                                                                                                 (17, 33))]
    canvas, sizes, labels, failed = smog.collate([(x, i, "") for i, x in enumerate(images)])
    assert canvas.shape == (3, 3, 50, 40) and sizes.tolist() == [[30, 40], [50, 20], [17, 33]] and not failed
    sentinel = torch.full_like(canvas, 255)
    for place, x in zip(sentinel, images):
        place[:, :x.shape[1], :x.shape[2]] = x
    crops = []
    for padded in (canvas, sentinel):
        torch.manual_seed(1)
        crops.append(smog.random_resized_crops(padded.float() / 255, sizes, 24, (0.05, 1.0), crops_per_image=4))
    assert torch.equal(crops[0], crops[1]) and crops[0].shape == (12, 3, 24, 24)
    torch.manual_seed(1)
    boxes = smog.random_resized_boxes(sizes.repeat(4, 1), (0.05, 1.0))
    flip = torch.rand(12) < smog.FLIP_P
    for i, x in enumerate(images):  # crop-major: image i's crops are rows i, i + 3, ...
        alone = smog.cut(x[None].float() / 255, boxes[i::3], 24, flip[i::3])
        assert torch.allclose(alone, crops[0][i::3], atol=1e-6)


def test_large_images_are_decoded_at_reduced_size_and_crops_keep_full_detail(tmp_path):
    import PIL.Image
    cfg = config_of(["--preset", "imagenet-r50"])
    cap = smog.decode_cap(cfg)
    assert cap == 579  # a 0.2-area crop of aspect 3:4 keeps its 224 px (and a 0.05-area one its 96)
    rng = np.random.default_rng(0)
    big = PIL.Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    big.save(tmp_path / "phone.jpg", quality=90)
    big.resize((2400, 500)).save(tmp_path / "panorama.png")
    big.resize((500, 375)).save(tmp_path / "imagenet.jpg")
    assert smog.decode(tmp_path / "phone.jpg", cap).shape == (3, 579, 772)  # the shorter side at the cap
    assert smog.decode(tmp_path / "panorama.png", cap).shape == (3, 241, 1158)  # the longer at twice the cap
    assert smog.decode(tmp_path / "imagenet.jpg", cap).shape == (3, 375, 500)  # untouched
    h, w = 579, 772  # the least crop of the least area and aspect keeps full detail
    assert min(math.sqrt(0.2 * h * w * 3 / 4), math.sqrt(0.2 * h * w / (4 / 3))) >= 224


@pytest.mark.parametrize("left, top, w, h, size", [(5, 3, 20, 24, 16), (0, 0, 48, 40, 32), (30, 20, 18, 20, 8)])
def test_batched_crops_of_a_box_are_torchvisions_to_one_grey_level_inside_and_at_the_border(left, top, w, h, size):
    import PIL.Image
    import torchvision.transforms.functional as TF
    noise = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = smog._resampling_matrix(torch.tensor([float(top)]), torch.tensor([float(top + h)]), size, 40)[0]
    cols = smog._resampling_matrix(torch.tensor([float(left)]), torch.tensor([float(left + w)]), size, 48)[0]
    ours = rows @ noise.float() @ cols.T
    image = PIL.Image.fromarray(noise.permute(1, 2, 0).numpy())
    theirs = TF.pil_to_tensor(TF.resized_crop(image, top, left, h, w, [size, size])).float()  # RandomResizedCrop's
    diff = (ours - theirs).abs()
    border = torch.cat([diff[:, 0], diff[:, -1], diff[:, :, 0], diff[:, :, -1]])
    assert diff.max() <= 1.0 and border.max() <= 1.0  # a pixel outside the box would move the border by far more


def test_batched_crop_boxes_are_whole_pixels_and_the_fallback_is_torchvisions_centre():
    torch.manual_seed(0)
    boxes = smog.random_resized_boxes(torch.tensor([[37, 53]]).expand(500, 2), (0.05, 1.0))
    assert torch.equal(boxes, boxes.floor()) and (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= 53).all() and (boxes[:, 3] <= 37).all()
    assert boxes[:, 0].max() > 40 and (boxes[:, 2] == 53).any()  # every place a box fits is drawn, to the edge
    # A crop of the whole area never fits a 2:1 image at aspect 3/4..4/3: torchvision's centre crop, 67 x 50 at
    # (100 - 67) // 2 = 16 (not 16.5)
    fallback = smog.random_resized_boxes(torch.tensor([[50, 100]]).expand(4, 2), (1.0, 1.0))
    assert fallback.tolist() == [[16.0, 0.0, 83.0, 50.0]] * 4


# ----- Part 2, the run state and its checkpoints: save, resume, continue -------------------------------------------

@pytest.mark.slow
def test_train_resume_continue_matches_uninterrupted(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = run_smog(*SMALL, "--epochs", "2", "--out-dir", str(straight))
    assert r.returncode == 0, r.stderr
    assert "kNN top-1 on the held-out split" in r.stdout
    records = [json.loads(line) for line in open(straight / "log.jsonl")]
    assert "knn_top1" in records[-1] and records[-1]["epoch"] == 1  # the final report
    steps = [rec for rec in records if "loss" in rec]
    assert steps and all(math.isfinite(rec["loss"]) and rec["groups_used"] >= 1 for rec in steps)

    # A job that ended at the first epoch's end: the straight run's checkpoint then (kept as checkpoint.prev.pt)
    split.mkdir()
    shutil.copy(straight / "checkpoint.prev.pt", split / "checkpoint.pt")
    first_job_s = final_state(split)["elapsed_s"]
    assert final_state(split)["epoch"] == 1 and first_job_s > 0
    r = run_smog(*SMALL, "--epochs", "2", "--out-dir", str(split))  # --resume auto picks it up
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    clock = [rec["elapsed_s"] for rec in map(json.loads, open(split / "log.jsonl"))]
    assert clock == sorted(clock) and clock[0] > first_job_s  # one wall-clock over both jobs
    a, b = final_state(straight), final_state(split)
    assert a["step"] == b["step"] == 2 * (384 // 64)
    for key in ("online", "target", "grouping"):
        for name in a[key]:
            assert torch.allclose(a[key][name].float(), b[key][name].float(), atol=1e-6), (key, name)
    split_losses = [rec["loss"] for rec in map(json.loads, open(split / "log.jsonl")) if "loss" in rec]
    assert split_losses == pytest.approx([rec["loss"] for rec in steps if rec["step"] > 6], abs=1e-6)

    # Preemption: a real SIGTERM in epoch 1 (steps 6-11), sent when step 8 is logged. The process finishes its step,
    # writes a checkpoint and exits 0; the next start resumes mid-epoch and ends where the uninterrupted run ended.
    preempted = tmp_path / "preempted"
    status, lines, stderr = run_signalled(signal.SIGTERM, preempted, *SMALL, "--epochs", "2")
    assert status == 0, stderr
    assert any("caught a preemption signal" in line for line in lines), lines
    state = final_state(preempted)
    assert state["epoch"] == 1 and 0 < state["epoch_step"] < 6 and state["step"] == 6 + state["epoch_step"]
    r = run_smog(*SMALL, "--epochs", "2", "--out-dir", str(preempted))
    assert r.returncode == 0 and f"mid-epoch, after {state['epoch_step']} steps" in r.stdout, r.stderr
    c = final_state(preempted)
    for key in ("online", "target", "grouping"):
        for name in a[key]:
            assert torch.allclose(a[key][name].float(), c[key][name].float(), atol=1e-6), (key, name)
    resumed_losses = [rec["loss"] for rec in map(json.loads, open(preempted / "log.jsonl")) if "loss" in rec]
    assert resumed_losses == pytest.approx([rec["loss"] for rec in steps], abs=1e-6)


@pytest.mark.slow
def test_accumulated_run_preempted_mid_epoch_resumes_exactly(tmp_path):
    # 256 images in passes of 28: 9 passes per epoch, 4 steps of 2, and the ninth pass dropped as drop_last drops
    # images. One run is preempted mid-epoch, one stopped at the first epoch's end: both end as the uninterrupted run.
    flags = merged(SMALL, ["--synthetic-size", "256", "--batch-size", "28", "--accumulate", "2", "--epochs", "2",
                           "--no-knn"])
    r = run_smog(*flags, "--out-dir", str(tmp_path / "straight"))
    assert r.returncode == 0 and "4 steps per epoch, global batch 56 (28 × 1 process(es) × 2 passes)" in r.stdout, \
        r.stderr
    status, _, stderr = run_signalled(signal.SIGTERM, tmp_path / "preempted", *flags, at="step 6/")
    assert status == 0, stderr
    assert 0 < final_state(tmp_path / "preempted")["epoch_step"] < 4
    r = run_smog(*flags, "--out-dir", str(tmp_path / "preempted"))
    assert r.returncode == 0 and "mid-epoch" in r.stdout, r.stderr
    (tmp_path / "stopped").mkdir()  # a job that ended at the first epoch's end, continued
    shutil.copy(tmp_path / "straight" / "checkpoint.prev.pt", tmp_path / "stopped" / "checkpoint.pt")
    r = run_smog(*flags, "--out-dir", str(tmp_path / "stopped"))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    a = final_state(tmp_path / "straight")
    for resumed in ("preempted", "stopped"):
        c = final_state(tmp_path / resumed)
        assert a["step"] == c["step"] == 8
        for key in ("online", "target", "grouping"):
            for name in a[key]:
                assert torch.allclose(a[key][name].float(), c[key][name].float(), atol=1e-6), (resumed, key, name)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """An out_dir after a 2-epoch SMALL run: checkpoint.pt (epoch 2) and checkpoint.prev.pt (epoch 1)."""
    out = tmp_path_factory.mktemp("two_epochs")
    r = run_smog(*SMALL, "--epochs", "2", "--no-knn", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_previous_checkpoint_is_kept_and_a_damaged_newest_falls_back_to_it(two_epochs, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(two_epochs, out)
    assert final_state(out)["epoch"] == 2
    assert torch.load(out / "checkpoint.prev.pt", weights_only=True)["epoch"] == 1
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[:len(data) // 2])  # a copy cut short
    r = run_smog(*SMALL, "--epochs", "3", "--no-knn", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert "checkpoint.pt does not load" in r.stdout and "trying the one before it" in r.stdout
    assert f"resumed from {out / 'checkpoint.prev.pt'} at epoch 1" in r.stdout
    assert final_state(out)["epoch"] == 3 and torch.load(out / "checkpoint.prev.pt", weights_only=True)["epoch"] == 2
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"not a checkpoint")
    r = run_smog(*SMALL, "--epochs", "4", "--no-knn", "--out-dir", str(out))
    assert_one_line_error(r, "no checkpoint loads", "checkpoint.pt", "checkpoint.prev.pt")


@pytest.mark.slow
def test_an_epoch_end_checkpoint_holds_its_bank_and_a_longer_run_starts_its_next_epoch_from_it(two_epochs, tmp_path,
                                                                                              monkeypatch):
    import shutil
    final, before = final_state(two_epochs), torch.load(two_epochs / "checkpoint.prev.pt", weights_only=True)
    for state in (final, before):  # after epochs 2 and 1: the bank for the next start, the target as the EMA left it
        online = {k[len("encoder."):]: v for k, v in state["online"].items() if k.startswith("encoder.")}
        assert state["epoch_step"] == 0 and state["banks"].shape == (1, 2, 384, 32)
        assert any(not torch.equal(v, online[k]) for k, v in state["target"].items() if v.is_floating_point())
    out = tmp_path / "out"
    shutil.copytree(two_epochs, out)
    banks, start = [], smog.start_epoch
    monkeypatch.setattr(smog, "start_epoch", lambda grouping, bank, *args: banks.append(bank.feats.clone()) or start(
        grouping, bank, *args))
    smog.train(config_of([*SMALL, "--epochs", "3", "--no-knn", "--out-dir", str(out)]))
    assert len(banks) == 1 and torch.equal(banks[0], final["banks"][0])  # epoch 2's start, from epoch 1's bank


def test_automatic_precision_is_bf16_only_on_cpus_that_compute_it_natively(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    capabilities = torch.cpu.get_capabilities()
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda native=native: dict(amx_bf16=native))
        precision, autocast, scaler = smog.resolve_precision(tiny_cfg(tmp_path), cpu)
        assert precision == expected and not scaler.is_enabled()
        assert isinstance(autocast, torch.autocast) == native
        assert not native or autocast.fast_dtype == torch.bfloat16
        for asked in ("fp32", "bf16", "fp16"):  # a precision asked for is the one that runs
            assert smog.resolve_precision(tiny_cfg(tmp_path, "--precision", asked), cpu)[0] == asked
    monkeypatch.undo()
    native = capabilities["amx_bf16"] or capabilities["avx512_bf16"]
    assert smog.resolve_precision(tiny_cfg(tmp_path), cpu)[0] == ("bf16" if native else "fp32")


ARENA_AFTER_64_MIB = """
import ctypes, sys
class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t counters, the heap's size first
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = MallInfo2, ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "keep":
    import smog
    assert smog.setup_device().type == "cpu"
blocks = [libc.malloc(64 << 10) for _ in range(1024)]  # 64 MiB in blocks small enough for the heap, then freed
for block in blocks:
    libc.free(block)
print(libc.mallinfo2().arena)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.slow
def test_cpu_runs_keep_freed_memory_for_reuse():
    # CPU training frees and allocates its activations every step: the heap keeps 1 GiB for them instead of
    # returning it to the OS (page faults at the next step). Without the setting, 64 MiB freed leaves a heap under it.
    def heap_bytes(mode):
        r = subprocess.run([sys.executable, "-c", ARENA_AFTER_64_MIB, mode], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
        assert r.returncode == 0, r.stderr
        return int(r.stdout)
    assert heap_bytes("default") < 1 << 30 <= heap_bytes("keep")


def test_a_run_resumes_under_another_precision_with_a_fresh_scaler(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    scalers = dict(fp32=torch.amp.GradScaler("cpu", enabled=False), fp16=torch.amp.GradScaler("cpu"))
    for written, resumed in (("fp32", "fp16"), ("fp16", "fp32")):
        run = smog.RunState(cfg, torch.device("cpu"), scaler=scalers[written])
        state = dict(online=run.online.state_dict(), target=run.target.state_dict(), epoch=1, step=8, epoch_step=0,
                     grouping=run.grouping.state_dict(), optimizer=run.opt.state_dict(), banks=run.bank.feats[None],
                     bank_filled=0, scaler=run.scaler.state_dict(), elapsed_s=3600.0)
        again = smog.RunState(cfg, torch.device("cpu"), scaler=scalers[resumed])
        again.load(state)
        assert again.step == 8 and "a fresh scaler" in capsys.readouterr().out
        assert 3600 <= again.elapsed_s() < 3660  # the wall-clock goes on from the checkpoint's


@pytest.mark.slow
def test_resume_refuses_another_data_set_size_or_batch_layout(two_epochs):
    flags = [*SMALL, "--epochs", "3", "--no-knn", "--out-dir", str(two_epochs)]
    assert_one_line_error(run_smog(*merged(flags, ["--synthetic-size", "320"])), "--resume", "another data set",
                          "the embedded data set, 384 images", "is the embedded data set, 320 images")
    assert_one_line_error(run_smog(*merged(flags, ["--batch-size", "32"])), "--resume",
                          "checkpoint has --batch-size 64", "the config asks for 32")
    for changed, flag in ((["--seed", "1"], "--seed"), (["--optimizer", "adamw"], "--optimizer"),
                          (["--accumulate", "2"], "--accumulate"),
                          (["--no-exclude-1d"], "--exclude-1d"), (["--hidden-dim", "32"], "--hidden-dim")):
        with pytest.raises(SystemExit, match=f"--resume .*checkpoint has {flag} .*another --out-dir"):  # in-process
            smog.train(config_of(merged(flags, changed)))


def test_resume_checks_the_data_set_fingerprint_and_the_process_count(tmp_path, monkeypatch):
    cfg = config_of(["--batch-size", "32"])
    data = types.SimpleNamespace(labels=torch.zeros(256), fingerprint="the folder B, 256 images")
    state = dict(config=dataclasses.asdict(cfg), processes=1, num_images=256,
                 data_fingerprint="the folder A, 256 images", epoch_step=0)
    with pytest.raises(SystemExit, match="another data set .the folder A, 256 images.* is the folder B"):
        smog.check_resumable("ck.pt", state, cfg, data)
    state["data_fingerprint"] = data.fingerprint
    smog.check_resumable("ck.pt", state, cfg, data)
    monkeypatch.setattr(smog, "world_size", lambda: 2)  # the banks and the data order are per process
    with pytest.raises(SystemExit, match="written by 1 process.es., this run has 2; resume it with as many"):
        smog.check_resumable("ck.pt", state, cfg, data)


@pytest.mark.slow
def test_a_checkpoint_that_loads_but_does_not_fit_falls_back_to_the_previous_one(two_epochs, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(two_epochs, out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    name = next(k for k in state["online"] if k.endswith("conv1.weight"))
    state["online"][name] = state["online"][name][:1]  # a tensor of the wrong shape
    torch.save(state, out / "checkpoint.pt")
    r = run_smog(*SMALL, "--epochs", "3", "--no-knn", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert "checkpoint.pt does not load" in r.stdout and f"resumed from {out / 'checkpoint.prev.pt'}" in r.stdout
    del state["grouping"]  # and one without a state entry: both refused, one line
    torch.save(state, out / "checkpoint.pt")
    torch.save(state, out / "checkpoint.prev.pt")
    assert_one_line_error(run_smog(*SMALL, "--epochs", "4", "--no-knn", "--out-dir", str(out)), "no checkpoint loads",
                          "incomplete: no grouping")


def test_odd_out_dirs_get_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--out-dir .*: cannot write .*Not a directory"):
        smog.main(["--out-dir", str(tmp_path / "file" / "out")])
    (tmp_path / "odd" / "checkpoint.pt").mkdir(parents=True)
    with pytest.raises(SystemExit, match="--out-dir .*checkpoint.pt is not a file"):
        smog.main(["--out-dir", str(tmp_path / "odd")])


@pytest.mark.slow
def test_a_failed_checkpoint_write_ends_in_one_line_and_keeps_the_previous_ones(tmp_path, monkeypatch):
    cfg = config_of([*SMALL, "--epochs", "3", "--no-knn", "--out-dir", str(tmp_path)])
    smog.train(dataclasses.replace(cfg, epochs=1))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file: "
                           "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as e:
        smog.train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    message = str(e.value)
    assert "could not write the checkpoint" in message and "No space left" in message and "\n" not in message
    assert (tmp_path / "checkpoint.pt").read_bytes() == before and not (tmp_path / "checkpoint.pt.tmp").exists()
    assert (tmp_path / "lock").read_text() == ""  # released: the file stays, without a holder


def test_a_checkpoint_write_cut_short_by_a_second_ctrl_c_leaves_no_partial_file(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "--synthetic-size", "64")
    data = types.SimpleNamespace(labels=torch.zeros(64), fingerprint="")
    run = build_nets(cfg)

    def cut_short(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise SystemExit(130)  # what catch_preemption raises on a second Ctrl-C
    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(SystemExit):
        run.save(str(tmp_path / "checkpoint.pt"), cfg, data)
    assert not list(tmp_path.iterdir())


def test_an_epochs_passes_that_fill_no_step_are_dropped_as_drop_last_drops_images(tmp_path):
    cfg = config_of(["--synthetic-size", "512", "--batch-size", "64", "--accumulate", "3", "--out-dir",
                     str(tmp_path)])  # 8 passes of 64: 2 steps of 3, 2 passes dropped
    data = smog.TrainData(cfg, torch.device("cpu"))
    assert (data.steps_per_epoch, data.passes_per_epoch, data.epoch_images) == (2, 6, 384)
    passes = list(data.batches([0, 1]))
    assert len(passes) == 12 and all(images.shape == (64, 3, 32, 32) for images, _, _ in passes)


class RunsCode:
    """Unpickles as a call of os.system: what a malicious 'checkpoint' would hold."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.slow
def test_checkpoint_whose_pickle_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save(dict(config={}, online=RunsCode(f"touch {marker}")), evil)
    for r, flag in ((run_smog("--resume", str(evil), "--out-dir", str(tmp_path / "out")), "--resume"),
                    (run_script("eval_linear.py", "--checkpoint", str(evil)), "--checkpoint")):
        assert_one_line_error(r, flag, str(evil), "could run code")
        assert not marker.exists()


# ----- Part 2, processes and faults: preemption, lock, divergence, killed and stalled processes --------------------

def test_catch_preemption_records_sigterm_sigusr1_and_sigint_then_restores_handlers():
    signals = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    before = [signal.getsignal(s) for s in signals]
    with smog.catch_preemption() as caught:
        for s in signals:
            os.kill(os.getpid(), s)
            time.sleep(0.05)  # Python runs handlers between bytecodes of the main thread
    assert caught == list(signals)
    assert [signal.getsignal(s) for s in signals] == before


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_130_and_a_second_one_stops_at_once(tmp_path, capsys):
    out = tmp_path / "out"
    status, lines, stderr = run_signalled(signal.SIGINT, out, *SMALL, "--epochs", "2", "--no-knn")
    assert status == 130 and not stderr.strip()  # no traceback
    assert any("caught Ctrl-C: checkpoint" in line for line in lines), lines
    assert 0 < final_state(out)["epoch_step"] < 6 and (out / "lock").read_text() == ""  # mid-epoch; out-dir free
    # Ctrl-C while torch is imported: 130, no traceback
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "smog.py"), "--out-dir", str(tmp_path / "importing")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.6)  # torch takes seconds to import; the handler is set before it
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    # Ctrl-C before training (data loaded, the bank being filled): 130 too, one line, no traceback
    status, _, stderr = run_signalled(signal.SIGINT, tmp_path / "early", *SMALL, "--epochs", "2", at="data:")
    assert status == 130 and "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 1, stderr
    with pytest.raises(SystemExit) as e:  # the second Ctrl-C: at once
        with smog.catch_preemption():
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
    assert e.value.code == 130 and "stopped at once by a second Ctrl-C" in capsys.readouterr().err


@pytest.mark.slow
def test_a_live_runs_lock_refuses_a_second_run_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    import socket
    error, held = smog.take_lock(str(tmp_path))  # a live holder (flock: another open file, even in this process)
    assert error is None
    with pytest.raises(SystemExit, match=f"--out-dir .*in use by process {os.getpid()} on {socket.gethostname()}"):
        smog.main([*SMALL, "--epochs", "1", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "checkpoint.pt").exists()
    held.close()  # what the kernel does when the holder dies: the lock is free, its line stays
    # A dead holder's line, whatever it names (this very pid after a container restart, a pid too large for this
    # host, another host after a node loss): the lock is free, so it is taken, and the line is this holder's.
    for holder in (f"process {os.getpid()} on {socket.gethostname()}", "process 99999999999 on node017"):
        (tmp_path / "lock").write_text(holder + " since 2026-01-01 00:00:00")
        error, held = smog.take_lock(str(tmp_path))
        assert error is None and (tmp_path / "lock").read_text().startswith(f"process {os.getpid()} on ")
        held.close()
    smog.train(config_of([*SMALL, "--epochs", "1", "--no-knn", "--out-dir", str(tmp_path)]))
    assert (tmp_path / "lock").read_text() == ""  # a run that ends leaves no holder line


TAKE_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import smog
    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))  # all at the same moment
    error, lock = smog.take_lock(sys.argv[1])
    print("refused" if error else "holds", flush=True)
    time.sleep(1.5)
""")


@pytest.mark.slow
def test_four_processes_taking_over_one_stale_lock_at_once_give_one_holder(tmp_path):
    script = tmp_path / "take.py"
    script.write_text(TAKE_LOCK.format(repo=REPO))
    for trial in range(1):  # the flock is atomic by construction; remove-then-create failed 14 times in 30
        out = tmp_path / f"out{trial}"
        out.mkdir()
        (out / "lock").write_text("process 12345 on gone-host since 2026-01-01 00:00:00")
        start = time.time() + 3.0
        procs = [subprocess.Popen([sys.executable, str(script), str(out), str(start)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        results = [p.communicate(timeout=60) for p in procs]
        assert all("Traceback" not in err for _, err in results), results
        assert sorted(o.strip().splitlines()[-1] for o, _ in results) == ["holds", "refused", "refused", "refused"]


def test_a_read_only_out_dir_is_one_line_before_any_data_is_read(tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(smog, "open_in_out_dir", read_only)  # the lock is the first file the run writes
    monkeypatch.setattr(smog, "load_dataset", lambda *a: pytest.fail("data read before the out-dir was checked"))
    with pytest.raises(SystemExit, match="--out-dir .*: cannot write .*lock .Read-only file system."):
        smog.train(config_of(["--out-dir", str(tmp_path)]))


@pytest.mark.slow
def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = smog.smog_loss
    calls = []

    def loss_nan_at_step_8(logits, labels):
        calls.append(1)
        loss = real_loss(logits, labels)
        return loss * float("nan") if len(calls) == 9 else loss  # steps 0..5 are epoch 0; step 8 goes bad

    monkeypatch.setattr(smog, "smog_loss", loss_nan_at_step_8)
    cfg = config_of(merged(SMALL, ["--epochs", "3", "--log-every", "100", "--no-knn", "--out-dir", str(tmp_path)]))
    with pytest.raises(SystemExit) as e:
        smog.train(cfg)
    message = str(e.value)
    assert "step 8" in message and "checkpoint.pt (after 1 epochs)" in message and "\n" not in message
    state = final_state(tmp_path)  # the checkpoint on disk is the last good one, with finite weights
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["online"].values() if v.is_floating_point())


def workers_of(torchrun_pid):
    """{rank: pid} of the training processes below a torchrun process (read from /proc)."""
    found, todo = {}, [torchrun_pid]
    while todo:
        pid = todo.pop()
        try:
            todo += map(int, open(f"/proc/{pid}/task/{pid}/children").read().split())
            env = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
        except OSError:
            continue
        if "LOCAL_RANK" in env and pid != torchrun_pid:
            found[int(env["RANK"])] = pid
    return found


def torchrun(out, *flags, restarts=0, limit=240):
    """smog.py in 2 gloo processes under torchrun, killed after `limit` seconds so that a hang fails the test."""
    import threading
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             f"--max-restarts={restarts}", os.path.join(REPO, "smog.py"),
                             *merged(SMALL, ["--no-knn", "--out-dir", str(out)], flags)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    timer = threading.Timer(limit, lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
    timer.daemon = True
    timer.start()
    return proc


@pytest.mark.slow
def test_killed_process_restarts_the_group_which_resumes_and_matches_an_uninterrupted_run(tmp_path):
    flags = ["--epochs", "3", "--log-every", "1", "--checkpoint-every", "2"]  # 3 steps per epoch over 2 processes
    straight = torchrun(tmp_path / "straight", *flags)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-3000:]
    proc, lines = torchrun(tmp_path / "killed", *flags, restarts=1), []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 5/") and not any(seen.startswith("resumed from") for seen in lines):
            os.kill(workers_of(proc.pid)[1], signal.SIGKILL)  # checkpoints were written at steps 2, 3 and 4
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert any(line.startswith("resumed from") and "(mid-epoch, after 1 steps)" in line for line in lines), lines
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert a["step"] == b["step"] == 9
    for key in ("online", "target", "grouping"):
        for name in a[key]:
            assert torch.allclose(a[key][name].float(), b[key][name].float(), atol=1e-6), (key, name)


@pytest.mark.slow
def test_stalled_process_ends_the_others_within_the_timeout(tmp_path):
    proc = torchrun(tmp_path / "out", "--epochs", "50", "--log-every", "1", "--dist-timeout", "10")
    for line in proc.stdout:
        if line.startswith("step 2/"):
            stalled, t0 = workers_of(proc.pid)[1], time.time()
            os.kill(stalled, signal.SIGSTOP)
            break
    message, waited = "", math.inf
    for line in proc.stderr:
        if "smog.py: error:" in line:
            message, waited = line, time.time() - t0
            break
    os.killpg(proc.pid, signal.SIGKILL)
    os.kill(stalled, signal.SIGKILL)  # torchrun starts its workers in sessions of their own: killpg misses it
    assert proc.wait(timeout=120) != 0
    assert "process 0 of 2 stopped at step" in message and "--dist-timeout 10 s" in message, message
    assert 5 < waited < 40


DRIVER = textwrap.dedent("""
    import gc, os, sys, torch
    sys.path.insert(0, {repo!r})
    import smog
    torch.set_num_threads(1)
    run = smog.train(smog.parse_command(sys.argv[1:])[0])
    state = dict(centroids=run.grouping.centroids, target=dict(run.target.named_parameters()),
                 online=dict(run.online.named_parameters()), banks_here=smog.gather_to_0(run.bank.feats) is not None)
    # (BN's running statistics are per process without SyncBN, on CPUs, and made equal at every epoch start)
    torch.save(state, os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
    # The run (its DDP's last gloo work among it) goes before the group, as in main(): left to the interpreter's
    # exit, gloo's threads can free those tensors after Python is gone, and the process aborts
    del run, state
    gc.collect()
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", ["1", "2"])
def test_torchrun_two_processes_stay_in_sync(tmp_path, accumulate):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=REPO, out=str(tmp_path)))
    # 390 images: 195 per rank, 3 steps of 64 and the tails dropped, and they must still agree after the epoch's
    # steps and the next epoch's k-means. With --accumulate 2, 5 passes of 36 per rank: 2 steps and a pass dropped.
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(driver), *merged(SMALL, ["--synthetic-size", "390", "--epochs", "2", "--no-knn",
                                                     "--accumulate", accumulate, "--batch-size",
                                                     "64" if accumulate == "1" else "36",
                                                     "--out-dir", str(tmp_path / "out")])],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    assert "processes: 2" in r.stdout
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert torch.equal(r0["centroids"], r1["centroids"])
    for key in ("target", "online"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)
    assert r0["banks_here"] and not r1["banks_here"]  # a checkpoint gathers every bank to rank 0 alone
    assert final_state(tmp_path / "out")["banks"].shape == (2, 2, 192 if accumulate == "1" else 144, 32)


SPLIT_DRIVER = textwrap.dedent("""
    import gc, os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {repo!r})
    import smog
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    grouping = smog.MomentumGrouping(20, 8, 3)
    z = torch.randn(3, 64, 8)  # the whole batch, the same on both ranks: each updates with its half
    grouping.update(z[:, rank * 32:(rank + 1) * 32], beta=0.9)
    updated = grouping.centroids.clone()
    bank = torch.randn(3, 100, 8)  # each rank clusters its half
    grouping.kmeans_(bank[:, rank * 50:(rank + 1) * 50], iters=4, generator=torch.Generator().manual_seed(1))
    # Three training steps, each rank on its own images: weights and groups must stay identical.
    cfg = smog.parse_command(["--batch-size", "16", "--num-groups", "10", "--hidden-dim", "32", "--feat-dim", "16",
                              "--num-local", "1"])[0]
    run = smog.RunState(cfg, torch.device("cpu"))
    images = smog.synthetic_shapes(32, seed=5)[0][rank * 16:(rank + 1) * 16]
    sizes = torch.tensor([[32, 32]]).expand(16, 2)
    recipe = smog.crop_recipe(cfg)
    losses = []
    for step in range(3):
        torch.manual_seed(smog.seed_for(cfg.seed, step, rank))
        loss, _, _, _ = smog.train_step(run.online_ddp, run.target, run.grouping,
                                        [smog.batch_multicrop(images, sizes, step, recipe)], run.opt,
                                        run.scaler, beta=0.99, tau=cfg.tau, ema=cfg.ema)
        losses.append(loss.item())
    params = {{name: p for name, p in run.online.named_parameters()}}
    params.update({{"target." + name: p for name, p in run.target.named_parameters()}})
    torch.save(dict(updated=updated, kmeans=grouping.centroids.clone(), centroids=run.grouping.centroids,
                    params=params, losses=losses), os.path.join({out!r}, "split%d.pt" % rank))
    del run, params
    gc.collect()  # the run before the group (the driver above says why)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_processes_split_update_and_kmeans_as_one_and_stay_in_sync_for_three_steps(tmp_path):
    driver = tmp_path / "split.py"
    driver.write_text(SPLIT_DRIVER.format(repo=REPO, out=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(driver)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    # One process with the whole batch and the whole bank (no process group: nothing is all-reduced).
    torch.manual_seed(0)
    one = smog.MomentumGrouping(20, 8, 3)
    z = torch.randn(3, 64, 8)
    one.update(z, beta=0.9)
    updated = one.centroids.clone()
    bank = torch.randn(3, 100, 8)
    # k-means as specified: init from rank 0's rows (the first half of the bank), M-steps over the whole bank
    gen = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(50, generator=gen)[:20] for _ in range(3)])
    one.centroids.copy_(F.normalize(torch.gather(bank[:, :50], 1, idx[..., None].expand(3, 20, 8)), dim=-1))
    for _ in range(4):
        one.update(bank, beta=0.0)
    splits = [torch.load(tmp_path / f"split{rank}.pt", weights_only=True) for rank in (0, 1)]
    for split in splits:
        assert (split["updated"] - updated).abs().max() <= 1e-6
        assert (split["kmeans"] - one.centroids).abs().max() <= 1e-6
    # after 3 steps on different images (different losses), identical groups and online and target weights
    assert splits[0]["losses"] != splits[1]["losses"]
    assert torch.equal(splits[0]["centroids"], splits[1]["centroids"])
    assert splits[0]["params"].keys() == splits[1]["params"].keys()
    for name, p in splits[0]["params"].items():
        assert torch.equal(p, splits[1]["params"][name]), name


# ----- Part 2, reports and the command line ------------------------------------------------------------------------

def test_skipped_steps_and_scale_are_logged(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, "--precision", "fp16")
    jsonl = open(tmp_path / "log.jsonl", "w")
    run = types.SimpleNamespace(step=0, scaler=torch.amp.GradScaler("cpu"), elapsed_s=lambda: 0.0)
    progress = smog.Progress(cfg, run, 200, jsonl)
    counts = torch.ones(cfg.num_heads, cfg.num_groups)
    for interval, skips in enumerate((3, 10)):  # each log line counts its own interval's skipped steps
        for i in range(50):
            progress.add(counts, torch.tensor(i < skips))
        run.step += 50
        progress.report(0, torch.tensor(1.0), 0.1, 0.99)
    out = capsys.readouterr().out
    assert "fp16 steps skipped 3, scale 65536" in out and "fp16 steps skipped 10, scale 65536" in out
    jsonl.close()
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["skipped_steps"] for r in records] == [3, 10] and records[0]["grad_scale"] == 65536.0


def test_knn_on_toy_set_with_known_answer():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    test = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.8, 0.2]]), dim=1)
    assert smog.knn_top1(train, labels, test, torch.tensor([0, 1, 0]), k=2) == 100.0
    assert smog.knn_top1(train, labels, test, torch.tensor([1, 0, 1]), k=2) == 0.0


@pytest.mark.slow
def test_plot_draws_each_panel_with_k_and_log_k_dashed_and_skips_damaged_lines(tmp_path, monkeypatch, capsys):
    k = 200
    records = [dict(step=s, epoch=s // 31, loss=6.0 - s / 100, lr=0.1, beta=1 - s / 31000, groups_used=200.0,
                    assign_entropy=5.26, assign_entropy_max=math.log(k), img_per_s=400.0, elapsed_s=s / 5)
               for s in range(100, 4961, 100)]
    records += [dict(step=s, epoch=e, knn_top1=v, elapsed_s=s / 5)
                for s, e, v in ((496, 15, 59.0), (2480, 79, 86.2), (4960, 159, 91.1))]
    lines = [json.dumps(r) for r in records]
    lines.insert(5, '{"step": 600, "epoch": 19, "loss": 5.')  # a record cut short by a kill
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib.figure
    except ImportError:  # matplotlib is optional: without it, one line naming it
        with pytest.raises(SystemExit, match="^smog.py: error: --plot needs matplotlib"):
            smog.main(["--plot", str(tmp_path)])
        return
    (tmp_path / "elsewhere").write_text("IMPORTANT")
    (tmp_path / "curves.png").symlink_to(tmp_path / "elsewhere")  # replaced, never written through
    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or
                        save(fig, *a, **kw))
    smog.main(["--plot", str(tmp_path)])
    assert "(1 damaged lines of log.jsonl skipped)" in capsys.readouterr().out
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "elsewhere").read_text() == "IMPORTANT"
    axes = figures[0].axes
    assert [(ax.get_title(), ax.get_xlabel()) for ax in axes] == [(key, "step") for key in (
        "loss", "lr", "beta", "groups_used", "assign_entropy", "img_per_s", "knn_top1")] + [("knn_top1", "minutes")]
    curves = [[(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()] for ax in axes]
    assert len(curves[0][0][0]) == 49 and curves[0][0][0][0] == 100  # the damaged line is not among them
    assert curves[3][1][1] == [200, 200] and curves[4][1][1] == [math.log(k)] * 2  # dashed at K and log K
    assert curves[6] == [([496, 2480, 4960], [59.0, 86.2, 91.1])]
    assert curves[7][0][0] == pytest.approx([496 / 300, 2480 / 300, 4960 / 300])  # the run's minutes
    assert_one_line_error(run_smog("--plot", str(tmp_path / "nowhere")), "--plot", "log.jsonl")


@pytest.mark.slow
def test_bad_input_gives_one_line_errors(tmp_path):
    assert_one_line_error(run_smog("--data", str(tmp_path / "missing")), "--data", "missing")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_smog("--resume", str(tmp_path / "nope.pt"), "--out-dir", str(tmp_path)), "--resume")
    out = ["--out-dir", str(tmp_path / "out")]
    for argv, flag in ((["--data", str(tmp_path / "empty")], "--data"), (["--arch", "resnet9000"], "--arch"),
                       (["--preset", "huge"], "--preset"), (["--synthetic-size", "100", "--batch-size", "128"],
                                                            "--batch-size")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit, match=f"^smog.py: error: {flag}"):  # in-process: the same fail() line
            smog.main([*argv, *out])
    for value, why in (("nan", "must be a finite number"), ("inf", "must be a finite number"),
                       ("-1", "must be at least 0")):
        with pytest.raises(SystemExit, match=f"--clip-grad .*{why}"):
            config_of(["--clip-grad", value])


# ----- misuse: links planted in the out-dir, text from checkpoints, cut logs, odd files and flags -------------------

@pytest.mark.slow
def test_nothing_is_written_through_a_link_planted_in_the_out_dir(tmp_path, capsys):
    victim, elsewhere = tmp_path / "victim", tmp_path / "elsewhere"  # a file to protect; where a dangling link points
    victim.write_text("IMPORTANT")
    flags = [*SMALL, "--epochs", "1", "--no-knn"]
    for name, target in (("lock", victim), ("lock", elsewhere), ("log.jsonl", victim)):  # refused in one line
        out = tmp_path / f"refused-{name}-{target.name}"
        out.mkdir()
        (out / name).symlink_to(target)
        with pytest.raises(SystemExit, match=f"--out-dir .*: cannot write .*{name} .a link, which smog.py never "
                                             f"writes through; remove it."):
            smog.main([*flags, "--out-dir", str(out)])
    for name, target in (("checkpoint.pt.tmp", victim), ("checkpoint.pt", elsewhere)):
        out = tmp_path / f"replaced-{name}"  # our own files: the link replaced, never written through
        out.mkdir()
        (out / name).symlink_to(target)
        smog.main([*flags, "--out-dir", str(out)])
        assert final_state(out)["epoch"] == 1 and not (out / "checkpoint.pt").is_symlink()
        assert not (out / "checkpoint.pt.tmp").exists()
    (tmp_path / "backbone.pt.tmp").symlink_to(victim)  # eval_linear.py --export's temporary file
    export_in_process(capsys, tmp_path / "replaced-checkpoint.pt" / "checkpoint.pt", tmp_path / "backbone.pt")
    assert torch.load(tmp_path / "backbone.pt", weights_only=True) and not (tmp_path / "backbone.pt.tmp").exists()
    assert victim.read_text() == "IMPORTANT" and not elsewhere.exists()


def test_text_from_a_checkpoint_is_escaped_and_a_checkpoint_that_does_not_fit_says_why(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    run = build_nets(cfg)
    run.save(str(tmp_path / "good.pt"), cfg, types.SimpleNamespace(labels=torch.zeros(256), fingerprint="A\x1b[2J"))
    state = torch.load(tmp_path / "good.pt", weights_only=True)
    monkeypatch.setattr(smog, "log", lambda *args: None)
    data = types.SimpleNamespace(labels=torch.zeros(256), fingerprint="the embedded data set")
    with pytest.raises(SystemExit) as e:  # a shared checkpoint's text clears no screen
        smog.check_resumable("good.pt", state, cfg, data)
    assert "another data set (A\\x1b[2J)" in str(e.value) and "\x1b" not in str(e.value)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    state["online"]["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "extra.pt")
    for name, why in (("notes.pt", "not a checkpoint .torch.save writes zip archives."),
                      ("extra.pt", 'Unexpected key.s. in state_dict: "extra.weight"')):
        with pytest.raises(SystemExit, match=f"--resume: no checkpoint loads: .*{name} .*{why}"):
            build_nets(cfg).resume([str(tmp_path / name)], cfg, types.SimpleNamespace(
                labels=torch.zeros(256), fingerprint="A\x1b[2J"))


@pytest.mark.slow
def test_a_resumed_run_ends_a_log_line_that_a_kill_cut_short(two_epochs, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(two_epochs, out)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 12, "epoch": 1, "lo')  # a record cut by a kill or a full disk
    smog.train(config_of([*SMALL, "--epochs", "3", "--no-knn", "--out-dir", str(out)]))
    lines = (out / "log.jsonl").read_text().splitlines()
    damaged = [line for line in lines if not line.startswith("{") or not line.endswith("}")]
    assert damaged == ['{"step": 12, "epoch": 1, "lo'] and json.loads(lines[-1])["step"] == 18


def test_odd_flags_and_lock_files_get_one_line(tmp_path, monkeypatch):
    for argv, message in ((["--batch-size", "1"], "--batch-size 1: must be at least 2 .BatchNorm"),
                          (["--workers", "100000"], "--workers 100000: must lie in .0, 256."),
                          (["--epochs", "2", "--epochs", "3"], "--epochs is given 2 times; give it once"),
                          (["--no-knn", "--knn"], "--knn is given 2 times"),
                          (["--batched-aug", "on"], "unrecognized arguments: --batched-aug on")):
        with pytest.raises(SystemExit, match=f"^smog.py: error: {message}"):
            config_of(argv)
    (tmp_path / "data" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit, match="--out-dir .*/data/out: lies in --data .*, where it would be read as a class"):
        smog.main(["--data", str(tmp_path / "data"), "--out-dir", str(tmp_path / "data" / "out")])
    assert not (tmp_path / "data" / "out").exists()  # refused before anything was made
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "lock")
    (tmp_path / "dir" / "lock").mkdir(parents=True)
    for name, why in (("fifo", "not a regular file; remove it"), ("dir", "Is a directory")):
        error, lock = smog.take_lock(str(tmp_path / name))
        assert lock is None and error == f"--out-dir {tmp_path / name}: cannot write {tmp_path / name / 'lock'} ({why})"

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(smog.fcntl, "flock", no_locks)  # a file system without locks: two runs could not be told apart
    error, lock = smog.take_lock(str(tmp_path / "nolocks"))
    assert lock is None and error.endswith(f"cannot lock {tmp_path / 'nolocks' / 'lock'} (No locks available)")


@pytest.mark.slow
def test_sigterm_while_the_bank_fills_ends_in_one_line(tmp_path):
    status, _, stderr = run_signalled(signal.SIGTERM, tmp_path / "out", *merged(SMALL, ["--synthetic-size", "20000"]),
                                      at="data:")
    assert status == 128 + signal.SIGTERM and len(stderr.strip().splitlines()) == 1, stderr
    assert "smog.py: stopped by SIGTERM" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_a_streamed_folder_of_mixed_sizes_and_modes_trains(tmp_path):
    import PIL.Image
    images, _ = smog.synthetic_shapes(40, seed=0)
    modes = ["RGB", "L", "CMYK", "P", "RGB"]  # JPEGs of every size, grey and CMYK ones, palette PNGs, a GIF
    for i, image in enumerate(images):
        pil = PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).resize((32 + 7 * (i % 5), 32 + 5 * (i % 3)))
        folder = tmp_path / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pil = pil.convert(modes[i % 5])
        if i == 39:  # an animated GIF: its first frame
            pil.save(folder / "anim.gif", save_all=True, append_images=[pil.rotate(90)], duration=100)
        else:
            pil.save(folder / f"{i}.{'png' if pil.mode == 'P' else 'jpg'}")
    assert len(smog.ImageFolderData(str(tmp_path / "train"))) == 40
    out = tmp_path / "out"
    smog.main(["--data", str(tmp_path), "--batch-size", "8", "--epochs", "2", "--num-groups",
               "8", "--hidden-dim", "16", "--feat-dim", "8", "--log-every", "1", "--workers", "2",
               "--out-dir", str(out)])
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 11)) and all(math.isfinite(r["loss"]) for r in records)
    assert sum(r["bad_images"] for r in records) == 0


# ----- eval_linear.py ----------------------------------------------------------------------------------------------

def fake_checkpoint(path, *flags):
    cfg = config_of(list(flags))
    torch.manual_seed(0)
    online = smog.make_online(cfg)
    torch.save(dict(config=dataclasses.asdict(cfg), online=online.state_dict()), path)
    return online


def probe_result(r):
    """eval_linear.py's JSON line, checked against its final-epoch log line."""
    result = json.loads(r.stdout.strip().splitlines()[-1])
    final = re.search(r"final epoch (\d+): top-1 ([\d.]+)%  top-5 ([\d.]+)%", r.stdout)
    assert final and int(final[1]) == result["epochs"], r.stdout
    assert (round(result["top1"], 2), round(result["top5"], 2)) == (float(final[2]), float(final[3]))
    assert result["top1"] > 11, result  # above chance (10 classes), from untrained features (measured: 13.8-16.1)
    return result


def run_eval(*args):
    return run_script("eval_linear.py", *args)


def export_in_process(capsys, checkpoint, export):
    """eval_linear.py --export, called in this process (no new interpreter): its printed output as run_eval's."""
    import eval_linear
    eval_linear.main(["--checkpoint", str(checkpoint), "--export", str(export)])
    return subprocess.CompletedProcess([], 0, capsys.readouterr().out, "")


@pytest.mark.slow
def test_eval_linear_json_line_and_frozen_backbone(tmp_path):
    fake_checkpoint(tmp_path / "ck.pt", "--synthetic-size", "300")
    r = run_eval("--checkpoint", str(tmp_path / "ck.pt"), "--cache-features", "--knn", "--epochs", "3")
    assert r.returncode == 0, r.stderr
    result = probe_result(r)
    assert set(result) >= {"top1", "top5", "best_top1", "best_epoch", "knn_top1", "checkpoint", "epochs"}
    assert result["epochs"] == 3 and 1 <= result["best_epoch"] <= 3 and result["best_top1"] >= result["top1"]
    assert result["top5"] > result["top1"] and "best epoch" in r.stdout
    assert result["standardized"]  # ours, the default for small runs
    # A checkpoint of a paper preset is probed on raw features, as the authors do, unless told otherwise.
    fake_checkpoint(tmp_path / "paper.pt", "--preset", "imagenet-r50", "--arch", "resnet_tiny", "--data", "synthetic",
                    "--synthetic-size", "300", "--global-size", "32", "--hidden-dim", "32", "--feat-dim", "16")
    for flags, expected in (((), False), (("--standardize", "on"), True)):
        r = run_eval("--checkpoint", str(tmp_path / "paper.pt"), "--cache-features", "--epochs", "2", *flags)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["standardized"] is expected


@pytest.mark.slow
def test_eval_linear_augmented_probe_and_torchrun_two_processes(tmp_path):
    fake_checkpoint(tmp_path / "ck.pt", "--synthetic-size", "300", "--hidden-dim", "32", "--feat-dim", "16")
    flags = ["--checkpoint", str(tmp_path / "ck.pt"), "--epochs", "3", "--batch-size", "64", "--workers", "0", "--knn"]
    r = run_eval(*flags)  # RandomResizedCrop + flip views every epoch
    assert r.returncode == 0, r.stderr
    augmented = probe_result(r)
    assert augmented["epochs"] == 3
    one = json.loads(run_eval(*flags, "--cache-features").stdout.strip().splitlines()[-1])
    runs = {}
    for mode in ("--cache-features", ""):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            os.path.join(REPO, "eval_linear.py"), *flags, *filter(None, [mode])], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
        assert "processes: 2" in r.stdout
        runs[mode] = probe_result(r)
    # Each process extracts half of the features; gathered in data set order, the cached probe is the same run.
    assert runs["--cache-features"]["top1"] == pytest.approx(one["top1"], abs=1e-6)
    assert runs["--cache-features"]["knn_top1"] == pytest.approx(one["knn_top1"], abs=1e-6)


@pytest.mark.slow
def test_eval_linear_refuses_checkpoint_with_missing_key(tmp_path):
    fake_checkpoint(tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    del state["online"][next(k for k in state["online"] if k.startswith("encoder.backbone."))]
    torch.save(state, tmp_path / "broken.pt")
    assert_one_line_error(run_eval("--checkpoint", str(tmp_path / "broken.pt"), "--cache-features"), "missing")
    assert_one_line_error(run_eval("--checkpoint", str(tmp_path / "nope.pt")), "--checkpoint")


def load_export_as_advised(r, arch):
    """Runs the loading code that eval_linear.py --export printed; returns the model it built."""
    import torchvision
    line = r.stdout.strip().splitlines()[-1]
    assert f"backbone ({arch}) written to" in line and "strict=False" not in line
    scope = dict(torch=torch, torchvision=torchvision, smog=smog)
    exec(line.split("with strict key matching: ", 1)[1], scope)  # e.g. "m = ...; m.load_state_dict(torch.load(...))"
    return scope["m"]


@pytest.mark.parametrize("arch", ["resnet18", "resnet18_cifar", "resnet_tiny"])
@pytest.mark.slow
def test_eval_linear_export_loads_where_it_says(arch, tmp_path, capsys):
    online = fake_checkpoint(tmp_path / "ck.pt", "--arch", arch, "--hidden-dim", "32", "--feat-dim", "16")
    r = export_in_process(capsys, tmp_path / "ck.pt", tmp_path / "backbone.pt")
    assert r.returncode == 0, r.stderr
    sd = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.", "encoder.")) for k in sd)
    model = load_export_as_advised(r, arch)
    assert ("no torchvision model is resnet_tiny" in r.stdout) == (arch == "resnet_tiny")  # said where none exists
    first_conv = next(k for k in sd if k.endswith("weight") and sd[k].ndim == 4)
    assert torch.equal(model.state_dict()[first_conv], online.encoder.backbone.state_dict()[first_conv])


def test_eval_linear_export_never_overwrites_a_checkpoint_and_checks_its_flags(tmp_path, capsys):
    import eval_linear
    fake_checkpoint(tmp_path / "ck.pt", "--hidden-dim", "32", "--feat-dim", "16")
    ck = str(tmp_path / "ck.pt")
    before = (tmp_path / "ck.pt").read_bytes()
    (tmp_path / "other.pt").write_bytes(before)
    (tmp_path / "old.pt").write_text("an earlier export")
    for argv, message in (([ck, "--export", ck], "is a smog.py checkpoint"),
                          ([ck, "--export", str(tmp_path / "other.pt"), "--force"], "is a smog.py checkpoint"),
                          ([ck, "--export", str(tmp_path / "old.pt")], "exists; add --force"),
                          ([ck, "--export", str(tmp_path / "nope" / "b.pt")], "does not exist; create it"),
                          ([ck, "--export", str(tmp_path)], "a folder; give the path of the file to write"),
                          ([ck, "--arch", "resnet50"], "--arch resnet50: the checkpoint"),
                          ([ck, "--lr", "-1"], "--lr -1.0: must be a finite positive number"),
                          ([ck, "--weight-decay", "nan"], "--weight-decay nan")):
        with pytest.raises(SystemExit, match=f"^eval_linear.py: error: .*{re.escape(message)}"):
            eval_linear.main(["--checkpoint", *argv])
    assert (tmp_path / "ck.pt").read_bytes() == before and (tmp_path / "other.pt").read_bytes() == before
    eval_linear.main(["--checkpoint", ck, "--export", str(tmp_path / "old.pt"), "--force"])
    assert "written to" in capsys.readouterr().out and "encoder.backbone" not in str(
        torch.load(tmp_path / "old.pt", weights_only=True).keys())
    state = torch.load(ck, weights_only=True)
    state["config"]["arch"] = "resnet9000"
    torch.save(state, tmp_path / "foreign.pt")
    with pytest.raises(SystemExit, match="--arch 'resnet9000', which this smog.py does not have"):
        eval_linear.main(["--checkpoint", str(tmp_path / "foreign.pt"), "--export", str(tmp_path / "x.pt")])


@pytest.mark.slow
def test_eval_linear_takes_paths_only_from_its_own_flags(tmp_path):
    fake_checkpoint(tmp_path / "ck.pt", "--data", "cifar10", "--out-dir", str(tmp_path / "chosen_by_author"))
    r = run_eval("--checkpoint", str(tmp_path / "ck.pt"), "--cache-features")
    assert_one_line_error(r, "--data", "give the data set", "cifar10")
    assert not (tmp_path / "chosen_by_author").exists()


# ----- bench.py and launch.sh --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_runs_every_part_on_cpu():
    r = run_script("bench.py", "--steps", "1", "--warmup", "0", "--batch-size", "8", "--workers", "0", "--bn-reps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("a_ceiling_img_per_s", "b_step_img_per_s", "c_e2e_img_per_s", "c_loader_decode_ms_per_img",
                "c_loader_decode_and_cut_ms_per_img", "c_device_aug_ms_per_step", "d_update_over_floor", "b_over_a",
                "bn_over_sizes_ratio"):
        assert 0 < result[key] < math.inf, key  # every part ran and measured something
    assert result["device"] == "cpu" and result["batch_size"] == 8
    for part in ("(a)", "(b)", "(b) BN over all crop sizes", "(c)", "(d)"):  # and said so in its own line
        assert any(line.startswith(part) for line in r.stdout.splitlines()), part
    for argv, needle in ((["--steps", "-1"], "--steps -1: must be at least 1"), (["--arch", "nope"], "--arch 'nope'")):
        assert_one_line_error(run_script("bench.py", *argv), "bench.py: error: " + needle)


@pytest.mark.slow
def test_acceptance_command_trains_in_fp16_and_writes_its_report(tmp_path):
    out = tmp_path / "acceptance"
    r = run_script("bench.py", "--acceptance", str(out), "--steps", "1", "--warmup", "0", "--batch-size", "8",
                   "--workers", "0", "--skip", "a,bn,c")  # bench's parts have their own test
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    report = json.load(open(out / "acceptance.json"))
    assert report["passed"] and report["device"] == "cpu" and report["speed"]["b_step_img_per_s"] > 0
    for name in ("tiny", "r50"):
        run = report["runs"][name]
        assert run["exit"] == 0 and run["finite"] and run["steps"] == 4
        assert run["grad_scale"] is not None and run["skipped_steps"] >= 1  # fp16: the scaler's first steps
        assert 0 <= run["data_wait_mean"] <= run["data_wait_max"] <= 1  # the loader's share of the log intervals
        assert (out / f"{name}.log").exists() and len((out / f"{name}.jsonl").read_text().splitlines()) >= 2
    assert report["runs"]["tiny"]["knn_top1_random_init"] is not None  # the tiny run's final report
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("acceptance PASSED on cpu") and "ok   r50_loss_finite: True" in summary


@pytest.mark.slow
def test_launch_without_gpu_prints_the_cpu_command(tmp_path):
    import shutil
    (tmp_path / "bin").mkdir()  # a PATH without nvidia-smi, on any machine: only what launch.sh needs
    for tool in ("dirname", "wc"):
        (tmp_path / "bin" / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([shutil.which("bash"), os.path.join(REPO, "launch.sh"), "node", "--epochs", "1"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DRY_RUN": "1", "PATH": str(tmp_path / "bin")})
    assert r.returncode == 0, r.stderr
    assert "no GPU found" in r.stdout and "+ python smog.py --epochs 1" in r.stdout


@pytest.mark.slow
def test_a_spooled_copy_of_launch_sh_starts_smog_py_from_the_submit_folder(tmp_path):
    import shutil
    spooled = tmp_path / "spool" / "slurm_script"  # where sbatch runs its copy of the script
    spooled.parent.mkdir()
    shutil.copy(os.path.join(REPO, "launch.sh"), spooled)
    r = subprocess.run(["bash", str(spooled), "single", "--epochs", "1"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, env={**os.environ, "DRY_RUN": "1", "SLURM_SUBMIT_DIR": REPO})
    assert r.returncode == 0 and "+ python smog.py --epochs 1" in r.stdout, r.stderr
    r = subprocess.run(["bash", str(spooled), "single"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={**os.environ, "DRY_RUN": "1", "SLURM_SUBMIT_DIR": str(tmp_path)})
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "smog.py not found in" in r.stderr, r.stderr


@pytest.mark.slow
def test_launch_on_gpus_restarts_a_group_whose_process_died(tmp_path):
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\necho 'GPU 1: stand-in'\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "DRY_RUN": "1", "PATH": f"{tmp_path}:{os.environ['PATH']}", "NNODES": "2",
           "MASTER_ADDR": "node001"}
    for mode, restarts in (("node", "3"), ("multinode", "3"), ("node", "7")):
        r = subprocess.run(["bash", os.path.join(REPO, "launch.sh"), mode, "--epochs", "1"], capture_output=True,
                           text=True, timeout=60, env={**env, "MAX_RESTARTS": restarts} if restarts != "3" else env)
        assert r.returncode == 0, r.stderr
        assert f"--nproc_per_node=gpu --max-restarts={restarts} " in r.stdout, r.stdout


@pytest.mark.slow
def test_launch_slurm_passes_the_preemption_signal_on_and_requeues(tmp_path):
    # Stand-ins for srun (runs until SIGTERM, then exits 0 as smog.py does) and scontrol (records the requeue).
    bin_dir, marks = tmp_path / "bin", tmp_path / "marks"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\ntrap 'echo TERM >> {marks}; exit 0' TERM\necho started >> {marks}\n"
                                  "while :; do sleep 0.05; done\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\ncase $1 in show) echo node001 ;; "
                                      f"requeue) echo requeue $2 >> {marks} ;; esac\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node001",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "42"}
    proc = subprocess.Popen(["bash", os.path.join(REPO, "launch.sh"), "slurm", "--epochs", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if marks.exists() and "started" in marks.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert marks.read_text().split("\n")[1:3] == ["TERM", "requeue 42"], marks.read_text()
    assert "+ srun torchrun --nnodes=1" in out and "requeueing job 42" in out
