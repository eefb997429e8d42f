import itertools
import math
import os
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common import (GPT, CausalSelfAttention, GPTConfig, GroupSampler, Packing, Phase, Stepper, Vocab,
                    adjacency, arm_edges, arm_modes, arm_parts, arm_spectrum, cosine_matrix, curve_band,
                    decode_answer, edge_group, edge_queries, edge_recall, forever, greedy_decode,
                    grid_graph, hop_cosine, laplacian_eigs, logit_lens, loss_tail, linear_navigation, lr_at,
                    make_optimizer, navigation_score, path_group, path_prompts, path_star, path_targets,
                    set_lr, spectral_energy, split_arms, summary_markdown, tiny_graph, top_k_hits, train,
                    zigzag_reflection)


@pytest.mark.parametrize("d,l", [(1, 2), (3, 5), (50, 4), (7, 10)])
def test_path_star_shape(d, l):
    g, root, arms = path_star(d, l, seed=3)
    assert g.number_of_nodes() == 1 + d * (l - 1)
    assert nx.is_tree(g)
    assert g.degree(root) == d
    depth = nx.single_source_shortest_path_length(g, root)
    leaves = [v for v in g if g.degree(v) == 1 and v != root] if d > 1 else [arms[0][-1]]
    assert sorted(leaves) == sorted(a[-1] for a in arms)
    assert all(depth[v] == l - 1 for v in leaves)
    for arm in arms:  # each arm is a root-first path in the graph
        assert arm[0] == root and len(arm) == l
        assert all(g.has_edge(u, v) for u, v in zip(arm, arm[1:]))


def test_path_star_ids_are_permuted_and_seeded():
    _, root_a, arms_a = path_star(20, 5, seed=0)
    _, root_b, arms_b = path_star(20, 5, seed=0)
    _, _, arms_c = path_star(20, 5, seed=1)
    assert arms_a == arms_b and arms_a != arms_c
    assert [v for a in arms_a for v in a[1:]] != list(range(1, 81))  # not laid out in order


def test_split_disjoint_covering():
    _, _, arms = path_star(40, 4)
    train_arms, test_arms = split_arms(arms, 0.75, seed=5)
    tr, te = {a[-1] for a in train_arms}, {a[-1] for a in test_arms}
    assert len(tr) == 30 and len(te) == 10
    assert not tr & te and tr | te == {a[-1] for a in arms}
    assert split_arms(arms, 0.75, seed=5) == (train_arms, test_arms)


@pytest.mark.parametrize("name,nodes,edges,components", [
    ("path_star", 17, 16, 1), ("grid", 16, 24, 1), ("cycle", 15, 15, 1), ("irregular", 16, 20, 2)])
def test_tiny_graphs(name, nodes, edges, components):
    g = tiny_graph(name)
    assert sorted(g) == list(range(nodes))
    assert g.number_of_edges() == edges and nx.number_of_selfloops(g) == 0
    assert nx.number_connected_components(g) == components
    loops = tiny_graph(name, self_edges=True)
    assert nx.number_of_selfloops(loops) == nodes and loops.number_of_edges() == edges + nodes
    assert np.allclose(np.diag(adjacency(loops)), 1)  # a self-edge is one u -> u example


def test_tiny_graph_shapes():
    star = tiny_graph("path_star", seed=3)
    assert nx.is_tree(star) and star.degree(star.graph["root"]) == 4
    assert [len(a) for a in star.graph["arms"]] == [5] * 4
    assert tiny_graph("path_star", seed=3).graph["arms"] == star.graph["arms"]  # seeded ids
    assert all(d == 2 for _, d in tiny_graph("cycle").degree)
    assert sorted(map(len, nx.connected_components(tiny_graph("irregular")))) == [4, 12]
    g = grid_graph(3, 5)
    assert g.has_edge(0, 1) and g.has_edge(0, 5) and not g.has_edge(4, 5)  # node r * cols + c
    assert sorted(d for _, d in g.degree).count(2) == 4
    with pytest.raises(ValueError):
        tiny_graph("torus")


def test_edges_each_direction():
    g, root, arms = path_star(6, 4)
    fwd = {tuple(e) for e in arm_edges(arms, "forward").tolist()}
    bwd = {tuple(e) for e in arm_edges(arms, "backward").tolist()}
    both = [tuple(e) for e in arm_edges(arms, "both").tolist()]
    depth = nx.single_source_shortest_path_length(g, root)
    assert len(fwd) == len(bwd) == g.number_of_edges()
    assert all(depth[v] == depth[u] + 1 for u, v in fwd)  # parent -> child
    assert bwd == {(v, u) for u, v in fwd}
    assert sorted(both) == sorted(fwd | bwd)
    assert {frozenset(e) for e in fwd} == {frozenset(e) for e in g.edges}


def test_edge_group_format():
    vocab = Vocab(10)
    X, Y = edge_group(np.array([[1, 2], [3, 4]]), vocab)
    assert X.tolist() == [[vocab.EDGE, 1], [vocab.EDGE, 3]]
    assert Y.tolist() == [[-1, 2], [-1, 4]]


@pytest.mark.parametrize("pauses", [0, 2])
def test_path_group_targets(pauses):
    _, root, arms = path_star(8, 5, seed=1)
    train_arms, test_arms = split_arms(arms, 0.75)
    vocab = Vocab(1 + 8 * 4)
    prompts = path_prompts([a[-1] for a in train_arms], vocab, pauses)
    X, Y = path_group(prompts, path_targets(train_arms))
    assert X.shape == (6, 2 + pauses + 5 - 1)
    for x, y, arm in zip(X.tolist(), Y.tolist(), train_arms):
        assert x[:2 + pauses] == [vocab.PATH, arm[-1]] + [vocab.PAUSE] * pauses
        assert [t for t in y if t >= 0] == arm  # loss on root..leaf, nothing else
    Xf, Yf = path_group(prompts, path_targets(train_arms), first_token_only=True)
    assert Xf.shape[1] == 2 + pauses + 1 and Xf[:, -1].eq(root).all()
    assert (Yf >= 0).sum(1).eq(1).all() and Yf[:, -1].tolist() == [a[1] for a in train_arms]
    Xr, Yr = path_group(prompts, path_targets(train_arms, reverse=True))
    assert [[t for t in y if t >= 0] for y in Yr.tolist()] == [a[::-1] for a in train_arms]
    test_leaves = {a[-1] for a in test_arms}  # no held-out leaf in any path example
    assert not test_leaves & (set(X.flatten().tolist()) | set(Y.flatten().tolist()))


def tiny_gpt(**kw):
    cfg = dict(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg))


def test_gpt_shapes_and_loss_positions():
    model = tiny_gpt()
    x = torch.randint(0, 23, (5, 7))
    assert model(x).shape == (5, 23)
    y = torch.full((5, 7), -1)
    y[:, 3] = 1
    y[0, 6] = 2
    full_logits = model.hidden(x) @ model.wte.weight.T  # (5, 7, 23)
    mask = y >= 0
    want = torch.nn.functional.cross_entropy(full_logits[mask], y[mask])
    logits, loss = model(x, y)  # targets of every position
    assert logits.shape == (5, 7, 23) and torch.allclose(loss, want)
    x_, tail = loss_tail(x, y)  # the same loss from the last 4 positions only
    assert tail.shape == (5, 4) and torch.equal(tail, y[:, 3:])
    logits, loss = model(x, tail)
    assert torch.allclose(logits, full_logits[:, 3:], atol=1e-6) and torch.allclose(loss, want)


@pytest.mark.parametrize("attention", [True, False])
def test_gpt_flops_are_six_per_weight_and_token_plus_attention(attention):
    """Training FLOPs = 6 x (weights of the matmuls) x tokens + causal attention (QK^T and AV over
    T(T+1)/2 pairs, x3 for the backward) + the logits at the loss positions."""
    model = tiny_gpt(n_layer=3, n_embd=32, n_head=4, attention=attention)
    weights = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    assert weights == 3 * (12 if attention else 8) * 32 * 32
    B, T, n = 5, 7, 9
    attn = 3 * 3 * 2 * 32 * T * (T + 1) if attention else 0
    assert model.flops(B, T, n) == 6 * weights * B * T + B * attn + 6 * n * 32 * 23


def test_loss_tail_rejects_rows_without_loss():
    y = torch.full((3, 4), -1)
    y[:2, 3] = 5
    with pytest.raises(ValueError):
        loss_tail(torch.zeros(3, 4), y)
    with pytest.raises(ValueError):
        loss_tail(torch.zeros(3, 4), torch.full((3, 4), -1))


@pytest.mark.parametrize("learned", [False, True])
def test_gpt_positions_fixed_or_learned(learned):
    model = tiny_gpt(learned_positions=learned)
    trained = dict(model.named_parameters())
    assert ("wpe" in trained) == learned
    if not learned:  # the sinusoidal table (App. B.2.1): row 0 is sin(0), cos(0) pairs
        assert torch.allclose(model.wpe[0, 0::2], torch.zeros(8))
        assert torch.allclose(model.wpe[0, 1::2], torch.ones(8))
    x = torch.randint(0, 23, (2, 6))
    y = torch.randint(0, 23, (2, 6))
    model(x, y)[1].backward()
    if learned:  # rows of used positions get a gradient, the rest of the table none
        assert trained["wpe"].grad[:6].abs().sum() > 0 and trained["wpe"].grad[6:].abs().sum() == 0


@pytest.mark.parametrize("attention", [True, False])
def test_gpt_is_causal(attention):
    model = tiny_gpt(attention=attention).eval()
    x = torch.randint(0, 23, (3, 9))
    h = model.hidden(x)
    x2 = x.clone()
    x2[:, 5:] = torch.randint(0, 23, (3, 4))
    h2 = model.hidden(x2)
    assert torch.allclose(h[:, :5], h2[:, :5], atol=1e-6)
    assert not torch.allclose(h[:, 5:], h2[:, 5:])


def test_attention_off_has_no_attention():
    model = tiny_gpt(attention=False)
    assert all(b.attn is None for b in model.blocks)
    x = torch.randint(0, 23, (2, 4))
    x2 = x.clone()
    x2[:, 0] = (x2[:, 0] + 1) % 23  # without attention, position 3 cannot see position 0
    assert torch.allclose(model.hidden(x)[:, 3], model.hidden(x2)[:, 3])


def test_frozen_embeddings_do_not_change():
    model = tiny_gpt(freeze_embeddings=True)
    before = model.wte.weight.detach().clone()
    other = model.blocks[0].mlp.fc.weight.detach().clone()
    X = torch.randint(0, 23, (32, 3))
    Y = torch.randint(0, 23, (32, 3))
    phase = Phase("p", [(X, Y)], epochs=3, batch_size=8, lr=1e-2, warmup_steps=1)
    train(model, [phase], weight_decay=0.1, evaluate=lambda m: {}, eval_every=10, device="cpu")
    assert torch.equal(model.wte.weight, before)
    assert not torch.equal(model.blocks[0].mlp.fc.weight, other)


def test_untied_head_is_its_own_output_layer():
    """Tied (the paper): the logits are h @ wte^T. --untied-head: h @ lm_head^T, a weight of its own
    in the state dict; frozen embeddings then fix only the input side."""
    tied = tiny_gpt()
    assert tied.lm_head is None and tied.unembedding() is tied.wte.weight
    h = torch.randn(3, 16)
    assert torch.allclose(tied.logits(h), h @ tied.wte.weight.T)
    model = tiny_gpt(untied_head=True, freeze_embeddings=True)
    assert "lm_head.weight" in model.state_dict() and model.lm_head.weight.shape == (23, 16)
    assert common.output_rows(tied, 20) is None
    assert torch.equal(common.output_rows(model, 20), model.lm_head.weight[:20])
    assert torch.allclose(model.logits(h), h @ model.lm_head.weight.T)
    assert not torch.allclose(model.logits(h), h @ model.wte.weight.T)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)  # App. B.2.2's init
    with torch.no_grad():
        model.lm_head.weight.zero_()  # zero logits: the loss is log V whatever the input
    X, Y = torch.randint(0, 23, (4, 5)), torch.randint(0, 23, (4, 2))
    assert model(X, Y)[1].item() == pytest.approx(math.log(23), rel=1e-6)
    wte, head = model.wte.weight.detach().clone(), model.lm_head.weight.detach().clone()
    phase = Phase("p", [(X, Y)], epochs=3, batch_size=2, lr=1e-2, warmup_steps=1)
    train(model, [phase], weight_decay=0.1, evaluate=lambda m: {}, eval_every=10, device="cpu")
    assert torch.equal(model.wte.weight, wte) and not torch.equal(model.lm_head.weight, head)


def test_lr_schedule():
    peak, total, warm = 1e-3, 100, 10
    lrs = [lr_at(s, total, warm, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm)
    assert max(lrs) == pytest.approx(peak) and lrs.index(max(lrs)) == warm - 1
    assert all(a <= b for a, b in zip(lrs[:warm], lrs[1:warm]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # cosine falls
    assert lr_at(total, total, warm, peak) == pytest.approx(peak / 10)  # ends at lr/10


@pytest.mark.parametrize("decay_epochs", [0, 2, 8])
def test_decay_epochs_sets_where_the_cosine_ends(monkeypatch, decay_epochs):
    """train's learning rate per step: the cosine over the phase's epochs (decay_epochs 0), over
    its first 2 of 4 epochs and then held at lr/10, or over 8 epochs cut after 4."""
    lrs = []
    monkeypatch.setattr(common, "set_lr", lambda opt, lr: lrs.append(lr))
    X, Y = torch.randint(0, 23, (32, 3)), torch.randint(0, 23, (32, 3))  # 4 steps per epoch
    phase = Phase("p", [(X, Y)], epochs=4, batch_size=8, lr=1e-2, warmup_steps=2, decay_epochs=decay_epochs)
    history = train(tiny_gpt(), [phase], weight_decay=0.1, evaluate=lambda m: {"acc": 0.5}, eval_every=2,
                    device="cpu")
    total = 4 * (decay_epochs or 4)
    assert lrs == [lr_at(s, total, 2, 1e-2) for s in range(16)]
    # each evaluation records the lr of its epoch's last step; `measures` leaves it out with the time
    assert [(h["epoch"], h["lr"]) for h in history] == [(2, lrs[7]), (4, lrs[15])]
    assert [common.measures(h) for h in history] == [{"acc": 0.5}] * 2
    if decay_epochs == 2:
        assert lrs[8:] == [pytest.approx(1e-3)] * 8 and lrs[7] > 1e-3
    if decay_epochs == 8:
        # the last step is 13 of the cosine's 30: 1e-3 + 9e-3 (1 + cos(13 pi / 30)) / 2, not the floor
        assert lrs[-1] == pytest.approx(1e-3 + 4.5e-3 * (1 + math.cos(13 * math.pi / 30)))


def test_sampler_proportions_and_coverage():
    A = (torch.arange(90).view(-1, 1), torch.zeros(90, 1, dtype=torch.long))
    B = (torch.arange(100, 110).view(-1, 1, 1).expand(-1, 1, 3).reshape(10, 3),
         torch.zeros(10, 3, dtype=torch.long))
    s = GroupSampler([A, B], batch_size=20, generator=torch.Generator().manual_seed(0))
    assert s.steps_per_epoch == 5 and s.shares == [18, 2]
    seen = torch.cat([A[0][rows[0]].flatten() for rows in s.epoch()])
    assert sorted(seen.tolist()) == list(range(90))  # one epoch: every example once


def test_greedy_decode_and_edge_recall_on_a_perfect_lookup():
    """A model that returns fixed logits per last token: decoding follows the table."""
    vocab = Vocab(4)
    nxt = {0: 1, 1: 2, 2: 3, 3: 0}

    class Table(torch.nn.Module):
        generate = GPT.generate

        def forward(self, idx):
            return torch.nn.functional.one_hot(torch.tensor([nxt.get(t, 0) for t in idx[:, -1].tolist()]),
                                               vocab.size).float()
    out = greedy_decode(Table(), torch.tensor([[0], [2]]), 3, "cpu")
    assert out.tolist() == [[1, 2, 3], [3, 0, 1]]
    # the answer: position 0 from the prompt alone, the rest from the prompt plus the true start
    answers = torch.tensor([[1, 2, 3], [0, 0, 1]])
    assert decode_answer(Table(), torch.tensor([[0], [2]]), answers, "cpu").tolist() == [[1, 2, 3], [3, 1, 2]]
    assert edge_recall(Table(), np.array([[0, 1], [1, 2], [2, 0]]), vocab, "cpu") == pytest.approx(2 / 3)


def test_edge_queries_known_answers():
    """The query of node u is the last hidden state of `[EDGE] u`, the one the logits are read
    from; a stand-in model whose hidden state is a table row of its last token gives that row."""
    torch.manual_seed(0)
    vocab = Vocab(7)
    model = GPT(GPTConfig(vocab_size=vocab.size, block_size=4, n_layer=2, n_head=2, n_embd=16)).eval()
    q = edge_queries(model, vocab, "cpu", chunk=3)  # chunks of 3 over 7 nodes
    X = torch.stack([torch.full((7,), vocab.EDGE), torch.arange(7)], 1)
    with torch.no_grad():
        assert torch.allclose(q, model.hidden(X)[:, -1], atol=1e-6)
        assert torch.allclose(q @ model.wte.weight.T, model(X), atol=1e-5)  # the last position's logits
    table = torch.randn(vocab.size, 5)

    class Lookup(torch.nn.Module):
        def hidden(self, idx):
            assert (idx[:, 0] == vocab.EDGE).all()
            return table[idx]
    assert torch.equal(edge_queries(Lookup(), vocab, "cpu"), table[:7])


def test_logit_lens_known_answers():
    """The lens ends at the model's own logits; it starts at the embedding read through ln_f; an
    edit changes what is read and what the next blocks see."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 10, (3, 5))
    L = logit_lens(model, idx)
    assert L.shape == (3, 3, 10)
    assert torch.allclose(L[-1], model(idx), atol=1e-5)
    x0 = model.wte(idx[:, -1]) + model.wpe[4]
    assert torch.allclose(L[0], model.ln_f(x0) @ model.wte.weight.T, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(logit_lens(model, idx, position=1)[-1],
                              model.logits(model.hidden(idx)[:, 1]), atol=1e-5)
    both = logit_lens(model, idx, position=[1, -1])  # one pass, two positions
    assert both.shape == (3, 3, 2, 10)
    assert torch.allclose(both[:, :, 0], logit_lens(model, idx, position=1), atol=1e-6)
    assert torch.allclose(both[:, :, 1], L, atol=1e-6)
    seen = []
    unchanged = logit_lens(model, idx, edit=lambda i, x: seen.append(i) or x)
    assert seen == [0, 1, 2] and torch.equal(unchanged, L)
    zeroed = logit_lens(model, idx, edit=lambda i, x: torch.zeros_like(x) if i == 0 else x)
    assert torch.equal(zeroed[0], torch.zeros(3, 10))  # ln_f(0) = its bias, 0 at init
    with torch.no_grad():
        after_one = model.blocks[0](torch.zeros(3, 5, 16))
        assert torch.allclose(zeroed[1], model.ln_f(after_one[:, -1]) @ model.wte.weight.T, atol=1e-5)


def test_navigation_score_known_answers():
    _, _, arms = path_star(5, 4, seed=0)
    eye = torch.eye(16)
    emb = torch.zeros(16, 16)
    for i, arm in enumerate(arms):  # each arm on its own axis: every leaf points at its own arm
        emb[arm[1:]] = eye[i]
    assert navigation_score(emb, arms[:3], arms) == (1.0, 1.0)
    for i, arm in enumerate(arms):  # leaf i now leans to arm i+1's axis: own first node ranks 2nd
        emb[arm[-1]] = eye[(i + 1) % 5] + 0.1 * eye[i]
    assert navigation_score(emb, arms, arms) == (0.0, 2.0)
    # an untied model: leaf i's input row points at arm i+1's axis, so its own first node is found
    # only among output rows that store each first node on the next arm's axis (§4.4's E vs U)
    out = torch.zeros(16, 16)
    for i, arm in enumerate(arms):
        out[arm[1]] = eye[(i + 1) % 5]
    assert navigation_score(emb, arms, arms, target_emb=out) == (1.0, 1.0)
    assert navigation_score(emb, arms, arms, target_emb=emb) == (0.0, 2.0)


def test_linear_navigation_known_answers():
    """Leaves stored as their first node turned around (leaf = -a1 R, R a rotation): cosine ranks
    the own first node last when R = I, one linear map fitted on the 6 training arms finds every
    held-out one; held-out leaves that point at each other's first node are all missed."""
    _, _, arms = path_star(8, 4, seed=0)  # 8 arms: root, a1, a2, leaf
    train, test = arms[:6], arms[6:]
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1 + 8 * 3, 4, generator=g)
    R = torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
    for rotation, ranked_last in ((torch.eye(4), (0.0, 8.0)), (R, None)):
        for arm in arms:
            emb[arm[-1]] = -emb[arm[1]] @ rotation
        if ranked_last:
            assert navigation_score(emb, test, arms) == ranked_last
        assert linear_navigation(emb, train, test, arms) == (1.0, 1.0)
    for arm, other in zip(test, test[::-1]):  # the two held-out leaves swap first nodes
        emb[arm[-1]] = -emb[other[1]] @ R
    assert linear_navigation(emb, train, test, arms)[0] == 0.0
    # the fit sees the training arms only: their own leaves are found whatever the held-out ones do
    assert linear_navigation(emb, train, train, arms) == (1.0, 1.0)


def test_arm_parts_rebuild_the_arms():
    """Node j of arm a = the part equal on every arm + sum_k phi[j, k] parts[a, k]."""
    _, _, arms = path_star(5, 5, seed=0)
    E = torch.randn(21, 6, generator=torch.Generator().manual_seed(0))
    mu, parts = arm_parts(E, arms)
    phi = arm_modes(4)[1]
    A = E[torch.tensor(arms)[:, 1:]]
    assert torch.allclose(A.mean(0) + torch.einsum("lk,akc->alc", phi, parts), A, atol=1e-5)
    assert mu.tolist() == arm_modes(4)[0].tolist()


def test_zigzag_reflection_known_answers():
    """Each arm in the smoothest mode along its own axis and in the most zigzag mode, twice as
    strong, along a second axis of its own: leaf and a1 get opposite signs there, so by cosine the
    own first node ranks last among the 6 (the others are orthogonal). Reflecting the directions
    where the zigzag outweighs the smooth part turns every leaf back onto its own first node."""
    d = 6
    _, _, arms = path_star(d, 5, seed=0)  # 4 nodes per arm: the leaf 3 hops below a1
    phi = arm_modes(4)[1]
    emb = torch.zeros(1 + 4 * d, 2 * d)
    for i, arm in enumerate(arms):
        emb[arm[1:], i] = phi[:, 0]
        emb[arm[1:], d + i] = 2 * phi[:, -1]
    assert navigation_score(emb, arms, arms) == (0.0, float(d))
    W = zigzag_reflection(emb, arms)
    assert torch.allclose(W @ W, torch.eye(2 * d, dtype=W.dtype), atol=1e-6)  # a reflection
    assert navigation_score(emb, arms, arms, readout=W) == (1.0, 1.0)
    smooth = emb.clone()
    smooth[:, d:] = 0  # no zigzag: nothing to reflect
    assert torch.allclose(zigzag_reflection(smooth, arms), torch.eye(2 * d, dtype=W.dtype))


def test_hop_cosine_known_answers():
    """Each arm on two axes of its own, alternating along it (a zigzag): nodes 2 hops apart are
    alike (1), 1 and 3 hops apart orthogonal (0), as are nodes of different arms; with one axis
    per arm every pair of an arm is alike. A random embedding against the pairs counted one by one."""
    _, _, arms = path_star(4, 5, seed=0)  # 4 arms of 4 nodes after the root
    eye = torch.eye(8)
    zigzag = torch.zeros(17, 8)
    for i, arm in enumerate(arms):
        for j, node in enumerate(arm[1:]):
            zigzag[node] = eye[2 * i + j % 2]
    assert hop_cosine(zigzag, arms) == (pytest.approx([0.0, 1.0, 0.0]), pytest.approx(0.0))
    # the leaf is 3 hops from a1 (orthogonal, tied with every other first node: ranked last) and
    # 2 hops from a2 (its own axis)
    assert navigation_score(zigzag, arms, arms) == (0.0, 4.0)
    assert navigation_score(zigzag, arms, arms, source=-1, target=-3) == (1.0, 1.0)
    blocks = torch.zeros(17, 8)
    for i, arm in enumerate(arms):
        blocks[arm[1:]] = eye[i] * (i + 1)  # the norm does not count
    assert hop_cosine(blocks, arms) == (pytest.approx([1.0, 1.0, 1.0]), pytest.approx(0.0))
    emb = torch.randn(17, 8, generator=torch.Generator().manual_seed(0))
    cos = cosine_matrix(emb)
    nodes = [(i, j, node) for i, arm in enumerate(arms) for j, node in enumerate(arm[1:])]
    by_hop = [[float(cos[u, v]) for i, j, u in nodes for k, m, v in nodes if i == k and m - j == h]
              for h in (1, 2, 3)]
    cross = [float(cos[u, v]) for i, _, u in nodes for k, _, v in nodes if i != k]
    hops, c = hop_cosine(emb, arms)
    assert hops == pytest.approx([np.mean(x) for x in by_hop], abs=1e-6)
    assert c == pytest.approx(np.mean(cross), abs=1e-6)


def test_hop_cosine_across_two_layers():
    """With an output layer's rows: each node on an axis of its own, and its output row on the axis of
    the next node of its arm (the leaf's: an axis of its own). A node's input row then meets the
    output row of the node 1 hop before it (one direction of two: 0.5), no other; with the same rows
    in both layers h = 0 is 1 and the rest is the one-layer measure. A random pair against the pairs
    counted one by one."""
    _, _, arms = path_star(4, 5, seed=0)  # 4 arms of 4 nodes after the root
    eye = torch.eye(20)
    E, U = torch.zeros(17, 20), torch.zeros(17, 20)
    for i, arm in enumerate(arms):
        for j, node in enumerate(arm[1:]):
            E[node] = eye[4 * i + j]
            U[node] = eye[4 * i + j + 1] if j < 3 else eye[16 + i]
    assert hop_cosine(E, arms, U) == (pytest.approx([0.0, 0.5, 0.0, 0.0]), pytest.approx(0.0))
    emb = torch.randn(17, 8, generator=torch.Generator().manual_seed(0))
    hops, cross = hop_cosine(emb, arms)
    assert hop_cosine(emb, arms, emb) == (pytest.approx([1.0] + hops), pytest.approx(cross))
    head = torch.randn(17, 8, generator=torch.Generator().manual_seed(1))
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(head, dim=1).T
    nodes = [(i, j, node) for i, arm in enumerate(arms) for j, node in enumerate(arm[1:])]
    by_hop = [[float(cos[u, v]) for i, j, u in nodes for k, m, v in nodes if i == k and abs(m - j) == h]
              for h in (0, 1, 2, 3)]
    other_arms = [float(cos[u, v]) for i, _, u in nodes for k, _, v in nodes if i != k]
    hops, cross = hop_cosine(emb, arms, head)
    assert hops == pytest.approx([np.mean(x) for x in by_hop], abs=1e-6)
    assert cross == pytest.approx(np.mean(other_arms), abs=1e-6)


def test_arm_spectrum_known_answers():
    """One arm of a1 and a leaf: (D^-1 A + A D^-1) = [[0, 1/2 + 1], [1/2 + 1, 0]] with the root
    held at 0, so mu = +-1.5 with modes (1, 1) (smooth) and (1, -1) (zigzag). Weights summing to 0
    over the arms put all the energy in one mode; on longer arms the shares equal the dense
    eigendecomposition's (`laplacian_eigs`), summed over each mode's d - 1 copies."""
    _, _, arms = path_star(4, 3, seed=0)
    c = torch.tensor([1.0, -2.0, 3.0, -2.0])  # sums to 0: no part equal on every arm
    smooth, zigzag = torch.zeros(9, 2), torch.zeros(9, 2)
    for a, arm in enumerate(arms):
        smooth[arm[1:], 1] = c[a]
        zigzag[arm[1], 0], zigzag[arm[2], 0] = c[a], -c[a]
    mu, share, zz = arm_spectrum(smooth, arms)
    assert mu.tolist() == pytest.approx([1.5, -1.5]) and share.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert float(zz) == pytest.approx(0.0, abs=1e-6)
    _, share, zz = arm_spectrum(zigzag, arms)
    assert share.tolist() == pytest.approx([0.0, 1.0], abs=1e-6) and float(zz) == pytest.approx(1.0)
    same = smooth.clone()
    same[[arm[1] for arm in arms], 0] = 1.0  # equal on every arm: in no arm mode, but in ||E - mean||^2
    # (channel 1: 2 * sum(c^2) = 36; channel 0, centred over the 9 nodes: 4 (5/9)^2 + 5 (4/9)^2 = 20/9)
    assert arm_spectrum(same, arms)[1].tolist() == pytest.approx([36 / (36 + 20 / 9), 0.0], abs=1e-6)
    for d, l in [(6, 5), (7, 4)]:
        g, _, arms = path_star(d, l, seed=1)
        E = np.random.default_rng(0).normal(size=(g.number_of_nodes(), 8))
        mu, share, zz = arm_spectrum(E, torch.tensor(arms))  # as --zigzag-penalty passes arms
        evals, V = laplacian_eigs(g)  # of D^-1 A + A D^-1 - 2I
        energy = spectral_energy(E - E.mean(0), V)
        copies = [np.abs(evals + 2 - m) < 1e-5 for m in mu.tolist()]
        assert [int(k.sum()) for k in copies] == [d - 1] * (l - 1)
        assert share.tolist() == pytest.approx([energy[k].sum() for k in copies], abs=1e-6)
        negative = [energy[k].sum() for k, m in zip(copies, mu.tolist()) if m < -1e-6]  # arm modes only
        assert float(zz) == pytest.approx(sum(negative), abs=1e-6)


def test_zigzag_share_descends():
    """The zigzag share is differentiable in the embeddings (--zigzag-penalty): gradient steps on
    it alone take a random embedding's 0.5 (two of four arm modes at mu < 0) towards 0."""
    _, _, arms = path_star(20, 5, seed=0)
    E = torch.randn(81, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    opt = torch.optim.SGD([E], lr=10.0)
    start = float(arm_spectrum(E.detach(), arms)[2])
    for _ in range(50):
        opt.zero_grad()
        arm_spectrum(E, arms)[2].backward()
        opt.step()
    assert 0.3 < start < 0.7 and float(arm_spectrum(E.detach(), arms)[2]) < 0.05


def test_cosine_matrix():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert torch.allclose(cosine_matrix(a), torch.tensor([[1.0, 0, -1], [0, 1, 0], [-1, 0, 1]]))


# ----------------------------------------------------------------------------- the training step

SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}


class OpRecorder(TorchDispatchMode):
    """Records every aten op and whether it indexes with a bool tensor (a hidden nonzero)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        flat = [a for x in args for a in (x if isinstance(x, (list, tuple)) else [x])]
        if name.startswith("aten.index") and any(torch.is_tensor(a) and a.dtype == torch.bool for a in flat):
            name += "[bool]"
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


def tiny_task(seed=0):
    """G(12, 4) edges and first-token-only paths, as exp_pathstar builds them."""
    _, _, arms = path_star(12, 4, seed=seed)
    train_arms, _ = split_arms(arms, 0.75, seed=seed)
    vocab = Vocab(1 + 12 * 3)
    groups = [edge_group(arm_edges(arms, "both"), vocab),
              path_group(path_prompts([a[-1] for a in train_arms], vocab, 2), path_targets(train_arms), True)]
    return vocab, [loss_tail(*g) for g in groups]


@pytest.mark.parametrize("pack", [False, True])
def test_training_step_never_syncs(pack):
    """No op that waits for the GPU on CUDA runs inside a step: no .item(), no bool-mask indexing,
    no nonzero (the step can be replayed from a CUDA graph)."""
    vocab, groups = tiny_task()
    model = tiny_gpt(vocab_size=vocab.size, learned_positions=pack)
    opt = make_optimizer(model, 1e-3, 0.1)
    sampler = GroupSampler(groups, 16, torch.Generator().manual_seed(0))
    packing = Packing.for_sampler(sampler, model) if pack else None
    step = Stepper(model, opt, groups, grad_clip=1.0, packing=packing)
    recorder = OpRecorder()
    for i, rows in enumerate(sampler.epoch()):
        with recorder:
            set_lr(opt, 1e-3 * (i + 1))
            step(rows)
    assert "aten.addmm" in recorder.ops or "aten.mm" in recorder.ops  # the recorder sees the step
    assert "aten._fused_adamw_" in recorder.ops  # one fused optimizer kernel
    bad = [op for op in recorder.ops if op in SYNC_OPS or op.endswith("[bool]")]
    assert not bad
    assert all(g["lr"].item() == pytest.approx(1e-3 * sampler.steps_per_epoch) for g in opt.param_groups)


def test_old_style_step_would_be_caught():
    """The recorder flags what the step must avoid: a count read on the host, a bool mask."""
    y = torch.tensor([[-1, 3], [-1, 4]])
    recorder = OpRecorder()
    with recorder:
        int((y >= 0).sum())
        torch.randn(2, 2)[y >= 0]
    assert "aten._local_scalar_dense" in recorder.ops and any(op.endswith("[bool]") for op in recorder.ops)


def train_losses(compile, steps=6, state=None, pack=False, batch_size=16, heads=True, bf16_weights=None,
                 aux_of=None, **model_kw):
    vocab, groups = tiny_task()
    model = tiny_gpt(vocab_size=vocab.size, **model_kw)
    if state:
        model.load_state_dict(state)
    opt = make_optimizer(model, 3e-3, 0.1)
    sampler = GroupSampler(groups, batch_size, torch.Generator().manual_seed(0))
    packing = Packing.for_sampler(sampler, model) if pack else None
    if pack:  # both groups start with one token ([EDGE], [PATH]): shared heads unless told not to
        assert [h for h, *_ in packing.layout] == [1, 1]
        if not heads:
            shapes = [(n, X.shape[1], Y.shape[1]) for (X, Y), n in zip(groups, sampler.shares)]
            packing = Packing(shapes, "cpu")
    step = Stepper(model, opt, groups, 1.0, compile=compile, packing=packing, bf16_weights=bf16_weights,
                   aux=aux_of and aux_of(model))
    losses = []
    for rows in itertools.islice(forever(sampler), steps):
        step(rows)
        losses.append(step.stats[0].item() / step.stats[2].item())
        step.stats.zero_()
    return losses, model


def test_compiled_step_matches_eager():
    eager, _ = train_losses(compile=False)
    compiled, model = train_losses(compile=True)
    assert eager[-1] < eager[0]  # it trains
    assert compiled == pytest.approx(eager, abs=1e-4)
    # the compiled run's weights keep the plain keys: an eager model loads them
    assert not any("_orig_mod" in k for k in model.state_dict())
    resumed, _ = train_losses(compile=False, steps=1, state=model.state_dict())
    assert resumed[0] < eager[0]


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_weights_step_matches_autocast(monkeypatch, compile):
    """The CUDA step's bf16 weight copies (`Bf16Weights`) do autocast's arithmetic without its
    casts: under bf16 autocast on the CPU, the same losses and weights as the plain step, packed,
    with an aux loss on a Linear weight (added to the copies' gradient) and on the embedding."""
    monkeypatch.setattr(common, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    aux_of = lambda m: lambda: 0.1 * m.blocks[0].mlp.fc.weight.square().sum() + m.wte.weight.square().mean()
    runs = [train_losses(compile, pack=True, bf16_weights=w16, aux_of=aux_of) for w16 in (False, True)]
    (plain, plain_model), (w16, w16_model) = runs
    assert plain[-1] < plain[0]  # it trains
    assert w16 == pytest.approx(plain, abs=1e-6)
    for a, b in zip(plain_model.parameters(), w16_model.parameters()):
        assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, atol=1e-6)
    without_aux, _ = train_losses(compile, steps=2, pack=True, bf16_weights=True)
    assert without_aux[1] != pytest.approx(w16[1], abs=1e-6)  # the aux loss reached the weights


def test_padded_logits_known_answer():
    """The head's product with the vocabulary padded to a multiple of 64 (on CUDA) is h @ wte^T,
    values and gradients."""
    model = tiny_gpt(vocab_size=37)
    h = torch.randn(3, 5, 16, requires_grad=True)
    out = {m: model.logits(h, multiple=m) for m in (1, 64)}
    assert out[64].shape == (3, 5, 37)
    assert torch.equal(out[1], h @ model.wte.weight.T)
    assert torch.allclose(out[64], out[1], atol=1e-6)
    g = torch.randn(3, 5, 37)
    grads = {m: torch.autograd.grad(out[m], [h, model.wte.weight], g) for m in (1, 64)}
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[1], grads[64]))


SHORT_ATTENTION_CHECK = """
import os, torch, common
from common import GPT, GPTConfig, GroupSampler, Packing, forever
from test_common import tiny_task

def both(fn):  # fn() with the Triton kernel (interpreted on the CPU), then with the explicit attention
    out = fn()
    os.environ["TRITON_INTERPRET"] = "0"
    ref = fn()
    os.environ["TRITON_INTERPRET"] = "1"
    return out, ref

torch.manual_seed(0)
for T, C, H in [(8, 16, 2), (5, 24, 4), (16, 32, 8)]:  # D = 8, 6, 4; T and D padded inside
    attn = common.CausalSelfAttention(GPTConfig(vocab_size=5, block_size=16, n_head=H, n_embd=C))
    x, g = torch.randn(3, T, C, requires_grad=True), torch.randn(3, T, C)
    for compile in (False, True):
        f = torch.compile(attn) if compile else attn
        (y, gx), (y_ref, gx_ref) = both(lambda: (lambda y: (y, torch.autograd.grad(y, x, g)[0]))(f(x)))
        assert (y - y_ref).abs().max() < 1e-6 and (gx - gx_ref).abs().max() < 1e-6, (T, C, H, compile)

# --bench reports the kernel from the ops a step ran (bench.json's triton_attention)
ops = common.profile_step(lambda: attn(x).sum().backward(), "cpu")[3]
assert any(op == "geomem::short_attention" for op, _, _ in ops), [op for op, _, _ in ops][:20]

vocab, groups = tiny_task()  # a packed step: block-diagonal mask with shared heads
sampler = GroupSampler(groups, 16, torch.Generator().manual_seed(0))
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=vocab.size, block_size=16, n_layer=2, n_head=2, n_embd=16))
packing = Packing.for_sampler(sampler, model)
[(X, Y)] = packing(common.take(groups, next(forever(sampler))))
def loss_and_grads():
    _, loss = model(X, Y, packing)
    return [loss] + list(torch.autograd.grad(loss, list(model.parameters())))
out, ref = both(loss_and_grads)
assert all((a - b).abs().max() < 1e-6 for a, b in zip(out, ref))
print("ok")
"""


def test_short_attention_kernel_matches_explicit_attention():
    """The Triton attention (CUDA's path for T <= 16) equals the explicit attention, values and
    gradients, causal and packed, eager and compiled: run by Triton's interpreter on the CPU."""
    pytest.importorskip("triton")
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
    done = subprocess.run([sys.executable, "-c", SHORT_ATTENTION_CHECK], capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path), timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_kernels_switch_turns_the_triton_attention_off():
    """GEOMEM_KERNELS=0 (the fallback of .ci/gpu) keeps the explicit attention where the Triton
    kernel would run; unset or 1, the kernel runs."""
    pytest.importorskip("triton")
    check = ("import torch, common; from common import GPTConfig; "
             "a = common.CausalSelfAttention(GPTConfig(vocab_size=5, block_size=8, n_head=2, n_embd=8)); "
             "x = torch.randn(2, 4, 8); ops = common.profile_step(lambda: a(x).sum().backward(), 'cpu')[3]; "
             "print(common.KERNELS, common.triton_runs(x), any('short_attention' in op for op, _, _ in ops))")
    for value, want in ((None, "True True True"), ("1", "True True True"), ("0", "False False False")):
        env = {k: v for k, v in os.environ.items() if k != "GEOMEM_KERNELS"}
        env.update(TRITON_INTERPRET="1", PYTHONPATH=ROOT, **({"GEOMEM_KERNELS": value} if value else {}))
        done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0 and done.stdout.strip() == want, (value, done.stdout, done.stderr[-2000:])


def test_packing_layout_known_answer():
    """5 edge rows (L = 2, loss on the last token) and 2 path rows (L = 4) pack into rows of 4:
    edges two to a row (the 6th slot is a padding row), paths one to a row."""
    p = Packing([(5, 2, 1), (2, 4, 1)], "cpu")
    assert p.layout == [(0, 2, 1, 0), (0, 1, 0, 0)]  # (head, segments, padding rows, padding tokens)
    assert p.positions.tolist() == [[0, 1, 0, 1]] * 3 + [[0, 1, 2, 3]] * 2
    # row j of the edges sits in packed row j // 2 at column 2 * (j % 2) + 1; paths at column 3
    assert p.loss_index.tolist() == [1, 3, 5, 7, 9, 15, 19]
    two = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert p.mask[:, 0].int().tolist() == [two] * 3 + [torch.ones(4, 4).tril().int().tolist()] * 2
    X, Y = torch.arange(10).view(5, 2), torch.arange(5).view(5, 1)
    Xp, Yp = torch.arange(8).view(2, 4) + 20, torch.tensor([[7], [8]])
    [(packed, targets)] = p([(X, Y), (Xp, Yp)])
    assert packed.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0], [20, 21, 22, 23], [24, 25, 26, 27]]
    assert targets.tolist() == [0, 1, 2, 3, 4, 7, 8]


def test_packing_shares_heads_known_answer():
    """The same rows, each group's first token shared: a packed row is [EDGE] and then three
    edges' second tokens (the 6th slot a padding row), each attending to the head and itself;
    a path row is as it was."""
    p = Packing([(5, 2, 1), (2, 4, 1)], "cpu", heads=[True, True])
    assert p.layout == [(1, 3, 1, 0), (1, 1, 0, 0)]
    assert p.positions.tolist() == [[0, 1, 1, 1]] * 2 + [[0, 1, 2, 3]] * 2
    assert p.loss_index.tolist() == [1, 2, 3, 5, 6, 11, 15]
    head_and_self = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
    assert p.mask[:, 0].int().tolist() == [head_and_self] * 2 + [torch.ones(4, 4).tril().int().tolist()] * 2
    X, Y = torch.stack([torch.full((5,), 30), torch.arange(1, 6)], 1), torch.arange(5).view(5, 1)
    Xp, Yp = torch.tensor([[31, 10, 11, 12], [31, 13, 14, 15]]), torch.tensor([[7], [8]])
    [(packed, targets)] = p([(X, Y), (Xp, Yp)])
    assert packed.tolist() == [[30, 1, 2, 3], [30, 4, 5, 0], [31, 10, 11, 12], [31, 13, 14, 15]]
    assert targets.tolist() == [0, 1, 2, 3, 4, 7, 8]


def test_packing_shares_heads_only_where_it_may():
    """A head is shared where every row of a group starts with one token, that token carries no
    loss, and the model has no dropout."""
    gen = torch.Generator().manual_seed(0)
    same = (torch.tensor([[30, 1], [30, 2]]), torch.tensor([[5], [6]]))
    mixed = (torch.tensor([[30, 1], [31, 2]]), torch.tensor([[5], [6]]))
    loss_on_head = (torch.tensor([[30, 1], [30, 2]]), torch.tensor([[5, 1], [6, 2]]))
    sampler = GroupSampler([same, mixed, loss_on_head], 6, gen)
    heads = lambda model: [h for h, *_ in Packing.for_sampler(sampler, model).layout]
    assert heads(tiny_gpt(vocab_size=32)) == [1, 0, 0]
    assert heads(tiny_gpt(vocab_size=32, dropout=0.1)) == [0, 0, 0]


def test_packing_pads_rows_that_do_not_divide():
    """L = 3 into T = 8: two segments and 2 padding tokens (a segment of their own) per row; a
    full-path group's 3 loss positions are the last 3 of each segment."""
    p = Packing([(3, 3, 3), (1, 8, 3)], "cpu")
    assert p.layout == [(0, 2, 1, 2), (0, 1, 0, 0)]
    assert p.positions[0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]  # the padding's positions: any
    assert p.loss_index.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 21, 22, 23]
    m = p.mask[0, 0]
    assert not m[3, :3].any() and m[3, 3] and not m[6, :6].any() and m[7, 6:].all()  # segments apart
    # with a shared head: three segments of 2 after it, 1 padding token; the losses on both
    p = Packing([(3, 3, 2), (1, 8, 3)], "cpu", heads=[True, True])
    assert p.layout == [(1, 3, 0, 1), (1, 1, 0, 0)]
    assert p.positions[0].tolist() == [0, 1, 2, 1, 2, 1, 2, 1]
    assert p.loss_index.tolist() == [1, 2, 3, 4, 5, 6, 13, 14, 15]
    m = p.mask[0, 0]
    assert m[:, 0].all() and m[4].tolist() == [1, 0, 0, 1, 1, 0, 0, 0] and m[7, 1:].tolist() == [0] * 6 + [1]


@pytest.mark.parametrize("learned,short,heads", [(False, True, True), (True, True, True),
                                                 (False, False, True), (False, True, False),
                                                 (False, False, False)])
def test_packed_step_matches_unpacked(learned, short, heads, monkeypatch):
    """Packing changes only how a step is laid out: the losses and the weights after 6 steps are
    the unpacked ones (heads shared or not, positions fixed or learned, explicit or fused
    attention with a mask; a batch of 20 leaves padding rows)."""
    if not short:
        monkeypatch.setattr(CausalSelfAttention, "SHORT", 0)
    plain, model = train_losses(False, batch_size=20, learned_positions=learned)
    packed, packed_model = train_losses(False, pack=True, batch_size=20, heads=heads,
                                        learned_positions=learned)
    assert packed == pytest.approx(plain, abs=1e-5)
    for a, b in zip(model.parameters(), packed_model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_compiled_packed_step_matches_eager():
    eager, _ = train_losses(compile=False)
    compiled, _ = train_losses(compile=True, pack=True)
    assert compiled == pytest.approx(eager, abs=1e-4)


@pytest.mark.parametrize("T", [1, 2, 8, 16, 17, 24])
def test_short_attention_matches_fused(T):
    """The explicit T x T attention of short sequences equals torch's fused kernel."""
    model = tiny_gpt(block_size=32).eval()
    attn = model.blocks[0].attn
    x = torch.randn(3, T, 16)
    got = attn(x)
    short, attn.SHORT = attn.SHORT, 0  # force the fused kernel
    want = attn(x)
    attn.SHORT = short
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_constant_or_nan_model_scores_nothing(value):
    """Ties and non-finite values count against the model in every rank measure here."""
    vocab = Vocab(4)

    class Constant(torch.nn.Module):
        def forward(self, idx):
            return torch.full((len(idx), vocab.size), value)
    assert edge_recall(Constant(), np.array([[0, 1], [1, 2], [2, 0]]), vocab, "cpu") == 0.0
    _, _, arms = path_star(5, 4, seed=0)
    top1, rank = navigation_score(torch.full((16, 8), value), arms, arms)
    assert top1 == 0.0 and rank == 5.0  # last of the 5 children
    scores = torch.tensor([[1.0, 2.0, 2.0], [3.0, 1.0, float("inf")]])
    assert top_k_hits(scores, torch.tensor([1, 0]), torch.tensor([1, 2])).tolist() == [False, False]
    assert top_k_hits(scores, torch.tensor([1, 0]), torch.tensor([2, 2])).tolist() == [True, False]


def test_spectral_share_known_answers():
    """1 for an embedding made of the top eigenvectors (mixed by any matrix), about k/N for a
    random one, and blind to a shift of every row by the same vector."""
    from common import laplacian_eigs, spectral_share
    g, _, _ = path_star(30, 4, seed=0)
    _, V = laplacian_eigs(g)
    N, k = V.shape[0], 12
    top = V[:, :k]
    E = top @ np.random.default_rng(0).normal(size=(k, 8))
    assert spectral_share(E, top) == pytest.approx(1.0)
    assert spectral_share(E + 5.0, top) == pytest.approx(1.0)
    random = [spectral_share(np.random.default_rng(s).normal(size=(N, 64)), top) for s in range(5)]
    assert np.mean(random) == pytest.approx(k / (N - 1), rel=0.25)
    assert spectral_share(V[:, k:k + 8], top) == pytest.approx(0.0, abs=1e-6)  # lower eigenvectors: none


def test_plot_panels_wraps_rows_of_three(tmp_path):
    import matplotlib.image
    from common import plot_panels
    from conftest import figure_ok
    line = ([0, 1, 2], [0.1, 0.5, 0.9], "run")
    for n, rows in ((2, 1), (3, 1), (4, 2), (6, 2)):
        path = tmp_path / f"p{n}.png"
        plot_panels(path, [(f"panel {i}", "accuracy", [line], 0.1) for i in range(n)], "title")
        h, w = matplotlib.image.imread(str(path)).shape[:2]
        assert figure_ok(path) and round(h / 400) == rows and w <= (5.2 * 3 + 1.2) * 100 + 1


def test_plot_panels_integer_values_get_integer_ticks(tmp_path, monkeypatch):
    """A panel whose every value is a whole number (a block index) gets whole-number y ticks only."""
    from common import plot_panels
    figs = []
    monkeypatch.setattr(common, "save_figure", lambda fig, path, dpi: figs.append(fig))
    plot_panels(tmp_path / "p.png", [("blocks", "block", [([0, 1, 2], [3, 2, 1], "run")], None),
                                     ("shares", "share", [([0, 1, 2], [0.1, 0.2, 0.3], "run")], None)], "t")
    blocks, shares = figs[0].axes[:2]
    assert all(float(t).is_integer() for t in blocks.get_yticks())
    assert not all(float(t).is_integer() for t in shares.get_yticks())


def test_summary_markdown_known_answers():
    """--seeds tables: mean [min, max], or each seed's value where one is missing."""
    rows = {s: {"speed": {"grid tinygpt": {"first_step_all_edges": step, "final_geometric_level": level}}}
            for s, step, level in [(0, 100, -0.1), (1, None, 0.2), (2, 130, 0.5)]}
    md = summary_markdown(rows, [0, 1, 2])
    assert "| row | first step all edges | final geometric level |" in md
    assert "| grid tinygpt | 100 / – / 130 | +0.200 [-0.100, +0.500] |" in md


def test_curve_band_known_answers():
    """Seed bands: the mean, min and max at the x every seed recorded; a value is a key or a function
    of the record, x any key (epochs, steps)."""
    a = [{"epoch": 1, "acc": 0.0, "pos": [1, 2]}, {"epoch": 2, "acc": 0.5, "pos": [3, 4]}]
    b = [{"epoch": 2, "acc": 1.0, "pos": [5, 8]}, {"epoch": 3, "acc": 1.0, "pos": [0, 0]}]
    xs, mean, (lo, hi) = curve_band([a, b], "acc")
    assert xs == [2] and mean.tolist() == [0.75] and lo.tolist() == [0.5] and hi.tolist() == [1.0]
    xs, mean, (lo, hi) = curve_band([a, a], lambda h: h["pos"][1])
    assert xs == [1, 2] and mean.tolist() == lo.tolist() == hi.tolist() == [2.0, 4.0]
    steps = [[{"step": 0, "g": 4.0}, {"step": 10, "g": 1.0}], [{"step": 0, "g": 2.0}, {"step": 10, "g": 3.0}]]
    xs, mean, (lo, hi) = curve_band(steps, "g", x="step")
    assert xs == [0, 10] and mean.tolist() == [3.0, 2.0]
    assert lo.tolist() == [2.0, 1.0] and hi.tolist() == [4.0, 3.0]
