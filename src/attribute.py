"""Which training images made this sample? Rank the training set by influence on each query's diffusion loss.

    python -m src.attribute --ckpt_path runs/fashion_mnist/version_0/checkpoints/last.ckpt \
        --queries samples/DIR --output_dir runs/attribution [--method influence | tracin]

Queries: a folder of PNG files (what `predict` writes; `<label>_<index>.png` gives conditional nets their labels),
a .npz of uint8 images, or training/test images of the checkpoint's data set: `train:0,17` / `test:3`.

- `--method influence` (default): Koh & Liang's influence function with s_test = (H + damping I)^-1 grad L(query)
  from LiSSA (`--solver lissa`, stochastic Hessian-vector products on shuffled training mini-batches) or conjugate
  gradients (`--solver cg`, one fixed batch), on the parameters named by `--params` (default: the output
  convolution, where the squared error is convex in the weights, as Koh & Liang's last layer), at the EMA
  weights (`--weights ema`, the ones that generate samples) or the trained ones (`--weights net`).
- `--method tracin`: TracInCP, sum over `--tracin_ckpts` (default: `--ckpt_path` alone) of the learning rate
  stored in each checkpoint times the dot product of the trained weights' gradients.

Every image's loss is L_simple averaged over a fixed probe of `--num_t` timesteps x `--num_draws` noise draws
(seeded by `--probe_seed`), so the scores are reproducible. Writes, in `--output_dir` (refused if it holds files,
unless `--overwrite`): `query_<q>.png` (the query, then its top-k training images, most influential first),
`overview.png` (one such row per query) and `scores.json` (indices in the data set's training file, scores and
labels). Score: larger = the training image did more to lower the query's loss (TracIn's score; -I_up,loss).
The math is in `src/attribution/influence.py`.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import os
import re
import sys
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from src.attribution.influence import (
    batch_hvp,
    conjugate_gradient,
    influence_on_loss,
    largest_eigenvalue,
    lissa,
    make_probe,
    per_example_gradients,
    probe_loss,
    select_parameters,
    top_k,
    tracin_scores,
)
from src.data import ImageDataModule, load_dataset, to_model_range
from src.errors import UserError
from src.images import make_grid, save_png

DEFAULT_PARAMS = ["conv_out.*"]


class AttributionError(UserError, ValueError):
    """A setting of the attribution command that cannot work."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m src.attribute",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--ckpt_path", required=True, help="a DiffusionModule .ckpt file")
    parser.add_argument("--queries", required=True, help="PNG folder, .npz of uint8 images, or train:I,J / test:I")
    parser.add_argument("--output_dir", required=True, help="folder for the grids and scores.json")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output_dir that holds files")
    parser.add_argument("--method", choices=["influence", "tracin"], default="influence")
    parser.add_argument("--params", nargs="+", default=DEFAULT_PARAMS, help="parameter name patterns (fnmatch)")
    parser.add_argument("--weights", choices=["ema", "net"], default="ema", help="influence: which weights")
    parser.add_argument("--tracin_ckpts", nargs="+", default=None, help="tracin: checkpoints (default --ckpt_path)")
    parser.add_argument("--num_t", type=int, default=10, help="probe: timesteps (midpoints of equal bins)")
    parser.add_argument("--num_draws", type=int, default=1, help="probe: noise draws per timestep")
    parser.add_argument("--probe_seed", type=int, default=0)
    parser.add_argument("--solver", choices=["lissa", "cg"], default="lissa", help="influence: H^-1 v solver")
    parser.add_argument("--damping", type=float, default=0.01, help="influence: lambda in (H + lambda I)^-1")
    parser.add_argument(
        "--scale",
        type=float,
        default=0.0,
        help="lissa: above H's largest eigenvalue (0: 2x a power-iteration estimate)",
    )
    parser.add_argument("--depth", type=int, default=200, help="lissa: recursion depth")
    parser.add_argument("--repeats", type=int, default=1, help="lissa: averaged runs")
    parser.add_argument("--cg_iters", type=int, default=100, help="cg: iterations")
    parser.add_argument("--hvp_batch_size", type=int, default=64, help="training images per Hessian-vector product")
    parser.add_argument("--train_limit", type=int, default=0, help="score only the first N training images (0: all)")
    parser.add_argument(
        "--normalize", action="store_true", help="divide by |grad L(z)|: TracIn becomes gradient cosine similarity"
    )
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--data_dir", default=None, help="data folder (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="order of LiSSA's mini-batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ inputs


def load_module(path: str | os.PathLike, device: str):
    from src.module import DiffusionModule

    if not Path(path).is_file():
        raise AttributionError(f"--ckpt_path {path}: no such file")
    return DiffusionModule.load_from_checkpoint(path, map_location=device, weights_only=True).eval()


def data_module(checkpoint_path: str, data_dir: str | None) -> ImageDataModule:
    """The ImageDataModule of the checkpoint's run (its saved settings), with `data_dir` replaced if given."""
    # mmap: only the small settings dict is read, not the weights and optimizer state.
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    hparams = checkpoint.get("datamodule_hyper_parameters")
    if not hparams:
        raise AttributionError(
            f"--ckpt_path {checkpoint_path}: no datamodule settings saved in it (not a src.main run?)"
        )
    # Only the constructor's arguments: LightningCLI also records its own keys (_instantiator, _class_path).
    accepted = inspect.signature(ImageDataModule).parameters
    hparams = {k: v for k, v in hparams.items() if k in accepted}
    if data_dir is not None:
        hparams["data_dir"] = data_dir
    return ImageDataModule(**hparams)


def training_set(checkpoint_path: str, data_dir: str | None, limit: int) -> tuple[Tensor, Tensor, Tensor, str]:
    """The images the checkpoint's run trained on (its data set minus the validation split), uint8, with their
    labels, their indices in the data set's training file, and the data set's name."""
    data = data_module(checkpoint_path, data_dir)
    images, labels = load_dataset(data.dataset, "train", data.data_dir)
    indices = (
        data.train_val_indices(len(images))[0] if data.num_held_out(len(images)) > 0 else torch.arange(len(images))
    )
    if limit > 0:
        indices = indices[:limit]
    return images[indices], labels[indices], indices, data.dataset


def load_queries(spec: str, checkpoint_path: str, data_dir: str | None) -> tuple[Tensor, Tensor | None, list[str]]:
    """uint8 query images, their labels where known, and a name for each."""
    match = re.fullmatch(r"(train|test):([\d,]+)", spec)
    if match:
        data = data_module(checkpoint_path, data_dir)
        images, labels = load_dataset(data.dataset, match[1], data.data_dir)
        idx = torch.tensor([int(i) for i in match[2].split(",") if i])
        if len(idx) == 0 or idx.max() >= len(images):
            raise AttributionError(f"--queries {spec}: indices must be in [0, {len(images)})")
        return images[idx], labels[idx], [f"{match[1]}_{i}" for i in idx.tolist()]
    from src.evaluate import load_samples

    path = Path(spec)
    if not path.exists():
        raise AttributionError(f"--queries {spec}: no such folder or file (or use train:I,J / test:I)")
    images = load_samples(path)
    names = [p.stem for p in sorted(path.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    if not path.is_dir():
        names = [f"{path.stem}_{i}" for i in range(len(images))]
    labels = [re.fullmatch(r"(\d+)_\d+", n) for n in names]
    label_tensor = torch.tensor([int(m[1]) for m in labels]) if labels and all(labels) else None
    return images, label_tensor, names


def check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise AttributionError(f"--output_dir {path} holds files; choose another folder or pass --overwrite")


# ------------------------------------------------------------------------------------------------ scores


def _model_batch(images: Tensor, labels: Tensor | None, index: Tensor | slice, device: str):
    """uint8 images[index] in the model's [-1, 1] on `device`, with their labels (or None)."""
    return to_model_range(images[index]).to(device), None if labels is None else labels[index].to(device)


def stream_scores(
    loss_fn, params, score_fn, train_images: Tensor, train_labels: Tensor | None, device: str, normalize: bool = False
) -> Tensor:
    """(Q, N): `score_fn(training gradients (B, D)) -> (Q, B)` over the training set, 16 images at a time.

    With `normalize`, each column is divided by the training gradient's norm: high-loss outliers, whose large
    gradients otherwise top every query's list (Barshan et al. 2020), no longer dominate; for TracIn this is the
    gradient cosine similarity (up to the query's norm, which does not change a query's ranking)."""
    columns = []
    batches = (
        _model_batch(train_images, train_labels, slice(i, i + 16), device) for i in range(0, len(train_images), 16)
    )
    for x, y in tqdm(batches, total=-(-len(train_images) // 16), desc="training gradients", leave=False):
        grads = per_example_gradients(loss_fn, params, x, y)
        scores = score_fn(grads)
        if normalize:
            scores = scores / torch.linalg.vector_norm(grads, dim=1).clamp_min(1e-30)
        columns.append(scores.cpu())
    return torch.cat(columns, dim=1)


def attribution_scores(args: argparse.Namespace, queries: Tensor, query_labels, train_images, train_labels) -> Tensor:
    """(Q, N) scores, larger = more influential (TracIn's sum; -I_up,loss for influence functions)."""
    device = args.device
    query_x = to_model_range(queries).to(device)
    query_y = None if query_labels is None else query_labels.to(device)

    def setup(module, net):
        """The probe loss of `net`, its selected parameters, and the (query, training) labels it is given."""
        if module.conditional and query_y is None:
            raise AttributionError(
                "this model is class-conditional: name query files <label>_<index>.png or use train:/test: queries"
            )
        labels = (query_y, train_labels) if module.conditional else (None, None)
        probe = make_probe(
            module.schedule.num_timesteps, query_x.shape[1:], args.num_t, args.num_draws, args.probe_seed
        )
        schedule = module.schedule.to(device)

        def loss_fn(images: Tensor, y: Tensor | None) -> Tensor:
            return probe_loss(net, images, schedule, probe, y, module.hparams.prediction)

        try:
            params = [p for _, p in select_parameters(net, args.params)]
        except ValueError as e:
            raise AttributionError(f"--params: {e}") from e
        net.requires_grad_(False)  # gradients of the selected parameters only: backward stops where they end
        for p in params:
            p.requires_grad_(True)
        return loss_fn, params, labels

    if args.method == "tracin":
        total = None
        for path in args.tracin_ckpts or [args.ckpt_path]:
            module = load_module(path, device)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            states = checkpoint.get("optimizer_states") or []
            if not states:
                raise AttributionError(f"--tracin_ckpts {path}: no optimizer state (an exported or weights-only file)")
            learning_rate = float(states[0]["param_groups"][0]["lr"])
            net = module.net.eval()
            loss_fn, params, (qy, ty) = setup(module, net)
            query_grads = per_example_gradients(loss_fn, params, query_x, qy)
            score_fn = functools.partial(tracin_scores, query_grads, learning_rate=learning_rate)
            term = stream_scores(loss_fn, params, score_fn, train_images, ty, device, args.normalize)
            total = term if total is None else total + term
        return total

    module = load_module(args.ckpt_path, device)
    net = (module.model.net if args.weights == "ema" else module.net).eval()
    loss_fn, params, (qy, ty) = setup(module, net)
    query_grads = per_example_gradients(loss_fn, params, query_x, qy)
    generator = torch.Generator().manual_seed(args.seed)
    batch_size = min(args.hvp_batch_size, len(train_images))

    fixed = _model_batch(train_images, ty, torch.randperm(len(train_images), generator=generator)[:batch_size], device)
    fixed_hvp = batch_hvp(loss_fn, params, itertools.repeat(fixed))
    scale = args.scale
    if args.solver == "lissa" and scale <= 0:
        # Mini-batch Hessians spread around the full one: twice the top eigenvalue of one batch leaves room.
        scale = 2.0 * (abs(largest_eigenvalue(fixed_hvp, query_grads[0])) + args.damping)

    def minibatches():
        while True:
            for idx in torch.randperm(len(train_images), generator=generator).split(batch_size):
                yield _model_batch(train_images, ty, idx, device)

    try:
        if args.solver == "cg":  # one query at a time: CG's step sizes are per vector
            s_test = [conjugate_gradient(fixed_hvp, g, args.damping, args.cg_iters) for g in query_grads]
            s_test_matrix = torch.stack(s_test)
        else:  # all queries in one recursion: each mini-batch's forward pass serves every query
            hvp = batch_hvp(loss_fn, params, minibatches())
            s_test_matrix = lissa(hvp, query_grads, args.damping, scale, args.depth, args.repeats)
    except (FloatingPointError, ArithmeticError) as e:
        raise AttributionError(str(e)) from e
    # Ranked by -I_up,loss: a helpful training image (upweighting it lowers the query's loss) scores high.
    return stream_scores(
        loss_fn, params, lambda g: -influence_on_loss(s_test_matrix, g), train_images, ty, device, args.normalize
    )


# ------------------------------------------------------------------------------------------------ outputs


def write_outputs(out: Path, queries: Tensor, names: list[str], train_images: Tensor, train_labels: Tensor,
                  file_indices: Tensor, scores: Tensor, k: int, meta: dict) -> dict:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    values, order = top_k(scores, k)
    rows, results = [], []
    for q, name in enumerate(names):
        row = torch.cat([queries[q : q + 1], train_images[order[q]]])
        rows.append(row)
        save_png(make_grid(row, nrow=len(row)), out / f"query_{q}.png")
        results.append({
            "query": name,
            "grid": f"query_{q}.png",
            "top": [
                {"train_index": int(file_indices[i]), "label": int(train_labels[i]), "score": float(v)}
                for i, v in zip(order[q].tolist(), values[q].tolist(), strict=True)
            ],
        })  # fmt: skip
    save_png(make_grid(torch.cat(rows), nrow=k + 1), out / "overview.png")
    report = {**meta, "queries": results}
    tmp = out / "scores.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out / "scores.json")
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        out = Path(args.output_dir)
        check_output_dir(out, args.overwrite)
        train_images, train_labels, file_indices, dataset = training_set(
            args.ckpt_path, args.data_dir, args.train_limit
        )
        queries, query_labels, names = load_queries(args.queries, args.ckpt_path, args.data_dir)
        if queries.shape[1:] != train_images.shape[1:]:
            raise AttributionError(
                f"--queries: images of shape {tuple(queries.shape[1:])}, the training images are "
                f"{tuple(train_images.shape[1:])}"
            )
        scores = attribution_scores(args, queries, query_labels, train_images, train_labels)
    except (UserError, FileNotFoundError) as e:
        if os.environ.get("DIFFUSION_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    meta = {
        "method": args.method,
        "score": "TracInCP: sum_k lr_k grad L(z) . grad L(query)"
        if args.method == "tracin"
        else "-I_up,loss = grad L(query)^T (H + damping I)^-1 grad L(z)",  # fmt: skip
        "dataset": dataset,
        "num_train_scored": len(train_images),
        "settings": {k: v for k, v in vars(args).items() if k not in ("queries", "output_dir", "overwrite")},
    }
    report = write_outputs(out, queries, names, train_images, train_labels, file_indices, scores, args.top_k, meta)
    print(f"wrote {len(names)} query grids, overview.png and scores.json to {out}")
    return report


if __name__ == "__main__":
    main()
