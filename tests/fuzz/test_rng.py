"""fuzz._rng, the mutator's per-call generator, against a reference written from the papers'
definitions (SplitMix64; xoshiro256**), and as random.Random's draws see it."""

from __future__ import annotations

import random

import pytest

from fuzz import mutator

_rng = pytest.importorskip("fuzz._rng")

M64 = (1 << 64) - 1


def _splitmix(x: int) -> tuple[int, int]:
    x = (x + 0x9E3779B97F4A7C15) & M64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return x, z ^ (z >> 31)


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & M64


class Reference:
    def __init__(self, seed: int) -> None:
        mix = 0
        while True:
            mix, _ = _splitmix(mix ^ (seed & M64))
            seed >>= 64
            if not seed:
                break
        self.s = []
        for _ in range(4):
            mix, out = _splitmix(mix)
            self.s.append(out)

    def next(self) -> int:
        s = self.s
        result = (_rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF, M64, 7 << 64 | 12345, (1 << 200) + 3])
def test_draws_are_the_reference_generator_s(seed: int) -> None:
    g, ref = _rng.Generator(seed), Reference(seed)
    for _ in range(50):
        assert g.random() == (ref.next() >> 11) / (1 << 53)
    for k in (1, 7, 32, 63, 64):
        assert g.getrandbits(k) == ref.next() >> (64 - k)
    # wider than one word: whole words, low first, the last one cut to the bits asked for
    low, high = ref.next(), ref.next() >> (64 - 36)
    assert g.getrandbits(100) == low | high << 64
    assert g.getrandbits(0) == 0


def test_the_seed_decides_the_draws() -> None:
    a = [_rng.Generator(42).getrandbits(64) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    # another word of the seed, however high, gives other draws
    seeds = [42, 43, 42 | 1 << 64, 42 | 1 << 127]
    assert len({_rng.Generator(s).getrandbits(64) for s in seeds}) == len(seeds)


def test_bad_seeds_and_widths_are_errors() -> None:
    with pytest.raises(ValueError):
        _rng.Generator(-1)
    with pytest.raises(TypeError):
        _rng.Generator(1.5)
    with pytest.raises(ValueError):
        _rng.Generator(1).getrandbits(-1)


def test_random_s_draws_over_it_are_in_range_and_spread() -> None:
    rng = mutator.call_random(9)
    assert isinstance(rng, random.Random)
    draws = [rng.randrange(10) for _ in range(5000)]
    assert set(draws) == set(range(10))
    assert all(400 < draws.count(v) < 600 for v in range(10))
    floats = [rng.random() for _ in range(5000)]
    assert all(0.0 <= f < 1.0 for f in floats)
    assert 0.45 < sum(floats) / len(floats) < 0.55
    assert sorted(rng.sample(range(5), 5)) == list(range(5))
    # huge bounds go through getrandbits wider than a word
    big = [rng.randrange(1 << 100) for _ in range(200)]
    assert max(big) > 1 << 98 and all(0 <= b < 1 << 100 for b in big)
    with pytest.raises(TypeError):
        rng.seed(3)


def test_a_mutator_call_is_a_function_of_its_seed() -> None:
    a, b = mutator.call_random(5), mutator.call_random(5)
    assert [a.getrandbits(64) for _ in range(5)] == [b.getrandbits(64) for _ in range(5)]
