"""Progress lines, through ``logging``, for the long work that ``model.fit`` does not report: folder scans,
decoding into memory, evaluation. The command-line tools send them to stderr."""

import logging
import time

# Work that ends sooner than this logs nothing: small folders and quick evaluations stay quiet.
QUIET_S = 2.0
# Between tenths, a line at least this often: a large folder or a CPU evaluation spends minutes on one.
EVERY_S = 5.0


class Progress:
    """Logs ``what: done of total (pct, elapsed[, rate])`` at each further tenth of ``total`` and at least
    every ``EVERY_S`` seconds, once ``quiet_s`` (default ``QUIET_S``) has passed. ``advance(n, items)`` counts
    ``n`` steps; ``items`` (images in a batch, say) adds an ``items/s`` rate to the line."""

    def __init__(self, what: str, total: int, log: logging.Logger, *, quiet_s=None, items_name="images"):
        self.what, self.total, self.log = what, max(int(total), 1), log
        self.quiet_s, self.items_name = quiet_s, items_name
        self.done = self.items = 0
        self.start = self.last_time = time.monotonic()
        self.last_tenth = 0

    def advance(self, n: int = 1, items: int = 0) -> None:
        self.done += n
        self.items += items
        now = time.monotonic()
        quiet_s = QUIET_S if self.quiet_s is None else self.quiet_s
        if now - self.start < quiet_s:
            return
        tenth = (10 * self.done) // self.total
        if tenth > self.last_tenth or now - self.last_time >= EVERY_S:
            self.last_tenth, self.last_time = max(tenth, self.last_tenth), now
            elapsed = now - self.start
            rate = f", {self.items / max(elapsed, 1e-9):.0f} {self.items_name}/s" if self.items else ""
            self.log.info(
                "%s: %d of %d (%.0f%%, %.1f s%s)",
                self.what,
                self.done,
                self.total,
                100.0 * self.done / self.total,
                elapsed,
                rate,
            )
