"""Node2Vec and the spectral bias (§4.3, §4.4, App. F; Figs. 7-9, 25): a wide, weight-tied, unregularised
2-layer Node2Vec trained with the full softmax on 1-hop neighbours puts its embeddings on the top
(Fiedler-like) eigenvectors of the graph Laplacian, and App. F's dynamics explain how.

  python exp_node2vec.py                                   # every study, CPU, under 20 minutes
  python exp_node2vec.py --quick                           # smoke configuration, seconds
  python exp_node2vec.py --graph cycle grid --study main   # one study on two graphs
  python exp_node2vec.py --graph all --study main --optimizer gd --lr 1 --out runs/node2vec_gd
  python exp_node2vec.py --seeds 0 1 2 --parallel 2         # every study per seed, then the spread

Studies (main always runs: the others compare against it):
  main        the tied width-100 model on each graph: spectrum (Fig. 7), embedding pictures next to the
              Laplacian eigenvectors (Fig. 8 left) and App. F's dynamics measured along training
  width       the same model at other widths, narrower and much wider than the graph
  untied      logits E F^T and self-edges (§4.4, Figs. 9, 25): negative (zigzag) eigendirections
  complexity  bit and norm complexity of associative vs geometric storage (§3.2, App. E.2)
"""
import math
import os
import time

import numpy as np
import torch

from common import (TINY_GRAPHS, ArgParser, Node2Vec, Node2VecConfig, add_seed_flags, adjacency,
                    coefficient_matrix, curve_band, device_name, die, edge_margin, grid_graph, k_for_energy,
                    laplacian_eigs, logit_recall, navigation_score, neighbour_targets, over_seeds,
                    parse_with_presets, path_star, pick_device, prepare_out, preset_help, principal_angles,
                    pyplot, save_figure, seed_everything, spectral_energy, tiny_graph, train_node2vec,
                    with_self_edges, write_json)

LARGE_GRAPHS = ("path_star_large", "grid_large")
GRAPHS = TINY_GRAPHS + LARGE_GRAPHS
STUDIES = ("main", "width", "untied", "complexity")
QUICK = dict(steps=300, widths=[8, 64], snapshots=20, large_star=[8, 6], large_grid=7)
UNTIED_VARIANTS = {  # name: (tied, self_edges)
    "tied": (True, False), "tied_self_edges": (True, True),
    "untied": (False, False), "untied_self_edges": (False, True)}


def get_args(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", nargs="+", choices=("all",) + GRAPHS, default=["all"],
                   help="graphs to run; 'all' runs main and complexity on every graph and width and untied "
                        "on the four tiny ones; graphs named explicitly get every selected study")
    p.add_argument("--study", nargs="+", choices=("all",) + STUDIES, default=["all"],
                   help="studies to run (main always runs)")
    p.add_argument("--steps", type=int, default=10000, help="full-batch training steps of every run")
    p.add_argument("--width", type=int, default=100, help="embedding width of the main study")
    p.add_argument("--lr", type=float, default=1e-2, help="constant learning rate")
    p.add_argument("--optimizer", choices=["adam", "gd"], default="adam",
                   help="adam (the paper's) or plain full-batch gradient descent (App. F's dynamics)")
    p.add_argument("--loss-sum", action="store_true",
                   help="sum the loss over source nodes (the release, with --optimizer gd) instead of "
                   "averaging")
    p.add_argument("--init-std", type=float, default=1.0, help="std of the normal init of E (and F)")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16, 64, 256, 1024],
                   help="width study: widths")
    p.add_argument("--snapshots", type=int, default=80,
                   help="main study: log-spaced steps at which App. F's quantities are measured")
    p.add_argument("--large-star", type=int, nargs=2, default=[50, 11], metavar=("D", "L"),
                   help="path_star_large = G(D, L): D arms, L nodes per root-to-leaf path")
    p.add_argument("--large-grid", type=int, default=22, metavar="SIDE", help="grid_large = SIDE x SIDE")
    p.add_argument("--seed", type=int, default=0, help="seed of the path-star ids and of every init")
    add_seed_flags(p)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    p.add_argument("--out", default="runs/node2vec", help="output folder")
    p.add_argument("--quick", action="store_true", help=preset_help("smoke preset", QUICK))
    args = parse_with_presets(p, {"quick": QUICK}, argv)
    checks = [(args.steps >= 1, "--steps must be >= 1"),
              (min([args.width] + args.widths) >= 1, "widths must be >= 1"),
              (args.lr > 0 and args.init_std > 0, "--lr and --init-std must be > 0"),
              (args.snapshots >= 2, "--snapshots must be >= 2"),
              (args.large_star[0] >= 2 and args.large_star[1] >= 2, "--large-star needs D >= 2 and L >= 2"),
              (args.large_grid >= 2, "--large-grid must be >= 2"),
              (args.parallel >= 1, "--parallel must be >= 1")]
    for ok, msg in checks:
        if not ok:
            die(msg)
    return args


# ----------------------------------------------------------------------------- graphs


def build_graph(name, args, self_edges=False):
    if name in TINY_GRAPHS:
        return tiny_graph(name, self_edges, args.seed)
    if name == "path_star_large":
        graph, root, arms = path_star(*args.large_star, seed=args.seed)
        graph.graph.update(root=root, arms=arms)
    else:
        graph = grid_graph(args.large_grid, args.large_grid)
    return with_self_edges(graph) if self_edges else graph


def graph_json(graph):
    return {"num_nodes": graph.number_of_nodes(), "edges": sorted([min(e), max(e)] for e in graph.edges)}


def hops(A):
    from scipy.sparse.csgraph import shortest_path
    return shortest_path(A, unweighted=True)  # inf between components


# ----------------------------------------------------------------------------- measures


def softmax_rows(L):
    Z = np.exp(L - L.max(1, keepdims=True))
    return Z / Z.sum(1, keepdims=True)


def dominant_columns(E, frac=0.95):
    """E's own dominant column space: its top left singular vectors holding `frac` of ||E||^2."""
    U, S, _ = np.linalg.svd(E, full_matrices=False)
    return U[:, :int(np.searchsorted(np.cumsum(S ** 2) / (S ** 2).sum(), frac)) + 1]


def eigen_blocks(evals):
    """Block id of each eigenvalue; equal eigenvalues share one (their vectors are any basis)."""
    return np.r_[0, np.cumsum(np.diff(evals) < -1e-8)]


def offblock(X, V, blocks):
    """Share of V^T X V outside the blocks of equal eigenvalues: 0 iff the Laplacian's eigenvectors
    diagonalise X (F.3's 'time-invariant eigenvectors' observation)."""
    B = V.T @ X @ V
    return float(np.linalg.norm(B[blocks[:, None] != blocks[None, :]]) / np.linalg.norm(B))


def edge_scores(L, A):
    """Edge recall (v among the top-deg(u) logits of row u; u itself excluded unless it is a training
    self-edge, App. C.3) and the worst row margin (App. E.2), both from common (ties and non-finite
    values count against)."""
    edges = np.argwhere(np.asarray(A) > 0)
    return logit_recall(L, edges), edge_margin(L, edges)


def cosine_by_hops(E, D):
    """Mean cosine similarity of node embeddings at 1, 2 and >= 3 hops (§B.5 geometric level)."""
    X = E / np.linalg.norm(E, axis=1, keepdims=True)
    cos = X @ X.T
    far = np.isfinite(D) & (D >= 3)
    return {"cos_1hop": float(cos[D == 1].mean()), "cos_2hop": float(cos[D == 2].mean()),
            "cos_3plus_hops": float(cos[far].mean()) if far.any() else None}


def dynamics_record(rec, A, V, k, blocks, E_final):
    """App. F's quantities at one snapshot of a tied run."""
    E = rec["params"]["E"].numpy()
    G = E @ E.T
    P = softmax_rows(G)
    C = coefficient_matrix(A, P)
    U = dominant_columns(E)
    # claim (a): E's dominant directions (at most k of them) lie in the span of the top-k eigenvectors
    angles = np.degrees(principal_angles(U[:, :k], V[:, :k]))
    Cv = np.linalg.norm(C @ V, axis=0)
    fiedler = Cv[1:k] if k > 1 else Cv[:1]  # claim (b) is about the Fiedler-like v_2..v_k, not v_1
    C_eigs = np.linalg.eigvalsh(C)[::-1]
    return {"step": rec["step"], "loss": rec["loss"], "grad_norm": rec["grad_norm"],
            "update_norm": rec["update_norm"], "E_norm": float(np.linalg.norm(E)),
            "energy_top_k": float(spectral_energy(E, V)[:k].sum()),
            "rank95": U.shape[1], "max_angle_deg": float(angles.max()),
            "mean_angle_deg": float(angles.mean()),
            "Cv_top": Cv[:min(k, 6)].tolist(), "Cv_top_max": float(fiedler.max()),
            "Cv_rest_median": float(np.median(Cv[k:])) if k < len(Cv) else None,
            "CU_top_max": float(np.linalg.norm(C @ U, axis=0).max()),
            "C_eigs_top": C_eigs[:10].tolist(), "C_eig_min": float(C_eigs[-1]),
            "offblock_C": offblock(C, V, blocks), "offblock_P": offblock(P, V, blocks),
            "offblock_EEt": offblock(G, V, blocks),
            "dist_to_final": float(np.linalg.norm(E - E_final) / np.linalg.norm(E_final)),
            "direction_dist": float(1 - (E * E_final).sum() / np.linalg.norm(E) / np.linalg.norm(E_final))}


# ----------------------------------------------------------------------------- runs


def fit(graph, args, device, width=None, tied=True, snapshot_steps=(), desc="node2vec"):
    seed_everything(args.seed)
    model = Node2Vec(Node2VecConfig(graph.number_of_nodes(), width or args.width, tied,
                                    args.init_std)).to(device)
    return train_node2vec(model, neighbour_targets(adjacency(graph), device), args.steps, args.lr,
                          args.optimizer, snapshot_steps, desc, loss_sum=args.loss_sum)


def log_steps(steps, n):
    return sorted({0, steps} | set(np.geomspace(1, steps, n).astype(int).tolist()))


def run_main(name, graph, args, device, out):
    """The tied width-`--width` run: final geometry plus App. F's dynamics at log-spaced steps."""
    A = adjacency(graph)
    N, m = graph.number_of_nodes(), graph.number_of_edges()
    evals, V = laplacian_eigs(graph)
    records = fit(graph, args, device, snapshot_steps=log_steps(args.steps, args.snapshots), desc=name)
    E0, E = records[0]["params"]["E"].numpy(), records[-1]["params"]["E"].numpy()
    energy, energy0 = spectral_energy(E, V), spectral_energy(E0, V)
    k = k_for_energy(energy, evals)
    blocks = eigen_blocks(evals)
    history = [dynamics_record(r, A, V, k, blocks, E) for r in records]
    half = min(records, key=lambda r: abs(r["step"] - args.steps / 2))["params"]["E"].numpy()
    L = E @ E.T
    recall, margin = edge_scores(L, A)
    D = hops(A)
    final = history[-1]
    res = {"num_nodes": N, "num_edges": m, "k": k, "laplacian_top_eigenvalues": evals[:k].tolist(),
           "energy_top_k": final["energy_top_k"], "energy_top_k_init": float(energy0[:k].sum()),
           "energy_top_k_random": k / N, "energy_top1_degenerate": float(energy[0]),
           "rank95": final["rank95"], "max_angle_deg": final["max_angle_deg"],
           "mean_angle_deg": final["mean_angle_deg"], "max_angle_deg_init": history[0]["max_angle_deg"],
           "Cv_top_max": final["Cv_top_max"], "Cv_top_max_init": history[0]["Cv_top_max"],
           "Cv_rest_median": final["Cv_rest_median"], "CU_top_max": final["CU_top_max"],
           "C_eigs_top": final["C_eigs_top"], "C_eigs_top_init": history[0]["C_eigs_top"],
           "offblock_C": final["offblock_C"], "offblock_P": final["offblock_P"],
           "offblock_EEt": final["offblock_EEt"],
           "loss": final["loss"], "loss_floor": float(np.log(A.sum(1)).mean()),
           "grad_norm": final["grad_norm"], "grad_norm_init": history[0]["grad_norm"],
           "update_norm_last": history[-2]["update_norm"],
           "E_norm_init": history[0]["E_norm"], "E_norm": final["E_norm"],
           "E_change_second_half": float(np.linalg.norm(E - half) / np.linalg.norm(E)),
           "edge_recall": recall, "margin": margin, **cosine_by_hops(E, D),
           "spectrum": {"eigenvalues": evals.tolist(), "projection": np.linalg.norm(V.T @ E, axis=1).tolist(),
                        "projection_init": np.linalg.norm(V.T @ E0, axis=1).tolist()}}
    if "arms" in graph.graph:  # §2.4: does a leaf point at its own arm's first node?
        arms = graph.graph["arms"]
        res["navigation_top1"], res["navigation_mean_rank"] = navigation_score(E, arms, arms)
        res["navigation_chance_top1"] = 1 / len(graph.graph["arms"])
    np.save(os.path.join(out, "embeddings", f"{name}.npy"), E.astype(np.float32))
    return res, history, dict(graph=graph, A=A, evals=evals, V=V, E=E, E0=E0)


def run_width(name, graph, main, args, device):
    """§4.3 'no bottleneck': the same run at narrower and much wider widths."""
    evals, V, k = main["state"]["evals"], main["state"]["V"], main["result"]["k"]
    rows = []
    for width in args.widths:
        rec = fit(graph, args, device, width=width, desc=f"{name} width {width}")[-1]
        E = rec["params"]["E"].numpy()
        energy = spectral_energy(E, V)
        angles = np.degrees(principal_angles(dominant_columns(E)[:, :k], V[:, :k]))
        rows.append({"width": width, "k95": k_for_energy(energy, evals),
                     "energy_top_k": float(energy[:k].sum()),
                     "max_angle_deg": float(angles.max()), "loss": rec["loss"], "grad_norm": rec["grad_norm"],
                     "E_norm": float(np.linalg.norm(E))})
    return rows


def run_untied(name, graph, main, args, device, out):
    """§4.4: untied logits E F^T can express negative eigendirections (zigzags); self-edges damp them.
    All four variants are read in the same basis: the eigenvectors of the graph without self-edges."""
    evals, V, A0 = main["state"]["evals"], main["state"]["V"], main["state"]["A"]
    lam_S = evals + 2  # eigenvalues of D^-1 A + A D^-1: negative = zigzag directions
    res = {}
    for variant, (tied, self_edges) in UNTIED_VARIANTS.items():
        g = with_self_edges(graph) if self_edges else graph
        if variant == "tied":
            E, F, loss = main["state"]["E"], main["state"]["E"], main["result"]["loss"]
        else:
            rec = fit(g, args, device, tied=tied, desc=f"{name} {variant}")[-1]
            E, loss = rec["params"]["E"].numpy(), rec["loss"]
            F = rec["params"]["F"].numpy() if not tied else E
            np.save(os.path.join(out, "embeddings", f"{name}_{variant}.npy"), E.astype(np.float32))
            if not tied:
                np.save(os.path.join(out, "embeddings", f"{name}_{variant}_unembedding.npy"),
                        F.astype(np.float32))
        W = E @ F.T
        q = np.einsum("ij,ik,kj->j", V, W, V)  # v_i^T W v_i: the logit matrix along each eigenvector
        lam, U = np.linalg.eigh((W + W.T) / 2)
        top = np.argsort(-np.abs(lam))[:3]
        recall, _ = edge_scores(W, adjacency(g))
        res[variant] = {"loss": loss, "logit_spectrum": q.tolist(),
                        "negative_logit_share": float(np.clip(-q, 0, None).sum() / np.abs(q).sum()),
                        "bottom3_logit": float(q[-3:].mean()), "top_nonconstant_logit": float(q[1:4].max()),
                        "top3_eigenvalues": lam[top].tolist(),
                        "top3_smoothness": ((V.T @ U[:, top]) ** 2 * lam_S[:, None]).sum(0).tolist(),
                        "top3_vectors": U[:, top].T.tolist(),
                        "E_energy_negative_dirs": float(spectral_energy(E, V)[lam_S < 0].sum()),
                        "edge_recall": recall, **cosine_by_hops(E, hops(A0))}
    return res


# ----------------------------------------------------------------------------- complexity (§3.2, App. E.2)


def construction(name, graph):
    """The paper's hand-made geometric embeddings (App. E.2): (dimensions k, cells per dimension c)."""
    if "arms" in graph.graph:
        return len(graph.graph["arms"]), len(graph.graph["arms"][0])  # one dimension per arm, l cells
    if "shape" in graph.graph:
        return 2, max(graph.graph["shape"])  # the lattice itself
    if name == "cycle":
        return 2, graph.number_of_nodes()  # a circle, one cell per node
    return None


def norm2_per_margin(res):
    """The trained tied model's ‖E‖_F² at unit margin (E -> sE scales both by s²); None without a
    positive margin."""
    return res["E_norm"] ** 2 / res["margin"] if res["margin"] > 0 else None


def complexity_row(name, graph, res):
    N, m = graph.number_of_nodes(), graph.number_of_edges()
    bits = math.ceil(math.log2(N))
    cons = construction(name, graph)
    return {"graph": name, "nodes": N, "edges": m,
            "assoc_bits": 2 * m * bits,  # m ids of log N bits, both directions (as trained)
            "geo_construction": f"k={cons[0]}, c={cons[1]}" if cons else None,
            "geo_bits_construction": N * cons[0] * math.ceil(math.log2(cons[1])) if cons else None,
            "geo_bits_measured": N * res["k"] * bits,  # k the trained model uses, c = N cells (worst case)
            "assoc_norm2": 2 * m,  # ||A||_F^2: one-hot embeddings, lookup W = A, margin 1
            "geo_norm2_lower": N,  # every ||e_u||^2 >= 1 for margin 1
            "geo_norm2_measured": norm2_per_margin(res),
            "margin": res["margin"], "edge_recall": res["edge_recall"]}


def complexity_markdown(rows):
    fmt = lambda x: "–" if x is None else f"{x:,.0f}" if isinstance(x, (int, float)) else str(x)
    head = ["graph", "N", "m", "assoc. bits 2m⌈log2 N⌉", "geo. construction", "geo. bits N·k·⌈log2 c⌉",
            "geo. bits, measured k, c=N", "assoc. ‖W‖² = 2m", "geo. ‖E‖² ≥ N", "trained ‖E‖²/margin"]
    keys = ["graph", "nodes", "edges", "assoc_bits", "geo_construction", "geo_bits_construction",
            "geo_bits_measured", "assoc_norm2", "geo_norm2_lower", "geo_norm2_measured"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def layout(graph):
    """Fixed 2-D drawing of a graph: path-stars radial, grids as lattices, others by Kamada-Kawai."""
    import networkx as nx
    if "arms" in graph.graph:
        arms = graph.graph["arms"]
        pos = {graph.graph["root"]: (0.0, 0.0)}
        for j, arm in enumerate(arms):
            a = 2 * np.pi * j / len(arms)
            pos.update({v: (t * np.cos(a), t * np.sin(a)) for t, v in enumerate(arm) if t})
        return pos
    if "shape" in graph.graph:
        cols = graph.graph["shape"][1]
        return {v: (v % cols, -(v // cols)) for v in graph}
    if nx.is_connected(graph):
        return nx.kamada_kawai_layout(graph)
    return nx.spring_layout(graph, seed=0)


def node_colors(graph, A):
    """Path-stars: one colour per arm (root black); other graphs: hops from each component's first node."""
    if "arms" in graph.graph:
        c = np.zeros(len(A))
        for j, arm in enumerate(graph.graph["arms"]):
            c[arm[1:]] = (j + 0.5) / len(graph.graph["arms"])
        return c, "hsv", "arm"
    D = hops(A)
    first = np.argmax(np.isfinite(D), axis=1)  # lowest node id in each node's component
    return D[first, np.arange(len(A))], "viridis", "hops from node " + "/".join(map(str, sorted(set(first))))


def draw(ax, coords, graph, colors, cmap, title, labels=False, **scatter):
    from matplotlib.collections import LineCollection
    segs = [(coords[u], coords[v]) for u, v in graph.edges if u != v]
    ax.add_collection(LineCollection(segs, colors="0.6", lw=0.6, zorder=1))
    sc = ax.scatter(coords[:, 0], coords[:, 1], c=colors, cmap=cmap, s=scatter.pop("s", 40), zorder=2,
                    edgecolors="k", linewidths=0.3, **scatter)
    if labels:
        for i, (x, y) in enumerate(coords):
            ax.annotate(str(i), (x, y), fontsize=6, ha="center", va="center", zorder=3)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.autoscale_view()
    return sc


def pca2(E):
    X = E - E.mean(0)  # centring drops the near-constant direction that dominates E (Remark 6)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    return U[:, :2] * S[:2], (S[:2] ** 2 / (S ** 2).sum())


def plot_spectrum(path, results, max_index=150):
    """Fig. 7: |E^T v_i| / |E^T v_2| beside lambda_i / lambda_2 (eigenvalues of D^-1 A + A D^-1)."""
    plt = pyplot()
    names = list(results)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        sp = results[name]["main"]["spectrum"]
        lam = np.array(sp["eigenvalues"]) + 2
        n = min(len(lam), max_index + 1)
        i = np.arange(2, n + 1)
        proj, proj0 = np.array(sp["projection"]), np.array(sp["projection_init"])
        ax.plot(i, proj[1:n] / proj[1], "o-", ms=3, label="trained |E^T v_i| / |E^T v_2|")
        ax.plot(i, proj0[1:n] / proj0[1], "s-", ms=2, color="0.6", label="at init")
        ax.plot(i, lam[1:n] / lam[1], "--", color="C3", label="λ_i / λ_2 of D⁻¹A + AD⁻¹")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set(xlabel="eigenvector index i (top first; v_1 dropped)", ylabel="relative to i = 2",
               title=f"{name} (N = {len(lam)}{', first %d shown' % max_index if len(lam) > n else ''})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.suptitle("Fig. 7: projection of the Node2Vec embeddings on each Laplacian eigenvector, beside the "
                 "eigenvalue profile", fontsize=11)
    save_figure(fig, path, dpi=100)


def plot_embeddings(path, states):
    """Fig. 8 left next to Fig. 1 right: Laplacian eigenvectors (v2, v3) and the two top principal
    components of the trained (and, as a control, the initial) Node2Vec embeddings."""
    plt = pyplot()
    fig, axes = plt.subplots(len(states), 3, figsize=(12, 3.6 * len(states)), squeeze=False)
    for row, (name, st) in zip(axes, states.items()):
        g, A = st["graph"], st["A"]
        colors, cmap, what = node_colors(g, A)
        small = len(A) <= 20
        s = 40 if small else 10
        draw(row[0], st["V"][:, 1:3], g, colors, cmap, f"{name}: Laplacian eigenvectors (v2, v3)", small, s=s)
        for ax, E, when in ((row[1], st["E"], "trained"), (row[2], st["E0"], "at init (control)")):
            xy, var = pca2(E)
            draw(ax, xy, g, colors, cmap, f"Node2Vec {when}: top-2 PCs ({var.sum():.0%} of variance)", small,
                 s=s)
        row[0].set_ylabel(f"colour: {what}", fontsize=8)
    fig.suptitle("Node2Vec embeddings (PCA of E, no Laplacian used) beside the Laplacian eigenvectors",
                 fontsize=11)
    save_figure(fig, path, dpi=90, rect=(0, 0, 1, 0.985))


def plot_dynamics(path, name, history, res):
    """App. F over training: alignment, null space of C, eigenvalues of C, gradient, convergence."""
    plt = pyplot()
    x = np.array([h["step"] for h in history])
    get = lambda key: np.array([h[key] if h[key] is not None else np.nan for h in history], dtype=float)
    k = res["k"]
    fig, axes = plt.subplots(2, 4, figsize=(21, 8.4))
    ax = axes[0, 0]
    ax.plot(x, get("loss"), label="loss")
    ax.axhline(res["loss_floor"], color="C3", ls="--",
               label=f"mean log-degree {res['loss_floor']:.3f} (P = D⁻¹A)")
    ax.set(yscale="log", title="loss (degree-normalised cross-entropy)", ylabel="loss")
    ax = axes[0, 1]
    ax.plot(x, get("energy_top_k"), label=f"share of ‖E‖² in top-{k} eigenvectors")
    ax.axhline(k / res["num_nodes"], color="0.5", ls=":", label=f"random E: k/N = {k / res['num_nodes']:.2f}")
    ax.set(ylim=(-0.02, 1.02), title=f"(a) col(E) → top-{k} eigenvectors", ylabel="share")
    ax2 = ax.twinx()
    ax2.plot(x, get("max_angle_deg"), color="C1",
             label="largest principal angle, E's top directions vs top-k (right)")
    ax2.plot(x, get("mean_angle_deg"), color="C1", ls="--", label="mean principal angle (right)")
    ax2.set_ylabel("degrees")
    ax2.set_ylim(0, 92)
    ax2.legend(fontsize=7, loc="center right")
    ax = axes[0, 2]
    cv = np.array([h["Cv_top"] for h in history])
    for i in range(cv.shape[1]):
        ax.plot(x, cv[:, i], lw=1.2, label=f"‖C v_{i + 1}‖" + (" (near-constant)" if i == 0 else ""))
    ax.plot(x, get("CU_top_max"), "k--", label="max ‖C u‖ over E's dominant directions")
    ax.plot(x, get("Cv_rest_median"), ":", color="0.4", label="median ‖C v_i‖, i > k")
    ax.set(yscale="log", title="(b) null space of C", ylabel="norm")
    ax = axes[0, 3]
    ce = np.array([h["C_eigs_top"] for h in history])
    for i in range(ce.shape[1]):
        ax.plot(x, ce[:, i], lw=1, color=plt.cm.viridis(i / max(1, ce.shape[1] - 1)),
                label="top eigenvalues of C (1 → 10)" if i == 0 else None)
    ax.plot(x, get("C_eig_min"), color="C3", label="smallest eigenvalue of C")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set(title="eigenvalues of C (start = −Laplacian, rise to 0)", ylabel="eigenvalue (symlog)")
    ax = axes[1, 0]
    ax.plot(x, get("grad_norm"), label="‖∇ loss‖ = ‖C E‖ / N")
    ax.set(yscale="log", title="gradient norm", ylabel="norm")
    ax = axes[1, 1]
    ax.plot(x[:-1], get("dist_to_final")[:-1], label="‖E_t − E_T‖ / ‖E_T‖ (value)")
    ax.plot(x[:-1], get("direction_dist")[:-1], label="1 − cos(E_t, E_T) (direction)")
    ax.plot(x[:-1], get("update_norm")[:-1], label="‖ΔE‖ / ‖E‖ of one step")
    ax.set(yscale="log", title="does E converge in value? (T = last step)", ylabel="relative")
    ax2 = ax.twinx()
    ax2.plot(x, get("E_norm"), color="k", lw=1, ls="--", label="‖E‖_F (right axis)")
    ax2.set_ylabel("‖E‖_F")
    ax2.legend(fontsize=7, loc="upper center")
    ax = axes[1, 2]
    for key, label in (("offblock_C", "C"), ("offblock_P", "P"), ("offblock_EEt", "E Eᵀ")):
        ax.plot(x, get(key), label=f"V^T {label} V")
    ax.set(ylim=(-0.02, 1.02), title="F.3: do the Laplacian eigenvectors stay eigenvectors?",
           ylabel="off-diagonal share (0 = yes)")
    ax = axes[1, 3]
    ax.axis("off")
    ax.text(0, 1, summary_text(name, res), va="top", family="monospace", fontsize=8, transform=ax.transAxes)
    for ax in axes.flat[:7]:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, x[-1] * 1.1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"App. F dynamics of the tied Node2Vec on {name} (N = {res['num_nodes']}, top-k = {k})",
                 fontsize=12)
    save_figure(fig, path, dpi=85)


def summary_text(name, r):
    lines = [f"{name}: N={r['num_nodes']}, m={r['num_edges']}, k={r['k']}",
             f"share of ‖E‖² in top-{r['k']}: {r['energy_top_k']:.4f}",
             f"  (init {r['energy_top_k_init']:.3f}, random {r['energy_top_k_random']:.3f})",
             f"principal angles col95(E) vs top-{r['k']}: max {r['max_angle_deg']:.1f}°,",
             f"  mean {r['mean_angle_deg']:.1f}° (init max {r['max_angle_deg_init']:.1f}°)",
             f"max ‖C v_i‖, 2 ≤ i ≤ k: {r['Cv_top_max']:.2e} (init {r['Cv_top_max_init']:.2e})",
             f"max ‖C u‖ on col95(E): {r['CU_top_max']:.2e}",
             f"top eig(C): {r['C_eigs_top'][0]:.1e} … (init {r['C_eigs_top_init'][0]:.2f})",
             f"gradient: {r['grad_norm']:.1e} (init {r['grad_norm_init']:.1e})",
             f"‖E‖: {r['E_norm_init']:.1f} → {r['E_norm']:.1f}",
             f"‖E_T − E_T/2‖/‖E_T‖: {r['E_change_second_half']:.2e}",
             f"loss {r['loss']:.4f}  (floor {r['loss_floor']:.4f})",
             f"edge recall {r['edge_recall']:.3f}, margin {r['margin']:.2f}",
             f"cos 1/2/3+ hops: {r['cos_1hop']:.2f} / {r['cos_2hop']:.2f} / "
             + ("–" if r['cos_3plus_hops'] is None else f"{r['cos_3plus_hops']:.2f}")]
    if "navigation_top1" in r:
        lines.append(f"navigation top-1 {r['navigation_top1']:.2f} "
                     f"(chance {r['navigation_chance_top1']:.2f})")
    return "\n".join(lines)


def plot_dynamics_summary(path, runs):
    """runs: the results of one seed, or of several (--seeds): then each graph's line is their mean
    with a min..max band."""
    plt = pyplot()
    panels = [("energy_top_k", "share of ‖E‖² in top-k eigenvectors", "linear"),
              ("Cv_top_max", "max ‖C v_i‖ over the Fiedler-like v_2..v_k", "log"),
              ("grad_norm", "gradient norm", "log"),
              ("dist_to_final", "‖E_t − E_T‖ / ‖E_T‖", "log")]
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.4))
    for ax, (key, title, scale) in zip(axes, panels):
        for name, r in runs[0].items():
            cut = -1 if key == "dist_to_final" else None  # 0 at T by definition
            steps, mean, band = curve_band([seed[name]["dynamics"][:cut] for seed in runs], key, x="step")
            line, = ax.plot(steps, mean, label=f"{name} (k={r['main']['k']})")
            if len(runs) > 1:
                ax.fill_between(steps, *band, color=line.get_color(), alpha=0.2, lw=0)
        ax.set(xscale="symlog", yscale=scale, title=title, xlabel="step")
        ax.set_xlim(0, 1.1 * max(x["step"] for r in runs[0].values() for x in r["dynamics"]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = f"; mean over {len(runs)} seeds, band = min..max" if len(runs) > 1 else ""
    fig.suptitle("App. F on every graph: alignment with the top-k eigenvectors, ‖C v_i‖ on them, gradient, "
                 f"distance to the final E{seeds}", fontsize=11)
    save_figure(fig, path, dpi=90)


def plot_width(path, results):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    for name, r in results.items():
        rows = r["width"]
        w = [x["width"] for x in rows]
        N, k = r["main"]["num_nodes"], r["main"]["k"]
        axes[0].plot(w, [x["energy_top_k"] for x in rows], "o-", label=f"{name} (N={N}, k={k})")
        axes[1].plot(w, [x["k95"] / N for x in rows], "o-", label=name)
        axes[2].plot(w, [x["loss"] for x in rows], "o-", label=name)
    axes[0].set(title="share of ‖E‖² in the main run's top-k eigenvectors", ylabel="share",
                ylim=(-0.02, 1.02))
    axes[1].set(title="top eigenvectors needed for 95% of ‖E‖², / N", ylabel="k95 / N", ylim=(0, 1.02))
    axes[2].set(title="final loss", ylabel="loss")
    nmax = max(r["main"]["num_nodes"] for r in results.values())
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.axvline(nmax, color="0.5", ls=":", label=f"largest N = {nmax}")
        ax.set_xlabel("width (embedding dimension)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("§4.3: the spectral bias does not need a bottleneck (widths far above the node count)",
                 fontsize=11)
    save_figure(fig, path, dpi=90)


def plot_untied_spectrum(path, results):
    """Fig. 25(c)-style: the trained logit matrix along each Laplacian eigenvector, v_i^T W v_i."""
    plt = pyplot()
    names = list(results)
    cols = min(2, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        for j, (variant, r) in enumerate(results[name]["untied"].items()):
            q = np.array(r["logit_spectrum"])
            ax.plot(np.arange(1, len(q) + 1), q, marker="o", ms=3, color=f"C{j}",
                    ls="-" if variant.startswith("untied") else "--",
                    label=f"{variant} (neg. share {r['negative_logit_share']:.2f})")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_yscale("symlog", linthresh=1)
        ax.set(title=name, xlabel="Laplacian eigenvector i (top → bottom = zigzag)",
               ylabel="v_iᵀ W v_i (symlog)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("§4.4: the trained logit matrix W along each Laplacian eigenvector. Untied models put "
                 "negative\nlogits on the bottom (zigzag) eigenvectors, tied ones cannot, and self-edges "
                 "shrink them", fontsize=11)
    save_figure(fig, path, dpi=90)


def plot_untied_directions(path, name, graph, A, res):
    """Fig. 9 / 25: the three strongest directions of each model's logit matrix drawn on the graph."""
    plt = pyplot()
    pos = layout(graph)
    coords = np.array([pos[v] for v in range(len(A))])
    fig, axes = plt.subplots(len(res), 3, figsize=(11, 3.2 * len(res)), squeeze=False)
    for row, (variant, r) in zip(axes, res.items()):
        for ax, u, lam, sm in zip(row, r["top3_vectors"], r["top3_eigenvalues"], r["top3_smoothness"]):
            u = np.array(u)
            lim = np.abs(u).max()
            draw(ax, coords, graph, u, "RdBu_r", f"{variant}: λ={lam:.1f}, smoothness {sm:+.2f}", True,
                 vmin=-lim, vmax=lim, s=70)
    fig.suptitle(f"{name}: strongest eigenvectors of the logit matrix (colour = entry;\n"
                 "smoothness = uᵀ(D⁻¹A + AD⁻¹)u, +2 smooth, < 0 zigzag)", fontsize=10)
    save_figure(fig, path, dpi=90)


# ----------------------------------------------------------------------------- main


def plan(args):
    """(studies, graphs for main and complexity, graphs for width and untied)."""
    studies = set(STUDIES if "all" in args.study else args.study) | {"main"}
    if "all" in args.graph:  # width and untied cost ~10x main: on the large graphs minutes each
        return studies, list(GRAPHS), list(TINY_GRAPHS)
    graphs = list(dict.fromkeys(args.graph))
    return studies, graphs, graphs


def seed_rows(results):
    """One run's final measures for --seeds: {study: {row: {measure: value}}}; the main study's
    rows include the complexity table's trained column (`norm2_per_margin`)."""
    main_keys = ("k", "energy_top_k", "max_angle_deg", "mean_angle_deg", "Cv_top_max", "CU_top_max",
                 "offblock_C", "loss", "grad_norm", "E_change_second_half", "edge_recall", "cos_1hop",
                 "navigation_top1")
    rows = {"main": {g: {**{k: r["main"][k] for k in main_keys if k in r["main"]},
                         "norm2_per_margin": norm2_per_margin(r["main"])} for g, r in results.items()}}
    width_keys = ("energy_top_k", "k95", "max_angle_deg", "loss")
    rows["width"] = {f"{g} width {w['width']}": {k: w[k] for k in width_keys}
                     for g, r in results.items() for w in r.get("width", [])}
    rows["untied"] = {f"{g} {v}": {"loss": u["loss"], "negative_logit_share": u["negative_logit_share"],
                                   "bottom3_logit": u["bottom3_logit"],
                                   "zigzags_in_top3": sum(x < 0 for x in u["top3_smoothness"]),
                                   "cos_1hop": u["cos_1hop"]}
                      for g, r in results.items() for v, u in r.get("untied", {}).items()}
    return {study: r for study, r in rows.items() if r}


def run(args, device):
    """Every selected study of one seed; writes --out and returns the results."""
    prepare_out(args.out)
    for sub in ("embeddings", "graphs"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    studies, graphs, extra = plan(args)
    print(f"Node2Vec on {', '.join(graphs)}; studies {', '.join(s for s in STUDIES if s in studies)}; "
          f"{args.steps} steps of {args.optimizer} at lr {args.lr} on {device_name(device)}")
    t0 = time.time()
    results, states, times = {}, {}, {}
    for name in graphs:
        graph = build_graph(name, args)
        write_json(os.path.join(args.out, "graphs", f"{name}.json"), graph_json(graph))
        t = time.time()
        res, history, states[name] = run_main(name, graph, args, device, args.out)
        results[name] = {"main": res, "dynamics": history}
        times[f"main/{name}"] = time.time() - t
        plot_dynamics(os.path.join(args.out, f"dynamics_{name}.png"), name, history, res)
        print(f"  {name}: N={res['num_nodes']} k={res['k']} top-k share {res['energy_top_k']:.4f} "
              f"(random {res['energy_top_k_random']:.3f}), max angle {res['max_angle_deg']:.2f}°, "
              f"max|Cv| {res['Cv_top_max']:.1e}, grad {res['grad_norm']:.1e}, loss {res['loss']:.4f}, "
              f"{times[f'main/{name}']:.0f}s")
    plot_spectrum(os.path.join(args.out, "spectrum.png"), results)
    plot_embeddings(os.path.join(args.out, "embeddings.png"), states)
    plot_dynamics_summary(os.path.join(args.out, "dynamics_summary.png"), [results])
    if "width" in studies:
        for name in extra:
            t = time.time()
            main_run = {"state": states[name], "result": results[name]["main"]}
            results[name]["width"] = run_width(name, states[name]["graph"], main_run, args, device)
            times[f"width/{name}"] = time.time() - t
            print(f"  width {name}: top-k share " + ", ".join(f"{r['width']}: {r['energy_top_k']:.3f}"
                                                             for r in results[name]["width"]))
        plot_width(os.path.join(args.out, "width.png"), {n: results[n] for n in extra})
    if "untied" in studies:
        for name in extra:
            t = time.time()
            g = states[name]["graph"]
            write_json(os.path.join(args.out, "graphs", f"{name}_self_edges.json"),
                       graph_json(with_self_edges(g)))
            main_run = {"state": states[name], "result": results[name]["main"]}
            results[name]["untied"] = run_untied(name, g, main_run, args, device, args.out)
            times[f"untied/{name}"] = time.time() - t
            plot_untied_directions(os.path.join(args.out, f"untied_{name}.png"), name, g, states[name]["A"],
                                   results[name]["untied"])
            print(f"  untied {name}: " + ", ".join(f"{v} {r['negative_logit_share']:.2f}"
                                                   for v, r in results[name]["untied"].items()))
        plot_untied_spectrum(os.path.join(args.out, "untied_spectrum.png"), {n: results[n] for n in extra})
    complexity = None
    if "complexity" in studies:
        complexity = [complexity_row(n, states[n]["graph"], results[n]["main"]) for n in graphs]
        with open(os.path.join(args.out, "complexity.md"), "w") as f:
            f.write(complexity_markdown(complexity))
        print(complexity_markdown(complexity))
    wall = time.time() - t0
    write_json(os.path.join(args.out, "metrics.json"), {
        "config": vars(args), "device": device_name(device), "torch_threads": torch.get_num_threads(),
        "results": results, "complexity": complexity, "study_time_s": times, "wall_time_s": wall})
    print(f"done in {wall:.0f}s -> {args.out}")
    return results


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    if not args.seeds:
        return run(args, device)
    per_seed = over_seeds(run, seed_rows, args, device)
    plot_dynamics_summary(os.path.join(args.out, "dynamics_summary.png"), list(per_seed.values()))
    return per_seed


if __name__ == "__main__":
    main()
