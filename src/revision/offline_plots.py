"""An HTML template for ``dvc plots show`` / ``dvc plots diff`` that draws without a network.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so where there is no network every plot
but the PNGs is blank. This writes DVC's page with the three libraries inlined (vl-convert bundles them);
``.dvc/config`` points ``plots.html_template`` at it. ``scripts/install.sh`` runs it:

    python -m revision.offline_plots .dvc/plots.html
"""

from __future__ import annotations

import sys
from pathlib import Path

from revision.outputs import atomic_file

VEGA_LITE = "5.21"  # DVC's plot templates are Vega-Lite v5 specs


def offline_template() -> str:
    """DVC's own page, its CDN ``{scripts}`` placeholder replaced by the libraries inline."""
    import vl_convert
    from dvc_render.html import PAGE_HTML

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE).replace("</script", "<\\/script")
    return PAGE_HTML.replace("{scripts}", f"<script>{bundle}</script>")


def write_template(path: Path) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(offline_template())
    return path


if __name__ == "__main__":
    print(write_template(Path(sys.argv[1] if len(sys.argv) > 1 else ".dvc/plots.html")))
