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

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
    <script>%s</script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>"""


def offline_template() -> str:
    """DVC's page (its ``{refresh_tag}`` and ``{plot_divs}`` placeholders, no CDN ``{scripts}``), libraries inline."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE).replace("</script", "<\\/script")
    return PAGE % bundle


def write_template(path: Path) -> Path:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(offline_template())
    return path


if __name__ == "__main__":
    print(write_template(Path(sys.argv[1] if len(sys.argv) > 1 else ".dvc/plots.html")))
