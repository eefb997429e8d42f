"""Shared pieces of the experiments of "Deep sequence models tend to memorize geometrically;
it is unclear why" (arXiv 2510.26745). Science first, plumbing last:

  graphs               path-star G(d, l), its leaf split, tree-star T(d, b, l)
  tiny graphs          the four graphs of App. B.2.2 / C.3
  graph spectra        adjacency, D^-1 A + A D^-1 - 2I and its eigenvectors (App. F, B.5)
  tokens and datasets  vocabulary, edge and path examples as (X, Y) groups
  Transformer          a nanoGPT-style GPT (and TiedLM, the forward every model trains with)
  Mamba                a pure-PyTorch Mamba with a readable and a fast selective scan
  Node2Vec             the 2-layer model of §4 and its full-batch trainer
  training             sampler, packing, fused AdamW, the sync-free step (eager / compiled / CUDA graph),
                       train()
  evaluation           greedy decoding and the rank measures (ties and NaN count against the model)
  geometry             cosine similarities, the navigation score, cosine by hop distance, token embeddings
  flags and errors     one-line errors, presets, devices, output folders
  checkpoints          save, resume, which flags may change on resume
  seeds                mean / min / max over --seeds
  benchmarking         --bench: step modes, MFU, launches
  plotting             matplotlib helpers shared by every script's figures

Shape glossary
  N   graph nodes; node id i is also token id i
  V   vocabulary size = N + len(SPECIALS)
  B   batch size (rows of one example group), T sequence length, C model width
  k   loss positions at the end of each row of a group (`loss_tail`)
A "group" is a pair (X, Y) of LongTensors (B, T): inputs and next-token targets, -1 = no loss.
All rows of a group have the same length, so batches carry no padding; training cuts Y to its
last k positions, where every group has its losses, so logits are a static slice. With `--pack`
(`Packing`) a step's groups share one forward: short rows side by side, a block-diagonal mask,
each group's shared first token ([EDGE], [PATH]) once per row.
"""
import argparse
import functools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

try:  # CUDA builds of torch bring Triton (the short attention's kernel); without it nothing needs it
    import triton
    import triton.language as tl
except ImportError:
    triton = None
# GEOMEM_KERNELS=0 turns off the four GPU kernels of docs/performance.md (the Triton attention, bf16
# weight copies, combo kernels, the padded vocabulary): the step as it ran before them, a fallback
# should one fail on a machine (.ci/gpu) and a same-machine baseline for --bench. Same losses.
KERNELS = os.environ.get("GEOMEM_KERNELS", "1") != "0"

# ----------------------------------------------------------------------------- graphs


def path_star(d, l, seed=0):
    """G(d, l): a root with d disjoint arms; l counts the nodes of a root-to-leaf path incl. the
    root, so there are 1 + d(l-1) nodes. Ids are a random permutation (§2.1: ids carry no
    structure). Returns (graph, root, arms) with each arm a node-id list, root first."""
    if d < 1 or l < 2:
        raise ValueError(f"path-star needs d >= 1 and l >= 2, got d={d}, l={l}")
    perm = np.random.default_rng(seed).permutation(1 + d * (l - 1)).tolist()
    root = perm[0]
    arms = [[root] + perm[1 + i * (l - 1): 1 + (i + 1) * (l - 1)] for i in range(d)]
    graph = nx.Graph()
    graph.add_nodes_from(range(len(perm)))
    for arm in arms:
        nx.add_path(graph, arm)
    return graph, root, arms


def split_arms(arms, train_frac=0.75, seed=0):
    """Seeded leaf split (§2.1: 75% of the leaves get path supervision, 25% are held out)."""
    order = np.random.default_rng(seed + 1).permutation(len(arms))
    n_train = int(round(train_frac * len(arms)))
    if not 0 < n_train < len(arms):
        raise ValueError(f"train fraction {train_frac} leaves an empty split for {len(arms)} arms")
    return [arms[i] for i in sorted(order[:n_train])], [arms[i] for i in sorted(order[n_train:])]


def tree_star(d, b, l, seed=0):
    """Tree-star T(d, b, l) (App. C.2): a root with d children, every non-leaf below the root
    has b children, all leaves at depth l-1; 1 + d(b^(l-1) - 1)/(b - 1) nodes for b > 1
    (b = 1 is a path-star). Ids are a random permutation. Returns (graph, root, paths, edges):
    every root-to-leaf path (root first, grouped by first node) and the (E, 2) parent->child
    edges."""
    if d < 1 or b < 1 or l < 2:
        raise ValueError(f"tree-star needs d, b >= 1 and l >= 2, got d={d}, b={b}, l={l}")
    sizes = [1] + [d * b ** (k - 1) for k in range(1, l)]  # nodes per depth
    perm = np.random.default_rng(seed).permutation(sum(sizes))
    levels = np.split(perm, np.cumsum(sizes)[:-1])
    root = int(levels[0][0])
    # node j at depth k >= 2 hangs under node j // b at depth k-1; depth-1 nodes under the root
    parents = [np.full(d, root)] + [levels[k - 1][np.arange(sizes[k]) // b] for k in range(2, l)]
    edges = np.stack([np.concatenate(parents), np.concatenate(levels[1:])], 1).astype(np.int64)
    leaf = np.arange(sizes[-1])
    paths = np.stack([np.full(sizes[-1], root)] + [levels[k][leaf // b ** (l - 1 - k)] for k in range(1, l)], 1)
    graph = nx.Graph()
    graph.add_nodes_from(range(len(perm)))
    graph.add_edges_from(edges.tolist())
    return graph, root, paths.tolist(), edges


# ----------------------------------------------------------------------------- tiny graphs
# App. B.2.2 / C.3: the four tiny graphs, nodes 0..N-1 (graph.graph keeps what a plot needs).

# the fixed irregular graph: a 12-cycle 0..11 with chords (1,3) and (5,8), and a K4 on 12..15
IRREGULAR_EDGES = [(12, 15), (5, 8), (5, 6), (8, 9), (7, 8), (1, 3), (13, 14), (13, 15), (12, 14), (12, 13),
                   (1, 2), (4, 5), (3, 4), (10, 11), (0, 1), (2, 3), (6, 7), (11, 0), (9, 10), (14, 15)]
TINY_GRAPHS = ("path_star", "grid", "cycle", "irregular")


def grid_graph(rows, cols):
    """rows x cols lattice, node r * cols + c."""
    graph = nx.Graph(shape=(rows, cols))
    graph.add_nodes_from(range(rows * cols))
    graph.add_edges_from((r * cols + c, r * cols + c + 1) for r in range(rows) for c in range(cols - 1))
    graph.add_edges_from((r * cols + c, (r + 1) * cols + c) for r in range(rows - 1) for c in range(cols))
    return graph


def irregular_graph():
    graph = nx.Graph()
    graph.add_nodes_from(range(16))
    graph.add_edges_from(IRREGULAR_EDGES)
    return graph


def with_self_edges(graph):
    """A copy with a loop u -> u at every node (App. C.3.1, Fig. 25: self-edges damp zigzags)."""
    graph = graph.copy()
    graph.add_edges_from((v, v) for v in list(graph))
    return graph


def tiny_graph(name, self_edges=False, seed=0):
    """path_star: G(4, 5), 17 nodes with the seeded random ids of `path_star` (root and arms in
    graph.graph); grid: 4x4; cycle: 15 nodes; irregular: 16 nodes, 20 edges, two components."""
    if name == "path_star":
        graph, root, arms = path_star(4, 5, seed)
        graph.graph.update(root=root, arms=arms)
    elif name == "grid":
        graph = grid_graph(4, 4)
    elif name == "cycle":
        graph = nx.cycle_graph(15)
    elif name == "irregular":
        graph = irregular_graph()
    else:
        raise ValueError(f"unknown tiny graph {name!r}; choose from {', '.join(TINY_GRAPHS)}")
    return with_self_edges(graph) if self_edges else graph


# ----------------------------------------------------------------------------- graph spectra
# Conventions of App. F / B.5: A with a self loop counted once (one u -> u example), D = diag(A 1),
# the spectral basis is the eigenvectors of D^-1 A + A D^-1 - 2I sorted from the top.

DENSE_EIG_MAX = 2000  # above this many nodes, eigenpairs come from Lanczos (eigsh), top k only


def adjacency(graph, sparse=False):
    nodes = range(graph.number_of_nodes())
    if sparse:
        return nx.to_scipy_sparse_array(graph, nodelist=nodes, weight=None, format="csr").astype(np.float64)
    return nx.to_numpy_array(graph, nodelist=nodes, weight=None)


def walk_matrix(A):
    """D^-1 A + A D^-1, symmetric: the neighbour targets (rows of D^-1 A) plus their transpose."""
    d = np.asarray(A.sum(1)).ravel()
    if not isinstance(A, np.ndarray):  # scipy sparse
        import scipy.sparse
        inv = scipy.sparse.diags(1.0 / d)
        return (inv @ A + A @ inv).tocsr()
    return A / d[:, None] + A / d[None, :]


def neg_laplacian(A):
    """D^-1 A + A D^-1 - 2I: minus the symmetrised random-walk Laplacian (App. F), so the top
    eigenvectors (eigenvalue near 0) are the smooth, Fiedler-like ones."""
    W = walk_matrix(A)
    if isinstance(W, np.ndarray):
        return W - 2 * np.eye(len(W))
    import scipy.sparse
    return (W - 2 * scipy.sparse.identity(W.shape[0])).tocsr()


def laplacian_eigs(graph, k=None, dense_max=DENSE_EIG_MAX):
    """Eigenpairs of `neg_laplacian`, largest eigenvalue first: (eigenvalues (k,), vectors (N, k)).
    Dense eigh up to dense_max nodes (all N unless k is given), else the top k (default 200) by
    scipy.sparse.linalg.eigsh."""
    N = graph.number_of_nodes()
    if N <= dense_max:
        w, V = np.linalg.eigh(neg_laplacian(adjacency(graph)))
        w, V = w[::-1][:k], V[:, ::-1][:, :k]
    else:
        from scipy.sparse.linalg import eigsh
        w, V = eigsh(neg_laplacian(adjacency(graph, sparse=True)), k=min(k or 200, N - 1), which="LA")
        order = np.argsort(-w)
        w, V = w[order], V[:, order]
    return np.ascontiguousarray(w), np.ascontiguousarray(V)


def principal_angles(X, Y):
    """Principal angles (radians, ascending) between the column spaces of X and Y."""
    from scipy.linalg import subspace_angles
    return np.sort(subspace_angles(X, Y))


def spectral_energy(E, V):
    """Share of ||E||_F^2 along each orthonormal column v_i of V: |E^T v_i|^2 / ||E||_F^2 (Fig. 7)."""
    return ((V.T @ E) ** 2).sum(1) / (E ** 2).sum()


def coefficient_matrix(A, P):
    """App. F, Lemma 1: C = D^-1 A + A D^-1 - P - P^T with P = row-softmax(E E^T). The degree-
    normalised log-likelihood summed over sources has gradient C E; the mean loss -C E / N."""
    return walk_matrix(A) - P - P.T


# ----------------------------------------------------------------------------- tokens and datasets

# the paper's special tokens; PAD is never input here (a group has one length) but keeps the
# vocabulary, and with it every init, that of the runs reported; BLANK: teacherless input (App. A)
SPECIALS = ("EDGE", "PATH", "PAUSE", "PAD", "BLANK")


class Vocab:
    def __init__(self, num_nodes):
        self.num_nodes = num_nodes
        for i, name in enumerate(SPECIALS):
            setattr(self, name, num_nodes + i)
        self.size = num_nodes + len(SPECIALS)


def orient(edges, direction):
    """Edge examples from (E, 2) parent->child pairs: forward = parent->child, backward =
    child->parent, both = forward then backward."""
    out = {"forward": [edges], "backward": [edges[:, ::-1]], "both": [edges, edges[:, ::-1]]}[direction]
    return np.ascontiguousarray(np.concatenate(out))


def arm_edges(arms, direction):
    """(E, 2) array of [u, v] edge examples along the arms of a path-star."""
    pairs = [(a[i], a[i + 1]) for a in arms for i in range(len(a) - 1)]
    return orient(np.array(pairs, dtype=np.int64), direction)


def edge_group(edges, vocab):
    """`[EDGE] u -> v` with the loss on v only: X = [EDGE, u], Y = [-1, v]."""
    e = torch.as_tensor(edges)
    X = torch.stack([torch.full_like(e[:, 0], vocab.EDGE), e[:, 0]], 1)
    Y = torch.stack([torch.full_like(e[:, 0], -1), e[:, 1]], 1)
    return X, Y


def path_prompts(leaves, vocab, pauses):
    """(P, 2 + k): [PATH] leaf [PAUSE]*k."""
    leaves = torch.as_tensor(leaves).view(-1, 1)
    head = torch.tensor([vocab.PATH]).expand(len(leaves), 1)
    return torch.cat([head, leaves, torch.full((len(leaves), pauses), vocab.PAUSE)], 1)


def path_targets(arms, reverse=False):
    """(P, l) node sequences: root..leaf, or leaf..root when reversed (Fig. 34 left)."""
    t = torch.tensor(arms)
    return t.flip(1) if reverse else t


def path_group(prompts, targets, first_token_only=False):
    """Path examples `prompt target`; the loss is on every target token, or only on the first
    token after the start node (§2.2, 'first-token-only'), in which case the sequence is cut
    right after the input that predicts it."""
    seq = torch.cat([prompts, targets], 1)
    X, Y = seq[:, :-1].clone(), seq[:, 1:].clone()
    Y[:, : prompts.shape[1] - 1] = -1  # no loss inside the prompt
    if first_token_only:
        j = prompts.shape[1]  # Y[:, j] is targets[:, 1], the first hop
        X, Y = X[:, : j + 1], Y[:, : j + 1].clone()
        Y[:, :j] = -1
    return X, Y


# ----------------------------------------------------------------------------- Transformer


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 384
    dropout: float = 0.0
    attention: bool = True  # False: MLP-only blocks (tiny-graph models, App. B.2.2)
    freeze_embeddings: bool = False  # App. E.1 / associative control: token embeddings fixed
    learned_positions: bool = False  # True: a trained table, as B&N'24's in-context GPT (App. A)
    position_std: float = 0.02  # init of a trained table; both releases leave torch's N(0, 1)
    untied_head: bool = False  # True: an unembedding of its own (beyond the paper; §4.4: untied zigzags)


def sinusoidal_positions(T, C):
    """App. B.2.1: GPT-mid uses fixed sinusoidal positions (Vaswani et al. 2017)."""
    pos = torch.arange(T).float()[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, C, 2).float() / C)
    pe = torch.zeros(T, C)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : C // 2]
    return pe


class CausalSelfAttention(nn.Module):
    SHORT = 16  # up to this length the attention is the explicit product (see forward)

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "width must be divisible by heads"
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)
        causal = torch.ones(cfg.block_size, cfg.block_size).tril().bool()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x, mask=None):
        """mask: None (causal) or (B, 1, T, T), True where a position may attend (`Packing`)."""
        B, T, C = x.shape
        if T <= self.SHORT and triton_runs(x) and not (self.training and self.dropout):
            return self.resid_drop(self.proj(short_attention(self.qkv(x), mask, self.n_head)))
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if T > self.SHORT:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        else:  # fused attention kernels tile 64-128 positions: at T = 2..8 (edges, path prompts)
            # they were half of a G(5000, 5) step on an H200; the explicit T x T product is cheap,
            # and the reference of `short_attention`, which runs it on CUDA in one kernel
            mask = self.causal[:T, :T] if mask is None else mask
            att = (q @ k.transpose(-2, -1)) * k.shape[-1] ** -0.5
            att = F.dropout(att.masked_fill(~mask, float("-inf")).softmax(-1), p, self.training)
            y = att @ v
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn = CausalSelfAttention(cfg) if cfg.attention else None
        self.ln_1 = nn.LayerNorm(cfg.n_embd) if cfg.attention else None
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, mask=None):
        if self.attn is not None:
            x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class TiedLM(nn.Module):
    """A next-token model with tied input/output token embeddings `wte` (unless a subclass's
    `unembedding` says otherwise); subclasses define `hidden(idx)` -> (B, T, C). The forward is the
    one every model of the repository trains with."""

    def forward(self, idx, targets=None, packing=None):
        """No targets: logits of the last position (B, V). With targets (B, k), the next tokens of
        the last k positions (-1 = no loss): their logits (B, k, V) and the mean cross-entropy
        over the targets >= 0. The loss positions are a static slice (every group has its losses
        at the end of its rows), so no mask and no host-device sync. With a `packing` (GPT only),
        idx holds several short rows per row and targets (n,) are those at packing.loss_index."""
        if targets is None:
            return self.logits(self.hidden(idx)[:, -1])
        if packing is None:
            h = self.hidden(idx)[:, idx.shape[1] - targets.shape[1]:]
        else:
            h = self.hidden(idx, packing.positions, packing.mask)
            h = h.flatten(0, 1).index_select(0, packing.loss_index)
        logits = self.logits(h)
        return logits, F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-1)

    def logits(self, h, multiple=None):
        """h (..., C) -> (..., V) = h @ unembedding^T, the weight padded with zero rows to a multiple of
        `multiple` (default: 64 on CUDA with KERNELS, else none) and the logits cut back to V: the same
        function, parameters and checkpoints. G(5000, 5) has V = 20,006 = 2 mod 8, which leaves
        cuBLAS only its slow sm80 "align2" kernels for the head's products (nanoGPT pads GPT-2's
        vocabulary to 50,304 for the same reason)."""
        W = self.unembedding()
        V, pad = len(W), -len(W) % (multiple or (64 if W.is_cuda and KERNELS else 1))
        return (h @ (F.pad(W, (0, 0, 0, pad)) if pad else W).T)[..., :V]

    def unembedding(self):
        """(V, C): the output layer's weight, the input embedding itself (the paper's tying)."""
        return self.wte.weight


class GPT(TiedLM):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.learned_positions:
            self.wpe = nn.Parameter(cfg.position_std * torch.randn(cfg.block_size, cfg.n_embd))
        else:
            self.register_buffer("wpe", sinusoidal_positions(cfg.block_size, cfg.n_embd), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # untied: the unembedding is a Linear (so bf16 weight copies cover it), N(0, 0.02) as every weight
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False) if cfg.untied_head else None
        self.apply(self._init)
        self.wte.weight.requires_grad_(not cfg.freeze_embeddings)  # tied: the unembedding too; untied: not

    def unembedding(self):
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    @staticmethod
    def _init(m):  # App. B.2.2: all weights N(0, 0.02), biases zero
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden(self, idx, positions=None, mask=None):
        """positions (B, T) and mask (B, 1, T, T): a packed batch (`Packing`), whose positions
        restart at 0 in each short row; None: positions 0..T-1 and the causal mask."""
        pos = self.wpe[: idx.shape[1]] if positions is None else F.embedding(positions, self.wpe)
        x = self.drop(self.wte(idx) + pos)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def flops(self, B, T, n_loss):
        """Model FLOPs of one training step (forward + backward = 3x forward) on B sequences of
        length T with n_loss loss positions; logits only where a loss is taken."""
        C, L = self.cfg.n_embd, self.cfg.n_layer
        per_token = 2 * L * (12 if self.cfg.attention else 8) * C * C
        attn = 2 * L * C * T * (T + 1) if self.cfg.attention else 0  # QK^T and AV, causal half
        return 3 * (B * T * per_token + B * attn + 2 * n_loss * C * self.cfg.vocab_size)

    @torch.no_grad()
    def generate(self, idx, n_new):
        """Greedy continuation by recomputing the whole prefix (sequences here are short)."""
        for _ in range(n_new):
            idx = torch.cat([idx, self(idx).argmax(-1, keepdim=True)], 1)
        return idx[:, -n_new:]


# ----------------------------------------------------------------------------- short attention kernel
# On a GPU the explicit T x T attention of `CausalSelfAttention` (T <= 16) is still 5 launches
# forward and 8 backward per layer (layout copies, two batched 8 x 8 matmuls, mask + softmax), each
# moving q, k, v through memory. Here one Triton program per (row, head) reads its q, k, v (T x D)
# straight from the qkv projection's output, keeps scores and softmax in fp32 registers and writes y
# where the output projection reads it: one kernel forward, one backward (21% off a G(5000, 5) step
# on an H200, docs/performance.md). The explicit product is its reference (tests/test_common.py).


def triton_runs(x):
    """Whether Triton runs on x's device: CUDA, or the CPU in Triton's interpreter (the tests)."""
    return KERNELS and triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    @triton.jit
    def _short_attention_fwd(qkv, mask, y, att, T, D, scale, H: tl.constexpr, CAUSAL: tl.constexpr,
                             BT: tl.constexpr, BD: tl.constexpr):
        pid = tl.program_id(0)  # one (row b, head h); qkv (B, T, 3, H, D), y (B, T, H, D)
        b, h = pid // H, pid % H
        C = H * D
        t, d = tl.arange(0, BT), tl.arange(0, BD)  # T, D padded to powers of two
        td, tt = (t < T)[:, None] & (d < D)[None, :], (t < T)[:, None] & (t < T)[None, :]
        rows = qkv + b * T * 3 * C + h * D + t[:, None] * 3 * C + d[None, :]
        q = tl.load(rows, mask=td, other=0.0).to(tl.float32)
        k = tl.load(rows + C, mask=td, other=0.0).to(tl.float32)
        v = tl.load(rows + 2 * C, mask=td, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (query, key)
        if CAUSAL:
            allowed = t[:, None] >= t[None, :]
        else:
            allowed = tl.load(mask + b * T * T + t[:, None] * T + t[None, :], mask=tt, other=0) != 0
        allowed = (allowed & (t < T)[None, :]) | (t >= T)[:, None]  # padding queries: finite, not stored
        s = tl.where(allowed, s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        out = tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # (query, D)
        tl.store(y + b * T * C + h * D + t[:, None] * C + d[None, :], out.to(y.dtype.element_ty), mask=td)
        tl.store(att + pid * T * T + t[:, None] * T + t[None, :], p, mask=tt)  # kept for the backward

    @triton.jit
    def _short_attention_bwd(qkv, att, dy, dqkv, T, D, scale, H: tl.constexpr, BT: tl.constexpr,
                             BD: tl.constexpr):
        pid = tl.program_id(0)
        b, h = pid // H, pid % H
        C = H * D
        t, d = tl.arange(0, BT), tl.arange(0, BD)
        td, tt = (t < T)[:, None] & (d < D)[None, :], (t < T)[:, None] & (t < T)[None, :]
        at = b * T * 3 * C + h * D + t[:, None] * 3 * C + d[None, :]
        q = tl.load(qkv + at, mask=td, other=0.0).to(tl.float32)
        k = tl.load(qkv + at + C, mask=td, other=0.0).to(tl.float32)
        v = tl.load(qkv + at + 2 * C, mask=td, other=0.0).to(tl.float32)
        p = tl.load(att + pid * T * T + t[:, None] * T + t[None, :], mask=tt, other=0.0)
        g = tl.load(dy + b * T * C + h * D + t[:, None] * C + d[None, :], mask=td, other=0.0).to(tl.float32)
        dv = tl.sum(p[:, :, None] * g[:, None, :], axis=0)  # (key, D)
        dp = tl.sum(g[:, None, :] * v[None, :, :], axis=2)  # (query, key)
        ds = p * (dp - tl.sum(dp * p, axis=1)[:, None]) * scale  # softmax backward
        dq = tl.sum(ds[:, :, None] * k[None, :, :], axis=1)
        dk = tl.sum(ds[:, :, None] * q[:, None, :], axis=0)
        out = dqkv.dtype.element_ty
        tl.store(dqkv + at, dq.to(out), mask=td)
        tl.store(dqkv + at + C, dk.to(out), mask=td)
        tl.store(dqkv + at + 2 * C, dv.to(out), mask=td)

    # custom ops: inductor and CUDA graphs see one opaque call each way, with shapes from the fakes
    @torch.library.custom_op("geomem::short_attention", mutates_args=())
    def _short_attention(qkv: torch.Tensor, mask: torch.Tensor, n_head: int,
                         causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        y = qkv.new_empty(B, T, C)
        att = qkv.new_empty(B * n_head, T, T, dtype=torch.float32)  # probabilities, for the backward
        D = C // n_head
        _short_attention_fwd[(B * n_head,)](qkv, mask, y, att, T, D, D ** -0.5, H=n_head, CAUSAL=causal,
                                            BT=triton.next_power_of_2(T), BD=triton.next_power_of_2(D),
                                            num_warps=2)
        return y, att

    @_short_attention.register_fake
    def _(qkv, mask, n_head, causal):
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        return qkv.new_empty(B, T, C), qkv.new_empty(B * n_head, T, T, dtype=torch.float32)

    @torch.library.custom_op("geomem::short_attention_backward", mutates_args=())
    def _short_attention_backward(qkv: torch.Tensor, att: torch.Tensor, dy: torch.Tensor,
                                  n_head: int) -> torch.Tensor:
        T, D = qkv.shape[1], qkv.shape[2] // 3 // n_head
        dqkv = torch.empty_like(qkv)
        _short_attention_bwd[(qkv.shape[0] * n_head,)](qkv, att, dy.contiguous(), dqkv, T, D, D ** -0.5,
                                                       H=n_head, BT=triton.next_power_of_2(T),
                                                       BD=triton.next_power_of_2(D), num_warps=2)
        return dqkv

    @_short_attention_backward.register_fake
    def _(qkv, att, dy, n_head):
        return torch.empty_like(qkv)

    def _save_for_backward(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[1])
        ctx.n_head = inputs[2]

    def _backward(ctx, dy, d_att):
        qkv, att = ctx.saved_tensors
        return _short_attention_backward(qkv, att, dy, ctx.n_head), None, None, None

    _short_attention.register_autograd(_backward, setup_context=_save_for_backward)


def short_attention(qkv, mask, n_head):
    """The attention of `CausalSelfAttention` (without dropout) in Triton, for T <= 16: qkv (B, T, 3C)
    as the projection writes it; mask None (causal) or (B, 1, T, T) bool -> y (B, T, C)."""
    B, T = qkv.shape[:2]
    causal = mask is None
    mask = qkv if causal else mask.expand(B, 1, T, T).contiguous()  # causal: a pointer never read
    return _short_attention(qkv.contiguous(), mask, n_head, causal)[0]


# ----------------------------------------------------------------------------- Mamba
# Selective state-space model (Gu & Dao 2023), plain PyTorch so it runs wherever PyTorch runs
# (App. C.1 repeats the path-star results on Mamba). Shapes inside the scan:
#   b batch, d channels (= expand * width), L length, n d_state


def selective_scan_ref(u, delta, A, B, C, D):
    """The definition, one step at a time. u, delta: (b, d, L); A: (d, n); B, C: (b, n, L);
    D: (d,) -> y (b, d, L) with h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t (zero-order hold
    for A, Euler for B) and y_t = C_t . h_t + D u_t."""
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1) + D[:, None] * u


class SelectiveScan(torch.autograd.Function):
    """The same recurrence, fast. Autograd through the reference allocates ~20 fresh (b, d, n)
    tensors per step; here each step is a few in-place ops on preallocated buffers while its
    slice is still in cache, and the backward pass runs the adjoint recurrence
    g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1} right to left instead of unrolling autograd.
    Time-major (L, b, ...) keeps each step's slice contiguous. (A log-depth parallel scan does
    O(L log L) work: it pays on a GPU, not on a CPU.)"""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D):
        ut, dt, Bt, Ct = (x.permute(2, 0, 1).contiguous() for x in (u, delta, B, C))  # (L, b, .)
        du = dt * ut
        hs = u.new_empty(*du.shape, A.shape[1])  # h_t: (L, b, d, n)
        dA = torch.empty_like(hs)  # exp(delta_t A), kept for backward
        for t in range(len(hs)):
            torch.mul(du[t, :, :, None], Bt[t, :, None, :], out=hs[t])  # delta_t B_t u_t
            torch.mul(dt[t, :, :, None], A, out=dA[t]).exp_()
            if t:
                hs[t].addcmul_(dA[t], hs[t - 1])
        y = (hs @ Ct[..., None])[..., 0].permute(1, 2, 0) + D[:, None] * u  # C_t . h_t + D u_t
        ctx.save_for_backward(ut, dt, A, Bt, Ct, D, dA, hs)
        return y

    @staticmethod
    def backward(ctx, gy):
        ut, dt, A, Bt, Ct, D, dA, hs = ctx.saved_tensors
        gyt = gy.permute(2, 0, 1).contiguous()  # (L, b, d)
        du = dt * ut
        gC = (gyt[:, :, None, :] @ hs)[:, :, 0]  # (L, b, n)
        gh_B, g_delta, gB = torch.empty_like(gyt), torch.zeros_like(gyt), torch.empty_like(gC)
        gA_acc = torch.zeros_like(hs[0])  # sum over t of dLoss/dA, per batch row
        gh, q = torch.empty_like(hs[0]), torch.empty_like(hs[0])
        for t in range(len(hs) - 1, -1, -1):
            if t == len(hs) - 1:
                torch.mul(gyt[t, :, :, None], Ct[t, :, None, :], out=gh)
            else:  # g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}
                gh.mul_(dA[t + 1]).addcmul_(gyt[t, :, :, None], Ct[t, :, None, :])
            torch.matmul(gh, Bt[t, :, :, None], out=gh_B[t, :, :, None])  # sum_n g_t B_t
            torch.matmul(du[t, :, None, :], gh, out=gB[t, :, None, :])  # sum_d g_t delta_t u_t
            if t:  # q = dLoss/d(delta_t A) = g_t exp(delta_t A) h_{t-1}; h_{-1} = 0
                torch.mul(gh, dA[t], out=q).mul_(hs[t - 1])
                gA_acc.addcmul_(q, dt[t, :, :, None])
                torch.sum(q.mul_(A), -1, out=g_delta[t])
        g_delta += gh_B * ut
        g_u = gh_B * dt + gyt * D
        back = lambda x: x.permute(1, 2, 0)  # (L, b, .) -> (b, ., L)
        return back(g_u), back(g_delta), gA_acc.sum(0), back(gB), back(gC), (gyt * ut).sum((0, 1))


def selective_scan(u, delta, A, B, C, D):
    """Fast scan with the signature and result of `selective_scan_ref`."""
    return SelectiveScan.apply(u, delta, A, B, C, D)


@dataclass
class MambaConfig:
    vocab_size: int
    n_layer: int = 12
    n_embd: int = 384
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    freeze_embeddings: bool = False
    block: str = "residual"  # or "authors": the release's block (see MambaLayer)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MambaMixer(nn.Module):
    """in_proj -> (x, z); x: causal depthwise conv, SiLU, input-dependent delta, B, C, selective
    scan; output gated by SiLU(z), out_proj."""

    def __init__(self, cfg):
        super().__init__()
        E, n = cfg.expand * cfg.n_embd, cfg.d_state
        self.dt_rank = math.ceil(cfg.n_embd / 16)
        self.in_proj = nn.Linear(cfg.n_embd, 2 * E, bias=False)
        # causal depthwise conv as d_conv shifted multiply-adds (CPU conv1d backward is slow)
        bound = cfg.d_conv ** -0.5
        self.conv_weight = nn.Parameter(torch.empty(E, cfg.d_conv).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.zeros(E))
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E)
        self.out_proj = nn.Linear(E, cfg.n_embd, bias=False)
        # S4D-real init: A = -(1, 2, ..., n) for every channel, stored as log(-A)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1).float()).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        # delta starts log-uniform in [1e-3, 1e-1]: softplus^-1 of it as the dt_proj bias
        dt = torch.exp(torch.rand(E) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)

    def ssm_params(self, x):
        """x: (..., E) after conv -> delta (..., E), B, C (..., n)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.A_log.shape[1], self.A_log.shape[1]], -1)
        return F.softplus(self.dt_proj(dt)), B, C

    def forward(self, x, scan=selective_scan):
        L, K = x.shape[1], self.conv_weight.shape[1]
        xi, z = self.in_proj(x).chunk(2, -1)  # (b, L, E) each
        padded = F.pad(xi, (0, 0, K - 1, 0))  # zeros before the first token: causal
        xi = F.silu(sum(padded[:, k:k + L] * self.conv_weight[:, k] for k in range(K)) + self.conv_bias)
        delta, B, C = self.ssm_params(xi)
        xi = xi.transpose(1, 2)  # (b, E, L) for the scan
        y = scan(xi.float(), delta.transpose(1, 2).float(), -torch.exp(self.A_log.float()),
                 B.transpose(1, 2).float(), C.transpose(1, 2).float(), self.D.float())
        return self.out_proj(y.transpose(1, 2).to(x.dtype) * F.silu(z))

    def step(self, x, state):
        """One token: x (b, C); state = (last d_conv-1 conv inputs (b, E, d_conv-1), h (b, E, n))."""
        conv_in, h = state
        xi, z = self.in_proj(x).chunk(2, -1)
        window = torch.cat([conv_in, xi[..., None]], -1)  # (b, E, d_conv)
        xi = F.silu((window * self.conv_weight).sum(-1) + self.conv_bias)
        delta, B, C = self.ssm_params(xi)
        h = torch.exp(delta[..., None] * -torch.exp(self.A_log)) * h + (delta * xi)[..., None] * B[:, None]
        y = (h * C[:, None]).sum(-1) + self.D * xi
        return self.out_proj(y * F.silu(z)), (window[..., 1:], h)


class MambaLayer(nn.Module):
    """residual: x + mixer(RMSNorm(x)), the standard Mamba LM block. authors: mixer(LayerNorm(x)),
    no residual, as the release's block (models/mamba.py there)."""

    def __init__(self, cfg):
        super().__init__()
        self.residual = cfg.block == "residual"
        self.norm = RMSNorm(cfg.n_embd) if self.residual else nn.LayerNorm(cfg.n_embd)
        self.mixer = MambaMixer(cfg)

    def forward(self, x, scan=selective_scan):
        y = self.mixer(self.norm(x), scan)
        return x + y if self.residual else y


class Mamba(TiedLM):
    """Mamba language model with the GPT's interface: forward(idx, targets), generate, flops."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.block not in ("residual", "authors"):
            raise ValueError(f"unknown Mamba block {cfg.block!r}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        nn.init.normal_(self.wte.weight, 0.0, 0.02)
        self.layers = nn.ModuleList(MambaLayer(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd) if cfg.block == "residual" else nn.Identity()
        with torch.no_grad():
            for layer in self.layers:
                if cfg.block == "residual":  # pre-norm residual: shrink each block's output by sqrt(depth)
                    layer.mixer.out_proj.weight /= math.sqrt(cfg.n_layer)
                else:  # the release's GPT-style init of every Linear, the dt bias zeroed too
                    for m in layer.mixer.modules():
                        if isinstance(m, nn.Linear):
                            nn.init.normal_(m.weight, 0.0, 0.02)
                            if m.bias is not None:
                                nn.init.zeros_(m.bias)
        self.wte.weight.requires_grad_(not cfg.freeze_embeddings)

    def hidden(self, idx, scan=selective_scan):
        x = self.wte(idx)
        for layer in self.layers:
            x = layer(x, scan)
        return self.norm_f(x)

    @torch.no_grad()
    def generate(self, idx, n_new):
        """Greedy continuation carrying the recurrent state token by token (no recomputation)."""
        b, E = idx.shape[0], self.cfg.expand * self.cfg.n_embd
        states = [(idx.new_zeros(b, E, self.cfg.d_conv - 1, dtype=torch.float),
                   idx.new_zeros(b, E, self.cfg.d_state, dtype=torch.float)) for _ in self.layers]
        out = []
        for t in range(idx.shape[1] + n_new - 1):
            tok = idx[:, t] if t < idx.shape[1] else out[-1]
            x = self.wte(tok).float()
            for i, layer in enumerate(self.layers):
                y, states[i] = layer.mixer.step(layer.norm(x), states[i])
                x = x + y if layer.residual else y
            if t >= idx.shape[1] - 1:
                out.append((self.norm_f(x) @ self.wte.weight.float().T).argmax(-1))
        return torch.stack(out, 1)

    def flops(self, B, T, n_loss):
        """Training FLOPs (3x forward): projections, conv, scan (~9 per channel and state: exp,
        the update and the C readout), and logits only where a loss is taken."""
        c, L = self.cfg, self.cfg.n_layer
        E, n, R = c.expand * c.n_embd, c.d_state, math.ceil(c.n_embd / 16)
        per_token = L * (2 * c.n_embd * 2 * E + 2 * E * c.d_conv + 2 * E * (R + 2 * n) + 2 * R * E
                         + 9 * E * n + 2 * E * c.n_embd)
        return 3 * (B * T * per_token + 2 * n_loss * c.n_embd * c.vocab_size)


# ----------------------------------------------------------------------------- Node2Vec


@dataclass
class Node2VecConfig:
    num_nodes: int
    width: int = 100  # §4: wide (no bottleneck); App. B.2.2 uses 100
    tied: bool = True  # False: logits E F^T, which can express negative eigendirections (§4.4)
    init_std: float = 1.0  # App. F Assumption 1: wide unit-normal rows are near-orthogonal, so P ~ I


class Node2Vec(nn.Module):
    """The 2-layer model of §4: embedding E, logits E E^T (tied) or E F^T (untied), full softmax."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.E = nn.Parameter(torch.randn(cfg.num_nodes, cfg.width) * cfg.init_std)
        self.F = None if cfg.tied else nn.Parameter(torch.randn(cfg.num_nodes, cfg.width) * cfg.init_std)

    def logits(self):
        return self.E @ (self.E if self.F is None else self.F).T

    def forward(self, targets):
        return node2vec_loss(self.E, targets, self.F)


def node2vec_loss(E, targets, F_out=None):
    """The 1-hop Node2Vec objective of §4 for node embeddings E (N, C): targets (N, N), row u =
    D^-1 A, uniform over u's neighbours; every node is a source, its loss averaged over its
    neighbours (App. F Eq. 1), then over sources. Tied logits E E^T, or E F^T. `Node2Vec` trains
    it alone; exp_pathstar's --aux-weight adds it to a sequence model's loss."""
    return F.cross_entropy(E @ (E if F_out is None else F_out).T, targets)


def neighbour_targets(A, device="cpu"):
    A = np.asarray(A, dtype=np.float64)
    return torch.tensor(A / A.sum(1, keepdims=True), dtype=torch.float32, device=device)


def train_node2vec(model, targets, steps, lr, optimizer="adam", snapshot_steps=(), desc="node2vec",
                   loss_sum=False):
    """Full-batch training, constant lr, no weight decay (App. B.2.2). Not `train`: the degree-
    normalised objective is one soft-target (N, N) cross-entropy per step with nothing to sample,
    and App. F needs the exact parameters at chosen steps. adam = torch Adam, default betas (the
    paper's AdamW with weight decay 0); gd = plain gradient descent, the dynamics App. F analyses.
    loss_sum: the loss summed over source nodes instead of averaged (the release's; with gd it
    is the mean's step at lr x N). Returns one record per step in snapshot_steps and one for the
    final state (step `steps`): step, loss, grad_norm, update_norm (relative size of that step's
    update; 0 at the end) and CPU copies of the parameters."""
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    snapshot_steps, records = set(snapshot_steps), []
    bar = tqdm(range(steps + 1), desc=desc, dynamic_ncols=True, mininterval=1.0, leave=False)
    for step in bar:
        loss = model(targets) * (len(targets) if loss_sum else 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step % 200 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step in snapshot_steps or step == steps:
            before = [p.detach().clone() for p in params]
            records.append({"step": step, "loss": loss.item(),
                            "grad_norm": torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item(),
                            "params": {n: p.detach().cpu().double().clone()
                                       for n, p in model.named_parameters()}})
        if step == steps:
            records[-1]["update_norm"] = 0.0
            break
        opt.step()
        if records and records[-1]["step"] == step:
            with torch.no_grad():
                delta = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(params, before)))
                records[-1]["update_norm"] = (delta / torch.sqrt(sum((b ** 2).sum() for b in before))).item()
    bar.close()
    return records


# ----------------------------------------------------------------------------- training


@dataclass
class Phase:
    """A stretch of training on a fixed mixture of groups (the staged recipe has two)."""
    name: str
    groups: list  # [(X, Y)] on the device
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    final_lr_frac: float = 0.1  # cosine decays to lr * this; 1.0 = constant lr after warm-up
    decay_epochs: int = 0  # the cosine reaches its floor after this many epochs, held after (0: epochs)
    grad_clip: float = 1.0  # 0 = no clipping


def lr_at(step, total, warmup, peak, final_frac=0.1):
    """Linear warm-up, then cosine decay to peak * final_frac (App. B.3)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class GroupSampler:
    """Every batch holds each group in proportion to its size (so a path-star batch is edges and
    paths interleaved, §2), the same number of rows of each group at every step (static shapes).
    Each epoch draws a fresh order of every group from `generator`, so the sampler's whole state
    at an epoch boundary is the generator's state (exact resume)."""

    def __init__(self, groups, batch_size, generator):
        sizes = [len(X) for X, _ in groups]
        total = sum(sizes)
        self.groups, self.gen = groups, generator
        self.steps_per_epoch = max(1, math.ceil(total / batch_size))
        self.shares = [min(s, max(1, round(batch_size * s / total))) for s in sizes]

    def epoch(self):
        """Yields the epoch's steps, each a list of row indices (on the groups' device), one per
        group."""
        orders = []
        for (X, _), share in zip(self.groups, self.shares):
            need = share * self.steps_per_epoch
            perms = [torch.randperm(len(X), generator=self.gen) for _ in range(-(-need // len(X)))]
            order = torch.cat(perms)[:need]
            if X.is_cuda:  # pinned + non_blocking: the copy does not wait for the GPU's queue
                order = order.pin_memory().to(X.device, non_blocking=True)
            orders.append(order)
        for s in range(self.steps_per_epoch):
            yield [o[s * n:(s + 1) * n] for o, n in zip(orders, self.shares)]


def take(groups, rows):
    """The batch of one step: [(X[i], Y[i])] for each group and its row indices."""
    return [(X[i], Y[i]) for (X, Y), i in zip(groups, rows)]


def loss_tail(X, Y):
    """(X, Y) -> (X, Y[:, -k:]): Y cut to its last k positions, k reaching back to the first
    position that carries a loss in any row. Losses here always sit at the end of a row (edges:
    the last token; paths and answers: the last l), so the model can take its logits with a
    static slice. Checked once, on the host, before training."""
    has_loss = (Y >= 0).any(0).nonzero()
    if len(has_loss) == 0:
        raise ValueError("a group without any loss position")
    k = Y.shape[1] - int(has_loss[0])
    if not (Y[:, -k:] >= 0).any(1).all():
        raise ValueError("a group with a row that carries no loss")
    return X, Y[:, -k:].contiguous()


class Packing:
    """One forward per step instead of one per group: the rows a step takes of each group, of
    length L, go several to a row of the longest length T, each its own segment. A
    block-diagonal causal mask keeps the segments apart and positions restart at 0 in each, so
    every logit and loss is what it is unpacked (on a GPU a step is then half the kernels, each
    twice the work: edges are 2 tokens, paths 8).
    Shared head: where every row of a group starts with the same token ([EDGE], [PATH]) and
    carries no loss on it, that token's hidden states are the same in every row (causal
    attention: it sees only itself), so a packed row holds it once, at column 0, with position 0,
    and every segment of the row attends to it and then to its own L - 1 tokens. Edges go 7 to a
    row of 8 instead of 4, and a G(5000, 5) step runs 31% fewer tokens, with the same losses.
    Each row's rest, and the rows that fill up the last packed row of a group, are padding:
    token 0, a segment of its own, no loss. GPT only (a mask and positions are inputs of
    attention, not of a scan).
      positions (B, T), mask (B, 1, T, T): the packed batch's, the same at every step;
      loss_index (n,): the flat positions in B * T whose next token carries a loss, ordered
        group by group as the rows of each Y (cut by `loss_tail`), so the targets are
        cat(Y.flatten()) and the loss is the unpacked step's loss."""

    def __init__(self, shapes, device, heads=None):
        """shapes: (rows per step, L, k) of each group; k: its loss positions (`loss_tail`);
        heads: per group, whether its rows share their first token (default: none do)."""
        T = max(L for _, L, _ in shapes)
        heads = heads or [False] * len(shapes)
        self.layout, positions, segments, loss_index, first_row = [], [], [], [], 0
        for (rows, L, k), head in zip(shapes, heads):
            h = int(head)  # column 0 of each packed row: the shared head, or none
            f = (T - h) // (L - h)  # segments per packed row, each the L - h tokens after the head
            packed = -(-rows // f)
            self.layout.append((h, f, packed * f - rows, T - h - f * (L - h)))  # + padding rows, tokens
            col = torch.arange(T - h)
            head_pos, head_seg = torch.zeros(h, dtype=torch.long), torch.full((h,), -1)  # segment -1: head
            positions.append(torch.cat([head_pos, h + col % (L - h)]).expand(packed, T))
            segments.append(torch.cat([head_seg, col // (L - h)]).expand(packed, T))  # f: padding
            j = torch.arange(rows)  # row j of the group -> packed row j // f, segment j % f
            cols = (j % f)[:, None] * (L - h) + torch.arange(L - k, L)
            loss_index.append(((first_row + j // f)[:, None] * T + cols).flatten())
            first_row += packed
        seg = torch.cat(segments)
        same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == -1)  # own segment or head
        self.mask = (torch.ones(T, T, dtype=torch.bool).tril() & same)[:, None].to(device)
        self.positions = torch.cat(positions).to(device)
        self.loss_index = torch.cat(loss_index).to(device)

    @classmethod
    def for_sampler(cls, sampler, model):
        """The packing of the steps a `GroupSampler` yields for a GPT `model`, heads shared where
        a group's rows start with one token and the model has no dropout (whose masks would
        differ from row to row). Checked once, on the host."""
        shapes = [(n, X.shape[1], Y.shape[1]) for (X, Y), n in zip(sampler.groups, sampler.shares)]
        heads = [model.cfg.dropout == 0 and L > k and bool((X[:, 0] == X[0, 0]).all())
                 for (X, _), (_, L, k) in zip(sampler.groups, shapes)]
        return cls(shapes, sampler.groups[0][0].device, heads)

    def __call__(self, batch):
        """[(X, Y)] of a step, one per group -> [(X, Y)]: the packed X (B, T) and the targets (n,)."""
        packed = []
        for (X, _), (h, f, pad_rows, pad_tokens) in zip(batch, self.layout):
            head = X[:1, :h]
            if pad_rows:
                X = torch.cat([X, X.new_zeros(pad_rows, X.shape[1])])
            X = X[:, h:].reshape(-1, f * (X.shape[1] - h))
            if h or pad_tokens:  # a plain group is a view, no copy
                X = torch.cat([head.expand(len(X), h), X, X.new_zeros(len(X), pad_tokens)], 1)
            packed.append(X)
        return [(torch.cat(packed), torch.cat([Y.flatten() for _, Y in batch]))]


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), decay_all=False):
    """AdamW; decay on matrices and embeddings, not biases or norms (as in nanoGPT), or on every
    parameter (decay_all, as the release's plain `AdamW(model.parameters())`). Fused (one kernel
    for every parameter, its step counts on the device) with the lr a device tensor (`set_lr`
    writes it in place): a step never reads a host value, so it can be captured in a CUDA graph."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    decayed = lambda p: decay_all or p.dim() >= 2
    groups = [{"params": [p for p in params if decayed(p)], "weight_decay": weight_decay},
              {"params": [p for p in params if not decayed(p)], "weight_decay": 0.0}]
    for g in groups:
        g["lr"] = torch.tensor(float(lr), device=device)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True, capturable=device.type == "cuda")


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"].fill_(lr)


def autocast(device):
    """bf16 autocast on CUDA; full fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda"))


class Bf16Weights:
    """Under bf16 autocast every Linear weight and bias is cast to bf16 in each forward and its
    gradient back to fp32 in the backward: two kernels per tensor (97 in GPT-mid) per step. Instead
    a step can keep bf16 copies of them as the forward's leaves (`torch.func.functional_call`;
    autocast leaves bf16 inputs alone), copy their gradients into the fp32 masters' .grad in one
    kernel before clipping and AdamW, and refresh the copies in one after: the same bf16 operands,
    gradients and fp32 update as autocast's, without the casts. The model, its optimizer and its
    checkpoints stay fp32."""

    def __init__(self, model):
        linear = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in linear and p.requires_grad]
        self.masters = [p for _, p in named]
        self.copies = {n: p.detach().to(torch.bfloat16).requires_grad_() for n, p in named}
        self.grads = [torch.zeros_like(p) for p in self.masters]  # the masters' .grad, fixed buffers

    def zero_grad(self):
        for w in self.copies.values():
            w.grad = None

    def grads_to_masters(self):
        torch._foreach_copy_(self.grads, [w.grad for w in self.copies.values()])
        for p, g in zip(self.masters, self.grads):
            if p.grad is not None:  # an `aux` loss reached the master itself
                g += p.grad
            p.grad = g

    @torch.no_grad()
    def refresh(self):
        torch._foreach_copy_(list(self.copies.values()), self.masters)


def train_step(forward, params, opt, batch, grad_clip, stats, aux=None, weights=None):
    """One AdamW step on a batch (a list of (X, Y) groups, Y cut by `loss_tail`); the loss is
    the mean over every loss token of the batch, plus `aux()` if given (an extra loss on the
    weights, e.g. exp_pathstar's --aux-weight). No host-device sync: counts stay on the device
    and (loss sum, correct, tokens) are added to `stats` in place, so the whole step can be
    replayed from a CUDA graph. `forward` is the model or its compiled version; with `weights`
    (`Bf16Weights`) it runs on their bf16 copies."""
    opt.zero_grad(set_to_none=True)
    if weights:
        weights.zero_grad()
    loss_sum, correct, count = 0.0, 0, 0
    for X, Y in batch:
        with autocast(X.device):
            logits, loss = forward(X, Y)
        n = (Y >= 0).sum()
        loss_sum = loss_sum + loss * n
        correct = correct + (logits.argmax(-1) == Y).sum()  # Y = -1 never equals an argmax
        count = count + n
    ((loss_sum / count) + (aux() if aux else 0)).backward()
    if weights:
        weights.grads_to_masters()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    if weights:
        weights.refresh()
    with torch.no_grad():
        stats += torch.stack([loss_sum.detach(), correct.float(), count.float()])


class Stepper:
    """Runs `train_step` on a sampler's rows:
      eager          the model as written;
      compile=True   its forward and backward compiled by inductor (one graph per group shape;
                     the model itself is untouched, so checkpoints keep its plain keys);
      cuda_graph     the whole step (forward, backward, clipping, AdamW) captured once in a CUDA
                     graph and replayed: a step is then a few row gathers into static buffers and
                     one launch;
      packing        (a `Packing`, any mode) the groups' rows packed into one forward;
      bf16_weights   (default: on CUDA, where autocast is bf16, with KERNELS) the forward on
                     `Bf16Weights`.
    With a CUDA graph the first `warmup` steps run on a side stream, as capture needs; they are
    ordinary training steps, so every mode trains the same steps."""

    def __init__(self, model, opt, groups, grad_clip, compile=False, cuda_graph=False, warmup=3, aux=None,
                 packing=None, bf16_weights=None):
        self.model, self.opt, self.groups, self.grad_clip, self.aux = model, opt, groups, grad_clip, aux
        self.packing = packing
        self.params = [p for p in model.parameters() if p.requires_grad]
        cuda = groups[0][0].is_cuda
        bf16_weights = cuda and KERNELS if bf16_weights is None else bf16_weights
        self.weights = Bf16Weights(model) if bf16_weights else None
        self.compiled = compile
        self.forward = self.make_forward(compile, cuda)
        if compile:  # inductor's note that it splits a long softmax (the loss over a 20,006-token
            # vocabulary): 3 x 7 lines at the start of every GPU run, nothing to act on
            warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled")
        self.capture, self.warmup, self.steps = cuda_graph, warmup, 0
        self.stats = torch.zeros(3, device=groups[0][0].device)  # loss sum, correct, tokens
        self.graph, self.static = None, None  # the captured step and its input buffers

    def __call__(self, rows):
        if self.graph is not None:
            for (X, Y), (Xs, Ys), i in zip(self.groups, self.static, rows):
                torch.index_select(X, 0, i, out=Xs)
                torch.index_select(Y, 0, i, out=Ys)
            self.graph.replay()
        elif self.capture and self.steps >= self.warmup:
            self._capture(rows)
        elif self.capture:  # warm-up on a side stream (cuBLAS workspaces, AdamW state, compiling)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager(rows)
            torch.cuda.current_stream().wait_stream(side)
        else:
            self._eager(rows)
        self.steps += 1

    def make_forward(self, compile, cuda):
        """The model, or its forward on the bf16 copies; compiled if asked, with inductor's combo
        kernels on CUDA (small independent kernels side by side in one launch: 842 -> 622 kernels
        and 9% off a G(5000, 5) step on an H200)."""
        forward, weights = self.model, self.weights
        if weights:
            forward = lambda copies, *a, **k: torch.func.functional_call(self.model, copies, a, k)
        if compile:
            combo = {"combo_kernels": True} if cuda and KERNELS else None
            forward = torch.compile(forward, dynamic=False, options=combo)
        return functools.partial(forward, weights.copies) if weights else forward

    def _step(self, batch):
        forward, packing = self.forward, self.packing
        if packing is not None:
            forward, batch = functools.partial(forward, packing=packing), packing(batch)
        train_step(forward, self.params, self.opt, batch, self.grad_clip, self.stats, self.aux, self.weights)

    def _eager(self, rows):
        try:
            self._step(take(self.groups, rows))
        except Exception as e:
            if not self.compiled or self.steps > 0:
                raise
            # compiling fails on the first call, before any update: train on with the eager model
            print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  f"training without it", file=sys.stderr)
            self.compiled, self.forward = False, self.make_forward(False, False)
            self._eager(rows)

    def _capture(self, rows):
        self.static = [(X[i].clone(), Y[i].clone()) for (X, Y), i in zip(self.groups, rows)]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(self.static)
        except Exception as e:  # capture breaks on ops that sync; train on without it
            print(f"warning: CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                  f"training without it", file=sys.stderr)
            self.capture = False
            self._eager(rows)
            return
        self.graph = graph
        graph.replay()  # capture records the step without running it


def train(model, phases, *, weight_decay, evaluate, eval_every, device, seed=0, ckpt_path=None,
          ckpt_every_s=600, resume=False, config=None, desc="train", compile=False, cuda_graph=False,
          betas=(0.9, 0.95), decay_all=False, time_limit_s=None, aux=None, pack=False, snapshot_dir=None):
    """The one training loop of the repository. Runs the phases in order (a fresh AdamW and schedule
    each), evaluates every `eval_every` epochs and at the end of each phase, writes a checkpoint
    after an evaluation when `ckpt_every_s` seconds have passed since the last one and at the end of
    each phase, and resumes from `ckpt_path` if asked. `compile`, `cuda_graph`: see `Stepper`;
    `pack`: one forward per step (`Packing`, GPT only); `betas`, `decay_all`: see `make_optimizer`;
    `aux`: see `train_step`. Stops with one line on stderr (exit 2) when the training loss turns
    non-finite, keeping the last checkpoint. With `time_limit_s`, returns early at the first
    evaluation after that many seconds (of this process), with a checkpoint that `resume` continues
    from. With `snapshot_dir`, every evaluation also keeps the model's weights there as
    epoch<E>.pt (a state dict, plain keys), for analyses of the model over training.
    Returns the history: [{"epoch": e, "phase": name, "time_s": seconds, **evaluate(model)}, ...],
    time_s counting training and evaluation since the start, resumed runs included."""
    gen = torch.Generator().manual_seed(seed)
    history, resume_epoch, opt_state = [], 0, None
    if resume:
        ckpt = load_checkpoint(ckpt_path, config)
        model.load_state_dict(ckpt["model"])
        history, resume_epoch, opt_state = ckpt["history"], ckpt["epoch"], ckpt["optimizer"]
        gen.set_state(ckpt["generator"])
        set_rng_state(ckpt["rng"])
    t0 = time.time() - (history[-1]["time_s"] if history else 0.0)  # training time survives resume
    started = last_save = time.time()
    saved = resume_epoch  # epoch of the checkpoint on disk (0: none)
    samplers = [GroupSampler([loss_tail(*g) for g in p.groups], p.batch_size, gen) for p in phases]
    bar = tqdm(total=sum(p.epochs * s.steps_per_epoch for p, s in zip(phases, samplers)),
               desc=desc, dynamic_ncols=True, mininterval=1.0)
    epoch = 0  # counts across phases
    for phase, sampler in zip(phases, samplers):
        first = min(phase.epochs, max(0, resume_epoch - epoch))  # epochs already done
        bar.update(first * sampler.steps_per_epoch)
        epoch += first
        if first == phase.epochs:
            continue
        opt = make_optimizer(model, phase.lr, weight_decay, betas, decay_all)
        if opt_state is not None:
            lr_tensors = [g["lr"] for g in opt.param_groups]
            opt.load_state_dict(opt_state)
            for g, lr in zip(opt.param_groups, lr_tensors):  # keep the device lr that set_lr writes
                g["lr"] = lr
            opt_state = None
        step = Stepper(model, opt, sampler.groups, phase.grad_clip, compile, cuda_graph, aux=aux,
                       packing=Packing.for_sampler(sampler, model) if pack else None)
        total = (phase.decay_epochs or phase.epochs) * sampler.steps_per_epoch
        posted = bar.n
        model.train()
        for ep in range(first, phase.epochs):
            for s, rows in enumerate(sampler.epoch()):
                lr = lr_at(ep * sampler.steps_per_epoch + s, total, phase.warmup_steps, phase.lr,
                           phase.final_lr_frac)
                set_lr(opt, lr)
                step(rows)
            bar.update(sampler.steps_per_epoch)
            epoch += 1
            last = ep == phase.epochs - 1
            evaluating = epoch % eval_every == 0 or last
            if evaluating or bar.n >= posted + 200:  # reading stats syncs the GPU: not every step
                loss, correct, n = step.stats.tolist()
                step.stats.zero_()
                posted = bar.n
                if not math.isfinite(loss):
                    bar.close()
                    die(f"training loss turned {loss} by epoch {epoch} (phase {phase.name}); stopped, " +
                        (f"the checkpoint of epoch {saved} is kept" if saved else "no checkpoint was written"))
                bar.set_postfix(phase=phase.name, epoch=epoch, loss=f"{loss / n:.4f}", acc=f"{correct / n:.3f}")
            if evaluating:
                model.eval()
                with torch.no_grad():
                    history.append({"epoch": epoch, "phase": phase.name, "lr": lr, "time_s": time.time() - t0,
                                    **evaluate(model)})  # lr: of the epoch's last step
                model.train()
                if snapshot_dir:
                    os.makedirs(snapshot_dir, exist_ok=True)
                    torch.save(model.state_dict(), os.path.join(snapshot_dir, f"epoch{epoch:06d}.pt"))
                out_of_time = time_limit_s is not None and time.time() - started >= time_limit_s
                if ckpt_path and (last or out_of_time or time.time() - last_save >= ckpt_every_s):
                    save_checkpoint(ckpt_path, model, opt, epoch, history, gen, config)
                    last_save, saved = time.time(), epoch
                if out_of_time:
                    bar.close()
                    print(f"time limit reached: stopped after epoch {epoch}", file=sys.stderr)
                    return history
    bar.close()
    return history


def measures(entry):
    """What an evaluation measured: a history entry without its epoch, phase, lr and time."""
    return {k: v for k, v in entry.items() if k not in ("epoch", "phase", "lr", "time_s")}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_decode(model, prompts, n_new, device, chunk=4096):
    """Greedy (top-1) continuation of (P, Tp) prompts by n_new tokens -> (P, n_new), on the
    device in chunks, through the model's own `generate`."""
    out = []
    for i in range(0, len(prompts), chunk):
        with autocast(device):
            out.append(model.generate(prompts[i: i + chunk].to(device), n_new).cpu())
    return torch.cat(out)


def decode_answer(model, prompts, answers, device):
    """The model's own (P, l) answer to each prompt, scored position by position against the true
    (P, l) answers: position 0 from the prompt alone, positions 1.. by greedy decoding from the
    prompt plus the true position 0 (the start node, which the task gives)."""
    start = greedy_decode(model, prompts, 1, device)
    rest = greedy_decode(model, torch.cat([prompts, answers[:, :1]], 1), answers.shape[1] - 1, device)
    return torch.cat([start, rest], 1)


def top_k_hits(scores, target, k, ignore=None):
    """(R,) bool: is each row's target among its k best scores? Ties and non-finite values count
    against the model: the row must be finite and fewer than k other entries may reach the
    target's score (so a constant or NaN model scores 0, not 1). `ignore` (R, M) bool: entries
    left out of the ranking (never the target)."""
    rival = scores >= scores.gather(1, target[:, None])
    finite = torch.isfinite(scores)
    if ignore is not None:
        rival, finite = rival & ~ignore, finite | ignore
    return (rival.sum(1) - 1 < k) & finite.all(1)  # the target itself is one of the rivals


def logit_recall(L, edges):
    """`edge_recall` of a whole (N, M) logit matrix (Node2Vec's E E^T, a tiny model's geometric
    logits; M >= N, extra columns such as special tokens are candidates too): the fraction of
    edges (u, v) with v among the top-deg(u) entries of row u. u's own entry is left out unless
    u -> u is an edge (E E^T puts every node first in its own row)."""
    L, e = torch.as_tensor(np.asarray(L, dtype=np.float64)), torch.as_tensor(np.asarray(edges))
    N = L.shape[0]
    loops = torch.zeros(N, dtype=torch.bool)
    loops[e[e[:, 0] == e[:, 1], 0]] = True
    ignore = torch.eye(N, L.shape[1], dtype=torch.bool) & ~loops[:, None]
    deg = torch.bincount(e[:, 0], minlength=N)
    return top_k_hits(L[e[:, 0]], e[:, 1], deg[e[:, 0]], ignore[e[:, 0]]).double().mean().item()


def row_margins(L, edges):
    """For each source u with targets (a row of the (N, M) logit matrix L; extra columns count as
    non-targets): (its lowest target logit, its highest target logit) minus its highest
    non-target logit, u's own entry left out of both sides. A row with a non-finite value gets
    -inf: it stores nothing."""
    L = np.asarray(L, dtype=np.float64)
    N, M = L.shape
    target = np.zeros((N, M), dtype=bool)
    target[edges[:, 0], edges[:, 1]] = True
    own = np.eye(N, M, dtype=bool)
    target &= ~own
    best_other = np.where(~target & ~own, L, -np.inf).max(1)
    low = np.where(target, L, np.inf).min(1) - best_other
    high = np.where(target, L, -np.inf).max(1) - best_other
    broken = ~np.isfinite(L).all(1)
    low[broken] = high[broken] = -np.inf
    rows = target.any(1)
    return low[rows], high[rows]


def edge_margin(L, edges):
    """The margin of App. B.5 / E.2: the worst row's lowest target logit minus its highest
    non-target logit. Positive: every edge of every row is read off L."""
    return float(row_margins(L, edges)[0].min())


def edge_margin_authors(L, edges):
    """The margin of the authors' release (tiny_graphs_notebooks/analysis/analysis_spectral.py,
    _edge_margin): the mean over rows of the highest target logit minus the highest non-target
    logit. Positive when most rows put some neighbour first, a weaker test than `edge_margin`."""
    return float(row_margins(L, edges)[1].mean())


@torch.no_grad()
def edge_recall(model, edges, vocab, device, chunk=4096):
    """Edge memorization: the fraction of trained edges (u, v) whose v is among the top-deg(u)
    predictions after `[EDGE] u`, deg(u) = number of trained targets of u (the top-k success
    criterion of App. C.3; a source with several neighbours cannot put them all at top-1).
    On the device; one sync at the end."""
    e = torch.as_tensor(edges).to(device)
    deg = torch.bincount(e[:, 0], minlength=vocab.num_nodes)
    X, _ = edge_group(e, vocab)
    hits = torch.zeros((), device=device)
    for i in range(0, len(e), chunk):
        with autocast(device):
            logits = model(X[i: i + chunk]).float()
        hits += top_k_hits(logits, e[i: i + chunk, 1], deg[e[i: i + chunk, 0]]).sum()
    return hits.item() / len(e)


@torch.no_grad()
def edge_queries(model, vocab, device, chunk=4096):
    """(N, C): the model's last hidden state after `[EDGE] u` for every node u, the vector its
    output layer reads the edge's answer from (logits = query @ unembedding^T). A deep untied model
    can hold its geometry here and not in its input rows: `navigation_score` of the queries
    against the output rows (docs/results.md, the untied 12-layer GPT)."""
    nodes = torch.arange(vocab.num_nodes, device=device)
    X = edge_group(torch.stack([nodes, nodes], 1), vocab)[0]  # [EDGE] u (the targets are unused)
    out = []
    for i in range(0, len(X), chunk):
        with autocast(device):
            out.append(model.hidden(X[i: i + chunk])[:, -1].float())
    return torch.cat(out)


@torch.no_grad()
def logit_lens(model, idx, position=-1, edit=None):
    """A GPT's (n_layer + 1, B, V) logits at `position` of idx (B, T), read through ln_f and the
    tied head after the embedding and after each block; the last are the model's own logits. A
    list of positions reads them all from one pass: (n_layer + 1, B, len(position), V).
    `edit(i, x)` -> x changes the (B, T, C) stream after block i (0: the embedding) before it is
    read and passed on: an intervention, e.g. a direction projected out at one position."""
    x = model.wte(idx) + model.wpe[: idx.shape[1]]
    out = []
    for i, block in enumerate([None, *model.blocks]):
        x = x if block is None else block(x)
        x = x if edit is None else edit(i, x)
        out.append(model.logits(model.ln_f(x[:, position])))
    return torch.stack(out)


# ----------------------------------------------------------------------------- geometry


def cosine_matrix(a, b=None):
    """Cosine similarities between the rows of a and of b (default a)."""
    a = torch.as_tensor(a).float()
    b = a if b is None else torch.as_tensor(b).float()
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def geometric_level(E, edges):
    """App. B.5: mean cosine similarity of the embeddings of adjacent nodes (self-edges excluded)."""
    e = np.array([(u, v) for u, v in edges if u != v])
    X = F.normalize(torch.as_tensor(np.asarray(E)).float(), dim=1)
    return float((X[e[:, 0]] * X[e[:, 1]]).sum(1).mean())


def k_for_energy(energy, evals, frac=0.95):
    """The Fiedler-like set: fewest top eigenvectors holding `frac` of ||E||^2 (degenerate
    eigenspaces kept whole). 95%, not 99%: the near-constant v_1 alone holds 70-90% (Remark 6)."""
    k = int(np.searchsorted(np.cumsum(energy), frac)) + 1
    while k < len(evals) and evals[k - 1] - evals[k] < 1e-8:
        k += 1
    return min(k, len(evals))


def spectral_share(E, V):
    """One geometry number for any node-embedding matrix E (N, C): the share of its centred energy
    that lies in the span of the graph's top eigenvectors V (N, k) (of D^-1 A + A D^-1 - 2I, as
    `laplacian_eigs`), both taken orthogonal to the constant vector. 1: E is made of those
    directions (Node2Vec's spectral bias, §4); about k/N for a random E."""
    E = np.asarray(E, dtype=np.float64)
    E = E - E.mean(0)
    V = np.asarray(V, dtype=np.float64)
    U, S, _ = np.linalg.svd(V - V.mean(0), full_matrices=False)
    Q = U[:, S > 1e-8 * S.max()]  # an orthonormal basis of the centred span (a constant column drops out)
    return float(((Q.T @ E) ** 2).sum() / (E ** 2).sum())


def navigation_score(emb, arms, all_arms, source=-1, target=1, readout=None, target_emb=None):
    """§2.4 geometry score: for the leaf of each root-to-leaf path in `arms`, rank the root's
    children (the distinct first nodes of `all_arms`) by cosine similarity to the leaf's
    embedding. Returns the top-1 rate (the leaf points at its own first node; chance 1/d) and
    the mean rank (1 = best; chance (d+1)/2). Ties and non-finite values count against: a child
    as similar as the own one ranks above it, a non-finite row ranks last. Runs on emb's device.
    `source`, `target`: the path positions compared (default: the leaf, -1, against first nodes,
    1); (-1, -3) ranks the node two hops above each leaf among those of every arm: the pair a
    zigzag arm (§4.4, `hop_cosine`) stores and (-1, 1) misses. `readout` (C, C), if given, maps
    the leaves' embeddings before the cosine (`linear_navigation`). `target_emb` (default: emb)
    holds the rows the children are read from: an untied model's unembedding, where §4.4's SVD
    puts a node's odd-hop neighbours (its input row against their output rows)."""
    emb = torch.as_tensor(emb).float()
    rows = emb if target_emb is None else torch.as_tensor(target_emb).float()
    children = sorted({a[target] for a in all_arms})
    column = {c: i for i, c in enumerate(children)}
    own = torch.tensor([column[arm[target]] for arm in arms], device=emb.device)
    sources = emb[[a[source] for a in arms]]
    sim = cosine_matrix(sources if readout is None else sources @ readout.to(sources), rows[children])
    rank = (sim >= sim.gather(1, own[:, None])).sum(1).float()
    rank = torch.where(torch.isfinite(sim).all(1), rank, float(len(children)))
    return (rank == 1).float().mean().item(), rank.mean().item()


def linear_navigation(emb, train_arms, test_arms, all_arms, source=-1, target=1, ridge=1e-3):
    """`navigation_score` of the held-out arms through one linear map W fitted on the training
    arms: least squares E[leaf] W ~ E[first node] over `train_arms` (ridge: `ridge` x the mean
    eigenvalue of the leaves' X^T X), then each held-out leaf's E[leaf] W ranked against every
    first node by cosine. What a model's layers could read and cosine cannot: a map that rotates
    or flips the leaf (a §4.4 zigzag turns the leaf away from its first node). Fitted on trained
    arms only, it scores the held-out ones only if their edges alone put them in the same
    geometry. Returns (top-1, mean rank) as `navigation_score`."""
    E = torch.as_tensor(emb).double()
    X, Y = E[[a[source] for a in train_arms]], E[[a[target] for a in train_arms]]
    G = X.T @ X
    shrink = ridge * G.trace() / len(G) + torch.finfo(G.dtype).tiny  # never singular
    W = torch.linalg.solve(G + shrink * torch.eye(len(G), dtype=G.dtype, device=G.device), X.T @ Y)
    return navigation_score(E, test_arms, all_arms, source, target, readout=W)


def hop_cosine(emb, arms, other=None):
    """§B.5's cosine heatmap of the arms, summed up by hop distance: the mean cosine similarity of
    two nodes of one arm h hops apart (h = 1 .. L-1 over its L nodes a1 .. leaf; the root, shared by
    every arm, left out) and of two nodes of different arms. A geometry that stores the paths puts
    an arm's nodes closer than other arms'; a zigzag (§4.4) is high at even and low at odd h, which
    the leaf -> a1 `navigation_score` misses when L - 1 is odd. Arms of equal length (on a
    tree-star, different arms share their upper nodes). With `other` (an untied output layer's
    rows), a node's row against the `other` row of a node h hops away, both directions, h = 0 .. L-1
    (§4.4's SVD stores odd hops across the two layers). Returns ([mean cosine at h], cross-arm)."""
    X = F.normalize(torch.as_tensor(emb).float(), dim=1)
    Y = X if other is None else F.normalize(torch.as_tensor(other).float().to(X.device), dim=1)
    index = torch.tensor([arm[1:] for arm in arms], device=X.device)
    A, B = X[index], Y[index]  # (arms, L, C), unit rows
    n, L, _ = A.shape
    pair = lambda h: ((A[:, :L - h] * B[:, h:]).sum(-1).mean() + (A[:, h:] * B[:, :L - h]).sum(-1).mean()) / 2
    hops = [pair(h).item() for h in range(0 if other is not None else 1, L)]
    # every ordered pair, self-pairs included, is one dot of the sums; take away those within an arm
    cross = (A.sum((0, 1)) @ B.sum((0, 1)) - (A.sum(1) * B.sum(1)).sum()) / ((n * L) ** 2 - n * L * L)
    return hops, cross.item()


@functools.lru_cache
def arm_modes(L, device="cpu"):
    """The L modes of one arm of a path-star (a1 .. leaf, the root held at 0): the eigenpairs of
    D^-1 A + A D^-1 restricted to it, largest eigenvalue first, as float32 tensors on `device`:
    (mu (L,), phi (L, L), one mode per column). Computed once per (L, device): no CPU work or
    copies inside a training step (--zigzag-penalty)."""
    inv_degree = torch.full((L,), 0.5, dtype=torch.float64)  # a1 .. a_{L-1}: two neighbours
    inv_degree[-1] = 1.0  # the leaf: one
    w = inv_degree[:-1] + inv_degree[1:]  # (D^-1 A + A D^-1) between consecutive nodes of an arm
    mu, phi = torch.linalg.eigh(torch.diag(w, 1) + torch.diag(w, -1))
    return mu.flip(0).float().to(device), phi.flip(1).float().to(device)


def arm_spectrum(emb, arms):
    """§4.4 on a path-star, without its N x N eigenproblem. Apart from L + 1 vectors equal on every
    arm, the eigenvectors of D^-1 A + A D^-1 (`laplacian_eigs` adds -2I) are the L `arm_modes`
    phi_k, each spread over the arms with weights that sum to 0 (d - 1 copies). Returns tensors
    (mu, share, zigzag) on emb's device: mu[k] the eigenvalue of mode k, largest (smoothest) first;
    share[k] the part of the centred ||E||_F^2 in its copies (differentiable in emb); zigzag the
    share at mu < 0. The graph is bipartite, so the mode at -mu[k] is phi_k with every other sign
    flipped: §4.4's negative eigendirections are zigzags. `arms`: root-to-leaf lists (or a tensor
    of them) that share only the root."""
    X = torch.as_tensor(emb).float()
    mu, parts = arm_parts(X, arms)
    share = (parts ** 2).sum((0, 2)) / ((X - X.mean(0)) ** 2).sum()
    return mu, share, (share * (mu < -1e-6)).sum()  # (a mask, not indexing: no sync on CUDA)


def arm_parts(emb, arms):
    """Each arm's embeddings in the arm modes: (mu (L,), parts (arms, L, C)), parts[a, k] the
    coefficient of mode k on arm a after the part equal on every arm is removed, so that node j of
    arm a is that common part plus sum_k phi[j, k] parts[a, k]."""
    X = torch.as_tensor(emb).float()
    A = X[torch.as_tensor(arms, device=X.device)[:, 1:]]  # (arms, L, C)
    mu, phi = arm_modes(A.shape[1], X.device)
    return mu, torch.einsum("lk,alc->akc", phi, A - A.mean(0))


def zigzag_reflection(emb, arms):
    """§4.4 on a path-star: the map I - 2P (C, C), P the projection on the directions where the
    arms' most zigzag mode holds more of their energy than their smoothest. With the leaf an odd
    number of hops below a1 (G(n, 5): 3) the smoothest mode weighs the two with one sign and the
    most zigzag one with opposite signs, so an arm that keeps both modes in different directions
    has its leaf turned away from its first node; reflecting the zigzag's directions turns it
    back, with nothing fitted (`navigation_score`'s readout)."""
    parts = arm_parts(emb, arms)[1].double()
    zigzag_over_smooth = parts[:, -1].T @ parts[:, -1] - parts[:, 0].T @ parts[:, 0]
    ev, V = torch.linalg.eigh(zigzag_over_smooth)
    Z = V[:, ev > 0]
    return torch.eye(len(ev), dtype=ev.dtype, device=ev.device) - 2 * Z @ Z.T


def token_embeddings(model, num_nodes):
    """Node embeddings as an (N, C) numpy array, row i = node i."""
    return model.wte.weight[:num_nodes].detach().float().cpu().numpy()


def output_rows(model, num_nodes):
    """The node rows (N, C) of an untied output layer (`--untied-head`), on the model's device;
    None where the output layer is the embedding itself (tied, the paper)."""
    W = model.unembedding()
    return None if W is model.wte.weight else W[:num_nodes].detach().float()


# ----------------------------------------------------------------------------- flags and errors


def die(msg):
    """Bad input ends the run with one line on stderr and no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
    sys.exit(2)


class ArgParser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        super().__init__(*args, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    def error(self, message):
        die(message)


def preset_help(what, preset):
    """--help text of a preset flag: the flags it sets."""
    show = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return f"{what}: " + ", ".join(f"--{k.replace('_', '-')} {show(v)}" for k, v in preset.items()) + \
        " (explicit flags still win)"


def parse_with_presets(parser, presets, argv=None):
    """Flags a preset (e.g. --quick) sets become defaults; flags given explicitly still win."""
    known, _ = parser.parse_known_args(argv)
    for name, values in presets.items():
        if getattr(known, name, False):
            parser.set_defaults(**values)
    return parser.parse_args(argv)


def add_adamw_flags(group, source):
    """--betas and --grad-clip with the defaults of `source`, a release whose AdamW is torch's
    default (betas (0.9, 0.999)) with no clipping (both releases this toolkit follows)."""
    group.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
                       help=f"AdamW betas ({source}: torch's default)")
    group.add_argument("--grad-clip", type=float, default=0.0,
                       help=f"clip the gradient norm (0 = off, as {source})")


def add_step_flags(group):
    """--compile and --cuda-graph: how `Stepper` runs a training step."""
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="compile the model's forward and backward with inductor (default: on with "
                       "CUDA)")
    group.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="capture the whole training step in a CUDA graph (default: on with CUDA)")


def add_seed_flags(group):
    """--seeds and --parallel of a script that runs through `over_seeds`."""
    group.add_argument("--seeds", type=int, nargs="+", metavar="S",
                       help="run the selected studies once per seed into --out/seed<S>/, then the mean, min "
                       "and max over seeds of the final measures (summary.md, summary.csv, metrics.json)")
    group.add_argument("--parallel", type=int, default=1, metavar="K",
                       help="with --seeds: K seeds at a time, each its own process with its share of the "
                       "CPU's threads")


def step_modes(args, device):
    """(compile, cuda_graph) of `add_step_flags` on this device: unset, each is on with CUDA."""
    cuda = str(device).startswith("cuda")
    if args.cuda_graph and not cuda:
        die("--cuda-graph needs a CUDA device")
    pick = lambda flag: cuda if flag is None else flag
    return pick(args.compile), pick(args.cuda_graph)


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {name} requested but CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        die(f"--device must be auto, cpu or cuda[:i], got {name!r}")
    return name


def prepare_out(path):
    """Create --out and check it is writable before any work starts."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        die(f"cannot write to --out {path!r}: {e.strerror or e}")


def write_json(path, obj):
    tmp = path + ".tmp"  # write then rename: a killed run never leaves a half-written file
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def seed_everything(seed):
    """torch's global RNG (inits, dropout); numpy draws come from seeded default_rng generators."""
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoints


def get_rng_state():
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, opt, epoch, history, gen, config):
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "history": history, "generator": gen.get_state(), "rng": get_rng_state(),
                "config": config}, tmp)
    os.replace(tmp, path)


# flags that may differ between a run and its resumption
RESUME_FREE = {"resume", "device", "out", "bench", "compile", "cuda_graph", "pack", "ckpt_every",
               "time_limit", "parallel", "graph", "snapshots"}  # graph: a label derived from the flags


def config_diff(saved, config):
    """Flags (sorted) on which two run configs differ, those free to change on resume excepted."""
    saved, config = saved or {}, config or {}
    keys = sorted(set(saved) | set(config))
    return [k for k in keys if k not in RESUME_FREE and saved.get(k) != config.get(k)]


def read_torch_file(path, flag):
    """torch.load of a file a flag names, every tensor on the CPU; a missing, truncated or foreign
    file stops the run with one line naming the flag."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        die(f"{flag}: cannot read {path}: {str(e).splitlines()[0][:200]}")


def load_checkpoint(path, config):
    """The checkpoint at `path`, every tensor on the CPU: RNG states must stay there (torch takes
    them only as CPU byte tensors), and load_state_dict moves weights and AdamW moments to the
    model's device."""
    if not path or not os.path.exists(path):
        die(f"--resume: no checkpoint at {path}")
    ckpt = read_torch_file(path, "--resume")
    saved = ckpt.get("config") or {}
    diff = config_diff(saved, config)
    if diff:
        k = diff[0]
        die(f"--resume: checkpoint {path} was made with {k}={saved.get(k)!r}, this run has "
            f"{k}={(config or {}).get(k)!r} ({len(diff)} flag(s) differ)")
    return ckpt


# ----------------------------------------------------------------------------- seeds


def spread(values_by_seed):
    """{seed: {metric: number}} -> {metric: {"mean", "min", "max", "values": {seed: v}}} over the
    metrics that every seed has as a number (lists and strings are skipped)."""
    seeds = list(values_by_seed)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    keys = [k for k in values_by_seed[seeds[0]] if all(number(values_by_seed[s].get(k)) for s in seeds)]
    out = {}
    for k in keys:
        v = np.array([values_by_seed[s][k] for s in seeds], dtype=float)
        out[k] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
                  "values": {str(s): values_by_seed[s][k] for s in seeds}}
    return out


def write_spread_csv(path, table, seeds, label="run"):
    """table: {name: spread(...)} (one name per run or sweep arm) -> one line per (name, metric):
    mean, min, max, then each seed's value."""
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([label, "metric", "mean", "min", "max"] + [f"seed{s}" for s in seeds])
        for name, metrics in table.items():
            for k, m in metrics.items():
                w.writerow([name, k, m["mean"], m["min"], m["max"]] + [m["values"][str(s)] for s in seeds])


def with_threads(threads, fn, *args):
    """fn(*args) with torch on `threads` threads (None: as it is): one process's share of the CPU."""
    if threads:
        torch.set_num_threads(threads)
    return fn(*args)


def in_processes(fn, jobs, parallel, device):
    """{name: args} -> {name: fn(*args)}: one call after another, or `parallel` at a time, each in
    its own (spawned) process: the seeds or sweep arms of a script, sharing the CPU's cores (each
    process gets its share of the threads) or one GPU. `fn` must be a module-level function (it is
    pickled by name)."""
    if parallel <= 1 or len(jobs) <= 1:
        return {name: fn(*a) for name, a in jobs.items()}
    import concurrent.futures
    import multiprocessing
    threads = None if str(device).startswith("cuda") else max(1, torch.get_num_threads() // parallel)
    with concurrent.futures.ProcessPoolExecutor(parallel, multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(with_threads, threads, fn, *a) for name, a in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def summary_markdown(rows_by_seed, seeds):
    """{seed: {study: {row: {measure: value}}}} -> one markdown table per study: mean [min, max] over
    the seeds, or each seed's value where one has none (e.g. a measure that never reached a level)."""
    def cell(values):
        if all(isinstance(v, (int, float)) for v in values):  # steps and counts are ints
            fmt = ("{:.0f}" if all(isinstance(v, int) for v in values)
                   else "{:+.3f}" if min(values) < 0 else "{:.3f}")
            return f"{fmt.format(np.mean(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"
        return " / ".join("–" if v is None else f"{v:g}" for v in values)
    lines = [f"Mean [min, max] over seeds {', '.join(map(str, seeds))}; 'a / b / c' lists each seed's value "
             "where one has none ('–': never)."]
    for study, rows in rows_by_seed[seeds[0]].items():
        measures = list(dict.fromkeys(k for r in rows.values() for k in r))
        header = " | ".join(m.replace("_", " ") for m in measures)
        lines += ["", f"## {study}", "", f"| row | {header} |", "|" + "---|" * (len(measures) + 1)]
        for name in rows:
            vals = {m: [rows_by_seed[s][study][name].get(m) for s in seeds] for m in measures}
            lines.append(f"| {name} | " + " | ".join(
                "–" if all(v is None for v in vals[m]) else cell(vals[m]) for m in measures) + " |")
    return "\n".join(lines) + "\n"


def one_seed(args, seed):
    """The flags of one run of --seeds: this seed, its own folder --out/seed<S>/."""
    return argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None,
                                 "out": os.path.join(args.out, f"seed{seed}")})


def over_seeds(run, rows, args, device):
    """--seeds of a script whose `run(args, device)` returns its metrics and writes --out: one run
    per seed in --out/seed<S>/ (--parallel K at a time, in_processes), then `rows(metrics)` ->
    {study: {row: {measure: value}}} of each, and their spread over the seeds in summary.md,
    summary.csv and metrics.json. Returns {seed: metrics}."""
    prepare_out(args.out)
    per_seed = in_processes(run, {s: (one_seed(args, s), device) for s in args.seeds}, args.parallel, device)
    seeds = list(args.seeds)
    by_seed = {s: rows(per_seed[s]) for s in seeds}
    table = {f"{study}: {name}": spread({s: by_seed[s][study][name] for s in seeds})
             for study, by_row in by_seed[seeds[0]].items() for name in by_row}
    write_spread_csv(os.path.join(args.out, "summary.csv"), table, seeds, "row")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_markdown(by_seed, seeds))
    write_json(os.path.join(args.out, "metrics.json"), {"config": vars(args), "seeds": seeds,
                                                       "device": device_name(device), "summary": table})
    print(f"{len(seeds)} seeds -> {os.path.join(args.out, 'summary.md')}")
    return per_seed


def curve_band(histories, value, x="epoch"):
    """Mean, min and max over seeds of each record's `value` (a key, or a function of the record),
    at the x (epochs, steps) every seed recorded: (xs, mean, (mins, maxs))."""
    get = value if callable(value) else (lambda h: h[value])
    xs = sorted(set.intersection(*({h[x] for h in hist} for hist in histories)))
    at = [{h[x]: get(h) for h in hist} for hist in histories]
    v = np.array([[a[e] for e in xs] for a in at], dtype=float)
    return xs, v.mean(0), (v.min(0), v.max(0))


def epochs_to(history, level, value):
    """The first recorded epoch at which `value` (a key, or a function of the record) reaches
    `level` (App. D.2's "faster convergence"), or None if it never does."""
    get = value if callable(value) else (lambda h: h[value])
    return next((h["epoch"] for h in history if get(h) >= level), None)


# ----------------------------------------------------------------------------- benchmarking


def peak_matmul_flops(device):
    """This device's own dense-matmul peak, in the precision training runs in: the best of a few
    square matmuls. On the CPU 1024 and 2048 reach what 4096 does (fp32, 2 cores: 143-155 GFLOP/s
    against 148-152, 2026-12-08) in a fifth of the time; 2048 for hosts with more cores."""
    cuda = str(device).startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    best = 0.0
    for n, reps in ([(4096, 5)] if cuda else [(1024, 30), (2048, 5)]):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(reps + 1):
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_gib(device, reset=False):
    """CUDA: the most memory tensors held since the last reset, in GiB (then reset if asked);
    the CPU: None."""
    if not str(device).startswith("cuda"):
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (an eager step on a GPU runs about one kernel each)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def bench_modes(device, pack=False):
    """(name, compile, cuda_graph, pack) of every step mode this device has; with `pack`, also
    the packed versions of the fastest ones (CUDA: those replayed from a graph)."""
    if str(device).startswith("cuda"):
        modes = [("eager", False, False), ("graph", False, True), ("compiled", True, False),
                 ("compiled+graph", True, True)]
        packed = modes[1::2]
    else:
        modes = [("eager", False, False), ("compiled", True, False)]
        packed = modes
    return [m + (False,) for m in modes] + [(name + "+packed", c, g, True) for name, c, g in packed if pack]


def profile_step(fn, device):
    """One call of fn under torch's profiler -> (launches, kernels, busy_ms, ops). CUDA: kernel and
    graph launches by the host, the kernels the GPU ran (those replayed from a graph included: on
    a GPU the step is bound by their number), their summed GPU time (against the wall time of a
    step it says how idle the GPU is), and every kernel with its GPU time; the CPU: launches and
    kernels None, the summed self time of the aten ops, and every op by it.
    ops: [[name, ms, calls]], the most time first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = str(device).startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    launches = sum(1 for e in prof.events() if "Launch" in e.name and e.name.startswith(("cuda", "cu")))
    kind, time_of = ((DeviceType.CUDA, lambda e: e.self_device_time_total) if cuda
                     else (DeviceType.CPU, lambda e: e.self_cpu_time_total))
    ops = sorted((e for e in prof.key_averages() if e.device_type == kind), key=time_of, reverse=True)
    busy_ms = sum(time_of(e) for e in ops) / 1e3
    kernels = sum(e.count for e in ops) if cuda else None
    ops = [[e.key[:120], time_of(e) / 1e3, e.count] for e in ops]
    return (launches if cuda else None), kernels, busy_ms, ops


def benchmark(model, groups, batch_size, device, epochs, weight_decay=0.0, modes=None, seed=0,
              report=None, keep=None, reference=None):
    """Times full training steps (forward, backward, clipping, AdamW) in each of `modes` (name,
    compile, cuda_graph, packed; default: `bench_modes(device)`) from the same initial weights, and
    compares model FLOP/s with this device's matmul peak measured in the same run (before and after
    the steps, the better of the two). Per mode: ms per step and per epoch, sequences/s, MFU, peak
    GPU memory, the minutes `epochs` epochs of training would take (evaluation not counted), a
    profile of one more step (`profile_step`: launches, kernels, busy time, every kernel or op),
    and in eager modes the aten ops a step dispatches (`OpCounter`).
    CUDA: 5 warm-up steps (a graph is captured at the 4th), 20 timed; CPU: 2 and 5. A mode's MFU
    counts the FLOPs it runs: a packed step with shared heads runs fewer tokens for the same
    losses, so compare modes by ms per step.
    Every mode trains the same rows from the same weights, so each should give the same results
    (in bf16 on CUDA, up to rounding): per mode the mean loss of the timed steps and how far its
    weights after them are from the first mode's, relative to the first mode's own update. `keep`:
    a file to save the first mode's weights in (`flat_params`); `reference`: such weights from
    another bench of the same configuration (e.g. the eager step with GEOMEM_KERNELS=0), which
    every mode is then also measured against (relative to the same update).
    `report(result)` is called after each mode (to save what is measured so far)."""
    warmup, steps = (5, 20) if str(device).startswith("cuda") else (2, 5)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    start, first = flat_params(model), None  # first: the first mode's weights after its timed steps
    reference = None if reference is None else reference.to(start.device)
    sampler = GroupSampler([loss_tail(*g) for g in groups], batch_size, torch.Generator().manual_seed(seed))
    rows = [r for _, r in zip(range(warmup + steps + 1), forever(sampler))]
    flops = sum(model.flops(len(i), X.shape[1], int((Y[i] >= 0).sum()))
                for (X, Y), i in zip(sampler.groups, rows[0]))  # every step has the same shapes
    tokens = sum(len(i) * X.shape[1] for (X, _), i in zip(sampler.groups, rows[0]))
    seqs = sum(sampler.shares)
    peak = peak_matmul_flops(device)
    res = {"device": device_name(device), "batch_size": batch_size, "steps_per_epoch": sampler.steps_per_epoch,
           "flops_per_step": flops, "peak_flops_per_s": peak, "timed_steps": steps,
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "triton": triton.__version__ if triton is not None else None, "modes": {}}
    for name, compile, cuda_graph, packed in modes or bench_modes(device):
        model.load_state_dict(init)
        model.train()
        opt = make_optimizer(model, 1e-4, weight_decay)
        packing = Packing.for_sampler(sampler, model) if packed else None
        step = Stepper(model, opt, sampler.groups, 1.0, compile, cuda_graph, packing=packing)
        run_flops, run_tokens = ((flops, tokens) if packing is None else
                                 (model.flops(*packing.positions.shape, len(packing.loss_index)),
                                  packing.positions.numel()))
        peak_memory_gib(device, reset=True)
        t = time.perf_counter()
        for r in rows[:warmup]:
            step(r)
        sync(device)
        setup = time.perf_counter() - t
        step.stats.zero_()  # in place: a captured graph adds to this tensor
        t = time.perf_counter()
        for r in rows[warmup:warmup + steps]:
            step(r)
        sync(device)
        dt = (time.perf_counter() - t) / steps
        weights = flat_params(model)
        if first is None:
            first = weights
            if keep:
                torch.save(first.cpu(), keep)
        loss = (step.stats[0] / step.stats[2]).item()
        off = lambda other: ((weights - other).norm() / (first - start).norm()).item()
        launches, kernels, busy_ms, ops = profile_step(lambda: step(rows[-1]), device)
        counter = OpCounter()
        if not (compile or cuda_graph):  # compiled code and graph replays bypass the dispatcher
            with counter:
                step(rows[-1])
        res["modes"][name] = {
            "ms_per_step": 1e3 * dt, "ms_per_epoch": 1e3 * dt * sampler.steps_per_epoch,
            "seqs_per_s": seqs / dt, "loss": loss, "weights_off_first_mode": off(first),
            "weights_off_reference": None if reference is None else off(reference),
            "tokens_per_step": run_tokens, "flops_per_step": run_flops,
            "model_flops_per_s": run_flops / dt, "mfu": run_flops / dt / peak, "warmup_s": setup,
            "launches_per_step": launches, "kernels_per_step": kernels, "busy_ms_per_step": busy_ms,
            "top_ops": ops[:12], "ops": ops,
            "aten_ops_per_step": None if compile or cuda_graph else counter.ops,
            "cuda_graph": step.graph is not None, "packed": packed,
            "triton_attention": any("short_attention" in op for op, _, _ in ops),  # what ran, not could run
            "bf16_weights": step.weights is not None,
            "peak_memory_gib": peak_memory_gib(device),
            "projected_train_minutes": dt * sampler.steps_per_epoch * epochs / 60, "epochs": epochs}
        if report:
            report(res)
    # a shared machine can dip while the peak is measured (once it read 140 GFLOP/s where other
    # runs read 177-196, and MFU went over 100%): measure again and keep the better
    res["peak_flops_per_s"] = peak = max(peak, peak_matmul_flops(device))
    for m in res["modes"].values():
        m["mfu"] = m["model_flops_per_s"] / peak
    if report:
        report(res)
    model.load_state_dict(init)
    return res


def flat_params(model):
    """Every parameter of the model in one fp32 vector (a copy)."""
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def forever(sampler):
    while True:
        yield from sampler.epoch()


def device_name(device):
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- plotting


def pyplot():
    """matplotlib without a display (CI machines, GPU nodes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi, rect=(0, 0, 1, 1)):
    """Tight layout inside `rect` (None: keep the layout, e.g. a colorbar spanning all axes), write, close."""
    if rect is not None:
        fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_cosine_heatmap(path, emb, blocks, labels, title, columns=None, label="cosine similarity"):
    """Cosine similarities of the embeddings of the nodes in `blocks` (lists of node ids, shown
    in order, one block per arm), with block boundaries drawn; `columns`, if given, another
    embedding of the same nodes for the columns (an untied model's output rows)."""
    plt = pyplot()
    nodes = [v for b in blocks for v in b]
    sim = cosine_matrix(emb[nodes], None if columns is None else columns[nodes]).numpy()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
    edges = np.cumsum([len(b) for b in blocks])[:-1] - 0.5
    for e in edges:
        ax.axhline(e, color="k", lw=0.6)
        ax.axvline(e, color="k", lw=0.6)
    centers = np.cumsum([len(b) for b in blocks]) - np.array([len(b) for b in blocks]) / 2 - 0.5
    ax.set_xticks(centers, labels, rotation=90, fontsize=7)
    ax.set_yticks(centers, labels, fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label=label)
    save_figure(fig, path, dpi=110)


def plot_panels(path, panels, title, xlabel="epoch"):
    """Line plots, up to three side by side per row. panels: [(subtitle, ylabel, lines, chance or
    None)], each line (xs, ys, label) or (xs, ys, label, (lows, highs)) with a band (the spread
    over seeds); an 'accuracy' panel is drawn on [0, 1]."""
    import matplotlib.ticker
    plt = pyplot()
    cols = 2 if len(panels) == 4 else min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols + 1.2, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (subtitle, ylabel, lines, chance) in zip(axes.flat, panels):
        for xs, ys, label, *band in lines:
            line, = ax.plot(xs, ys, label=label, lw=1.6, marker="o" if len(xs) <= 12 else None, ms=4)
            if band:
                ax.fill_between(xs, *band[0], color=line.get_color(), alpha=0.2, lw=0)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if "accuracy" not in ylabel and all(float(y).is_integer() for _, ys, *_ in lines for y in ys):
            ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # e.g. a block index
        if chance is not None:
            ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance = {chance:.3g}")
        if "accuracy" in ylabel:
            ax.set_ylim(-0.02, 1.02)
        ax.set(title=subtitle, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path, dpi=100)


def plot_curves(path, history, series, title, ylabel="accuracy", chance=None):
    """One panel: a line per (key, label) of `series` over the history's epochs."""
    x = [h["epoch"] for h in history]
    lines = [(x, [h[k] for h in history], label) for k, label in series]
    plot_panels(path, [(None, ylabel, lines, chance)], title)
