import json
import os

import networkx as nx
import numpy as np
import pytest
import torch

import exp_incontext
from common import Vocab, preset_help
from conftest import figure_ok, guide_top_keys, untimed

D, L, V = 3, 4, 15


def graphs(n=200, seed=0, d=D, l=L, v=V):
    return exp_incontext.sample_graphs(n, d, l, v, np.random.default_rng(seed))


def test_graphs_are_path_stars():
    g = graphs()
    for arms, edges, path in zip(g["arms"], g["edges"], g["path"]):
        G = nx.DiGraph([tuple(e) for e in edges])
        assert G.number_of_nodes() == 1 + D * (L - 1) and nx.is_arborescence(G)
        root = path[0]
        assert G.out_degree(root) == D and G.in_degree(root) == 0
        assert all(G.out_degree(u) == 1 for u in G if u != root and G.out_degree(u))
        leaves = [u for u in G if G.out_degree(u) == 0]
        assert len(leaves) == D and all(nx.shortest_path_length(G, root, u) == L - 1 for u in leaves)
        assert set(np.unique(arms)) == set(G) and (arms[:, 0] == root).all()
        assert 0 <= arms.min() and arms.max() < V


def test_edge_list_is_exactly_the_graph_and_shuffled():
    g = graphs()
    firsts = set()
    for arms, edges in zip(g["arms"], g["edges"]):
        true = {(a[i], a[i + 1]) for a in arms.tolist() for i in range(L - 1)}
        listed = [tuple(e) for e in edges.tolist()]
        assert len(listed) == len(true) == D * (L - 1) and set(listed) == true
        firsts.add(listed[0][0] == arms[0, 0])
    assert firsts == {True, False}  # the root's edges are not always listed first


def test_answer_is_the_true_path_and_prompt_holds_the_graph():
    g, vocab = graphs(), Vocab(V)
    prompts = exp_incontext.prompts(g, vocab)
    E = D * (L - 1)
    assert prompts.shape == (200, 3 * E + 3)
    for p, edges, path, arms in zip(prompts.tolist(), g["edges"], g["path"], g["arms"]):
        assert p[0: 3 * E: 3] == [vocab.EDGE] * E
        assert [tuple(p[3 * i + 1: 3 * i + 3]) for i in range(E)] == [tuple(e) for e in edges.tolist()]
        assert p[3 * E:] == [vocab.PATH, path[0], path[-1]]
        G = nx.DiGraph([tuple(e) for e in edges.tolist()])
        assert nx.shortest_path(G, path[0], path[-1]) == path.tolist()
        assert any((path == a).all() for a in arms)
    assert len(set(g["path"][:, -1] == g["arms"][:, 0, -1])) == 2  # the goal arm varies
    fwd, rev = exp_incontext.answers(g, "standard"), exp_incontext.answers(g, "reverse")
    assert torch.equal(fwd, torch.from_numpy(g["path"])) and torch.equal(rev, fwd.flip(1))


def test_no_test_graph_in_training():
    # tiny label set: collisions between train and test happen and must be dropped
    args = exp_incontext.get_args(["--degree", "2", "--path-length", "3", "--num-values", "5",
                                   "--train-size", "300", "--test-size", "300"])
    train, test, dropped = exp_incontext.make_data(args)
    assert dropped > 0 and len(test["path"]) == 300 - dropped
    seen = set(exp_incontext.graph_keys(train, 5))
    assert not seen & set(exp_incontext.graph_keys(test, 5))
    # a key ignores edge order: a reshuffled copy of a training graph counts as seen
    shuffled = {k: v[:1].copy() for k, v in train.items()}
    shuffled["edges"] = shuffled["edges"][:, ::-1].copy()
    assert exp_incontext.graph_keys(shuffled, 5)[0] in seen
    # the default sizes draw test graphs from another seed stream than training
    args = exp_incontext.get_args(["--quick"])
    train, test, dropped = exp_incontext.make_data(args)
    assert dropped == 0 and not np.array_equal(train["path"][:10], test["path"][:10])


def test_teacherless_inputs_hide_the_answer():
    g, vocab = graphs(), Vocab(V)
    p = exp_incontext.prompts(g, vocab)
    a = exp_incontext.answers(g, "teacherless")
    X, Y = exp_incontext.example_group(p, a, "teacherless", vocab)
    Xs, Ys = exp_incontext.example_group(p, a, "standard", vocab)
    Tp = p.shape[1]
    assert torch.equal(Y, Ys) and torch.equal(X[:, :Tp], p) and torch.equal(Xs[:, :Tp], p)
    assert (X[:, Tp:] == vocab.BLANK).all() and X.shape[1] == Tp + L - 1
    assert torch.equal(Xs[:, Tp:], a[:, :-1])  # teacher forcing shows the true prefix
    assert (Y[:, : Tp - 1] == -1).all() and torch.equal(Y[:, Tp - 1:], a)


def test_quick_preset_sets_modes_and_flags_still_win():
    assert exp_incontext.get_args(["--quick"]).modes == ["standard", "reverse"]
    assert exp_incontext.get_args(["--quick", "--modes", "teacherless"]).modes == ["teacherless"]
    assert "--modes standard reverse" in preset_help("preset", exp_incontext.QUICK)


def test_smoke_run(tmp_path):
    out = str(tmp_path / "run")
    res = exp_incontext.main(["--quick", "--train-size", "256", "--test-size", "64", "--epochs", "2",
                              "--n-embd", "32", "--n-layer", "1", "--batch-size", "64", "--out", out,
                              "--modes", "standard", "teacherless", "reverse"])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert set(m) >= {"config", "final", "history", "wall_time_s"}
    assert set(m["final"]) == set(m["history"]) == set(exp_incontext.MODES) == set(res)
    assert set(m) <= guide_top_keys("exp_incontext.py")  # docs/reading_a_run.md names each
    l, d = exp_incontext.QUICK["path_length"], exp_incontext.QUICK["degree"]
    for mode in exp_incontext.MODES:
        f = m["final"][mode]
        assert [h["epoch"] for h in m["history"][mode]] == [1, 2]
        for key in ("test_first_token_acc", "test_path_acc", "train_first_token_acc", "train_path_acc"):
            assert 0 <= f[key] <= 1
        assert len(f["test_token_acc"]) == len(f["test_forced_token_acc"]) == l
        assert f["chance_first_token"] == pytest.approx(1 / d)
        sub = json.load(open(os.path.join(out, mode, "metrics.json")))
        assert set(sub) >= {"config", "final", "history", "wall_time_s"} and sub["final"] == f
        emb = np.load(os.path.join(out, mode, "embeddings.npy"))
        assert emb.shape == (exp_incontext.QUICK["num_values"], 32)
    g = json.load(open(os.path.join(out, "graph.json")))
    assert (g["degree"], g["path_length"], g["train_size"]) == (d, l, 256)
    ex = g["example_test_graphs"][0]
    assert (ex["path"][0], ex["path"][-1]) == (ex["start"], ex["goal"]) and len(ex["edges"]) == d * (l - 1)
    for fig in ("accuracy.png", "token_accuracy.png"):
        assert figure_ok(os.path.join(out, fig))
    # --resume keeps finished modes; --inweights-metrics adds the comparison figure
    iw = tmp_path / "inweights.json"
    iw.write_text(json.dumps({"config": {"n": 2, "l": l}, "history": [
        {"epoch": 10, "test_first_token_acc": 0.5, "test_path_acc": 0.0},
        {"epoch": 20, "test_first_token_acc": 1.0, "test_path_acc": 1.0}]}))
    again = exp_incontext.main(["--quick", "--train-size", "256", "--test-size", "64", "--epochs", "2",
                                "--n-embd", "32", "--n-layer", "1", "--batch-size", "64", "--out", out,
                                "--resume", "--modes", "reverse", "--inweights-metrics", str(iw)])
    assert list(again) == ["reverse"] and again["reverse"]["history"] == m["history"]["reverse"]
    assert figure_ok(os.path.join(out, "inweights.png"))


@pytest.mark.parametrize("flags,msg", [
    (["--degree", "1"], "--degree must be"),
    (["--path-length", "2"], "--path-length must be"),
    (["--num-values", "6"], "--num-values must be >= 1 + d(l-1) = 7"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--modes", "sideways"], "invalid choice"),
    (["--final-lr-frac", "1.5"], "--final-lr-frac must be in [0, 1]"),
    (["--positions", "rotary"], "invalid choice"),
    (["--inweights-metrics", "/nonexistent/metrics.json"], "--inweights-metrics"),
    (["--device", "cpu", "--cuda-graph"], "--cuda-graph needs a CUDA device"),
    (["--seeds", "0", "1", "--parallel", "0"], "--parallel must be >= 1"),
])
def test_bad_flags_exit_with_one_line(tmp_path, flags, msg, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        exp_incontext.main(["--quick", "--degree", "2", "--path-length", "4"] + flags + ["--out", str(out)])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not out.exists()  # nothing written before the flags are checked


def test_compiled_run_matches_eager(tmp_path, capsys):
    """--compile (on by default with CUDA, as --cuda-graph) trains the same run as --no-compile."""
    emb = {}
    for flag in ("--no-compile", "--compile"):
        out = str(tmp_path / flag)
        exp_incontext.main(["--quick", "--train-size", "256", "--test-size", "64", "--epochs", "2",
                            "--n-embd", "32", "--n-layer", "1", "--batch-size", "64", "--modes", "standard",
                            "--device", "cpu", flag, "--out", out])
        emb[flag] = np.load(os.path.join(out, "standard", "embeddings.npy"))
    assert np.allclose(emb["--no-compile"], emb["--compile"], atol=1e-4)
    assert "torch.compile failed" not in capsys.readouterr().err  # it did compile


def test_defaults_follow_bn24_and_quick_keeps_its_optimizer():
    """B&N'24 train with AdamW (0.9, 0.999), no clipping, a constant lr in effect; --quick keeps the
    optimizer its preset was measured with."""
    full = exp_incontext.get_args([])
    assert (full.betas, full.grad_clip, full.final_lr_frac, full.positions) == \
        ([0.9, 0.999], 0.0, 1.0, "learned")
    quick = exp_incontext.get_args(["--quick"])
    assert (quick.betas, quick.grad_clip, quick.final_lr_frac) == ([0.9, 0.95], 1.0, 0.1)


def test_seed_rows_known_answers():
    """--seeds summarizes each mode by its final accuracies, the first epoch its held-out full path
    reached 0.9 and, for next-token training, the Clever Hans epoch (teacher-forced a2 >= 0.9)."""
    def history(paths, forced_a2):
        return [{"epoch": e + 1, "test_path_acc": p, "test_forced_token_acc": [1.0, 0.5, a2, 1.0]}
                for e, (p, a2) in enumerate(zip(paths, forced_a2))]
    final = {"test_first_token_acc": 0.5, "test_path_acc": 0.25, "train_first_token_acc": 0.75}
    results = {"standard": {"final": final, "history": history([0.1, 0.5, 0.5], [0.2, 0.95, 1.0])},
               "reverse": {"final": {**final, "test_path_acc": 1.0},
                           "history": history([0.5, 0.9, 1.0], [1.0, 1.0, 1.0])}}
    rows = exp_incontext.seed_rows(results)
    assert rows == {"modes": {
        "standard": {**final, "epoch_path_0.9": None, "epoch_clever_hans": 2},
        "reverse": {**final, "test_path_acc": 1.0, "epoch_path_0.9": 2}}}


def test_seeds_match_single_runs(tmp_path):
    """--seeds 0 1: each seed's folder is the run --seed S gives, and the summary holds their spread."""
    flags = ["--quick", "--train-size", "256", "--test-size", "64", "--epochs", "2", "--n-embd", "32",
             "--n-layer", "1", "--batch-size", "64", "--modes", "standard", "reverse"]
    per_seed = exp_incontext.main(flags + ["--seeds", "0", "1", "--out", str(tmp_path / "seeds")])
    single = exp_incontext.main(flags + ["--seed", "1", "--out", str(tmp_path / "single")])
    drop = ("time_s", "wall_time_s", "wall_time_s_per_mode", "config")  # config holds --out
    for mode in ("standard", "reverse"):
        assert untimed(per_seed[1][mode], drop) == untimed(single[mode], drop)
    seeded, alone = (json.load(open(tmp_path / d / "metrics.json")) for d in ("seeds/seed1", "single"))
    assert untimed(seeded, drop) == untimed(alone, drop)
    summary = json.load(open(tmp_path / "seeds" / "metrics.json"))["summary"]
    first = summary["modes: reverse"]["test_first_token_acc"]
    assert first["values"]["1"] == single["reverse"]["final"]["test_first_token_acc"]
    assert first["values"]["0"] == per_seed[0]["reverse"]["final"]["test_first_token_acc"]
    assert first["min"] <= first["mean"] <= first["max"]
    md = (tmp_path / "seeds" / "summary.md").read_text()
    assert "## modes" in md and "| standard |" in md and "| reverse |" in md
    assert figure_ok(tmp_path / "seeds" / "summary.png")
