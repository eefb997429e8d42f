import pytest
import torch

from common import GPT, Mamba, MambaConfig, selective_scan, selective_scan_ref


def scan_inputs(b=3, d=5, L=9, n=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g, dtype=dtype)
    delta = torch.nn.functional.softplus(torch.randn(b, d, L, generator=g, dtype=dtype))
    A = -torch.rand(d, n, generator=g, dtype=dtype) * 3
    B = torch.randn(b, n, L, generator=g, dtype=dtype)
    C = torch.randn(b, n, L, generator=g, dtype=dtype)
    D = torch.randn(d, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (u, delta, A, B, C, D)]


@pytest.mark.parametrize("shape", [(3, 5, 9, 4), (2, 16, 64, 16), (1, 1, 1, 1)])
def test_fast_scan_matches_sequential_values_and_grads(shape):
    b, d, L, n = shape
    xs = scan_inputs(b, d, L, n)
    ys = [x.detach().clone().requires_grad_() for x in xs]
    y_ref, y_fast = selective_scan_ref(*xs), selective_scan(*ys)
    assert y_fast.shape == (b, d, L)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y_ref)
    (y_ref * w).sum().backward()
    (y_fast * w).sum().backward()
    for name, x, y in zip("u delta A B C D".split(), xs, ys):
        torch.testing.assert_close(y.grad, x.grad, rtol=1e-4, atol=1e-4, msg=f"grad of {name}")


def test_fast_scan_gradcheck_double():
    xs = scan_inputs(2, 3, 5, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(selective_scan, xs)


def test_scan_recurrence_by_hand():
    """d = n = 1, A = -1, delta = 1, B = C = 1, D = 0: h_t = e^-1 h_{t-1} + u_t."""
    u = torch.tensor([[[1.0, 0.0, 2.0]]])
    one = torch.ones(1, 1, 3)
    y = selective_scan(u, one, -torch.ones(1, 1), one, one, torch.zeros(1))
    e = torch.exp(torch.tensor(-1.0))
    torch.testing.assert_close(y, torch.stack([1.0 + 0 * e, e, e * e + 2]).view(1, 1, 3))


def tiny_mamba(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=19, n_layer=2, n_embd=16, d_state=4, d_conv=3, expand=2)
    cfg.update(kw)
    return Mamba(MambaConfig(**cfg)).eval()


def test_mamba_shapes_and_loss():
    m = tiny_mamba()
    x = torch.randint(0, 19, (4, 6))
    assert m(x).shape == (4, 19)
    y = torch.full((4, 6), -1)
    y[:, -1] = 3
    logits, loss = m(x, y[:, -1:])  # targets of the last position
    assert logits.shape == (4, 1, 19) and torch.allclose(logits[:, 0], m(x))
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(m(x), y[:, -1]))


def test_mamba_flops_count_every_weight_and_the_scan():
    """6 x (matmul weights) x tokens, plus the conv (2 E d_conv) and the scan (9 E n) per token and
    layer, x3 for the backward, plus the logits at the loss positions."""
    m = tiny_mamba()  # n_layer 2, width 16, d_state 4, d_conv 3, expand 2, vocab 19
    weights = sum(x.weight.numel() for x in m.layers.modules() if isinstance(x, torch.nn.Linear))
    E, B, T, n = 32, 4, 6, 5
    want = 6 * weights * B * T + 3 * 2 * (2 * E * 3 + 9 * E * 4) * B * T + 6 * n * 16 * 19
    assert m.flops(B, T, n) == want


@pytest.mark.parametrize("block", ["residual", "authors"])
def test_mamba_is_causal(block):
    m = tiny_mamba(block=block)
    x = torch.randint(0, 19, (3, 10))
    x2 = x.clone()
    x2[:, 6:] = (x2[:, 6:] + 1) % 19
    h, h2 = m.hidden(x), m.hidden(x2)
    torch.testing.assert_close(h[:, :6], h2[:, :6])
    assert not torch.allclose(h[:, 6:], h2[:, 6:])


def test_mamba_fast_and_reference_scan_agree_in_the_model():
    m = tiny_mamba()
    x = torch.randint(0, 19, (2, 7))
    torch.testing.assert_close(m.hidden(x), m.hidden(x, scan=selective_scan_ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["residual", "authors"])
def test_mamba_stepwise_state_matches_full_sequence(block):
    m = tiny_mamba(block=block)
    x = torch.randint(0, 19, (3, 8))
    full = m.hidden(x) @ m.wte.weight.T  # (b, L, V)
    E = m.cfg.expand * m.cfg.n_embd
    states = [(torch.zeros(3, E, m.cfg.d_conv - 1), torch.zeros(3, E, m.cfg.d_state)) for _ in m.layers]
    with torch.no_grad():
        for t in range(x.shape[1]):
            h = m.wte(x[:, t])
            for i, layer in enumerate(m.layers):
                y, states[i] = layer.mixer.step(layer.norm(h), states[i])
                h = h + y if block == "residual" else y
            torch.testing.assert_close(m.norm_f(h) @ m.wte.weight.T, full[:, t], rtol=1e-4, atol=1e-5)
    # greedy generation with the carried state equals greedy generation by recomputation
    prompts = torch.randint(0, 19, (5, 4))
    assert torch.equal(m.generate(prompts, 6), GPT.generate(m, prompts, 6))


def test_mamba_frozen_embeddings():
    """Frozen (tied) embeddings stay at their init through training; the rest of the model moves."""
    from common import make_optimizer
    m = tiny_mamba(freeze_embeddings=True).train()
    assert not m.wte.weight.requires_grad
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = make_optimizer(m, 1e-2, 0.1, decay_all=True)
    x = torch.randint(0, 19, (4, 6))
    for _ in range(3):
        opt.zero_grad()
        m(x, x[:, -1:])[1].backward()
        opt.step()
    after = m.state_dict()
    assert torch.equal(after["wte.weight"], before["wte.weight"])
    assert not torch.equal(after["layers.0.mixer.in_proj.weight"], before["layers.0.mixer.in_proj.weight"])


def test_authors_block_structure():
    """The release's block: LayerNorm, no residual, no final norm, every Linear bias zero (dt too)."""
    m = tiny_mamba(block="authors")
    layer = m.layers[0]
    assert isinstance(layer.norm, torch.nn.LayerNorm) and isinstance(m.norm_f, torch.nn.Identity)
    assert not layer.mixer.dt_proj.bias.any()
    x = torch.randn(2, 5, 16)
    assert torch.allclose(layer(x), layer.mixer(layer.norm(x)))  # no x + ...
    r = tiny_mamba(block="residual")
    assert torch.allclose(r.layers[0](x), x + r.layers[0].mixer(r.layers[0].norm(x)))
    bias = r.layers[0].mixer.dt_proj.bias  # softplus^-1 of dt in [1e-3, 0.1]: [-6.9, -2.25]
    assert bias.min() > -7 and bias.max() < -2.2


def test_exp_mamba_quick_smoke(tmp_path):
    import json

    import exp_mamba
    out = tmp_path / "mamba"
    exp_mamba.main(["--quick", "--first-token-only", "--epochs", "2", "--eval-every", "1", "--out", str(out)])
    m = json.load(open(out / "metrics.json"))
    assert m["config"]["model"] == "mamba" and len(m["history"]) == 2
    for key in ("test_first_token_acc", "navigation_acc", "edge_acc", "chance_first_token"):
        assert 0 <= m["final"][key] <= 1
    for f in ("graph.json", "embeddings.npy", "accuracy.png", "token_accuracy.png", "geometry.png",
              "embedding_heatmap.png"):
        assert (out / f).exists()


def test_scan_benchmark_reports_both_scans():
    import exp_mamba
    res = exp_mamba.scan_benchmark("cpu", b=2, d=4, L=8, n=3, reps=1)
    assert (res["batch"], res["channels"], res["length"], res["d_state"]) == (2, 4, 8, 3)
    assert res["speedup"] == pytest.approx(res["sequential_s"] / res["fast_s"])
