"""The attention family and the encoder-decoder: shapes, masking, gradients, padding invariance."""

from __future__ import annotations

import pytest
import torch

from export.attention import ATTENTION_KINDS, Attention
from export.model import Architecture, Seq2Seq, reverse_within_length
from service.runtime.tokenizers import EOS, PAD

pytestmark = pytest.mark.slow  # trains models or starts servers

HIDDEN = 16


def padded_batch(lengths: list[int], vocab: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.randint(4, vocab, (n - 1,), generator=generator)
        ids[row, n - 1] = EOS
    return ids, torch.tensor(lengths)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("local_window", [None, 2])
def test_attention_weights_are_masked_and_normalised(kind: str, local_window: int | None) -> None:
    torch.manual_seed(0)
    attention = Attention(kind, HIDDEN, max_source_len=12, local_window=local_window)
    lengths = torch.tensor([9, 4, 1])
    memory = torch.randn(3, 9, HIDDEN)
    memory[1, 4:] = 0
    memory[2, 1:] = 0
    query = torch.randn(3, HIDDEN)
    context, weights = attention(query, memory, attention.keys(memory), lengths)
    assert context.shape == (3, HIDDEN)
    assert weights.shape == (3, 9)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(3), atol=1e-6)
    assert bool((weights[1, 4:] == 0).all()) and bool((weights[2, 1:] == 0).all())
    assert weights[2, 0].item() == pytest.approx(1.0)
    if local_window is not None:
        # Only positions within the window around the predicted centre may carry weight.
        assert int((weights[0] > 0).sum()) <= 2 * local_window + 1


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_gradients_reach_every_parameter(kind: str) -> None:
    torch.manual_seed(0)
    config = Architecture(
        source_vocab=20,
        target_vocab=15,
        attention=kind,
        hidden=HIDDEN,
        embedding=8,
        local_window=2,
        top_k=5,
        max_source_len=12,
    )
    model = Seq2Seq(config)
    source, lengths = padded_batch([7, 3])
    target_in = torch.tensor([[1, 5, 6], [1, 7, 0]])
    model(source, lengths, target_in)[:, :, 4:].sum().backward()
    silent = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad
        and (p.grad is None or not bool(p.grad.abs().sum() > 0))
        and not name.endswith("embedding.weight")
    ]
    assert silent == []


def test_reverse_within_length_keeps_padding_in_place_and_is_an_involution() -> None:
    x = torch.arange(10, dtype=torch.float32).view(2, 5, 1)
    lengths = torch.tensor([5, 3])
    reversed_x = reverse_within_length(x, lengths)
    assert reversed_x[:, :, 0].tolist() == [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]]
    assert torch.equal(reverse_within_length(reversed_x, lengths), x)


CONFIGS = [
    dict(attention="additive", style="bahdanau", encoder="gru", decoder="gru"),
    dict(attention="general", style="luong", encoder="lstm", decoder="lstm", encoder_layers=2, decoder_layers=2),
    dict(attention="location", style="luong", encoder="transformer", decoder="gru", local_window=3),
    dict(attention="cosine", style="bahdanau", encoder="gru", decoder="lstm"),
    dict(attention="scaled_dot", style="luong", encoder="gru", decoder="gru", local_window=2),
    dict(attention="dot", style="bahdanau", encoder="lstm", decoder="gru"),
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: f"{o['attention']}-{o['style']}-{o['encoder']}")
def test_a_row_does_not_depend_on_padding_or_its_batch(options: dict) -> None:
    """Each row's encoder output and decoder step are the same alone and inside a longer padded batch."""
    torch.manual_seed(1)
    model = Seq2Seq(
        Architecture(
            source_vocab=20, target_vocab=15, hidden=HIDDEN, embedding=8, top_k=5, max_source_len=16, **options
        )
    ).eval()
    source, lengths = padded_batch([11, 4, 6])
    with torch.no_grad():
        batch = model.encode(source, lengths)
        batch_step = model.step(torch.tensor([1, 1, 1]), lengths, batch.memory, batch.keys, batch.state)
        for row, n in enumerate(lengths.tolist()):
            alone = model.encode(source[row : row + 1, :n], lengths[row : row + 1])
            assert torch.allclose(alone.memory[0], batch.memory[row, :n], atol=1e-5)
            assert bool((batch.memory[row, n:] == 0).all())
            step = model.step(torch.tensor([1]), lengths[row : row + 1], alone.memory, alone.keys, alone.state)
            assert torch.allclose(step[0][0], batch_step[0][row], atol=1e-5)
            assert torch.allclose(step[1][0], batch_step[1][row, :n], atol=1e-6)


def test_bad_configuration_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="attention 'bilinear'"):
        Architecture(source_vocab=10, target_vocab=10, attention="bilinear")
    with pytest.raises(ValueError, match="top_k must be in 1..10, got 20"):
        Architecture(source_vocab=10, target_vocab=10, top_k=20)
    with pytest.raises(ValueError, match="local_window"):
        Attention("dot", 8, max_source_len=4, local_window=0)
