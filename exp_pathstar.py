"""In-weights path-star (§2, Figs. 3 and 12): a GPT memorizes the edges of one fixed path-star
graph and learns paths for 75% of its leaves; can it find the path from a held-out leaf?

  python exp_pathstar.py --quick --first-token-only       # CPU demo, a few minutes
  python exp_pathstar.py --n 5000 --first-token-only      # the paper's setting, one GPU
"""
import argparse
import copy
import csv
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import (GPT, ArgParser, GPTConfig, Mamba, MambaConfig, Node2Vec, Node2VecConfig, Phase, Vocab,
                    add_adamw_flags, add_step_flags, arm_edges, arm_modes, arm_spectrum, autocast,
                    bench_modes, benchmark, config_diff, curve_band, decode_answer, device_name, die,
                    edge_group, edge_queries, edge_recall, epochs_to, geometric_level, hop_cosine,
                    in_processes, k_for_energy, laplacian_eigs, linear_navigation, logit_lens, loss_tail,
                    measures, navigation_score, neighbour_targets, node2vec_loss, one_seed, output_rows,
                    parse_with_presets, path_group, path_prompts, path_star, path_targets, peak_memory_gib,
                    pick_device, plot_cosine_heatmap, plot_curves, plot_panels, prepare_out, preset_help,
                    read_torch_file, seed_everything, spectral_energy, spectral_share, split_arms, spread,
                    step_modes, token_embeddings, train, train_node2vec, write_json, write_spread_csv,
                    zigzag_reflection)

# CPU-sized preset: G(300, 5) with a 2-layer width-64 GPT (docs/notes.md).
# It keeps nanoGPT's AdamW (betas 0.95, clipping at 1, no decay on biases and norms): over seeds 0-2
# held-out first token 0.911 [0.800, 1.000] against 0.409 [0.107, 0.853] with the release's AdamW
QUICK = dict(n=300, l=5, n_layer=2, n_embd=64, n_head=4, pauses=4, lr=3e-3, weight_decay=0.1,
             batch_size=256, warmup=100, epochs=600, eval_every=20,
             edge_epochs=300, edge_lr=3e-3, edge_batch_size=256, edge_warmup=100,
             betas=[0.9, 0.95], grad_clip=1.0, decay="matrices")

# --sweep NAME: arm name -> the flags it sets (App. D and E.1 controls, Figs. 3, 12, 33-36)
SWEEPS = {
    "edges": {f"{e}{suffix}": dict(edges=e, reverse_path=rev)
              for suffix, rev in (("", False), ("_reverse", True)) for e in ("both", "forward", "backward")},
    "pauses": {f"p{k}": dict(pauses=k) for k in (0, 1, 2, 4, 8)},
    "recipe": {"interleaved": dict(recipe="interleaved"), "staged": dict(recipe="staged")},
    "frozen": {"trained": dict(freeze_embeddings=False), "frozen": dict(freeze_embeddings=True)},
    "direction": {"forward": dict(reverse_path=False), "reverse": dict(reverse_path=True)},
    "first-token": {"full_path": dict(first_token_only=False), "first_token": dict(first_token_only=True)},
    # beyond the paper (docs/results.md, "Geometric headroom"): the baseline plus one change each, from the
    # training edges alone; `frozen` is the associative control
    "headroom": {"baseline": {}, "frozen": dict(freeze_embeddings=True), "self_edges": dict(self_edges=True),
                 "spectral_init": dict(init="spectral"), "node2vec_init": dict(init="node2vec"),
                 "node2vec_aux": dict(aux_weight=0.1)},
}


def get_args(argv=None, doc=__doc__, defaults=None, quick=QUICK, add_flags=None, sweeps=True,
             graph_name=None):
    """Flags of the path-star experiment; other scripts reuse them with their own defaults and
    preset (`add_flags(parser)` adds a script's own flags, `graph_name(args)` names its graph in
    labels and titles; default G(d, l))."""
    p = ArgParser(description=doc.split("\n\n")[0], epilog="What a run writes and what each number in its "
                  "metrics.json means: docs/reading_a_run.md")
    if add_flags:
        add_flags(p)
    g = p.add_argument_group("graph and task")
    g.add_argument("--n", type=int, default=5000, help="arms d of the path-star graph G(d, l)")
    g.add_argument("--l", type=int, default=5, help="nodes on a root-to-leaf path, root included")
    g.add_argument("--train-frac", type=float, default=0.75, help="fraction of leaves with path supervision")
    g.add_argument("--first-token-only", action="store_true",
                   help="loss only on the first hop after the root (Fig. 3); default: whole path")
    g.add_argument("--reverse-path", action="store_true", help="targets leaf..root instead of root..leaf")
    g.add_argument("--edges", choices=["both", "forward", "backward"], default="both",
                   help="edge directions trained on (forward = parent->child)")
    g.add_argument("--pauses", type=int, default=5,
                   help="[PAUSE] tokens after the leaf (Table 2: 5 for G(5000,5))")
    g.add_argument("--recipe", choices=["interleaved", "staged"], default="interleaved",
                   help="edges and paths in every batch, or an edge phase then a path phase (App. D.3)")
    g.add_argument("--self-edges", action="store_true",
                   help="add an [EDGE] u u example for every node (§4.4: self-edges remove zigzags)")
    g.add_argument("--no-paths", action="store_true",
                   help="train on edges alone (§3.1: does a geometry appear without path supervision?)")
    m = p.add_argument_group("model (default GPT-mid)")
    m.add_argument("--model", choices=["gpt", "mamba"], default="gpt", help="sequence model")
    m.add_argument("--n-layer", type=int, default=12, help="blocks (GPT) or layers (Mamba)")
    m.add_argument("--n-embd", type=int, default=384, help="width")
    m.add_argument("--n-head", type=int, default=8, help="GPT: attention heads")
    m.add_argument("--dropout", type=float, default=0.0, help="GPT: dropout on embeddings, attention and MLP")
    m.add_argument("--d-state", type=int, default=16, help="Mamba: SSM state size per channel")
    m.add_argument("--d-conv", type=int, default=4, help="Mamba: causal conv width")
    m.add_argument("--expand", type=int, default=2, help="Mamba: inner channels = expand x width")
    m.add_argument("--mamba-block", choices=["authors", "residual"], default="authors",
                   help="Mamba: the release's block (LayerNorm, no residual, no final norm, GPT-style init "
                   "with zero biases) or the standard residual RMSNorm block")
    m.add_argument("--positions", choices=["sinusoidal", "learned"], default="sinusoidal",
                   help="GPT positions: fixed sinusoidal (App. B.2.1) or a trained table initialized "
                   "N(0, 1), as the release's GPT")
    m.add_argument("--init", choices=["random", "spectral", "node2vec"], default="random",
                   help="node-token embeddings at init: N(0, 0.02), the graph's top eigenvectors, or a "
                   "Node2Vec model trained on the training edges (both scaled to the N(0, 0.02) norm)")
    m.add_argument("--init-from", metavar="CKPT", help="start from the model weights of a checkpoint.pt (or "
                   "a --snapshots file) of a run on the same graph, with a fresh optimizer and schedule, "
                   "e.g. to train on at another rate; {seed} in the path becomes --seed (--resume: the "
                   "run's own checkpoint wins)")
    m.add_argument("--aux-weight", type=float, default=0.0,
                   help="add this x the tied 1-hop Node2Vec loss of the node embeddings to every step")
    m.add_argument("--zigzag-penalty", type=float, default=0.0,
                   help="add this x the share of the node embeddings' energy in the path-star's arm modes "
                   "at mu < 0 (zigzags, §4.4; common.arm_spectrum) to every step")
    m.add_argument("--zigzag-penalty-on", choices=["input", "both"], default="input",
                   help="the rows --zigzag-penalty acts on: the input embeddings, or (with --untied-head) "
                   "the output layer's node rows too, each share weighted alike")
    m.add_argument("--grad-noise", type=float, default=0.0, metavar="STD",
                   help="add N(0, STD^2) to every coordinate of the gradient at every step, before clipping "
                   "and AdamW (beyond the paper: does noise other than the batches' move a stuck run?)")
    m.add_argument("--grad-noise-std", metavar="FILE", help="--grad-noise with a std per coordinate: a "
                   "state dict of the model's names and shapes (e.g. the batches' own noise, measured; "
                   "docs/results.md); {seed} in the path becomes --seed")
    m.add_argument("--grad-noise-rows", type=int, default=0, metavar="B",
                   help="on whole-epoch batches: Gaussian noise with the covariance of the gradient noise of "
                   "batches of B rows (each row's loss weighted by a Gaussian draw; Wu et al. 2020)")
    m.add_argument("--grad-noise-rows-at", choices=["current", "start"], default="current",
                   help="--grad-noise-rows's covariance at the current weights, or held at the weights the "
                   "run starts from (--init-from's, or the init): noise that does not follow the weights")
    m.add_argument("--grad-noise-rows-scrambled", action="store_true",
                   help="--grad-noise-rows moved by one fixed random signed permutation of each tensor's "
                   "coordinates: the same covariance spectrum and total per tensor, along other directions")
    m.add_argument("--grad-noise-in", choices=["all", "embeddings"], default="all",
                   help="--grad-noise (-std) in every parameter, or only in the token embeddings (where "
                   "most of the batches' own noise lies)")
    m.add_argument("--freeze-embeddings", action="store_true",
                   help="keep the (tied) token embeddings at their init (App. E.1 control)")
    m.add_argument("--untied-head", action="store_true",
                   help="GPT: an output layer of its own instead of the paper's tied embeddings (beyond the "
                   "paper; with --freeze-embeddings only the input embeddings stay fixed)")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, default=10000, help="epochs of the interleaved run / path phase")
    o.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (cosine to lr/10)")
    o.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    o.add_argument("--decay", choices=["all", "matrices"], default="all",
                   help="parameters that get weight decay: every one (the release) or matrices and "
                   "embeddings (nanoGPT)")
    add_adamw_flags(o, "the release")
    o.add_argument("--batch-size", type=int, default=2048, help="sequences per step")
    o.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps")
    o.add_argument("--decay-epochs", type=int, default=None,
                   help="the cosine reaches lr/10 after this many epochs and stays there (default: --epochs; "
                        "more: the schedule cut short)")
    o.add_argument("--edge-epochs", type=int, default=2500, help="staged recipe: epochs of the edge phase")
    o.add_argument("--edge-lr", type=float, default=1e-2, help="staged recipe: edge-phase peak lr")
    o.add_argument("--edge-batch-size", type=int, default=16384, help="staged recipe: edge-phase batch")
    o.add_argument("--edge-warmup", type=int, default=500, help="staged recipe: edge-phase warm-up steps")
    r = p.add_argument_group("run")
    r.add_argument("--eval-every", type=int, default=100, help="epochs between evaluations and checkpoints")
    r.add_argument("--spectral-k", type=int, default=0,
                   help="also measure at every evaluation the spectral share of the node embeddings in the "
                   "graph's top K eigenvectors (0: off; --sweep headroom sets it)")
    r.add_argument("--n2v-steps", type=int, default=2000,
                   help="Node2Vec on the training edges (--init node2vec, --sweep headroom): Adam steps")
    r.add_argument("--seed", type=int, default=0, help="seed of graph, split, init and batches")
    r.add_argument("--seeds", type=int, nargs="+", help="run (or sweep) once per seed into --out/seed<k>/, "
                   "then summary.csv, metrics.json and summary.png with the mean, min and max over seeds")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    r.add_argument("--out", default="runs/pathstar", help="output folder")
    r.add_argument("--quick", action="store_true", help=preset_help("CPU-sized preset", quick))
    r.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    r.add_argument("--bench", action="store_true", help="time training steps of this configuration in each "
                   "step mode (eager, compiled, CUDA graph; packed too for a GPT), write --out/bench.json, "
                   "no training")
    r.add_argument("--bench-modes", nargs="+", metavar="MODE", help="with --bench: time only these modes "
                   "(names as in bench.json, e.g. compiled+graph+packed)")
    r.add_argument("--bench-reference", metavar="FILE", help="with --bench: also measure every mode's "
                   "weights after its timed steps against FILE, the bench_weights.pt of another --bench of "
                   "this configuration (e.g. --bench-modes eager with GEOMEM_KERNELS=0)")
    add_step_flags(r)
    r.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="pack the short rows of a step (edges) into rows of the longest length, one forward "
                   "per step instead of one per group, each row's [EDGE] / [PATH] computed once; same "
                   "losses, fewer GPU kernels and tokens (GPT only; default: on for a GPT on CUDA)")
    r.add_argument("--time-limit", type=float, default=None, help="minutes: stop at the first evaluation "
                   "after this long, write the outputs and a checkpoint (--resume continues)")
    r.add_argument("--ckpt-every", type=float, default=600, help="seconds between checkpoints (each "
                   "written after an evaluation; one is always written at the end)")
    r.add_argument("--snapshots", action="store_true", help="keep the model's weights at every evaluation in "
                   "--out/snapshots/epoch<E>.pt (state dicts; e.g. for common.logit_lens over training)")
    r.add_argument("--sweep", choices=list(SWEEPS) if sweeps else [], help="run every arm of a control into "
                   "--out/<arm>/ plus summary.csv and summary.png: " + "; ".join(
                       f"{k}: {', '.join(v)}" for k, v in SWEEPS.items()) if sweeps else argparse.SUPPRESS)
    if sweeps:
        r.add_argument("--parallel", type=int, default=1, help="runs at a time, each in its own process: "
                       "the arms of a --sweep, else the --seeds (on a GPU they share it; on the CPU they "
                       "share its threads)")
    p.set_defaults(**(defaults or {}))
    args = parse_with_presets(p, {"quick": quick}, argv)
    args.graph = graph_name(args) if graph_name else f"G({args.n},{args.l})"
    checks = [(args.n >= 2, "--n must be >= 2 (arms; some leaves are held out)"),
              (args.l >= 2, "--l must be >= 2 (nodes per root-to-leaf path, root included)"),
              (0 < args.train_frac < 1, "--train-frac must be in (0, 1)"),
              (args.pauses >= 0, "--pauses must be >= 0"),
              (args.epochs >= 1, "--epochs must be >= 1"),
              (args.decay_epochs is None or args.decay_epochs >= 1, "--decay-epochs must be >= 1"),
              (args.edge_epochs >= 1, "--edge-epochs must be >= 1"),
              (args.eval_every >= 1, "--eval-every must be >= 1"),
              (args.ckpt_every >= 0, "--ckpt-every must be >= 0"),
              (args.time_limit is None or args.time_limit > 0, "--time-limit must be > 0"),
              (min(args.n_layer, args.n_embd, args.n_head, args.d_state, args.d_conv, args.expand) >= 1,
               "model sizes must be >= 1"),
              (args.model != "gpt" or args.n_embd % args.n_head == 0,
               "--n-embd must be divisible by --n-head"),
              (min(args.batch_size, args.edge_batch_size) >= 1, "batch sizes must be >= 1"),
              (min(args.warmup, args.edge_warmup) >= 0, "warm-up steps must be >= 0"),
              (min(args.lr, args.edge_lr) > 0, "learning rates must be > 0"),
              (all(0 <= b < 1 for b in args.betas) and args.grad_clip >= 0, "bad --betas or --grad-clip"),
              (args.weight_decay >= 0 and 0 <= args.dropout < 1, "bad --weight-decay or --dropout"),
              (not (args.no_paths and args.recipe == "staged"), "--no-paths has no path phase to stage"),
              (not (args.sweep and args.bench), "--bench times one configuration; drop --sweep"),
              (args.spectral_k >= 0 and args.n2v_steps >= 1 and args.aux_weight >= 0,
               "--spectral-k and --aux-weight must be >= 0, --n2v-steps >= 1"),
              (args.zigzag_penalty >= 0, "--zigzag-penalty must be >= 0"),
              (args.zigzag_penalty_on == "input" or (args.zigzag_penalty and args.untied_head),
               "--zigzag-penalty-on both needs --zigzag-penalty and --untied-head"),
              (args.grad_noise >= 0, "--grad-noise must be >= 0"),
              (not (args.grad_noise and args.grad_noise_std), "--grad-noise and --grad-noise-std: one of them"),
              (args.grad_noise_rows >= 0, "--grad-noise-rows must be >= 0"),
              (args.grad_noise_rows or args.grad_noise_rows_at == "current",
               "--grad-noise-rows-at needs --grad-noise-rows"),
              (args.grad_noise_rows or not args.grad_noise_rows_scrambled,
               "--grad-noise-rows-scrambled needs --grad-noise-rows"),
              (getattr(args, "parallel", 1) >= 1, "--parallel must be >= 1"),
              (not args.seeds or len(set(args.seeds)) == len(args.seeds), "--seeds must be distinct"),
              (not (args.seeds and args.bench), "--bench times one configuration; drop --seeds"),
              (args.bench or not (args.bench_modes or args.bench_reference),
               "--bench-modes and --bench-reference need --bench"),
              (not args.bench_reference or os.path.isfile(args.bench_reference),
               f"--bench-reference: no file {args.bench_reference}"),
              (not (args.pack and args.model != "gpt"), "--pack needs --model gpt (a scan has no mask)"),
              (not (args.untied_head and args.model != "gpt"), "--untied-head needs --model gpt"),
              (not (args.init_from and args.init != "random"), "--init-from replaces --init; drop one")]
    for ok, msg in checks:
        if not ok:
            die(msg)
    return args


def pack_mode(args, device):
    """--pack, unset: on for a GPT on CUDA, where one forward per step instead of two made the
    G(5000, 5) step 1.5x faster on an H100 (docs/performance.md); off on the CPU, where the README's
    results were measured without it (a packed run is another float order)."""
    if args.pack is None:
        return args.model == "gpt" and str(device).startswith("cuda")
    return args.pack


def build(args):
    """Graph, split, datasets and the evaluation data of one run."""
    graph, root, arms = path_star(args.n, args.l, seed=args.seed)
    try:
        train_arms, test_arms = split_arms(arms, args.train_frac, seed=args.seed)
    except ValueError as e:  # a bad --n / --train-frac pair: a flag error, not a crash
        die(str(e))
    return task_data(graph, root, arms, train_arms, test_arms, arm_edges(arms, args.edges), args)


def task_data(graph, root, paths, train_paths, test_paths, edges, args, graph_extra=None):
    """Datasets of the in-weights task on any tree with all leaves at one depth (exp_treestar.py
    uses it too): `paths` are all root-to-leaf node lists, `edges` the [u, v] examples (plus
    [u, u] for every node with --self-edges)."""
    vocab = Vocab(graph.number_of_nodes())
    if args.self_edges:
        edges = np.concatenate([edges, np.repeat(np.arange(vocab.num_nodes)[:, None], 2, 1)])
    targets = path_targets(train_paths, args.reverse_path)
    group = path_group(path_prompts([a[-1] for a in train_paths], vocab, args.pauses), targets,
                       args.first_token_only)
    return dict(graph=graph, root=root, arms=paths, train_arms=train_paths, test_arms=test_paths,
                vocab=vocab, edges=edges, edge_group=edge_group(edges, vocab), path_group=group,
                train_targets=targets, graph_extra=graph_extra or {})


def is_path_star(data):
    """Whether the arms meet only at the root (a path-star, not exp_treestar's tree): arm modes."""
    return data["graph"].number_of_nodes() == 1 + sum(len(a) - 1 for a in data["arms"])


def make_evaluate(data, args, device, measure=None):
    """Greedy decoding from `prompt start-node` (the start node is the root, or the leaf when
    reversed, and always known). Position 0 is scored from the prompt alone. `measure(split,
    predicted, targets)` -> {name: value}, if given, adds a script's own measures of the (P, l)
    predicted paths (exp_treestar: the share of last hops that pick a trained sibling leaf)."""
    if args.spectral_k > data["vocab"].num_nodes:
        die(f"--spectral-k must be at most the graph's {data['vocab'].num_nodes} nodes")
    basis = laplacian_eigs(data["graph"], k=args.spectral_k)[1] if args.spectral_k else None
    star = is_path_star(data)
    splits = {}
    for split in ("test", "train"):
        arms = data[f"{split}_arms"]
        splits[split] = (path_prompts([a[-1] for a in arms], data["vocab"], args.pauses),
                         path_targets(arms, args.reverse_path))
    held_out, trained = data["test_arms"], data["train_arms"]
    first_hop_input, first_hop_trained = (first_hop_prompts(a, data["vocab"], args.pauses)
                                          for a in (held_out, trained))

    @torch.no_grad()  # train() calls it under no_grad; a script analysing a run (load_run) may not
    def evaluate(model):
        res = {}
        for split, (prompts, targets) in splits.items():
            predicted = decode_answer(model, prompts, targets, device)
            correct = (predicted == targets).float()
            res[f"{split}_first_token_acc"] = correct[:, 1].mean().item()
            res[f"{split}_path_acc"] = correct.all(1).float().mean().item()
            res[f"{split}_token_acc"] = correct.mean(0).tolist()
            # teacher-forced: each position given the true prefix, so a later hop can be right
            # while an earlier one is wrong (the reverse-cascade test of App. A.1.1)
            res[f"{split}_token_acc_tf"] = teacher_forced_acc(model, prompts, targets, device).tolist()
            res.update(measure(split, predicted, targets) if measure else {})
        res["edge_acc"] = edge_recall(model, data["edges"], data["vocab"], device)
        res["chance_first_token"] = 1.0 / args.n
        emb = model.wte.weight[: data["vocab"].num_nodes].float()
        nav = navigation_score(emb, data["test_arms"], data["arms"])
        res["navigation_acc"], res["navigation_mean_rank"] = nav
        res["chance_navigation_mean_rank"] = (args.n + 1) / 2
        if args.l >= 4:  # leaf -> the node two hops above it: what a zigzag arm stores (§4.4)
            nav = navigation_score(emb, data["test_arms"], data["arms"], source=-1, target=-3)
            res["navigation_2hop_acc"], res["navigation_2hop_mean_rank"] = nav
        if data["train_arms"] and data["test_arms"]:  # through a map fitted on the training arms
            nav = linear_navigation(emb, data["train_arms"], data["test_arms"], data["arms"])
            res["linear_navigation_acc"], res["linear_navigation_mean_rank"] = nav
        res["hop_cosine"], res["cross_arm_cosine"] = hop_cosine(emb, data["test_arms"])
        head = output_rows(model, data["vocab"].num_nodes)
        if head is not None:  # untied: the leaf's input row against the first nodes' output rows
            nav = navigation_score(emb, data["test_arms"], data["arms"], target_emb=head)
            res["head_navigation_acc"], res["head_navigation_mean_rank"] = nav
            res["head_hop_cosine"], res["head_cross_arm_cosine"] = hop_cosine(emb, data["test_arms"], head)
            if star:
                res["head_zigzag_share"] = arm_spectrum(head, data["arms"])[2].item()
        # the leaf where the model answers `[EDGE] leaf`: a deep model's geometry can live there
        queries = edge_queries(model, data["vocab"], device)
        rows = model.unembedding()[: data["vocab"].num_nodes].float()  # what its logits are read from
        nav = navigation_score(queries, data["test_arms"], data["arms"], target_emb=rows)
        res["edge_query_navigation_acc"], res["edge_query_navigation_mean_rank"] = nav
        if star:  # §4.4: the share of ||E||^2 in each arm mode; zigzags are those at mu < 0
            _, share, zigzag = arm_spectrum(emb, data["arms"])
            res["arm_mode_share"], res["zigzag_share"] = share.tolist(), zigzag.item()
            # ... and the first nodes with the zigzag's directions reflected (nothing fitted)
            turn_back = zigzag_reflection(emb, data["arms"])
            nav = navigation_score(emb, data["test_arms"], data["arms"], readout=turn_back)
            res["reflected_navigation_acc"], res["reflected_navigation_mean_rank"] = nav
        if isinstance(model, GPT) and not args.reverse_path and held_out:  # how its layers read the first hop
            res["leaf_neighbour_by_block"], res["first_hop_by_block"] = first_hop_lens(
                model, first_hop_input, held_out, device)
        if star and not args.reverse_path and held_out and trained:  # answered by geometry or by lookup?
            res["first_hop_answer_shares"] = first_hop_answers(
                model, first_hop_input, first_hop_trained, held_out, trained, device)
        E = emb.cpu().numpy()
        res["geometric_level"] = geometric_level(E, data["edges"])
        if basis is not None:
            res["spectral_share"] = spectral_share(E, basis)
        return res
    return evaluate


def first_hop_prompts(arms, vocab, pauses):
    """(P, 3 + pauses): `[PATH] leaf [PAUSE]* root` of each arm, whose last position predicts its
    first node (the token of `first_token_acc`, with the root given as in decoding)."""
    roots = torch.tensor([a[0] for a in arms])[:, None]
    return torch.cat([path_prompts([a[-1] for a in arms], vocab, pauses), roots], 1)


@torch.no_grad()
def first_hop_lens(model, idx, arms, device, chunk=256):
    """Beyond the paper (docs/results.md, "How the deep model reads the first hop"): `logit_lens`
    on idx (P, T) = `[PATH] leaf [PAUSE]* root` of each arm. Two lists, one entry per block (0: the
    embedding): the share of arms whose leaf's position (1) has the leaf's neighbour, arm[-2], on
    top, and whose last position has the first node, arm[1], on top (the last entry is the model's
    own first-token accuracy)."""
    neighbour, first = (torch.tensor([a[j] for a in arms], device=device) for j in (-2, 1))
    hits = torch.zeros(2, len(model.blocks) + 1, device=device)
    for i in range(0, len(idx), chunk):
        x, rows = idx[i: i + chunk].to(device), slice(i, i + chunk)
        with autocast(device):  # one pass, both positions: (blocks, rows, 2)
            top = logit_lens(model, x, position=[1, -1]).argmax(-1)
        hits[0] += (top[..., 0] == neighbour[rows]).sum(-1)
        hits[1] += (top[..., 1] == first[rows]).sum(-1)
    return (hits / len(idx)).tolist()


@torch.no_grad()
def path_queries(model, idx, device, chunk=256):
    """idx (P, T) = `[PATH] leaf [PAUSE]* root` of each arm -> the path query, the last hidden state
    (P, C) the first hop is read from, and the model's first hop (P,), its argmax logit (as greedy
    decoding scores it in test_first_token_acc)."""
    queries, answers = [], []
    for i in range(0, len(idx), chunk):
        with autocast(device):
            h = model.hidden(idx[i: i + chunk].to(device))[:, -1]
            answers.append(model.logits(h).argmax(-1))
        queries.append(h.float())
    return torch.cat(queries), torch.cat(answers)


def first_hop_answers(model, held_idx, trained_idx, held, trained, device):
    """Beyond the paper (docs/results.md, "What a failing model answers"): where a held-out leaf's
    first hop comes from. idx: first_hop_prompts of the held-out and training arms. Shares of the
    held-out leaves answered with [their own first node; the first node of the training leaf whose
    path query is nearest (cosine): a lookup of the trained answers; another training arm's first
    node; any other token]. On a path-star the four are disjoint and sum to 1; the first is
    test_first_token_acc (up to ties)."""
    held_q, answer = path_queries(model, held_idx, device)
    trained_q = path_queries(model, trained_idx, device)[0]
    own, trained_first = (torch.tensor([a[1] for a in arms], device=device) for arms in (held, trained))
    nearest = (F.normalize(held_q, dim=1) @ F.normalize(trained_q, dim=1).T).argmax(1)
    right = answer == own
    lookup = ~right & (answer == trained_first[nearest])
    other_trained = ~right & ~lookup & torch.isin(answer, trained_first)
    kinds = torch.stack([right, lookup, other_trained, ~(right | lookup | other_trained)])
    return kinds.float().mean(1).tolist()


def first_block(shares, level=0.5):
    """The first block (0: the embedding) whose share reaches `level`; len(shares): none."""
    return next((i for i, v in enumerate(shares) if v >= level), len(shares))


@torch.no_grad()
def teacher_forced_acc(model, prompts, targets, device, chunk=1024):
    """Per-position accuracy of the argmax given `prompt + true target prefix`."""
    hits = torch.zeros(targets.shape[1])
    for i in range(0, len(prompts), chunk):
        p, t = prompts[i: i + chunk].to(device), targets[i: i + chunk].to(device)
        with autocast(device):
            h = model.hidden(torch.cat([p, t[:, :-1]], 1))[:, p.shape[1] - 1:]
            pred = model.logits(h).argmax(-1)
        hits += (pred == t).float().sum(0).cpu()
    return hits / len(prompts)


def phases_for(data, args, device):
    to = lambda g: tuple(t.to(device) for t in g)
    edges, paths = to(data["edge_group"]), to(data["path_group"])
    clip, decay = args.grad_clip, args.decay_epochs or 0  # decay: the run's phase (the path phase if staged)
    if args.no_paths:
        return [Phase("edges", [edges], args.epochs, args.batch_size, args.lr, args.warmup, grad_clip=clip,
                      decay_epochs=decay)]
    if args.recipe == "staged":  # App. D.3: memorize edges first, then fine-tune on paths alone
        return [Phase("edges", [edges], args.edge_epochs, args.edge_batch_size, args.edge_lr,
                      args.edge_warmup, grad_clip=clip),
                Phase("paths", [paths], args.epochs, args.batch_size, args.lr, args.warmup, grad_clip=clip,
                      decay_epochs=decay)]
    return [Phase("interleaved", [edges, paths], args.epochs, args.batch_size, args.lr, args.warmup,
                  grad_clip=clip, decay_epochs=decay)]


def scale(args):
    return f"{args.graph}, {'GPT' if args.model == 'gpt' else 'Mamba'} {args.n_layer}L x {args.n_embd}"


def describe(args):
    """Short label of a run for figure titles: scale and the flags that change the task."""
    parts = [scale(args)]
    task = "edges only" if args.no_paths else "first-token-only" if args.first_token_only else "full path"
    parts.append(task)
    parts += [f"edges {args.edges}", f"{args.pauses} pauses"]
    parts += ["reversed path"] * args.reverse_path + ["staged"] * (args.recipe == "staged")
    parts += ["frozen embeddings"] * args.freeze_embeddings + ["untied head"] * args.untied_head
    return ", ".join(parts)


def write_outputs(out, args, data, model, history, wall, device):
    final = measures(history[-1])
    planned = args.epochs + (args.edge_epochs if args.recipe == "staged" and not args.no_paths else 0)
    write_json(os.path.join(out, "metrics.json"), {
        "config": vars(args), "device": device_name(device), "peak_memory_gib": peak_memory_gib(device),
        "final": final,
        "epochs_done": history[-1]["epoch"], "epochs_planned": planned,
        "history": history, "wall_time_s": wall})
    write_json(os.path.join(out, "graph.json"), {
        "num_nodes": data["vocab"].num_nodes, "root": data["root"], "arms": data["arms"],
        "train_leaves": [a[-1] for a in data["train_arms"]],
        "test_leaves": [a[-1] for a in data["test_arms"]],
        "edge_examples": data["edges"].tolist(), "train_paths": data["train_targets"].tolist(),
        **data["graph_extra"]})
    emb = token_embeddings(model, data["vocab"].num_nodes)
    np.save(os.path.join(out, "embeddings.npy"), emb)
    label, chance = describe(args), 1.0 / args.n
    series = [("test_first_token_acc", "held-out first token"), ("test_path_acc", "held-out full path"),
              ("train_first_token_acc", "train first token"), ("train_path_acc", "train full path"),
              ("edge_acc", "edges memorized")]
    if args.first_token_only or args.no_paths:  # hops without a loss: their curves say nothing
        series = [s for s in series if "path" not in s[0]]
    plot_curves(os.path.join(out, "accuracy.png"), history, series, f"In-weights paths: {label}",
                chance=chance)
    names = ["start"] + [f"hop {i}" for i in range(1, args.l)]
    x = [h["epoch"] for h in history]
    plot_panels(os.path.join(out, "token_accuracy.png"), [
        (f"held-out leaves, {mode}", "accuracy",
         [(x, [h[key][i] for h in history], names[i]) for i in range(args.l)], chance)
        for mode, key in (("greedy decoding", "test_token_acc"), ("teacher-forced", "test_token_acc_tf"))],
        f"Per-position accuracy: {label}")
    modes = all("arm_mode_share" in h for h in history)  # a path-star, and not resumed from older code
    mu = arm_modes(len(data["arms"][0]) - 1)[0].tolist() if modes else None  # eigenvalues, for the legend
    # a curve some runs lack (l < 4: no 2 hops; no training arms; resumed from older code) is left out
    if_any = lambda key, label: ([(x, [h[key] for h in history], label)]
                                 if all(key in h for h in history) else [])
    plot_panels(os.path.join(out, "geometry.png"), [  # the model's accuracy last: a measure's colour is
        ("held-out leaves", "accuracy",                  # then the same in the accuracy and rank panels
         [(x, [h["navigation_acc"] for h in history], "navigation (top-1): leaf -> first node")]
         + if_any("navigation_2hop_acc", "leaf -> node 2 hops up (top-1)")
         + if_any("linear_navigation_acc", "leaf -> first node through a linear map (top-1)")
         + if_any("reflected_navigation_acc", "leaf -> first node, zigzag reflected (top-1)")
         + if_any("head_navigation_acc", "leaf -> first node's output row (untied head; top-1)")
         + if_any("edge_query_navigation_acc", "edge query [EDGE] leaf -> first node's output row (top-1)")
         + [(x, [h["test_first_token_acc"] for h in history], "the model: first-token accuracy")], chance),
        ("rank of the leaf's own node among all arms'", "mean rank (1 = best)",
         [(x, [h["navigation_mean_rank"] for h in history], "first node")]
         + if_any("navigation_2hop_mean_rank", "node 2 hops up")
         + if_any("linear_navigation_mean_rank", "first node, linear map")
         + if_any("reflected_navigation_mean_rank", "first node, zigzag reflected")
         + if_any("head_navigation_mean_rank", "first node's output row")
         + if_any("edge_query_navigation_mean_rank", "first node's output row, from the edge query"),
         (args.n + 1) / 2)]
        + ([(f"the layers (logit lens), held-out leaves ({args.n_layer + 1}: none)",
             "first block on top for half",
             [(x, [first_block(h["leaf_neighbour_by_block"]) for h in history],
               "leaf's position: the leaf's neighbour"),
              (x, [first_block(h["first_hop_by_block"]) for h in history], "last position: the first node")],
             None)] if all("first_hop_by_block" in h for h in history) else [])
        + ([("held-out arms: cosine of two nodes", "mean cosine similarity",
             [(x, [h["hop_cosine"][i] for h in history], f"{i + 1} hop{'s' * (i > 0)} apart")
              for i in range(len(history[-1]["hop_cosine"]))]
             + [(x, [h["cross_arm_cosine"] for h in history], "in different arms")], None)]
           if all("hop_cosine" in h for h in history) else [])  # (a run resumed from older code)
        + ([("all arms: energy by arm mode (§4.4)", "share of the embeddings' ||E||^2",
             [(x, [h["arm_mode_share"][k] for h in history],
               f"μ = {m:+.2f}" + (" (smooth)" if k == 0 else " (zigzag)" if k == len(mu) - 1 else ""))
              for k, m in enumerate(mu)], (args.n - 1) / (data["vocab"].num_nodes - 1))] if mu else []),
        f"Embedding geometry: {label}")
    shown = data["test_arms"][:8]  # held-out arms: their paths were never trained end to end
    blocks, names = [a[1:] for a in shown], [f"arm {a[1]}: a1..leaf" for a in shown]
    plot_cosine_heatmap(os.path.join(out, "embedding_heatmap.png"), emb, blocks, names,
                        f"Cosine similarity of node embeddings, {len(shown)} held-out arms\n{label}")
    head = output_rows(model, data["vocab"].num_nodes)
    if head is not None:  # §4.4: untied, odd hops lie between the input and the output rows
        plot_cosine_heatmap(os.path.join(out, "embedding_heatmap_head.png"), emb, blocks, names,
                            f"Input embeddings (rows) against output rows (columns), {len(shown)} held-out "
                            f"arms\n{label}", columns=head.cpu().numpy(),
                            label="cosine similarity (input row, output row)")


# ----------------------------------------------------------------------------- geometric headroom
# Beyond the paper (§1.1, §7: "a well-specified headroom for making Transformer memory more
# geometric"): how far the sequence model's node embeddings are from Node2Vec's on the same edges,
# and whether cheap changes that use only those edges close the gap.


def edge_targets(data, device):
    """D^-1 A of the training edge examples, made symmetric (Node2Vec needs a neighbour in every row)."""
    N = data["vocab"].num_nodes
    A = np.zeros((N, N), dtype=np.float32)
    e = np.asarray(data["edges"])
    A[e[:, 0], e[:, 1]] = 1
    return neighbour_targets(np.maximum(A, A.T), device)


def gradient_noise(params, stds):
    """A loss whose gradient in `params` is stds x N(0, 1), drawn afresh at each call (one std per
    parameter: a number, or a tensor of its shape): added to a step's loss (an `aux` of
    common.train), Gaussian noise on the gradient, which clipping and AdamW then treat as they treat
    the batches' own noise. Its value means nothing."""
    return lambda: sum((torch.randn_like(p) * s * p).sum() for p, s in zip(params, stds))


def noise_stds(args, named, device):
    """--grad-noise's std for each of `named` (name -> parameter): --grad-noise, or the tensors of
    --grad-noise-std's file, checked against the model's names and shapes."""
    if not args.grad_noise_std:
        return [args.grad_noise] * len(named)
    path = args.grad_noise_std.format(seed=args.seed)
    stds = read_torch_file(path, "--grad-noise-std")
    for name, p in named.items():
        if not isinstance(stds, dict) or getattr(stds.get(name), "shape", None) != p.shape:
            die(f"--grad-noise-std: {path} has no std of shape {tuple(p.shape)} for {name}")
    return [stds[name].to(device, torch.float32) for name in named]


def batch_noise(model, groups, rows):
    """A loss whose gradient, on a step over every row of `groups` ((X, Y), Y cut by `loss_tail`), is
    Gaussian noise with the covariance of the gradient noise of batches of `rows` rows drawn without
    replacement: each row's loss weighted by c (xi - mean xi), xi ~ N(0, 1) per row, drawn afresh at
    each call (Wu et al. 2020, "On the noisy gradient descent that generalizes as SGD"). With n rows
    and one loss token per row, its gradient is (c / n) sum_i (xi_i - mean xi) (g_i - mean g), of
    covariance c^2 / n x the rows' gradient covariance; a batch's is (n - rows) / ((n - 1) rows) x it,
    hence c."""
    n = sum(len(X) for X, _ in groups)
    tokens = sum(int((Y >= 0).sum()) for _, Y in groups)
    c = math.sqrt(n * (n - rows) / ((n - 1) * rows))

    def loss():
        xi = torch.randn(n, device=groups[0][0].device)
        weights, total = (c * (xi - xi.mean())).split([len(X) for X, _ in groups]), 0.0
        for (X, Y), w in zip(groups, weights):
            logits, _ = model(X, Y)
            per_token = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten(), ignore_index=-1,
                                        reduction="none")
            total = total + (w * per_token.view(len(X), -1).sum(1)).sum()
        return total / tokens
    return loss


def held_at_start(model, make_loss):
    """A loss whose gradient in `model`'s weights is the gradient of `make_loss(start)` at `start`, a
    frozen copy of `model` as it is now: e.g. batch_noise drawn with the covariance of the weights a
    run starts from, for the whole run, where batch_noise(model, ...) follows the weights as they move.
    Its value means nothing."""
    start = copy.deepcopy(model)
    at_start = make_loss(start)
    pairs = [(q, p) for q, p in zip(start.parameters(), model.parameters()) if p.requires_grad]

    def loss():
        grads = torch.autograd.grad(at_start(), [q for q, _ in pairs], allow_unused=True)
        return sum((g * p).sum() for g, (_, p) in zip(grads, pairs) if g is not None)
    return loss


def scrambled(make_loss, params, seed=0):
    """A loss whose gradient in `params` is `make_loss()`'s with each tensor's coordinates moved by one
    random signed permutation, fixed for the run (an orthogonal map): Gaussian noise keeps its
    covariance's spectrum and each tensor's total, but no longer lies along the examples' own
    gradients. Its value means nothing."""
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(p.numel(), generator=gen).to(p.device) for p in params]
    signs = [(2 * torch.randint(0, 2, (p.numel(),), generator=gen) - 1).to(p.device, p.dtype) for p in params]

    def loss():
        grads = torch.autograd.grad(make_loss(), params, allow_unused=True)
        return sum((g.flatten()[i] * sign * p.flatten()).sum()
                   for g, i, sign, p in zip(grads, perms, signs, params) if g is not None)
    return loss


_NODE2VEC = {}  # one Node2Vec per edge set, width, steps and seed: the sweep's arms share it


def node2vec_embeddings(data, args, device):
    """A tied Node2Vec of width --n-embd trained on the training edges alone (Adam, lr 1e-2,
    --n2v-steps full-batch steps, seeded): the reference geometry of --sweep headroom and the
    init of --init node2vec."""
    edges = hashlib.sha1(np.asarray(data["edges"]).tobytes()).hexdigest()
    key = (edges, args.n_embd, args.n2v_steps, args.seed)
    if key not in _NODE2VEC:
        torch.manual_seed(args.seed)
        model = Node2Vec(Node2VecConfig(data["vocab"].num_nodes, args.n_embd)).to(device)
        train_node2vec(model, edge_targets(data, device), args.n2v_steps, 1e-2, desc="node2vec on the edges")
        _NODE2VEC[key] = model.E.detach().cpu().numpy()
    return _NODE2VEC[key]


def init_node_embeddings(model, data, args, device):
    """--init spectral / node2vec: the node rows of the token embedding become the graph's top
    eigenvectors or Node2Vec's embeddings, scaled to the Frobenius norm the N(0, 0.02) init has;
    the rest of the model is initialized as usual."""
    N, C = data["vocab"].num_nodes, args.n_embd
    if args.init == "spectral":
        M = laplacian_eigs(data["graph"], k=min(C, N - 1))[1]
        M = np.pad(M, ((0, 0), (0, C - M.shape[1])))
    else:
        M = node2vec_embeddings(data, args, device)
    M = torch.as_tensor(M, dtype=torch.float32)
    with torch.no_grad():
        model.wte.weight[:N] = (M * (0.02 * math.sqrt(N * C) / M.norm())).to(device)


GRAPH_FLAGS = ("n", "l", "seed", "train_frac")  # the path-star, its split and node ids


def init_from_checkpoint(model, args):
    """--init-from: the model's weights from another run's checkpoint.pt (its config must name the
    same graph: the node ids are what the weights store) or from a --snapshots state dict."""
    path = args.init_from.format(seed=args.seed)
    state = read_torch_file(path, "--init-from")
    if "model" in state:  # a checkpoint.pt; a snapshot is the state dict itself
        saved = state.get("config") or {}
        other = [k for k in GRAPH_FLAGS if k in saved and saved[k] != getattr(args, k)]
        if other:
            die(f"--init-from: {path} was trained on another graph ({other[0]}={saved[other[0]]!r}, "
                f"this run has {getattr(args, other[0])!r})")
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # another model's shapes or keys: the first of them
        lines = str(e).splitlines()
        die(f"--init-from: {path} holds another model: {lines[min(1, len(lines) - 1)].strip()[:200]}")


def headroom_reference(args, device, task=None):
    """Node2Vec on the sweep's graph (its training edges): k, the number of top eigenvectors that
    hold 95% of its energy (as exp_node2vec.py chooses it), and its geometry, written to
    --out/node2vec/metrics.json. Returns args with --spectral-k k for the arms."""
    data = task[0](args) if task else build(args)
    E = node2vec_embeddings(data, args, device)
    evals, V = laplacian_eigs(data["graph"])
    k = k_for_energy(spectral_energy(E, V), evals)
    nav, rank = navigation_score(E, data["test_arms"], data["arms"])
    N = data["vocab"].num_nodes
    res = {"k": k, "num_nodes": N, "width": args.n_embd, "steps": args.n2v_steps, "optimizer": "adam lr 1e-2",
           "spectral_share": spectral_share(E, V[:, :k]), "spectral_share_random": k / (N - 1),
           "geometric_level": geometric_level(E, data["edges"]), "navigation_acc": nav,
           "navigation_mean_rank": rank}
    os.makedirs(os.path.join(args.out, "node2vec"), exist_ok=True)
    write_json(os.path.join(args.out, "node2vec", "metrics.json"), res)
    print(f"[headroom] Node2Vec on the edges: k = {k} of {N} eigenvectors (95% of its energy); "
          f"spectral share {res['spectral_share']:.3f} (random ~ {k / (N - 1):.3f}), geometric level "
          f"{res['geometric_level']:.3f}, navigation {nav:.3f}")
    return argparse.Namespace(**{**vars(args), "spectral_k": k}), res


def make_model(args, vocab_size):
    if args.model == "mamba":
        return Mamba(MambaConfig(vocab_size=vocab_size, n_layer=args.n_layer, n_embd=args.n_embd,
                                 d_state=args.d_state, d_conv=args.d_conv, expand=args.expand,
                                 freeze_embeddings=args.freeze_embeddings, block=args.mamba_block))
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=args.pauses + args.l + 2, n_layer=args.n_layer,
                         n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                         freeze_embeddings=args.freeze_embeddings, untied_head=args.untied_head,
                         learned_positions=args.positions == "learned", position_std=1.0))


def load_run(out, weights="checkpoint.pt", build_data=build):
    """A run of this script (exp_mamba's too) rebuilt for analysis: (model, data, args), from the
    flags it was run with (out/metrics.json, or the checkpoint of a stopped run) and the weights in
    out/<weights>: checkpoint.pt, or a --snapshots file such as snapshots/epoch000300.pt. The graph
    and split come from --seed, as in the run (exp_treestar passes its own `build_data(args)`);
    flags added since the run take today's defaults. The model is on the CPU, in eval mode."""
    def torch_file(name):
        if not os.path.isfile(os.path.join(out, name)):
            die(f"load_run: no {name} in {out}")
        return read_torch_file(os.path.join(out, name), "load_run")
    state = torch_file(weights)
    if os.path.isfile(os.path.join(out, "metrics.json")):
        with open(os.path.join(out, "metrics.json")) as f:
            config = json.load(f)["config"]
    else:
        config = (state if weights == "checkpoint.pt" else torch_file("checkpoint.pt"))["config"]
    args = argparse.Namespace(**{**vars(get_args([])), **config})
    data = build_data(args)
    model = make_model(args, data["vocab"].size)
    model.load_state_dict(state.get("model", state))  # a checkpoint, or a snapshot's bare state dict
    return model.eval(), data, args


def run(args, device, data=None, measure=None):
    """One training run (or benchmark) of the configuration in `args` (on `data` if given,
    else its path-star graph; `measure`: see make_evaluate); returns its metrics."""
    seed_everything(args.seed)
    data = data or build(args)
    vocab = data["vocab"]
    model = make_model(args, vocab.size).to(device)
    if args.init != "random":
        init_node_embeddings(model, data, args, device)
    if args.init_from:
        init_from_checkpoint(model, args)
    extra, N = [], vocab.num_nodes  # losses on the node rows of the token embedding
    if args.aux_weight:  # the Node2Vec objective
        targets = edge_targets(data, device)
        extra.append(lambda: args.aux_weight * node2vec_loss(model.wte.weight[:N], targets))
    if args.zigzag_penalty:  # §4.4's negative arm modes (beyond the paper: are zigzags the failure?)
        if not is_path_star(data):
            die("--zigzag-penalty needs a path-star: arm modes are not defined when arms share nodes")
        arms = torch.tensor(data["arms"], device=device)
        rows = [model.wte.weight] + ([model.unembedding()] if args.zigzag_penalty_on == "both" else [])
        extra.append(lambda: args.zigzag_penalty * sum(arm_spectrum(W[:N], arms)[2] for W in rows))
    if args.grad_noise or args.grad_noise_std:  # beyond the paper: Gaussian noise instead of the batches'
        embeddings_only = args.grad_noise_in == "embeddings"
        noisy = model.wte.named_parameters("wte") if embeddings_only else model.named_parameters()
        noisy = {n: p for n, p in noisy if p.requires_grad}
        extra.append(gradient_noise(list(noisy.values()), noise_stds(args, noisy, device)))
    phases = phases_for(data, args, device)
    if args.grad_noise_rows:  # beyond the paper: the batches' noise, Gaussian, on whole-epoch batches
        groups = [loss_tail(*g) for g in phases[0].groups]
        epoch_rows = sum(len(X) for X, _ in groups)
        if len(phases) > 1 or epoch_rows > phases[0].batch_size:
            die("--grad-noise-rows needs whole-epoch batches: --batch-size at least the rows of an epoch "
                f"({epoch_rows}), one phase")
        noise = lambda m: batch_noise(m, groups, args.grad_noise_rows)
        noise = held_at_start(model, noise) if args.grad_noise_rows_at == "start" else noise(model)
        if args.grad_noise_rows_scrambled:
            noise = scrambled(noise, [p for p in model.parameters() if p.requires_grad], seed=args.seed)
        extra.append(noise)
    aux = (lambda: sum(loss() for loss in extra)) if extra else None
    compile, cuda_graph = step_modes(args, device)
    args.pack = pack_mode(args, device)  # resolved here, so metrics.json records what ran
    if args.bench:
        save = lambda res: write_json(os.path.join(args.out, "bench.json"), {**res, "config": vars(args)})
        modes = bench_modes(device, pack=args.model == "gpt")
        unknown = sorted(set(args.bench_modes or []) - {name for name, *_ in modes})
        if unknown:
            die(f"--bench-modes: no mode {', '.join(unknown)} on this device; its modes: "
                f"{' '.join(name for name, *_ in modes)}")
        reference = args.bench_reference and read_torch_file(args.bench_reference, "--bench-reference")
        n_params = sum(p.numel() for p in model.parameters())
        if reference is not None and not isinstance(reference, torch.Tensor):
            die(f"--bench-reference: {args.bench_reference} is not a bench's bench_weights.pt")
        if reference is not None and reference.shape != (n_params,):
            die(f"--bench-reference: {reference.numel()} weights there, {n_params} in this model")
        res = benchmark(model, phases[0].groups, phases[0].batch_size, device, phases[0].epochs,
                        args.weight_decay, report=save,
                        modes=[m for m in modes if not args.bench_modes or m[0] in args.bench_modes],
                        keep=os.path.join(args.out, "bench_weights.pt"), reference=reference)
        res["config"] = vars(args)
        print(f"{res['device']}, {res['steps_per_epoch']} steps per epoch, peak "
              f"{res['peak_flops_per_s'] / 1e12:.2f} TFLOP/s ({torch.get_num_threads()} threads)")
        first = next(iter(res["modes"]))
        for name, m in res["modes"].items():
            counts = "" if m["launches_per_step"] is None else (
                f", {m['launches_per_step']} launches / {m['kernels_per_step']} kernels per step")
            counts += "" if m["aten_ops_per_step"] is None else f", {m['aten_ops_per_step']} aten ops/step"
            print(f"  {name:>21}: {m['ms_per_step']:8.2f} ms/step ({m['busy_ms_per_step']:.2f} busy), "
                  f"{m['ms_per_epoch']:9.1f} ms/epoch, {m['seqs_per_s']:8.0f} seqs/s, MFU {m['mfu']:6.1%}"
                  f"{counts}; {args.epochs} epochs ~ {m['projected_train_minutes']:.1f} min; loss "
                  f"{m['loss']:.5f}, weights off {first}'s by {m['weights_off_first_mode']:.1e} of the update"
                  + ("" if reference is None else
                     f", off the reference's by {m['weights_off_reference']:.1e}"))
        return res
    if device == "cpu" and not args.quick and args.n * args.n_embd * args.n_layer > 10_000_000:
        print("warning: a GPU-sized configuration on the CPU; see the ETA on the progress bar "
              "(--quick is the CPU-sized preset)", file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{describe(args)}: {vocab.num_nodes} nodes, {len(data['edges'])} edge examples, "
          f"{len(data['train_arms'])} train / {len(data['test_arms'])} held-out leaves; "
          f"{n_params / 1e6:.2f}M params on {device_name(device)}")
    t0 = time.time()
    evaluate = make_evaluate(data, args, device, measure)
    history = train(model, phases, weight_decay=args.weight_decay, evaluate=evaluate,
                    eval_every=args.eval_every, device=device, seed=args.seed,
                    ckpt_path=os.path.join(args.out, "checkpoint.pt"), ckpt_every_s=args.ckpt_every,
                    resume=args.resume, config=vars(args), desc="path-star", compile=compile,
                    cuda_graph=cuda_graph, betas=tuple(args.betas), decay_all=args.decay == "all",
                    time_limit_s=args.time_limit and 60 * args.time_limit, aux=aux, pack=args.pack,
                    snapshot_dir=os.path.join(args.out, "snapshots") if args.snapshots else None)
    wall = time.time() - t0
    write_outputs(args.out, args, data, model, history, wall, device)
    f = history[-1]
    print(f"held-out first token {f['test_first_token_acc']:.3f} (chance {f['chance_first_token']:.4f}), "
          f"held-out path {f['test_path_acc']:.3f}, navigation {f['navigation_acc']:.3f}, "
          f"train first token {f['train_first_token_acc']:.3f}, edges {f['edge_acc']:.3f}; "
          f"{wall:.0f}s -> {args.out}")
    return {"history": history, "wall_time_s": wall}


SUMMARY_KEYS = ["test_first_token_acc", "test_path_acc", "navigation_acc", "navigation_mean_rank",
                "linear_navigation_acc", "reflected_navigation_acc", "head_navigation_acc",
                "chance_first_token", "peak_test_first_token_acc", "peak_test_path_acc",
                "epochs_to_50", "epochs_to_90", "train_first_token_acc", "train_path_acc", "edge_acc",
                "geometric_level", "spectral_share", "zigzag_share", "wall_time_s"]


def run_task(args, device, task=None):
    """One run of the path-star task, or of another script's task = (build(args) -> data,
    measure(data, args) -> make_evaluate's measure), e.g. exp_treestar's."""
    if task is None:
        return run(args, device)
    data = task[0](args)
    return run(args, device, data, task[1](data, args))


def run_many(runs, device, task=None, parallel=1):
    """{name: args} -> {name: what run_task returned}: one run after another, or `parallel` at a
    time as separate processes (one GPU or the CPU's cores shared; on the CPU each gets its share
    of the threads). `task`: see run_task."""
    return in_processes(run_task, {name: (a, device, task) for name, a in runs.items()}, parallel, device)


def resume_plan(a, resume, label):
    """With --resume, what becomes of one run of a sweep or of --seeds, whose --out may hold an
    earlier try: finished (its metrics.json has this config and every planned epoch; a run stopped
    by --time-limit has not) -> kept, its metrics returned; a checkpoint -> resumed; nothing ->
    started afresh. Sets a.resume; returns the kept metrics or None."""
    metrics = os.path.join(a.out, "metrics.json")
    old = json.load(open(metrics)) if resume and os.path.exists(metrics) else None
    finished = old and old.get("epochs_done") == old.get("epochs_planned")
    if finished and not config_diff(old["config"], vars(a)):
        print(f"{label}: finished earlier, kept")
        return old
    a.resume = resume and os.path.exists(os.path.join(a.out, "checkpoint.pt"))
    return None


def run_sweep(args, device, task=None):
    """Each arm of the sweep is an ordinary run in --out/<arm>/, one after another, or
    --parallel K at a time (run_many). --resume keeps finished arms, resumes interrupted ones and
    starts missing ones (resume_plan). `task`: see run_task."""
    results, todo, reference = {}, {}, None
    if args.sweep == "headroom":  # Node2Vec on the same edges: the geometry to reach, and k
        args, reference = headroom_reference(args, device, task)
    for arm, flags in SWEEPS[args.sweep].items():
        a = argparse.Namespace(**{**vars(args), **flags, "sweep": None, "out": os.path.join(args.out, arm)})
        prepare_out(a.out)
        if (kept := resume_plan(a, args.resume, f"[{args.sweep}] {arm}")) is not None:
            results[arm] = kept
        else:
            print(f"[{args.sweep}] {arm}: " + " ".join(f"{k}={v}" for k, v in flags.items()))
            todo[arm] = a
    results.update(run_many(todo, device, task, args.parallel))
    results = {arm: results[arm] for arm in SWEEPS[args.sweep]}  # the sweep's order
    rows = []
    for arm, r in results.items():
        h = r["history"]
        row = {"arm": arm, **{k: v for k, v in h[-1].items() if not isinstance(v, list)},
               "peak_test_first_token_acc": max(x["test_first_token_acc"] for x in h),
               "peak_test_path_acc": max(x["test_path_acc"] for x in h), "wall_time_s": r["wall_time_s"],
               "epochs_to_50": epochs_to(h, 0.5, "test_first_token_acc"),
               "epochs_to_90": epochs_to(h, 0.9, "test_first_token_acc")}
        rows.append({k: row.get(k) for k in ["arm"] + SUMMARY_KEYS})
    with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["arm"] + SUMMARY_KEYS)
        w.writeheader()
        w.writerows(rows)
    curves = lambda key: [([x["epoch"] for x in r["history"]], [x[key] for x in r["history"]], arm)
                          for arm, r in results.items()]
    plot_panels(os.path.join(args.out, "summary.png"), [
        ("held-out first token", "accuracy", curves("test_first_token_acc"), 1.0 / args.n),
        ("held-out full path (exact match)", "accuracy", curves("test_path_acc"), None),
        ("navigation: leaf -> own first node", "accuracy", curves("navigation_acc"), 1.0 / args.n)],
        f"Sweep '{args.sweep}' on {scale(args)}, {args.epochs} epochs")
    if reference:  # the gap figure: each arm's geometry against Node2Vec's on the same edges
        span = [min(x["epoch"] for r in results.values() for x in r["history"]),
                max(x["epoch"] for r in results.values() for x in r["history"])]
        ref = lambda key: [(span, [reference[key]] * 2, "Node2Vec, edges only")]
        plot_panels(os.path.join(args.out, "headroom.png"), [
            (f"spectral share (top {reference['k']} of {reference['num_nodes']} eigenvectors)", "share",
             curves("spectral_share") + ref("spectral_share"), reference["spectral_share_random"]),
            ("geometric level (adjacent-node cosine)", "mean cosine",
             curves("geometric_level") + ref("geometric_level"), None),
            ("navigation: leaf -> own first node", "accuracy",
             curves("navigation_acc") + ref("navigation_acc"), 1.0 / args.n)],
            f"Geometric headroom on {scale(args)}: Node2Vec minus each arm (chance line: a random "
            f"embedding's share)")
    for row in rows:
        print(f"  {row['arm']:>18}: first token {row['test_first_token_acc']:.3f} (peak "
              f"{row['peak_test_first_token_acc']:.3f}), path {row['test_path_acc']:.3f}, "
              f"navigation {row['navigation_acc']:.3f}")
    return rows


def run_seeds(args, device, task=None):
    """--seeds: the run or sweep once per seed in --out/seed<k>/, then the mean, min and max over
    seeds of every final metric (summary.csv, metrics.json) and the curves with their spread
    (summary.png). The seeds of a run go --parallel K at a time (run_many); a sweep's arms do.
    --resume keeps, resumes or starts each seed (resume_plan). Returns {seed: what run / run_sweep
    returned}. `task`: see run_task."""
    per_seed, todo = {}, {}
    for s in args.seeds:
        a = one_seed(args, s)
        prepare_out(a.out)
        print(f"[seeds] seed {s} -> {a.out}")
        if args.sweep:  # a sweep per seed, its arms --parallel K at a time
            per_seed[s] = run_sweep(a, device, task)
        elif (kept := resume_plan(a, args.resume, f"[seeds] seed {s}")) is not None:
            per_seed[s] = kept
        else:
            todo[s] = a
    per_seed.update(run_many(todo, device, task, getattr(args, "parallel", 1)))
    per_seed = {s: per_seed[s] for s in args.seeds}  # kept ones first otherwise
    seeds = list(args.seeds)
    if args.sweep:  # per arm: its summary row; curves from each arm's metrics.json
        table = {arm: spread({s: next(r for r in per_seed[s] if r["arm"] == arm) for s in seeds})
                 for arm in SWEEPS[args.sweep]}
        hist = {arm: [json.load(open(os.path.join(args.out, f"seed{s}", arm, "metrics.json")))["history"]
                      for s in seeds] for arm in SWEEPS[args.sweep]}
    else:
        table = {"run": spread({s: per_seed[s]["history"][-1] for s in seeds})}
        hist = {f"mean of {len(seeds)} seeds": [per_seed[s]["history"] for s in seeds]}
    keys = [("test_first_token_acc", "held-out first token"), ("test_path_acc", "held-out full path"),
            ("navigation_acc", "navigation (top-1)"),
            ("navigation_2hop_acc", "leaf -> node 2 hops up (top-1)"),
            ("linear_navigation_acc", "leaf -> first node through a linear map (top-1)"),
            ("reflected_navigation_acc", "leaf -> first node, zigzag reflected (top-1)"),
            ("head_navigation_acc", "leaf -> first node's output row, untied head (top-1)"),
            ("edge_query_navigation_acc", "edge query [EDGE] leaf -> first node's output row (top-1)"),
            ("edge_acc", "edges memorized"),
            ("zigzag_share", "zigzag share: ||E||^2 in arm modes at μ < 0 (§4.4)")]
    if args.first_token_only or args.no_paths:
        keys = [k for k in keys if "path" not in k[0]]
    last = next(iter(hist.values()))[0][-1]  # a key some runs lack (l < 4, older code) is left out
    keys = [k for k in keys if k[0] in last]
    reference = {}
    if args.sweep == "headroom":  # the gap to Node2Vec, its value averaged over the seeds' graphs
        keys += [("spectral_share", "spectral share"), ("geometric_level", "geometric level")]
        refs = [json.load(open(os.path.join(args.out, f"seed{s}", "node2vec", "metrics.json")))
                for s in seeds]
        reference = {key: float(np.mean([r[key] for r in refs])) for key, _ in keys if key in refs[0]}
        table["node2vec (edges only)"] = spread({s: r for s, r in zip(seeds, refs)})
    write_spread_csv(os.path.join(args.out, "summary.csv"), table, seeds, "arm" if args.sweep else "run")
    write_json(os.path.join(args.out, "metrics.json"), {
        "config": vars(args), "seeds": seeds, "device": device_name(device),
        ("arms" if args.sweep else "final"): table if args.sweep else table["run"]})
    band_line = lambda name, epochs, mean, band: (epochs, mean, name, band)
    ref_line = lambda key, lines: [(lines[0][0], [reference[key]] * len(lines[0][0]),
                                    "Node2Vec, edges only")] if key in reference else []
    panels, one_in_n = [], ("test_first_token_acc", "navigation_acc", "navigation_2hop_acc",
                            "linear_navigation_acc", "reflected_navigation_acc",
                            "head_navigation_acc")  # chance 1/n
    for key, label in keys:
        lines = [band_line(name, *curve_band(h, key)) for name, h in hist.items()]
        chance = 1.0 / args.n if key in one_in_n else None
        panels.append((label, "accuracy" if key.endswith("_acc") else "value", lines + ref_line(key, lines),
                       chance))
    plot_panels(os.path.join(args.out, "summary.png"), panels,
                (f"--sweep {args.sweep}, " if args.sweep else "") + f"{describe(args)}\n"
                f"mean over seeds {seeds}, band = min..max")
    for name, metrics in table.items():
        for key, label in keys:
            if key in metrics:
                m = metrics[key]
                print(f"  {name}: {label} {m['mean']:.3f} (min {m['min']:.3f}, max {m['max']:.3f}, "
                      f"seeds {seeds})")
    return per_seed


def main(argv=None, **parser_kw):
    args = get_args(argv, **parser_kw)
    device = pick_device(args.device)
    prepare_out(args.out)
    if args.seeds:
        return run_seeds(args, device)
    return run_sweep(args, device) if args.sweep else run(args, device)


if __name__ == "__main__":
    main()
