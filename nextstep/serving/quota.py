"""ZeroGPU's visitor quotas, as far as a page can know them before it asks for a GPU.

ZeroGPU checks the seconds a GPU task *requests* against the visitor's allowance before anything
runs, and refuses the task when they exceed the visitor's per-call ceiling or what is left of their
day. No API tells a Space what is left; ``spaces`` learns it only from a refusal, which it reports
as a ``gr.Error`` in its own words (``spaces/zero/client.py``). So the page keeps what it can know:

* the tier of each visitor: ``anonymous``, ``free`` (signed in) or ``pro``, from the page's Sign in,
  or from what ZeroGPU said of them in a refusal;
* each tier's daily allowance and per-call ceiling, as settings (``QuotaPolicy``: which figures are
  published and which are not is in docs/deploy.md);
* what each visitor used through this Space over the last day, and the figure ZeroGPU last
  reported for them (``QuotaLedger``).

A request is refused before the GPU call when its counted seconds exceed what the visitor's tier
may ask at once or what is known to be left; the refusal (``QuotaExceeded``) names the figures and
what fits instead. A refusal of ZeroGPU's own is read back into the same form (``read_refusal``).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta

from ..engine.sizes import Size
from .service import Allowance, Order, Visitor

TIERS = ("anonymous", "free", "pro")
# Seconds of GPU time a day. Hugging Face's ZeroGPU page: 2 minutes unauthenticated, PRO "x8 more
# daily usage quota" than a free account; spaces 0.51.3 (client.py): PRO_QUOTA_MINUTES = 40.
DAILY_SECONDS = {"anonymous": 120, "free": 300, "pro": 2400}
# The longest single task each tier may request. Not published ("subject to change", say Hugging
# Face's answers); 300 s is what free accounts were told and what the page has always capped at.
PER_CALL_SECONDS = {"anonymous": 300, "free": 300, "pro": 300}
DAY = 24 * 3600.0
DAILY_VARIABLE, PER_CALL_VARIABLE = "NEXTSTEP_ZEROGPU_DAILY", "NEXTSTEP_ZEROGPU_PER_CALL"


def read_tiers(text: str | None, defaults: Mapping[str, int], variable: str) -> dict[str, int]:
    """``"anonymous=120,free=300,pro=2400"`` (any of them) over ``defaults``; ValueError naming ``variable``."""
    figures = dict(defaults)
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        tier, _, seconds = item.partition("=")
        if tier.strip() not in TIERS or not seconds.strip().isdigit():
            raise ValueError(f"{variable} takes tier=seconds pairs for {', '.join(TIERS)}, got {item!r}")
        figures[tier.strip()] = int(seconds)
    return figures


@dataclass(frozen=True)
class QuotaPolicy:
    """Each tier's daily allowance and per-call ceiling, and how ZeroGPU counts a reservation:
    ``spaces`` multiplies it by the hardware's duration factor (1.5 on half an RTX Pro 6000, 1 on
    an H200 slice), and an ``xlarge`` task counts twice its seconds."""

    daily: Mapping[str, int] = field(default_factory=lambda: dict(DAILY_SECONDS))
    per_call: Mapping[str, int] = field(default_factory=lambda: dict(PER_CALL_SECONDS))
    factor: float = 1.0
    xlarge: bool = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ, **counting) -> QuotaPolicy:
        return cls(read_tiers(environ.get(DAILY_VARIABLE), DAILY_SECONDS, DAILY_VARIABLE),
                   read_tiers(environ.get(PER_CALL_VARIABLE), PER_CALL_SECONDS, PER_CALL_VARIABLE), **counting)


class QuotaExceeded(RuntimeError):
    """A request ZeroGPU would refuse, or did, for the visitor's quota. ``kind``: "per_call" (over
    the tier's ceiling), "left" (over what is left today), "space" (ZeroGPU knew no visitor: the
    Space's own quota), "runs", "pending" or "queue" (no GPU came in time). ``fits``: changes of the
    order that would fit, each with the seconds it counts. The page writes the visitor's message
    from these (``page.visitors.quota_message``); ``said`` is spaces' own text, where it came from
    ZeroGPU."""

    def __init__(self, kind: str, counted: int | None, limit: int | None = None, tier: str | None = None,
                 wait: timedelta | None = None, fits: tuple = (), said: str = ""):
        self.kind, self.counted, self.limit, self.tier, self.wait = kind, counted, limit, tier, wait
        self.fits, self.said = fits, said
        super().__init__(f"ZeroGPU quota ({kind}): counts {counted} s, limit {limit} s, tier {tier}, wait {wait}")


def what_fits(order: Order, limit: int, counted: Callable[[Order], int], current: Mapping[str, object],
              sizes: list[Size]) -> tuple:
    """Changes of ``order`` that would count at most ``limit`` seconds (``counted``), each with what
    it counts: one image, the most sampling steps that fit, the largest smaller size that fits.
    ``current``: the order's values of those settings, defaults included."""

    def trial(change: dict) -> tuple[dict, int]:
        return change, counted(replace(order, settings={**order.settings, **change}))

    fits = []
    if int(current["num_images"]) > 1 and (one := trial({"num_images": 1}))[1] <= limit:
        fits.append(one)
    low, high, best = 1, int(current["num_sampling_steps"]) - 1, None  # counted grows with the steps
    while low <= high:
        middle = (low + high) // 2
        if (tried := trial({"num_sampling_steps": middle}))[1] <= limit:
            best, low = tried, middle + 1
        else:
            high = middle - 1
    fits += [best] if best else []
    area = Size.parse(current["size"]).area
    for size in sorted((s for s in sizes if s.area < area), key=lambda s: -s.area):
        if (tried := trial({"size": size.value}))[1] <= limit:
            fits.append(tried)
            break
    return tuple(fits)


# ---- what ZeroGPU said ---------------------------------------------------------------------------

REQUESTED = re.compile(r"\((\d+)s requested vs\. (\d+)s left\)")
ILLEGAL = re.compile(r"requested GPU duration \((\d+)s\) is larger than the maximum allowed")
WAIT = re.compile(r"Try again in (?:(\d+) days?, )?(\d+):(\d{2}):(\d{2})")
SAID_TIER = {"Pro ZeroGPU": "pro", "free ZeroGPU": "free"}


def read_refusal(error: BaseException) -> QuotaExceeded | None:
    """A refusal ``spaces`` raised (a ``gr.Error`` titled "ZeroGPU …"), as a ``QuotaExceeded``; None
    for anything else. The figures are read from its words, as spaces 0.51.3 writes them."""
    title = str(getattr(error, "title", "") or "")
    if not title.startswith("ZeroGPU") or "warning" in title:
        return None
    said = str(getattr(error, "message", error))
    if illegal := ILLEGAL.search(said):
        return QuotaExceeded("per_call", int(illegal[1]), said=said)
    if figures := REQUESTED.search(said):
        tier = next((tier for words, tier in SAID_TIER.items() if words in said), "anonymous")
        wait = WAIT.search(said)
        waited = timedelta(days=int(wait[1] or 0), hours=int(wait[2]), minutes=int(wait[3]),
                           seconds=int(wait[4])) if wait else None
        return QuotaExceeded("left", int(figures[1]), int(figures[2]), tier, waited, said=said)
    kind = ("space" if "reached its GPU limit" in said else "runs" if "runs limit" in said
            else "pending" if "credits allocated" in said else "queue")
    return QuotaExceeded(kind, None, said=said)


# ---- the ledger ----------------------------------------------------------------------------------


@dataclass
class Report:
    """ZeroGPU's last word on a visitor: seconds left, when it said so, until when it holds."""

    left: int
    said_at: float
    until: float


class QuotaLedger:
    """What the page knows of each visitor's quota (see the module's docstring). ``clock``: seconds."""

    def __init__(self, policy: QuotaPolicy, clock: Callable[[], float] = time.time):
        self.policy, self.clock = policy, clock
        self._used: dict[str, deque[tuple[float, float]]] = {}  # key -> (when, seconds) over the last day
        self._reports: dict[str, Report] = {}
        self._tiers: dict[str, tuple[str, float]] = {}  # the tier ZeroGPU named, and when
        self._lock = threading.Lock()

    def tier(self, visitor: Visitor) -> str:
        return self._tiers.get(visitor.key, (visitor.tier,))[0]

    def allowance(self, visitor: Visitor) -> Allowance:
        tier, now = self.tier(visitor), self.clock()
        with self._lock:
            used = self._used.get(visitor.key, ())
            while used and now - used[0][0] > DAY:
                used.popleft()
            left = self.policy.daily[tier] - sum(seconds for _, seconds in used)
            report = self._reports.get(visitor.key)
            if report is not None and now < report.until:
                left = min(left, report.left - sum(seconds for when, seconds in used if when >= report.said_at))
        return Allowance(tier, self.policy.per_call[tier], max(0, int(left)), self.policy.daily[tier],
                         self.policy.factor, self.policy.xlarge)

    def check(self, visitor: Visitor, reservation: int, fits: Callable[[int], tuple]) -> QuotaExceeded | None:
        """Why a request reserving ``reservation`` seconds would be refused, or None. ``fits(limit)``:
        the changes of the order that would count at most ``limit``."""
        allowance = self.allowance(visitor)
        counted = allowance.counted(reservation)
        if counted > allowance.per_call:
            return QuotaExceeded("per_call", counted, allowance.per_call, allowance.tier,
                                 fits=fits(min(allowance.per_call, allowance.left)))
        if counted > allowance.left:
            report = self._reports.get(visitor.key)
            wait = timedelta(seconds=round(report.until - self.clock())) if report and report.until > self.clock() else None
            return QuotaExceeded("left", counted, allowance.left, allowance.tier, wait, fits=fits(allowance.left))
        return None

    def charge(self, visitor: Visitor, seconds: float) -> None:
        """Count ``seconds`` of GPU time used by ``visitor``'s request through this Space."""
        now = self.clock()
        with self._lock:
            self._forget(now)
            self._used.setdefault(visitor.key, deque()).append((now, seconds))

    def learn(self, visitor: Visitor, refusal: QuotaExceeded) -> None:
        """Remember what ZeroGPU said of ``visitor`` in a refusal: their tier, and what is left until when."""
        now = self.clock()
        with self._lock:
            self._forget(now)
            if refusal.tier is not None:
                self._tiers[visitor.key] = (refusal.tier, now)
            if refusal.kind == "left" and refusal.limit is not None:
                wait = refusal.wait.total_seconds() if refusal.wait is not None else DAY
                self._reports[visitor.key] = Report(refusal.limit, now, now + wait)

    def visitors(self) -> int:
        """How many visitors the ledger holds anything of."""
        with self._lock:
            return len(self._used.keys() | self._reports.keys() | self._tiers.keys())

    def _forget(self, now: float) -> None:
        """Drop what is older than a day (use, the tiers ZeroGPU named) or no longer in force
        (ZeroGPU's figures), so the ledger holds a day's visitors, not everyone ever seen (called
        with the lock held)."""
        for key in [key for key, used in self._used.items() if not used or now - used[-1][0] > DAY]:
            del self._used[key]
        for key in [key for key, report in self._reports.items() if now >= report.until]:
            del self._reports[key]
        for key in [key for key, (_, learned) in self._tiers.items() if now - learned > DAY]:
            del self._tiers[key]
