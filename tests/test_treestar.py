import argparse
import json
import os

import networkx as nx
import pytest
import torch

import exp_pathstar
import exp_treestar
from common import tree_star
from conftest import figure_ok, guide_keys


@pytest.mark.parametrize("d,b,l", [(3, 2, 4), (5, 3, 3), (4, 1, 5), (2, 2, 2)])
def test_tree_star_shape(d, b, l):
    g, root, paths, edges = tree_star(d, b, l, seed=2)
    n = 1 + d * ((b ** (l - 1) - 1) // (b - 1) if b > 1 else l - 1)
    assert g.number_of_nodes() == n and nx.is_tree(g) and g.degree(root) == d
    depth = nx.single_source_shortest_path_length(g, root)
    leaves = [v for v in g if g.degree(v) == 1 and v != root]
    assert all(depth[v] == l - 1 for v in leaves) and len(paths) == len(leaves) == d * b ** (l - 2)
    for v in g:  # b children below every non-leaf node of depth >= 1
        children = [w for w in g[v] if depth[w] == depth[v] + 1]
        assert len(children) == (d if v == root else 0 if depth[v] == l - 1 else b)
    assert sorted(p[-1] for p in paths) == sorted(leaves)
    assert all(p[0] == root and all(g.has_edge(u, w) for u, w in zip(p, p[1:])) for p in paths)
    parent_first = ((u, w) if depth[u] < depth[w] else (w, u) for u, w in g.edges)
    assert sorted(map(tuple, edges.tolist())) == sorted(parent_first)


def test_splits_disjoint_and_first_token_has_no_shared_prefix():
    _, _, paths, _ = tree_star(8, 2, 5, seed=0)
    for split in ("first_token", "leaf"):
        train, test = exp_treestar.split_paths(paths, split, 0.75, seed=1)
        assert sorted(train + test) == sorted(paths)
        assert not {p[-1] for p in train} & {p[-1] for p in test}
    train, test = exp_treestar.split_paths(paths, "first_token", 0.75, seed=1)
    train_prefix_nodes = {v for p in train for v in p[1:]}
    assert all(not set(p[1:]) & train_prefix_nodes for p in test)  # no node below the root shared
    assert len({p[1] for p in train}) == 6 and len({p[1] for p in test}) == 2
    train, test = exp_treestar.split_paths(paths, "leaf", 0.75, seed=1)
    assert {p[1] for p in test} & {p[1] for p in train}  # split at the leaf: prefixes overlap


def test_treestar_smoke(tmp_path):
    out = tmp_path / "tree"
    exp_treestar.main(["--quick", "--n", "6", "--epochs", "2", "--eval-every", "1", "--out", str(out)])
    top = json.load(open(out / "metrics.json"))
    assert top["device"].startswith("cpu")  # the output contract: config, device, final, history
    assert set(top["final"]) == {"first_token", "leaf"}
    for split in ("first_token", "leaf"):
        m = json.load(open(out / split / "metrics.json"))
        assert m["final"]["chance_token_acc"] == [1.0, 1 / 6, 0.5, 0.5]
        assert len(m["final"]["test_token_acc"]) == 4
        assert "arm_mode_share" not in m["final"]  # a path-star measure: the tree's arms share nodes
        shown = {k for k, when in guide_keys("The measures of an evaluation").items()  # docs/reading_a_run.md
                 if when in ("always", "l >= 4", "GPT, forward paths", "exp_treestar")}
        assert set(m["final"]) == shown
        g = json.load(open(out / split / "graph.json"))
        assert g["split"] == split and len(g["all_paths"]) == 6 * 4
        assert set(g["train_leaves"]) | set(g["test_leaves"]) == {p[-1] for p in g["all_paths"]}
    for fig in ("splits.png", "depth_accuracy.png", "tree.png"):
        assert figure_ok(out / fig)
    # the reading guide's way to reload a split's run: its measures recomputed are the logged ones
    leaf = str(out / "leaf")
    model, data, args = exp_pathstar.load_run(leaf, build_data=lambda a: exp_treestar.build(a, a.split))
    measured = exp_pathstar.make_evaluate(data, args, "cpu", exp_treestar.tree_measure(data, args))(model)
    assert measured == json.load(open(os.path.join(leaf, "metrics.json")))["final"]


def test_treestar_bad_branching(capsys):
    with pytest.raises(SystemExit):
        exp_treestar.main(["--quick", "--b", "0", "--out", "/tmp/unused_tree"])
    assert "--b must be" in capsys.readouterr().err


def test_treestar_zigzag_penalty_is_a_flag_error(tmp_path, capsys):
    """Arm modes need arms that meet only at the root; a tree's share nodes: one line, no traceback."""
    with pytest.raises(SystemExit) as e:
        exp_treestar.main(["--quick", "--n", "6", "--epochs", "1", "--zigzag-penalty", "1",
                           "--out", str(tmp_path)])
    err = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error" in l]
    assert e.value.code != 0 and len(err) == 1 and "--zigzag-penalty needs a path-star" in err[0]


def test_treestar_empty_split_is_a_flag_error(tmp_path, capsys):
    """Two root children cannot be split 75/25: one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        exp_treestar.main(["--quick", "--n", "2", "--b", "1", "--l", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "empty split" in err[0]


def test_last_hop_sibling_measure_known_answer():
    """Of three held-out paths, one ends on its trained sibling leaf, one on its own leaf, one on a
    trained leaf under another parent: share 1/3."""
    args = argparse.Namespace(n=2, b=2, l=3, reverse_path=False)
    _, root, paths, _ = tree_star(2, 2, 3, seed=0)  # 2 children, 2 leaves each
    data = {"arms": paths, "train_arms": [paths[0], paths[2]]}
    measure = exp_treestar.tree_measure(data, args)
    test = torch.tensor([paths[1], paths[1], paths[3]])  # paths[1]'s sibling is paths[0] (trained)
    predicted = test.clone()
    predicted[0, -1] = paths[0][-1]  # the trained sibling
    predicted[2, -1] = paths[0][-1]  # trained, but under the other parent
    got = measure("test", predicted, test)
    assert got["test_last_hop_trained_sibling"] == pytest.approx(1 / 3)
    assert got["chance_token_acc"] == [1.0, 0.5, 0.5] and measure("train", predicted, test) == {}


def test_treestar_seeds(tmp_path):
    out = tmp_path / "seeds"
    exp_treestar.main(["--quick", "--n", "6", "--epochs", "2", "--eval-every", "1", "--split", "leaf",
                       "--seeds", "0", "1", "--out", str(out)])
    m = json.load(open(out / "metrics.json"))
    assert m["device"].startswith("cpu")
    v = [json.load(open(out / f"seed{s}" / "leaf" / "metrics.json"))["final"]["test_last_hop_trained_sibling"]
         for s in (0, 1)]
    assert m["splits"]["leaf"]["test_last_hop_trained_sibling"]["mean"] == pytest.approx(sum(v) / 2)
    assert (out / "summary.csv").exists() and figure_ok(out / "summary.png")


def test_treestar_sweep_on_one_split(tmp_path, capsys):
    """exp_pathstar's sweeps run on a tree split, with the tree's own measure in every arm."""
    with pytest.raises(SystemExit):
        exp_treestar.main(["--quick", "--sweep", "frozen", "--out", str(tmp_path / "both")])
    assert "one split" in capsys.readouterr().err
    out = tmp_path / "sweep"
    rows = exp_treestar.main(["--quick", "--n", "6", "--epochs", "2", "--eval-every", "1", "--split", "leaf",
                              "--sweep", "frozen", "--out", str(out)])
    assert [r["arm"] for r in rows] == ["trained", "frozen"]
    m = json.load(open(out / "frozen" / "metrics.json"))
    assert m["config"]["split"] == "leaf" and "test_last_hop_trained_sibling" in m["final"]
    g = json.load(open(out / "frozen" / "graph.json"))
    assert g["split"] == "leaf" and g["branching"] == 2
