import argparse
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import exp_pathstar
from common import make_optimizer
from conftest import figure_ok, guide_keys, untimed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--quick", "--n", "24", "--l", "4", "--n-embd", "32", "--n-head", "2"]
QUICK_LAYERS = exp_pathstar.QUICK["n_layer"]


def run_cli(args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "exp_pathstar.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, **kw)


def test_quick_smoke(tmp_path):
    out = str(tmp_path / "run")
    exp_pathstar.main(["--quick", "--first-token-only", "--epochs", "4", "--eval-every", "2", "--out", out])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert set(m) >= {"config", "final", "history", "wall_time_s"}
    assert m["config"]["first_token_only"] and m["config"]["n"] == exp_pathstar.QUICK["n"]
    assert [h["epoch"] for h in m["history"]] == [2, 4]
    for key in ("test_first_token_acc", "test_path_acc", "train_first_token_acc", "train_path_acc",
                "edge_acc", "chance_first_token"):
        assert 0 <= m["final"][key] <= 1
    assert m["final"]["chance_first_token"] == pytest.approx(1 / exp_pathstar.QUICK["n"])
    assert len(m["final"]["test_token_acc"]) == len(m["final"]["test_token_acc_tf"]) == exp_pathstar.QUICK["l"]
    g = json.load(open(os.path.join(out, "graph.json")))
    n = exp_pathstar.QUICK["n"]
    assert g["num_nodes"] == 1 + n * (exp_pathstar.QUICK["l"] - 1)
    assert len(g["arms"]) == n and all(a[0] == g["root"] for a in g["arms"])
    assert len(g["train_leaves"]) + len(g["test_leaves"]) == n
    assert not set(g["test_leaves"]) & {v for p in g["train_paths"] for v in p}
    assert len(g["edge_examples"]) == 2 * n * (exp_pathstar.QUICK["l"] - 1)
    emb = np.load(os.path.join(out, "embeddings.npy"))
    assert emb.shape == (g["num_nodes"], exp_pathstar.QUICK["n_embd"])
    for fig in ("accuracy.png", "token_accuracy.png"):
        assert figure_ok(os.path.join(out, fig))
    for h in m["history"]:  # the logit lens's last block is the model's own first-token prediction
        assert len(h["first_hop_by_block"]) == len(h["leaf_neighbour_by_block"]) == QUICK_LAYERS + 1
        assert h["first_hop_by_block"][-1] == h["test_first_token_acc"]
        shares = h["first_hop_answer_shares"]  # right, lookup, another trained first node, other
        assert shares[0] == h["test_first_token_acc"] and sum(shares) == pytest.approx(1)


def test_staged_and_variants_run(tmp_path):
    out = str(tmp_path / "staged")
    hist = exp_pathstar.main(TINY + ["--recipe", "staged", "--edge-epochs", "2", "--edge-batch-size", "64",
                                     "--epochs", "2", "--eval-every", "1", "--reverse-path",
                                     "--edges", "backward", "--pauses", "0", "--freeze-embeddings",
                                     "--out", out])["history"]
    assert [(h["epoch"], h["phase"]) for h in hist] == [(1, "edges"), (2, "edges"), (3, "paths"), (4, "paths")]


def test_untied_head_trains_packed_like_unpacked(tmp_path, monkeypatch):
    """--untied-head: its own output weight in the checkpoint, and the packed step (one forward,
    shared first tokens) is the same step as the unpacked one with it too."""
    monkeypatch.setattr(common, "peak_matmul_flops", lambda device: 3e9)
    out = str(tmp_path / "bench")
    exp_pathstar.main(TINY + ["--bench", "--first-token-only", "--untied-head", "--freeze-embeddings",
                              "--bench-modes", "eager", "eager+packed", "--out", out])
    modes = json.load(open(os.path.join(out, "bench.json")))["modes"]
    assert modes["eager+packed"]["weights_off_first_mode"] < 1e-4
    assert modes["eager"]["loss"] == pytest.approx(modes["eager+packed"]["loss"], rel=1e-5)
    run = str(tmp_path / "run")
    metrics = exp_pathstar.main(TINY + ["--untied-head", "--epochs", "1", "--eval-every", "1", "--out", run])
    state = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)["model"]
    assert state["lm_head.weight"].shape == state["wte.weight"].shape
    assert not torch.equal(state["lm_head.weight"], state["wte.weight"])
    # the leaf's input row against the first nodes' output rows, measured from the weights saved
    g = json.load(open(os.path.join(run, "graph.json")))
    N, arms = g["num_nodes"], g["arms"]
    held = [a for a in arms if a[-1] in set(g["test_leaves"])]
    want = common.navigation_score(state["wte.weight"][:N], held, arms,
                                   target_emb=state["lm_head.weight"][:N])
    f = metrics["history"][-1]
    assert (f["head_navigation_acc"], f["head_navigation_mean_rank"]) == pytest.approx(want)
    want = common.hop_cosine(state["wte.weight"][:N], held, state["lm_head.weight"][:N])
    assert (f["head_hop_cosine"], f["head_cross_arm_cosine"]) == pytest.approx(want)
    assert len(f["head_hop_cosine"]) == len(f["hop_cosine"]) + 1  # h = 0 too: a node's own two rows
    model = exp_pathstar.load_run(run)[0]  # the edge query of each leaf against the output rows
    queries = common.edge_queries(model, common.Vocab(N), "cpu")
    want = common.navigation_score(queries, held, arms, target_emb=state["lm_head.weight"][:N])
    assert (f["edge_query_navigation_acc"], f["edge_query_navigation_mean_rank"]) == pytest.approx(want)
    assert 0 <= f["head_zigzag_share"] <= 1
    assert figure_ok(os.path.join(run, "embedding_heatmap_head.png"))


def test_bench_writes_json(tmp_path, monkeypatch):
    out = str(tmp_path / "bench")
    peaks = iter([1e9, 3e9])  # the peak is measured before and after the steps; the better counts
    monkeypatch.setattr(common, "peak_matmul_flops", lambda device: next(peaks))
    exp_pathstar.main(TINY + ["--bench", "--first-token-only", "--epochs", "7", "--out", out])
    b = json.load(open(os.path.join(out, "bench.json")))
    assert b["peak_flops_per_s"] == 3e9
    assert set(b["modes"]) == {"eager", "compiled", "eager+packed", "compiled+packed"}  # no CUDA graphs here
    assert [m["packed"] for m in b["modes"].values()] == [False, False, True, True]
    assert b["torch"] == torch.__version__  # the CUDA-only fast paths are off on the CPU, and say so
    assert not any(m["triton_attention"] or m["bf16_weights"] for m in b["modes"].values())
    # G(24, 4): 144 edge examples (both directions) and 18 training leaves; batch 256 holds all
    assert b["steps_per_epoch"] == 1 and b["batch_size"] == 256
    model = exp_pathstar.make_model(argparse.Namespace(**b["config"]), 24 * 3 + 1 + 5)
    want = model.flops(144, 2, 144) + model.flops(18, 2 + 4 + 1, 18)  # edges; [PATH] leaf 4 pauses root
    assert b["flops_per_step"] == want
    # packed, heads shared: [EDGE] and 6 edges' second tokens to a row of 7 (24 rows), paths as they were
    want_packed = model.flops(24 + 18, 7, 162)
    for m in b["modes"].values():
        assert m["tokens_per_step"] == ((24 + 18) * 7 if m["packed"] else 144 * 2 + 18 * 7)
        assert m["flops_per_step"] == (want_packed if m["packed"] else want)
        assert m["ms_per_epoch"] == pytest.approx(m["ms_per_step"])
        assert m["seqs_per_s"] == pytest.approx(162 / m["ms_per_step"] * 1e3)
        assert m["mfu"] == pytest.approx(m["flops_per_step"] / m["ms_per_step"] * 1e3 / b["peak_flops_per_s"])
        assert m["projected_train_minutes"] == pytest.approx(7 * m["ms_per_epoch"] / 6e4)
        # the profile of a step: every op by self time, the most first, the matmuls among them; the
        # busy time is their sum, top_ops the first 12; kernels are counted on CUDA only
        times = [ms for _, ms, _ in m["ops"]]
        assert times == sorted(times, reverse=True) and sum(times) == pytest.approx(m["busy_ms_per_step"])
        assert m["top_ops"] == m["ops"][:12] and len(m["ops"]) > 12 and m["kernels_per_step"] is None
        assert any(name in ("aten::mm", "aten::addmm", "aten::bmm") for name, _, _ in m["top_ops"])
    # packing runs the model once per step instead of once per group: about half the ops
    ops = {k: m["aten_ops_per_step"] for k, m in b["modes"].items()}
    assert ops["compiled"] is None and ops["eager+packed"] < 0.6 * ops["eager"]
    # every mode trains the same rows from the same weights: the same losses and weights (fp32 here)
    losses = [m["loss"] for m in b["modes"].values()]
    assert 1 < losses[0] < 10 and losses == pytest.approx([losses[0]] * 4, rel=1e-5)
    assert [m["weights_off_first_mode"] < 1e-4 for m in b["modes"].values()] == [True] * 4
    assert b["modes"]["eager"]["weights_off_first_mode"] == 0
    assert all(m["weights_off_reference"] is None for m in b["modes"].values())
    # --bench-modes: one mode alone, the same loss as in the run of all four, and the same weights
    # as the first mode's there (--bench-reference); from another seed's start, far from them
    monkeypatch.setattr(common, "peak_matmul_flops", lambda device: 3e9)
    for seed, name in ((0, "compiled+packed"), (1, "eager")):
        one = str(tmp_path / f"seed{seed}")
        exp_pathstar.main(TINY + ["--bench", "--first-token-only", "--bench-modes", name, "--seed", str(seed),
                                  "--bench-reference", os.path.join(out, "bench_weights.pt"), "--out", one])
        [(got, m)] = json.load(open(os.path.join(one, "bench.json")))["modes"].items()
        assert got == name and (m["weights_off_reference"] < 1e-4) == (seed == 0)
        assert seed == 1 or m["loss"] == pytest.approx(losses[3], rel=1e-6)
    assert m["weights_off_reference"] > 10  # the update of 7 steps is small against another init


def test_bench_flags_one_line_errors(tmp_path, capsys):
    other, junk, ckpt = tmp_path / "other.pt", tmp_path / "junk.pt", tmp_path / "ckpt.pt"
    torch.save(torch.zeros(5), other)
    junk.write_text("not a torch file")
    torch.save({"model": {}}, ckpt)
    for flags, msg in ((["--bench", "--bench-modes", "graph"], "no mode graph on this device; its modes: "
                        "eager compiled eager+packed compiled+packed"),
                       (["--bench-modes", "eager"], "--bench-modes and --bench-reference need --bench"),
                       (["--bench", "--bench-reference", "none.pt"], "--bench-reference: no file none.pt"),
                       (["--bench", "--bench-reference", str(other)], "--bench-reference: 5 weights there"),
                       (["--bench", "--bench-reference", str(junk)], "--bench-reference: cannot read"),
                       (["--bench", "--bench-reference", str(ckpt)], "is not a bench's bench_weights.pt")):
        with pytest.raises(SystemExit) as e:
            exp_pathstar.main(TINY + flags + ["--out", str(tmp_path)])
        assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("flags,msg", [
    (["--n", "0"], "--n must be"),
    (["--l", "1"], "--l must be"),
    (["--epochs", "-3"], "--epochs must be"),
    (["--decay-epochs", "0"], "--decay-epochs must be"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--n", "abc"], "invalid int value"),
    (["--n", "3", "--train-frac", "0.1"], "empty split"),
    (["--aux-weight", "-1"], "--aux-weight must be >= 0"),
    (["--zigzag-penalty", "-1"], "--zigzag-penalty must be >= 0"),
    (["--zigzag-penalty", "1", "--zigzag-penalty-on", "both"], "--zigzag-penalty-on both needs"),
    (["--grad-noise", "-1"], "--grad-noise must be >= 0"),
    (["--grad-noise", "1", "--grad-noise-std", "f.pt"], "--grad-noise and --grad-noise-std: one of them"),
    (["--grad-noise-rows", "8", "--batch-size", "16"], "--grad-noise-rows needs whole-epoch batches"),
    (["--grad-noise-rows-at", "start"], "--grad-noise-rows-at needs --grad-noise-rows"),
    (["--grad-noise-rows-scrambled"], "--grad-noise-rows-scrambled needs --grad-noise-rows"),
    (["--n2v-steps", "0"], "--n2v-steps >= 1"),
    (["--spectral-k", "100000"], "--spectral-k must be at most"),
    (["--model", "mamba", "--pack"], "--pack needs --model gpt"),
    (["--model", "mamba", "--untied-head"], "--untied-head needs --model gpt"),
])
def test_bad_flags_exit_with_one_line(tmp_path, flags, msg, capsys):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("earlier")
    with pytest.raises(SystemExit) as e:
        exp_pathstar.main(TINY + flags + ["--out", str(out)])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert (out / "metrics.json").read_text() == "earlier"


def test_unwritable_out_and_missing_checkpoint(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        exp_pathstar.main(TINY + ["--out", str(blocker / "sub")])
    assert "cannot write to --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        exp_pathstar.main(TINY + ["--resume", "--out", str(tmp_path / "empty")])
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_error_has_no_traceback():
    r = run_cli(["--l", "1", "--out", "/tmp/unused"])
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_killed_run_resumes_to_the_same_history(tmp_path):
    flags = TINY + ["--epochs", "150", "--eval-every", "1", "--ckpt-every", "0"]
    full = str(tmp_path / "full")
    exp_pathstar.main(flags + ["--out", full])
    ref = json.load(open(os.path.join(full, "metrics.json")))["history"]

    part = str(tmp_path / "part")
    # the same thread count as this process (an earlier test may have changed it): another count is
    # another float order
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "exp_pathstar.py", *flags, "--out", part], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(part, "checkpoint.pt")
    while not os.path.exists(ckpt) and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=False)["epoch"]
    assert killed_at < 150 and not os.path.exists(os.path.join(part, "metrics.json"))

    with pytest.raises(SystemExit):  # a changed flag is refused
        exp_pathstar.main(TINY + ["--epochs", "99", "--eval-every", "1", "--resume", "--out", part])
    exp_pathstar.main(flags + ["--resume", "--out", part])
    got = json.load(open(os.path.join(part, "metrics.json")))["history"]
    assert len(got) == len(ref) == 150
    assert [h["epoch"] for h in got] == [h["epoch"] for h in ref]
    assert got[-1]["test_first_token_acc"] == ref[-1]["test_first_token_acc"]
    assert got[-1]["edge_acc"] == ref[-1]["edge_acc"]


def test_sweep_writes_arms_and_summary(tmp_path):
    out = tmp_path / "sweep"
    rows = exp_pathstar.main(TINY + ["--sweep", "frozen", "--epochs", "2", "--eval-every", "1",
                                     "--out", str(out)])
    assert [r["arm"] for r in rows] == ["trained", "frozen"]
    for arm in ("trained", "frozen"):
        m = json.load(open(out / arm / "metrics.json"))
        assert m["config"]["freeze_embeddings"] == (arm == "frozen") and m["config"]["sweep"] is None
        assert (out / arm / "graph.json").exists() and (out / arm / "embeddings.npy").exists()
    lines = (out / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("arm,test_first_token_acc,test_path_acc,navigation_acc")
    assert "epochs_to_50,epochs_to_90" in lines[0]
    assert len(lines) == 3 and figure_ok(out / "summary.png")
    again = exp_pathstar.main(TINY + ["--sweep", "frozen", "--epochs", "2", "--eval-every", "1",
                                      "--resume", "--out", str(out)])  # finished arms are kept
    assert again == rows


def one_thread_then_parallel(flags, tmp_path):
    """The run `flags` one after another with one thread (--out seq), then --parallel 2 (--out par)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = exp_pathstar.main(flags + ["--out", str(tmp_path / "seq")])
    finally:
        torch.set_num_threads(threads)
    return seq, exp_pathstar.main(flags + ["--parallel", "2", "--out", str(tmp_path / "par")])


def test_parallel_sweep_matches_sequential(tmp_path):
    """--parallel 2: each arm in its own process (one thread each here), the same results as one
    after another with one thread."""
    seq, par = one_thread_then_parallel(TINY + ["--sweep", "frozen", "--epochs", "3", "--eval-every", "1"],
                                        tmp_path)
    assert [r["arm"] for r in par] == ["trained", "frozen"]
    assert untimed(par) == untimed(seq)


def test_parallel_seeds_match_sequential(tmp_path):
    """--seeds 0 1 --parallel 2: each seed in its own process, the same runs and spread as one after
    another with one thread."""
    seq, par = one_thread_then_parallel(TINY + ["--epochs", "3", "--eval-every", "1", "--seeds", "0", "1"],
                                        tmp_path)
    assert list(par) == [0, 1]
    assert all(untimed(par[s]["history"]) == untimed(seq[s]["history"]) for s in (0, 1))
    spread = lambda run: untimed([json.load(open(tmp_path / run / "metrics.json"))["final"]])
    assert spread("par") == spread("seq") and figure_ok(tmp_path / "par" / "summary.png")


def test_edges_only_reports_geometry(tmp_path):
    out = tmp_path / "edges_only"
    exp_pathstar.main(TINY + ["--no-paths", "--epochs", "2", "--out", str(out)])
    f = json.load(open(out / "metrics.json"))["final"]
    assert 0 <= f["navigation_acc"] <= 1 and 1 <= f["navigation_mean_rank"] <= 24
    assert f["chance_navigation_mean_rank"] == 12.5
    # §4.4's arm modes, recorded from the embeddings the run saves
    arms = json.load(open(out / "graph.json"))["arms"]
    mu, share, _ = (x.tolist() for x in common.arm_spectrum(np.load(out / "embeddings.npy"), arms))
    assert len(share) == 3 and f["arm_mode_share"] == pytest.approx(share, abs=1e-6)  # a1, a2, leaf
    assert mu == pytest.approx([1.8028, 0.0, -1.8028], abs=1e-4)
    assert f["zigzag_share"] == pytest.approx(share[2], abs=1e-6)  # only the last mode is at mu < 0
    # the linear map is fitted on the training arms (no paths trained: the split still exists)
    g, emb = json.load(open(out / "graph.json")), np.load(out / "embeddings.npy")
    by_leaf = {a[-1]: a for a in arms}
    train, held = ([by_leaf[x] for x in g[k]] for k in ("train_leaves", "test_leaves"))
    nav = common.linear_navigation(emb, train, held, arms)
    assert (f["linear_navigation_acc"], f["linear_navigation_mean_rank"]) == pytest.approx(nav, abs=1e-6)
    nav = common.navigation_score(emb, held, arms, readout=common.zigzag_reflection(emb, arms))
    reflected = (f["reflected_navigation_acc"], f["reflected_navigation_mean_rank"])
    assert reflected == pytest.approx(nav, abs=1e-6)
    for fig in ("geometry.png", "embedding_heatmap.png"):
        assert figure_ok(out / fig)


def test_zigzag_penalty_removes_zigzags(tmp_path):
    """--zigzag-penalty adds the share of the node embeddings in the arm modes at mu < 0 to the loss:
    on G(24, 4) 30 epochs at weight 10 leave a fraction of what the same run keeps without it
    (measured: 0.020 against 0.192)."""
    share = lambda w: exp_pathstar.main(TINY + ["--epochs", "30", "--eval-every", "30", "--zigzag-penalty", w,
                                               "--out", str(tmp_path / w)])["history"][-1]["zigzag_share"]
    plain, penalized = share("0"), share("10")
    assert plain > 0.1 and penalized < 0.25 * plain


def test_zigzag_penalty_on_both_layers_of_an_untied_model(tmp_path):
    """--zigzag-penalty-on both also penalizes the untied output layer's node rows: their zigzag share
    ends a fraction of what the input-only penalty leaves there, while the input rows' stays low
    (measured on G(24, 4), 30 epochs at weight 10: output rows 0.023 against 0.273, input rows 0.022)."""
    last = lambda on: exp_pathstar.main(TINY + ["--epochs", "30", "--eval-every", "30", "--untied-head",
                                               "--zigzag-penalty", "10", "--zigzag-penalty-on", on,
                                               "--out", str(tmp_path / on)])["history"][-1]
    input_only, both = last("input"), last("both")
    assert input_only["head_zigzag_share"] > 0.1
    assert both["head_zigzag_share"] < 0.25 * input_only["head_zigzag_share"] and both["zigzag_share"] < 0.05


def test_grad_noise_adds_gaussian_noise_to_the_gradient():
    """gradient_noise's gradient is std x N(0, 1) in every coordinate, on top of the loss's own
    gradient, and fresh at every call."""
    torch.manual_seed(0)
    W, b = torch.zeros(300, 200, requires_grad=True), torch.ones(1000, requires_grad=True)
    noise = exp_pathstar.gradient_noise([W, b], [0.03, 0.03])
    (b.square().sum() + noise()).backward()
    first = torch.cat([W.grad.flatten(), b.grad - 2])  # the loss's gradient in b is 2 b = 2
    assert abs(first.std().item() - 0.03) < 0.0006 and abs(first.mean().item()) < 0.0006
    W.grad, b.grad = None, None
    noise().backward()
    second = torch.cat([W.grad.flatten(), b.grad])
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.02


def test_grad_noise_std_per_coordinate(tmp_path, capsys):
    """--grad-noise-std's file sets each coordinate's std (here 0 in one half of a weight, 0.05 in
    the other); a file without the model's names and shapes stops the run with one line."""
    torch.manual_seed(0)
    W = torch.zeros(400, 500, requires_grad=True)
    std = torch.cat([torch.zeros(200, 500), torch.full((200, 500), 0.05)])
    exp_pathstar.gradient_noise([W], [std])().backward()
    assert torch.equal(W.grad[:200], torch.zeros(200, 500))
    assert abs(W.grad[200:].std().item() - 0.05) < 0.001
    path = tmp_path / "std.pt"
    torch.save({"wte.weight": torch.ones(3, 3)}, path)
    with pytest.raises(SystemExit) as e:
        exp_pathstar.main(TINY + ["--epochs", "1", "--grad-noise-std", str(path), "--out", str(tmp_path)])
    assert e.value.code == 2 and "--grad-noise-std: " in capsys.readouterr().err


def tiny_model_and_groups():
    """A 1-layer GPT on G(6, 3), first-token-only, and its one phase's groups cut to their loss tokens:
    what the noise tests draw gradients from."""
    args = exp_pathstar.get_args(["--quick", "--first-token-only", "--n", "6", "--l", "3", "--n-embd",
                                  "16", "--n-head", "2", "--n-layer", "1"])
    data = exp_pathstar.build(args)
    model = exp_pathstar.make_model(args, data["vocab"].size)
    return model, [common.loss_tail(*g) for g in exp_pathstar.phases_for(data, args, "cpu")[0].groups]


def test_batch_noise_has_the_batches_covariance():
    """batch_noise's gradient is (c / n) sum_i (xi_i - mean xi) g_i over the rows' own gradients g_i
    (checked row by row for one draw), and its total variance over draws is that of the gradients of
    random batches of `rows` rows around the whole-epoch gradient (measured: 1.04 times it; without
    the factor (n - rows) / (n - 1) of drawing without replacement it would be 1.35)."""
    torch.manual_seed(0)
    model, groups = tiny_model_and_groups()
    X = [x for x, _ in groups for x in x.split(1)]  # the rows, one by one (one loss token each here)
    Y = [y for _, y in groups for y in y.split(1)]
    n, rows = len(X), 8
    params = list(model.parameters())

    def grad(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params])
    g = torch.stack([grad(model(x, y)[1]) for x, y in zip(X, Y)])  # each row's gradient
    noise = exp_pathstar.batch_noise(model, groups, rows)
    torch.manual_seed(1)
    drawn = grad(noise())
    torch.manual_seed(1)
    xi = torch.randn(n)
    c = (n * (n - rows) / ((n - 1) * rows)) ** 0.5
    assert torch.allclose(drawn, c * ((xi - xi.mean())[:, None] * g).sum(0) / n, atol=1e-6)
    noise_var = torch.stack([grad(noise()) for _ in range(400)]).var(0).sum()
    batches = torch.stack([g[torch.randperm(n)[:rows]].mean(0) for _ in range(4000)])
    assert abs(noise_var / (batches - g.mean(0)).square().mean(0).sum() - 1) < 0.15


def test_noise_held_at_start_is_drawn_at_the_starting_weights():
    """held_at_start(model, batch_noise) hands `model` the noise batch_noise draws at a copy of the
    weights it started from: after the weights move, the same draw as at an untouched copy of them
    (to 1e-6), not the one at the moved weights."""
    torch.manual_seed(0)
    model, groups = tiny_model_and_groups()
    untouched = copy.deepcopy(model)
    held = exp_pathstar.held_at_start(model, lambda m: exp_pathstar.batch_noise(m, groups, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))

    def drawn(m, loss):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss().backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])
    at_start = drawn(model, held)
    same_draw = drawn(untouched, exp_pathstar.batch_noise(untouched, groups, 8))
    assert torch.allclose(at_start, same_draw, atol=1e-6)
    moved = drawn(model, exp_pathstar.batch_noise(model, groups, 8))
    assert (at_start - moved).norm() > 0.1 * moved.norm()


def test_scrambled_noise_is_one_fixed_signed_permutation_per_tensor():
    """scrambled moves each tensor's gradient by a signed permutation of its coordinates (the same
    absolute values, here 0..n-1, in other places), the same one at every call (a gradient twice as
    large comes out twice as large), and leaves other tensors' gradients in their own tensors."""
    W, b = torch.zeros(30, 20, requires_grad=True), torch.zeros(7, requires_grad=True)
    scale = [1.0]
    v = [torch.arange(600.0).view(30, 20), torch.arange(7.0)]
    noise = exp_pathstar.scrambled(lambda: scale[0] * ((v[0] * W).sum() + (v[1] * b).sum()), [W, b])
    noise().backward()
    first = [W.grad.clone(), b.grad.clone()]
    for g, u in zip(first, v):
        assert torch.equal(g.abs().flatten().sort().values, u.flatten()) and not torch.equal(g.abs(), u)
    W.grad, b.grad, scale[0] = None, None, 2.0
    noise().backward()
    assert torch.equal(W.grad, 2 * first[0]) and torch.equal(b.grad, 2 * first[1])


def test_grad_noise_reaches_the_training_step(tmp_path):
    """--grad-noise changes what a run learns; --grad-noise 0 is the run without it, bit for bit."""
    emb = {}
    for std in ("0", "0.0", "0.5"):
        exp_pathstar.main(TINY + ["--epochs", "3", "--eval-every", "3", "--warmup", "0", "--grad-noise", std,
                                  "--out", str(tmp_path / std)])
        emb[std] = np.load(tmp_path / std / "embeddings.npy")
    assert np.array_equal(emb["0"], emb["0.0"])
    assert np.abs(emb["0.5"] - emb["0"]).mean() > 0.1 * np.abs(emb["0"]).mean()


def test_grad_noise_in_embeddings_leaves_the_other_gradients_alone(tmp_path):
    """After one step (G(24, 4): one step per epoch) with --grad-noise-in embeddings only the token
    embeddings differ from the run without noise (no clipping, which would scale every gradient);
    with the default (all) every weight does."""
    def weights(*flags):
        out = str(tmp_path / "_".join(flags or ("plain",)))
        exp_pathstar.main(TINY + ["--epochs", "1", "--warmup", "0", "--grad-clip", "0", *flags, "--out", out])
        return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]
    plain, emb, every = (weights(), weights("--grad-noise", "0.5", "--grad-noise-in", "embeddings"),
                         weights("--grad-noise", "0.5"))
    for name, w in plain.items():
        assert torch.equal(emb[name], w) == (name != "wte.weight"), name
        assert not torch.equal(every[name], w), name


def test_diverged_run_stops_with_one_line(tmp_path, capsys):
    """lr 1e6 turns the loss NaN: the run stops (non-zero exit, one line), keeps the checkpoint of
    the last finite evaluation and writes no metrics."""
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        exp_pathstar.main(TINY + ["--lr", "1e6", "--epochs", "6", "--eval-every", "1", "--ckpt-every", "0",
                                  "--out", str(out)])
    assert e.value.code != 0
    err = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error" in l]
    assert len(err) == 1 and "training loss turned" in err[0]
    assert not (out / "metrics.json").exists()
    if "checkpoint of epoch" in err[0]:
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_compiled_run_resumes_eagerly(tmp_path):
    """A checkpoint written by a --compile run has the plain keys: --resume --no-compile continues."""
    out = str(tmp_path / "run")
    exp_pathstar.main(TINY + ["--epochs", "4", "--eval-every", "2", "--compile", "--time-limit", "1e-6",
                              "--out", out])
    assert json.load(open(os.path.join(out, "metrics.json")))["epochs_done"] == 2  # stopped by the limit
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]
    assert not any("_orig_mod" in k for k in saved)
    hist = exp_pathstar.main(TINY + ["--epochs", "4", "--eval-every", "2", "--no-compile", "--resume",
                                     "--out", out])
    assert [h["epoch"] for h in hist["history"]] == [2, 4]


def test_first_hop_lens_known_answers(monkeypatch):
    """Two arms, a lens that puts fixed tokens on top at each block: the shares count the leaf's
    neighbour at position 1 and the first node at the last position, chunk by chunk."""
    arms = [[0, 1, 2, 3], [0, 4, 5, 6]]  # root, a1, a2 (the leaf's neighbour), leaf
    top = {1: [[9, 9], [2, 9], [2, 5]],  # position 1, blocks 0..2: arm 0's neighbour from block 1
           -1: [[9, 9], [9, 4], [1, 4]]}  # last position: arm 1's first node from block 1, arm 0's at 2

    def lens(model, idx, position=-1):  # (blocks, rows, positions, V), as logit_lens's list form
        rows = [int(r) for r in idx[:, 0]]  # idx's first column says which arms this chunk holds
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(top[p])[:, rows], 10).float()
                            for p in position], 2)
    monkeypatch.setattr(exp_pathstar, "logit_lens", lens)
    model = argparse.Namespace(blocks=[None, None])
    idx = torch.tensor([[0, 3, 0], [1, 6, 0]])
    for chunk in (1, 2):
        leaf, last = exp_pathstar.first_hop_lens(model, idx, arms, "cpu", chunk=chunk)
        assert leaf == [0.0, 0.5, 1.0] and last == [0.0, 0.5, 1.0]
    assert exp_pathstar.first_block([0.0, 0.5, 1.0]) == 1
    assert exp_pathstar.first_block([0.0, 0.4]) == 2  # never: one past the last block


class LeafQuery(common.TiedLM):
    """A model whose path query is a fixed vector per leaf (read at position 1) and whose output
    rows are the unit vectors, so its first hop is that vector's largest entry."""

    def __init__(self, queries):
        super().__init__()
        self.wte = torch.nn.Embedding(*queries.shape)
        self.wte.weight.data = torch.eye(len(queries))
        self.queries = queries

    def hidden(self, idx):
        return self.queries[idx[:, 1]][:, None].expand(-1, idx.shape[1], -1)


def test_first_hop_answers_known_answers():
    """Seven arms, five held out: one answered right, two with the first node of the training leaf
    whose path query is nearest by cosine (for leaf 4 the dot product would pick the other), one
    with the other training arm's, one with a node that is no first node."""
    arms = [[0, 2 * k + 1, 2 * k + 2] for k in range(7)]  # root, first node, leaf
    held, trained = arms[:5], arms[5:]  # trained first nodes 11 (leaf 12) and 13 (leaf 14)
    vocab = common.Vocab(15)
    e = torch.eye(vocab.size)
    q = torch.zeros(vocab.size, vocab.size)
    q[12], q[14] = e[11] + 2 * e[0], e[13] + 5 * e[2]  # the training leaves' path queries
    q[2] = e[1]  # right
    q[4], q[6] = e[11] + 0.3 * e[2], e[13]  # lookups: leaf 4's cosine 0.43 with leaf 12, 0.28 with 14
    q[8] = e[11] + 0.99 * e[2]  # answers 11, but nearest to leaf 14 (cosine 0.69 against 0.32)
    q[10] = e[4]  # a held-out arm's leaf: no first node
    model = LeafQuery(q)
    idx = [exp_pathstar.first_hop_prompts(a, vocab, 2) for a in (held, trained)]
    shares = exp_pathstar.first_hop_answers(model, *idx, held, trained, "cpu")
    assert shares == pytest.approx([0.2, 0.4, 0.2, 0.2])
    queries, answers = exp_pathstar.path_queries(model, idx[0], "cpu", chunk=2)
    assert answers.tolist() == [1, 11, 13, 11, 4] and torch.equal(queries, q[[2, 4, 6, 8, 10]])  # in chunks


def test_snapshots_keep_the_model_at_every_evaluation(tmp_path):
    """--snapshots: one state dict per evaluation, a run stopped by --time-limit adds the rest on
    --resume; the last is the final model (its embeddings are embeddings.npy), an earlier one a
    different model that loads into it."""
    out = str(tmp_path / "run")
    flags = TINY + ["--epochs", "6", "--eval-every", "2", "--snapshots", "--out", out]
    exp_pathstar.main(flags + ["--time-limit", "1e-9"])  # stops after the first evaluation
    shots = os.path.join(out, "snapshots")
    assert sorted(os.listdir(shots)) == ["epoch000002.pt"]
    exp_pathstar.main(flags + ["--resume"])
    assert sorted(os.listdir(shots)) == ["epoch000002.pt", "epoch000004.pt", "epoch000006.pt"]
    last = torch.load(os.path.join(shots, "epoch000006.pt"))
    assert not any("_orig_mod" in k for k in last)
    emb = np.load(os.path.join(out, "embeddings.npy"))
    assert np.array_equal(last["wte.weight"][: len(emb)].numpy(), emb)
    first = torch.load(os.path.join(shots, "epoch000002.pt"))
    assert not torch.equal(first["wte.weight"], last["wte.weight"])
    args = exp_pathstar.get_args(flags)
    exp_pathstar.make_model(args, len(last["wte.weight"])).load_state_dict(first)


def test_init_from_starts_at_a_checkpoint_or_snapshot(tmp_path, monkeypatch, capsys):
    """--init-from: training starts from the weights of another run's checkpoint.pt or snapshot
    ({seed} in the path becomes --seed); another graph or another model: one line, exit 2."""
    out = str(tmp_path / "seed0")
    exp_pathstar.main(TINY + ["--epochs", "2", "--eval-every", "1", "--snapshots", "--out", out])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]
    first = torch.load(os.path.join(out, "snapshots", "epoch000001.pt"))
    assert not torch.equal(first["wte.weight"], ckpt["wte.weight"])
    started = []

    def train(model, *a, **k):  # records the weights training starts from, and stops
        started.append({k: v.clone() for k, v in model.state_dict().items()})
        raise KeyboardInterrupt

    monkeypatch.setattr(exp_pathstar, "train", train)
    for path, want in ((str(tmp_path / "seed{seed}" / "checkpoint.pt"), ckpt),
                       (os.path.join(out, "snapshots", "epoch000001.pt"), first)):
        with pytest.raises(KeyboardInterrupt):
            exp_pathstar.main(TINY + ["--init-from", path, "--out", str(tmp_path / "b")])
        assert started[-1].keys() == want.keys()
        assert all(torch.equal(started[-1][k], want[k]) for k in want)
    path = os.path.join(out, "checkpoint.pt")
    for flags, msg in ((["--seed", "1"], "was trained on another graph (seed=0, this run has 1)"),
                       (["--n-embd", "16"], "holds another model: size mismatch for wte.weight"),
                       (["--init", "spectral"], "--init-from replaces --init")):
        with pytest.raises(SystemExit) as e:
            exp_pathstar.main(TINY + flags + ["--init-from", path, "--out", str(tmp_path / "c")])
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_packed_run_trains_as_the_unpacked_one(tmp_path):
    """--pack (full paths: several loss positions per row; edges 4 to a row) ends with the
    weights and the evaluations of the same run without it."""
    runs = {}
    for pack in ("--no-pack", "--pack"):
        out = str(tmp_path / pack)
        runs[pack] = exp_pathstar.main(TINY + ["--epochs", "3", "--eval-every", "1", pack, "--out", out])
        runs[pack]["emb"] = np.load(os.path.join(out, "embeddings.npy"))
    plain, packed = runs["--no-pack"], runs["--pack"]
    assert np.allclose(plain["emb"], packed["emb"], atol=1e-5)
    for a, b in zip(plain["history"], packed["history"]):
        for key in ("edge_acc", "train_path_acc", "test_first_token_acc", "navigation_mean_rank"):
            assert a[key] == pytest.approx(b[key], abs=1e-6)


def test_pack_is_on_by_default_only_for_a_gpt_on_cuda(tmp_path):
    """--pack unset: packed where a GPU measured it to pay (a GPT on CUDA), never for a scan, and
    an explicit flag wins; a CPU run records what it resolved to."""
    mode = lambda device, **kw: exp_pathstar.pack_mode(argparse.Namespace(**{"pack": None, "model": "gpt",
                                                                             **kw}), device)
    assert mode("cuda") and mode("cuda:1")
    assert not mode("cpu") and not mode("cuda", model="mamba")
    assert not mode("cuda", pack=False) and mode("cpu", pack=True)
    out = str(tmp_path / "run")
    exp_pathstar.main(TINY + ["--epochs", "1", "--eval-every", "1", "--out", out])
    assert json.load(open(os.path.join(out, "metrics.json")))["config"]["pack"] is False


def test_seeds_write_spread(tmp_path):
    """--seeds 0 1: one folder per seed, and mean / min / max over them of every final metric."""
    out = tmp_path / "seeds"
    exp_pathstar.main(TINY + ["--epochs", "3", "--eval-every", "1", "--seeds", "0", "1", "--out", str(out)])
    per = {s: json.load(open(out / f"seed{s}" / "metrics.json")) for s in (0, 1)}
    assert per[0]["config"]["seed"] == 0 and per[1]["config"]["seed"] == 1
    assert json.load(open(out / "seed0" / "graph.json")) != json.load(open(out / "seed1" / "graph.json"))
    m = json.load(open(out / "metrics.json"))
    assert m["seeds"] == [0, 1]
    for key in ("test_first_token_acc", "edge_acc", "navigation_mean_rank"):
        v = [per[s]["final"][key] for s in (0, 1)]
        assert m["final"][key]["mean"] == pytest.approx(sum(v) / 2)
        assert (m["final"][key]["min"], m["final"][key]["max"]) == (min(v), max(v))
    rows = list(csv.DictReader(open(out / "summary.csv")))
    row = next(r for r in rows if r["metric"] == "edge_acc")
    assert float(row["seed1"]) == per[1]["final"]["edge_acc"] and float(row["min"]) == min(
        per[s]["final"]["edge_acc"] for s in (0, 1))
    assert figure_ok(out / "summary.png")


def test_seeds_resume_keeps_finished_resumes_stopped_starts_missing(tmp_path):
    """--seeds --resume after a --time-limit stop: a seed stopped early resumes from its checkpoint,
    a seed that never ran starts, and both end as one uninterrupted run; a second --resume keeps
    every finished seed and trains nothing."""
    flags = TINY + ["--epochs", "4", "--eval-every", "1", "--seeds", "0", "1"]
    straight = exp_pathstar.main(flags + ["--out", str(tmp_path / "straight")])
    out = tmp_path / "stopped"
    exp_pathstar.main(flags + ["--time-limit", "1e-9", "--out", str(out)])  # stops after epoch 1
    assert json.load(open(out / "seed0" / "metrics.json"))["epochs_done"] == 1
    shutil.rmtree(out / "seed1")
    resumed = exp_pathstar.main(flags + ["--resume", "--out", str(out)])
    same = lambda a, b: untimed(a["history"]) == untimed(b["history"])
    assert list(resumed) == [0, 1] and all(same(resumed[s], straight[s]) for s in (0, 1))
    mtime = os.path.getmtime(out / "seed0" / "metrics.json")
    kept = exp_pathstar.main(flags + ["--resume", "--out", str(out)])
    assert all(same(kept[s], straight[s]) for s in (0, 1))
    assert os.path.getmtime(out / "seed0" / "metrics.json") == mtime  # not trained again


def test_sweep_with_seeds(tmp_path):
    out = tmp_path / "sw"
    exp_pathstar.main(TINY + ["--sweep", "frozen", "--epochs", "2", "--eval-every", "1", "--seeds", "3", "4",
                              "--out", str(out)])
    m = json.load(open(out / "metrics.json"))
    assert set(m["arms"]) == {"trained", "frozen"}
    for arm in ("trained", "frozen"):
        v = [json.load(open(out / f"seed{s}" / arm / "metrics.json"))["final"]["edge_acc"] for s in (3, 4)]
        assert m["arms"][arm]["edge_acc"]["mean"] == pytest.approx(sum(v) / 2)


def test_optimizer_flags_reach_adamw(tmp_path, monkeypatch):
    """--betas, --decay, --grad-clip and --decay-epochs reach the optimizer and the phases; the defaults
    are the release's AdamW, the quick preset keeps nanoGPT's (measured better at that scale,
    docs/deviations.md)."""
    full = exp_pathstar.get_args([])
    assert (full.betas, full.grad_clip, full.decay) == ([0.9, 0.999], 0.0, "all")
    quick = exp_pathstar.get_args(["--quick"])
    assert (quick.betas, quick.grad_clip, quick.decay) == ([0.9, 0.95], 1.0, "matrices")
    seen = {}
    real = exp_pathstar.train

    def spy(model, phases, **kw):
        seen.update(kw, clips=[p.grad_clip for p in phases], decay=[p.decay_epochs for p in phases])
        return real(model, phases, **kw)
    monkeypatch.setattr(exp_pathstar, "train", spy)
    exp_pathstar.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "a")])
    assert seen["betas"] == (0.9, 0.95) and not seen["decay_all"] and seen["clips"] == [1.0]
    assert seen["decay"] == [0]  # the cosine over --epochs
    exp_pathstar.main(TINY + ["--epochs", "1", "--betas", "0.9", "0.999", "--decay", "all", "--grad-clip", "0",
                              "--recipe", "staged", "--edge-epochs", "1", "--decay-epochs", "3",
                              "--out", str(tmp_path / "b")])
    assert seen["betas"] == (0.9, 0.999) and seen["decay_all"] and seen["clips"] == [0.0, 0.0]
    assert seen["decay"] == [0, 3]  # the path phase's schedule; the edge phase keeps its own
    model = tiny_model_for_decay()
    opt = make_optimizer(model, 1e-3, 0.1, decay_all=True)
    assert [g["weight_decay"] for g in opt.param_groups if g["params"]] == [0.1]  # biases and norms decay too
    opt = make_optimizer(model, 1e-3, 0.1)  # nanoGPT: embedding and linear weight decay; 3 vectors do not
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(2, 0.1), (3, 0.0)]


def tiny_model_for_decay():
    return torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))


def test_learned_positions_start_unit_normal():
    args = exp_pathstar.get_args(TINY + ["--positions", "learned", "--n-embd", "64"])
    model = exp_pathstar.make_model(args, 30)
    assert isinstance(model.wpe, torch.nn.Parameter) and 0.9 < model.wpe.std().item() < 1.1
    assert not isinstance(exp_pathstar.make_model(exp_pathstar.get_args(TINY), 30).wpe, torch.nn.Parameter)


def test_epochs_to_level():
    h = [{"epoch": e, "test_first_token_acc": a} for e, a in [(10, 0.1), (20, 0.6), (30, 0.95)]]
    assert tuple(common.epochs_to(h, level, "test_first_token_acc") for level in (0.5, 0.9, 0.99)) == \
        (20, 30, None)


# ----------------------------------------------------------------------------- geometric headroom


def test_self_edges_add_one_example_per_node():
    args = exp_pathstar.get_args(TINY)
    plain = exp_pathstar.build(args)
    looped = exp_pathstar.build(exp_pathstar.get_args(TINY + ["--self-edges"]))
    N = plain["vocab"].num_nodes
    extra = looped["edges"][len(plain["edges"]):]
    assert len(looped["edges"]) == len(plain["edges"]) + N
    assert np.array_equal(looped["edges"][:len(plain["edges"])], plain["edges"])
    assert sorted(extra[:, 0].tolist()) == list(range(N)) and (extra[:, 0] == extra[:, 1]).all()


def test_spectral_init_sets_the_node_embeddings():
    from common import laplacian_eigs
    args = exp_pathstar.get_args(TINY + ["--init", "spectral"])
    data = exp_pathstar.build(args)
    model = exp_pathstar.make_model(args, data["vocab"].size)
    specials = model.wte.weight[data["vocab"].num_nodes:].detach().clone()
    exp_pathstar.init_node_embeddings(model, data, args, "cpu")
    N, C = data["vocab"].num_nodes, args.n_embd
    E = model.wte.weight[:N].detach().double()
    V = torch.as_tensor(laplacian_eigs(data["graph"], k=C)[1])
    assert torch.allclose(E / E.norm(), V / V.norm(), atol=1e-6)  # the top C eigenvectors, rescaled
    assert E.norm().item() == pytest.approx(0.02 * (N * C) ** 0.5, rel=1e-5)  # the N(0, 0.02) init's norm
    assert torch.equal(model.wte.weight[N:], specials)  # special tokens as usual


def test_aux_loss_gradient_is_app_f_coefficient_times_e():
    """The auxiliary loss is the tied Node2Vec objective: its gradient is -C E / N with
    C = D^-1 A + A D^-1 - P - P^T (App. F, Lemma 1), here against autograd."""
    from common import coefficient_matrix, node2vec_loss
    args = exp_pathstar.get_args(["--quick", "--n", "4", "--l", "3", "--train-frac", "0.5"])
    data = exp_pathstar.build(args)
    targets = exp_pathstar.edge_targets(data, "cpu")
    N = data["vocab"].num_nodes
    E = torch.randn(N, 6, dtype=torch.float64, requires_grad=True)
    node2vec_loss(E, targets.double()).backward()
    A = (targets > 0).double().numpy()
    P = torch.softmax(E.detach() @ E.detach().T, 1).numpy()
    want = -coefficient_matrix(A, P) @ E.detach().numpy() / N
    assert np.allclose(E.grad.numpy(), want, atol=1e-10)


def test_headroom_sweep_smoke(tmp_path):
    top = tmp_path / "hr"
    exp_pathstar.main(TINY + ["--first-token-only", "--epochs", "2", "--eval-every", "1", "--n2v-steps", "20",
                              "--sweep", "headroom", "--seeds", "0", "--out", str(top)])
    out = top / "seed0"
    ref = json.load(open(out / "node2vec" / "metrics.json"))
    assert 1 <= ref["k"] <= ref["num_nodes"] and 0 <= ref["spectral_share"] <= 1 + 1e-9
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["arm"] for r in rows] == list(exp_pathstar.SWEEPS["headroom"])
    m = json.load(open(out / "node2vec_aux" / "metrics.json"))
    assert m["config"]["aux_weight"] == 0.1 and m["config"]["spectral_k"] == ref["k"]
    assert "spectral_share" in m["final"] and "geometric_level" in m["final"]
    assert figure_ok(out / "headroom.png")
    # over seeds: the Node2Vec reference is a row of both summaries, next to every arm
    arms = list(exp_pathstar.SWEEPS["headroom"]) + ["node2vec (edges only)"]
    assert list(json.load(open(top / "metrics.json"))["arms"]) == arms
    assert sorted({r["arm"] for r in csv.DictReader(open(top / "summary.csv"))}) == sorted(arms)
    assert json.load(open(top / "metrics.json"))["arms"]["node2vec (edges only)"]["spectral_share"]["mean"] \
        == pytest.approx(ref["spectral_share"])
    assert figure_ok(top / "summary.png")


def test_headline_task_learns(tmp_path):
    """The paper's headline at toy scale: on G(40, 4) (10 held-out leaves, chance 0.025) 300 epochs
    of first-token-only training memorize every edge and training leaf, and the held-out first
    hop (a two-hop composition never trained) rises far above chance. Seeds 0-2 gave 0.5-0.7."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = exp_pathstar.main(["--quick", "--first-token-only", "--n", "40", "--l", "4", "--epochs", "300",
                                 "--eval-every", "100", "--out", str(tmp_path / "learn")])
    finally:
        torch.set_num_threads(threads)
    final = run["history"][-1]
    assert final["train_first_token_acc"] == 1.0 and final["edge_acc"] == 1.0
    assert final["test_first_token_acc"] >= 10 * final["chance_first_token"]
    assert final["navigation_acc"] >= 0.5
    assert (final["navigation_2hop_acc"], final["navigation_2hop_mean_rank"]) == (  # l = 4: a1 is 2 hops up
        final["navigation_acc"], final["navigation_mean_rank"])


def test_readme_extension_example_runs(tmp_path):
    """The README's "Extend it" example, as printed there, on a small graph for 2 epochs: it trains
    on the split it chose (half of the arms held out) and writes the usual outputs."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    code = readme.split("## Extend it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    small = '"--quick", "--first-token-only", "--n", "20", "--epochs", "2"'
    assert '"--quick", "--first-token-only"' in code and '"runs/half_held_out"' in code
    code = code.replace('"--quick", "--first-token-only"', small).replace('"runs/half_held_out"',
                                                                         repr(str(tmp_path)))
    exec(code, {})
    with open(tmp_path / "graph.json") as f:
        graph = json.load(f)
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    assert len(graph["test_leaves"]) == 10 and metrics["epochs_done"] == 2
    assert os.path.exists(tmp_path / "embeddings.npy")


@pytest.fixture(scope="module")
def untied_run(tmp_path_factory):
    """A tiny untied run with every optional measure of a GPT on a path-star and snapshots."""
    out = tmp_path_factory.mktemp("untied_run")
    exp_pathstar.main(TINY + ["--untied-head", "--spectral-k", "5", "--snapshots", "--first-token-only",
                              "--epochs", "2", "--eval-every", "1", "--out", str(out)])
    return out


def test_reading_guide_explains_every_key_and_file(untied_run):
    """docs/reading_a_run.md names what a run writes, no more and no less: every top-level key, history
    field and measure of a path-star run (exp_treestar's two measures: test_treestar) and every file."""
    m = json.load(open(untied_run / "metrics.json"))
    assert set(m) == set(guide_keys("metrics.json"))
    fields = set(guide_keys("A history entry"))
    assert all(set(h) - set(m["final"]) == fields for h in m["history"])
    measures = guide_keys("The measures of an evaluation")
    assert set(m["final"]) == {k for k, when in measures.items() if when != "exp_treestar"}
    files = {f for f in os.listdir(untied_run) if f != "snapshots"} | {"snapshots/epoch<E>.pt"}
    assert files == set(guide_keys("The folder"))


def test_reading_guide_example_reloads_a_run(untied_run, capsys):
    """The guide's example, as printed there, on the tiny run: load_run rebuilds the graph, split and
    model, and every measure recomputed from the weights is the logged one; a snapshot gives its
    evaluation's measures; a folder without a run stops with one line."""
    guide = open(os.path.join(ROOT, "docs", "reading_a_run.md")).read()
    code = guide.split("## Load a run", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'run = "runs/quick_ft"' in code
    scope = {}
    exec(code.replace('run = "runs/quick_ft"', f"run = {str(untied_run)!r}"), scope)
    assert scope["measured"] == scope["logged"] and "head_navigation_acc" in scope["logged"]
    assert f"its first node is {scope['arm'][1]}" in capsys.readouterr().out
    model, data, args = exp_pathstar.load_run(str(untied_run), "snapshots/epoch000001.pt")
    first = json.load(open(untied_run / "metrics.json"))["history"][0]
    measured = exp_pathstar.make_evaluate(data, args, "cpu")(model)
    assert measured == {k: v for k, v in first.items() if k in measured}
    assert len(measured) == len(scope["logged"])
    with pytest.raises(SystemExit):
        exp_pathstar.load_run(str(untied_run / "snapshots"))
    assert f"error: load_run: no checkpoint.pt in {untied_run / 'snapshots'}\n" in capsys.readouterr().err


def gpu_script_env(tmp_path):
    env = dict(os.environ, RUNS=str(tmp_path / "runs"),
               CONFIG=" ".join(TINY + ["--first-token-only", "--epochs", "30"]))
    env.pop("GEOMEM_KERNELS", None)
    return env


def run_gpu_script(env, out, flags=()):
    """.ci/gpu with a 60 s budget for seed 3 into `out`; its log."""
    done = subprocess.run(["bash", os.path.join(ROOT, ".ci", "gpu"), "60", "3", *flags], cwd=ROOT,
                          env=dict(env, OUT=str(out)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:]
    return (out / "log.txt").read_text()


def test_gpu_script_measures_the_kernels_against_the_eager_loop(tmp_path):
    """.ci/gpu first benches the eager loop and the default mode with GEOMEM_KERNELS=0, then every
    mode with the four GPU kernels, each mode's weights against the eager loop's, and trains with
    the kernels. On the CPU the kernels do not run: every mode reaches the eager loop's weights."""
    log = run_gpu_script(gpu_script_env(tmp_path), tmp_path / "out")
    off = json.load(open(tmp_path / "out" / "bench_kernels_off.json"))["modes"]
    on = json.load(open(tmp_path / "out" / "bench.json"))["modes"]
    assert list(off) == ["eager", "compiled+packed"] and list(on)[-1] == "compiled+packed"  # the CPU's modes
    assert [m["weights_off_reference"] < 1e-4 for m in on.values()] == [True] * len(on)
    assert on["compiled+packed"]["loss"] == pytest.approx(off["compiled+packed"]["loss"], rel=1e-6)
    assert "== compiled+packed, kernels on / off: " in log and "GEOMEM_KERNELS=1: " in log
    assert len(os.listdir(tmp_path / "out")) == 7


@pytest.mark.parametrize("kernels", ["fail", "differ"])
def test_gpu_script_falls_back_and_brings_back_what_the_device_tool_carries(tmp_path, kernels):
    """.ci/gpu, the one call of a lent GPU, with a tiny config: if the bench fails with the four GPU
    kernels on, or reaches other weights than the eager loop (simulated by another seed), it trains
    with GEOMEM_KERNELS=0, and a --resume call keeps that (run after a failure); $OUT holds the files
    within the device tool's limits (8 files, 16 MiB each, plain names)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    act = {"fail": 'echo "shim: the kernels failed" >&2; exit 1',
           "differ": f'exec {sys.executable} "$@" --seed 1'}  # another start: other weights
    (shim / "python").write_text(  # a bench with the kernels on: fails, or reaches other weights
        '#!/bin/sh\ncase " $* " in *" --bench "*) [ "$GEOMEM_KERNELS" = 0 ] || '
        f'{{ {act[kernels]}; }};; esac\nexec {sys.executable} "$@"\n')
    (shim / "python").chmod(0o755)
    env = dict(gpu_script_env(tmp_path), PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    logs = []
    for call, flags in (("first", []), ("resume", ["--resume"]))[:2 if kernels == "fail" else 1]:
        out = tmp_path / call
        logs.append(run_gpu_script(env, out, flags))
        files = sorted(os.listdir(out))
        bench = ["bench_kernels_off.json"] + ["bench.json"] * (kernels == "differ")
        assert files == sorted(["log.txt", "metrics.json", "accuracy.png", "geometry.png", "emb16.npz"]
                               + bench * (call == "first"))
        assert all((out / f).stat().st_size <= 16 * 2 ** 20 for f in files)
        m = json.load(open(out / "metrics.json"))
        assert m["epochs_done"] == 30 and m["config"]["seed"] == 3
        z = np.load(out / "emb16.npz")
        g = json.load(open(tmp_path / "runs" / "gpu_seed3" / "graph.json"))
        emb = np.load(tmp_path / "runs" / "gpu_seed3" / "embeddings.npy")
        assert z["emb"].dtype == np.float16 and np.allclose(z["emb"], emb, atol=1e-3)
        assert z["arms"].tolist() == g["arms"] and z["test_leaves"].tolist() == g["test_leaves"]
    first, resumed = logs[0], logs[-1]
    why = {"fail": "the bench failed: training with GEOMEM_KERNELS=0",
           "differ": "the kernels' step is off the eager loop's: training with GEOMEM_KERNELS=0"}
    assert why[kernels] in first and ("shim: the kernels failed" in first) == (kernels == "fail")
    assert "GEOMEM_KERNELS=0: " in first and "GEOMEM_KERNELS=0: " in resumed
    assert kernels == "differ" or "== bench" not in resumed
