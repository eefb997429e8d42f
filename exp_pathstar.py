"""In-weights path-star (§2, Figs. 3 and 12): a GPT memorizes the edges of one fixed path-star
graph and learns paths for 75% of its leaves; can it find the path from a held-out leaf?

  python exp_pathstar.py --quick --first-token-only       # CPU demo, a few minutes
  python exp_pathstar.py --n 5000 --first-token-only      # the paper's setting, one GPU
"""
import os
import sys
import time

import numpy as np
import torch

from common import (GPT, ArgParser, GPTConfig, Phase, Vocab, arm_edges, benchmark, device_name,
                    die, edge_group, edge_recall, greedy_decode, parse_with_presets, path_group,
                    path_prompts, path_star, path_targets, pick_device, plot_curves, prepare_out,
                    seed_everything, split_arms, token_embeddings, train, write_json)

# CPU-sized preset: G(300, 5) with a 2-layer width-64 GPT (see README, "Finding a quick setting")
QUICK = dict(n=300, l=5, n_layer=2, n_embd=64, n_head=4, pauses=4, lr=3e-3, weight_decay=0.1,
             batch_size=256, warmup=100, epochs=600, eval_every=20)


def get_args(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("graph and task")
    g.add_argument("--n", type=int, default=5000, help="arms d of the path-star graph G(d, l)")
    g.add_argument("--l", type=int, default=5, help="nodes on a root-to-leaf path, root included")
    g.add_argument("--train-frac", type=float, default=0.75, help="fraction of leaves with path supervision")
    g.add_argument("--first-token-only", action="store_true",
                   help="loss only on the first hop after the root (Fig. 3); default: whole path")
    g.add_argument("--reverse-path", action="store_true", help="targets leaf..root instead of root..leaf")
    g.add_argument("--edges", choices=["both", "forward", "backward"], default="both",
                   help="edge directions trained on (forward = parent->child)")
    g.add_argument("--pauses", type=int, default=5, help="[PAUSE] tokens after the leaf (Table 2: 5 for G(5000,5))")
    g.add_argument("--recipe", choices=["interleaved", "staged"], default="interleaved",
                   help="edges and paths in every batch, or an edge phase then a path phase (App. D.3)")
    m = p.add_argument_group("model (default GPT-mid)")
    m.add_argument("--n-layer", type=int, default=12, help="Transformer blocks")
    m.add_argument("--n-embd", type=int, default=384, help="width")
    m.add_argument("--n-head", type=int, default=8, help="attention heads")
    m.add_argument("--dropout", type=float, default=0.0, help="dropout on embeddings, attention and MLP")
    m.add_argument("--freeze-embeddings", action="store_true",
                   help="keep the (tied) token embeddings at their init (App. E.1 control)")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, default=10000, help="epochs of the interleaved run / path phase")
    o.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (cosine to lr/10)")
    o.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    o.add_argument("--batch-size", type=int, default=2048, help="sequences per step")
    o.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps")
    o.add_argument("--edge-epochs", type=int, default=2500, help="staged recipe: epochs of the edge phase")
    o.add_argument("--edge-lr", type=float, default=1e-2, help="staged recipe: edge-phase peak lr")
    o.add_argument("--edge-batch-size", type=int, default=16384, help="staged recipe: edge-phase batch")
    o.add_argument("--edge-warmup", type=int, default=500, help="staged recipe: edge-phase warm-up steps")
    r = p.add_argument_group("run")
    r.add_argument("--eval-every", type=int, default=100, help="epochs between evaluations and checkpoints")
    r.add_argument("--seed", type=int, default=0, help="seed of graph, split, init and batches")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    r.add_argument("--out", default="runs/pathstar", help="output folder")
    r.add_argument("--quick", action="store_true", help="CPU-sized preset: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " (explicit flags still win)")
    r.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    r.add_argument("--bench", action="store_true",
                   help="time training steps of this configuration, write --out/bench.json, no training")
    args = parse_with_presets(p, {"quick": QUICK}, argv)
    checks = [(args.n >= 2, "--n must be >= 2 (arms; some leaves are held out)"),
              (args.l >= 2, "--l must be >= 2 (nodes per root-to-leaf path, root included)"),
              (0 < args.train_frac < 1, "--train-frac must be in (0, 1)"),
              (args.pauses >= 0, "--pauses must be >= 0"),
              (args.epochs >= 1, "--epochs must be >= 1"),
              (args.edge_epochs >= 1, "--edge-epochs must be >= 1"),
              (args.eval_every >= 1, "--eval-every must be >= 1"),
              (min(args.n_layer, args.n_embd, args.n_head) >= 1, "model sizes must be >= 1"),
              (args.n_embd % args.n_head == 0, "--n-embd must be divisible by --n-head"),
              (min(args.batch_size, args.edge_batch_size) >= 1, "batch sizes must be >= 1"),
              (min(args.warmup, args.edge_warmup) >= 0, "warm-up steps must be >= 0"),
              (min(args.lr, args.edge_lr) > 0, "learning rates must be > 0"),
              (args.weight_decay >= 0 and 0 <= args.dropout < 1, "bad --weight-decay or --dropout")]
    for ok, msg in checks:
        if not ok:
            die(msg)
    return args


def build(args):
    """Graph, split, datasets and the evaluation data of one run."""
    graph, root, arms = path_star(args.n, args.l, seed=args.seed)
    train_arms, test_arms = split_arms(arms, args.train_frac, seed=args.seed)
    vocab = Vocab(graph.number_of_nodes())
    edges = arm_edges(arms, args.edges)
    targets = path_targets(train_arms, args.reverse_path)
    paths = path_group(path_prompts([a[-1] for a in train_arms], vocab, args.pauses), targets,
                       args.first_token_only)
    return dict(graph=graph, root=root, arms=arms, train_arms=train_arms, test_arms=test_arms,
                vocab=vocab, edges=edges, edge_group=edge_group(edges, vocab), path_group=paths,
                train_targets=targets)


def make_evaluate(data, args, device):
    """Greedy decoding from `prompt start-node` (the start node is the root, or the leaf when
    reversed, and always known). Position 0 is scored from the prompt alone."""
    splits = {}
    for split in ("test", "train"):
        arms = data[f"{split}_arms"]
        splits[split] = (path_prompts([a[-1] for a in arms], data["vocab"], args.pauses),
                         path_targets(arms, args.reverse_path))

    def evaluate(model):
        res = {}
        for split, (prompts, targets) in splits.items():
            start_ok = greedy_decode(model, prompts, 1, device)[:, 0] == targets[:, 0]
            rest = greedy_decode(model, torch.cat([prompts, targets[:, :1]], 1), args.l - 1, device)
            correct = torch.cat([start_ok[:, None], rest == targets[:, 1:]], 1).float()
            res[f"{split}_first_token_acc"] = correct[:, 1].mean().item()
            res[f"{split}_path_acc"] = correct.all(1).float().mean().item()
            res[f"{split}_token_acc"] = correct.mean(0).tolist()
        res["edge_acc"] = edge_recall(model, data["edges"], data["vocab"], device)
        res["chance_first_token"] = 1.0 / args.n
        return res
    return evaluate


def phases_for(data, args, device):
    to = lambda g: tuple(t.to(device) for t in g)
    edges, paths = to(data["edge_group"]), to(data["path_group"])
    if args.recipe == "staged":  # App. D.3: memorize edges first, then fine-tune on paths alone
        return [Phase("edges", [edges], args.edge_epochs, args.edge_batch_size, args.edge_lr, args.edge_warmup),
                Phase("paths", [paths], args.epochs, args.batch_size, args.lr, args.warmup)]
    return [Phase("interleaved", [edges, paths], args.epochs, args.batch_size, args.lr, args.warmup)]


def write_outputs(out, args, data, model, history, wall, device):
    final = {k: v for k, v in history[-1].items() if k not in ("epoch", "phase", "time_s")}
    write_json(os.path.join(out, "metrics.json"), {
        "config": vars(args), "device": device_name(device), "final": final,
        "history": history, "wall_time_s": wall})
    write_json(os.path.join(out, "graph.json"), {
        "num_nodes": data["vocab"].num_nodes, "root": data["root"], "arms": data["arms"],
        "train_leaves": [a[-1] for a in data["train_arms"]],
        "test_leaves": [a[-1] for a in data["test_arms"]],
        "edge_examples": data["edges"].tolist(), "train_paths": data["train_targets"].tolist()})
    np.save(os.path.join(out, "embeddings.npy"), token_embeddings(model, data["vocab"].num_nodes))
    scale = f"G({args.n},{args.l}), {args.n_layer}L x {args.n_embd}"
    target = "first-token-only" if args.first_token_only else "full path"
    series = [("test_first_token_acc", "held-out first token"), ("test_path_acc", "held-out full path"),
              ("train_first_token_acc", "train first token"), ("train_path_acc", "train full path"),
              ("edge_acc", "edges memorized")]
    if args.first_token_only:  # later hops carry no loss: their curves say nothing
        series = [s for s in series if "path" not in s[0]]
    plot_curves(os.path.join(out, "accuracy.png"), history, series,
                f"Path-star {scale}, {target} training", chance=1.0 / args.n)
    token_hist = [dict(epoch=h["epoch"], **{f"pos{i}": a for i, a in enumerate(h["test_token_acc"])})
                  for h in history]
    names = ["start"] + [f"hop {i}" for i in range(1, args.l)]
    plot_curves(os.path.join(out, "token_accuracy.png"), token_hist,
                [(f"pos{i}", f"{names[i]}") for i in range(args.l)],
                f"Held-out per-position accuracy (greedy), {scale}, {target}", chance=1.0 / args.n)


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    prepare_out(args.out)
    seed_everything(args.seed)
    data = build(args)
    vocab = data["vocab"]
    cfg = GPTConfig(vocab_size=vocab.size, block_size=args.pauses + args.l + 2, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                    freeze_embeddings=args.freeze_embeddings)
    model = GPT(cfg).to(device)
    phases = phases_for(data, args, device)
    if args.bench:
        res = benchmark(model, phases[0].groups, phases[0].batch_size, device, args.weight_decay)
        res["config"] = vars(args)
        write_json(os.path.join(args.out, "bench.json"), res)
        print(f"{res['device']}: {res['seqs_per_s']:.0f} seqs/s, {res['model_flops_per_s'] / 1e9:.1f} "
              f"GFLOP/s model, peak {res['peak_flops_per_s'] / 1e9:.1f} GFLOP/s, MFU {res['mfu']:.1%}")
        return res
    if device == "cpu" and not args.quick and args.n * args.n_embd * args.n_layer > 10_000_000:
        print("warning: a GPU-sized configuration on the CPU; see the ETA on the progress bar "
              "(--quick is the CPU-sized preset)", file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"G({args.n},{args.l}): {vocab.num_nodes} nodes, {len(data['edges'])} edge examples, "
          f"{len(data['train_arms'])} train / {len(data['test_arms'])} held-out leaves; "
          f"GPT {args.n_layer}x{args.n_embd}, {n_params / 1e6:.2f}M params on {device_name(device)}")
    t0 = time.time()
    history = train(model, phases, weight_decay=args.weight_decay, evaluate=make_evaluate(data, args, device),
                    eval_every=args.eval_every, device=device, seed=args.seed,
                    ckpt_path=os.path.join(args.out, "checkpoint.pt"), resume=args.resume,
                    config=vars(args), desc="path-star")
    wall = time.time() - t0
    write_outputs(args.out, args, data, model, history, wall, device)
    f = history[-1]
    print(f"held-out first token {f['test_first_token_acc']:.3f} (chance {f['chance_first_token']:.4f}), "
          f"held-out path {f['test_path_acc']:.3f}, train first token {f['train_first_token_acc']:.3f}, "
          f"edges {f['edge_acc']:.3f}; {wall:.0f}s -> {args.out}")
    return history


if __name__ == "__main__":
    main()
