"""LLaMA structure: parameter names as in Meta's code and the paper, shapes, init std per class."""

import math

import torch

from lingua_wd.model import ModelArgs, Transformer, apply_rope, flops_per_token, rope_tables


def tiny(**kw) -> Transformer:
    args = ModelArgs(**{"dim": 256, "n_layers": 2, "head_dim": 64, "vocab_size": 300, "max_seq_len": 32, **kw})
    m = Transformer(args)
    m.init_weights(seed=0)
    return m


def test_parameter_names_and_shapes():
    m = tiny(n_kv_heads=2)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    d, h = 256, 3 * 256
    expect = {
        "tok_embeddings.weight": (300, d),
        "layers.1.attention.wq.weight": (d, d),
        "layers.1.attention.wk.weight": (2 * 64, d),
        "layers.1.attention.wv.weight": (2 * 64, d),
        "layers.1.attention.wo.weight": (d, d),
        "layers.1.feed_forward.w1.weight": (h, d),
        "layers.1.feed_forward.w3.weight": (h, d),
        "layers.1.feed_forward.w2.weight": (d, h),
        "layers.1.attention_norm.weight": (d,),
        "layers.1.ffn_norm.weight": (d,),
        "norm.weight": (d,),
        "output.weight": (300, d),
    }
    for name, shape in expect.items():
        assert shapes[name] == shape, name
    assert len(shapes) == 2 + 2 * 9 + 1  # embedding, output, 9 per block, final norm
    assert m.output.weight.data_ptr() != m.tok_embeddings.weight.data_ptr()  # untied


def test_init_std_per_class():
    m = tiny(dim=512, head_dim=128, vocab_size=4096)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
            continue
        want = 1 / math.sqrt(512) if name.startswith("tok_embeddings") else 1 / math.sqrt(p.shape[1])
        assert abs(p.std().item() / want - 1) < 0.03, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 4 * want / math.sqrt(p.numel())


def test_init_is_deterministic_and_seeded():
    a, b, c = tiny(), tiny(), Transformer(tiny().args)
    c.init_weights(seed=1)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), n
        if not n.endswith("norm.weight"):
            assert not torch.equal(pa, pc), n


def test_rope_matches_meta_complex_form():
    x = torch.randn(2, 5, 3, 8)
    tables = rope_tables(8, 5, 10000.0)
    # Meta's llama: view pairs as complex numbers and multiply by exp(i * t * theta^(-2k/D))
    freqs = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).double() / 8))
    cis = torch.polar(torch.ones(5, 4, dtype=torch.float64), torch.outer(torch.arange(5).double(), freqs))
    ref = torch.view_as_real(torch.view_as_complex(x.double().reshape(2, 5, 3, 4, 2)) * cis[None, :, None]).reshape(
        x.shape
    )
    torch.testing.assert_close(apply_rope(x, tables).double(), ref, rtol=1e-5, atol=1e-5)


def test_forward_is_causal():
    m = tiny()
    t = torch.randint(0, 300, (1, 16))
    t2 = t.clone()
    t2[0, 10:] = torch.randint(0, 300, (6,))
    with torch.no_grad():
        a, b = m(t), m(t2)
    torch.testing.assert_close(a[0, :10], b[0, :10])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_gqa_and_mfu_flops():
    m = tiny(n_kv_heads=1)
    assert m(torch.randint(0, 300, (2, 8))).shape == (2, 8, 300)
    blocks = sum(p.numel() for n, p in m.named_parameters() if n.startswith("layers."))
    assert flops_per_token(m, 32) == 6 * (blocks + 300 * 256) + 12 * 2 * 256 * 32
