"""Who a visitor is and what ZeroGPU lets them ask for, on the page: the visitor a request is
charged to, the Sign in button, the reservation shown before Generate, and quota refusals written
in the visitor's language.

The figures come from the service (``Service.reservation``, ``Service.allowance``); a service
that reserves nothing (in-process, Ray) has no note and no button.
"""

from __future__ import annotations

import json
import os

import gradio as gr
from gradio.components import login_button
from PIL import Image

from ..engine.sizes import Size
from ..serving.quota import QuotaExceeded, what_fits
from ..serving.service import Allowance, Order, Service, Visitor
from .guard import PageLimits, request_client
from .i18n import CATALOGUE, say

PROBE = Visitor("nobody")  # asks a service whether quotas apply at all


def has_quota(service: Service | None) -> bool:
    return service is not None and service.allowance(PROBE) is not None


def signed_in_profile(request: gr.Request | None) -> dict | None:
    """The signed-in visitor's Hugging Face profile (what the Sign in button stored in the
    session: name, ``isPro``, ...), or None (not signed in, or no Sign in on this page)."""
    try:
        info = request.session.get("oauth_info") if request is not None else None
    except (AssertionError, AttributeError, KeyError):  # no session without the Sign in button
        return None
    return info.get("userinfo") if isinstance(info, dict) else None


def visitor_of(request: gr.Request | None, limits: PageLimits) -> Visitor | None:
    """Whom ``request`` is charged to: a signed-in account by its name (a PRO account as such),
    anyone else by their address; None without a request (an example cached at start-up)."""
    profile = signed_in_profile(request)
    if profile and profile.get("preferred_username"):
        tier = "pro" if profile.get("isPro") else "free"
        return Visitor(f"user:{profile['preferred_username']}", tier, signed_in=True)
    if request is None:
        return None
    return Visitor("address:" + request_client(request, limits.trusted_proxies))


def sign_in_offered(service: Service | None) -> bool:
    """The Sign in button is shown on ZeroGPU only (signed-in visitors get more GPU time there),
    and only where the Space has Hugging Face sign-in (``hf_oauth: true`` sets OAUTH_CLIENT_ID)."""
    return has_quota(service) and bool(os.environ.get("OAUTH_CLIENT_ID"))


class SignInButton(gr.LoginButton):
    """``gr.LoginButton`` labelled in the visitor's language. Gradio's own tells signing in from
    signing out by comparing the label it shows with its default one; translated in the browser,
    the label is compared with its every translation instead."""

    def get_block_name(self) -> str:
        return "button"  # drawn by the frontend as Gradio's login button is: a plain button

    def activate(self):
        default = "buttonValue === BUTTON_DEFAULT_VALUE"
        assert default in login_button._js_handle_redirect, "Gradio's sign-in script changed"
        labels = json.dumps([self.value, *CATALOGUE["sign_in"]])
        script = login_button._js_handle_redirect.replace(default, f"{labels}.includes(buttonValue)")
        self.click(fn=None, inputs=[self], outputs=None, js=script.replace("REDIRECT_URL", self.page))
        self.attach_load_event(self._check_login_status, None)


# ---- messages -----------------------------------------------------------------------------------


def tier_name(tier: str) -> str:
    return say(f"tier.{tier}")


def fits_text(fits: tuple) -> str:
    if not fits:
        return say("quota.nothing_fits")
    parts = []
    for change, seconds in fits:
        [(name, value)] = change.items()
        parts.append(say(f"fit.{name}", value=Size.parse(value).label if name == "size" else value, seconds=seconds))
    return say("quota.fits", fits="; ".join(parts))


def quota_message(error: QuotaExceeded, signed_in: bool) -> str:
    """A quota refusal, the page's or ZeroGPU's, in the visitor's language: the figures, what fits,
    when to try again, and Sign in where that would give more."""
    if error.kind not in ("per_call", "left"):
        return say(f"quota.{error.kind}")
    if error.kind == "per_call" and error.limit is None:
        lines = [say("quota.per_call_unknown", counted=error.counted)]
    else:
        lines = [say(f"quota.{error.kind}", counted=error.counted, limit=error.limit,
                     tier=tier_name(error.tier or "anonymous"))]
    lines.append(fits_text(error.fits))
    if error.wait is not None:
        lines.append(say("quota.wait", wait=str(error.wait)))
    if not signed_in and (error.tier or "anonymous") == "anonymous":
        lines.append(say("reserve.sign_in"))
    return " ".join(lines)


def reservation_note(service: Service | None, order: Order) -> str:
    """What the request ``order`` would reserve on ZeroGPU, and what its visitor may ask for;
    empty where nothing is reserved, or the order cannot run (its own message says why)."""
    if service is None:
        return ""
    try:
        seconds = service.reservation(order)
    except ValueError:
        return ""
    allowance: Allowance | None = service.allowance(order.visitor)
    if seconds is None or allowance is None:
        return ""
    counted = allowance.counted(seconds)
    lines = [say("reserve", seconds=seconds)]
    if counted != seconds:
        lines.append(say("reserve.counted", counted=counted))
    lines.append(say("reserve.allowance", tier=tier_name(allowance.tier), daily=allowance.daily,
                     per_call=allowance.per_call, left=allowance.left))
    if counted > min(allowance.per_call, allowance.left):
        lines.append("⚠ " + fits_text(fitting(service, order, allowance)))
    if not order.visitor.signed_in:
        lines.append(say("reserve.sign_in"))
    return " ".join(lines)


def fitting(service: Service, order: Order, allowance: Allowance) -> tuple:
    """What of ``order`` would fit ``allowance`` (``quota.what_fits``, as the service refuses)."""
    current = {**service.defaults(edit=order.image is not None), **order.settings}
    return what_fits(order, min(allowance.per_call, allowance.left),
                     lambda changed: allowance.counted(service.reservation(changed)), current,
                     service.sizes(order.image is not None))


def stand_in_image(size) -> Image.Image:
    """An input picture for reserving an edit before one is uploaded: the reservation depends on
    its token count, not on what it shows."""
    size = Size.parse(size)
    return Image.new("RGB", (size.width, size.height), "white")
