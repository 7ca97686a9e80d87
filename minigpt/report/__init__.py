"""Reports of a finished run: report.html (html), its inline SVG charts (svg), PNG charts (plots)."""
