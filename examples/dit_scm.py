"""Train a small DiT as a consistency model on real images (scikit-learn's 8×8 digits), with fastcm.

Data: the 1797 handwritten digits bundled with scikit-learn (sklearn.datasets.load_digits), scaled to
[−1, 1] and upsampled bilinearly to 16×16; a fixed 20% is held out for scoring. Network: the DiT of
dit_small.py (fastcm.nn.Attention inside). Recipes:
  scm (default)  sCM consistency training (Lu & Song 2024): TrigFlow, f = cos t·x − sin t·σd·F
                 (fastcm.precondition, param="trigflow"), the tangent from torch.func.jvp through the
                 DiT (fastcm's fused attention JVP), fastcm.scm_loss; sampling fastcm.sampling.sample_trigflow.
  ect            easy consistency tuning's schedule from scratch (Geng et al. 2024): lognormal t,
                 r = t·(1 − n(t)/q^stage), n(t) = 1 + 8·sigmoid(−t), target f(x + r·z, r) without gradient,
                 fastcm.pseudo_huber_loss weighted by 1/(t − r), CM preconditioning; fastcm.sampling.sample_cm.
Parameters are averaged by fastcm.ema (EDM2 power EMAs, σ_rel 0.05 and 0.10); samples come from the
σ_rel = 0.10 average. bf16 autocast on CUDA.

Score: a small CNN classifier trained on the training split of the real digits is the feature
extractor. "FD" is the Fréchet distance between Gaussians fitted to its penultimate features (64-d) of
a sample set and of the held-out digits (FID's formula, on this classifier instead of Inception);
"coverage" is the number of the 10 classes that receive at least 5% of the set's classifier labels;
"confidence" the mean top softmax probability. The real rows (training digits; held-out digits scored
against themselves would be 0) and Gaussian noise bound the scale.

    python examples/dit_scm.py --out dit_scm_out    # both backends: 2 × 800 steps, 872 s on a busy 2-core CPU

With the defaults (seed 0, CPU) FD is 253 (1 step) and 324 (2 steps) for the fastcm backend, 273 and
357 for the reference, against 12.4 for real training digits and 1234 for noise (README).
"""

import argparse
import math
import os
import pathlib
import time

import torch
from dit_small import DiT

import fastcm
import fastcm.ema
from fastcm.schedules import ct_loss_weight, scm_sample_t, tangent_warmup

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIZE = 16
HELD_OUT = 0.2
EMA_SIGMA_RELS = (0.05, 0.10)
SAMPLE_PROFILE = 1


# ------------------------------------------------------------------ data


def load_digits_16(seed: int = 0):
    """(train, held_out): images (N, 1, 16, 16) in [−1, 1] and labels (N,), split by a seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    images = torch.nn.functional.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    cut = int(len(images) * (1 - HELD_OUT))
    return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])


# ------------------------------------------------------------------ consistency functions and steps


def trigflow_f(net, x_t, t):
    """f(x_t, t) = cos t·x_t − sin t·σd·F(x_t/σd, t)."""
    # Under CUDA autocast the network answers in bfloat16; fastcm.precondition takes net_out in x's dtype.
    net_out = net(x_t / SIGMA_DATA, t).to(x_t.dtype)
    return fastcm.precondition(x_t, net_out, t, param="trigflow", sigma_data=SIGMA_DATA)


def cm_f(net, x, sigma):
    """f(x, σ) = c_skip·x + c_out·F(c_in·x, ¼·ln σ), exact at σ = σmin."""
    _, _, c_in = fastcm.precondition_scalings(sigma, param="cm", sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN)
    net_out = net(x * c_in.to(x.dtype).reshape(-1, 1, 1, 1), 0.25 * sigma.log()).to(x.dtype)  # as in trigflow_f
    return fastcm.precondition(x, net_out, sigma, param="cm", sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN)


def _autocast(device):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if torch.device(device).type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )


def draw_noise(recipe, batch, generator):
    """(time, z) of one batch, drawn on the CPU from `generator`: sCM's t and σd-scaled z, or ECT's σ and z."""
    if recipe == "scm":
        t = scm_sample_t(batch, sigma_data=SIGMA_DATA, generator=generator)
        return t, SIGMA_DATA * torch.randn(batch, 1, SIZE, SIZE, generator=generator)
    sigma = (-1.1 + 2.0 * torch.randn(batch, generator=generator)).exp().clamp(SIGMA_MIN * 2, SIGMA_MAX)
    return sigma, torch.randn(batch, 1, SIZE, SIZE, generator=generator)


def _inner(net):
    """The module inside a DistributedDataParallel wrapper (the tangent pass needs no gradient sync)."""
    return getattr(net, "module", net)


def jvp_tangent(net, x_in, t, x_in_t, t_t):
    """(F, dF) along (x_in_t, t_t) by forward-mode AD (torch.func.jvp), without a graph."""
    with torch.no_grad():
        return torch.func.jvp(net, (x_in, t), (x_in_t, t_t))


def finite_difference_tangent(net, x_in, t, x_in_t, t_t, eps=1e-3):
    """(F, dF) with dF ≈ (F(x + ε·ẋ, t + ε·ṫ) − F(x − ε·ẋ, t − ε·ṫ)) / 2ε: three forward passes and no
    forward-mode AD, for wrappers that torch.func.jvp cannot run through (FSDP2, see README)."""
    with torch.no_grad():
        F = net(x_in, t)
        plus = net(x_in + eps * x_in_t, t + eps * t_t)
        minus = net(x_in - eps * x_in_t, t - eps * t_t)
        return F, (plus.float() - minus.float()) / (2 * eps)


TANGENTS = {"jvp": jvp_tangent, "fd": finite_difference_tangent}


def scm_loss_of_batch(net, x0, t, z, r, tangent="jvp"):
    """The sCM loss of one batch (Lu & Song 2024, Alg. 1) for time t (B,), noise z = σd·ε, warm-up r."""
    cos_t, sin_t = torch.cos(t).reshape(-1, 1, 1, 1), torch.sin(t).reshape(-1, 1, 1, 1)
    x_t = cos_t * x0 + sin_t * z
    dx_dt = cos_t * z - sin_t * x0
    with _autocast(x0.device):
        F_minus, F_jvp = TANGENTS[tangent](
            _inner(net) if tangent == "jvp" else net,
            x_t / SIGMA_DATA,
            t,
            cos_t * sin_t * dx_dt / SIGMA_DATA,
            torch.cos(t) * torch.sin(t),
        )
        F = net(x_t / SIGMA_DATA, t)
    return fastcm.scm_loss(F.float(), F_minus.float(), F_jvp.float(), x_t, dx_dt, t, sigma_data=SIGMA_DATA, r=r)


def ect_sigma_lower(sigma, stage, q=2.0):
    """ECT's r = t·(1 − n(t)/q^(stage+1)), n(t) = 1 + 8·sigmoid(−t), at least σmin: Δt halves every stage."""
    return (sigma * (1 - (1 + 8 * torch.sigmoid(-sigma)) / q ** (stage + 1))).clamp_min(SIGMA_MIN)


def ect_loss_of_batch(net, x0, sigma, z, stage):
    """The ECT loss of one batch: pseudo-Huber distance of f(x + σ·z, σ) to f(x + r·z, r) (no gradient),
    weighted by 1/(σ − r)."""
    r = ect_sigma_lower(sigma, stage)
    with _autocast(x0.device):
        with torch.no_grad():
            target = cm_f(net, x0 + r.reshape(-1, 1, 1, 1) * z, r)
        prediction = cm_f(net, x0 + sigma.reshape(-1, 1, 1, 1) * z, sigma)
    return fastcm.pseudo_huber_loss(
        prediction.float(), target.float(), c=0.00054 * math.sqrt(x0[0].numel()), weight=ct_loss_weight(r, sigma)
    )


ECT_STAGES = 4


def loss_of_batch(recipe, net, x0, time_, z, step, total_steps, tangent="jvp"):
    """The recipe's loss at training step `step` of `total_steps` (sCM: tangent warm-up over the first 20%;
    ECT: ECT_STAGES stages of shrinking Δt)."""
    if recipe == "scm":
        return scm_loss_of_batch(net, x0, time_, z, tangent_warmup(step, max(1, total_steps // 5)), tangent)
    return ect_loss_of_batch(net, x0, time_, z, min(ECT_STAGES - 1, step * ECT_STAGES // max(1, total_steps)))


LOSSES = ("scm", "ect")


def train_step(net, optimizer, x0, step, total_steps, noise, recipe="scm", tangent="jvp"):
    """One optimizer step on batch x0 with noise = draw_noise(...) moved to x0's device; returns the loss."""
    time_, z = (n.to(x0.device) for n in noise)
    loss = loss_of_batch(recipe, net, x0, time_, z, step, total_steps, tangent)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def sample(net, num, steps, seed, device="cpu", recipe="scm"):
    """num images (num, 1, 16, 16) from 1 or 2 network calls."""
    generator = torch.Generator().manual_seed(seed)
    with _autocast(device):
        if recipe == "scm":
            x = SIGMA_DATA * torch.randn(num, 1, SIZE, SIZE, generator=generator).to(device)
            times = [math.pi / 2, 1.1, 0.0] if steps == 2 else [math.pi / 2, 0.0]
            out = fastcm.sampling.sample_trigflow(
                lambda x, t: trigflow_f(net, x, t), x, times, sigma_data=SIGMA_DATA, seed=seed
            )
        else:
            x = SIGMA_MAX * torch.randn(num, 1, SIZE, SIZE, generator=generator).to(device)
            sigmas = [SIGMA_MAX, SIGMA_MIN] if steps == 1 else [SIGMA_MAX, 0.8, SIGMA_MIN]
            out = fastcm.sampling.sample_cm(lambda x, s: cm_f(net, x, s), x, sigmas, sigma_min=SIGMA_MIN, seed=seed)
    return out.float().clamp(-1, 1)


def make_net(recipe):
    # TrigFlow times t ∈ [0, π/2] are spread over the embedding's frequencies by a larger label scale
    # than the CM label ¼·ln σ ∈ [−1.6, 1.1].
    return DiT(size=SIZE, patch=4, width=48, depth=3, heads=3, label_scale=100.0 if recipe == "scm" else 20.0)


def train(recipe, steps, batch, lr, seed, device, data, progress=True, tangent="jvp"):
    """Trains a DiT from seed `seed`; returns (net with the sampled EMA profile's weights, losses)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = make_net(recipe).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    averages = fastcm.ema.EMA(net.parameters(), [fastcm.ema.power(s) for s in EMA_SIGMA_RELS])
    images = data.to(device)
    losses = []
    bar = tqdm(range(steps), desc=f"{recipe} [{os.environ.get('FASTCM_BACKEND', 'auto')}]", disable=not progress)
    for step in bar:
        index = torch.randint(len(images), (batch,), generator=generator).to(device)
        noise = draw_noise(recipe, batch, generator)
        losses.append(train_step(net, optimizer, images[index], step, steps, noise, recipe, tangent))
        scheduler.step()
        averages.update()
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    averages.copy_to(net.parameters(), SAMPLE_PROFILE)
    return net, losses


# ------------------------------------------------------------------ score


class Classifier(torch.nn.Module):
    """A small CNN on 16×16 digits; `features` is its 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * 16, 64),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(64, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(images, labels, steps=400, seed=0):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classifier = Classifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    for _ in range(steps):
        index = torch.randint(len(images), (128,), generator=generator)
        # Small shifts and noise, so that features of imperfect samples stay in the trained range.
        x = images[index] + 0.1 * torch.randn(images[index].shape, generator=generator)
        loss = torch.nn.functional.cross_entropy(classifier(x), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()


def _sqrt_psd(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(features_a, features_b):
    """‖μa − μb‖² + Tr(Σa + Σb − 2·(Σa^½ Σb Σa^½)^½), in float64 (the symmetric form of FID's matrix root)."""
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrt_psd(cov_a)
    cross = _sqrt_psd(root_a @ cov_b @ root_a)
    return ((mean_a - mean_b) ** 2).sum().item() + (cov_a.trace() + cov_b.trace() - 2 * cross.trace()).item()


@torch.no_grad()
def score(classifier, images, held_out_features):
    """{"FD", "coverage", "confidence"} of an image set (module docstring)."""
    features = classifier.features(images.float().cpu())
    probabilities = classifier.head(features).softmax(dim=1)
    counts = torch.bincount(probabilities.argmax(dim=1), minlength=10)
    return {
        "FD": frechet_distance(features, held_out_features),
        "coverage": int((counts >= 0.05 * len(images)).sum()),
        "confidence": probabilities.max(dim=1).values.mean().item(),
    }


# ------------------------------------------------------------------ pictures


def save_grid(rows, path):
    """rows: {name: images (N, 1, 16, 16)}; one row of images per name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), 1, figsize=(columns * 0.45, len(rows) * 0.62), squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], rows.items()):
        strip = torch.cat([torch.nn.functional.pad(img[0], (1, 1, 1, 1), value=-1) for img in images[:columns]], dim=1)
        ax.imshow(strip.cpu().numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_loss_curve(curves, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for name, losses in curves.items():
        window = max(1, len(losses) // 50)
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1) if len(losses) >= window else torch.tensor(losses)
        ax.plot(range(window - 1, window - 1 + len(smooth)), smooth, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{title} (running mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ command line

BACKENDS = {"fastcm": None, "reference": "reference"}
DEFAULT_LR = {"scm": 3e-4, "ect": 1e-3}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=LOSSES, default="scm")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate (default: 3e-4 for scm, 1e-3 for ect; sCM at 1e-3 collapsed to the "
        "mean image in our 800-step CPU run, FD 1617 against 253 at 3e-4)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=500, help="samples per row of the score table")
    parser.add_argument(
        "--backends",
        default="fastcm,reference",
        help="comma-separated, trained one after the other from the same seed: fastcm (fastcm's "
        "kernels where the device has them) and reference (FASTCM_BACKEND=reference)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="dit_scm_out", help="folder for samples.png and loss.png")
    parser.add_argument(
        "--tangent",
        choices=sorted(TANGENTS),
        default="jvp",
        help="sCM tangent: forward-mode AD (jvp) or central finite differences (fd)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the small DiT's ops gain nothing from more on a 2-core machine "
        "shared with other work, where extra threads stall each other (measured 14x slower)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.lr = DEFAULT_LR[args.recipe] if args.lr is None else args.lr
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    (train_images, train_labels), (held_images, held_labels) = load_digits_16(args.seed)
    classifier = train_classifier(train_images, train_labels, seed=args.seed)
    with torch.no_grad():
        accuracy = (classifier(held_images).argmax(1) == held_labels).float().mean().item()
        held_features = classifier.features(held_images)
    print(f"classifier accuracy on the {len(held_images)} held-out digits: {accuracy:.3f}")

    noise = torch.randn(args.samples, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    real = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(2))[: args.samples]]
    results = {
        "real (training digits)": score(classifier, real, held_features),
        "noise": score(classifier, noise, held_features),
    }
    grid, curves, times = {"real": real[:24]}, {}, {}
    for backend in args.backends.split(","):
        if backend not in BACKENDS:
            parser.error(f"--backends: {backend!r} is not one of {sorted(BACKENDS)}")
        previous = os.environ.pop("FASTCM_BACKEND", None)
        if BACKENDS[backend]:
            os.environ["FASTCM_BACKEND"] = BACKENDS[backend]
        try:
            start = time.perf_counter()
            net, curves[backend] = train(
                args.recipe,
                args.steps,
                args.batch,
                args.lr,
                args.seed,
                args.device,
                train_images,
                progress=not args.no_progress,
                tangent=args.tangent,
            )
            times[backend] = time.perf_counter() - start
            for steps in (1, 2):
                images = sample(net, args.samples, steps, args.seed + 10, args.device, args.recipe)
                results[f"{backend} {steps}-step"] = score(classifier, images, held_features)
                grid[f"{backend} {steps}-step"] = images[:24]
        finally:
            os.environ.pop("FASTCM_BACKEND", None)
            if previous is not None:
                os.environ["FASTCM_BACKEND"] = previous
    print(
        f"recipe {args.recipe}, {args.steps} steps of batch {args.batch}: "
        + ", ".join(f"{k} trained in {v:.0f} s" for k, v in times.items())
    )
    print(f"{'':28s} {'FD':>8s} {'coverage':>9s} {'confidence':>11s}   (vs {len(held_images)} held-out digits)")
    for name, row in results.items():
        print(f"{name:28s} {row['FD']:8.2f} {row['coverage']:6d}/10 {row['confidence']:11.3f}")
    save_grid(grid, out / "samples.png")
    save_loss_curve(curves, out / "loss.png", f"{args.recipe} loss")
    print(f"wrote {out / 'samples.png'} and {out / 'loss.png'}")
    return {"results": results, "losses": curves, "accuracy": accuracy}


if __name__ == "__main__":
    main()
