"""The race's qiling competitor, first step: boot the kernel's UEFI image under qiling.

Run with a competitor's own interpreter (it imports only the standard library, `qiling` and
`unicorn`):

    python qiling_boot.py IMAGE.efi ROOTFS SECONDS

Qiling loads the image as its UEFI firmware would and runs `efi_main` with its own boot and
runtime services. The kernel takes its input from a ramdisk the firmware hands over, so fuzzing
it under qiling starts with qiling booting it that far. This prints one JSON object: where the
run stopped (`pc`, the image's base under qiling), what the kernel wrote to each I/O port
(`ports`: its debug console among them), and qiling's error if it raised one.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def main(argv: list[str]) -> int:
    image, rootfs, seconds = argv[1], argv[2], float(argv[3])
    from qiling import Qiling
    from qiling.const import QL_VERBOSE
    from unicorn import UC_HOOK_INSN
    from unicorn.x86_const import UC_X86_INS_OUT

    ql = Qiling([image], rootfs, verbose=QL_VERBOSE.DISABLED)
    ports: dict[int, bytearray] = {}

    def on_out(_uc: Any, port: int, _size: int, value: int, _user: Any) -> None:
        ports.setdefault(port, bytearray()).append(value & 0xFF)

    ql.uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, UC_X86_INS_OUT)
    error = None
    try:
        ql.run(timeout=int(seconds * 1_000_000))
    except Exception as e:  # noqa: BLE001 - whatever qiling raises is the answer
        error = f"{type(e).__name__}: {e}"
    images = getattr(ql.loader, "images", [])
    base = images[0].base if images else None
    print(json.dumps({"pc": int(ql.arch.regs.arch_pc), "image_base": base, "error": error,
                      "ports": {str(p): bytes(b).decode("latin-1") for p, b in ports.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
