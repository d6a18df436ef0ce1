"""What the page knows of ZeroGPU's visitor quotas: the tiers' figures as settings, a ledger of each
visitor's use and of what ZeroGPU last said of them, ZeroGPU's refusals read back, and what fits."""

from __future__ import annotations

from datetime import timedelta

import pytest

from nextstep.engine.sizes import Size
from nextstep.serving.quota import (
    DAILY_SECONDS,
    QuotaExceeded,
    QuotaLedger,
    QuotaPolicy,
    read_refusal,
    read_tiers,
    what_fits,
)
from nextstep.serving.service import Order, Visitor
from nextstep.serving.zerogpu import GpuService, GpuTask

from .test_zerogpu import off_zero_gpu


class SpacesError(Exception):
    """What spaces raises: a gr.Error with a title and a message."""

    def __init__(self, title: str, message: str):
        super().__init__(message)
        self.title, self.message = title, message


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_tiers_figures_are_settings():
    assert read_tiers(None, DAILY_SECONDS, "X") == DAILY_SECONDS
    assert read_tiers("anonymous=60, pro=9000", DAILY_SECONDS, "X") == dict(DAILY_SECONDS, anonymous=60, pro=9000)
    with pytest.raises(ValueError, match="NEXTSTEP_ZEROGPU_DAILY takes tier=seconds"):
        QuotaPolicy.from_environment({"NEXTSTEP_ZEROGPU_DAILY": "guest=5"})


def test_what_counts_is_the_reservation_times_the_hardware_factor_or_twice_on_xlarge():
    visitor = Visitor("a")
    assert QuotaLedger(QuotaPolicy(factor=1.5)).allowance(visitor).counted(100) == 150
    assert QuotaLedger(QuotaPolicy(xlarge=True)).allowance(visitor).counted(100) == 200


def test_the_ledger_counts_a_days_use_and_what_zerogpu_said():
    clock = Clock()
    ledger = QuotaLedger(QuotaPolicy(daily=dict(DAILY_SECONDS, anonymous=120)), clock)
    visitor = Visitor("address:1.2.3.4")
    assert ledger.allowance(visitor).left == 120
    ledger.charge(visitor, 50)
    assert ledger.allowance(visitor).left == 70
    clock.now += 24 * 3600 + 1  # a day later the use is forgotten
    assert ledger.allowance(visitor).left == 120
    said = read_refusal(SpacesError("ZeroGPU quota exceeded", "You have exceeded your free ZeroGPU quota "
                                    "(60s requested vs. 40s left). Try again in 0:10:00. "))
    ledger.learn(visitor, said)
    allowance = ledger.allowance(visitor)
    assert (allowance.tier, allowance.left, allowance.daily) == ("free", 40, 300)  # ZeroGPU named the tier
    refusal = ledger.check(visitor, 60, lambda limit: (({"num_sampling_steps": 10}, limit - 1),))
    assert refusal.kind == "left" and (refusal.counted, refusal.limit) == (60, 40)
    assert refusal.wait == timedelta(minutes=10) and refusal.fits == (({"num_sampling_steps": 10}, 39),)
    assert ledger.check(visitor, 40, lambda limit: ()) is None
    clock.now += 601  # what ZeroGPU said holds until the wait it named is over
    assert ledger.allowance(visitor).left == 300



def test_the_ledger_holds_a_days_visitors_not_everyone_ever_seen():
    """A page view asks for the visitor's allowance and leaves nothing behind; use and what ZeroGPU
    said are dropped a day later, so a public Space's ledger does not grow with every visitor."""
    clock = Clock()
    ledger = QuotaLedger(QuotaPolicy(), clock)
    for n in range(100):
        assert ledger.allowance(Visitor(f"address:10.0.0.{n}")).left == DAILY_SECONDS["anonymous"]
    assert ledger.visitors() == 0
    ledger.charge(Visitor("address:1.1.1.1"), 30)
    ledger.learn(Visitor("address:2.2.2.2"), read_refusal(SpacesError(
        "ZeroGPU quota exceeded", "You have exceeded your free ZeroGPU quota (60s requested vs. 40s left). "
                                  "Try again in 0:10:00. ")))
    assert ledger.visitors() == 2
    clock.now += 24 * 3600 + 1
    ledger.charge(Visitor("address:3.3.3.3"), 30)
    assert ledger.visitors() == 1
    assert ledger.allowance(Visitor("address:2.2.2.2")).tier == "anonymous"  # the tier it was told is a day old

@pytest.mark.parametrize("title, message, kind, counted, limit, tier", [
    ("ZeroGPU quota exceeded", "You have exceeded your Pro ZeroGPU quota (90s requested vs. 12s left). "
     "Try again in 1 day, 2:03:04. ", "left", 90, 12, "pro"),
    ("ZeroGPU quota exceeded", "You have exceeded your ZeroGPU quota (30s requested vs. 5s left). Try again in "
     "0:01:00. Authenticate with a Hugging Face token for more quota - https://huggingface.co/settings/tokens",
     "left", 30, 5, "anonymous"),
    ("ZeroGPU illegal duration", "The requested GPU duration (400s) is larger than the maximum allowed",
     "per_call", 400, None, None),
    ("ZeroGPU quota exceeded", "Space app has reached its GPU limit. Try re-running outside of examples",
     "space", None, None, None),
    ("ZeroGPU queue timeout", "No GPU was available after 60s. Retry later", "queue", None, None, None),
])
def test_zerogpus_refusals_are_read_back(title, message, kind, counted, limit, tier):
    refusal = read_refusal(SpacesError(title, message))
    assert (refusal.kind, refusal.counted, refusal.limit, refusal.tier) == (kind, counted, limit, tier)


def test_other_errors_are_not_refusals():
    assert read_refusal(RuntimeError("boom")) is None
    assert read_refusal(SpacesError("ZeroGPU client warning", "Falling back to IP-based quotas")) is None


def test_what_fits_names_one_image_the_most_steps_and_the_largest_smaller_size(tiny_pipe):
    service = GpuService(GpuTask([tiny_pipe], 0.0, off_zero_gpu), 0)
    sizes = service.sizes(False)

    def counted(order: Order) -> int:  # a stand-in reservation: grows with images, steps and area
        settings = order.settings
        width, height = map(int, settings["size"].split("x"))
        return settings["num_images"] * settings["num_sampling_steps"] * width * height // 4096

    order = Order("a red circle", settings=dict(size="128x128", num_images=2, num_sampling_steps=40))
    fits = what_fits(order, 80, counted, order.settings, sizes)
    assert fits[0] == ({"num_sampling_steps": 10}, 80)
    [(change, seconds)] = [fit for fit in fits if "size" in fit[0]]
    fitting = [size for size in sizes if size.area < 128 * 128 and 80 * size.area <= 80 * 4096]
    assert seconds <= 80 and Size.parse(change["size"]).area == max(size.area for size in fitting)
    fits = what_fits(order, 160, counted, order.settings, sizes)
    assert fits[0] == ({"num_images": 1}, 160)


def test_a_visitor_over_the_tiers_ceiling_is_refused_before_any_gpu_is_asked_for(tiny_pipe):
    asked = []

    def gpu(task, **reservation):
        def run(*args):
            asked.append(args)
            return task(*args)
        return run

    ledger = QuotaLedger(QuotaPolicy(per_call=dict(anonymous=5, free=300, pro=300)))
    service = GpuService(GpuTask([tiny_pipe], 0.0, gpu), 0, ledger)
    small = dict(size=(64, 64), num_sampling_steps=2)
    with pytest.raises(QuotaExceeded) as refused:
        service.submit(Order("a red circle", settings=small, visitor=Visitor("address:a")))
    assert refused.value.kind == "per_call" and refused.value.limit == 5
    assert refused.value.counted == service.reservation(Order("a red circle", settings=small)) > 5
    assert not asked and not service.busy
    signed_in = Visitor("user:someone", "free", signed_in=True)
    assert service.submit(Order("a red circle", settings=small, visitor=signed_in)).visitor == signed_in
