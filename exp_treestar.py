"""Tree-star graphs (App. C.2, Fig. 16): in-weights path finding with a decision at every node.
T(d, b, l) has a root of degree d whose children each root a b-ary tree, all leaves at depth
l-1. The model memorizes every edge and learns root-to-leaf paths for 75% of the leaves of
one of two splits, each run into its own sub-folder:
  first_token: whole subtrees held out (no test path shares a prefix with a training path)
  leaf:        random leaves held out (a test path's prefix may have been trained on)
Every flag of exp_pathstar.py works here (--model mamba included).

  python exp_treestar.py --quick                  # CPU demo, both splits
  python exp_treestar.py --first-token-only       # T(1000, 2, 5) on one GPU
"""
import argparse
import os
import time

import numpy as np

import exp_pathstar
from common import (curve_band, device_name, die, measures, orient, pick_device, plot_panels, prepare_out,
                    pyplot, save_figure, split_arms, spread, tree_star, write_json, write_spread_csv)

# CPU-sized preset: T(100, 2, 4) = 701 nodes, 400 leaves, with the path-star quick model
QUICK = dict(exp_pathstar.QUICK, n=100, b=2, l=4)
SPLITS = ("first_token", "leaf")


def add_flags(p):
    g = p.add_argument_group("tree-star")
    g.add_argument("--b", type=int, default=2, help="children of every non-leaf node below the root")
    g.add_argument("--split", choices=SPLITS + ("both",), default="both",
                   help="held-out paths: whole subtrees (first_token), random leaves (leaf), or both runs")


def split_paths(paths, split, train_frac, seed):
    """Train/test root-to-leaf paths; `first_token` splits the root's children, so held-out
    paths never share a prefix with training paths (beyond the root)."""
    if split == "leaf":
        return split_arms(paths, train_frac, seed)
    firsts, _ = split_arms([[c] for c in sorted({p[1] for p in paths})], train_frac, seed)
    train = {c[0] for c in firsts}
    return [p for p in paths if p[1] in train], [p for p in paths if p[1] not in train]


def build(args, split):
    graph, root, paths, edges = tree_star(args.n, args.b, args.l, seed=args.seed)
    try:
        train, test = split_paths(paths, split, args.train_frac, args.seed)
    except ValueError as e:  # a bad --n / --b / --train-frac combination: a flag error, not a crash
        die(f"{split} split: {e}")
    return exp_pathstar.task_data(graph, root, paths, train, test, orient(edges, args.edges), args,
                                  graph_extra={"all_paths": paths, "branching": args.b, "split": split})


def tree_measure(data, args):
    """Measures of a tree's decoded paths for exp_pathstar.make_evaluate: chance per decision depth
    (1/d for the first hop, 1/b below) and the share of held-out paths whose greedy last hop is a
    sibling leaf seen in training (the split-at-leaf failure: the model recalls the trained leaf
    under the same parent)."""
    chance = [1.0, 1.0 / args.n] + [1.0 / args.b] * (args.l - 2)
    trained = {p[-1] for p in data["train_arms"]}
    leaves_under = {}
    for p in data["arms"]:
        leaves_under.setdefault(p[-2], set()).add(p[-1])

    def measure(split, predicted, targets):
        if split != "test":
            return {}
        out = {"chance_token_acc": chance}
        if not args.reverse_path and args.l > 2:
            last, parent, own = predicted[:, -1].tolist(), targets[:, -2].tolist(), targets[:, -1].tolist()
            out["test_last_hop_trained_sibling"] = float(np.mean(
                [v != o and v in trained and v in leaves_under[p] for v, p, o in zip(last, parent, own)]))
        return out
    return measure


def plot_tree(path, seed=0):
    """Fig. 16(a): a small tree-star, leaves coloured by split at the first token."""
    import networkx as nx
    plt = pyplot()
    graph, root, paths, _ = tree_star(3, 2, 4, seed=seed)
    train, _ = split_paths(paths, "first_token", 2 / 3, seed)
    train_nodes = {v for p in train for v in p[1:]}
    xs = {}  # a node sits above the mean position of its leaves
    for i, p in enumerate(paths):
        for depth, v in enumerate(p):
            xs.setdefault(v, (depth, []))[1].append(i)
    pos = {v: (np.mean(leaves), -depth) for v, (depth, leaves) in xs.items()}
    colors = ["#444444" if v == root else "#1f77b4" if v in train_nodes else "#d62728" for v in graph]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    nx.draw(graph, pos, ax=ax, node_color=colors, node_size=140, width=1.0)
    ax.set_title("Tree-star T(3, 2, 4): blue = training subtrees, red = held-out subtree\n"
                 "(split at the first token; split at the leaf mixes leaves instead)", fontsize=9)
    save_figure(fig, path, dpi=110)


def run_splits(args, device):
    """Both splits (or the one asked for) of one seed into --out/<split>/, with the figures."""
    splits = SPLITS if args.split == "both" else (args.split,)
    t0, results = time.time(), {}
    for split in splits:
        a = argparse.Namespace(**{**vars(args), "split": split, "out": os.path.join(args.out, split)})
        prepare_out(a.out)
        print(f"[split at {split.replace('_', ' ')}]")
        data = build(a, split)
        results[split] = exp_pathstar.run(a, device, data, tree_measure(data, a))
    if args.bench:
        return results
    last = {s: measures(r["history"][-1]) for s, r in results.items()}
    write_json(os.path.join(args.out, "metrics.json"), {
        "config": vars(args), "device": device_name(device), "final": last,
        "history": {s: r["history"] for s, r in results.items()},
        "wall_time_s": time.time() - t0})
    chance = 1.0 / args.n
    curves = lambda key: [([h["epoch"] for h in r["history"]], [h[key] for h in r["history"]],
                           f"split at {s}") for s, r in results.items()]
    label = exp_pathstar.scale(args) + (", first-token-only" if args.first_token_only else ", full path")
    plot_panels(os.path.join(args.out, "splits.png"), [
        ("held-out first token", "accuracy", curves("test_first_token_acc"), chance),
        ("held-out full path (exact match)", "accuracy", curves("test_path_acc"), None)],
        f"Tree-star, both splits (Fig. 16b): {label}")
    depths = range(1, args.l)
    final = {s: r["history"][-1] for s, r in results.items()}
    plot_panels(os.path.join(args.out, "depth_accuracy.png"), [(
        "final held-out accuracy at each decision depth (greedy)", "accuracy",
        [(list(depths), [final[s]["test_token_acc"][k] for k in depths], f"split at {s}") for s in final]
        + [(list(depths), [final[splits[0]]["chance_token_acc"][k] for k in depths],
            "chance (1/d, then 1/b)")],
        None)], f"Tree-star per-depth accuracy: {label}", xlabel="decision depth (1 = first token)")
    plot_tree(os.path.join(args.out, "tree.png"), args.seed)
    for s, f in final.items():
        print(f"split at {s}: held-out first token {f['test_first_token_acc']:.3f} (chance {chance:.4f}), "
              f"path {f['test_path_acc']:.3f}, per depth {np.round(f['test_token_acc'][1:], 3).tolist()}")
    return results


def build_split(args):
    """The data of --split (one split: a sweep's task for exp_pathstar.run_task)."""
    return build(args, args.split)


def main(argv=None):
    args = exp_pathstar.get_args(argv, doc=__doc__, defaults=dict(n=1000, l=5), quick=QUICK,
                                 add_flags=add_flags, graph_name=lambda a: f"T({a.n},{a.b},{a.l})")
    if args.b < 1:
        die("--b must be >= 1")
    if args.sweep and args.split == "both":
        die("--sweep runs on one split: add --split first_token or --split leaf")
    device = pick_device(args.device)
    prepare_out(args.out)
    if args.sweep:  # the path-star sweeps on one tree split
        task = (build_split, tree_measure)
        if args.seeds:
            return exp_pathstar.run_seeds(args, device, task)
        return exp_pathstar.run_sweep(args, device, task)
    if not args.seeds:
        return run_splits(args, device)
    per_seed = {}  # --seeds: each seed in --out/seed<k>/, then the spread of the final metrics per split
    for s in args.seeds:
        out = os.path.join(args.out, f"seed{s}")
        a = argparse.Namespace(**{**vars(args), "seed": s, "seeds": None, "out": out})
        prepare_out(a.out)
        per_seed[s] = run_splits(a, device)
    seeds, splits = list(args.seeds), list(per_seed[args.seeds[0]])
    table = {sp: spread({s: per_seed[s][sp]["history"][-1] for s in seeds}) for sp in splits}
    write_spread_csv(os.path.join(args.out, "summary.csv"), table, seeds, "split")
    write_json(os.path.join(args.out, "metrics.json"),
               {"config": vars(args), "seeds": seeds, "device": device_name(device), "splits": table})
    keys = [("test_first_token_acc", "held-out first token"), ("test_path_acc", "held-out full path"),
            ("test_last_hop_trained_sibling", "last hop = a trained sibling leaf")]

    def line(sp, key):  # mean over seeds and its min..max band
        epochs, mean, band = curve_band([per_seed[s][sp]["history"] for s in seeds], key)
        return epochs, mean, f"split at {sp}", band
    plot_panels(os.path.join(args.out, "summary.png"), [
        (label, "accuracy" if "acc" in key else "share", [line(sp, key) for sp in splits],
         1.0 / args.n if key == "test_first_token_acc" else None) for key, label in keys],
        f"Tree-star {exp_pathstar.scale(args)}: mean over seeds {seeds}, band = min..max")
    for sp in splits:
        t = table[sp]
        print(f"split at {sp}: " + ", ".join(f"{label} {t[key]['mean']:.3f} [{t[key]['min']:.3f}, "
                                             f"{t[key]['max']:.3f}]" for key, label in keys))
    return per_seed


if __name__ == "__main__":
    main()
