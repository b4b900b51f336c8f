"""Feature dashboards: a static site with a page per feature, written from one pass over held-out tokens.

``build_dashboard(sae, lm, tokens, hook_name, out)`` gathers every feature's firing
frequency, activation histogram, top-activating and quantile-sampled contexts (streaming,
memory independent of the token count), its logit effects and nearest features, and for
Switch SAEs the router's load and where it sends the tokens a feature would fire on; then
writes the site (Jinja2 templates, Plotly plots, data in chunks). ``switch-sae dashboard``
runs it from the command line. Needs the ``[dashboard]`` extra (Jinja2, Plotly).
"""

from typing import Any

from .config import DashboardConfig

__all__ = ["DashboardConfig", "build_dashboard"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so the CLI (and `import switch_sae`) work without the extra.
    if name == "build_dashboard":
        from .build import build_dashboard

        return build_dashboard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
