import json

import networkx as nx
import numpy as np
import pytest
import torch

import exp_tiny_graphs as tg
from common import (Vocab, edge_group, edge_margin, edge_margin_authors, geometric_level, laplacian_eigs,
                    logit_recall, tiny_graph, token_embeddings)
from conftest import figure_ok, guide_top_keys, untimed

# graph node / edge counts and connectivity are tested in tests/test_node2vec.py


def test_edge_examples():
    cycle = tiny_graph("cycle")
    both = tg.edge_examples(cycle)
    assert len(both) == 30 and {tuple(e) for e in both} == {(u, v) for u, v in cycle.edges} | {
        (v, u) for u, v in cycle.edges}
    assert len(tg.edge_examples(tiny_graph("cycle", self_edges=True))) == 45  # a self-edge counted once
    star = tiny_graph("path_star")
    fwd = tg.edge_examples(star, "forward")
    assert len(fwd) == 16 and star.graph["root"] in fwd[:, 0] and star.graph["root"] not in fwd[:, 1]


def test_spectrum_known_answer():
    _, V = laplacian_eigs(tiny_graph("grid"))
    E = V[:, [1, 2, 5]] @ np.diag([2.0, 1.0, 0.5])  # energy 2, 1, 0.5 on v_2, v_3, v_6
    # a rotation of the columns changes nothing
    R = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    expect = np.zeros(15)
    expect[[0, 1, 4]] = [1.0, 0.5, 0.25]
    assert np.allclose(tg.spectrum(E, V), expect)
    assert np.allclose(tg.spectrum(E @ R, V), expect)


def test_geometric_margin_known_answers():
    A = nx.to_numpy_array(nx.cycle_graph(6))
    edges = np.argwhere(A > 0)
    lam, U = np.linalg.eigh(A)
    s = np.linspace(1.0, 2.0, 6)  # distinct singular values: E's right singular vectors are the axes
    R = np.linalg.qr(np.random.default_rng(1).normal(size=(6, 6)))[0]
    # geometric storage: E = U diag(s) R, W diagonal in E's singular basis, E W E^T = A
    E = U @ np.diag(s) @ R
    W = R.T @ np.diag(lam / s ** 2) @ R
    assert np.allclose(E @ W.T @ E.T, A)
    assert np.isclose(edge_margin(tg.geometric_logits(E, W), edges), 1.0)
    # associative storage: one-hot embeddings, W = A. W's diagonal is 0, so the geometric model has
    # all-zero logits
    assert np.isclose(edge_margin(tg.geometric_logits(np.eye(6), A), edges), 0.0)
    assert np.isclose(edge_margin(A, edges), 1.0)
    # the margin is per row and the worst row counts; the self logit is ignored
    L = A.copy() + 10 * np.eye(6)
    L[2, 5] = 1.5  # row 2: a non-neighbour above its neighbours
    assert np.isclose(edge_margin(L, edges), -0.5)
    # the release's margin: mean over rows of best neighbour minus best non-neighbour
    assert np.isclose(edge_margin_authors(L, edges), (5 * 1.0 - 0.5) / 6)
    L[2, 1] = 3.0  # one neighbour of row 2 high again: its best neighbour wins, its worst still loses
    assert np.isclose(edge_margin_authors(L, edges), (5 * 1.0 + 1.5) / 6)
    assert np.isclose(edge_margin(L, edges), -0.5)
    # extra columns (special tokens) are non-targets: one above every neighbour sinks that row
    wide = np.concatenate([A, np.zeros((6, 2))], 1)
    wide[0, 7] = 2.0
    assert np.isclose(edge_margin(wide, edges), -1.0)
    assert np.isclose(edge_margin_authors(wide, edges), (5 - 1) / 6)


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_constant_or_nan_logits_store_nothing(value):
    edges = np.argwhere(nx.to_numpy_array(nx.cycle_graph(6)) > 0)
    L = np.full((6, 6), value)
    assert logit_recall(L, edges) == 0.0
    assert edge_margin(L, edges) <= 0 and edge_margin_authors(L, edges) <= 0
    if value != value:  # NaN: no number at all
        assert edge_margin(L, edges) == -np.inf


def test_geometric_level_and_logit_recall():
    E = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    assert np.isclose(geometric_level(E, [(0, 1), (1, 2), (3, 3)]), np.sqrt(0.5))
    edges = np.array([[0, 1], [1, 0], [1, 2], [2, 1]])
    assert logit_recall(E @ E.T, edges) == 1.0  # self logits excluded
    L = E @ E.T
    L[0, 3] = 5.0  # row 0: a non-neighbour above its only neighbour
    assert logit_recall(L, edges) == 0.75


def test_tinynn_matches_logit_formula():
    vocab = Vocab(5)
    net = tg.TinyNN(tg.TinyNNConfig(vocab.size, 8))
    edges = np.array([[0, 1], [3, 4]])
    X, Y = edge_group(edges, vocab)
    logits, loss = net(X, Y[:, -1:])  # the loss sits on the last token, v
    Ew, W = net.wte.weight, net.W.weight
    assert torch.allclose(logits[:, 0], Ew[[0, 3]] @ W.T @ Ew.T, atol=1e-6) and loss.item() > 0
    assert net(X).shape == (2, vocab.size)


@pytest.mark.parametrize("model", ["associative_nn", "associative_gpt", "associative_ssm"])
def test_associative_control_keeps_embeddings_fixed(model):
    graph = tiny_graph("cycle")
    args = tg.get_args(["--steps-scale", "0.002"])
    edges = tg.edge_examples(graph)
    vocab = Vocab(15)
    torch.manual_seed(args.seed)
    before = token_embeddings(tg.build(model, vocab, 32), 15)  # fit seeds the same way before building
    E, _ = tg.fit(model, graph, "cycle", args, "cpu", edges, width=32, steps=20)
    assert np.array_equal(E, before)


def test_wide_associative_nn_learns_edges_fast():
    graph = tiny_graph("grid")
    args = tg.get_args([])
    edges = tg.edge_examples(graph)
    _, history = tg.fit("associative_nn", graph, "grid", args, "cpu", edges, eval_every=1)
    assert history[-1]["epoch"] == 10 and history[-1]["edge_recovery"] == 1.0


def test_smoke(tmp_path):
    m = tg.main(["--quick", "--graph", "cycle", "path_star", "--study", "main", "regularizers", "--out",
                 str(tmp_path)])
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    assert set(saved["results"]) == {"cycle", "path_star"} and set(saved["results"]["cycle"]) == set(tg.MODELS)
    assert set(saved) <= guide_top_keys("exp_tiny_graphs.py")  # docs/reading_a_run.md names each
    for r in saved["results"]["cycle"].values():
        assert 0 <= r["edge_recovery"] <= 1 and -1 <= r["geometric_level"] <= 1 and len(r["spectrum"]) == 14
    assert saved["results"]["cycle"]["tinynn"]["geometric_margin"] is not None
    assert saved["results"]["cycle"]["tinygpt"]["geometric_margin"] is None
    assert np.load(tmp_path / "embeddings" / "path_star_tinygpt.npy").shape == (17, 32)
    with open(tmp_path / "graphs" / "cycle.json") as f:
        assert json.load(f)["num_nodes"] == 15
    for png in ("heatmaps", "embeddings_3d", "spectrum", "fig1", "regularizers_3d"):
        assert figure_ok(tmp_path / f"{png}.png")
    assert set(m["regularizers"]) == set(tg.REGULARIZERS)


def test_speed_study_tracks_margin_over_training(tmp_path):
    m = tg.main(["--quick", "--graph", "cycle", "--study", "speed", "--out", str(tmp_path)])
    hist = m["speed"]["cycle"]
    assert set(hist) == set(tg.SPEED_MODELS)
    assert hist["tinynn"][0]["epoch"] == 0 and len(hist["tinynn"]) > 2
    for model in ("tinynn", "associative_nn"):  # TinyNN models: the margin at every evaluation
        assert all(np.isfinite(h["geometric_margin"]) for h in hist[model])
    assert all("geometric_margin" not in h for h in hist["tinygpt"])
    assert figure_ok(tmp_path / "speed_cycle.png")


@pytest.mark.parametrize("argv,msg", [(["--graph", "torus"], "invalid choice"),
                                      (["--steps-scale", "0"], "--steps-scale must be > 0"),
                                      (["--seeds", "0", "1", "--parallel", "0"], "--parallel must be >= 1")])
def test_bad_flags_one_line(argv, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        tg.main(argv + ["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code != 0 and msg in err and err.count("\n") == 1


def test_authors_tinynn_recipe():
    """--tinynn-recipe authors: the release notebook's width, steps, cosine and a zero-initialized
    bias; both margins are reported at every evaluation."""
    assert tg.recipe("tinynn", "path_star", 1.0, "authors") == (32, 1e-2, 500, 0.1)
    assert tg.recipe("tinynn", "cycle", 1.0, "authors") == (512, 1e-2, 10000, 1.0)
    assert tg.recipe("tinynn", "grid", 1.0) == (512, 1e-2, 10000, 1.0)  # App. B.2.2: constant lr
    assert tg.recipe("tinygpt", "grid", 1.0, "authors") == (32, 1e-2, 500, 1.0)  # only TinyNN changes
    graph = tiny_graph("grid")
    args = tg.get_args(["--steps-scale", "0.02", "--tinynn-recipe", "authors"])
    _, history = tg.fit("tinynn", graph, "grid", args, "cpu", tg.edge_examples(graph), eval_every=5)
    assert [h["epoch"] for h in history] == [0, 5, 10]  # 500 x 0.02 steps
    assert all(np.isfinite(h["geometric_margin"]) and np.isfinite(h["geometric_margin_authors"])
               for h in history)
    net = tg.build("tinynn", Vocab(4), 8, bias=True)
    assert net.W.bias is not None and not net.W.bias.any()


def test_seed_rows_known_answers():
    """--seeds summarizes each run by these rows; a hand-made run with known answers."""
    speed = [{"epoch": 0, "edge_recovery": 0.5, "geometric_level": 0.1, "geometric_margin": -1.0},
             {"epoch": 100, "edge_recovery": 1.0, "geometric_level": 0.3, "geometric_margin": 2.0},
             {"epoch": 200, "edge_recovery": 1.0, "geometric_level": 0.2, "geometric_margin": -0.5}]
    metrics = {"results": {"cycle": {"tinynn": {"edge_recovery": 1.0, "geometric_level": 0.5,
                                                "geometric_margin": -1.0, "geometric_margin_authors": 2.0,
                                                "spectrum": [1.0, 0.8, 0.1, 0.3]},
                                     "tinygpt": {"edge_recovery": 0.9, "geometric_level": 0.4,
                                                 "geometric_margin": None, "spectrum": [1.0, 1.0, 1.0]}}},
               "speed": {"cycle": {"tinynn": speed,
                                   "tinygpt": [{k: v for k, v in h.items() if k != "geometric_margin"}
                                               for h in speed[:1]]}},
               "forward_only": {"grid": {"edge_recovery": 1.0, "geometric_level": 0.25, "spectrum": [1.0]}}}
    rows = tg.seed_rows(metrics)
    assert set(rows) == {"main", "speed", "forward-only"}  # no regularizer study ran
    assert rows["main"]["cycle tinynn"] == {"edge_recovery": 1.0, "geometric_level": 0.5,
                                            "geometric_margin": -1.0, "geometric_margin_authors": 2.0,
                                            "spectrum_bottom_half": 0.2}
    assert rows["main"]["cycle tinygpt"] == {"edge_recovery": 0.9, "geometric_level": 0.4,
                                             "spectrum_bottom_half": 1.0}  # the last 2 of 3
    assert rows["speed"]["cycle tinynn"] == {
        "first_step_all_edges": 100, "final_edge_recovery": 1.0, "peak_geometric_level": 0.3,
        "peak_level_step": 100, "final_geometric_level": 0.2, "evaluations_margin_positive": 1,
        "largest_margin_after_step_0": 2.0, "final_geometric_margin": -0.5}
    assert rows["speed"]["cycle tinygpt"]["first_step_all_edges"] is None  # never recovered every edge
    assert "evaluations_margin_positive" not in rows["speed"]["cycle tinygpt"]
    assert rows["forward-only"] == {"grid": {"edge_recovery": 1.0, "geometric_level": 0.25}}


def test_seeds_match_single_runs(tmp_path):
    """--seeds 0 1: each seed's folder is the run --seed S gives, and the summary holds their spread."""
    flags = ["--quick", "--graph", "cycle", "--study", "speed", "forward-only"]
    tg.main(flags + ["--seeds", "0", "1", "--out", str(tmp_path / "seeds")])
    single = tg.main(flags + ["--seed", "1", "--out", str(tmp_path / "single")])
    with open(tmp_path / "seeds" / "seed1" / "metrics.json") as f:
        seeded = json.load(f)
    no_clock_or_out = ("time_s", "wall_time_s", "config")  # config holds --out
    assert untimed(seeded, no_clock_or_out) == untimed(json.loads(json.dumps(single)), no_clock_or_out)
    with open(tmp_path / "seeds" / "metrics.json") as f:
        summary = json.load(f)["summary"]
    level = summary["forward-only: cycle"]["geometric_level"]
    assert level["values"]["1"] == single["forward_only"]["cycle"]["geometric_level"]
    assert level["min"] <= level["mean"] <= level["max"]
    assert summary["speed: cycle tinynn"]["final_edge_recovery"]["values"]["0"] == 1.0
    md = (tmp_path / "seeds" / "summary.md").read_text()
    assert "## speed" in md and "## forward-only" in md and "| cycle tinynn |" in md
    with open(tmp_path / "seeds" / "summary.csv") as f:
        assert f.readline().strip() == "row,metric,mean,min,max,seed0,seed1"


def test_graph_spectrum_reference_is_the_top_eigenvectors():
    """The reference panel of Figs. 17-20: no training, E = v_2, v_3, v_4, so its spectrum is 1 on
    those three and 0 on every other eigenvector."""
    graph = tiny_graph("grid")
    E, history = tg.fit("graph_spectrum", graph, "grid", tg.get_args([]), "cpu", tg.edge_examples(graph))
    spec = tg.spectrum(E, laplacian_eigs(graph)[1])
    assert E.shape == (16, 3) and np.allclose(spec[:3], 1) and np.allclose(spec[3:], 0, atol=1e-9)
    assert np.allclose(E.T @ E, np.eye(3)) and len(history) == 1
