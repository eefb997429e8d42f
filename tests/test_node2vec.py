import json
import os

import networkx as nx
import numpy as np
import pytest
import torch

import exp_node2vec
from common import (TINY_GRAPHS, Node2Vec, Node2VecConfig, adjacency, coefficient_matrix, grid_graph,
                    laplacian_eigs, neg_laplacian, neighbour_targets, principal_angles, spectral_energy,
                    tiny_graph, train_node2vec, with_self_edges)
from conftest import figure_ok, guide_top_keys, untimed


# ----------------------------------------------------------------------------- spectra


def test_cycle_eigenvectors_are_fourier_modes():
    N = 15
    evals, V = laplacian_eigs(nx.cycle_graph(N))
    n = np.arange(N)
    freq = np.array([min(j, N - j) for j in range(N)])
    assert np.allclose(evals, np.sort(2 * np.cos(2 * np.pi * freq / N) - 2)[::-1])  # D = 2I: A - 2I
    assert np.allclose(np.abs(V[:, 0]), 1 / np.sqrt(N))  # the top one is constant
    for i in range(N):  # each eigenvector lies in the span of the cos / sin mode of its frequency
        j = int(round(np.arccos(np.clip(evals[i] / 2 + 1, -1, 1)) * N / (2 * np.pi)))
        modes = np.stack([np.cos(2 * np.pi * j * n / N), np.sin(2 * np.pi * j * n / N)], 1)
        Q = np.linalg.qr(modes[:, : 1 if j == 0 else 2])[0]
        assert np.linalg.norm(V[:, i] - Q @ (Q.T @ V[:, i])) < 1e-8


def test_sparse_eigensolver_matches_dense():
    g = grid_graph(8, 9)
    evals, V = laplacian_eigs(g)
    k = next(k for k in range(5, 20) if evals[k - 1] - evals[k] > 1e-6)  # do not split a degenerate pair
    evals_s, V_s = laplacian_eigs(g, k=k, dense_max=10)
    assert np.allclose(evals_s, evals[:k], atol=1e-8)
    assert principal_angles(V_s, V[:, :k]).max() < 1e-5


def test_principal_angles():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 4))
    assert np.allclose(principal_angles(X, X @ rng.normal(size=(4, 4))), 0, atol=1e-7)  # same span
    e = np.eye(20)
    assert np.allclose(principal_angles(e[:, :2], e[:, 2:4]), np.pi / 2)
    theta = 0.3
    rotated = np.cos(theta) * e[:, [0]] + np.sin(theta) * e[:, [1]]
    assert np.allclose(principal_angles(e[:, [0]], rotated), theta)


@pytest.mark.parametrize("self_edges", [False, True])
def test_gradient_is_C_E(self_edges):
    """App. F Lemma 1: the mean loss has gradient -C E / N, C = D^-1 A + A D^-1 - P - P^T."""
    g = nx.connected_watts_strogatz_graph(12, 4, 0.5, seed=1)
    g = with_self_edges(g) if self_edges else g
    A = adjacency(g)
    torch.manual_seed(0)
    model = Node2Vec(Node2VecConfig(12, width=7, init_std=0.5)).double()
    loss = model(neighbour_targets(A).double())
    loss.backward()
    E = model.E.detach().numpy()
    L = E @ E.T
    P = np.exp(L - L.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    assert np.allclose(model.E.grad.numpy(), -coefficient_matrix(A, P) @ E / 12, atol=1e-10)


def test_C_starts_as_negative_laplacian():
    """App. F Fact 1: a wide init makes P ~ I, so C(0) ~ D^-1 A + A D^-1 - 2I."""
    A = adjacency(tiny_graph("grid"))
    torch.manual_seed(0)
    E = Node2Vec(Node2VecConfig(16, width=2000)).E.detach().double().numpy()
    L = E @ E.T
    P = np.exp(L - L.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    assert np.abs(coefficient_matrix(A, P) - neg_laplacian(A)).max() < 1e-6


def test_short_run_on_cycle_finds_top_eigenvectors():
    g = nx.cycle_graph(15)
    evals, V = laplacian_eigs(g)
    torch.manual_seed(0)
    model = Node2Vec(Node2VecConfig(15, width=64))
    records = train_node2vec(model, neighbour_targets(adjacency(g)), 600, 1e-2, snapshot_steps=[0])
    E0, E = (r["params"]["E"].numpy() for r in records)
    assert spectral_energy(E0, V)[:3].sum() < 0.4  # random: 3/15 of the energy
    assert spectral_energy(E, V)[:3].sum() > 0.9  # constant + the first Fourier pair
    assert [r["step"] for r in records] == [0, 600] and records[-1]["loss"] < records[0]["loss"]


def test_untied_model_and_gd():
    A = adjacency(tiny_graph("cycle"))
    torch.manual_seed(0)
    model = Node2Vec(Node2VecConfig(15, width=8, tied=False))
    assert model.logits().shape == (15, 15) and model.F is not None
    first, last = train_node2vec(model, neighbour_targets(A), 50, 0.5, optimizer="gd", snapshot_steps=[0])
    assert set(last["params"]) == {"E", "F"} and last["loss"] < first["loss"]
    assert first["update_norm"] > 0 and last["update_norm"] == 0


def test_summed_loss_is_the_mean_at_lr_times_n():
    """The release's Node2Vec: gradient descent on the loss summed over sources. With gd this is
    the mean's run at lr x N, step for step."""
    A = adjacency(tiny_graph("cycle"))
    runs = []
    for lr, loss_sum in ((0.01, True), (0.01 * 15, False)):
        torch.manual_seed(0)
        model = Node2Vec(Node2VecConfig(15, width=8))
        runs.append(train_node2vec(model, neighbour_targets(A), 20, lr, optimizer="gd", loss_sum=loss_sum)[-1])
    assert torch.allclose(runs[0]["params"]["E"], runs[1]["params"]["E"], atol=1e-5)
    assert runs[0]["loss"] == pytest.approx(15 * runs[1]["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- the script


def test_smoke(tmp_path):
    out = str(tmp_path / "run")
    exp_node2vec.main(["--quick", "--steps", "40", "--snapshots", "6", "--graph", "cycle", "path_star_large",
                       "--widths", "8", "32", "--out", out])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert set(m) >= {"config", "results", "wall_time_s", "complexity"}
    assert set(m) <= guide_top_keys("exp_node2vec.py")  # docs/reading_a_run.md names each
    assert m["config"]["steps"] == 40 and m["config"]["large_star"] == [8, 6]
    for name, N in (("cycle", 15), ("path_star_large", 41)):
        r = m["results"][name]
        assert set(r) == {"main", "dynamics", "width", "untied"}
        # a share, up to rounding
        assert 0 <= r["main"]["energy_top_k"] <= 1 + 1e-12 and 1 <= r["main"]["k"] <= N
        assert [w["width"] for w in r["width"]] == [8, 32]
        assert set(r["untied"]) == set(exp_node2vec.UNTIED_VARIANTS)
        assert r["untied"]["tied"]["negative_logit_share"] < 1e-6  # E E^T is PSD
        assert np.load(os.path.join(out, "embeddings", f"{name}.npy")).shape == (N, 100)
        for variant in ("untied", "untied_self_edges", "tied_self_edges"):
            assert np.load(os.path.join(out, "embeddings", f"{name}_{variant}.npy")).shape == (N, 100)
        g = json.load(open(os.path.join(out, "graphs", f"{name}.json")))
        assert g["num_nodes"] == N and len(g["edges"]) == N - (name != "cycle")
        loops = json.load(open(os.path.join(out, "graphs", f"{name}_self_edges.json")))
        assert len(loops["edges"]) == len(g["edges"]) + N
        assert figure_ok(os.path.join(out, f"dynamics_{name}.png"))
        assert figure_ok(os.path.join(out, f"untied_{name}.png"))
    for fig in ("spectrum.png", "embeddings.png", "dynamics_summary.png", "width.png", "untied_spectrum.png"):
        assert figure_ok(os.path.join(out, fig))
    assert "| cycle | 15 | 15 |" in open(os.path.join(out, "complexity.md")).read()


def test_graph_and_study_selection():
    studies, graphs, extra = exp_node2vec.plan(exp_node2vec.get_args(["--study", "untied"]))
    assert studies == {"main", "untied"}  # main always runs
    assert graphs == list(exp_node2vec.GRAPHS) and extra == list(TINY_GRAPHS)
    args = exp_node2vec.get_args(["--graph", "grid_large", "cycle", "cycle"])
    studies, graphs, extra = exp_node2vec.plan(args)
    assert studies == set(exp_node2vec.STUDIES) and graphs == extra == ["grid_large", "cycle"]


@pytest.mark.parametrize("argv,msg", [(["--steps", "0"], "--steps"), (["--graph", "torus"], "invalid choice"),
                                      (["--widths", "0"], "widths"),
                                      (["--seeds", "0", "1", "--parallel", "0"], "--parallel must be >= 1")])
def test_bad_flags_one_line(argv, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        exp_node2vec.main(argv + ["--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "bad")


def test_seeds_match_single_runs(tmp_path):
    """--seeds 0 1: each seed's folder is the run --seed S gives, and the summary holds their spread."""
    flags = ["--quick", "--steps", "40", "--snapshots", "6", "--graph", "path_star", "--study", "untied"]
    exp_node2vec.main(flags + ["--seeds", "0", "1", "--out", str(tmp_path / "seeds")])
    exp_node2vec.main(flags + ["--seed", "1", "--out", str(tmp_path / "single")])
    seeded, single = (json.load(open(tmp_path / d / "metrics.json"))
                      for d in (os.path.join("seeds", "seed1"), "single"))
    drop = ("time_s", "wall_time_s", "study_time_s", "config")
    assert untimed(seeded, drop) == untimed(single, drop)
    summary = json.load(open(tmp_path / "seeds" / "metrics.json"))["summary"]
    share = summary["untied: path_star untied"]["negative_logit_share"]
    assert share["values"]["1"] == single["results"]["path_star"]["untied"]["untied"]["negative_logit_share"]
    assert summary["untied: path_star tied"]["negative_logit_share"]["max"] == 0.0  # E E^T is PSD
    assert "## untied" in (tmp_path / "seeds" / "summary.md").read_text()
    assert figure_ok(tmp_path / "seeds" / "dynamics_summary.png")  # the seeds' band


def test_seed_rows_known_answers():
    """--seeds summarizes the main study's measures, with the complexity table's trained column
    (‖E‖²/margin; none without a positive margin), and only the studies that ran."""
    results = {"grid": {"main": {"k": 3, "loss": 1.5, "E_norm": 2.0, "margin": 0.5, "num_nodes": 16}},
               "cycle": {"main": {"k": 2, "loss": 1.0, "E_norm": 1.0, "margin": -0.1}}}
    assert exp_node2vec.seed_rows(results) == {"main": {
        "grid": {"k": 3, "loss": 1.5, "norm2_per_margin": 8.0},
        "cycle": {"k": 2, "loss": 1.0, "norm2_per_margin": None}}}
    trained = {**results["grid"]["main"], "edge_recall": 1.0}
    row = exp_node2vec.complexity_row("grid", grid_graph(4, 4), trained)
    assert row["geo_norm2_measured"] == 8.0
    assert (row["nodes"], row["edges"], row["assoc_norm2"], row["geo_norm2_lower"]) == (16, 24, 48, 16)
