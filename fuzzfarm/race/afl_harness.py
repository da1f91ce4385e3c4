"""The race's AFL++ competitor: a unicornafl harness on the exported snapshot.

Run by afl-fuzz in Unicorn mode with a competitor's own interpreter (it imports only the
standard library, `unicorn`, `unicornafl` and `resume.py` beside it):

    afl-fuzz -U -i SEEDS -o OUT -- python afl_harness.py EXPORT @@

It resumes the exported snapshot (resume.py) once; unicornafl then starts AFL++'s fork server
there, so every input runs in a fresh copy of that process (memory and CPU as the snapshot
left them). unicornafl collects the edge coverage natively. For each input the harness writes
it as the exported input layout says (an input too large for the channel is not run) and runs
to a stop; the run is a crash, reported to AFL++, when resume.py's outcome is one:
panic, fault or hang (the budget of instructions spent).

Without afl-fuzz (`python afl_harness.py EXPORT FILE`) it runs FILE once and prints the
outcome.
"""

from __future__ import annotations

import sys
from typing import Any

from resume import Export


def main(argv: list[str]) -> int:
    export = Export(argv[1])
    uc = export.machine()

    def place(_uc: Any, data: Any, _round: int, _user: Any) -> bool:
        data = bytes(data)
        if not export.fits(data):
            return False
        export.place(uc, data)
        return True

    def run(_uc: Any, _user: Any) -> int:
        error = export.start(uc)
        return int(error.errno) if error is not None else 0

    def crashed(_uc: Any, result: int, _data: Any, _round: int, _user: Any) -> bool:
        return export.outcome(uc, result).crash

    try:
        # unicornafl 2.1.0 reads distutils.sysconfig without importing it
        import distutils.sysconfig  # noqa: F401

        from unicornafl import UC_AFL_RET_NO_AFL, UcAflError, uc_afl_fuzz_custom
    except ImportError as e:
        print(f"unicornafl is not installed: {e}", file=sys.stderr)
        return 2
    try:
        uc_afl_fuzz_custom(uc, argv[2], place, run, crashed, always_validate=True,
                           persistent_iters=1)
    except UcAflError as e:
        if e.errno != UC_AFL_RET_NO_AFL:
            print(f"unicornafl: {e}", file=sys.stderr)
            return 2
        # no afl-fuzz around: the input was run once, outside the fork server
        print(export.outcome(uc, None).kind)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
