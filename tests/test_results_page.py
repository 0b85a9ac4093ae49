"""bench/RESULTS.md is what bench/results_page.py writes from bench/results/*.json: no figure on it
is typed by hand, and none is stale after a benchmark's JSON changes."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from results_page import page  # noqa: E402


def test_the_committed_results_page_is_the_scripts_output():
    assert (REPO / "bench" / "RESULTS.md").read_text() == page(), "run .venv/bin/python bench/results_page.py"


def test_the_readme_links_the_results_page():
    assert "(bench/RESULTS.md)" in (REPO / "README.md").read_text()
