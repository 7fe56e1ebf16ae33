"""Where does the gradient to A come from, and why does the ``gcn`` learner shrink strong edges?

Trains one GEM run (default synthetic recipe, ``labels`` oracle) with a probe graph learner: the
``gcn`` learner plus a record, every step after binding, of the off-diagonal |A|, the gradient
of the extractor's loss with respect to |A| (d loss / d|A_ij| = sign(S_ij) d loss / d A_ij,
caught by a tensor hook on A during the extractor's backward pass) and the anchor penalty's
gradient. After training it checks the gauge symmetry of the decoder on the trained model: the
decoder's first layer is linear, so decoder(Aᵀz) with first-layer weight W equals
decoder(Bᵀz) with weight W Aᵀ B^-ᵀ for any invertible B; the training loss cannot tell A from B.

    OMP_NUM_THREADS=1 /work/venv/bin/python scripts/experiments/graph_gradient.py \
        --error 0.4 --images 1500 --seed 0 --out runs/graph-gradient/e0.4_w10
    ... --set graph.anchor_weight=0 --out runs/graph-gradient/e0.4_w0

Writes ``probe.json`` (the trajectory summary) into the run folder and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gem import hookimpl  # noqa: E402
from gem_plugins.graph_learners import GCNGraph, GCNGraphOptions  # noqa: E402

TRACE: dict = {"steps": [], "magnitude": [], "grad_loss": [], "grad_anchor": []}


class ProbeGraph(GCNGraph):
    """The ``gcn`` learner, recording |A| and the gradients that reach it."""

    def forward(self) -> torch.Tensor:
        adjacency = super().forward()
        if adjacency.requires_grad and torch.is_grad_enabled():
            adjacency.register_hook(self._catch)
        return adjacency

    def _catch(self, grad: torch.Tensor) -> None:
        self._grad = grad.detach().clone()

    def penalty(self) -> torch.Tensor:  # called right after the extractor's backward pass
        magnitude = self.magnitude().detach()
        grad = getattr(self, "_grad", None)
        if grad is not None:
            TRACE["steps"].append(len(TRACE["steps"]))
            TRACE["magnitude"].append(magnitude.numpy().copy())
            TRACE["grad_loss"].append((grad * self.sign).numpy().copy())  # d loss / d|A|
            TRACE["grad_anchor"].append((2 * self.options.anchor_weight * (magnitude - self.anchor)).numpy().copy())
            self._grad = None
        return super().penalty()


class ProbePlugin:
    @hookimpl
    def gem_register_graph_learners(self, register):
        register("gcn_probe", ProbeGraph, options=GCNGraphOptions, description="gcn with a gradient record")


def gauge_check(run_dir: Path, recipe, registry) -> dict:
    """On the trained model: the loss with A and with B = I (first layer W Aᵀ) or B = S."""
    from gem.context import RunContext
    from gem.training import load_checkpoint, to_float

    ctx = RunContext.open(recipe, registry, run_dir)
    dataset = ctx.load_dataset()
    extractor = ctx.build("extractor")
    state = load_checkpoint(run_dir / "checkpoint")
    extractor.load_state_dict(state["extractor"])
    A = torch.as_tensor(np.asarray(json.loads((run_dir / "impact.json").read_text())["learned_adjacency"]),
                        dtype=torch.float32)
    S = torch.as_tensor(np.asarray(json.loads((run_dir / "impact.json").read_text())["oracle_impact"]),
                        dtype=torch.float32)
    rel = state["relation"]
    latent_of, sign = rel["latent_of"].long(), rel["sign"].float()
    inverse = torch.argsort(latent_of)
    x = to_float(torch.from_numpy(np.asarray(dataset.images[:256]))).float()
    torch.manual_seed(0)
    extractor.eval()
    out = {}
    with torch.no_grad():
        mu, logvar = extractor.encoder(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        z_attr = z[:, latent_of] * sign
        first = extractor.decoder.fc[0]
        W0 = first.weight.clone()

        def recon(B: torch.Tensor) -> float:
            # W' acts on latent-order input; z_rel(latent) = P (Bᵀ z_attr); absorb A B^-1 into W.
            z_rel = ((z_attr @ B) * sign)[:, inverse]
            M = torch.linalg.solve(B, A)  # B^-1 A, in attribute order: z_attr A = (z_attr B) B^-1 A
            # latent-order map of the extra mix: x_lat -> ((x_lat[:, latent_of]*sign) @ M * sign)[:, inverse]
            eye = torch.eye(len(sign))
            L = ((eye[:, latent_of] * sign) @ M * sign)[:, inverse]  # (d, d) acting on row vectors
            first.weight.copy_(W0 @ L.T)
            logits = extractor.decoder(z_rel)
            first.weight.copy_(W0)
            return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x))

        out["recon_nats_with_A"] = recon(A)
        out["recon_nats_with_I_and_W_At"] = recon(torch.eye(len(sign)))
        out["recon_nats_with_S_and_W_At_S-t"] = recon(S)
        out["recon_nats_with_A_but_I_unabsorbed"] = float(torch.nn.functional.binary_cross_entropy_with_logits(
            extractor.decoder(z), x, reduction="sum") / len(x))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--error", type=float, default=0.4)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=600)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from gem.pipeline import run_recipe
    from gem.plugins import Registry, make_plugin_manager
    from gem.recipe import DEFAULT_RECIPE, apply_overrides, validate_recipe

    registry = Registry(make_plugin_manager((ProbePlugin(),)))
    overrides = [f"seed={args.seed}", f"oracle.error_rate={args.error}", f"scoring.n_images={args.images}",
                 f"training.steps={args.steps}", f"training.warmup_steps={args.warmup}", "training.threads=1",
                 "evaluation.full_metrics=false", "graph.plugin=gcn_probe", *args.set]
    recipe = validate_recipe(apply_overrides(DEFAULT_RECIPE, overrides), registry)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_recipe(recipe, registry, args.out, eval_metrics=["relations"])
    rel = result.metrics["relations"]
    impact = json.loads((args.out / "impact.json").read_text())
    S, T = np.asarray(impact["oracle_impact"]), np.asarray(impact["true_impact"])
    off = ~np.eye(len(S), dtype=bool)
    strong = off & (np.abs(T) > 0.1)
    weak = off & ~strong
    mag = np.stack(TRACE["magnitude"])
    g = np.stack(TRACE["grad_loss"])
    ga = np.stack(TRACE["grad_anchor"])
    windows = [(0, 10), (10, 100), (100, 400), (400, len(mag))]
    summary = {"recipe_overrides": overrides, "S_mae": rel["oracle_vs_true"]["mae"], "A_mae": rel["learned_vs_true"]["mae"],
               "windows": []}
    for a, b in windows:
        if a >= len(mag):
            break
        b = min(b, len(mag))
        gs, gw = g[a:b][:, strong], g[a:b][:, weak]
        summary["windows"].append({
            "steps_after_binding": [a, b],
            "strong_|A|/|S|_at_end": float(np.mean(mag[b - 1][strong] / np.abs(S[strong]))),
            "weak_mean_|A|-|S|_at_end": float(np.mean(mag[b - 1][weak] - np.abs(S[weak]))),
            "strong_grad_loss_mean": float(gs.mean()),
            "strong_grad_loss_abs_mean": float(np.abs(gs).mean()),
            "strong_grad_loss_frac_positive(shrinks)": float((gs > 0).mean()),
            "strong_grad_loss_mean/std": float(gs.mean() / (gs.std() + 1e-12)),
            "weak_grad_loss_abs_mean": float(np.abs(gw).mean()),
            "strong_grad_anchor_abs_mean": float(np.abs(ga[a:b][:, strong]).mean()),
        })
    summary["gauge"] = gauge_check(args.out, recipe, registry)
    np.savez_compressed(args.out / "probe_trace.npz", magnitude=mag, grad_loss=g, grad_anchor=ga, S=S, T=T)
    (args.out / "probe.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
