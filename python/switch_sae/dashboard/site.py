"""Write the dashboard: a static site that opens from disk, with no server and no internet.

Layout of the output folder::

    index.html               every feature: sortable, searchable, paginated table + density histogram
    feature.html             one feature (``feature.html?id=123``), drawn from its data chunk
    experts.html             Switch SAEs: expert load and the expert-similarity heat map
    experts/expert_<e>.html  Switch SAEs: one expert's load, similarities and features
    assets/                  plotly.min.js (once for the whole site), dashboard.js, style.css
    data/meta.js             SAE description, page sizes, histogram bin edges
    data/tokens.js           the held-out tokens (vocabulary ids) and the strings of the ids used
    data/rows/<c>.js         index rows, ROWS_PER_CHUNK features per file
    data/features/<c>.js     feature records, FEATURES_PER_CHUNK features per file

Data files are scripts that hand their JSON to ``DASH.receive`` rather than ``.json``
files, because browsers refuse ``fetch`` on ``file://`` pages; loading them with
``<script>`` tags works both from disk and from a web server. Pages are Jinja2 templates
(package data of ``switch_sae.dashboard``); plots are Plotly figures.

What it leaves out: computing anything (``gather``, ``effects``, ``records``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from jinja2 import Environment, PackageLoader, select_autoescape
from plotly.offline import get_plotlyjs

from ..utils.io import atomic_write
from .streaming import HIST_EDGES

ROWS_PER_CHUNK = 4096
FEATURES_PER_CHUNK = 128
PAGE_SIZE = 50
ASSETS = Path(__file__).parent / "assets"


def environment() -> Environment:
    return Environment(loader=PackageLoader("switch_sae.dashboard", "templates"), autoescape=select_autoescape())


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def data_script(kind: str, key: str, payload: Any) -> str:
    """A data file: a script handing ``payload`` to the page."""
    return f"DASH.receive({json.dumps(kind)},{json.dumps(key)},{json.dumps(payload, separators=(',', ':'))});\n"


def figure_html(fig: go.Figure, div_id: str) -> str:
    """A Plotly figure as a ``<div>`` + script; plotly.js itself is loaded once per page from assets/."""
    fig.update_layout(margin={"l": 50, "r": 20, "t": 40, "b": 40}, height=320, template="plotly_white")
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id, config={"displaylogo": False})


def density_figure(frequency: list[float], n_tokens: int) -> go.Figure:
    """Histogram over features of log10 firing frequency; features that never fired are counted apart."""
    alive = [math.log10(f) for f in frequency if f > 0]
    dead = len(frequency) - len(alive)
    fig = go.Figure(go.Histogram(x=alive, nbinsx=50, marker_color="#4c78a8"))
    fig.update_layout(title=f"Feature density over {n_tokens:,} tokens ({dead:,} features never fired)",
                      xaxis_title="log10 firing frequency", yaxis_title="features")
    return fig


def load_figure(load: list[float], n_active: int) -> go.Figure:
    experts = [f"expert {e}" for e in range(len(load))]
    fig = go.Figure(go.Bar(x=experts, y=load, marker_color="#f58518"))
    fig.add_hline(y=n_active / len(load), line_dash="dot", annotation_text="balanced")
    fig.update_layout(title="Expert load: fraction of tokens routed to each expert", yaxis_title="fraction of tokens")
    return fig


def similarity_figure(similarity: list[list[float]]) -> go.Figure:
    labels = [str(e) for e in range(len(similarity))]
    fig = go.Figure(go.Heatmap(z=similarity, x=labels, y=labels, colorscale="Viridis", colorbar={"title": "cos"}))
    fig.update_layout(title="Expert similarity: mean over row-expert features of the max cosine to the column expert",
                      xaxis_title="expert B", yaxis_title="expert A", yaxis_autorange="reversed")
    return fig


def expert_row_figure(row: list[float], expert: int) -> go.Figure:
    colours = ["#e45756" if e == expert else "#4c78a8" for e in range(len(row))]
    fig = go.Figure(go.Bar(x=[f"expert {e}" for e in range(len(row))], y=row, marker_color=colours))
    fig.update_layout(title=f"Mean max decoder cosine of expert {expert}'s features to each expert", yaxis_title="cos")
    return fig


def copy_assets(out: Path) -> None:
    assets = out / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    write_text(assets / "plotly.min.js", get_plotlyjs())
    for name in ("dashboard.js", "style.css"):
        shutil.copyfile(ASSETS / name, assets / name)


def write_site(
    out: Path,
    meta: dict[str, Any],
    rows: list[list[Any]],
    records: list[dict[str, Any]],
    tokens: list[int],
    vocab: dict[int, str],
    experts: dict[str, Any] | None,
) -> Path:
    """Write every page, asset and data chunk of the dashboard into ``out``; returns index.html."""
    out.mkdir(parents=True, exist_ok=True)
    copy_assets(out)
    env = environment()
    meta = {**meta, "rows_per_chunk": ROWS_PER_CHUNK, "features_per_chunk": FEATURES_PER_CHUNK, "page_size": PAGE_SIZE,
            "hist_edges": [float(f"{e:.4g}") for e in HIST_EDGES.tolist()], "switch": experts is not None}
    write_text(out / "data" / "meta.js", data_script("meta", "meta", meta))
    write_text(out / "data" / "tokens.js", data_script("tokens", "tokens", {"ids": tokens, "vocab": vocab}))
    for c in range(0, len(rows), ROWS_PER_CHUNK):
        key = f"{c // ROWS_PER_CHUNK:04d}"
        write_text(out / "data" / "rows" / f"{key}.js", data_script("rows", key, rows[c : c + ROWS_PER_CHUNK]))
    for c in range(0, len(records), FEATURES_PER_CHUNK):
        key = f"{c // FEATURES_PER_CHUNK:04d}"
        write_text(out / "data" / "features" / f"{key}.js", data_script("features", key, records[c : c + FEATURES_PER_CHUNK]))
    common = {"meta": meta, "root": ""}
    density = figure_html(density_figure([r[2] for r in rows], meta["n_tokens"]), "density")
    write_text(out / "index.html", env.get_template("index.html").render(**common, density=density, page="index"))
    write_text(out / "feature.html", env.get_template("feature.html").render(**common, page="feature"))
    if experts is not None:
        load = figure_html(load_figure(experts["load"], meta["n_active"]), "load")
        heat = figure_html(similarity_figure(experts["similarity"]), "similarity")
        write_text(out / "experts.html", env.get_template("experts.html").render(
            **common, page="experts", load=load, heat=heat, experts=experts))
        for e in range(meta["n_experts"]):
            row = figure_html(expert_row_figure(experts["similarity"][e], e), "expert-similarity")
            write_text(out / "experts" / f"expert_{e}.html", env.get_template("expert.html").render(
                meta=meta, root="../", page="expert", expert=e, experts=experts, similarity=row))
    return out / "index.html"
