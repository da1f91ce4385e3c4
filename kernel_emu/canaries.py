"""Magma-style canaries of a build with planted bugs: after a run, which bugs the run reached
(the bug's code executed) and triggered (the bug's condition held), read from the byte per
bug the guest keeps at the profile's `[canaries] symbol`.

Benchmarks read them to tell which bug a finding is, and how far a fuzzer got towards each;
the oracles never do (tests/test_module_graph.py keeps it so): a finding must stand on what the
kernel did, not on the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel_emu.image import KernelImage
from kernel_emu.machine import Machine
from kernel_emu.profile import TargetProfile

REACHED = 1
TRIGGERED = 2  # and bits 2-7: the order in which the run triggered the bugs


@dataclass(frozen=True)
class CanaryState:
    reached: frozenset[str]
    # in the order the run first triggered them (the first is the likeliest cause)
    triggered: tuple[str, ...]


class Canaries:
    def __init__(self, profile: TargetProfile, image: KernelImage) -> None:
        self.names = profile.canaries.names
        self.address = image.symbol(profile.canaries.symbol).address
        # the reached and triggered bits of every byte, without the order
        self.flag_mask = int.from_bytes(bytes([REACHED | TRIGGERED]) * len(self.names),
                                        "little")

    def raw(self, machine: Machine) -> int:
        """The flags of every bug as one integer, byte i for bug i (cheap: read per run)."""
        return int.from_bytes(machine.read(self.address, len(self.names)), "little")

    def state(self, flags: int) -> CanaryState:
        reached, triggered = set(), []
        for i, name in enumerate(self.names):
            byte = flags >> (8 * i) & 0xFF
            if byte & REACHED:
                reached.add(name)
            if byte & TRIGGERED:
                triggered.append((byte >> 2, name))
        return CanaryState(frozenset(reached), tuple(name for _, name in sorted(triggered)))


def canaries_for(profile: TargetProfile, image: KernelImage) -> Canaries | None:
    return Canaries(profile, image) if profile.canaries.names else None
