"""In-context path-star (App. A, Figs. 11, 13, 34 right; Bachmann & Nagarajan 2024): every example
is a fresh path-star graph given in the prompt as a shuffled edge list, then start and goal; the
answer is the start-to-goal path. Next-token training fails here even on G(2, 5), while
teacherless training and reversed targets succeed: the contrast to the in-weights task.

  python exp_incontext.py --quick                  # CPU demo, standard and reverse, under 15 minutes
  python exp_incontext.py                          # the reference setting, one GPU
  python exp_incontext.py --inweights-metrics runs/quick/metrics.json   # + in-weights comparison
  python exp_incontext.py --quick --seeds 0 1 2 --parallel 2            # per seed, then the spread

Sequence layout (node values 0..V-1 are tokens, specials follow):
  [EDGE] u v  ...(d(l-1) edges, parent->child, shuffled)...  [PATH] start goal | answer (l tokens)
forward answer = start a1 ... goal; reverse answer = goal ... a1 start. Answer position 0 is a copy
from the prompt; position 1 is the "first token": in the forward answer it is a1, the decision
token (which arm?), the hard one; in the reverse answer it is the goal's unique parent, easy.
"""
import json
import os
import time

import numpy as np
import torch

from common import (GPT, ArgParser, GPTConfig, Phase, Vocab, add_adamw_flags, add_seed_flags, add_step_flags,
                    autocast, config_diff, curve_band, decode_answer, device_name, die, epochs_to, loss_tail,
                    measures, over_seeds, parse_with_presets, pick_device, plot_panels, prepare_out,
                    preset_help, seed_everything, step_modes, token_embeddings, train, write_json)

MODES = ("standard", "teacherless", "reverse")

# CPU-sized preset (docs/notes.md). The Clever Hans only comes after ~160k-600k training
# sequences, so standard gets 45 epochs (900k; it came at epoch 18, 25 and 30 of seeds 0-2) and
# teacherless, which learns nothing more at this scale, is left out to keep two modes under 15
# minutes; --modes adds it back
QUICK = dict(degree=2, path_length=4, num_values=20, train_size=20000, test_size=1000, n_layer=3,
             n_embd=64, n_head=4, positions="sinusoidal", lr=3e-3, batch_size=128, warmup=100, epochs=45,
             eval_every=1, modes=["standard", "reverse"],
             betas=[0.9, 0.95], grad_clip=1.0, final_lr_frac=0.1)  # the optimizer it was measured with


def get_args(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("task")
    g.add_argument("--degree", type=int, default=2, help="arms d of each path-star graph G(d, l)")
    g.add_argument("--path-length", type=int, default=5,
                   help="nodes l on the start-to-goal path, start included")
    g.add_argument("--num-values", type=int, default=50,
                   help="node values V the labels of each graph are drawn from")
    g.add_argument("--train-size", type=int, default=200000, help="training graphs")
    g.add_argument("--test-size", type=int, default=20000,
                   help="held-out graphs (before dropping any seen in training)")
    g.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="training modes: next-token (teacher forcing), teacherless (answer inputs hidden), "
                        "reverse (answer goal..start)")
    m = p.add_argument_group("model (B&N'24 reference GPT)")
    m.add_argument("--n-layer", type=int, default=6, help="Transformer blocks")
    m.add_argument("--n-embd", type=int, default=384, help="width")
    m.add_argument("--n-head", type=int, default=6, help="attention heads")
    m.add_argument("--positions", choices=("learned", "sinusoidal"), default="learned",
                   help="position embeddings: learned, N(0, 1) init (B&N'24's GPT) or fixed sinusoidal (the "
                        "in-weights GPT, App. B.2.1)")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, default=100, help="passes over the training graphs")
    o.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, reached after --warmup steps")
    o.add_argument("--final-lr-frac", type=float, default=1.0,
                   help="the cosine decays the learning rate to this fraction of --lr (1 = constant after "
                        "warm-up, as B&N'24's schedule is in effect: its decay horizon counts samples, not "
                        "steps)")
    add_adamw_flags(o, "B&N'24")
    o.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (B&N'24 train with none)")
    o.add_argument("--batch-size", type=int, default=256, help="sequences per step")
    o.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    r = p.add_argument_group("run")
    r.add_argument("--eval-every", type=int, default=5, help="epochs between evaluations and checkpoints")
    r.add_argument("--seed", type=int, default=0,
                   help="seed of the data (train and test streams differ), init and batches")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    r.add_argument("--out", default="runs/incontext", help="output folder")
    r.add_argument("--inweights-metrics", metavar="PATH",
                   help="exp_pathstar.py metrics.json to plot beside these runs (inweights.png)")
    r.add_argument("--quick", action="store_true", help=preset_help("CPU-sized preset", QUICK))
    r.add_argument("--resume", action="store_true",
                   help="keep finished modes, continue interrupted ones from --out/<mode>/checkpoint.pt")
    add_step_flags(r)
    add_seed_flags(r)
    args = parse_with_presets(p, {"quick": QUICK}, argv)
    d, l = args.degree, args.path_length
    checks = [(d >= 2, "--degree must be >= 2 (one arm leaves no decision)"),
              (l >= 3, "--path-length must be >= 3 (start, at least one inner node, goal)"),
              (args.num_values >= 1 + d * (l - 1),
               f"--num-values must be >= 1 + d(l-1) = {1 + d * (l - 1)} (distinct labels of one graph)"),
              (min(args.train_size, args.test_size) >= 1, "--train-size and --test-size must be >= 1"),
              (args.epochs >= 1, "--epochs must be >= 1"),
              (args.eval_every >= 1, "--eval-every must be >= 1"),
              (min(args.n_layer, args.n_embd, args.n_head) >= 1, "model sizes must be >= 1"),
              (args.n_embd % args.n_head == 0, "--n-embd must be divisible by --n-head"),
              (args.batch_size >= 1, "--batch-size must be >= 1"),
              (args.warmup >= 0, "--warmup must be >= 0"),
              (args.lr > 0, "--lr must be > 0"),
              (0 <= args.final_lr_frac <= 1, "--final-lr-frac must be in [0, 1]"),
              (args.weight_decay >= 0, "--weight-decay must be >= 0"),
              (args.parallel >= 1, "--parallel must be >= 1")]
    for ok, msg in checks:
        if not ok:
            die(msg)
    if args.inweights_metrics:
        load_inweights(args.inweights_metrics)  # a bad path fails before anything is written
    args.modes = [m for m in MODES if m in args.modes]  # canonical order, no repeats
    return args


def load_inweights(path):
    """exp_pathstar.py's metrics.json, read before training so a bad path fails fast."""
    try:
        with open(path) as f:
            m = json.load(f)
        m["config"]["n"], m["config"]["l"], m["history"][0]["test_first_token_acc"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        die(f"--inweights-metrics {path!r} is not a readable exp_pathstar.py metrics.json ({e})")
    return m


# ----------------------------------------------------------------------------- data


def sample_graphs(n, d, l, V, rng):
    """n fresh G(d, l) over labels 0..V-1 (App. A: node values drawn uniformly, no repeats in a
    graph). Returns arms (n, d, l) root first, edges (n, d(l-1), 2) [parent, child] in shuffled
    order (the randomized adjacency list), path (n, l) root..goal along a uniformly chosen arm."""
    labels = np.argsort(rng.random((n, V)), axis=1)[:, : 1 + d * (l - 1)]  # a random injection per graph
    root = np.repeat(labels[:, :1, None], d, axis=1)
    arms = np.concatenate([root, labels[:, 1:].reshape(n, d, l - 1)], axis=2)
    edges = np.stack([arms[:, :, :-1], arms[:, :, 1:]], axis=-1).reshape(n, d * (l - 1), 2)
    order = np.argsort(rng.random(edges.shape[:2]), axis=1)
    edges = np.take_along_axis(edges, order[..., None], axis=1)
    path = arms[np.arange(n), rng.integers(d, size=n)]
    return dict(arms=arms, edges=edges, path=path)


def graph_keys(g, V):
    """One bytes key per example: its edge set (order-free) and its path, so a reshuffled edge
    list of a training graph still counts as seen."""
    codes = np.sort(g["edges"][..., 0] * V + g["edges"][..., 1], axis=1)
    rows = np.ascontiguousarray(np.concatenate([codes, g["path"]], axis=1), dtype=np.int64)
    return [r.tobytes() for r in rows]


def make_data(args):
    """Train and test graphs from disjoint seed streams; test graphs seen in training are dropped."""
    d, l, V = args.degree, args.path_length, args.num_values
    train = sample_graphs(args.train_size, d, l, V, np.random.default_rng([args.seed, 0]))
    test = sample_graphs(args.test_size, d, l, V, np.random.default_rng([args.seed, 1]))
    seen = set(graph_keys(train, V))
    fresh = np.array([k not in seen for k in graph_keys(test, V)])
    test = {k: v[fresh] for k, v in test.items()}
    if not len(test["path"]):
        die("every test graph also appears in training; raise --num-values or --test-size")
    return train, test, int((~fresh).sum())


def prompts(g, vocab):
    """(n, 3E + 3) prompts `[EDGE] u v ... [PATH] start goal`."""
    n, E, _ = g["edges"].shape
    edges = np.concatenate([np.full((n, E, 1), vocab.EDGE), g["edges"]], axis=2).reshape(n, 3 * E)
    tail = np.stack([np.full(n, vocab.PATH), g["path"][:, 0], g["path"][:, -1]], axis=1)
    return torch.from_numpy(np.concatenate([edges, tail], axis=1)).long()


def answers(g, mode):
    """(n, l) answer tokens: start..goal, or goal..start in reverse mode (Fig. 34 right)."""
    path = g["path"][:, ::-1] if mode == "reverse" else g["path"]
    return torch.from_numpy(np.ascontiguousarray(path)).long()


def example_group(prompt, answer, mode, vocab):
    """(X, Y) with the loss on the l answer tokens only. Teacherless (B&N'24): every answer input
    is [BLANK], so no answer token is ever visible and all are predicted at once from the prompt;
    this switches off the Clever-Hans cheat (App. A)."""
    seq = torch.cat([prompt, answer], 1)
    X, Y = seq[:, :-1].clone(), seq[:, 1:].clone()
    Tp = prompt.shape[1]
    Y[:, : Tp - 1] = -1
    if mode == "teacherless":
        X[:, Tp:] = vocab.BLANK
    return X, Y


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_all(model, X, Y, device, chunk=4096):
    """Argmax at every answer position in one forward pass -> (n, l). With teacher-forced X each
    token is predicted from the true prefix; with teacherless X it is the model's whole answer."""
    Y = loss_tail(X, Y)[1]  # (n, l): the answer positions
    out = []
    for i in range(0, len(X), chunk):
        with autocast(device):
            logits, _ = model(X[i: i + chunk].to(device), Y[i: i + chunk].to(device))
        out.append(logits.argmax(-1).cpu())
    return torch.cat(out)


def make_evaluate(splits, mode, args, device):
    """Held-out ("test") and a same-sized slice of training ("train") graphs.
    token_acc: per answer position, of the model's own answer: greedy decoding from the prompt
      (position 0) and from the prompt plus the true start token (positions 1..l-1), as in
      exp_pathstar.py; teacherless: the one-pass read-out with [BLANK] inputs.
    forced_token_acc: per position given the true answer prefix (teacher forcing), where the
      Clever-Hans pattern shows; teacherless has no prefix: equal to token_acc."""

    def evaluate(model):
        res = {}
        for split, (prompt, answer, X, Y) in splits.items():
            forced = (predict_all(model, X, Y, device) == answer).float()
            if mode == "teacherless":
                correct = forced
            else:
                correct = (decode_answer(model, prompt, answer, device) == answer).float()
            res[f"{split}_first_token_acc"] = correct[:, 1].mean().item()
            res[f"{split}_path_acc"] = correct.all(1).float().mean().item()
            res[f"{split}_token_acc"] = correct.mean(0).tolist()
            res[f"{split}_forced_token_acc"] = forced.mean(0).tolist()
        res["chance_first_token"] = 1.0 / args.degree
        return res
    return evaluate


# ----------------------------------------------------------------------------- runs


def run_config(args, mode):
    """Flags that decide a mode's run (checkpoint match); --modes and the plot input do not."""
    skip = {"modes", "inweights_metrics"}
    return {**{k: v for k, v in vars(args).items() if k not in skip}, "mode": mode}


def run_mode(mode, args, train_g, test_g, vocab, device, steps):
    """Train one mode from the shared init; writes --out/<mode>/ and returns its metrics. steps:
    (compile, cuda_graph) of `step_modes`."""
    out = os.path.join(args.out, mode)
    prepare_out(out)
    config = run_config(args, mode)
    metrics_path = os.path.join(out, "metrics.json")
    if args.resume and os.path.exists(metrics_path):
        old = json.load(open(metrics_path))
        if not config_diff(old["config"], config):
            print(f"[{mode}] finished earlier, kept")
            return old
    ckpt = os.path.join(out, "checkpoint.pt")
    seed_everything(args.seed)  # every mode starts from the same weights
    train_group = example_group(prompts(train_g, vocab), answers(train_g, mode), mode, vocab)
    n_eval = min(len(test_g["path"]), args.train_size)
    splits = {}
    for split, g in (("test", test_g), ("train", {k: v[:n_eval] for k, v in train_g.items()})):
        p, a = prompts(g, vocab), answers(g, mode)
        splits[split] = (p, a, *example_group(p, a, mode, vocab))
    model = GPT(GPTConfig(vocab_size=vocab.size, block_size=train_group[0].shape[1], n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd,
                          learned_positions=args.positions == "learned", position_std=1.0)).to(device)
    phase = Phase(mode, [tuple(t.to(device) for t in train_group)], args.epochs, args.batch_size,
                  args.lr, args.warmup, final_lr_frac=args.final_lr_frac, grad_clip=args.grad_clip)
    history = train(model, [phase], weight_decay=args.weight_decay, betas=tuple(args.betas),
                    evaluate=make_evaluate(splits, mode, args, device), eval_every=args.eval_every,
                    device=device, seed=args.seed, ckpt_path=ckpt,
                    resume=args.resume and os.path.exists(ckpt), config=config, desc=mode,
                    compile=steps[0], cuda_graph=steps[1])
    wall = history[-1]["time_s"]  # training and evaluation, earlier sessions of a resumed run included
    final = measures(history[-1])
    metrics = {"config": config, "device": device_name(device), "final": final, "history": history,
               "wall_time_s": wall}
    write_json(metrics_path, metrics)
    np.save(os.path.join(out, "embeddings.npy"), token_embeddings(model, vocab.num_nodes))
    print(f"[{mode}] held-out first token {final['test_first_token_acc']:.3f} (chance "
          f"{final['chance_first_token']:.3f}), path {final['test_path_acc']:.3f}, train first token "
          f"{final['train_first_token_acc']:.3f}; {wall:.0f}s")
    return metrics


def example_graphs(test_g, k=3):
    return [{"edges": test_g["edges"][i].tolist(), "start": int(test_g["path"][i, 0]),
             "goal": int(test_g["path"][i, -1]), "path": test_g["path"][i].tolist(),
             "arms": test_g["arms"][i].tolist()} for i in range(min(k, len(test_g["path"])))]


def position_names(mode, l):
    if mode == "reverse":
        return ["goal (copied)", "goal's parent"] + [f"back {i}" for i in range(2, l - 1)] + ["start"]
    return ["start (copied)", "a1 (decision)"] + [f"a{i}" for i in range(2, l - 1)] + ["goal"]


def describe(args):
    """The run's setting, for figure titles."""
    return (f"in-context G({args.degree},{args.path_length}), V={args.num_values}, {args.train_size} train "
            f"graphs, GPT {args.n_layer}L x {args.n_embd}")


def write_figures(out, args, results, inweights):
    d, l = args.degree, args.path_length
    label = describe(args)
    curves = lambda key: [([h["epoch"] for h in r["history"]], [h[key] for h in r["history"]], mode)
                          for mode, r in results.items()]
    plot_panels(os.path.join(out, "accuracy.png"), [
        ("held-out first token (a1; reverse: goal's parent)", "accuracy", curves("test_first_token_acc"),
         1 / d),
        ("held-out full path (exact match)", "accuracy", curves("test_path_acc"), 1 / d),
        ("training graphs: first token", "accuracy", curves("train_first_token_acc"), 1 / d)],
        f"Fig. 13: {label}")
    panels = []
    for mode, r in results.items():
        x = [h["epoch"] for h in r["history"]]
        how = "one-pass read-out, answer inputs [BLANK]" if mode == "teacherless" else "teacher-forced"
        panels.append((f"{mode}: {how}", "held-out per-position accuracy",
                       [(x, [h["test_forced_token_acc"][i] for h in r["history"]], f"{i}: {name}")
                        for i, name in enumerate(position_names(mode, l))], 1 / d))
    plot_panels(os.path.join(out, "token_accuracy.png"), panels,
                f"Per-position accuracy on held-out graphs (App. A: Clever Hans vs right-to-left "
                f"cascade)\n{label}")
    if inweights:
        c, h = inweights["config"], inweights["history"]
        iw = f"in-weights G({c['n']},{c['l']})" + (", first-token-only" if c.get("first_token_only") else "")
        xs = [e["epoch"] for e in h]
        lines = [(xs, [e["test_first_token_acc"] for e in h], "first token")]
        if not c.get("first_token_only"):  # trained on the first hop alone: no path curve to show
            lines.append((xs, [e["test_path_acc"] for e in h], "full path"))
        plot_panels(os.path.join(out, "inweights.png"), [
            (f"{iw}: held-out leaves", "accuracy", lines, 1 / c["n"]),
            (f"in-context G({d},{l}): held-out graphs, first token", "accuracy",
             curves("test_first_token_acc"), 1 / d),
            (f"in-context G({d},{l}): held-out graphs, full path", "accuracy", curves("test_path_acc"),
             1 / d)],
            f"Graph in the weights vs graph in the prompt ({iw} vs in-context G({d},{l}), forward unless "
            f"named)")


def run(args, device):
    """The selected modes of one seed; writes --out and returns {mode: metrics}."""
    steps = step_modes(args, device)
    inweights = load_inweights(args.inweights_metrics) if args.inweights_metrics else None
    if inweights and (inweights["config"]["n"], inweights["config"]["l"]) != (args.degree, args.path_length):
        c = inweights["config"]
        print(f"note: in-weights run is G({c['n']},{c['l']}), this run is "
              f"G({args.degree},{args.path_length})")
    prepare_out(args.out)
    t0 = time.time()
    train_g, test_g, dropped = make_data(args)
    vocab = Vocab(args.num_values)
    print(f"in-context G({args.degree},{args.path_length}) over {args.num_values} values: {args.train_size} "
          f"train / {len(test_g['path'])} test graphs ({dropped} test graphs seen in training dropped); "
          f"modes {', '.join(args.modes)} on {device_name(device)}")
    write_json(os.path.join(args.out, "graph.json"), {
        "degree": args.degree, "path_length": args.path_length, "num_values": args.num_values,
        "num_nodes_per_graph": 1 + args.degree * (args.path_length - 1),
        "train_size": args.train_size, "test_size": len(test_g["path"]), "test_dropped_as_seen": dropped,
        "layout": "[EDGE] u v (parent->child, shuffled) ... [PATH] start goal, then the answer",
        "specials": {name: getattr(vocab, name) for name in ("EDGE", "PATH", "PAUSE", "PAD", "BLANK")},
        "example_test_graphs": example_graphs(test_g)})
    results = {mode: run_mode(mode, args, train_g, test_g, vocab, device, steps) for mode in args.modes}
    wall = sum(r["wall_time_s"] for r in results.values())  # modes kept by --resume count their own time
    write_json(os.path.join(args.out, "metrics.json"), {
        "config": vars(args), "device": device_name(device),
        "final": {m: r["final"] for m, r in results.items()},
        "history": {m: r["history"] for m, r in results.items()},
        "wall_time_s": wall, "wall_time_s_per_mode": {m: r["wall_time_s"] for m, r in results.items()}})
    write_figures(args.out, args, results, inweights)
    print(f"{time.time() - t0:.0f}s this session, {wall:.0f}s of training and evaluation -> {args.out}")
    return results


# ----------------------------------------------------------------------------- seeds


def forced_at(position):
    """A history record's held-out teacher-forced accuracy at one answer position."""
    return lambda h: h["test_forced_token_acc"][position]


def seed_rows(results):
    """One run's final measures for --seeds: {"modes": {mode: {measure: value}}}, with the epoch the
    held-out full path first reached 0.9 and, for next-token training, the Clever Hans: the epoch
    teacher-forced position 2 (a2, the unique child of the true a1) first reached 0.9 (App. A)."""
    rows = {}
    for mode, m in results.items():
        row = {k: m["final"][k] for k in ("test_first_token_acc", "test_path_acc", "train_first_token_acc")}
        row["epoch_path_0.9"] = epochs_to(m["history"], 0.9, "test_path_acc")
        if mode == "standard":
            row["epoch_clever_hans"] = epochs_to(m["history"], 0.9, forced_at(2))
        rows[mode] = row
    return {"modes": rows}


def write_seed_figure(args, per_seed):
    """--seeds: each mode's held-out curves, the mean over seeds with a min..max band (summary.png)."""
    seeds = list(per_seed)

    def line(mode, value):  # value: a history field, or a function of the record
        epochs, mean, band = curve_band([per_seed[s][mode]["history"] for s in seeds], value)
        return epochs, mean, mode, band
    measures = (("held-out first token (a1; reverse: goal's parent)", "test_first_token_acc"),
                ("held-out full path (exact match)", "test_path_acc"),
                ("held-out position 2, teacher-forced\n(standard: the Clever Hans)", forced_at(2)))
    panels = [(title, "accuracy", [line(mode, value) for mode in args.modes], 1 / args.degree)
              for title, value in measures]
    plot_panels(os.path.join(args.out, "summary.png"), panels,
                f"{describe(args)}: mean over seeds {seeds}, band = min..max")


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    step_modes(args, device)  # a bad --cuda-graph fails before anything is written
    if not args.seeds:
        return run(args, device)
    per_seed = over_seeds(run, seed_rows, args, device)
    write_seed_figure(args, per_seed)
    return per_seed


if __name__ == "__main__":
    main()
