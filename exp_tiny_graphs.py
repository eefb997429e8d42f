"""Tiny graphs: associative vs geometric memory, seen and measured (App. B.2.2, C.3; Figs. 1, 6, 17-32).
Sequence models trained only to memorize the edges of four tiny graphs store them geometrically
(adjacent nodes get similar embeddings aligned with the top Laplacian eigenvectors), although the
same networks with frozen embeddings store them associatively, and faster.

  python exp_tiny_graphs.py                                 # every study, CPU, about 8 minutes
  python exp_tiny_graphs.py --quick                         # smoke configuration, seconds
  python exp_tiny_graphs.py --graph cycle --model tinynn node2vec --study main
  python exp_tiny_graphs.py --seeds 0 1 2 --parallel 2      # every study per seed, then the spread

Models: tinygpt, tinynn, tinyssm (1-layer GPT, TinyNN, 1-layer Mamba), their associative controls
(the same with frozen token embeddings: associative_gpt, associative_nn, associative_ssm), node2vec,
and graph_spectrum (no model: the top 3 non-constant Laplacian eigenvectors as embeddings, the
reference panel of Figs. 17-20).

Studies:
  main          every model on every graph: edge recovery, geometric level, spectrum, geometric margin
                (TinyNN), cosine heatmaps, 3-D pictures, spectrum plots and the Fig. 1-style panel
  speed         edge recovery and geometric level over training steps (Figs. 6, 21, 22)
  regularizers  TinyNN on the cycle under self-edges, init scale, lr, weight decay, dropout (App. C.3.1)
  forward-only  TinyGPT trained on one direction of each edge (Fig. 32)
"""
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from common import (GPT, TINY_GRAPHS, ArgParser, GPTConfig, Mamba, MambaConfig, Node2Vec, Node2VecConfig,
                    Phase, TiedLM, Vocab, add_seed_flags, adjacency, arm_edges, cosine_matrix, device_name,
                    die, edge_group, edge_margin, edge_margin_authors, edge_recall, epochs_to,
                    geometric_level, laplacian_eigs, logit_recall, neighbour_targets, over_seeds,
                    parse_with_presets, pick_device, prepare_out, pyplot, save_figure, seed_everything,
                    tiny_graph, token_embeddings, train, train_node2vec, write_json)

MODELS = ("tinygpt", "tinynn", "tinyssm", "associative_gpt", "associative_nn", "associative_ssm", "node2vec",
          "graph_spectrum")
STUDIES = ("main", "speed", "regularizers", "forward-only")
QUICK = dict(steps_scale=0.02)
SPEED_MODELS = ("associative_nn", "tinynn", "tinygpt")
# App. C.3.1 on the cycle, TinyNN width 512: (self_edges, embedding init std, lr, weight decay, dropout)
REGULARIZERS = {
    "default": (False, 0.02, 1e-2, 0.0, 0.0),
    "self_edges": (True, 0.02, 1e-2, 0.0, 0.0),
    "gpt_init_lr1e-3": (False, 0.02, 1e-3, 0.0, 0.0),
    "unit_init": (False, 1.0, 1e-2, 0.0, 0.0),
    "unit_init_lr1e-4": (False, 1.0, 1e-4, 0.0, 0.0),
    "unit_init_lr1e-3": (False, 1.0, 1e-3, 0.0, 0.0),
    "unit_init_lr1e-1": (False, 1.0, 1e-1, 0.0, 0.0),
    "unit_init_wd10": (False, 1.0, 1e-2, 10.0, 0.0),
    "unit_init_dropout0.4": (False, 1.0, 1e-2, 0.0, 0.4),
}


def get_args(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", nargs="+", choices=("all",) + TINY_GRAPHS, default=["all"],
                   help="graphs to run")
    p.add_argument("--model", nargs="+", choices=("all",) + MODELS, default=["all"],
                   help="models of the main study")
    p.add_argument("--study", nargs="+", choices=("all",) + STUDIES, default=["all"], help="studies to run")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every model's step count (the paper's counts at 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the path-star ids and of every init")
    add_seed_flags(p)
    p.add_argument("--tinynn-recipe", choices=("paper", "authors"), default="paper",
                   help="TinyNN: App. B.2.2 (width 512, 10,000 steps, constant lr, no bias) or the "
                   "release's notebook (width 32/32/512/16, 500/500/10,000/1,000 steps, cosine to lr/10 but "
                   "on the cycle, a bias)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:i] or auto")
    p.add_argument("--out", default="runs/tiny_graphs", help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="smoke preset: --steps-scale 0.02 (explicit flags win)")
    args = parse_with_presets(p, {"quick": QUICK}, argv)
    if not args.steps_scale > 0:
        die("--steps-scale must be > 0")
    if args.parallel < 1:
        die("--parallel must be >= 1")
    return args


# ----------------------------------------------------------------------------- TinyNN (App. B.2.2)


@dataclass
class TinyNNConfig:
    vocab_size: int
    n_embd: int = 512
    init_std: float = 0.02  # App. C.3.1: GPT-style N(0, 0.02) vs unit normal
    dropout: float = 0.0
    freeze_embeddings: bool = False
    bias: bool = False  # the release's TinyNN has one (zero-initialized; the geometric logits ignore it)


class TinyNN(TiedLM):
    """Embedding -> one DxD linear layer -> tied unembedding: no attention, residual, norm, positions or
    nonlinearity, so the logits of source u are e_u W^T E^T. Trains like the GPT (TiedLM)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.W = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.wte.weight, 0.0, cfg.init_std)
        nn.init.normal_(self.W.weight, 0.0, 0.02)
        if cfg.bias:
            nn.init.zeros_(self.W.bias)
        self.wte.weight.requires_grad_(not cfg.freeze_embeddings)

    def hidden(self, idx):
        return self.W(self.drop(self.wte(idx)))


# ----------------------------------------------------------------------------- data


def edge_examples(graph, direction="both"):
    """(E, 2) u -> v training pairs. forward: parent -> child on the path-star, u < v elsewhere.
    A self-edge is one u -> u example (not two)."""
    if "arms" in graph.graph and direction == "forward":
        return arm_edges(graph.graph["arms"], "forward")
    pairs = np.array(sorted((min(e), max(e)) for e in graph.edges if e[0] != e[1]), dtype=np.int64)
    out = [pairs] if direction == "forward" else [pairs, pairs[:, ::-1]]
    loops = [(v, v) for v in graph if graph.has_edge(v, v)]
    if loops:
        out.append(np.array(loops, dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(out))


def undirected_edges(graph):
    return sorted([min(e), max(e)] for e in graph.edges if e[0] != e[1])


def node_order(graph):
    """Heatmap order: the path-star root then arm by arm; other graphs by node id."""
    if "arms" in graph.graph:
        return [graph.graph["root"]] + [v for arm in graph.graph["arms"] for v in arm[1:]]
    return list(range(graph.number_of_nodes()))


# ----------------------------------------------------------------------------- measures (App. B.5)


def spectrum(E, V):
    """|E^T v_i| / |E^T v_2| over the Laplacian eigenvectors, top first, the top (near-constant) v_1
    dropped."""
    proj = np.linalg.norm(V.T @ E, axis=1)
    return proj[1:] / proj[1]


def geometric_logits(E, W):
    """App. B.5: keep only W's diagonal in the basis of E's right singular vectors,
    W' = V diag(v_i^T W v_i) V^T; the logit matrix of source u is e_u W'^T E^T (nn.Linear computes
    x W^T)."""
    _, _, Vt = np.linalg.svd(E, full_matrices=False)
    d = np.einsum("id,de,ie->i", Vt, W, Vt)
    Wg = Vt.T @ np.diag(d) @ Vt
    return E @ Wg.T @ E.T


# ----------------------------------------------------------------------------- models and training


# TinyNN in the release's notebook (experiment_notebooks/tiny_neural_network.ipynb): width, lr, steps,
# final lr fraction of a cosine without warm-up (1.0 = constant)
AUTHORS_TINYNN = {"path_star": (32, 1e-2, 500, 0.1), "grid": (32, 1e-2, 500, 0.1),
                  "cycle": (512, 1e-2, 10000, 1.0), "irregular": (16, 5e-3, 1000, 0.1)}


def recipe(model, graph_name, scale, tinynn="paper"):
    """(width, lr, steps, final lr fraction) of App. B.2.2 (constant lr); one step = one full-batch
    epoch. tinynn="authors": TinyNN as the release's notebook trains it (AUTHORS_TINYNN)."""
    seq_steps = {"cycle": 700, "irregular": 2500}.get(graph_name, 500)
    r = {"tinygpt": (32, 1e-2, seq_steps), "associative_gpt": (32, 1e-2, seq_steps),
         "tinyssm": (32, 1e-2, seq_steps), "associative_ssm": (32, 1e-2, seq_steps),
         "tinynn": (16, 5e-3, 1000) if graph_name == "irregular" else (512, 1e-2, 10000),
         "associative_nn": (512, 0.1, 10),  # wide, frozen embeddings: a handful of steps (§3.2)
         "node2vec": (100, 1e-2, 10000)}[model] + (1.0,)
    if model == "tinynn" and tinynn == "authors":
        r = AUTHORS_TINYNN[graph_name]
    return r[0], r[1], max(2, round(r[2] * scale)), r[3]


def build(model, vocab, width, init_std=0.02, dropout=0.0, bias=False):
    if model in ("tinygpt", "associative_gpt"):
        return GPT(GPTConfig(vocab.size, block_size=2, n_layer=1, n_head=1, n_embd=width, dropout=dropout,
                             freeze_embeddings=model == "associative_gpt"))
    if model in ("tinyssm", "associative_ssm"):
        return Mamba(MambaConfig(vocab.size, n_layer=1, n_embd=width,
                                 freeze_embeddings=model == "associative_ssm"))
    return TinyNN(TinyNNConfig(vocab.size, width, init_std, dropout,
                               freeze_embeddings=model == "associative_nn",
                               bias=bias))


def fit(model_name, graph, graph_name, args, device, edges, eval_every=None, width=None, lr=None, steps=None,
        weight_decay=0.0, init_std=0.02, dropout=0.0):
    """Train one model on the edge examples; returns (node embeddings (N, C), history).
    history: edge recovery, geometric level and (TinyNN models) geometric margin every `eval_every` steps
    (speed study) and always at the end of training."""
    seed_everything(args.seed)
    und = undirected_edges(graph)
    if model_name == "graph_spectrum":  # Figs. 17-20's reference panel: the top 3 eigenvectors, no training
        E = laplacian_eigs(graph)[1][:, 1:4]
        return E, [{"epoch": 0, "edge_recovery": logit_recall(E @ E.T, edges),
                    "geometric_level": geometric_level(E, und)}]
    w, l, s, final_frac = recipe(model_name, graph_name, args.steps_scale, args.tinynn_recipe)
    authors = model_name == "tinynn" and args.tinynn_recipe == "authors"  # the release's TinyNN
    width, lr, steps = width or w, lr or l, steps or s
    N = graph.number_of_nodes()
    if model_name == "node2vec":
        net = Node2Vec(Node2VecConfig(N, width)).to(device)
        snaps = range(0, steps + 1, eval_every) if eval_every else ()
        recs = train_node2vec(net, neighbour_targets(adjacency(graph), device), steps, lr,
                              snapshot_steps=snaps)
        history = [{"epoch": r["step"],
                    "edge_recovery": logit_recall((r["params"]["E"] @ r["params"]["E"].T).numpy(), edges),
                    "geometric_level": geometric_level(r["params"]["E"].numpy(), und)} for r in recs]
        return net.E.detach().cpu().numpy(), history
    vocab = Vocab(N)
    net = build(model_name, vocab, width, init_std, dropout, bias=authors).to(device)
    X, Y = edge_group(edges, vocab)

    def evaluate(m):
        E = token_embeddings(m, N)
        res = {"edge_recovery": edge_recall(m, edges, vocab, device),
               "geometric_level": geometric_level(E, und)}
        if isinstance(m, TinyNN):  # margin over training: is the geometry there early and lost later?
            W = m.W.weight.detach().cpu().numpy()
            res["geometric_margin"] = edge_margin(geometric_logits(E, W), edges)
            # the release's measure: E with the special-token rows, mean of best-neighbour margins
            res["geometric_margin_authors"] = edge_margin_authors(
                geometric_logits(m.wte.weight.detach().cpu().numpy(), W), edges)
        return res

    history = [{"epoch": 0, **evaluate(net)}] if eval_every else []
    # full batch, no warm-up or clipping, constant lr (App. B.2.2) or the release's cosine and betas
    phase = Phase("edges", [(X.to(device), Y.to(device))], steps, len(X), lr, 0, final_lr_frac=final_frac,
                  grad_clip=0)
    betas = (0.9, 0.999) if authors else (0.9, 0.95)
    history += train(net, [phase], weight_decay=weight_decay, evaluate=evaluate,
                     eval_every=eval_every or steps, device=device, seed=args.seed,
                     desc=f"{graph_name} {model_name}", betas=betas)
    return token_embeddings(net, N), history


def measures(E, history, V):
    """The four measures of one trained model: its last evaluation, made at the end of training (geometric
    margin: TinyNN models only, App. B.5), and the spectrum."""
    last = history[-1]
    return {"edge_recovery": last["edge_recovery"], "geometric_level": last["geometric_level"],
            "geometric_margin": last.get("geometric_margin"),
            "geometric_margin_authors": last.get("geometric_margin_authors"),
            "spectrum": spectrum(E, V).tolist()}


# ----------------------------------------------------------------------------- figures


def pca3(E):
    """Deterministic 3-D picture: centre E (drops the shared direction) and take its top-3 principal
    directions, signs fixed so each direction's largest-|.| coordinate is positive."""
    X = E - E.mean(0)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    P = U[:, :3] * S[:3]
    P *= np.sign(P[np.abs(P).argmax(0), range(P.shape[1])])
    if P.shape[1] < 3:
        P = np.pad(P, ((0, 0), (0, 3 - P.shape[1])))
    return P, (S[:3] ** 2).sum() / (S ** 2).sum()


def draw3d(ax, E, graph, title):
    P, var = pca3(E)
    for u, v in undirected_edges(graph):
        ax.plot(*P[[u, v]].T, color="0.55", lw=0.8)
    ax.scatter(*P.T, c=np.arange(len(P)), cmap="viridis", s=18, depthshade=False, edgecolors="k",
               linewidths=0.3)
    if "arms" in graph.graph:
        ax.scatter(*P[graph.graph["root"]], color="red", s=40, label="root")
    ax.set_title(f"{title}\n(top-3 PCs: {var:.0%} of variance)", fontsize=8)
    ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])


def plot_grid3d(path, rows, graphs, embs, title):
    """rows: model names; one 3-D picture per (model, graph), edges drawn, colour = node id."""
    plt = pyplot()
    fig = plt.figure(figsize=(3.4 * len(graphs), 3.3 * len(rows)))
    for i, model in enumerate(rows):
        for j, g in enumerate(graphs):
            ax = fig.add_subplot(len(rows), len(graphs), i * len(graphs) + j + 1, projection="3d")
            if (g, model) in embs:
                draw3d(ax, embs[g, model], graphs[g], f"{model} on {g}")
    fig.suptitle(title + "\n(colour = node id; red = path-star root; grey lines = graph edges)", fontsize=11)
    save_figure(fig, path, dpi=90)


def plot_heatmaps(path, models, graphs, embs, title):
    plt = pyplot()
    fig, axes = plt.subplots(len(graphs), len(models), figsize=(2.7 * len(models) + 1, 2.6 * len(graphs)),
                             squeeze=False)
    for row, g in zip(axes, graphs):
        order = node_order(graphs[g])
        for ax, model in zip(row, models):
            ax.set_xticks([]), ax.set_yticks([])
            if (g, model) not in embs:
                continue
            im = ax.imshow(cosine_matrix(embs[g, model][order]).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_title(f"{model} on {g}", fontsize=8)
    fig.colorbar(im, ax=axes, fraction=0.02, label="cosine similarity")
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path, dpi=90, rect=None)  # tight_layout cannot place a colorbar spanning all axes


def plot_spectra(path, results, evals):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (g, by_model) in zip(axes[0], results.items()):
        lam = evals[g] + 2  # eigenvalues of D^-1 A + A D^-1
        i = np.arange(2, len(lam) + 1)
        for model, r in by_model.items():
            ax.plot(i, r["spectrum"], "o-", ms=3, label=model)
        ax.plot(i, lam[1:] / lam[1], "k--", label="λ_i / λ_2")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(title=g, xlabel="Laplacian eigenvector i (top first, v_1 dropped)",
               ylabel="|Eᵀv_i| / |Eᵀv_2|")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Embedding energy along each Laplacian eigenvector (geometric models: mass on the top ones)",
                 fontsize=11)
    save_figure(fig, path, dpi=90)


# ----------------------------------------------------------------------------- studies


def run_main(graphs, models, args, device, out):
    results, embs, evals = {}, {}, {}
    for g, graph in graphs.items():
        ev, V = laplacian_eigs(graph)
        evals[g] = ev
        edges = edge_examples(graph)
        results[g] = {}
        for model in models:
            E, history = fit(model, graph, g, args, device, edges)
            results[g][model] = measures(E, history, V)
            embs[g, model] = E
            np.save(os.path.join(out, "embeddings", f"{g}_{model}.npy"), E.astype(np.float32))
            r = results[g][model]
            print(f"  {g:9s} {model:15s} edge recovery {r['edge_recovery']:.3f}  geometric level "
                  f"{r['geometric_level']:+.3f}  margin {r['geometric_margin']}")
    plot_heatmaps(os.path.join(out, "heatmaps.png"), models, graphs, embs,
                  "Cosine similarity of node embeddings (rows: graphs; path-star ordered root, then arm by "
                  "arm)")
    plot_grid3d(os.path.join(out, "embeddings_3d.png"), models, graphs, embs,
                "Node embeddings, top-3 principal components, graph edges drawn")
    plot_spectra(os.path.join(out, "spectrum.png"), results, evals)
    fig1 = [m for m in ("associative_nn", "tinygpt", "node2vec") if m in models]
    if fig1:
        plot_grid3d(os.path.join(out, "fig1.png"), fig1, graphs, embs,
                    "Fig. 1: associative memory vs Transformer vs Node2Vec, trained on edges only")
    return results


def run_speed(graphs, args, device, out):
    """Figs. 6, 21, 22: associative storage is found in a few steps, geometric storage takes longer."""
    res = {}
    for g, graph in graphs.items():
        edges = edge_examples(graph)
        res[g] = {}
        for model in SPEED_MODELS:
            steps = recipe(model, g, args.steps_scale, args.tinynn_recipe)[2]
            res[g][model] = fit(model, graph, g, args, device, edges, eval_every=max(1, steps // 100))[1]
        plot_speed(os.path.join(out, f"speed_{g}.png"), g, res[g])
    return res


def plot_speed(path, g, by_model):
    """Figs. 6, 21, 22, log-step axis: the associative control needs ~10 steps, the others thousands."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    for ax, key in zip(axes, ("edge_recovery", "geometric_level", "geometric_margin")):
        if key == "geometric_margin":
            ax.axhline(0, color="gray", lw=0.8, ls="--")
        for model, hs in by_model.items():
            if key not in hs[-1]:
                continue
            ax.plot([h["epoch"] for h in hs], [h[key] for h in hs], marker="o" if len(hs) < 20 else None,
                    ms=3, label=model)
        ax.set_xscale("symlog", linthresh=1)
        ax.set(title=f"{g}: {key.replace('_', ' ')}", xlabel="full-batch step (symlog)",
               ylabel=key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Memorization speed: wide associative control (frozen embeddings, lr 0.1) vs trainable "
                 "embeddings", fontsize=10)
    save_figure(fig, path, dpi=90)


def run_regularizers(args, device, out):
    """App. C.3.1: TinyNN width 512 on the cycle, the same number of steps in every setting."""
    res, embs = {}, {}
    for name, (self_edges, std, lr, wd, drop) in REGULARIZERS.items():
        graph = tiny_graph("cycle", self_edges=self_edges)
        _, V = laplacian_eigs(tiny_graph("cycle"))  # every setting read in the plain cycle's basis
        edges = edge_examples(graph)
        E, history = fit("tinynn", graph, "cycle", args, device, edges, width=512, lr=lr, weight_decay=wd,
                         init_std=std, dropout=drop)
        res[name] = {"self_edges": self_edges, "init_std": std, "lr": lr, "weight_decay": wd, "dropout": drop,
                     **measures(E, history, V)}
        embs[name, "tinynn"] = E
        np.save(os.path.join(out, "embeddings", f"cycle_tinynn_{name}.npy"), E.astype(np.float32))
        print(f"  regularizer {name:22s} edge recovery {res[name]['edge_recovery']:.3f}  geometric level "
              f"{res[name]['geometric_level']:+.3f}  margin {res[name]['geometric_margin']:+.3f}")
    settings = {name: tiny_graph("cycle") for name in REGULARIZERS}  # one column per setting
    plot_grid3d(os.path.join(out, "regularizers_3d.png"), ["tinynn"], settings, embs,
                "App. C.3.1: TinyNN on the cycle, one setting per panel")
    plot_heatmaps(os.path.join(out, "regularizers_heatmaps.png"), ["tinynn"], settings, embs,
                  "App. C.3.1: cosine heatmaps, TinyNN on the cycle (rows: settings)")
    with open(os.path.join(out, "regularizers.md"), "w") as f:
        f.write(regularizer_table(res))
    return res


def regularizer_table(res):
    lines = ["| setting | self-edges | init std | lr | wd | dropout | edge recovery | geometric level | "
             "geometric margin |", "|" + "---|" * 9]
    lines += [f"| {n} | {r['self_edges']} | {r['init_std']} | {r['lr']:g} | {r['weight_decay']:g} "
              f"| {r['dropout']:g} | {r['edge_recovery']:.3f} | {r['geometric_level']:+.3f} "
              f"| {r['geometric_margin']:+.3f} |"
              for n, r in res.items()]
    return "\n".join(lines) + "\n"


def run_forward_only(graphs, args, device, out):
    """Fig. 32: TinyGPT on one direction of every edge."""
    res, embs = {}, {}
    for g, graph in graphs.items():
        _, V = laplacian_eigs(graph)
        edges = edge_examples(graph, "forward")
        E, history = fit("tinygpt", graph, g, args, device, edges)
        res[g] = measures(E, history, V)
        embs[g, "tinygpt_forward_only"] = E
        print(f"  forward-only {g:9s} edge recovery {res[g]['edge_recovery']:.3f}  geometric level "
              f"{res[g]['geometric_level']:+.3f}")
    plot_grid3d(os.path.join(out, "forward_only_3d.png"), ["tinygpt_forward_only"], graphs, embs,
                "Fig. 32: TinyGPT trained on forward edges only")
    return res


# ----------------------------------------------------------------------------- seeds


def seed_rows(metrics):
    """One run's final measures as {study: {row: {measure: number or None}}}, the rows that
    --seeds summarizes (speed: when every edge is first recovered, the geometric level then and at
    its peak, and for TinyNN models how often the margin is positive)."""
    keep = lambda r: {k: r[k] for k in ("edge_recovery", "geometric_level", "geometric_margin",
                                        "geometric_margin_authors") if r.get(k) is not None}
    bottom = lambda spec: float(np.mean(spec[len(spec) // 2:]))  # ~1: no spectral geometry, ~0: all on top
    rows = {"main": {f"{g} {m}": {**keep(r), "spectrum_bottom_half": bottom(r["spectrum"])}
                     for g, by_model in metrics.get("results", {}).items() for m, r in by_model.items()}}
    rows["speed"] = {}
    for g, by_model in metrics.get("speed", {}).items():
        for m, hs in by_model.items():
            level = [h["geometric_level"] for h in hs]
            row = {"first_step_all_edges": epochs_to(hs, 1.0, "edge_recovery"),  # recovery is at most 1
                   "final_edge_recovery": hs[-1]["edge_recovery"], "peak_geometric_level": max(level),
                   "peak_level_step": hs[int(np.argmax(level))]["epoch"], "final_geometric_level": level[-1]}
            if "geometric_margin" in hs[-1]:
                row["evaluations_margin_positive"] = sum(h["geometric_margin"] > 0 for h in hs)
                margins = [h["geometric_margin"] for h in hs[1:]]
                row["largest_margin_after_step_0"] = max(margins, default=None)
                row["final_geometric_margin"] = hs[-1]["geometric_margin"]
            rows["speed"][f"{g} {m}"] = row
    rows["regularizers"] = {name: keep(r) for name, r in metrics.get("regularizers", {}).items()}
    rows["forward-only"] = {g: keep(r) for g, r in metrics.get("forward_only", {}).items()}
    return {study: r for study, r in rows.items() if r}


# ----------------------------------------------------------------------------- main


def run(args, device):
    """Every selected study of one seed; writes --out and returns its metrics."""
    # tiny models: every op touches a few KB, so thread hand-offs cost more than they save
    # (measured: the --quick run took 22 s on one thread, minutes on two busy cores)
    torch.set_num_threads(1)
    prepare_out(args.out)
    for sub in ("embeddings", "graphs"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    names = TINY_GRAPHS if "all" in args.graph else list(dict.fromkeys(args.graph))
    models = MODELS if "all" in args.model else list(dict.fromkeys(args.model))
    studies = STUDIES if "all" in args.study else list(dict.fromkeys(args.study))
    graphs = {g: tiny_graph(g, seed=args.seed) for g in names}
    for g, graph in graphs.items():
        write_json(os.path.join(args.out, "graphs", f"{g}.json"),
                   {"num_nodes": graph.number_of_nodes(), "edges": undirected_edges(graph)})
    print(f"tiny graphs {', '.join(names)}; studies {', '.join(studies)}; seed {args.seed}; on "
          f"{device_name(device)}, {torch.get_num_threads()} thread(s)")
    t0 = time.time()
    metrics = {"config": vars(args), "device": device_name(device), "torch_threads": torch.get_num_threads()}
    metrics["results"] = run_main(graphs, models, args, device, args.out) if "main" in studies else {}
    if "speed" in studies:
        metrics["speed"] = run_speed(graphs, args, device, args.out)
    if "regularizers" in studies:
        metrics["regularizers"] = run_regularizers(args, device, args.out)
    if "forward-only" in studies:
        metrics["forward_only"] = run_forward_only(graphs, args, device, args.out)
    metrics["wall_time_s"] = time.time() - t0
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    print(f"done in {metrics['wall_time_s']:.0f}s -> {args.out}")
    return metrics


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    return over_seeds(run, seed_rows, args, device) if args.seeds else run(args, device)


if __name__ == "__main__":
    main()
