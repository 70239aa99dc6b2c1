"""RestrictedEncoder.encode's CPU fast path (the capture client's `encode_locally` on a CPU
model, every decode step) gives the values of the full path, bit for bit."""

from __future__ import annotations

import torch

from monitor.features.encoder import RestrictedEncoder

SPECIAL = [float("nan"), -0.0, 0.0, 1e-45, -1e-45, float("inf"), -float("inf"), 0.5, -0.5]


def _encoder(floor: torch.Tensor, k: int = 300, d_in: int = 64) -> RestrictedEncoder:
    g = torch.Generator().manual_seed(0)
    return RestrictedEncoder(
        torch.randn(d_in, k, generator=g), torch.randn(k, generator=g), floor, "none"
    )


def _reference(encoder: RestrictedEncoder, x: torch.Tensor) -> torch.Tensor:
    """The full path (`encode_torch`: a compare and a masked fill), which the fast path skips."""
    return encoder.encode_torch(x)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_shared_floor_matches_the_masked_fill_bit_for_bit() -> None:
    """One floor for every column (ReLU packs): one in-place threshold, and -0.0, NaN,
    infinities, subnormals and values at the floor come out exactly as the masked fill."""
    for value in (0.0, 0.5, -0.5, 1e-45):
        encoder = _encoder(torch.full((300,), value))
        x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
        x[0, :9] = torch.tensor(SPECIAL)
        x[1] = 0.0  # every output is the bias: some at, some below the floor
        encoder.bias[:9] = torch.tensor(SPECIAL)
        encoder.bias[9] = value  # exactly at the floor: zeroed
        assert encoder._shared_floor() == float(encoder.floor[0])
        assert _same_bits(encoder.encode(x), _reference(encoder, x))


def test_per_column_floors_take_the_masked_fill() -> None:
    floor = torch.linspace(-1, 1, 300)
    encoder = _encoder(floor)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    assert encoder._shared_floor() is None
    assert _same_bits(encoder.encode(x), _reference(encoder, x))


def test_a_floor_changed_in_place_is_seen() -> None:
    """The shared floor is worked out once, but a floor edited in place (or replaced) after
    that is read again: without the version check the old threshold would still apply."""
    encoder = _encoder(torch.zeros(300))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    assert _same_bits(encoder.encode(x), _reference(encoder, x))
    encoder.floor[5] = 0.25  # in place: per-column floors now
    assert encoder._shared_floor() is None
    assert _same_bits(encoder.encode(x), _reference(encoder, x))
    encoder.floor.fill_(0.125)
    assert encoder._shared_floor() == 0.125
    assert _same_bits(encoder.encode(x), _reference(encoder, x))
    encoder.floor = torch.full((300,), -0.25)
    assert encoder._shared_floor() == -0.25
    assert _same_bits(encoder.encode(x), _reference(encoder, x))


def test_other_inputs_take_the_full_path() -> None:
    """bf16 activations and normalised encoders are converted or normalised first: the fast
    path is only for float32 rows the weights read as they are."""
    encoder = _encoder(torch.zeros(300))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    assert _same_bits(encoder.encode(x), _reference(encoder, x))
    normed = RestrictedEncoder(encoder.weight, encoder.bias, encoder.floor, "layer_norm")
    assert _same_bits(normed.encode(x.float()), _reference(normed, x.float()))
