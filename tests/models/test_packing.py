import torch

from visiontune.kernels.attention import varlen_attention, varlen_attention_reference
from visiontune.models.packing import pack_padded_batch, unpack_to_padded


def test_pack_right_and_left_padding():
    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 8, 9], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    labels = torch.where(mask.bool(), ids + 100, torch.full_like(ids, -100))
    p = pack_padded_batch(ids, mask, labels)
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert p["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and p["cu_seq_lens_q"].dtype == torch.int32
    assert p["max_length_q"] == 4
    # first token of each sample masked so the shifted loss never crosses a sample boundary
    assert p["labels"].tolist() == [[-100, 106, 107, -100, 109, -100, 102, 103, 104]]


def test_pack_mrope_positions_and_unpack_roundtrip():
    b, s = 2, 5
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    pos = torch.arange(3 * b * s).view(3, b, s)
    p = pack_padded_batch(torch.ones(b, s, dtype=torch.long), mask, position_ids=pos)
    assert p["position_ids"].shape == (3, 1, 6)
    assert p["position_ids"][1, 0].tolist() == [10, 11, 12, 13, 15, 16]
    x = torch.randn(b, s, 3)
    packed = x[mask.bool()][None]
    back = unpack_to_padded(packed, mask)
    torch.testing.assert_close(back[mask.bool()], x[mask.bool()])
    assert (back[~mask.bool()] == 0).all()


def test_packed_attention_equals_per_sample_attention():
    """Attention on the packed row with cu_seqlens == attention of each sample alone (causal)."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]])
    p = pack_padded_batch(torch.zeros(3, 7, dtype=torch.long), mask)
    t = p["input_ids"].shape[1]
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    out = varlen_attention(q, k, v, p["cu_seq_lens_q"], p["max_length_q"], causal=True)
    cu = p["cu_seq_lens_q"].tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        alone = varlen_attention_reference(q[s:e], k[s:e], v[s:e], torch.tensor([0, e - s]), causal=True)
        torch.testing.assert_close(out[s:e], alone, atol=2e-5, rtol=1e-4)
