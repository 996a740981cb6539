"""The device process of the two-process polling stress (run by the test as
``python -m tests.virtqueue.polling_device ...``): the device side of one queue over
the memfd guest RAM it inherits, busy-polling (no notifications at all), echoing
every chain's readable bytes into its writable part. Stops when the word at
``--stop`` becomes non-zero; exits 1 with the error on stderr if the ring broke."""

from __future__ import annotations

import argparse
import sys
import time

from pyvirtio.memory.guest_memory import GuestMemory, MemoryRegion
from pyvirtio.virtqueue import make_device_queue
from pyvirtio.virtqueue.common import QueueAddresses


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--mem-size", type=int, required=True)
    ap.add_argument("--queue-size", type=int, required=True)
    ap.add_argument("--addrs", type=lambda s: [int(x, 0) for x in s.split(",")], required=True)
    ap.add_argument("--features", type=lambda s: int(s, 0), required=True)
    ap.add_argument("--stop", type=lambda s: int(s, 0), required=True)
    args = ap.parse_args()
    mem = GuestMemory([MemoryRegion(0, args.mem_size, args.fd)])
    desc, driver, device = args.addrs
    q = make_device_queue(mem, args.queue_size, QueueAddresses(desc, driver, device), args.features)
    served = 0
    deadline = time.monotonic() + 120
    try:
        while not mem.read_le32(args.stop) and time.monotonic() < deadline:
            n = 0
            while (chain := q.pop()) is not None:
                data = chain.read_all(mem)
                q.push(chain, chain.write_all(mem, data))
                n += 1
            if n:
                q.flush()
                served += n
    except Exception as e:  # report to the test
        print(f"device failed after {served} chains: {e!r}", file=sys.stderr)
        return 1
    print(f"device served {served} chains", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
