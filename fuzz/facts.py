"""What the mutator knows about the kernel under test, all of it from the kernel's target
profile and its image: nothing about one kernel is written into the fuzzer.

- the heap's place and geometry (`[heap]` base, size, header size): sizes that land a loader
  allocation right at the heap's end, and addresses inside it, are the ones an allocator gets
  wrong;
- where the kernel image lies, an address range no user segment may touch;
- the values its author names (`[fuzz] values`), and the values learnt from the image: the
  immediates the code reachable from the snapshot point compares against and loads
  (kernel_emu.dictionary).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from kernel_emu.dictionary import learn_values
from kernel_emu.image import KernelImage
from kernel_emu.profile import TargetProfile

PAGE = 0x1000


@dataclass(frozen=True)
class HeapFacts:
    base: int
    size: int
    header: int

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class KernelFacts:
    heap: HeapFacts | None = None
    image: tuple[int, int] | None = None
    values: tuple[int, ...] = ()

    @property
    def places(self) -> tuple[int, ...]:
        """Where the kernel keeps its own things: the heap's start, first payload and end, the
        image's start and end."""
        out: list[int] = []
        if self.heap is not None:
            out += [self.heap.base, self.heap.base + self.heap.header, self.heap.end]
        if self.image is not None:
            out += [self.image[0], self.image[1], self.image[1] - PAGE]
        return tuple(out)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Sizes near the heap's: what makes a loader's allocation land at its end."""
        if self.heap is None:
            return ()
        size, header = self.heap.size, self.heap.header
        return (size - PAGE, size - 2 * header, size - header, size, size + 1)

    @property
    def record_sizes(self) -> tuple[int, ...]:
        """Guesses at the size of one entry of the kernel's own segment table: a heap header's
        size (kernels often describe a segment in as many words as a block), an ELF program
        header's."""
        return (self.heap.header, 56) if self.heap is not None else (56,)


def facts_for(profile: TargetProfile, image: KernelImage) -> KernelFacts:
    """The facts of one kernel build; learning from the image is done once per image."""
    heap = profile.heap
    learnt = _learnt(image, profile.kernel.snapshot_symbol)
    named = tuple(v for v in profile.fuzz.values if v not in learnt)
    return KernelFacts(
        heap=HeapFacts(heap.base, heap.size, heap.header_size) if heap.size else None,
        image=(image.start, image.end),
        values=named + learnt,
    )


@lru_cache(maxsize=8)
def _learnt(image: KernelImage, entry: str) -> tuple[int, ...]:
    return learn_values(image, entry)
